// Device discovery and a toolchain self-test for the CUDA backend.
#include <cuda_runtime.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda.h"
#include "kernels/cuda/module.h"

static int mod_probe(struct moe_cuda_device *out, int max, struct moe_diag *diag)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
        cudaGetLastError();
        return 0;
    }
    if (e != cudaSuccess)
        return moe_diag_set(diag, MOE_EGPU, "cudaGetDeviceCount: %s", cudaGetErrorString(e));
    for (int i = 0; i < n && i < max; i++) {
        cudaDeviceProp p;
        e = cudaGetDeviceProperties(&p, i);
        if (e != cudaSuccess)
            return moe_diag_set(diag, MOE_EGPU, "cudaGetDeviceProperties(%d): %s", i,
                                cudaGetErrorString(e));
        memset(&out[i], 0, sizeof(out[i]));
        out[i].index = i;
        snprintf(out[i].name, sizeof(out[i].name), "%s", p.name);
        out[i].cc_major = p.major;
        out[i].cc_minor = p.minor;
        out[i].n_sm = p.multiProcessorCount;
        out[i].total_mem = p.totalGlobalMem;
        if (cudaSetDevice(i) == cudaSuccess) {
            size_t fr = 0, tot = 0;
            if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) {
                out[i].free_mem = fr;
                out[i].total_mem = tot;
            }
        }
    }
    return n;
}

__global__ static void saxpy_kernel(int n, float a, const float *x, float *y)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] = a * x[i] + y[i];
}

static int mod_selftest(int dev, struct moe_diag *diag)
{
    enum { N = 4099 };
    static float hx[N], hy[N];
    float *dx = NULL, *dy = NULL;
    int rc = 0;
    cudaError_t e;
#define CK(stmt) do { e = (stmt); if (e != cudaSuccess) { \
        rc = moe_diag_set(diag, MOE_EGPU, "%s: %s (%s:%d)", #stmt, cudaGetErrorString(e), \
                          __FILE__, __LINE__); goto out; } } while (0)
    for (int i = 0; i < N; i++) {
        hx[i] = (float)i;
        hy[i] = 1.0f;
    }
    CK(cudaSetDevice(dev));
    CK(cudaMalloc(&dx, sizeof(hx)));
    CK(cudaMalloc(&dy, sizeof(hy)));
    CK(cudaMemcpy(dx, hx, sizeof(hx), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dy, hy, sizeof(hy), cudaMemcpyHostToDevice));
    saxpy_kernel<<<(N + 255) / 256, 256>>>(N, 2.0f, dx, dy);
    CK(cudaGetLastError());
    CK(cudaMemcpy(hy, dy, sizeof(hy), cudaMemcpyDeviceToHost));
    for (int i = 0; i < N; i++) {
        if (hy[i] != 2.0f * (float)i + 1.0f) {
            rc = moe_diag_set(diag, MOE_EGPU, "selftest: y[%d] = %g, expected %g", i,
                              (double)hy[i], 2.0 * i + 1.0);
            goto out;
        }
    }
out:
#undef CK
    cudaFree(dx);
    cudaFree(dy);
    return rc;
}

static int mod_measure_rates(int dev, size_t bytes, struct moe_cuda_rates *out,
                                      struct moe_diag *diag)
{
    memset(out, 0, sizeof(*out));
    out->bytes = bytes;
    void *pinned = nullptr, *pageable = nullptr, *d0 = nullptr, *d1 = nullptr;
    cudaEvent_t a = nullptr, b = nullptr;
    int rc = 0;
    cudaError_t e;
#define CK(stmt) do { e = (stmt); if (e != cudaSuccess) { \
        rc = moe_diag_set(diag, MOE_EGPU, "%s: %s (%s:%d)", #stmt, cudaGetErrorString(e), \
                          __FILE__, __LINE__); goto out; } } while (0)
    CK(cudaSetDevice(dev));
    CK(cudaHostAlloc(&pinned, bytes, cudaHostAllocDefault));
    pageable = malloc(bytes);
    if (pageable == nullptr) {
        rc = moe_diag_set(diag, -ENOMEM, "rates: cannot allocate %zu bytes", bytes);
        goto out;
    }
    memset(pinned, 1, bytes);
    memset(pageable, 1, bytes);
    CK(cudaMalloc(&d0, bytes));
    CK(cudaMalloc(&d1, bytes));
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    {
        // what, from, to, kind, bytes counted per copy
        struct {
            double *rate;
            void *dst;
            const void *src;
            cudaMemcpyKind kind;
            double per_copy;
        } runs[] = {
            { &out->h2d_pinned, d0, pinned, cudaMemcpyHostToDevice, (double)bytes },
            { &out->h2d_pageable, d0, pageable, cudaMemcpyHostToDevice, (double)bytes },
            { &out->d2h_pinned, pinned, d0, cudaMemcpyDeviceToHost, (double)bytes },
            { &out->d2d, d1, d0, cudaMemcpyDeviceToDevice, 2.0 * (double)bytes },
        };
        for (size_t r = 0; r < sizeof(runs) / sizeof(runs[0]); r++) {
            double best = 0;
            for (int rep = 0; rep < 4; rep++) {   // the first is a warm-up
                CK(cudaEventRecord(a, 0));
                CK(cudaMemcpyAsync(runs[r].dst, runs[r].src, bytes, runs[r].kind, 0));
                CK(cudaEventRecord(b, 0));
                CK(cudaEventSynchronize(b));
                float ms = 0;
                CK(cudaEventElapsedTime(&ms, a, b));
                const double rate = ms > 0 ? runs[r].per_copy / (ms * 1e-3) : 0;
                if (rep > 0 && rate > best)
                    best = rate;
            }
            *runs[r].rate = best;
        }
    }
out:
#undef CK
    if (a)
        cudaEventDestroy(a);
    if (b)
        cudaEventDestroy(b);
    cudaFree(d0);
    cudaFree(d1);
    if (pinned)
        cudaFreeHost(pinned);
    free(pageable);
    return rc;
}

extern "C" int moe_cudamod_backend_create(struct moe_backend **out, int device, struct moe_diag *diag);

// The module's one exported entry: the table libmoe's loader calls through
// (kernels/cuda/module.h).
extern "C" __attribute__((visibility("default"))) const struct moe_cuda_module *moe_cuda_module_get(void)
{
    static const struct moe_cuda_module m = {
        MOE_CUDA_MODULE_ABI, mod_probe, mod_selftest, mod_measure_rates, moe_cudamod_backend_create,
    };
    return &m;
}

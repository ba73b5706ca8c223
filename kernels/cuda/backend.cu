// The CUDA backend: the ops table of kernels/backend.h on one device.
//
// Every op runs on the backend's compute stream and returns without
// waiting for the device, except where host memory must be read back
// (download, router_topk) or a host index array is too long to travel in
// the kernel's parameters (make_ints).
//
// matmul: up to MV_MAX_TOK tokens take the GEMV kernels of matvec.cu
// (activations quantized as the CPU backend does); more tokens take cuBLAS:
// F32 weights with SGEMM (no TF32), F16 and BF16 weights in place with
// GemmEx (activations rounded to the weight's 16-bit type, f32 accumulate),
// the block types dequantized into an f16 tile of rows with f16
// activations. attention: attention.cu. The router's top-k runs on the
// host after a copy of the logits (the ids are needed there anyway to
// fetch the experts), through the CPU backend's rules.
//
// Errors: a failed launch or allocation returns MOE_EGPU with the CUDA
// message on stderr; a sticky error (the context is unusable) returns
// MOE_EGPU_FATAL and every later op fails the same way.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/dtype.h"
#include "common/log.h"
#include "kernels/backend.h"
#include "kernels/blocks.h"
#include "kernels/cuda.h"
#include "kernels/fp16.h"
#include "kernels/cuda/cuda-impl.h"
#include "kernels/cuda/reduce-impl.h"

namespace moecu {

int check(cuda_ctx *c, cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        return 0;
    const bool sticky = e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure ||
                        e == cudaErrorHardwareStackError || e == cudaErrorIllegalInstruction ||
                        e == cudaErrorMisalignedAddress || e == cudaErrorInvalidPc ||
                        e == cudaErrorECCUncorrectable || e == cudaErrorInvalidAddressSpace;
    if (sticky)
        c->fatal = true;
    moe_log(sticky ? MOE_LOG_ERROR : MOE_LOG_WARN, "cuda: %s: %s", what, cudaGetErrorString(e));
    return sticky ? MOE_EGPU_FATAL : MOE_EGPU;
}

unsigned grid_for(int64_t n, int threads)
{
    int64_t g = (n + threads - 1) / threads;
    if (g < 1)
        g = 1;
    return (unsigned)(g > 65535 ? 65535 : g);
}

int make_ints(cuda_ctx *c, const int32_t *host, int64_t n, ints_arg *out)
{
    return make_ints2(c, host, n, nullptr, 0, out);
}

int make_ints2(cuda_ctx *c, const int32_t *host, int64_t n, const int32_t *host2, int64_t n2,
               ints_arg *out)
{
    out->p = nullptr;
    if (n + n2 <= INLINE_INTS) {
        if (n > 0)
            memcpy(out->v, host, (size_t)n * sizeof(int32_t));
        if (n2 > 0)
            memcpy(out->v + n, host2, (size_t)n2 * sizeof(int32_t));
        return 0;
    }
    const size_t need = (size_t)(n + n2) * sizeof(int32_t);
    if (need > c->dev_ints_cap) {
        if (c->dev_ints)
            cudaFree(c->dev_ints);
        c->dev_ints = nullptr;
        c->dev_ints_cap = 0;
        int rc = check(c, cudaMalloc(&c->dev_ints, need * 2), "index array");
        if (rc)
            return rc;
        c->dev_ints_cap = need * 2;
    }
    // a kernel still reading the previous array runs before this copy on the
    // stream; the host array may change after we return, so wait for it
    int rc = check(c, cudaMemcpyAsync(c->dev_ints, host, (size_t)n * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, c->stream), "index array");
    if (rc == 0 && n2 > 0)
        rc = check(c, cudaMemcpyAsync(c->dev_ints + n, host2, (size_t)n2 * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, c->stream), "index array");
    if (rc == 0)
        rc = check(c, cudaStreamSynchronize(c->stream), "index array");
    out->p = c->dev_ints;
    return rc;
}

int make_floats(cuda_ctx *c, const float *host, int64_t n, floats_arg *out)
{
    out->p = nullptr;
    if (n <= INLINE_INTS) {
        if (n > 0)
            memcpy(out->v, host, (size_t)n * sizeof(float));
        return 0;
    }
    const size_t need = (size_t)n * sizeof(float);
    if (need > c->dev_floats_cap) {
        if (c->dev_floats)
            cudaFree(c->dev_floats);
        c->dev_floats = nullptr;
        c->dev_floats_cap = 0;
        int rc = check(c, cudaMalloc(&c->dev_floats, need * 2), "float array");
        if (rc)
            return rc;
        c->dev_floats_cap = need * 2;
    }
    // as make_ints: a kernel may still read the previous array, and the
    // host array may change once we return
    int rc = check(c, cudaMemcpyAsync(c->dev_floats, host, need, cudaMemcpyHostToDevice, c->stream),
                   "float array");
    if (rc == 0)
        rc = check(c, cudaStreamSynchronize(c->stream), "float array");
    out->p = c->dev_floats;
    return rc;
}

namespace {

cuda_ctx *ctx_of(struct moe_backend *be)
{
    return static_cast<cuda_ctx *>(be->ctx);
}

#define LAUNCHED(c, what) check((c), cudaGetLastError(), (what))
#define FATAL_GUARD(c) do { if ((c)->fatal) return MOE_EGPU_FATAL; } while (0)

// ---- element decoding of ggml block types ----------------------------
//
// Blocks are kernels/blocks.h's structs, read byte by byte at the fields'
// offsets rather than through struct pointers: Q5_0's 32-bit qh sits at
// byte 2 of a 22-byte block, and a misaligned load on the device is a
// fatal error, not a slow one.

#define AT(S, f) MOE_BLOCK_FIELD(b, struct S, f)

__device__ __forceinline__ float f16_at(const uint8_t *p)
{
    return __half2float(__ushort_as_half((unsigned short)(p[0] | p[1] << 8)));
}

__device__ __forceinline__ uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

__constant__ int8_t k_iq4nl[16] = { MOE_IQ4NL_GRID(MOE_GRID_BYTES) };
__constant__ int8_t k_mxfp4[16] = { MOE_MXFP4_GRID(MOE_GRID_BYTES) };

// Element i (0 <= i < block size) of one block of type t.
__device__ float block_elem(uint32_t t, const uint8_t *b, int i)
{
    switch (t) {
    case MOE_DTYPE_F32: return __uint_as_float(rd32(b + 4 * i));
    case MOE_DTYPE_F16: return f16_at(b + 2 * i);
    case MOE_DTYPE_BF16: return __uint_as_float((uint32_t)(b[2 * i] | b[2 * i + 1] << 8) << 16);
    case MOE_DTYPE_Q4_0: {
        const uint8_t *qs = AT(moe_block_q4_0, qs);
        const int j = i & 15, q = i < 16 ? qs[j] & 0xf : qs[j] >> 4;
        return f16_at(AT(moe_block_q4_0, d)) * (float)(q - 8);
    }
    case MOE_DTYPE_Q4_1: {
        const uint8_t *qs = AT(moe_block_q4_1, qs);
        const int j = i & 15, q = i < 16 ? qs[j] & 0xf : qs[j] >> 4;
        return f16_at(AT(moe_block_q4_1, d)) * (float)q + f16_at(AT(moe_block_q4_1, m));
    }
    case MOE_DTYPE_Q5_0: {
        const uint8_t *qs = AT(moe_block_q5_0, qs);
        const int j = i & 15, lo = i < 16 ? qs[j] & 0xf : qs[j] >> 4;
        const int h = (rd32(AT(moe_block_q5_0, qh)) >> i) & 1;
        return f16_at(AT(moe_block_q5_0, d)) * (float)((lo | h << 4) - 16);
    }
    case MOE_DTYPE_Q5_1: {
        const uint8_t *qs = AT(moe_block_q5_1, qs);
        const int j = i & 15, lo = i < 16 ? qs[j] & 0xf : qs[j] >> 4;
        const int h = (rd32(AT(moe_block_q5_1, qh)) >> i) & 1;
        return f16_at(AT(moe_block_q5_1, d)) * (float)(lo | h << 4) + f16_at(AT(moe_block_q5_1, m));
    }
    case MOE_DTYPE_Q8_0:
        return f16_at(AT(moe_block_q8_0, d)) * (float)(int8_t)AT(moe_block_q8_0, qs)[i];
    case MOE_DTYPE_Q2_K: {
        const uint8_t *sc = AT(moe_block_q2_k, scales), *q = AT(moe_block_q2_k, qs);
        const int n = i / 128, r = i % 128, sh = r / 32, half = (r % 32) / 16, l = r % 16;
        const int is = n * 8 + sh * 2 + half;
        const int qv = (q[n * 32 + l + 16 * half] >> (2 * sh)) & 3;
        return f16_at(AT(moe_block_q2_k, d)) * (float)(sc[is] & 0xf) * (float)qv -
               f16_at(AT(moe_block_q2_k, dmin)) * (float)(sc[is] >> 4);
    }
    case MOE_DTYPE_Q3_K: {
        const uint8_t *hm = AT(moe_block_q3_k, hmask), *q = AT(moe_block_q3_k, qs);
        const int n = i / 128, r = i % 128, sh = r / 32, half = (r % 32) / 16;
        const int is = n * 8 + sh * 2 + half, l = 16 * half + (r % 16);
        const int scale = moe_q3k_scale(AT(moe_block_q3_k, scales), is);
        const uint8_t m = (uint8_t)(1u << (n * 4 + sh));
        const int qv = ((q[n * 32 + l] >> (2 * sh)) & 3) - ((hm[l] & m) ? 0 : 4);
        return f16_at(AT(moe_block_q3_k, d)) * (float)scale * (float)qv;
    }
    case MOE_DTYPE_Q4_K: {
        const int j = i / 64, r = i % 64, l = r % 32, is = 2 * j + (r >= 32);
        const uint8_t *q = AT(moe_block_q4_k, qs) + 32 * j;
        int sc, m;
        moe_q4k_scale_min(is, AT(moe_block_q4_k, scales), &sc, &m);
        const int nib = r < 32 ? q[l] & 0xf : q[l] >> 4;
        return f16_at(AT(moe_block_q4_k, d)) * (float)sc * (float)nib -
               f16_at(AT(moe_block_q4_k, dmin)) * (float)m;
    }
    case MOE_DTYPE_Q5_K: {
        const int j = i / 64, r = i % 64, l = r % 32, is = 2 * j + (r >= 32);
        const uint8_t *qh = AT(moe_block_q5_k, qh), *ql = AT(moe_block_q5_k, qs) + 32 * j;
        int sc, m;
        moe_q4k_scale_min(is, AT(moe_block_q5_k, scales), &sc, &m);
        const int nib = r < 32 ? ql[l] & 0xf : ql[l] >> 4;
        const uint8_t u = (uint8_t)((r < 32 ? 1u : 2u) << (2 * j));
        return f16_at(AT(moe_block_q5_k, d)) * (float)sc * (float)(nib + ((qh[l] & u) ? 16 : 0)) -
               f16_at(AT(moe_block_q5_k, dmin)) * (float)m;
    }
    case MOE_DTYPE_Q6_K: {
        const int n = i / 128, r = i % 128, quarter = r / 32, l = r % 32, is = l / 16;
        const uint8_t *ql = AT(moe_block_q6_k, ql) + 64 * n, *qh = AT(moe_block_q6_k, qh) + 32 * n;
        const int8_t *sc = (const int8_t *)AT(moe_block_q6_k, scales) + 8 * n;
        const int lo = quarter == 0 ? ql[l] & 0xf : quarter == 1 ? ql[l + 32] & 0xf
                     : quarter == 2 ? ql[l] >> 4 : ql[l + 32] >> 4;
        const int hb = (qh[l] >> (2 * quarter)) & 3;
        return f16_at(AT(moe_block_q6_k, d)) * (float)sc[is + 2 * quarter] * (float)((lo | hb << 4) - 32);
    }
    case MOE_DTYPE_Q8_K:
        return __uint_as_float(rd32(AT(moe_block_q8_k, d))) * (float)(int8_t)AT(moe_block_q8_k, qs)[i];
    case MOE_DTYPE_IQ4_NL: {
        const uint8_t *qs = AT(moe_block_iq4_nl, qs);
        const int j = i & 15, q = i < 16 ? qs[j] & 0xf : qs[j] >> 4;
        return f16_at(AT(moe_block_iq4_nl, d)) * (float)k_iq4nl[q];
    }
    case MOE_DTYPE_MXFP4: {
        const uint8_t *qs = AT(moe_block_mxfp4, qs);
        const int j = i & 15, q = i < 16 ? qs[j] & 0xf : qs[j] >> 4;
        return moe_e8m0_half(*AT(moe_block_mxfp4, e)) * (float)k_mxfp4[q];
    }
    default: return 0.0f;
    }
}

#undef AT

// rows [0, n_rows) of w -> out[n_rows][n_in] as f16 (cuBLAS tile)
__global__ void dequant_rows_f16_kernel(uint32_t t, const uint8_t *w, size_t row_bytes, int64_t n_in,
                                        int64_t n_rows, int blk, int blk_bytes, __half *out)
{
    const int64_t total = n_rows * n_in;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = idx / n_in, col = idx % n_in;
        const uint8_t *b = w + r * row_bytes + (col / blk) * blk_bytes;
        out[idx] = __float2half_rn(block_elem(t, b, (int)(col % blk)));
    }
}

// rows ids[i] of w -> out[i][n_in]
__global__ void gather_rows_kernel(uint32_t t, const uint8_t *w, size_t row_bytes, int64_t n_in,
                                   const ints_arg ids, int n, int blk, int blk_bytes, float *out)
{
    const int64_t total = (int64_t)n * n_in;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = idx / n_in, col = idx % n_in;
        const uint8_t *b = w + (int64_t)ids[r] * row_bytes + (col / blk) * blk_bytes;
        out[idx] = block_elem(t, b, (int)(col % blk));
    }
}

__global__ void add_bias_kernel(float *y, const float *bias, int64_t n_tok, int64_t n_out)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_tok * n_out;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += bias[i % n_out];
}

__global__ void rmsnorm_kernel(float *y, const float *x, const float *w, int64_t n, float eps)
{
    __shared__ float sh[32];
    const float *xr = x + blockIdx.x * n;
    float *yr = y + blockIdx.x * n;
    float s = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        s += xr[i] * xr[i];
    s = block_sum(s, sh);
    const float scale = 1.0f / sqrtf(s / (float)n + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = w ? xr[i] * scale * w[i] : xr[i] * scale;
}


struct rope_args {
    int mode, n_rot, has_ff;
    float theta_scale, freq_scale, ext_factor, mscale, corr0, corr1;
};

__global__ void rope_kernel(float *x, int64_t n_tok, int n_head, int head_stride, int offset,
                            const ints_arg pos, const floats_arg ff, rope_args a)
{
    const int half = a.n_rot / 2;
    const int64_t total = n_tok * n_head * half;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int p = (int)(idx % half);
        const int64_t th_idx = idx / half;
        const int64_t t = th_idx / n_head;
        float *v = x + th_idx * head_stride + offset;
        /* theta = pos * theta_scale^p by p float multiplies, as the CPU
         * backend accumulates it (powf would differ by ulps that grow with
         * the position) */
        float theta = (float)pos[t];
        for (int i = 0; i < p; i++)
            theta *= a.theta_scale;
        // pair p's divisor (llama.cpp's rope_freqs; gemma4's global layers)
        const float base = a.has_ff ? theta / ff[p] : theta;
        float th = a.freq_scale * base;
        if (a.ext_factor != 0.0f) {
            const float yv = ((float)p - a.corr0) / fmaxf(0.001f, a.corr1 - a.corr0);
            const float mix = (1.0f - fminf(1.0f, fmaxf(0.0f, yv))) * a.ext_factor;
            th = th * (1.0f - mix) + base * mix;
        }
        const float cs = cosf(th) * a.mscale, sn = sinf(th) * a.mscale;
        const int i0 = 2 * p;
        const int ia = a.mode == MOE_ROPE_NEOX ? p : i0, ib = a.mode == MOE_ROPE_NEOX ? p + half : i0 + 1;
        const float x0 = v[ia], x1 = v[ib];
        v[ia] = x0 * cs - x1 * sn;
        v[ib] = x0 * sn + x1 * cs;
    }
}

__global__ void kv_store_kernel(void *cache, const float *x, int64_t n_tok, const ints_arg pos, int n,
                                int64_t row, int offset, int kv_f16)  // f16, else f32
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n_tok * n;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = idx / n, i = idx % n;
        const int64_t at = (int64_t)pos[t] * row + offset + i;
        if (kv_f16)
            ((__half *)cache)[at] = __float2half_rn(x[idx]);
        else
            ((float *)cache)[at] = x[idx];
    }
}

__global__ void swiglu_kernel(float *y, const float *g, const float *u, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

__global__ void swiglu_oai_kernel(float *y, const float *g, const float *u, int64_t n, float alpha,
                                  float limit)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float x = fminf(g[i], limit);
        const float v = fminf(fmaxf(u[i], -limit), limit);
        y[i] = x / (1.0f + expf(alpha * -x)) * (v + 1.0f);
    }
}

// gemma4's GELU: the CPU backend's table (kernels/cpu/backend_cpu.c: the
// tanh form evaluated per fp16 input, stored as fp16), copied to the device
// at create, looked up at the gate rounded to fp16 (round to nearest even,
// as moe_fp32_to_fp16): the same bits as the CPU backend.
__global__ void geglu_kernel(float *y, const float *g, const float *u, const uint16_t *table, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float x = g[i];
        if (x <= -10.0f) {
            y[i] = 0.0f;
        } else if (x >= 10.0f) {
            y[i] = x * u[i];
        } else {
            const uint16_t h = __half_as_ushort(__float2half_rn(x));
            y[i] = __half2float(__ushort_as_half(table[h])) * u[i];
        }
    }
}

__global__ void scale_kernel(float *y, const float *x, float s, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = x[i] * s;
}

__global__ void mul_rows_kernel(float *y, const float *x, const float *w, int64_t n_rows, int64_t n)
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n_rows * n;
         idx += (int64_t)gridDim.x * blockDim.x)
        y[idx] = x[idx] * w[idx % n];
}

__global__ void axpy_kernel(float *y, float a, const float *x, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] += a * x[i];
}

__global__ void add_kernel(float *y, const float *a, const float *b, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

// idx holds the destination rows (when has_d) then the source rows (when
// has_s) of the n moves
__global__ void copy_rows_kernel(float *dst, int64_t ds, const float *src, int64_t ss,
                                 const ints_arg idx, bool has_d, bool has_s, int64_t n, int64_t len)
{
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * len;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = e / len, k = e % len;
        const int64_t di = has_d ? idx[i] : i, si = has_s ? idx[has_d ? n + i : i] : i;
        dst[di * ds + k] = src[si * ss + k];
    }
}

__global__ void fill_kernel(float *y, float v, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        y[i] = v;
}

__global__ void gate_rows_kernel(float *y, const float *g, int64_t n_rows, int64_t n)
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n_rows * n;
         idx += (int64_t)gridDim.x * blockDim.x)
        y[idx] *= 1.0f / (1.0f + expf(-g[idx / n]));
}
// ---- ops ---------------------------------------------------------------

void *cu_alloc(struct moe_backend *be, size_t bytes)
{
    cuda_ctx *c = ctx_of(be);
    void *p = nullptr;
    if (c->fatal)
        return nullptr;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();   // out of memory is not sticky: clear it
        if (e != cudaErrorMemoryAllocation)
            check(c, e, "alloc");
        return nullptr;
    }
    return p;
}

void cu_free(struct moe_backend *be, void *p)
{
    (void)be;
    if (p)
        cudaFree(p);
}

int cu_upload(struct moe_backend *be, void *dst, const void *src, size_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    int rc = check(c, cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, c->stream), "upload");
    return rc ? rc : check(c, cudaStreamSynchronize(c->stream), "upload");
}

int cu_download(struct moe_backend *be, void *dst, const void *src, size_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    int rc = check(c, cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, c->stream), "download");
    return rc ? rc : check(c, cudaStreamSynchronize(c->stream), "download");
}

// ---- the overlapped upload ------------------------------------------------
//
// Uploads run on their own stream (c->copy), so that an expert's copy
// overlaps the kernels of the experts already resident; the compute stream
// waits for a slot's `done` event with cudaStreamWaitEvent, never the host.
// upload_async, event_query and event_sync are called from the expert
// source's threads too: each makes the backend's device current first.

void *cu_host_alloc(struct moe_backend *be, size_t bytes)
{
    cuda_ctx *c = ctx_of(be);
    if (c->fatal || cudaSetDevice(c->device) != cudaSuccess)
        return nullptr;
    // page-locked and 4096-aligned (O_DIRECT reads land in it): one page
    // more than asked, the base pointer kept in the word before the result
    const size_t page = 4096;
    if (bytes > SIZE_MAX - 2 * page)
        return nullptr;
    uint8_t *base = nullptr;
    cudaError_t e = cudaHostAlloc((void **)&base, bytes + page, cudaHostAllocPortable);
    if (e != cudaSuccess) {
        cudaGetLastError();   // refused: not sticky, the caller falls back
        moe_log(MOE_LOG_WARN, "cuda: cannot page-lock %zu MiB of host memory: %s", bytes >> 20,
                cudaGetErrorString(e));
        return nullptr;
    }
    uint8_t *p = base + page - ((uintptr_t)base & (page - 1));
    memcpy(p - sizeof(base), &base, sizeof(base));
    return p;
}

void cu_host_free(struct moe_backend *be, void *p)
{
    (void)be;
    if (p == nullptr)
        return;
    uint8_t *base;
    memcpy(&base, (uint8_t *)p - sizeof(base), sizeof(base));
    cudaFreeHost(base);
}

int cu_event_init(struct moe_backend *be, struct moe_event *ev)
{
    cuda_ctx *c = ctx_of(be);
    ev->h = nullptr;
    FATAL_GUARD(c);
    cudaEvent_t e = nullptr;
    int rc = check(c, cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event create");
    if (rc == 0)
        ev->h = e;
    return rc;
}

void cu_event_fini(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    if (ev->h)
        cudaEventDestroy((cudaEvent_t)ev->h);
    ev->h = nullptr;
}

// Adds the finished timers to the totals (copy_mu held). With `all`, waits
// for the ones still in flight.
void harvest_timers(cuda_ctx *c, bool all)
{
    for (int i = 0; i < COPY_TIMERS; i++) {
        copy_timer *t = &c->timers[i];
        if (!t->pending)
            continue;
        cudaError_t e = all ? cudaEventSynchronize(t->end) : cudaEventQuery(t->end);
        if (e == cudaErrorNotReady)
            continue;
        float ms = 0;
        if (e == cudaSuccess && cudaEventElapsedTime(&ms, t->start, t->end) == cudaSuccess) {
            c->timed++;
            c->timed_bytes += t->bytes;
            c->busy_s += ms * 1e-3;
        }
        t->pending = false;
    }
}

int cu_upload_async(struct moe_backend *be, void *dst, const void *src, size_t n,
                    struct moe_event *after, struct moe_event *done)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    int rc = check(c, cudaSetDevice(c->device), "upload: set device");
    if (rc)
        return rc;
    pthread_mutex_lock(&c->copy_mu);
    // the copy must not overwrite a slot that queued kernels still read
    if (after && after->h)
        rc = check(c, cudaStreamWaitEvent(c->copy, (cudaEvent_t)after->h, 0), "upload: wait");
    copy_timer *t = &c->timers[c->next_timer];
    if (t->pending && cudaEventQuery(t->end) == cudaSuccess)
        harvest_timers(c, false);
    const bool timed = t->start && !t->pending;
    if (rc == 0 && timed)
        rc = check(c, cudaEventRecord(t->start, c->copy), "upload: timer");
    if (rc == 0)
        rc = check(c, cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, c->copy), "upload");
    if (rc == 0 && timed && (rc = check(c, cudaEventRecord(t->end, c->copy), "upload: timer")) == 0) {
        t->bytes = n;
        t->pending = true;
        c->next_timer = (c->next_timer + 1) % COPY_TIMERS;
    }
    if (rc == 0 && done)
        rc = check(c, cudaEventRecord((cudaEvent_t)done->h, c->copy), "upload: record");
    if (rc == 0) {
        c->uploads++;
        c->upload_bytes += n;
    }
    pthread_mutex_unlock(&c->copy_mu);
    return rc;
}

int cu_event_record(struct moe_backend *be, struct moe_event *ev)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    return check(c, cudaEventRecord((cudaEvent_t)ev->h, c->stream), "event record");
}

int cu_event_query(struct moe_backend *be, struct moe_event *ev)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (ev->h == nullptr)
        return 1;
    cudaSetDevice(c->device);
    cudaError_t e = cudaEventQuery((cudaEvent_t)ev->h);
    if (e == cudaErrorNotReady) {
        // not an error; make sure the thread's last error does not keep it,
        // or the next launch check would report it
        if (cudaPeekAtLastError() == cudaErrorNotReady)
            cudaGetLastError();
        return 0;
    }
    return e == cudaSuccess ? 1 : check(c, e, "event query");
}

int cu_event_sync(struct moe_backend *be, struct moe_event *ev)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (ev->h == nullptr)
        return 0;
    cudaSetDevice(c->device);
    return check(c, cudaEventSynchronize((cudaEvent_t)ev->h), "event sync");
}

int cu_stream_wait(struct moe_backend *be, struct moe_event *ev)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (ev->h == nullptr)
        return 0;
    return check(c, cudaStreamWaitEvent(c->stream, (cudaEvent_t)ev->h, 0), "stream wait");
}

void cu_copy_stats(struct moe_backend *be, struct moe_copy_stats *out)
{
    cuda_ctx *c = ctx_of(be);
    pthread_mutex_lock(&c->copy_mu);
    // the finished copies only: a stats call (moed's /metrics) never waits
    // for the copy stream; an upload still running is counted in uploads
    // and bytes now, in its time once it has finished
    if (!c->fatal && cudaSetDevice(c->device) == cudaSuccess)
        harvest_timers(c, false);
    *out = (struct moe_copy_stats){ c->uploads, c->upload_bytes, c->timed, c->timed_bytes, c->busy_s };
    pthread_mutex_unlock(&c->copy_mu);
}

// (Re)allocates *p to at least `want` bytes; keeps a larger one.
int grow(cuda_ctx *c, void **p, size_t *have, size_t want, const char *what)
{
    if (*have >= want)
        return 0;
    if (*p) {
        cudaStreamSynchronize(c->stream);   // an op may still use it
        cudaFree(*p);
    }
    *p = nullptr;
    *have = 0;
    int rc = check(c, cudaMalloc(p, want), what);
    if (rc == 0)
        *have = want;
    return rc;
}

// The model reserves `shared` = its largest batch of f32 activation rows;
// that also holds them as f16 or int8. The f16 weight tile is 64 MiB (or
// `shared`), the attention partials 8 MiB (64 splits of 128 heads of 256).
int cu_reserve(struct moe_backend *be, size_t shared, size_t per_worker)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    (void)per_worker;
    const size_t mib = (size_t)1 << 20;
    const size_t act = shared > 4 * mib ? shared : 4 * mib;
    const size_t tile = shared > 64 * mib ? shared : 64 * mib;
    int rc = grow(c, &c->act, &c->act_bytes, act, "reserve activations");
    if (rc == 0)
        rc = grow(c, &c->tile, &c->tile_bytes, tile, "reserve weight tile");
    if (rc == 0)
        rc = grow(c, (void **)&c->part, &c->part_bytes, 8 * mib, "reserve attention");
    return rc;
}

int cu_supports(const struct moe_backend *be, uint32_t t)
{
    (void)be;
    switch (t) {
    case MOE_DTYPE_F32: case MOE_DTYPE_F16: case MOE_DTYPE_BF16: case MOE_DTYPE_Q4_0:
    case MOE_DTYPE_Q4_1: case MOE_DTYPE_Q5_0: case MOE_DTYPE_Q5_1: case MOE_DTYPE_Q8_0:
    case MOE_DTYPE_Q2_K: case MOE_DTYPE_Q3_K: case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K:
    case MOE_DTYPE_Q6_K: case MOE_DTYPE_Q8_K: case MOE_DTYPE_IQ4_NL: case MOE_DTYPE_MXFP4:
        return 1;
    default:
        return 0;
    }
}

int cu_get_rows(struct moe_backend *be, float *y, const struct moe_weight *w, const int32_t *ids, int n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (!cu_supports(be, w->dtype))
        return MOE_EUNSUPPORTED;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= w->n_out)
            return -EINVAL;
    if (n <= 0)
        return 0;
    ints_arg d_ids;
    int rc = make_ints(c, ids, n, &d_ids);
    if (rc)
        return rc;
    const struct moe_dtype_info *inf = moe_dtype_info(w->dtype);
    const int blk = (int)inf->block_size, bb = (int)inf->type_size;
    gather_rows_kernel<<<grid_for((int64_t)n * w->n_in), 256, 0, c->stream>>>(
        w->dtype, (const uint8_t *)w->data, w->row_bytes, w->n_in, d_ids, n, blk, bb, y);
    return LAUNCHED(c, "get_rows");
}

int cu_rmsnorm(struct moe_backend *be, float *y, const float *x, const float *w, int64_t n_rows,
               int64_t n, float eps)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n_rows <= 0)
        return 0;
    for (int64_t r0 = 0; r0 < n_rows; r0 += 65535) {
        const int64_t nr = n_rows - r0 < 65535 ? n_rows - r0 : 65535;
        rmsnorm_kernel<<<(unsigned)nr, 256, 0, c->stream>>>(y + r0 * n, x + r0 * n, w, n, eps);
    }
    return LAUNCHED(c, "rmsnorm");
}

int blas_check(cublasStatus_t st, const char *what)
{
    if (st == CUBLAS_STATUS_SUCCESS)
        return 0;
    moe_log(MOE_LOG_WARN, "cuda: %s: %s", what, cublasGetStatusString(st));
    return MOE_EGPU;
}

// The cuBLAS path: Y(n_out x nt, column-major) = W^T X, W's rows as the
// columns of a column-major (n_in x rows) matrix.
int matmul_blas(cuda_ctx *c, float *y, const struct moe_weight *w, const float *x, int64_t n_tok)
{
    const float one = 1.0f, zero = 0.0f;
    const int64_t n_in = w->n_in, n_out = w->n_out;
    if (w->dtype == MOE_DTYPE_F32) {
        if (w->row_bytes % 4 != 0)
            return -EINVAL;
        return blas_check(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)n_tok, (int)n_in,
                                      &one, (const float *)w->data, (int)(w->row_bytes / 4), x, (int)n_in,
                                      &zero, y, (int)n_out), "cublasSgemm");
    }
    const bool bf16 = w->dtype == MOE_DTYPE_BF16;
    const bool in_place = w->dtype == MOE_DTYPE_F16 || bf16;
    const cudaDataType_t ty = bf16 ? CUDA_R_16BF : CUDA_R_16F;
    const int64_t stride = (n_in + 7) / 8 * 8;   // 16-byte activation rows
    const int64_t chunk = (int64_t)(c->act_bytes / ((size_t)stride * 2));
    const int64_t rows_per_tile = (int64_t)(c->tile_bytes / ((size_t)n_in * 2));
    if (chunk < 1 || (!in_place && rows_per_tile < 1) || (in_place && w->row_bytes % 2 != 0))
        return MOE_ELIMIT;
    const struct moe_dtype_info *inf = moe_dtype_info(w->dtype);
    for (int64_t t0 = 0; t0 < n_tok; t0 += chunk) {
        const int64_t nt = n_tok - t0 < chunk ? n_tok - t0 : chunk;
        int rc = convert_act(c, c->act, stride, x + t0 * n_in, nt, n_in, bf16);
        if (rc)
            return rc;
        if (in_place) {
            rc = blas_check(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)nt, (int)n_in, &one,
                                         w->data, ty, (int)(w->row_bytes / 2), c->act, ty, (int)stride, &zero,
                                         y + t0 * n_out, CUDA_R_32F, (int)n_out, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT), "cublasGemmEx");
            if (rc)
                return rc;
            continue;
        }
        for (int64_t r0 = 0; r0 < n_out; r0 += rows_per_tile) {
            const int64_t nr = n_out - r0 < rows_per_tile ? n_out - r0 : rows_per_tile;
            dequant_rows_f16_kernel<<<grid_for(nr * n_in), 256, 0, c->stream>>>(
                w->dtype, (const uint8_t *)w->data + r0 * w->row_bytes, w->row_bytes, n_in, nr,
                (int)inf->block_size, (int)inf->type_size, (__half *)c->tile);
            if ((rc = LAUNCHED(c, "matmul dequant")) != 0)
                return rc;
            rc = blas_check(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nr, (int)nt, (int)n_in, &one,
                                         c->tile, CUDA_R_16F, (int)n_in, c->act, CUDA_R_16F, (int)stride,
                                         &zero, y + t0 * n_out + r0, CUDA_R_32F, (int)n_out,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx");
            if (rc)
                return rc;
        }
    }
    return 0;
}

int cu_matmul(struct moe_backend *be, float *y, const struct moe_weight *w, const float *bias,
              const float *x, int64_t n_tok)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (!cu_supports(be, w->dtype))
        return MOE_EUNSUPPORTED;
    if (w->n_in <= 0 || w->n_out <= 0 || w->n_in > INT32_MAX || w->n_out > INT32_MAX)
        return -EINVAL;
    if (n_tok <= 0)
        return 0;
    if (c->act == nullptr)
        return MOE_ELIMIT;   // reserve() was not called
    if (n_tok <= MV_MAX_TOK) {
        int rc = matvec(c, y, w, bias, x, n_tok);
        if (rc != MOE_EUNSUPPORTED)
            return rc;
    }
    int rc = matmul_blas(c, y, w, x, n_tok);
    if (rc == 0 && bias) {
        add_bias_kernel<<<grid_for(n_tok * w->n_out), 256, 0, c->stream>>>(y, bias, n_tok, w->n_out);
        rc = LAUNCHED(c, "matmul bias");
    }
    return rc;
}

int cu_rope(struct moe_backend *be, float *x, int64_t n_tok, int n_head, int head_stride, int offset,
            const int32_t *pos, const struct moe_rope_params *rp)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (rp->n_rot <= 0 || offset < 0 || offset + rp->n_rot > head_stride || rp->n_rot % 2 != 0)
        return -EINVAL;
    if (n_tok <= 0 || n_head <= 0)
        return 0;
    rope_args a;
    a.mode = rp->mode;
    a.n_rot = rp->n_rot;
    a.has_ff = rp->freq_factors != nullptr;
    a.theta_scale = powf(rp->freq_base, -2.0f / (float)rp->n_rot);
    a.freq_scale = rp->freq_scale;
    a.ext_factor = rp->ext_factor;
    a.mscale = rp->attn_factor != 0.0f ? rp->attn_factor : 1.0f;
    if (rp->ext_factor != 0.0f)
        a.mscale *= 1.0f + 0.1f * logf(1.0f / rp->freq_scale);
    a.corr0 = rp->corr_dims[0];
    a.corr1 = rp->corr_dims[1];
    ints_arg d_pos;
    int rc = make_ints(c, pos, n_tok, &d_pos);
    if (rc)
        return rc;
    // the divisors are host memory (backend.h): inline up to INLINE_INTS pairs
    floats_arg d_ff;
    d_ff.p = nullptr;
    if (rp->freq_factors && (rc = make_floats(c, rp->freq_factors, rp->n_rot / 2, &d_ff)) != 0)
        return rc;
    rope_kernel<<<grid_for(n_tok * n_head * (rp->n_rot / 2)), 256, 0, c->stream>>>(
        x, n_tok, n_head, head_stride, offset, d_pos, d_ff, a);
    return LAUNCHED(c, "rope");
}

int cu_attention(struct moe_backend *be, float *out, const float *q, int64_t n_tok,
                 const int32_t *pos, const struct moe_attn_params *ap)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    return attention(c, out, q, n_tok, pos, ap);
}

// q8_0 KV caches are not implemented here yet: the model refuses kv_type
// q8_0 at load on this backend (doc/cuda.md).
int cu_kv_supports(const struct moe_backend *be, uint32_t t)
{
    (void)be;
    return t == MOE_DTYPE_F32 || t == MOE_DTYPE_F16;
}

int cu_kv_store(struct moe_backend *be, void *cache, const float *x, int64_t n_tok, const int32_t *pos,
                int n, int64_t row, int offset, uint32_t kv_type)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (!cu_kv_supports(be, kv_type))
        return MOE_EUNSUPPORTED;
    const int kv_f16 = kv_type == MOE_DTYPE_F16;
    if (n_tok <= 0 || n <= 0)
        return 0;
    for (int64_t t = 0; t < n_tok; t++)
        if (pos[t] < 0)
            return -EINVAL;
    ints_arg d_pos;
    int rc = make_ints(c, pos, n_tok, &d_pos);
    if (rc)
        return rc;
    kv_store_kernel<<<grid_for(n_tok * n), 256, 0, c->stream>>>(cache, x, n_tok, d_pos, n, row, offset,
                                                                 kv_f16);
    return LAUNCHED(c, "kv_store");
}

// The logits come to the host (n_tok x n_expert floats) and the CPU
// backend's router picks the experts: identical selection rules and
// tie-breaking, and the ids are needed on the host anyway to fetch the
// experts. The gating bias is host memory.
int cu_router_topk(struct moe_backend *be, const float *logits, int64_t n_tok,
                   const struct moe_gating_params *gp, int32_t *ids, float *weights)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (gp->n_expert <= 0 || n_tok < 0)
        return -EINVAL;
    const size_t need = (size_t)n_tok * (size_t)gp->n_expert * sizeof(float);
    if (need == 0)
        return 0;
    if (need > c->host_logits_cap) {
        if (c->host_logits)
            cudaFreeHost(c->host_logits);
        c->host_logits = nullptr;
        c->host_logits_cap = 0;
        int rc = check(c, cudaHostAlloc((void **)&c->host_logits, need * 2, cudaHostAllocDefault),
                       "router");
        if (rc)
            return rc;
        c->host_logits_cap = need * 2;
    }
    int rc = cu_download(be, c->host_logits, logits, need);
    if (rc)
        return rc;
    return c->host->ops->router_topk(c->host, c->host_logits, n_tok, gp, ids, weights);
}

int cu_swiglu(struct moe_backend *be, float *y, const float *g, const float *u, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0)
        return 0;
    swiglu_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, g, u, n);
    return LAUNCHED(c, "swiglu");
}

int cu_swiglu_oai(struct moe_backend *be, float *y, const float *g, const float *u, int64_t n,
                  float alpha, float limit)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0)
        return 0;
    swiglu_oai_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, g, u, n, alpha, limit);
    return LAUNCHED(c, "swiglu_oai");
}

int cu_geglu(struct moe_backend *be, float *y, const float *g, const float *u, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0)
        return 0;
    geglu_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, g, u, c->gelu_table, n);
    return LAUNCHED(c, "geglu");
}

int cu_scale(struct moe_backend *be, float *y, const float *x, float s, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0)
        return 0;
    scale_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, x, s, n);
    return LAUNCHED(c, "scale");
}

int cu_mul_rows(struct moe_backend *be, float *y, const float *x, const float *w, int64_t n_rows,
                int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n_rows <= 0 || n <= 0)
        return 0;
    mul_rows_kernel<<<grid_for(n_rows * n), 256, 0, c->stream>>>(y, x, w, n_rows, n);
    return LAUNCHED(c, "mul_rows");
}

int cu_ssm_conv(struct moe_backend *be, float *y, const float *x, float *state, const float *w,
                int64_t n_tok, int n_ch, int d_conv)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    return ssm_conv(c, y, x, state, w, n_tok, n_ch, d_conv);
}

int cu_gated_delta_net(struct moe_backend *be, float *out, float *qkv, const float *z, const float *beta,
                       const float *alpha, float *state, int64_t n_tok, const struct moe_gdn_params *p)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    return gated_delta_net(c, out, qkv, z, beta, alpha, state, n_tok, p);
}

int cu_axpy(struct moe_backend *be, float *y, float a, const float *x, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0)
        return 0;
    axpy_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, a, x, n);
    return LAUNCHED(c, "axpy");
}

int cu_add(struct moe_backend *be, float *y, const float *a, const float *b, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0)
        return 0;
    add_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, a, b, n);
    return LAUNCHED(c, "add");
}

int cu_copy_rows(struct moe_backend *be, float *dst, int64_t ds, const int32_t *di, const float *src,
                 int64_t ss, const int32_t *si, int64_t n, int64_t len)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0 || len <= 0)
        return 0;
    // the index lists, as given, in one array: [di | si]
    const int64_t m = (di ? n : 0) + (si ? n : 0);
    int32_t small[INLINE_INTS] = { 0 };
    int32_t *host = m <= INLINE_INTS ? small : (int32_t *)malloc((size_t)(m ? m : 1) * sizeof(int32_t));
    if (host == nullptr)
        return -ENOMEM;
    if (di)
        memcpy(host, di, (size_t)n * sizeof(int32_t));
    if (si)
        memcpy(host + (di ? n : 0), si, (size_t)n * sizeof(int32_t));
    ints_arg idx;
    int rc = make_ints(c, host, m, &idx);
    if (host != small)
        free(host);
    if (rc)
        return rc;
    copy_rows_kernel<<<grid_for(n * len), 256, 0, c->stream>>>(dst, ds, src, ss, idx, di != nullptr,
                                                                si != nullptr, n, len);
    return LAUNCHED(c, "copy_rows");
}

int cu_fill(struct moe_backend *be, float *y, float v, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0)
        return 0;
    fill_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, v, n);
    return LAUNCHED(c, "fill");
}

int cu_gate_rows(struct moe_backend *be, float *y, const float *g, int64_t n_rows, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n_rows <= 0 || n <= 0)
        return 0;
    gate_rows_kernel<<<grid_for(n_rows * n), 256, 0, c->stream>>>(y, g, n_rows, n);
    return LAUNCHED(c, "gate_rows");
}

void cu_destroy(struct moe_backend *be)
{
    cuda_ctx *c = ctx_of(be);
    if (c) {
        if (c->copy)
            cudaStreamSynchronize(c->copy);
        if (c->stream)
            cudaStreamSynchronize(c->stream);
        for (int i = 0; i < COPY_TIMERS; i++) {
            if (c->timers[i].start)
                cudaEventDestroy(c->timers[i].start);
            if (c->timers[i].end)
                cudaEventDestroy(c->timers[i].end);
        }
        if (c->copy)
            cudaStreamDestroy(c->copy);
        pthread_mutex_destroy(&c->copy_mu);
        cudaFree(c->tile);
        cudaFree(c->act);
        cudaFree(c->part);
        cudaFree(c->dev_ints);
        cudaFree(c->dev_floats);
        cudaFree(c->gelu_table);
        if (c->host_logits)
            cudaFreeHost(c->host_logits);
        if (c->blas)
            cublasDestroy(c->blas);
        if (c->stream)
            cudaStreamDestroy(c->stream);
        moe_backend_destroy(c->host);
        free(c);
    }
    free(be);
}

// geglu's table, built exactly as the CPU backend builds its own (same
// expression, same libm, same fp16 rounding), so that both give the same
// bits.
int gelu_table_upload(cuda_ctx *c, struct moe_diag *diag)
{
    uint16_t *t = (uint16_t *)malloc((size_t)65536 * sizeof(uint16_t));
    if (t == nullptr)
        return moe_diag_set(diag, -ENOMEM, "CUDA backend: out of memory");
    const float a = 0.044715f, k = 0.79788456080286535587989211986876f;
    for (uint32_t i = 0; i < 65536u; i++) {
        const float f = moe_fp16_to_fp32((uint16_t)i);
        t[i] = moe_fp32_to_fp16(0.5f * f * (1.0f + tanhf(k * f * (1.0f + a * f * f))));
    }
    cudaError_t e = cudaMalloc(&c->gelu_table, (size_t)65536 * sizeof(uint16_t));
    if (e == cudaSuccess)
        e = cudaMemcpy(c->gelu_table, t, (size_t)65536 * sizeof(uint16_t), cudaMemcpyHostToDevice);
    free(t);
    if (e != cudaSuccess)
        return moe_diag_set(diag, MOE_EGPU, "CUDA backend: GELU table: %s", cudaGetErrorString(e));
    return 0;
}

const struct moe_backend_ops cuda_ops = {
    "cuda",
    cu_destroy,
    cu_alloc,
    cu_free,
    cu_upload,
    cu_download,
    cu_reserve,
    cu_supports,
    cu_get_rows,
    cu_rmsnorm,
    cu_matmul,
    cu_rope,
    cu_attention,
    cu_kv_store,
    cu_kv_supports,
    cu_router_topk,
    cu_swiglu,
    cu_swiglu_oai,
    cu_axpy,
    cu_add,
    cu_copy_rows,
    cu_fill,
    cu_gate_rows,
    cu_host_alloc,
    cu_host_free,
    cu_event_init,
    cu_event_fini,
    cu_upload_async,
    cu_event_record,
    cu_event_query,
    cu_event_sync,
    cu_stream_wait,
    cu_copy_stats,
    0,         // host_memory: device memory
    nullptr,   // matmul_multi: one matmul per job
    cu_geglu,
    cu_scale,
    cu_mul_rows,
    cu_ssm_conv,   // kernels/cuda/ssm.cu
    cu_gated_delta_net,
};

} // namespace
} // namespace moecu

extern "C" int moe_cudamod_backend_create(struct moe_backend **out, int device, struct moe_diag *diag)
{
    using namespace moecu;
    *out = nullptr;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        cudaGetLastError();
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "CUDA backend: no device (%s)",
                            e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    }
    if (device < 0 || device >= n)
        return moe_diag_set(diag, -EINVAL, "CUDA backend: device %d, expected 0..%d", device, n - 1);
    if ((e = cudaSetDevice(device)) != cudaSuccess)
        return moe_diag_set(diag, MOE_EGPU, "cudaSetDevice(%d): %s", device, cudaGetErrorString(e));
    struct moe_backend *be = (struct moe_backend *)calloc(1, sizeof(*be));
    cuda_ctx *c = (cuda_ctx *)calloc(1, sizeof(cuda_ctx));
    if (be == nullptr || c == nullptr) {
        free(be);
        free(c);
        return moe_diag_set(diag, -ENOMEM, "CUDA backend: out of memory");
    }
    be->ops = &cuda_ops;
    be->ctx = c;
    c->device = device;
    pthread_mutex_init(&c->copy_mu, nullptr);
    int rc = 0;
    if ((e = cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
        rc = moe_diag_set(diag, MOE_EGPU, "cudaDeviceGetAttribute: %s", cudaGetErrorString(e));
    if (rc == 0 && (e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess)
        rc = moe_diag_set(diag, MOE_EGPU, "cudaStreamCreate: %s", cudaGetErrorString(e));
    if (rc == 0 && (e = cudaStreamCreateWithFlags(&c->copy, cudaStreamNonBlocking)) != cudaSuccess)
        rc = moe_diag_set(diag, MOE_EGPU, "cudaStreamCreate (copy): %s", cudaGetErrorString(e));
    for (int i = 0; rc == 0 && i < COPY_TIMERS; i++) {
        if ((e = cudaEventCreate(&c->timers[i].start)) != cudaSuccess ||
            (e = cudaEventCreate(&c->timers[i].end)) != cudaSuccess)
            rc = moe_diag_set(diag, MOE_EGPU, "cudaEventCreate (copy timers): %s", cudaGetErrorString(e));
    }
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    if (rc == 0 && (st = cublasCreate(&c->blas)) != CUBLAS_STATUS_SUCCESS) {
        c->blas = nullptr;
        rc = moe_diag_set(diag, MOE_EGPU, "cublasCreate: %s", cublasGetStatusString(st));
    }
    if (rc == 0) {
        cublasSetStream(c->blas, c->stream);
        cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH);   // FP32 SGEMM, no TF32: parity first
    }
    if (rc == 0)
        rc = moe_backend_cpu_create(&c->host, 1, diag);
    if (rc == 0)
        rc = gelu_table_upload(c, diag);
    if (rc) {
        cu_destroy(be);
        return rc;
    }
    *out = be;
    return 0;
}

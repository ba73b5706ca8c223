// The CUDA backend: the ops table of kernels/backend.h on one device.
//
// Written for correctness first (tests/gpu/test_gpu_ops.c checks every op
// against the CPU backend): weights are dequantized on the device, a tile of
// rows at a time, into an f32 workspace and multiplied with cuBLAS (SGEMM,
// no TF32); attention is one block per (token, head) with an online softmax
// over chunks of the cache; the router's top-k runs on the host after a
// small device-to-host copy of the logits (the one sync the design allows).
// Fast decode GEMV kernels, split-K flash-decoding and quantized activations
// are the next step (doc/cuda.md).
//
// Every op runs on the backend's compute stream. Errors: a failed launch or
// allocation returns MOE_EGPU; a sticky error (the context is unusable)
// returns MOE_EGPU_FATAL and every later op fails the same way.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cuda.h"
#include "kernels/dtype.h"

namespace {

struct cuda_ctx {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    struct moe_backend *host;      // CPU backend for the router's top-k
    float *tile;                   // dequantized weight rows
    size_t tile_bytes;
    int32_t *dev_ints;             // positions
    size_t dev_ints_cap;
    float *host_logits;            // pinned, router logits
    size_t host_logits_cap;
    bool fatal;
};

cuda_ctx *ctx_of(struct moe_backend *be)
{
    return static_cast<cuda_ctx *>(be->ctx);
}

int check(cuda_ctx *c, cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        return 0;
    const bool sticky = e == cudaErrorIllegalAddress || e == cudaErrorLaunchFailure ||
                        e == cudaErrorHardwareStackError || e == cudaErrorIllegalInstruction ||
                        e == cudaErrorMisalignedAddress || e == cudaErrorInvalidPc ||
                        e == cudaErrorECCUncorrectable;
    if (sticky)
        c->fatal = true;
    fprintf(stderr, "moe cuda: %s: %s\n", what, cudaGetErrorString(e));
    return sticky ? MOE_EGPU_FATAL : MOE_EGPU;
}

#define LAUNCHED(c, what) check((c), cudaGetLastError(), (what))
#define FATAL_GUARD(c) do { if ((c)->fatal) return MOE_EGPU_FATAL; } while (0)

// ---- element decoding of ggml block types ----------------------------

__device__ __forceinline__ float f16_at(const uint8_t *p)
{
    return __half2float(__ushort_as_half((unsigned short)(p[0] | p[1] << 8)));
}

__device__ __forceinline__ uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

__device__ __forceinline__ void k4_scale_min(int j, const uint8_t *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xf) | (q[j - 4] >> 6) << 4;
        *m = (q[j + 4] >> 4) | (q[j] >> 6) << 4;
    }
}

__constant__ int8_t k_iq4nl[16] = { -127, -104, -83, -65, -49, -35, -22, -10,
                                    1, 13, 25, 38, 53, 69, 89, 113 };
__constant__ int8_t k_mxfp4[16] = { 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12 };

__device__ __forceinline__ float e8m0_half(uint8_t e)
{
    return __uint_as_float(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

// Element i (0 <= i < block size) of one block of type t.
__device__ float block_elem(uint32_t t, const uint8_t *b, int i)
{
    switch (t) {
    case MOE_DTYPE_F32: return __uint_as_float(rd32(b + 4 * i));
    case MOE_DTYPE_F16: return f16_at(b + 2 * i);
    case MOE_DTYPE_BF16: return __uint_as_float((uint32_t)(b[2 * i] | b[2 * i + 1] << 8) << 16);
    case MOE_DTYPE_Q4_0: {
        const int j = i & 15, q = i < 16 ? b[2 + j] & 0xf : b[2 + j] >> 4;
        return f16_at(b) * (float)(q - 8);
    }
    case MOE_DTYPE_Q4_1: {
        const int j = i & 15, q = i < 16 ? b[4 + j] & 0xf : b[4 + j] >> 4;
        return f16_at(b) * (float)q + f16_at(b + 2);
    }
    case MOE_DTYPE_Q5_0: {
        const int j = i & 15, lo = i < 16 ? b[6 + j] & 0xf : b[6 + j] >> 4;
        const int h = (rd32(b + 2) >> i) & 1;
        return f16_at(b) * (float)((lo | h << 4) - 16);
    }
    case MOE_DTYPE_Q5_1: {
        const int j = i & 15, lo = i < 16 ? b[8 + j] & 0xf : b[8 + j] >> 4;
        const int h = (rd32(b + 4) >> i) & 1;
        return f16_at(b) * (float)(lo | h << 4) + f16_at(b + 2);
    }
    case MOE_DTYPE_Q8_0: return f16_at(b) * (float)(int8_t)b[2 + i];
    case MOE_DTYPE_Q2_K: {
        const uint8_t *sc = b, *q = b + 16;
        const int n = i / 128, r = i % 128, sh = r / 32, half = (r % 32) / 16, l = r % 16;
        const int is = n * 8 + sh * 2 + half;
        const int qv = (q[n * 32 + l + 16 * half] >> (2 * sh)) & 3;
        return f16_at(b + 80) * (float)(sc[is] & 0xf) * (float)qv - f16_at(b + 82) * (float)(sc[is] >> 4);
    }
    case MOE_DTYPE_Q3_K: {
        const uint8_t *hm = b, *q = b + 32, *s = b + 96;
        const int n = i / 128, r = i % 128, sh = r / 32, half = (r % 32) / 16;
        const int is = n * 8 + sh * 2 + half, l = 16 * half + (r % 16);
        const int lo = (s[is % 8] >> (4 * (is / 8))) & 0xf, hi = (s[8 + is % 4] >> (2 * (is / 4))) & 3;
        const int scale = (lo | hi << 4) - 32;
        const uint8_t m = (uint8_t)(1u << (n * 4 + sh));
        const int qv = ((q[n * 32 + l] >> (2 * sh)) & 3) - ((hm[l] & m) ? 0 : 4);
        return f16_at(b + 108) * (float)scale * (float)qv;
    }
    case MOE_DTYPE_Q4_K: {
        const int j = i / 64, r = i % 64, l = r % 32, is = 2 * j + (r >= 32);
        const uint8_t *q = b + 16 + 32 * j;
        int sc, m;
        k4_scale_min(is, b + 4, &sc, &m);
        const int nib = r < 32 ? q[l] & 0xf : q[l] >> 4;
        return f16_at(b) * (float)sc * (float)nib - f16_at(b + 2) * (float)m;
    }
    case MOE_DTYPE_Q5_K: {
        const int j = i / 64, r = i % 64, l = r % 32, is = 2 * j + (r >= 32);
        const uint8_t *qh = b + 16, *ql = b + 48 + 32 * j;
        int sc, m;
        k4_scale_min(is, b + 4, &sc, &m);
        const int nib = r < 32 ? ql[l] & 0xf : ql[l] >> 4;
        const uint8_t u = (uint8_t)((r < 32 ? 1u : 2u) << (2 * j));
        return f16_at(b) * (float)sc * (float)(nib + ((qh[l] & u) ? 16 : 0)) - f16_at(b + 2) * (float)m;
    }
    case MOE_DTYPE_Q6_K: {
        const int n = i / 128, r = i % 128, quarter = r / 32, l = r % 32, is = l / 16;
        const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
        const int8_t *sc = (const int8_t *)(b + 192 + 8 * n);
        const int lo = quarter == 0 ? ql[l] & 0xf : quarter == 1 ? ql[l + 32] & 0xf
                     : quarter == 2 ? ql[l] >> 4 : ql[l + 32] >> 4;
        const int hb = (qh[l] >> (2 * quarter)) & 3;
        return f16_at(b + 208) * (float)sc[is + 2 * quarter] * (float)((lo | hb << 4) - 32);
    }
    case MOE_DTYPE_Q8_K: return __uint_as_float(rd32(b)) * (float)(int8_t)b[4 + i];
    case MOE_DTYPE_IQ4_NL: {
        const int j = i & 15, q = i < 16 ? b[2 + j] & 0xf : b[2 + j] >> 4;
        return f16_at(b) * (float)k_iq4nl[q];
    }
    case MOE_DTYPE_MXFP4: {
        const int j = i & 15, q = i < 16 ? b[1 + j] & 0xf : b[1 + j] >> 4;
        return e8m0_half(b[0]) * (float)k_mxfp4[q];
    }
    default: return 0.0f;
    }
}

// rows [row0, row0 + n_rows) of w -> out[n_rows][n_in]
__global__ void dequant_rows_kernel(uint32_t t, const uint8_t *w, size_t row_bytes, int64_t n_in,
                                    int64_t n_rows, int blk, int blk_bytes, float *out)
{
    const int64_t total = n_rows * n_in;
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = idx / n_in, col = idx % n_in;
        const uint8_t *b = w + r * row_bytes + (col / blk) * blk_bytes;
        out[idx] = block_elem(t, b, (int)(col % blk));
    }
}

// rows ids[i] of w -> out[i][n_in]
__global__ void gather_rows_kernel(uint32_t t, const uint8_t *w, size_t row_bytes, int64_t n_in,
                                   const int32_t *ids, int n, int blk, int blk_bytes, float *out)
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

__device__ float block_sum(float v, float *sh)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0)
        sh[wid] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = threadIdx.x < nw ? sh[threadIdx.x] : 0.0f;
    if (wid == 0)
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0)
        sh[0] = v;
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
}

__device__ float block_max(float v, float *sh)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0)
        sh[wid] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = threadIdx.x < nw ? sh[threadIdx.x] : -INFINITY;
    if (wid == 0)
        for (int o = 16; o > 0; o >>= 1)
            v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0)
        sh[0] = v;
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
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
    const float scale = rsqrtf(s / (float)n + eps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = w ? xr[i] * scale * w[i] : xr[i] * scale;
}

struct rope_args {
    int mode, n_rot;
    float theta_scale, freq_scale, ext_factor, mscale, corr0, corr1;
};

__global__ void rope_kernel(float *x, int64_t n_tok, int n_head, int head_stride, int offset,
                            const int32_t *pos, rope_args a)
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
        float th = a.freq_scale * theta;
        if (a.ext_factor != 0.0f) {
            const float yv = ((float)p - a.corr0) / fmaxf(0.001f, a.corr1 - a.corr0);
            const float mix = (1.0f - fminf(1.0f, fmaxf(0.0f, yv))) * a.ext_factor;
            th = th * (1.0f - mix) + theta * mix;
        }
        const float cs = cosf(th) * a.mscale, sn = sinf(th) * a.mscale;
        const int i0 = 2 * p;
        const int ia = a.mode == MOE_ROPE_NEOX ? p : i0, ib = a.mode == MOE_ROPE_NEOX ? p + half : i0 + 1;
        const float x0 = v[ia], x1 = v[ib];
        v[ia] = x0 * cs - x1 * sn;
        v[ib] = x0 * sn + x1 * cs;
    }
}

__global__ void kv_store_kernel(void *cache, const float *x, int64_t n_tok, const int32_t *pos, int n,
                                int64_t row, int offset, int kv_f16)
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

__device__ __forceinline__ float cache_at(const void *c, int64_t i, int f16)
{
    return f16 ? __half2float(((const __half *)c)[i]) : ((const float *)c)[i];
}

// One block per (token, head): scores of a chunk of cache rows, an online
// softmax across chunks, and the weighted sum of V rows.
constexpr int ATT_CHUNK = 128;

__global__ void attention_kernel(float *out, const float *q, const int32_t *pos,
                                 struct moe_attn_params ap)
{
    extern __shared__ float sm[];
    float *qv = sm;                          // [head_dim]
    float *acc = qv + ap.head_dim;           // [head_dim_v]
    float *sc = acc + ap.head_dim_v;         // [ATT_CHUNK]
    __shared__ float red[32];
    const int64_t t = blockIdx.x / ap.n_head;
    const int h = blockIdx.x % ap.n_head;
    const int kvh = h / (ap.n_head / ap.n_head_kv);
    const float *qr = q + ((int64_t)t * ap.n_head + h) * ap.head_dim;
    for (int d = threadIdx.x; d < ap.head_dim; d += blockDim.x)
        qv[d] = ap.kv_f16 ? __half2float(__float2half_rn(qr[d])) : qr[d];
    for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x)
        acc[d] = 0.0f;
    __syncthreads();
    const int p = pos[t];
    const int first = ap.window > 0 && p - ap.window + 1 > 0 ? p - ap.window + 1 : 0;
    float m = -INFINITY, l = 0.0f;
    for (int c0 = first; c0 <= p; c0 += ATT_CHUNK) {
        const int nc = min(ATT_CHUNK, p - c0 + 1);
        // scores: one warp per row, lanes over the head dims
        const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
        for (int j = wid; j < nc; j += nw) {
            const int64_t off = (int64_t)(c0 + j) * ap.k_row + (int64_t)kvh * ap.head_dim;
            float s = 0.0f;
            for (int d = lane; d < ap.head_dim; d += 32)
                s += qv[d] * cache_at(ap.k_cache, off + d, ap.kv_f16);
            for (int o = 16; o > 0; o >>= 1)
                s += __shfl_down_sync(0xffffffffu, s, o);
            if (lane == 0)
                sc[j] = s * ap.scale;
        }
        __syncthreads();
        float cm = -INFINITY;
        for (int j = threadIdx.x; j < nc; j += blockDim.x)
            cm = fmaxf(cm, sc[j]);
        cm = block_max(cm, red);
        const float nm = fmaxf(m, cm);
        const float fac = m == -INFINITY ? 0.0f : __expf(m - nm);
        float cs = 0.0f;
        for (int j = threadIdx.x; j < nc; j += blockDim.x) {
            sc[j] = __expf(sc[j] - nm);
            cs += sc[j];
        }
        cs = block_sum(cs, red);
        l = l * fac + cs;
        for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x) {
            float a = acc[d] * fac;
            for (int j = 0; j < nc; j++) {
                const int64_t off = (int64_t)(c0 + j) * ap.v_row + (int64_t)kvh * ap.head_dim_v + d;
                a += sc[j] * cache_at(ap.v_cache, off, ap.kv_f16);
            }
            acc[d] = a;
        }
        m = nm;
        __syncthreads();
    }
    if (ap.sinks) {
        const float s = ap.sinks[h];
        const float nm = fmaxf(m, s);
        const float fac = m == -INFINITY ? 0.0f : __expf(m - nm);
        l = l * fac + __expf(s - nm);
        for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x)
            acc[d] *= fac;
        __syncthreads();
    }
    float *o = out + ((int64_t)t * ap.n_head + h) * ap.head_dim_v;
    const float inv = 1.0f / l;
    for (int d = threadIdx.x; d < ap.head_dim_v; d += blockDim.x)
        o[d] = acc[d] * inv;
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

__global__ void copy_rows_kernel(float *dst, int64_t ds, const int32_t *di, const float *src,
                                 int64_t ss, const int32_t *si, int64_t n, int64_t len)
{
    for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n * len;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = idx / len, k = idx % len;
        dst[(di ? di[i] : i) * ds + k] = src[(si ? si[i] : i) * ss + k];
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

unsigned grid_for(int64_t n, int threads = 256)
{
    int64_t g = (n + threads - 1) / threads;
    if (g < 1)
        g = 1;
    return (unsigned)(g > 65535 ? 65535 : g);
}

// ---- ops ---------------------------------------------------------------

void *cu_alloc(struct moe_backend *be, size_t bytes)
{
    cuda_ctx *c = ctx_of(be);
    void *p = nullptr;
    if (c->fatal || cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError();
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

int cu_reserve(struct moe_backend *be, size_t shared, size_t per_worker)
{
    cuda_ctx *c = ctx_of(be);
    (void)per_worker;
    // a dequantization tile of at least 64 MiB (and at least `shared`)
    size_t want = shared > ((size_t)64 << 20) ? shared : ((size_t)64 << 20);
    if (c->tile_bytes >= want)
        return 0;
    if (c->tile)
        cudaFree(c->tile);
    c->tile = nullptr;
    c->tile_bytes = 0;
    int rc = check(c, cudaMalloc(&c->tile, want), "reserve");
    if (rc == 0)
        c->tile_bytes = want;
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

// Device copy of host integers (positions, row ids), on the stream.
int dev_ints(cuda_ctx *c, const int32_t *host, int64_t n, int32_t **out)
{
    const size_t need = (size_t)(n > 0 ? n : 1) * sizeof(int32_t);
    if (need > c->dev_ints_cap) {
        if (c->dev_ints)
            cudaFree(c->dev_ints);
        c->dev_ints = nullptr;
        c->dev_ints_cap = 0;
        int rc = check(c, cudaMalloc(&c->dev_ints, need * 2), "positions");
        if (rc)
            return rc;
        c->dev_ints_cap = need * 2;
    }
    int rc = check(c, cudaMemcpyAsync(c->dev_ints, host, (size_t)n * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, c->stream), "positions");
    // the host array may change after we return: the copy must have happened
    if (rc == 0)
        rc = check(c, cudaStreamSynchronize(c->stream), "positions");
    *out = c->dev_ints;
    return rc;
}

int cu_get_rows(struct moe_backend *be, float *y, const struct moe_weight *w, const int32_t *ids, int n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= w->n_out)
            return -EINVAL;
    if (!cu_supports(be, w->dtype))
        return MOE_EUNSUPPORTED;
    int32_t *d_ids;
    int rc = dev_ints(c, ids, n, &d_ids);
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

int cu_matmul(struct moe_backend *be, float *y, const struct moe_weight *w, const float *bias,
              const float *x, int64_t n_tok)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (!cu_supports(be, w->dtype))
        return MOE_EUNSUPPORTED;
    if (c->tile == nullptr)
        return MOE_ELIMIT;
    const struct moe_dtype_info *inf = moe_dtype_info(w->dtype);
    const int blk = (int)inf->block_size, bb = (int)inf->type_size;
    int64_t rows_per_tile = (int64_t)(c->tile_bytes / ((size_t)w->n_in * sizeof(float)));
    if (rows_per_tile < 1)
        return MOE_ELIMIT;
    const float one = 1.0f, zero = 0.0f;
    for (int64_t r0 = 0; r0 < w->n_out; r0 += rows_per_tile) {
        const int64_t nr = w->n_out - r0 < rows_per_tile ? w->n_out - r0 : rows_per_tile;
        const float *wf;
        if (w->dtype == MOE_DTYPE_F32) {
            wf = (const float *)((const uint8_t *)w->data + r0 * w->row_bytes);
        } else {
            dequant_rows_kernel<<<grid_for(nr * w->n_in), 256, 0, c->stream>>>(
                w->dtype, (const uint8_t *)w->data + r0 * w->row_bytes, w->row_bytes, w->n_in, nr,
                blk, bb, c->tile);
            int rc = LAUNCHED(c, "matmul dequant");
            if (rc)
                return rc;
            wf = c->tile;
        }
        // column-major view: Y(n_out x n_tok) = W^T(n_out x n_in) * X(n_in x n_tok)
        // (an F32 weight is used in place: its row stride is n_in floats too)
        cublasStatus_t st = cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nr, (int)n_tok,
                                        (int)w->n_in, &one, wf, (int)w->n_in, x, (int)w->n_in, &zero,
                                        y + r0, (int)w->n_out);
        if (st != CUBLAS_STATUS_SUCCESS) {
            fprintf(stderr, "moe cuda: cublasSgemm: status %d\n", (int)st);
            return MOE_EGPU;
        }
    }
    if (bias) {
        add_bias_kernel<<<grid_for(n_tok * w->n_out), 256, 0, c->stream>>>(y, bias, n_tok, w->n_out);
        return LAUNCHED(c, "matmul bias");
    }
    return 0;
}

int cu_rope(struct moe_backend *be, float *x, int64_t n_tok, int n_head, int head_stride, int offset,
            const int32_t *pos, const struct moe_rope_params *rp)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (rp->n_rot <= 0 || offset < 0 || offset + rp->n_rot > head_stride || rp->n_rot % 2 != 0)
        return -EINVAL;
    rope_args a;
    a.mode = rp->mode;
    a.n_rot = rp->n_rot;
    a.theta_scale = powf(rp->freq_base, -2.0f / (float)rp->n_rot);
    a.freq_scale = rp->freq_scale;
    a.ext_factor = rp->ext_factor;
    a.mscale = rp->attn_factor != 0.0f ? rp->attn_factor : 1.0f;
    if (rp->ext_factor != 0.0f)
        a.mscale *= 1.0f + 0.1f * logf(1.0f / rp->freq_scale);
    a.corr0 = rp->corr_dims[0];
    a.corr1 = rp->corr_dims[1];
    int32_t *d_pos;
    int rc = dev_ints(c, pos, n_tok, &d_pos);
    if (rc)
        return rc;
    rope_kernel<<<grid_for(n_tok * n_head * (rp->n_rot / 2)), 256, 0, c->stream>>>(
        x, n_tok, n_head, head_stride, offset, d_pos, a);
    return LAUNCHED(c, "rope");
}

int cu_attention(struct moe_backend *be, float *out, const float *q, int64_t n_tok,
                 const int32_t *pos, const struct moe_attn_params *ap)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (ap->n_head_kv <= 0 || ap->n_head % ap->n_head_kv != 0)
        return -EINVAL;
    for (int64_t t = 0; t < n_tok; t++)
        if (pos[t] < 0)
            return -EINVAL;
    int32_t *d_pos;
    int rc = dev_ints(c, pos, n_tok, &d_pos);
    if (rc)
        return rc;
    const size_t sm = (size_t)(ap->head_dim + ap->head_dim_v + ATT_CHUNK) * sizeof(float);
    for (int64_t t0 = 0; t0 < n_tok; t0 += 65535 / ap->n_head) {
        const int64_t nt = n_tok - t0 < 65535 / ap->n_head ? n_tok - t0 : 65535 / ap->n_head;
        attention_kernel<<<(unsigned)(nt * ap->n_head), 128, sm, c->stream>>>(
            out + t0 * ap->n_head * ap->head_dim_v, q + t0 * ap->n_head * ap->head_dim, d_pos + t0, *ap);
        if ((rc = LAUNCHED(c, "attention")) != 0)
            return rc;
    }
    return 0;
}

int cu_kv_store(struct moe_backend *be, void *cache, const float *x, int64_t n_tok, const int32_t *pos,
                int n, int64_t row, int offset, int kv_f16)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    int32_t *d_pos;
    int rc = dev_ints(c, pos, n_tok, &d_pos);
    if (rc)
        return rc;
    kv_store_kernel<<<grid_for(n_tok * n), 256, 0, c->stream>>>(cache, x, n_tok, d_pos, n, row, offset,
                                                                 kv_f16);
    return LAUNCHED(c, "kv_store");
}

// The logits come to the host (n_tok x n_expert floats) and the CPU
// backend's router picks the experts: identical selection rules, and the
// ids are needed on the host anyway to fetch the experts.
int cu_router_topk(struct moe_backend *be, const float *logits, int64_t n_tok,
                   const struct moe_gating_params *gp, int32_t *ids, float *weights)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    const size_t need = (size_t)n_tok * (size_t)gp->n_expert * sizeof(float);
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
    swiglu_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, g, u, n);
    return LAUNCHED(c, "swiglu");
}

int cu_swiglu_oai(struct moe_backend *be, float *y, const float *g, const float *u, int64_t n,
                  float alpha, float limit)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    swiglu_oai_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, g, u, n, alpha, limit);
    return LAUNCHED(c, "swiglu_oai");
}

int cu_axpy(struct moe_backend *be, float *y, float a, const float *x, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    axpy_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, a, x, n);
    return LAUNCHED(c, "axpy");
}

int cu_add(struct moe_backend *be, float *y, const float *a, const float *b, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    add_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, a, b, n);
    return LAUNCHED(c, "add");
}

int cu_copy_rows(struct moe_backend *be, float *dst, int64_t ds, const int32_t *di, const float *src,
                 int64_t ss, const int32_t *si, int64_t n, int64_t len)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    if (n <= 0)
        return 0;
    /* both index lists in one device buffer: [di | si] */
    int32_t *host = (int32_t *)malloc((size_t)(2 * n) * sizeof(int32_t));
    if (host == nullptr)
        return -ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        host[i] = di ? di[i] : (int32_t)i;
        host[n + i] = si ? si[i] : (int32_t)i;
    }
    int32_t *dev = nullptr;
    int rc = dev_ints(c, host, 2 * n, &dev);
    free(host);
    if (rc)
        return rc;
    copy_rows_kernel<<<grid_for(n * len), 256, 0, c->stream>>>(dst, ds, dev, src, ss, dev + n, n, len);
    return LAUNCHED(c, "copy_rows");
}

int cu_fill(struct moe_backend *be, float *y, float v, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    fill_kernel<<<grid_for(n), 256, 0, c->stream>>>(y, v, n);
    return LAUNCHED(c, "fill");
}

int cu_gate_rows(struct moe_backend *be, float *y, const float *g, int64_t n_rows, int64_t n)
{
    cuda_ctx *c = ctx_of(be);
    FATAL_GUARD(c);
    gate_rows_kernel<<<grid_for(n_rows * n), 256, 0, c->stream>>>(y, g, n_rows, n);
    return LAUNCHED(c, "gate_rows");
}

void cu_destroy(struct moe_backend *be)
{
    cuda_ctx *c = ctx_of(be);
    if (c) {
        cudaStreamSynchronize(c->stream);
        if (c->tile)
            cudaFree(c->tile);
        if (c->dev_ints)
            cudaFree(c->dev_ints);
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
    cu_router_topk,
    cu_swiglu,
    cu_swiglu_oai,
    cu_axpy,
    cu_add,
    cu_copy_rows,
    cu_fill,
    cu_gate_rows,
    0,   // host_memory: device memory
};

} // namespace

extern "C" int moe_backend_cuda_create(struct moe_backend **out, int device, struct moe_diag *diag)
{
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
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    }
    be->ops = &cuda_ops;
    be->ctx = c;
    c->device = device;
    int rc = 0;
    if ((e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess)
        rc = moe_diag_set(diag, MOE_EGPU, "cudaStreamCreate: %s", cudaGetErrorString(e));
    if (rc == 0 && cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS)
        rc = moe_diag_set(diag, MOE_EGPU, "cublasCreate failed");
    if (rc == 0) {
        cublasSetStream(c->blas, c->stream);
        cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH);   // FP32, no TF32: parity first
    }
    if (rc == 0)
        rc = moe_backend_cpu_create(&c->host, 1, diag);
    if (rc) {
        cu_destroy(be);
        return rc;
    }
    *out = be;
    return 0;
}

// Decode GEMV: y[t][o] = w[o] . x[t] for a few tokens (n_tok <= MV_MAX_TOK).
//
// One warp per output row, MV_WARPS rows per block; the weight row is read
// once for all the tokens. A warp stages a chunk of whole blocks of its row
// in shared memory with 16-byte loads (ragged ends byte by byte: weight rows
// of 18- or 210-byte blocks have no useful alignment), then each lane
// computes its share of the chunk from shared memory (matvec-impl.h: one
// lane per 32-block, four per 256-block) with dp4a on int8 activations.
//
// The activations are first quantized into the workspace exactly as the CPU
// backend quantizes them (Q8_0, Q8_1 or Q8_K; F16/BF16 rounding for 16-bit
// weights), so the integer sums equal the CPU's and the results differ only
// by the order of float additions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <errno.h>

#include "common/dtype.h"
#include "kernels/blocks.h"
#include "kernels/cuda/cuda-impl.h"
#include "kernels/cuda/matvec-impl.h"

namespace moecu {

namespace {

constexpr int MV_WARPS = 4;

template <uint32_t T, int NT>
__global__ void __launch_bounds__(MV_WARPS * 32)
gemv_q_kernel(float *y, const uint8_t *w, size_t row_bytes, int64_t n_out, mv_act a, int nt,
              const float *bias)
{
    __shared__ __align__(16) uint8_t sm[MV_WARPS][MV_SBUF];
    constexpr int TS = wtraits<T>::TS, LPB = wtraits<T>::LPB;
    constexpr int BPL = mvchunk<T>::BPL, REP = mvchunk<T>::REP, CB = mvchunk<T>::CB;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int64_t row = (int64_t)blockIdx.x * MV_WARPS + wid;
    if (row >= n_out)
        return;   // whole warps only: nothing below synchronizes the block
    uint8_t *sb = sm[wid];
    const int64_t nb = a.n_in / wtraits<T>::BLK;
    const uint8_t *wr = w + row * row_bytes;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++)
        acc[t] = 0.0f;
    for (int64_t b0 = 0; b0 < nb; b0 += CB) {
        const int ncb = nb - b0 < CB ? (int)(nb - b0) : CB;
        const int head = stage(sb, wr + b0 * TS, ncb * TS, lane);
        __syncwarp();
#pragma unroll
        for (int r = 0; r < REP; r++) {
            const int kb = r * BPL + lane / LPB;
            if (kb < ncb)
                dot_block<T, NT>(sb + head + kb * TS, lane % LPB, a, b0 + kb, nt, acc);
        }
        __syncwarp();
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = acc[t];
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0 && t < nt)
            y[t * n_out + row] = bias ? v + bias[row] : v;
    }
}

// ---- F32 / F16 / BF16 weights -------------------------------------------------

template <uint32_t T> struct ftraits;
template <> struct ftraits<MOE_DTYPE_F32> { enum { ES = 4 }; };
template <> struct ftraits<MOE_DTYPE_F16> { enum { ES = 2 }; };
template <> struct ftraits<MOE_DTYPE_BF16> { enum { ES = 2 }; };

template <uint32_t T>
__device__ __forceinline__ float fval(const uint8_t *p, int64_t i)
{
    if constexpr (T == MOE_DTYPE_F32)
        return ((const float *)p)[i];
    else if constexpr (T == MOE_DTYPE_F16)
        return __half2float(((const __half *)p)[i]);
    else
        return __uint_as_float((uint32_t)((const uint16_t *)p)[i] << 16);
}

// the floats held by one 16-byte vector
template <uint32_t T>
__device__ __forceinline__ void fvec(uint4 v, float *f)
{
    const uint32_t u[4] = { v.x, v.y, v.z, v.w };
    if constexpr (T == MOE_DTYPE_F32) {
        for (int k = 0; k < 4; k++)
            f[k] = __uint_as_float(u[k]);
    } else if constexpr (T == MOE_DTYPE_F16) {
        for (int k = 0; k < 4; k++) {
            f[2 * k] = __half2float(__ushort_as_half((unsigned short)(u[k] & 0xffff)));
            f[2 * k + 1] = __half2float(__ushort_as_half((unsigned short)(u[k] >> 16)));
        }
    } else {
        for (int k = 0; k < 4; k++) {
            f[2 * k] = __uint_as_float(u[k] << 16);
            f[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
        }
    }
}

// x rows (x_stride elements apart) are in the weight's own element type:
// F32 activations as they are, F16/BF16 rounded like the CPU backend's.
template <uint32_t T, int NT, bool VEC>
__global__ void __launch_bounds__(MV_WARPS * 32)
gemv_f_kernel(float *y, const uint8_t *w, size_t row_bytes, int64_t n_in, int64_t n_out,
              const uint8_t *x, int64_t x_stride, int nt, const float *bias)
{
    constexpr int ES = ftraits<T>::ES, E = 16 / ES;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int64_t row = (int64_t)blockIdx.x * MV_WARPS + wid;
    if (row >= n_out)
        return;
    const uint8_t *wr = w + row * row_bytes;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++)
        acc[t] = 0.0f;
    int64_t i0 = 0;
    if (VEC) {
        const int64_t nv = n_in / E;
        for (int64_t v = lane; v < nv; v += 32) {
            float wf[E];
            fvec<T>(__ldg((const uint4 *)wr + v), wf);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < nt) {
                    float xf[E];
                    fvec<T>(*((const uint4 *)(x + t * x_stride * ES) + v), xf);
#pragma unroll
                    for (int k = 0; k < E; k++)
                        acc[t] += wf[k] * xf[k];
                }
            }
        }
        i0 = nv * E;
    }
    for (int64_t i = i0 + lane; i < n_in; i += 32) {
        const float wf = fval<T>(wr, i);
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < nt)
                acc[t] += wf * fval<T>(x + t * x_stride * ES, i);
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = acc[t];
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0 && t < nt)
            y[t * n_out + row] = bias ? v + bias[row] : v;
    }
}

// ---- activation preparation ----------------------------------------------------

__global__ void quant_q8_0_kernel(int8_t *q, float *d, float *s, const float *x, int64_t n_tok,
                                  int64_t n_in)
{
    const int64_t nb = n_in / MOE_QK8_0;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_tok * nb;
         i += (int64_t)gridDim.x * blockDim.x)
        quant_block_q8_0(x + i * MOE_QK8_0, q + i * MOE_QK8_0, d + i, s ? s + i : nullptr);
}

__global__ void quant_q8_k_kernel(int8_t *q, float *d, int32_t *sum16, const float *x, int64_t n_tok,
                                  int64_t n_in)
{
    const int64_t nb = n_in / MOE_QK_K;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_tok * nb;
         i += (int64_t)gridDim.x * blockDim.x)
        quant_block_q8_k(x + i * MOE_QK_K, q + i * MOE_QK_K, d + i, sum16 + i * (MOE_QK_K / 16));
}

__global__ void convert_act_kernel(uint16_t *dst, int64_t stride, const float *x, int64_t n_tok,
                                   int64_t n_in, bool bf16)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_tok * n_in;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / n_in, k = i % n_in;
        dst[t * stride + k] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x[i]))
                                   : __half_as_ushort(__float2half_rn(x[i]));
    }
}

template <uint32_t T>
void launch_q(cuda_ctx *c, float *y, const struct moe_weight *w, const mv_act &a, int nt,
              const float *bias)
{
    const unsigned grid = (unsigned)((w->n_out + MV_WARPS - 1) / MV_WARPS);
    const uint8_t *wd = (const uint8_t *)w->data;
    if (nt <= 1)
        gemv_q_kernel<T, 1><<<grid, MV_WARPS * 32, 0, c->stream>>>(y, wd, w->row_bytes, w->n_out, a, nt, bias);
    else if (nt <= 2)
        gemv_q_kernel<T, 2><<<grid, MV_WARPS * 32, 0, c->stream>>>(y, wd, w->row_bytes, w->n_out, a, nt, bias);
    else if (nt <= 4)
        gemv_q_kernel<T, 4><<<grid, MV_WARPS * 32, 0, c->stream>>>(y, wd, w->row_bytes, w->n_out, a, nt, bias);
    else
        gemv_q_kernel<T, 8><<<grid, MV_WARPS * 32, 0, c->stream>>>(y, wd, w->row_bytes, w->n_out, a, nt, bias);
}

template <uint32_t T, bool VEC>
void launch_f_nt(cuda_ctx *c, float *y, const struct moe_weight *w, const uint8_t *x, int64_t xs,
                 int nt, const float *bias)
{
    const unsigned grid = (unsigned)((w->n_out + MV_WARPS - 1) / MV_WARPS);
    const uint8_t *wd = (const uint8_t *)w->data;
    const size_t rb = w->row_bytes;
    if (nt <= 1)
        gemv_f_kernel<T, 1, VEC><<<grid, MV_WARPS * 32, 0, c->stream>>>(y, wd, rb, w->n_in, w->n_out, x, xs, nt, bias);
    else if (nt <= 2)
        gemv_f_kernel<T, 2, VEC><<<grid, MV_WARPS * 32, 0, c->stream>>>(y, wd, rb, w->n_in, w->n_out, x, xs, nt, bias);
    else if (nt <= 4)
        gemv_f_kernel<T, 4, VEC><<<grid, MV_WARPS * 32, 0, c->stream>>>(y, wd, rb, w->n_in, w->n_out, x, xs, nt, bias);
    else
        gemv_f_kernel<T, 8, VEC><<<grid, MV_WARPS * 32, 0, c->stream>>>(y, wd, rb, w->n_in, w->n_out, x, xs, nt, bias);
}

template <uint32_t T>
void launch_f(cuda_ctx *c, float *y, const struct moe_weight *w, const uint8_t *x, int64_t xs, int nt,
              const float *bias)
{
    // 16-byte loads need every weight row and activation row 16-aligned
    const bool vec = ((uintptr_t)w->data % 16) == 0 && w->row_bytes % 16 == 0 &&
                     ((uintptr_t)x % 16) == 0 && (xs * ftraits<T>::ES) % 16 == 0;
    if (vec)
        launch_f_nt<T, true>(c, y, w, x, xs, nt, bias);
    else
        launch_f_nt<T, false>(c, y, w, x, xs, nt, bias);
}

} // namespace

int convert_act(cuda_ctx *c, void *dst, int64_t stride, const float *x, int64_t n_tok, int64_t n_in,
                bool bf16)
{
    convert_act_kernel<<<grid_for(n_tok * n_in), 256, 0, c->stream>>>((uint16_t *)dst, stride, x, n_tok,
                                                                       n_in, bf16);
    return check(c, cudaGetLastError(), "activations to 16 bits");
}

int matvec(cuda_ctx *c, float *y, const struct moe_weight *w, const float *bias, const float *x,
           int64_t n_tok)
{
    const int act = moe_dtype_vec_dot_type(w->dtype);
    if (act < 0)
        return MOE_EUNSUPPORTED;
    const struct moe_dtype_info *inf = moe_dtype_info(w->dtype);
    if (w->n_in <= 0 || w->n_in % inf->block_size != 0)
        return -EINVAL;
    const int64_t n_in = w->n_in;
    for (int64_t t0 = 0; t0 < n_tok; t0 += MV_MAX_TOK) {
        const int nt = (int)(n_tok - t0 < MV_MAX_TOK ? n_tok - t0 : MV_MAX_TOK);
        const float *xt = x + t0 * n_in;
        float *yt = y + t0 * w->n_out;
        if (act == MOE_DTYPE_F32) {
            launch_f<MOE_DTYPE_F32>(c, yt, w, (const uint8_t *)xt, n_in, nt, bias);
        } else if (act == MOE_DTYPE_F16 || act == MOE_DTYPE_BF16) {
            const int64_t stride = (n_in + 7) / 8 * 8;   // 16-byte rows
            if ((size_t)(nt * stride) * 2 > c->act_bytes)
                return MOE_ELIMIT;
            int rc = convert_act(c, c->act, stride, xt, nt, n_in, act == MOE_DTYPE_BF16);
            if (rc)
                return rc;
            if (act == MOE_DTYPE_F16)
                launch_f<MOE_DTYPE_F16>(c, yt, w, (const uint8_t *)c->act, stride, nt, bias);
            else
                launch_f<MOE_DTYPE_BF16>(c, yt, w, (const uint8_t *)c->act, stride, nt, bias);
        } else {
            if (act_q_bytes(act, nt, n_in) > c->act_bytes)
                return MOE_ELIMIT;
            const mv_act a = act_q_layout(act, c->act, nt, n_in);
            if (act == MOE_DTYPE_Q8_K)
                quant_q8_k_kernel<<<grid_for(nt * (n_in / MOE_QK_K), 64), 64, 0, c->stream>>>(
                    (int8_t *)a.q, (float *)a.d, (int32_t *)a.sum16, xt, nt, n_in);
            else
                quant_q8_0_kernel<<<grid_for(nt * (n_in / MOE_QK8_0), 128), 128, 0, c->stream>>>(
                    (int8_t *)a.q, (float *)a.d, (float *)a.s, xt, nt, n_in);
            int rc = check(c, cudaGetLastError(), "matmul: quantize activations");
            if (rc)
                return rc;
            switch (w->dtype) {
            case MOE_DTYPE_Q4_0: launch_q<MOE_DTYPE_Q4_0>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q4_1: launch_q<MOE_DTYPE_Q4_1>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q5_0: launch_q<MOE_DTYPE_Q5_0>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q5_1: launch_q<MOE_DTYPE_Q5_1>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q8_0: launch_q<MOE_DTYPE_Q8_0>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_IQ4_NL: launch_q<MOE_DTYPE_IQ4_NL>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_MXFP4: launch_q<MOE_DTYPE_MXFP4>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q2_K: launch_q<MOE_DTYPE_Q2_K>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q3_K: launch_q<MOE_DTYPE_Q3_K>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q4_K: launch_q<MOE_DTYPE_Q4_K>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q5_K: launch_q<MOE_DTYPE_Q5_K>(c, yt, w, a, nt, bias); break;
            case MOE_DTYPE_Q6_K: launch_q<MOE_DTYPE_Q6_K>(c, yt, w, a, nt, bias); break;
            default: return MOE_EUNSUPPORTED;
            }
        }
        int rc = check(c, cudaGetLastError(), "matmul: gemv");
        if (rc)
            return rc;
    }
    return 0;
}

} // namespace moecu

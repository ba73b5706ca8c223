/* Reference quantizers, bit-exact with llama-quantize for F16, BF16, Q8_0,
 * Q4_0, Q4_K, Q5_K, Q6_K and MXFP4 (see quant.h for the rules).
 *
 * Bit-exactness depends on doing the float operations exactly as ggml's
 * reference code does: x * (1/d) rather than x / d, roundf for Q8_0, and a
 * truncating conversion after adding 8.5 for Q4_0, with no fused
 * multiply-add (the project compiles as ISO C11, where GCC does not
 * contract a*b+c; a contraction here would change some codes).
 */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cpu/quant.h"
#include "common/dtype.h"
#include "kernels/fp16.h"

void moe_quantize_row_f16(const float *x, uint16_t *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_fp32_to_fp16(x[i]);
}

void moe_quantize_row_bf16(const float *x, uint16_t *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_fp32_to_bf16(x[i]);
}

void moe_dequantize_row_f16(const uint16_t *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_fp16_to_fp32(x[i]);
}

void moe_dequantize_row_bf16(const uint16_t *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        y[i] = moe_bf16_to_fp32(x[i]);
}

/* The block quantizers work on 4-float vectors (GCC/Clang vector
 * extensions; SSE2 on x86-64, NEON on arm64). Each element goes through the
 * same IEEE single operations as the scalar reference (products, sums,
 * truncating conversions, comparisons), and max() is exact in any order,
 * so the bytes are the same; the scalar form of each rule is given in the
 * comments. */
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

static inline f32x4 load4(const float *p)
{
    f32x4 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline f32x4 splat4(float x)
{
    return (f32x4){ x, x, x, x };
}

/* |a| > m ? |a| : m per lane (ggml's MAX(), exact for non-NaN input) */
static inline f32x4 absmax4(f32x4 a, f32x4 m)
{
    a = (f32x4)((i32x4)a & 0x7fffffff);
    i32x4 gt = a > m;
    return (f32x4)(((i32x4)a & gt) | ((i32x4)m & ~gt));
}

/* the largest |x[j]| of a 32-element block */
static inline float block_amax(const float *x)
{
    f32x4 m0 = splat4(0.0f), m1 = splat4(0.0f);
    for (int k = 0; k < 32; k += 8) {
        m0 = absmax4(load4(x + k), m0);
        m1 = absmax4(load4(x + k + 4), m1);
    }
    m0 = absmax4(m1, m0);
    float amax = 0.0f;
    for (int k = 0; k < 4; k++)
        amax = m0[k] > amax ? m0[k] : amax;
    return amax;
}

void moe_quantize_row_q8_0(const float *x, struct moe_block_q8_0 *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK8_0 == 0);
    for (int64_t b = 0; b < n / MOE_QK8_0; b++, x += MOE_QK8_0) {
        /* amax = max |x[j]|; d = amax / 127; q[j] = roundf(x[j] * (1/d)) */
        const float amax = block_amax(x);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = moe_fp32_to_fp16(d);
        const f32x4 vid = splat4(id), half = splat4(0.5f), mhalf = splat4(-0.5f);
        for (int k = 0; k < MOE_QK8_0; k += 4) {
            /* roundf (half away from zero) without libm: the truncation
             * q, then +-1 when the exact remainder v - q reaches +-0.5 */
            const f32x4 v = load4(x + k) * vid;
            i32x4 q = __builtin_convertvector(v, i32x4);
            const f32x4 f = v - __builtin_convertvector(q, f32x4);
            q = q - (f >= half) + (f <= mhalf); /* comparison masks are -1 */
            for (int j = 0; j < 4; j++)
                y[b].qs[k + j] = (int8_t)q[j];
        }
    }
}

void moe_quantize_row_q4_0(const float *x, struct moe_block_q4_0 *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK4_0 == 0);
    const i32x4 fifteen = { 15, 15, 15, 15 };
    for (int64_t b = 0; b < n / MOE_QK4_0; b++, x += MOE_QK4_0) {
        /* max = the signed value of the largest magnitude, the first one on
         * ties (0 for an all-zero block); d = max / -8 maps it to code 0
         * exactly and the other side to at most 15:
         * q[j] = min(15, (int8)(x[j] * (1/d) + 8.5)) */
        const float amax = block_amax(x);
        float max = 0.0f;
        if (amax > 0.0f) {
            int j = 0;
            while (fabsf(x[j]) != amax)
                j++;
            max = x[j];
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = moe_fp32_to_fp16(d);
        const f32x4 vid = splat4(id), bias = splat4(8.5f);
        for (int k = 0; k < MOE_QK4_0 / 2; k += 4) {
            i32x4 lo = __builtin_convertvector(load4(x + k) * vid + bias, i32x4);
            i32x4 hi = __builtin_convertvector(load4(x + 16 + k) * vid + bias, i32x4);
            lo = (lo & (lo <= fifteen)) | (fifteen & (lo > fifteen));
            hi = (hi & (hi <= fifteen)) | (fifteen & (hi > fifteen));
            const i32x4 packed = lo | hi << 4; /* element j low, j + 16 high */
            for (int j = 0; j < 4; j++)
                y[b].qs[k + j] = (uint8_t)packed[j];
        }
    }
}

void moe_dequantize_row_q8_0(const struct moe_block_q8_0 *x, float *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK8_0 == 0);
    for (int64_t b = 0; b < n / MOE_QK8_0; b++, y += MOE_QK8_0) {
        const float d = moe_fp16_to_fp32(x[b].d);
        for (int j = 0; j < MOE_QK8_0; j++)
            y[j] = (float)x[b].qs[j] * d;
    }
}

void moe_dequantize_row_q4_0(const struct moe_block_q4_0 *x, float *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK4_0 == 0);
    const int half = MOE_QK4_0 / 2;
    for (int64_t b = 0; b < n / MOE_QK4_0; b++, y += MOE_QK4_0) {
        const float d = moe_fp16_to_fp32(x[b].d);
        for (int j = 0; j < half; j++) {
            y[j] = (float)((x[b].qs[j] & 0x0f) - 8) * d;
            y[half + j] = (float)((x[b].qs[j] >> 4) - 8) * d;
        }
    }
}

/* ---- K-quants and MXFP4 (ggml-quants.c's reference quantizers) ---------
 *
 * Written from the published algorithm of quantize_row_q{4,5,6}_K_ref and
 * quantize_row_mxfp4_ref; every float operation is done in the same order
 * and type as there, with no contraction, so the bytes are identical.
 * ggml builds these in ggml-base without FMA, on every CPU. */

/* ggml-quants.c: nearest_int (round half to even through the 1.5 * 2^23
 * trick; |x| <= 2^22 here). */
static inline int nearest_int(float fval)
{
    const float val = fval + 12582912.0f;
    int32_t i;
    memcpy(&i, &val, sizeof(i));
    return (i & 0x007fffff) - 0x00400000;
}

#define GROUP_MAX_EPS 1e-15f /* ggml-quants.c */

/* ggml-quants.c: make_qkx2_quants with use_mad = false. Finds a scale and
 * minimum for n codes 0..nmax that minimise the weighted squared error,
 * trying nstep + 1 grid offsets; returns the scale, *the_min = -min. */
static float make_qkx2_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                              float *the_min, uint8_t *Laux, float rmin, float rdelta, int nstep)
{
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min)
            min = x[i];
        if (x[i] > max)
            max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0)
        min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        float diff = scale * (float)L[i] + min - x[i];
        diff = diff * diff;
        best_error += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = l < 0 ? 0 : l > nmax ? nmax : l;
            Laux[i] = (uint8_t)l;
            const float w = weights[i];
            sum_l += w * (float)l;
            sum_l2 += w * (float)l * (float)l;
            sum_xl += w * (float)l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                diff = diff * diff;
                cur_error += weights[i] * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* ggml-quants.c: make_qx_quants with rmse_type 1 and no importance
 * weights (w = x^2): signed codes -nmax..nmax-1 stored as L = code + nmax. */
static float make_qx_quants(int n, int nmax, const float *x, int8_t *L)
{
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = (float)-nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0)
            continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
            const float w = x[i] * x[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; ++i) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + (l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q4_K and Q5_K share everything but the code range (nmax 15 or 31), the
 * search grid and the packing of the codes. Fills scales/d/dmin and L. */
static void quantize_k_scales(const float *x, int nmax, float rmin, int nstep, uint8_t *scales_out,
                              uint16_t *d_out, uint16_t *dmin_out, uint8_t L[MOE_QK_K])
{
    uint8_t Laux[32];
    float weights[32], mins[MOE_QK_K / 32], scales[MOE_QK_K / 32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < MOE_QK_K / 32; ++j) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l)
            sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; ++l)
            weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin, 0.1f,
                                     nstep);
        if (scales[j] > max_scale)
            max_scale = scales[j];
        if (mins[j] > max_min)
            max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < MOE_QK_K / 32; ++j) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = ls < 63 ? ls : 63;
        lm = lm < 63 ? lm : 63;
        if (j < 4) {
            scales_out[j] = ls;
            scales_out[j + 4] = lm;
        } else {
            scales_out[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            scales_out[j - 4] |= (uint8_t)((ls >> 4) << 6);
            scales_out[j - 0] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    *d_out = moe_fp32_to_fp16(max_scale / 63.f);
    *dmin_out = moe_fp32_to_fp16(max_min / 63.f);
    for (int j = 0; j < MOE_QK_K / 32; ++j) {
        int sc, m;
        moe_q4k_scale_min(j, scales_out, &sc, &m);
        const float d = moe_fp16_to_fp32(*d_out) * (float)sc;
        if (d == 0.0f)
            continue;
        const float dm = moe_fp16_to_fp32(*dmin_out) * (float)m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        }
    }
}

void moe_quantize_row_q4_k(const float *x, struct moe_block_q4_k *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK_K == 0);
    uint8_t L[MOE_QK_K];
    for (int64_t i = 0; i < n / MOE_QK_K; i++, x += MOE_QK_K) {
        quantize_k_scales(x, 15, -1.0f, 20, y[i].scales, &y[i].d, &y[i].dmin, L);
        uint8_t *q = y[i].qs;
        for (int j = 0; j < MOE_QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l)
                q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

void moe_quantize_row_q5_k(const float *x, struct moe_block_q5_k *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK_K == 0);
    uint8_t L[MOE_QK_K];
    for (int64_t i = 0; i < n / MOE_QK_K; i++, x += MOE_QK_K) {
        quantize_k_scales(x, 31, -0.5f, 15, y[i].scales, &y[i].d, &y[i].dmin, L);
        uint8_t *qh = y[i].qh, *ql = y[i].qs;
        memset(qh, 0, MOE_QK_K / 8);
        uint8_t m1 = 1, m2 = 2;
        for (int n0 = 0; n0 < MOE_QK_K; n0 += 64, ql += 32) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[n0 + j], l2 = L[n0 + j + 32];
                if (l1 > 15) {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if (l2 > 15) {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
            m1 = (uint8_t)(m1 << 2);
            m2 = (uint8_t)(m2 << 2);
        }
    }
}

void moe_quantize_row_q6_k(const float *x, struct moe_block_q6_k *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK_K == 0);
    int8_t L[MOE_QK_K];
    float scales[MOE_QK_K / 16];
    for (int64_t i = 0; i < n / MOE_QK_K; i++, x += MOE_QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < MOE_QK_K / 16; ++ib) {
            const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            const float abs_scale = fabsf(scale);
            if (abs_scale > max_abs_scale) {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        if (max_abs_scale < GROUP_MAX_EPS) {
            memset(&y[i], 0, sizeof(y[i]));
            y[i].d = moe_fp32_to_fp16(0.f);
            continue;
        }
        const float iscale = -128.f / max_scale;
        y[i].d = moe_fp32_to_fp16(1 / iscale);
        for (int ib = 0; ib < MOE_QK_K / 16; ++ib) {
            const int v = nearest_int(iscale * scales[ib]);
            y[i].scales[ib] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < MOE_QK_K / 16; ++j) {
            const float d = moe_fp16_to_fp32(y[i].d) * (float)y[i].scales[j];
            if (d == 0.0f)
                continue;
            for (int ii = 0; ii < 16; ++ii) {
                int l = nearest_int(x[16 * j + ii] / d);
                l = l < -32 ? -32 : l > 31 ? 31 : l;
                L[16 * j + ii] = (int8_t)(l + 32);
            }
        }
        uint8_t *ql = y[i].ql, *qh = y[i].qh;
        for (int j = 0; j < MOE_QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                const uint8_t q1 = L[j + l + 0] & 0xF, q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                  ((L[j + l + 96] >> 4) << 6));
            }
        }
    }
}

/* ggml-quants.c: best_index_mxfp4, the first grid value nearest to x / e */
static inline int best_index_mxfp4(float x, float e)
{
    int best_index = 0;
    float best_err = fabsf((float)moe_mxfp4_values[0] * e - x);
    for (int i = 1; i < 16; i++) {
        const float err = fabsf((float)moe_mxfp4_values[i] * e - x);
        if (err < best_err) {
            best_index = i;
            best_err = err;
        }
    }
    return best_index;
}

void moe_quantize_row_mxfp4(const float *x, struct moe_block_mxfp4 *y, int64_t n)
{
    MOE_ASSERT(n >= 0 && n % MOE_QK_MXFP4 == 0);
    for (int64_t i = 0; i < n / MOE_QK_MXFP4; i++, x += MOE_QK_MXFP4) {
        float amax = 0.0f;
        for (int j = 0; j < MOE_QK_MXFP4; j++)
            if (amax < fabsf(x[j]))
                amax = fabsf(x[j]);
        /* the shared exponent puts amax in [4, 8) times the scale: E2M1's
         * largest value is 6 */
        const uint8_t e = amax > 0.0f ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0;
        const float d = moe_e8m0_half(e);
        y[i].e = e;
        for (int j = 0; j < MOE_QK_MXFP4 / 2; ++j) {
            const int x0 = best_index_mxfp4(x[j], d);
            const int x1 = best_index_mxfp4(x[MOE_QK_MXFP4 / 2 + j], d);
            y[i].qs[j] = (uint8_t)(x0 | x1 << 4);
        }
    }
}

int moe_quantize_supported(uint32_t t)
{
    return t == MOE_DTYPE_F32 || t == MOE_DTYPE_F16 || t == MOE_DTYPE_BF16 || t == MOE_DTYPE_Q8_0 ||
           t == MOE_DTYPE_Q4_0 || t == MOE_DTYPE_Q4_K || t == MOE_DTYPE_Q5_K || t == MOE_DTYPE_Q6_K ||
           t == MOE_DTYPE_MXFP4;
}

int moe_quantize_row(uint32_t t, const float *src, void *dst, int64_t n)
{
    const struct moe_dtype_info *di = moe_dtype_info(t);
    if (di == NULL || !moe_quantize_supported(t))
        return MOE_EUNSUPPORTED;
    if (n < 0 || n % di->block_size != 0)
        return -EINVAL;
    /* dst may be unaligned (a byte buffer at any offset): quantize small
     * chunks into aligned scratch and copy out. */
    enum { CHUNK = 256 };
    union {
        uint16_t h[CHUNK];
        struct moe_block_q8_0 q8[CHUNK / MOE_QK8_0];
        struct moe_block_q4_0 q4[CHUNK / MOE_QK4_0];
        struct moe_block_q4_k q4k[CHUNK / MOE_QK_K];
        struct moe_block_q5_k q5k[CHUNK / MOE_QK_K];
        struct moe_block_q6_k q6k[CHUNK / MOE_QK_K];
        struct moe_block_mxfp4 mx[CHUNK / MOE_QK_MXFP4];
    } tmp;
    uint8_t *out = dst;
    if (t == MOE_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return 0;
    }
    for (int64_t i = 0; i < n; i += CHUNK) {
        const int64_t k = n - i < CHUNK ? n - i : CHUNK;
        size_t bytes = 0;
        switch (t) {
        case MOE_DTYPE_F16:
            moe_quantize_row_f16(src + i, tmp.h, k);
            bytes = (size_t)k * 2;
            break;
        case MOE_DTYPE_BF16:
            moe_quantize_row_bf16(src + i, tmp.h, k);
            bytes = (size_t)k * 2;
            break;
        case MOE_DTYPE_Q8_0:
            moe_quantize_row_q8_0(src + i, tmp.q8, k);
            bytes = (size_t)(k / MOE_QK8_0) * sizeof(struct moe_block_q8_0);
            break;
        case MOE_DTYPE_Q4_0:
            moe_quantize_row_q4_0(src + i, tmp.q4, k);
            bytes = (size_t)(k / MOE_QK4_0) * sizeof(struct moe_block_q4_0);
            break;
        case MOE_DTYPE_Q4_K:
            moe_quantize_row_q4_k(src + i, tmp.q4k, k);
            bytes = (size_t)(k / MOE_QK_K) * sizeof(struct moe_block_q4_k);
            break;
        case MOE_DTYPE_Q5_K:
            moe_quantize_row_q5_k(src + i, tmp.q5k, k);
            bytes = (size_t)(k / MOE_QK_K) * sizeof(struct moe_block_q5_k);
            break;
        case MOE_DTYPE_Q6_K:
            moe_quantize_row_q6_k(src + i, tmp.q6k, k);
            bytes = (size_t)(k / MOE_QK_K) * sizeof(struct moe_block_q6_k);
            break;
        case MOE_DTYPE_MXFP4:
            moe_quantize_row_mxfp4(src + i, tmp.mx, k);
            bytes = (size_t)(k / MOE_QK_MXFP4) * sizeof(struct moe_block_mxfp4);
            break;
        }
        memcpy(out, &tmp, bytes);
        out += bytes;
    }
    return 0;
}

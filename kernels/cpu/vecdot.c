/* Row dot products and activation quantization (see vecdot.h).
 *
 * The integer parts of the quantized dot products are exact, so the scalar
 * and AVX2 paths agree on them; they differ only in how the per-block float
 * terms are summed (the AVX2 path keeps 8 lanes, as ggml's does). Weight
 * and activation rows are arrays of kernels/blocks.h's structs. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/dtype.h"
#include "common/error.h"
#include "kernels/blocks.h"
#include "kernels/cpu/vecdot.h"
#include "kernels/fp16.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define MOE_X86 1
#endif

int moe_vecdot_supported(uint32_t t)
{
    return moe_dtype_vec_dot_type(t) >= 0;
}

size_t moe_vecdot_act_bytes(uint32_t t, int64_t n)
{
    const struct moe_dtype_info *wi = moe_dtype_info(t);
    const int at = moe_dtype_vec_dot_type(t);
    if (wi == NULL || at < 0 || n <= 0 || n % wi->block_size != 0)
        return 0;
    /* The activation row is a row of its own type; that type's block
     * divides the weight's (tests/unit/test_blocks.c), so n fits it. */
    return moe_dtype_row_bytes((enum moe_dtype)at, (uint64_t)n, NULL);
}

/* ---- activation quantization ------------------------------------------ */

/* ggml's x86 Q8_0/Q8_1 activation quantizer: id = 127/amax (not 1/d) and
 * round-to-nearest-even (_mm256_round_ps); lrintf rounds that way under the
 * default rounding mode. */
static void quant_q8_0(const float *x, struct moe_block_q8_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += MOE_QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < MOE_QK8_0; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = moe_fp32_to_fp16(d);
        for (int j = 0; j < MOE_QK8_0; j++)
            y[i].qs[j] = (int8_t)lrintf(x[j] * id);
    }
}

static void quant_q8_1(const float *x, struct moe_block_q8_1 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += MOE_QK8_1) {
        float amax = 0.0f;
        for (int j = 0; j < MOE_QK8_1; j++)
            amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < MOE_QK8_1; j++) {
            y[i].qs[j] = (int8_t)lrintf(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].d = moe_fp32_to_fp16(d);
        y[i].s = moe_fp32_to_fp16(d * (float)sum);
    }
}

/* ggml uses its reference Q8_K quantizer on every CPU: scale by -127/max
 * where max is the signed value of largest magnitude. */
static void quant_q8_k(const float *x, struct moe_block_q8_k *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += MOE_QK_K) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < MOE_QK_K; j++) {
            float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof(y[i]));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < MOE_QK_K; j++) {
            long v = lrintf(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < MOE_QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++)
                sum += y[i].qs[j * 16 + l];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1.0f / iscale;
    }
}

void moe_vecdot_quantize_act(uint32_t t, const float *x, void *act, int64_t n)
{
    switch (moe_dtype_vec_dot_type(t)) {
    case MOE_DTYPE_F32:
        memcpy(act, x, (size_t)n * 4);
        break;
    case MOE_DTYPE_F16: {
        uint16_t *h = act;
        for (int64_t i = 0; i < n; i++)
            h[i] = moe_fp32_to_fp16(x[i]);
        break;
    }
    case MOE_DTYPE_BF16: {
        uint16_t *h = act;
        for (int64_t i = 0; i < n; i++)
            h[i] = moe_fp32_to_bf16(x[i]);
        break;
    }
    case MOE_DTYPE_Q8_0: quant_q8_0(x, act, n / MOE_QK8_0); break;
    case MOE_DTYPE_Q8_1: quant_q8_1(x, act, n / MOE_QK8_1); break;
    case MOE_DTYPE_Q8_K: quant_q8_k(x, act, n / MOE_QK_K); break;
    default: MOE_ASSERT(0);
    }
}

/* ---- scalar dot products --------------------------------------------- */

static inline float f16(uint16_t h)
{
    return moe_fp16_to_fp32(h);
}

/* Q5_0's and Q5_1's fifth bits: element j's is bit j of this word. */
static inline uint32_t high_bits(const uint8_t qh[4])
{
    uint32_t v;
    memcpy(&v, qh, sizeof(v));
    return v;
}

static float dot_f32(const float *w, const float *x, int64_t n)
{
    float acc[8] = { 0 };
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += w[i + l] * x[i + l];
    float s = 0.0f;
    for (int l = 0; l < 8; l++)
        s += acc[l];
    for (; i < n; i++)
        s += w[i] * x[i];
    return s;
}

static float dot_f16(const uint16_t *w, const uint16_t *x, int64_t n)
{
    float acc[8] = { 0 };
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += moe_fp16_to_fp32(w[i + l]) * moe_fp16_to_fp32(x[i + l]);
    float s = 0.0f;
    for (int l = 0; l < 8; l++)
        s += acc[l];
    for (; i < n; i++)
        s += moe_fp16_to_fp32(w[i]) * moe_fp16_to_fp32(x[i]);
    return s;
}

static float dot_bf16(const uint16_t *w, const uint16_t *x, int64_t n)
{
    float acc[8] = { 0 };
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += moe_bf16_to_fp32(w[i + l]) * moe_bf16_to_fp32(x[i + l]);
    float s = 0.0f;
    for (int l = 0; l < 8; l++)
        s += acc[l];
    for (; i < n; i++)
        s += moe_bf16_to_fp32(w[i]) * moe_bf16_to_fp32(x[i]);
    return s;
}

static float dot_q8_0(const struct moe_block_q8_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int sumi = 0;
        for (int j = 0; j < MOE_QK8_0; j++)
            sumi += x[i].qs[j] * y[i].qs[j];
        s += (float)sumi * (f16(x[i].d) * f16(y[i].d));
    }
    return s;
}

static float dot_q4_0(const struct moe_block_q4_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q = x[i].qs;
        int sumi = 0;
        for (int j = 0; j < MOE_QK4_0 / 2; j++)
            sumi += ((q[j] & 0xf) - 8) * y[i].qs[j] + ((q[j] >> 4) - 8) * y[i].qs[j + 16];
        s += (float)sumi * (f16(x[i].d) * f16(y[i].d));
    }
    return s;
}

static float dot_q4_1(const struct moe_block_q4_1 *x, const struct moe_block_q8_1 *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q = x[i].qs;
        int sumi = 0;
        for (int j = 0; j < MOE_QK4_1 / 2; j++)
            sumi += (q[j] & 0xf) * y[i].qs[j] + (q[j] >> 4) * y[i].qs[j + 16];
        s += (f16(x[i].d) * f16(y[i].d)) * (float)sumi + f16(x[i].m) * f16(y[i].s);
    }
    return s;
}

static float dot_q5_0(const struct moe_block_q5_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint32_t qh = high_bits(x[i].qh);
        const uint8_t *q = x[i].qs;
        int sumi = 0;
        for (int j = 0; j < MOE_QK5_0 / 2; j++) {
            int x0 = ((q[j] & 0xf) | ((qh >> j) & 1) << 4) - 16;
            int x1 = ((q[j] >> 4) | ((qh >> (j + 16)) & 1) << 4) - 16;
            sumi += x0 * y[i].qs[j] + x1 * y[i].qs[j + 16];
        }
        s += (float)sumi * (f16(x[i].d) * f16(y[i].d));
    }
    return s;
}

static float dot_q5_1(const struct moe_block_q5_1 *x, const struct moe_block_q8_1 *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint32_t qh = high_bits(x[i].qh);
        const uint8_t *q = x[i].qs;
        int sumi = 0;
        for (int j = 0; j < MOE_QK5_1 / 2; j++) {
            int x0 = (q[j] & 0xf) | ((qh >> j) & 1) << 4;
            int x1 = (q[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
            sumi += x0 * y[i].qs[j] + x1 * y[i].qs[j + 16];
        }
        s += (f16(x[i].d) * f16(y[i].d)) * (float)sumi + f16(x[i].m) * f16(y[i].s);
    }
    return s;
}

static float dot_iq4_nl(const struct moe_block_iq4_nl *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q = x[i].qs;
        int sumi = 0;
        for (int j = 0; j < MOE_QK4_NL / 2; j++)
            sumi += moe_iq4nl_values[q[j] & 0xf] * y[i].qs[j] + moe_iq4nl_values[q[j] >> 4] * y[i].qs[j + 16];
        s += (float)sumi * (f16(x[i].d) * f16(y[i].d));
    }
    return s;
}

static float dot_mxfp4(const struct moe_block_mxfp4 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q = x[i].qs;
        int sumi = 0;
        for (int j = 0; j < MOE_QK_MXFP4 / 2; j++)
            sumi += moe_mxfp4_values[q[j] & 0xf] * y[i].qs[j] + moe_mxfp4_values[q[j] >> 4] * y[i].qs[j + 16];
        s += (float)sumi * (moe_e8m0_half(x[i].e) * f16(y[i].d));
    }
    return s;
}

static float dot_q2_k(const struct moe_block_q2_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *sc = x[i].scales, *q2 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        int summs = 0;
        for (int j = 0; j < 16; j++)
            summs += y[i].bsums[j] * (sc[j] >> 4);
        const float dall = y[i].d * f16(x[i].d), dmin = y[i].d * f16(x[i].dmin);
        int isum = 0, is = 0;
        for (int k = 0; k < MOE_QK_K / 128; k++, q2 += 32) {
            for (int shift = 0; shift < 8; shift += 2, q8 += 32) {
                for (int half = 0; half < 2; half++, is++) {
                    int suml = 0;
                    for (int l = 16 * half; l < 16 * half + 16; l++)
                        suml += q8[l] * ((q2[l] >> shift) & 3);
                    isum += (sc[is] & 0xf) * suml;
                }
            }
        }
        s += dall * (float)isum - dmin * (float)summs;
    }
    return s;
}

static float dot_q3_k(const struct moe_block_q3_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *hm = x[i].hmask, *q = x[i].qs;
        const int8_t *q8 = y[i].qs;
        int scales[16];
        for (int j = 0; j < 16; j++)
            scales[j] = moe_q3k_scale(x[i].scales, j);
        int isum = 0, is = 0;
        uint8_t m = 1;
        for (int n = 0; n < MOE_QK_K; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m <<= 1, q8 += 32) {
                for (int half = 0; half < 2; half++, is++) {
                    int suml = 0;
                    for (int l = 16 * half; l < 16 * half + 16; l++)
                        suml += q8[l] * (((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                    isum += scales[is] * suml;
                }
            }
        }
        s += (f16(x[i].d) * y[i].d) * (float)isum;
    }
    return s;
}

static float dot_q4_k(const struct moe_block_q4_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const int8_t *q8 = y[i].qs;
        int isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) {
            int sc, m;
            moe_q4k_scale_min(j, x[i].scales, &sc, &m);
            msum += m * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
            const uint8_t *qq = x[i].qs + 32 * (j / 2);
            int shift = 4 * (j & 1), suml = 0;
            for (int l = 0; l < 32; l++)
                suml += ((qq[l] >> shift) & 0xf) * q8[32 * j + l];
            isum += sc * suml;
        }
        s += (f16(x[i].d) * y[i].d) * (float)isum - (f16(x[i].dmin) * y[i].d) * (float)msum;
    }
    return s;
}

static float dot_q5_k(const struct moe_block_q5_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *qh = x[i].qh, *ql = x[i].qs;
        const int8_t *q8 = y[i].qs;
        int isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) {
            int sc, m;
            moe_q4k_scale_min(j, x[i].scales, &sc, &m);
            msum += m * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
            const uint8_t *qq = ql + 32 * (j / 2);
            int shift = 4 * (j & 1), suml = 0;
            for (int l = 0; l < 32; l++) {
                int v = ((qq[l] >> shift) & 0xf) | ((qh[l] >> j) & 1) << 4;
                suml += v * q8[32 * j + l];
            }
            isum += sc * suml;
        }
        s += (f16(x[i].d) * y[i].d) * (float)isum - (f16(x[i].dmin) * y[i].d) * (float)msum;
    }
    return s;
}

static float dot_q6_k(const struct moe_block_q6_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float s = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *sc = x[i].scales, *q8 = y[i].qs;
        int isum = 0;
        for (int n = 0; n < MOE_QK_K; n += 128, ql += 64, qh += 32, sc += 8, q8 += 128) {
            int sums[8] = { 0 };
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0xf) | ((qh[l] >> 0) & 3) << 4) - 32;
                int q2 = ((ql[l + 32] & 0xf) | ((qh[l] >> 2) & 3) << 4) - 32;
                int q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
                int q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
                sums[is + 0] += q1 * q8[l];
                sums[is + 2] += q2 * q8[l + 32];
                sums[is + 4] += q3 * q8[l + 64];
                sums[is + 6] += q4 * q8[l + 96];
            }
            for (int g = 0; g < 8; g++)
                isum += sc[g] * sums[g];
        }
        s += (f16(x[i].d) * y[i].d) * (float)isum;
    }
    return s;
}

/* ---- AVX2 ------------------------------------------------------------- */

#ifdef MOE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* half to float in hardware (F16C); the portable path's conversion is
 * exact too, but branchy, and it sits in the inner loop here */
AVX2 static inline float hf(uint16_t h)
{
    return _cvtsh_ss(h);
}

AVX2 static inline float hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

AVX2 static float dot_f32_avx2(const float *w, const float *x, int64_t n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++)
        s += w[i] * x[i];
    return s;
}

AVX2 static float dot_f16_avx2(const uint16_t *w, const uint16_t *x, int64_t n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
        __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8)));
        __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i + 8)));
        a0 = _mm256_fmadd_ps(w0, x0, a0);
        a1 = _mm256_fmadd_ps(w1, x1, a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; i < n; i++)
        s += moe_fp16_to_fp32(w[i]) * moe_fp16_to_fp32(x[i]);
    return s;
}

/* Signed int8 x int8 dot of 32 lanes into 8 int32 lanes, then float. */
AVX2 static inline __m256 mul_sum_i8(__m256i a, __m256i b)
{
    const __m256i ax = _mm256_sign_epi8(a, a);
    const __m256i sy = _mm256_sign_epi8(b, a);
    const __m256i dot16 = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, _mm256_set1_epi16(1)));
}

AVX2 static float dot_q8_0_avx2(const struct moe_block_q8_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(hf(x[i].d) * hf(y[i].d));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[i].qs);
        acc = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc);
    }
    return hsum8(acc);
}

AVX2 static float dot_q4_0_avx2(const struct moe_block_q4_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    __m256 acc = _mm256_setzero_ps();
    const __m256i lowmask = _mm256_set1_epi8(0xf), off = _mm256_set1_epi8(8);
    for (int64_t i = 0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(hf(x[i].d) * hf(y[i].d));
        const __m128i raw = _mm_loadu_si128((const __m128i *)x[i].qs);
        /* low nibbles -> lanes 0..15, high nibbles -> lanes 16..31 */
        __m256i qx = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        qx = _mm256_sub_epi8(_mm256_and_si256(qx, lowmask), off);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[i].qs);
        acc = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc);
    }
    return hsum8(acc);
}

AVX2 static float dot_q4_k_avx2(const struct moe_block_q4_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    /* integer sums stay in 8 lanes; each superblock adds d * lanes to a
     * float accumulator, so there is one horizontal sum per row */
    __m256 acc = _mm256_setzero_ps();
    float msum_f = 0.0f;
    const __m256i lowmask = _mm256_set1_epi8(0xf);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q4 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        int sc[8], mn[8], msum = 0;
        for (int j = 0; j < 8; j++) {
            moe_q4k_scale_min(j, x[i].scales, &sc[j], &mn[j]);
            msum += mn[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        __m256i isum = _mm256_setzero_si256();
        for (int j = 0; j < 8; j += 2) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(q4 + 16 * j));
            const __m256i lo = _mm256_and_si256(raw, lowmask);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lowmask);
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)(q8 + 32 * j));
            const __m256i y1 = _mm256_loadu_si256((const __m256i *)(q8 + 32 * j + 32));
            /* unsigned 4-bit x signed 8-bit: maddubs directly */
            __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_set1_epi16((short)sc[j]));
            __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), _mm256_set1_epi16((short)sc[j + 1]));
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(hf(x[i].d) * y[i].d), _mm256_cvtepi32_ps(isum), acc);
        msum_f += (hf(x[i].dmin) * y[i].d) * (float)msum;
    }
    return hsum8(acc) - msum_f;
}

AVX2 static float dot_q6_k_avx2(const struct moe_block_q6_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    __m256 accf = _mm256_setzero_ps();
    float corr_f = 0.0f;
    const __m256i m4 = _mm256_set1_epi8(0xf), m2 = _mm256_set1_epi8(3);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *sc = x[i].scales, *q8 = y[i].qs;
        /* q - 32 folded out: sum(sc * q8) * 32 from the block sums */
        int corr = 0;
        for (int g = 0; g < 16; g++)
            corr += sc[g] * y[i].bsums[g];
        __m256i acc = _mm256_setzero_si256();
        for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8, q8 += 128) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, m2), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4));
            for (int j = 0; j < 4; j++) {
                const __m256i yv = _mm256_loadu_si256((const __m256i *)(q8 + 32 * j));
                const __m256i p16 = _mm256_maddubs_epi16(q[j], yv);
                const __m256i scv = _mm256_set_m128i(_mm_set1_epi16(sc[2 * j + 1]), _mm_set1_epi16(sc[2 * j]));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, scv));
            }
        }
        const float d = hf(x[i].d) * y[i].d;
        accf = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(acc), accf);
        corr_f += d * (float)(32 * corr);
    }
    return hsum8(accf) - corr_f;
}

/* AVX-512 VNNI: two 32-blocks per 512-bit vector, dpbusd for the integer
 * dot. dpbusd wants unsigned x signed bytes: Q8_0 weights use |w| with the
 * activations' signs flipped where w < 0; Q4_0 nibbles are unsigned already
 * and the -8 offset comes out as 8 * sum(y) from a second dpbusd with 1s. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

AVX512 static inline __m512i load2x256(const void *a, const void *b)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

AVX512 static inline __m512 scale2(float a, float b)
{
    return _mm512_mask_blend_ps((__mmask16)0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b));
}

AVX512 static float dot_f16_avx512(const uint16_t *w, const uint16_t *x, int64_t n)
{
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i))),
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i))), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i + 16))),
                             _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i + 16))), a1);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    if (i < n)
        s += dot_f16_avx2(w + i, x + i, n - i);
    return s;
}

AVX512 static float dot_f32_avx512(const float *w, const float *x, int64_t n)
{
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    if (i < n)
        s += dot_f32_avx2(w + i, x + i, n - i);
    return s;
}

AVX512 static float dot_q8_0_avx512(const struct moe_block_q8_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m512i wx = load2x256(x[i].qs, x[i + 1].qs);
        const __m512i yx = load2x256(y[i].qs, y[i + 1].qs);
        const __mmask64 neg = _mm512_movepi8_mask(wx);
        const __m512i ax = _mm512_abs_epi8(wx);
        const __m512i sy = _mm512_mask_sub_epi8(yx, neg, _mm512_setzero_si512(), yx);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sy);
        const __m512 d = scale2(hf(x[i].d) * hf(y[i].d), hf(x[i + 1].d) * hf(y[i + 1].d));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc);
    }
    float s = _mm512_reduce_add_ps(acc);
    if (i < nb)
        s += dot_q8_0_avx2(x + i, y + i, nb - i);
    return s;
}

AVX512 static inline __m256i nibbles32(const uint8_t *q)
{
    const __m128i raw = _mm_loadu_si128((const __m128i *)q);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0xf));
}

AVX512 static float dot_q4_0_avx512(const struct moe_block_q4_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    __m512 acc = _mm512_setzero_ps();
    const __m512i ones = _mm512_set1_epi8(1);
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m512i wx = _mm512_inserti64x4(_mm512_castsi256_si512(nibbles32(x[i].qs)), nibbles32(x[i + 1].qs), 1);
        const __m512i yx = load2x256(y[i].qs, y[i + 1].qs);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wx, yx);
        const __m512i sy = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, yx);
        const __m512i v = _mm512_sub_epi32(dot, _mm512_slli_epi32(sy, 3));
        const __m512 d = scale2(hf(x[i].d) * hf(y[i].d), hf(x[i + 1].d) * hf(y[i + 1].d));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), d, acc);
    }
    float s = _mm512_reduce_add_ps(acc);
    if (i < nb)
        s += dot_q4_0_avx2(x + i, y + i, nb - i);
    return s;
}
#endif

/* ---- dispatch -------------------------------------------------------- */

enum simd { SIMD_SCALAR, SIMD_AVX2, SIMD_AVX512 };
static int simd_level = -1;

#ifdef MOE_X86
/* AVX-512 needs the CPU flags and the OS saving ZMM/opmask state (XCR0). */
static int avx512vnni_usable(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    const int flags = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31)) &&
                      (c & (1u << 11)); /* avx512 f, dq, bw, vl; vnni */
    if (!flags || !__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) /* OSXSAVE */
        return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6) == 0xe6; /* SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state */
}
#endif

static int simd(void)
{
    if (__builtin_expect(simd_level < 0, 0)) {
        int level = SIMD_SCALAR;
#ifdef MOE_X86
        __builtin_cpu_init();
        /* clang's __builtin_cpu_supports has no "f16c": ask cpuid (leaf 1, ECX bit 29) */
        unsigned a, b, c, d;
        const int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
            level = avx512vnni_usable() ? SIMD_AVX512 : SIMD_AVX2;
#endif
        const char *force = getenv("MOE_CPU_SIMD");
        if (force != NULL && strcmp(force, "scalar") == 0)
            level = SIMD_SCALAR;
        else if (force != NULL && strcmp(force, "avx2") == 0 && level > SIMD_AVX2)
            level = SIMD_AVX2;
        simd_level = level; /* benign race: every thread computes the same value */
    }
    return simd_level;
}

const char *moe_vecdot_impl(void)
{
    static const char *const names[] = { "scalar", "avx2", "avx512vnni" };
    return names[simd()];
}

float moe_vecdot(uint32_t t, const void *w, const void *act, int64_t n)
{
#ifdef MOE_X86
    const int level = simd();
    if (level == SIMD_AVX512) {
        switch (t) {
        case MOE_DTYPE_F32: return dot_f32_avx512(w, act, n);
        case MOE_DTYPE_F16: return dot_f16_avx512(w, act, n);
        case MOE_DTYPE_Q8_0: return dot_q8_0_avx512(w, act, n / MOE_QK8_0);
        case MOE_DTYPE_Q4_0: return dot_q4_0_avx512(w, act, n / MOE_QK4_0);
        default: break;
        }
    }
    if (level >= SIMD_AVX2) {
        switch (t) {
        case MOE_DTYPE_F32: return dot_f32_avx2(w, act, n);
        case MOE_DTYPE_F16: return dot_f16_avx2(w, act, n);
        case MOE_DTYPE_Q8_0: return dot_q8_0_avx2(w, act, n / MOE_QK8_0);
        case MOE_DTYPE_Q4_0: return dot_q4_0_avx2(w, act, n / MOE_QK4_0);
        case MOE_DTYPE_Q4_K: return dot_q4_k_avx2(w, act, n / MOE_QK_K);
        case MOE_DTYPE_Q6_K: return dot_q6_k_avx2(w, act, n / MOE_QK_K);
        default: break;
        }
    }
#endif
    switch (t) {
    case MOE_DTYPE_F32: return dot_f32(w, act, n);
    case MOE_DTYPE_F16: return dot_f16(w, act, n);
    case MOE_DTYPE_BF16: return dot_bf16(w, act, n);
    case MOE_DTYPE_Q8_0: return dot_q8_0(w, act, n / MOE_QK8_0);
    case MOE_DTYPE_Q4_0: return dot_q4_0(w, act, n / MOE_QK4_0);
    case MOE_DTYPE_Q4_1: return dot_q4_1(w, act, n / MOE_QK4_1);
    case MOE_DTYPE_Q5_0: return dot_q5_0(w, act, n / MOE_QK5_0);
    case MOE_DTYPE_Q5_1: return dot_q5_1(w, act, n / MOE_QK5_1);
    case MOE_DTYPE_IQ4_NL: return dot_iq4_nl(w, act, n / MOE_QK4_NL);
    case MOE_DTYPE_MXFP4: return dot_mxfp4(w, act, n / MOE_QK_MXFP4);
    case MOE_DTYPE_Q2_K: return dot_q2_k(w, act, n / MOE_QK_K);
    case MOE_DTYPE_Q3_K: return dot_q3_k(w, act, n / MOE_QK_K);
    case MOE_DTYPE_Q4_K: return dot_q4_k(w, act, n / MOE_QK_K);
    case MOE_DTYPE_Q5_K: return dot_q5_k(w, act, n / MOE_QK_K);
    case MOE_DTYPE_Q6_K: return dot_q6_k(w, act, n / MOE_QK_K);
    default: MOE_ASSERT(0); return 0.0f;
    }
}

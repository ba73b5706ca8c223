/* Row dot products and activation quantization (see vecdot.h).
 *
 * The integer parts of the quantized dot products are exact, so the scalar
 * and AVX2 paths agree on them; they differ only in how the per-block float
 * terms are summed (the AVX2 path keeps 8 lanes, as ggml's does). Weight
 * and activation rows are arrays of kernels/blocks.h's structs. */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "common/dtype.h"
#include "common/error.h"
#include "kernels/blocks.h"
#include "kernels/cpu/vecdot.h"
#include "kernels/cpu/vecdot-impl.h"
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

/* Q4_K's and Q5_K's 12 bytes of scales as 16 bytes: the 8 six-bit scales,
 * then the 8 six-bit minimums (the layout moe_q4k_scale_min reads, done
 * with four word operations). */
static inline void unpack_k_scales(const uint8_t *s, uint32_t out[4])
{
    uint32_t u[3];
    memcpy(u, s, 12);
    const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
    out[0] = u[0] & m6;
    out[1] = (u[2] & m4) | ((u[0] >> 6) & m2) << 4;
    out[2] = u[1] & m6;
    out[3] = ((u[2] >> 4) & m4) | ((u[1] >> 6) & m2) << 4;
}

AVX2 static inline int hsum8_epi32_avx2(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* The floats as the AVX-512 path's (q4_k_rows there): per super-block the
 * exact integer dot T and minimum term M, acc = fma(d * d(y), T, acc),
 * accm = fma(dmin * d(y), M, accm), then acc - accm; gemm.c's AVX2 tile
 * kernel computes the same with one row per lane. */
AVX2 static float dot_q4_k_avx2(const struct moe_block_q4_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float acc = 0.0f, accm = 0.0f;
    const __m256i lowmask = _mm256_set1_epi8(0xf);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q4 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        uint32_t u[4];
        unpack_k_scales(x[i].scales, u);
        const __m128i sm = _mm_loadu_si128((const __m128i *)u);
        /* minimums twice, as 16-bit pairs against bsums' pairs */
        const int msum = hsum8_epi32_avx2(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y[i].bsums),
                                                            _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm))));
        /* the 8 scales as 16-bit words in both halves; scale j spread by a
         * byte shuffle (bytes 2j, 2j + 1 everywhere) */
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        __m256i isum = _mm256_setzero_si256();
        for (int j = 0; j < 8; j += 2) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(q4 + 16 * j));
            const __m256i lo = _mm256_and_si256(raw, lowmask);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lowmask);
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)(q8 + 32 * j));
            const __m256i y1 = _mm256_loadu_si256((const __m256i *)(q8 + 32 * j + 32));
            /* unsigned 4-bit x signed 8-bit: maddubs directly */
            const __m256i s0 = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * j)));
            const __m256i s1 = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (j + 1))));
            __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), s0);
            __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), s1);
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
        }
        acc = __builtin_fmaf(hf(x[i].d) * y[i].d, (float)hsum8_epi32_avx2(isum), acc);
        accm = __builtin_fmaf(hf(x[i].dmin) * y[i].d, (float)msum, accm);
    }
    return acc - accm;
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

AVX2 static float dot_bf16_avx2(const uint16_t *w, const uint16_t *x, int64_t n)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + i))), 16));
        const __m256 x0 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i))), 16));
        const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + i + 8))), 16));
        const __m256 x1 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i + 8))), 16));
        a0 = _mm256_fmadd_ps(w0, x0, a0);
        a1 = _mm256_fmadd_ps(w1, x1, a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; i < n; i++)
        s += moe_bf16_to_fp32(w[i]) * moe_bf16_to_fp32(x[i]);
    return s;
}

/* R rows x T tokens of dot_bf16_avx2 (gemm.c's BF16 tile on the AVX2
 * path and where AVX512_BF16 is missing): each pair keeps its two
 * accumulators and gets that function's operations in its order; a row's
 * and a token's halves are widened to floats once per step for all pairs
 * instead of once per pair. */
static inline __attribute__((always_inline, target("avx2,fma,f16c"))) __m256 bf16x8(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

AVX2 static inline __attribute__((always_inline)) void bf16_tile_avx2(const uint16_t *w, size_t ws, const uint16_t *x,
                                                                      size_t xs, int64_t n, const int R, const int T,
                                                                      float *y, int64_t ldy)
{
    __m256 a0[2][2], a1[2][2];
    _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 2") for (int t = 0; t < T; t++)
            a0[r][t] = a1[r][t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 w0[2], w1[2];
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {
            w0[r] = bf16x8(w + r * ws + i);
            w1[r] = bf16x8(w + r * ws + i + 8);
        }
        _Pragma("GCC unroll 2") for (int t = 0; t < T; t++) {
            const __m256 x0 = bf16x8(x + t * xs + i), x1 = bf16x8(x + t * xs + i + 8);
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {
                a0[r][t] = _mm256_fmadd_ps(w0[r], x0, a0[r][t]);
                a1[r][t] = _mm256_fmadd_ps(w1[r], x1, a1[r][t]);
            }
        }
    }
    _Pragma("GCC unroll 2") for (int t = 0; t < T; t++)
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {
            float s = hsum8(_mm256_add_ps(a0[r][t], a1[r][t]));
            for (int64_t k = i; k < n; k++)
                s += moe_bf16_to_fp32(w[r * ws + k]) * moe_bf16_to_fp32(x[t * xs + k]);
            y[t * ldy + r] = s;
        }
}

#define BF16_TILE2(R, T) bf16_tile_avx2(w + (size_t)r * ws, ws, x + (size_t)t * xs, xs, n, R, T, y + t * ldy + r, ldy)
AVX2 static void tile_bf16_avx2(const uint16_t *w, size_t ws, int nr, const uint16_t *x, size_t xs, int64_t n_tok,
                                int64_t n, float *y, int64_t ldy)
{
    for (int r = 0; r < nr; r += 2) {
        int64_t t = 0;
        if (nr - r >= 2) {
            for (; t + 2 <= n_tok; t += 2)
                BF16_TILE2(2, 2);
            if (t < n_tok)
                BF16_TILE2(2, 1);
        } else {
            for (; t + 2 <= n_tok; t += 2)
                BF16_TILE2(1, 2);
            if (t < n_tok)
                BF16_TILE2(1, 1);
        }
    }
}

/* Codes 0..15 of a 32-element block (low nibbles, then high) looked up in a
 * 16-entry signed grid (IQ4_NL, MXFP4): one byte shuffle. */
AVX2 static inline __m256i grid32(const uint8_t *q, __m256i grid)
{
    const __m128i raw = _mm_loadu_si128((const __m128i *)q);
    const __m256i idx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0xf));
    return _mm256_shuffle_epi8(grid, idx);
}

AVX2 static float dot_iq4_nl_avx2(const struct moe_block_iq4_nl *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    const __m256i grid = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)moe_iq4nl_values));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[i].qs);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(hf(x[i].d) * hf(y[i].d)), mul_sum_i8(grid32(x[i].qs, grid), qy), acc);
    }
    return hsum8(acc);
}

AVX2 static float dot_mxfp4_avx2(const struct moe_block_mxfp4 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    const __m256i grid = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)moe_mxfp4_values));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[i].qs);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(moe_e8m0_half(x[i].e) * hf(y[i].d)),
                              mul_sum_i8(grid32(x[i].qs, grid), qy), acc);
    }
    return hsum8(acc);
}

AVX2 static float dot_q5_k_avx2(const struct moe_block_q5_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    const __m256i lowmask = _mm256_set1_epi8(0xf), one = _mm256_set1_epi8(1);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q4 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        uint32_t u[4];
        unpack_k_scales(x[i].scales, u);
        const uint8_t *sc = (const uint8_t *)u;
        const __m128i sm = _mm_loadu_si128((const __m128i *)u);
        /* minimums times the pair sums of bsums, in 8 lanes */
        const __m256i bs = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y[i].bsums), _mm256_set1_epi16(1));
        const __m256i mp = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)), bs);
        accm = _mm256_fmadd_ps(_mm256_set1_ps(hf(x[i].dmin) * y[i].d), _mm256_cvtepi32_ps(mp), accm);
        const __m256i hb = _mm256_loadu_si256((const __m256i *)x[i].qh);
        __m256i isum = _mm256_setzero_si256();
        for (int j = 0; j < 8; j += 2) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(q4 + 16 * j));
            const __m256i h0 = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(j)), one);
            const __m256i h1 = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(j + 1)), one);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(raw, lowmask), _mm256_slli_epi16(h0, 4));
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), lowmask),
                                               _mm256_slli_epi16(h1, 4));
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)(q8 + 32 * j));
            const __m256i y1 = _mm256_loadu_si256((const __m256i *)(q8 + 32 * j + 32));
            __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_set1_epi16((short)sc[j]));
            __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), _mm256_set1_epi16((short)sc[j + 1]));
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(hf(x[i].d) * y[i].d), _mm256_cvtepi32_ps(isum), acc);
    }
    return hsum8(acc) - hsum8(accm);
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

AVX512 static inline __m256i nibbles32(const uint8_t *q)
{
    const __m128i raw = _mm_loadu_si128((const __m128i *)q);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0xf));
}

/* Four 32-blocks per iteration: the two pairs' integer dots in two vectors,
 * the four blocks' scale products converted together (one F16C conversion
 * per side) and spread over the pairs' lanes by a permute, two
 * accumulators. Per-block scalar scale work was what held the two-block
 * versions below AVX2's speed. */
AVX512 static inline __m128 f16x4(uint16_t a, uint16_t b, uint16_t c, uint16_t d)
{
    return _mm_cvtph_ps(_mm_setr_epi16((short)a, (short)b, (short)c, (short)d, 0, 0, 0, 0));
}

/* The body of a rows function over NT activation rows (act + t * stride):
 * the weights of four blocks and their scales are unpacked once for all
 * tokens; each token's sums are the single-token kernel's. */
#define QUAD_ROWS(WEIGHTS, DOT, DW, TAIL)                                                         \
    const __m512i ia = halves32(0, 1), ib = halves32(2, 3);                                        \
    __m512 acc0[4], acc1[4];                                                                       \
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)                                                                   \
        acc0[t] = acc1[t] = _mm512_setzero_ps();                                                   \
    int64_t i = 0;                                                                                 \
    for (; i + 4 <= nb; i += 4) {                                                                  \
        const __m512i w0 = WEIGHTS(i), w1 = WEIGHTS(i + 2);                                        \
        const __m128 dw = DW(i);                                                                   \
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {                                                             \
            const struct moe_block_q8_0 *y = (const struct moe_block_q8_0 *)(act + (size_t)t * stride); \
            const __m512i v0 = DOT(w0, load2x256(y[i].qs, y[i + 1].qs));                           \
            const __m512i v1 = DOT(w1, load2x256(y[i + 2].qs, y[i + 3].qs));                       \
            const __m512 d4 = _mm512_castps128_ps512(                                              \
                _mm_mul_ps(dw, f16x4(y[i].d, y[i + 1].d, y[i + 2].d, y[i + 3].d)));               \
            acc0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_permutexvar_ps(ia, d4), acc0[t]); \
            acc1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_permutexvar_ps(ib, d4), acc1[t]); \
        }                                                                                          \
    }                                                                                              \
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {                                                                 \
        const struct moe_block_q8_0 *y = (const struct moe_block_q8_0 *)(act + (size_t)t * stride); \
        float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));                           \
        if (i < nb)                                                                                \
            s += TAIL(x + i, y + i, nb - i);                                                       \
        out[t] = s;                                                                                \
    }

#define ROWS_FN(name, wtype) \
    AVX512 static inline __attribute__((always_inline)) void name(const wtype *x, const uint8_t *act, \
                                                                  size_t stride, int64_t nb, const int NT, float *out)

AVX512 static inline __m512i halves32(int lo, int hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(lo)), _mm256_set1_epi32(hi), 1);
}

AVX512 static inline __m512i s8_dot(__m512i w, __m512i yx)
{
    const __mmask64 neg = _mm512_movepi8_mask(w);
    const __m512i sy = _mm512_mask_sub_epi8(yx, neg, _mm512_setzero_si512(), yx);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sy);
}

#define Q8_0_W(k) load2x256(x[k].qs, x[k + 1].qs)
#define HALF_DW(k) f16x4(x[k].d, x[k + 1].d, x[k + 2].d, x[k + 3].d)

ROWS_FN(q8_0_rows, struct moe_block_q8_0)
{
    QUAD_ROWS(Q8_0_W, s8_dot, HALF_DW, dot_q8_0_avx2)
}

AVX512 static float dot_q8_0_avx512(const struct moe_block_q8_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float r;
    q8_0_rows(x, (const uint8_t *)y, 0, nb, 1, &r);
    return r;
}

/* BF16 with AVX512_BF16: dpbf16 multiplies pairs of bf16 exactly and adds
 * them into float lanes (what ggml's AVX512BF16 path does). */
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16,avx2,fma,f16c")))

AVX512BF16 static float dot_bf16_avx512(const uint16_t *w, const uint16_t *x, int64_t n)
{
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32),
                              (__m512bh)_mm512_loadu_si512(x + i + 32));
    }
    for (; i + 32 <= n; i += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    if (i < n)
        s += dot_bf16_avx2(w + i, x + i, n - i);
    return s;
}

/* R weight rows x T activation rows of dot_bf16_avx512 at once (prefill):
 * each pair keeps its own two accumulators and gets exactly the
 * instructions, in the order, that dot_bf16_avx512 runs for it, so every
 * output is that function's float; the rows' and tokens' vectors are loaded
 * once per step for all pairs. w and x hold R and T rows ws and xs elements
 * apart; out[t * os + r]. */
AVX512BF16 static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *w, size_t ws,
                                                                       const uint16_t *x, size_t xs, int64_t n,
                                                                       const int R, const int T, float *out,
                                                                       size_t os, const int PF)
{
    __m512 a0[4][4], a1[4][4];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
            a0[r][t] = a1[r][t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512i wv[4];
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            if (PF) {
                /* the next tile's rows at the same offset: from memory, a
                 * few rows read in step are not streamed ahead by the
                 * hardware as one row is */
                _mm_prefetch((const char *)(w + (r + R) * ws + i), _MM_HINT_T0);
                _mm_prefetch((const char *)(w + (r + R) * ws + i + 32), _MM_HINT_T0);
            }
            wv[r] = _mm512_loadu_si512(w + r * ws + i);
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {
            const __m512i xv = _mm512_loadu_si512(x + t * xs + i);
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
                a0[r][t] = _mm512_dpbf16_ps(a0[r][t], (__m512bh)wv[r], (__m512bh)xv);
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
            wv[r] = _mm512_loadu_si512(w + r * ws + i + 32);
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {
            const __m512i xv = _mm512_loadu_si512(x + t * xs + i + 32);
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
                a1[r][t] = _mm512_dpbf16_ps(a1[r][t], (__m512bh)wv[r], (__m512bh)xv);
        }
    }
    if (i + 32 <= n) {
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
                a0[r][t] = _mm512_dpbf16_ps(a0[r][t], (__m512bh)_mm512_loadu_si512(w + r * ws + i),
                                            (__m512bh)_mm512_loadu_si512(x + t * xs + i));
        i += 32;
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r][t], a1[r][t]));
            if (i < n)
                s += dot_bf16_avx2(w + r * ws + i, x + t * xs + i, n - i);
            out[t * os + r] = s;
        }
}

/* gemm.c's BF16 tile (vecdot-impl.h): tiles of 3 rows x 4 tokens (24
 * accumulators, 3 + 4 loads per 12 products), 4 rows for the last 1-3
 * tokens; the first token group, which reads the rows from memory,
 * prefetches the next tile's rows. */
#define BF16_TILE(R, T) bf16_tile(x + (size_t)r * ws, ws, a + (size_t)t * as, as, n, R, T, y + t * ldy + r, (size_t)ldy, t == 0)
AVX512BF16 static void tile_bf16_avx512(const uint16_t *x, size_t ws, int nr, const uint16_t *a, size_t as,
                                        int64_t n_tok, int64_t n, float *y, int64_t ldy)
{
    int64_t t = 0;
    for (; t + 4 <= n_tok; t += 4) {
        int r = 0;
        for (; r + 3 <= nr; r += 3)
            BF16_TILE(3, 4);
        if (nr - r == 2)
            BF16_TILE(2, 4);
        else if (nr - r == 1)
            BF16_TILE(1, 4);
    }
    const int64_t nt = n_tok - t;
    if (nt == 0)
        return;
    int r = 0;
    for (; r + 4 <= nr; r += 4) {
        switch (nt) {
        case 3: BF16_TILE(4, 3); break;
        case 2: BF16_TILE(4, 2); break;
        default: BF16_TILE(4, 1); break;
        }
    }
    for (; r < nr; r++) {
        switch (nt) {
        case 3: BF16_TILE(1, 3); break;
        case 2: BF16_TILE(1, 2); break;
        default: BF16_TILE(1, 1); break;
        }
    }
}

/* One token (decode): four rows at a time of dot_bf16_avx512 (bf16_tile
 * with T = 1, the next four rows prefetched). One row at a time, every row
 * (4 KiB at n_embd 2048) starts a page the hardware prefetcher has to find
 * again; four rows in step with the next four prefetched stream faster
 * (1 GiB of 2048-wide rows, 1 thread: 11.3 -> 14.2 GB/s). */
AVX512BF16 static void gemv_bf16_avx512(const uint16_t *x, size_t ws, int64_t nr, const uint16_t *a, int64_t n,
                                        float *y)
{
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4)
        bf16_tile(x + (size_t)r * ws, ws, a, 0, n, 4, 1, y + r, 1, 1);
    switch (nr - r) {
    case 3: bf16_tile(x + (size_t)r * ws, ws, a, 0, n, 3, 1, y + r, 1, 0); break;
    case 2: bf16_tile(x + (size_t)r * ws, ws, a, 0, n, 2, 1, y + r, 1, 0); break;
    case 1: bf16_tile(x + (size_t)r * ws, ws, a, 0, n, 1, 1, y + r, 1, 0); break;
    default: break;
    }
}
#endif

#ifdef MOE_X86
static int has_bf16_now(void);
static int simd_avx2_now(void);
#endif

/* + bias[r], after the sum as moe_gemm adds it */
static void tile_bias(float *y, int64_t ldy, int nr, int64_t n_tok, const float *bias)
{
    if (bias != NULL)
        for (int64_t t = 0; t < n_tok; t++)
            for (int r = 0; r < nr; r++)
                y[t * ldy + r] += bias[r];
}

void moe_gemm_tile_bf16(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t act_stride,
                        int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
#ifdef MOE_X86
    if (has_bf16_now()) {
        tile_bf16_avx512((const uint16_t *)w, row_bytes / 2, nr, (const uint16_t *)act, act_stride / 2, n_tok, n, y,
                         ldy);
    } else if (simd_avx2_now()) {
        tile_bf16_avx2((const uint16_t *)w, row_bytes / 2, nr, (const uint16_t *)act, act_stride / 2, n_tok, n, y, ldy);
    } else
#endif
    {
        for (int r = 0; r < nr; r++)
            for (int64_t t = 0; t < n_tok; t++)
                y[t * ldy + r] = moe_vecdot(MOE_DTYPE_BF16, w + (size_t)r * row_bytes, act + (size_t)t * act_stride, n);
    }
    tile_bias(y, ldy, nr, n_tok, bias);
}

#ifdef MOE_X86
/* The 16-bit lanes [lo x16 | hi x16] of a 512-bit vector (shift counts,
 * permute indices). */
AVX512 static inline __m512i halves16(short lo, short hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(lo)), _mm256_set1_epi16(hi), 1);
}

/* Q4_K: 64 codes per step (two groups of 32: the low and the high nibbles
 * of 32 bytes, by a per-half shift of the same bytes), maddubs into pair
 * sums, then dpwssd by the two groups' scales; the minimums come from
 * bsums once per super-block. NT activation rows at a time (prefill: the
 * weight row is unpacked once for up to four tokens).
 *
 * The float sum is defined per super-block, not per vector lane, so that
 * gemm.c's tile kernel (one weight row per lane) gives the same floats:
 * with T the super-block's integer dot (sum of scale x code x q8) and M
 * its integer minimum term (sum of min x block sums), both exact,
 *   acc  = fma(d(w) * d(y), (float)T, acc)
 *   accm = fma(dmin(w) * d(y), (float)M, accm)
 * over the super-blocks in order, and the dot is acc - accm. */
AVX512 static inline int hsum8_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* Lane k of the result: the sum of the 16 lanes of v[k] (and of the 8
 * lanes of m[k] into *mt), for four vectors at once. */
AVX512 static inline void reduce4(const __m512i v[4], const __m256i m[4], __m128i *vt, __m128i *mt)
{
    const __m512i a01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    const __m512i a23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23));
    const __m256i a2 = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
    *vt = _mm_add_epi32(_mm256_castsi256_si128(a2), _mm256_extracti128_si256(a2, 1));
    const __m256i b01 = _mm256_add_epi32(_mm256_unpacklo_epi32(m[0], m[1]), _mm256_unpackhi_epi32(m[0], m[1]));
    const __m256i b23 = _mm256_add_epi32(_mm256_unpacklo_epi32(m[2], m[3]), _mm256_unpackhi_epi32(m[2], m[3]));
    const __m256i bb = _mm256_add_epi32(_mm256_unpacklo_epi64(b01, b23), _mm256_unpackhi_epi64(b01, b23));
    *mt = _mm_add_epi32(_mm256_castsi256_si128(bb), _mm256_extracti128_si256(bb, 1));
}

/* One Q4_K super-block against one Q8_K block: the 16 lanes whose sum is
 * T and the 8 whose sum is M (q4_k_rows). */
AVX512 static inline __attribute__((always_inline)) void q4_k_block(const struct moe_block_q4_k *x,
                                                                    const struct moe_block_q8_k *y, __m512i *isum,
                                                                    __m256i *msum)
{
    const __m512i m4 = _mm512_set1_epi8(0xf), shift = halves16(0, 4);
    uint32_t u[4];
    unpack_k_scales(x->scales, u);
    const __m128i sm = _mm_loadu_si128((const __m128i *)u);
    const __m512i sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
    *msum = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y->bsums), _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm)));
    __m512i acc = _mm512_setzero_si512();
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
        const __m512i q = _mm512_and_si512(
            _mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x->qs + 32 * k))), shift), m4);
        acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(q, _mm512_loadu_si512(y->qs + 64 * k)),
                                  _mm512_permutexvar_epi16(halves16((short)(2 * k), (short)(2 * k + 1)), sc));
    }
    *isum = acc;
}

/* The Q4_K/Q5_K rows kernels for one token (decode): four super-blocks'
 * totals reduced together, then their floats in order, each super-block's
 * acc = fma(d(w) d(y), T, acc) and accm = fma(dmin(w) d(y), M, accm), as
 * the tiles do. BLOCK computes one super-block's integer dot T (a vector of
 * lanes) and minimum term M. */
#define KQ_ROW1(NAME, BT, BLOCK)                                                                    \
    AVX512 static float NAME(const BT *x, const struct moe_block_q8_k *y, int64_t nb)                \
    {                                                                                               \
        float acc = 0.0f, accm = 0.0f;                                                              \
        int64_t i = 0;                                                                              \
        for (; i + 4 <= nb; i += 4) {                                                               \
            __m512i v[4];                                                                           \
            __m256i m[4];                                                                           \
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)                                     \
                BLOCK(&x[i + k], &y[i + k], &v[k], &m[k]);                                          \
            __m128i vt, mt;                                                                         \
            reduce4(v, m, &vt, &mt);                                                                \
            int32_t tt[4], mm[4];                                                                   \
            _mm_storeu_si128((__m128i *)tt, vt);                                                    \
            _mm_storeu_si128((__m128i *)mm, mt);                                                    \
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {                                   \
                acc = __builtin_fmaf(hf(x[i + k].d) * y[i + k].d, (float)tt[k], acc);               \
                accm = __builtin_fmaf(hf(x[i + k].dmin) * y[i + k].d, (float)mm[k], accm);          \
            }                                                                                       \
        }                                                                                           \
        for (; i < nb; i++) {                                                                       \
            __m512i v;                                                                              \
            __m256i m;                                                                              \
            BLOCK(&x[i], &y[i], &v, &m);                                                            \
            acc = __builtin_fmaf(hf(x[i].d) * y[i].d, (float)_mm512_reduce_add_epi32(v), acc);      \
            accm = __builtin_fmaf(hf(x[i].dmin) * y[i].d, (float)hsum8_epi32(m), accm);             \
        }                                                                                           \
        return acc - accm;                                                                          \
    }

KQ_ROW1(q4_k_row1, struct moe_block_q4_k, q4_k_block)

AVX512 static inline __attribute__((always_inline)) void q4_k_rows(const struct moe_block_q4_k *x,
                                                                   const uint8_t *act, size_t stride,
                                                                   int64_t nb, const int NT, float *out)
{
    const __m512i m4 = _mm512_set1_epi8(0xf), shift = halves16(0, 4);
    const __m512i idx0 = halves16(0, 1), idx1 = halves16(2, 3), idx2 = halves16(4, 5), idx3 = halves16(6, 7);
    /* one token: q4_k_row1; several: the tokens' totals reduced together
     * and their floats in the lanes of one vector (lane t = token t: the
     * same scalar operations) */
    if (NT == 1) {
        out[0] = q4_k_row1(x, (const struct moe_block_q8_k *)act, nb);
        return;
    }
    __m128 acc = _mm_setzero_ps(), accm = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q4 = x[i].qs;
        uint32_t u[4];
        unpack_k_scales(x[i].scales, u);
        const __m128i sm = _mm_loadu_si128((const __m128i *)u);
        /* each minimum twice, as 16-bit pairs against bsums' pairs */
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
        const __m512i sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
        const __m512i s0 = _mm512_permutexvar_epi16(idx0, sc), s1 = _mm512_permutexvar_epi16(idx1, sc);
        const __m512i s2 = _mm512_permutexvar_epi16(idx2, sc), s3 = _mm512_permutexvar_epi16(idx3, sc);
        const __m512i q0 = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q4)), shift), m4);
        const __m512i q1 = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(q4 + 32))), shift), m4);
        const __m512i q2 = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(q4 + 64))), shift), m4);
        const __m512i q3 = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(q4 + 96))), shift), m4);
        const float dw = hf(x[i].d), dmw = hf(x[i].dmin);
        __m512i isum[4];
        __m256i msum[4];
        float yd[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const struct moe_block_q8_k *y = (const struct moe_block_q8_k *)(act + (size_t)t * stride) + i;
            const int8_t *q8 = y->qs;
            yd[t] = y->d;
            msum[t] = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y->bsums), mins);
            isum[t] = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(q0, _mm512_loadu_si512(q8)), s0);
            isum[t] = _mm512_dpwssd_epi32(isum[t], _mm512_maddubs_epi16(q1, _mm512_loadu_si512(q8 + 64)), s1);
            isum[t] = _mm512_dpwssd_epi32(isum[t], _mm512_maddubs_epi16(q2, _mm512_loadu_si512(q8 + 128)), s2);
            isum[t] = _mm512_dpwssd_epi32(isum[t], _mm512_maddubs_epi16(q3, _mm512_loadu_si512(q8 + 192)), s3);
        }
        _Pragma("GCC unroll 4") for (int t = NT; t < 4; t++) {
            isum[t] = _mm512_setzero_si512();
            msum[t] = _mm256_setzero_si256();
        }
        __m128i tt, mm;
        reduce4(isum, msum, &tt, &mm);
        const __m128 vyd = _mm_loadu_ps(yd);
        acc = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(dw), vyd), _mm_cvtepi32_ps(tt), acc);
        accm = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(dmw), vyd), _mm_cvtepi32_ps(mm), accm);
    }
    float r[4];
    _mm_storeu_ps(r, _mm_sub_ps(acc, accm));
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        out[t] = r[t];
}

AVX512 static float dot_q4_k_avx512(const struct moe_block_q4_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float r;
    q4_k_rows(x, (const uint8_t *)y, 0, nb, 1, &r);
    return r;
}

/* Q5_K: Q4_K plus the fifth bit: group j's bit j of qh, added as 16 where
 * set (a byte test against [1 << j | 1 << (j + 1)] per half). The floats
 * as Q4_K's (q4_k_rows): per super-block the exact T and M, two fma. */
AVX512 static inline __attribute__((always_inline)) void q5_k_block(const struct moe_block_q5_k *x,
                                                                    const struct moe_block_q8_k *y, __m512i *isum,
                                                                    __m256i *msum)
{
    const __m512i m4 = _mm512_set1_epi8(0xf), shift = halves16(0, 4), sixteen = _mm512_set1_epi8(16);
    uint32_t u[4];
    unpack_k_scales(x->scales, u);
    const __m128i sm = _mm_loadu_si128((const __m128i *)u);
    const __m512i sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
    *msum = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y->bsums), _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm)));
    const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x->qh));
    __m512i acc = _mm512_setzero_si512();
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
        const __m512i bit = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi8((char)(1 << (2 * k)))),
                                               _mm256_set1_epi8((char)(1 << (2 * k + 1))), 1);
        __m512i q = _mm512_and_si512(
            _mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x->qs + 32 * k))), shift), m4);
        q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(hb, bit), q, sixteen);
        acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(q, _mm512_loadu_si512(y->qs + 64 * k)),
                                  _mm512_permutexvar_epi16(halves16((short)(2 * k), (short)(2 * k + 1)), sc));
    }
    *isum = acc;
}

KQ_ROW1(q5_k_row1, struct moe_block_q5_k, q5_k_block)

AVX512 static inline __attribute__((always_inline)) void q5_k_rows(const struct moe_block_q5_k *x,
                                                                   const uint8_t *act, size_t stride,
                                                                   int64_t nb, const int NT, float *out)
{
    if (NT == 1) {
        out[0] = q5_k_row1(x, (const struct moe_block_q8_k *)act, nb);
        return;
    }
    __m128 acc = _mm_setzero_ps(), accm = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i isum[4];
        __m256i msum[4];
        float yd[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const struct moe_block_q8_k *y = (const struct moe_block_q8_k *)(act + (size_t)t * stride) + i;
            yd[t] = y->d;
            q5_k_block(&x[i], y, &isum[t], &msum[t]);
        }
        _Pragma("GCC unroll 4") for (int t = NT; t < 4; t++) {
            isum[t] = _mm512_setzero_si512();
            msum[t] = _mm256_setzero_si256();
        }
        __m128i tt, mm;
        reduce4(isum, msum, &tt, &mm);
        const __m128 vyd = _mm_loadu_ps(yd);
        acc = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(hf(x[i].d)), vyd), _mm_cvtepi32_ps(tt), acc);
        accm = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(hf(x[i].dmin)), vyd), _mm_cvtepi32_ps(mm), accm);
    }
    float r[4];
    _mm_storeu_ps(r, _mm_sub_ps(acc, accm));
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        out[t] = r[t];
}

AVX512 static float dot_q5_k_avx512(const struct moe_block_q5_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float r;
    q5_k_rows(x, (const uint8_t *)y, 0, nb, 1, &r);
    return r;
}

/* Q6_K: per 128 elements, 64 bytes of ql give codes 0..63 and 64..127 (low
 * and high nibbles), qh's bit pairs are shifted per half; maddubs then
 * dpwssd by the four 16-element groups' scales; C = sum(scale * bsum)
 * carries the -32. NT activation rows at a time, as q4_k_rows.
 *
 * The float sum, as Q4_K's, per super-block: with T the integer dot of
 * the codes 0..63 and S = T - 32 C (the exact dot of the signed codes),
 * acc = fma(d(w) * d(y), (float)S, acc) over the super-blocks in order
 * (gemm.c's tile kernel computes the same S one row per lane). */
/* The 16-bit permute indices that spread scales 4k..4k+3 over the lanes
 * of the codes of part k. */
AVX512 static inline void q6_k_idx(__m512i idx[4])
{
    for (int k = 0; k < 4; k++)
        idx[k] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16((short)(4 * k + 1)), _mm_set1_epi16((short)(4 * k)))),
            _mm256_set_m128i(_mm_set1_epi16((short)(4 * k + 3)), _mm_set1_epi16((short)(4 * k + 2))), 1);
}

AVX512 static inline __attribute__((always_inline)) void q6_k_unpack(const struct moe_block_q6_k *x, const __m512i idx[4],
                                                                     __m512i q[4], __m512i s[4], __m256i *sc16)
{
    const __m512i m4 = _mm512_set1_epi8(0xf), m2 = _mm512_set1_epi8(3);
    const __m512i sh01 = halves16(0, 2), sh23 = halves16(4, 6);
    *sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x->scales));
    const __m512i sc = _mm512_castsi256_si512(*sc16);
    _Pragma("GCC unroll 2") for (int n = 0; n < 2; n++) {
        const __m512i l = _mm512_loadu_si512(x->ql + 64 * n);
        const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x->qh + 32 * n)));
        const __m512i h01 = _mm512_and_si512(_mm512_srlv_epi16(h, sh01), m2);
        const __m512i h23 = _mm512_and_si512(_mm512_srlv_epi16(h, sh23), m2);
        q[2 * n] = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_slli_epi16(h01, 4));
        q[2 * n + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4), _mm512_slli_epi16(h23, 4));
        s[2 * n] = _mm512_permutexvar_epi16(idx[2 * n], sc);
        s[2 * n + 1] = _mm512_permutexvar_epi16(idx[2 * n + 1], sc);
    }
}

AVX512 static inline __attribute__((always_inline)) void q6_k_dot(const __m512i q[4], const __m512i s[4], __m256i sc16,
                                                                  const struct moe_block_q8_k *y, __m512i *isum,
                                                                  __m256i *corr)
{
    *corr = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)y->bsums));
    __m512i v = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(q[0], _mm512_loadu_si512(y->qs)), s[0]);
    v = _mm512_dpwssd_epi32(v, _mm512_maddubs_epi16(q[1], _mm512_loadu_si512(y->qs + 64)), s[1]);
    v = _mm512_dpwssd_epi32(v, _mm512_maddubs_epi16(q[2], _mm512_loadu_si512(y->qs + 128)), s[2]);
    *isum = _mm512_dpwssd_epi32(v, _mm512_maddubs_epi16(q[3], _mm512_loadu_si512(y->qs + 192)), s[3]);
}

/* q6_k_rows for one token: four super-blocks reduced together. */
AVX512 static float q6_k_row1(const struct moe_block_q6_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    __m512i idx[4];
    q6_k_idx(idx);
    float acc = 0.0f;
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        __m512i v[4];
        __m256i c[4];
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
            __m512i q[4], s[4];
            __m256i sc16;
            q6_k_unpack(&x[i + k], idx, q, s, &sc16);
            q6_k_dot(q, s, sc16, &y[i + k], &v[k], &c[k]);
        }
        __m128i vt, ct;
        reduce4(v, c, &vt, &ct);
        int32_t st[4];
        _mm_storeu_si128((__m128i *)st, _mm_sub_epi32(vt, _mm_slli_epi32(ct, 5)));
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)
            acc = __builtin_fmaf(hf(x[i + k].d) * y[i + k].d, (float)st[k], acc);
    }
    for (; i < nb; i++) {
        __m512i q[4], s[4], v;
        __m256i sc16, c;
        q6_k_unpack(&x[i], idx, q, s, &sc16);
        q6_k_dot(q, s, sc16, &y[i], &v, &c);
        acc = __builtin_fmaf(hf(x[i].d) * y[i].d, (float)(_mm512_reduce_add_epi32(v) - 32 * hsum8_epi32(c)), acc);
    }
    return acc;
}

AVX512 static inline __attribute__((always_inline)) void q6_k_rows(const struct moe_block_q6_k *x,
                                                                   const uint8_t *act, size_t stride,
                                                                   int64_t nb, const int NT, float *out)
{
    if (NT == 1) {
        out[0] = q6_k_row1(x, (const struct moe_block_q8_k *)act, nb);
        return;
    }
    __m512i idx[4];
    q6_k_idx(idx);
    __m128 acc = _mm_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i q[4], s[4];
        __m256i sc16;
        q6_k_unpack(&x[i], idx, q, s, &sc16);
        __m512i isum[4];
        __m256i corr[4];
        float yd[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const struct moe_block_q8_k *y = (const struct moe_block_q8_k *)(act + (size_t)t * stride) + i;
            yd[t] = y->d;
            q6_k_dot(q, s, sc16, y, &isum[t], &corr[t]);
        }
        _Pragma("GCC unroll 4") for (int t = NT; t < 4; t++) {
            isum[t] = _mm512_setzero_si512();
            corr[t] = _mm256_setzero_si256();
        }
        __m128i tt, ct;
        reduce4(isum, corr, &tt, &ct);
        acc = _mm_fmadd_ps(_mm_mul_ps(_mm_set1_ps(hf(x[i].d)), _mm_loadu_ps(yd)),
                           _mm_cvtepi32_ps(_mm_sub_epi32(tt, _mm_slli_epi32(ct, 5))), acc);
    }
    float r[4];
    _mm_storeu_ps(r, acc);
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        out[t] = r[t];
}

AVX512 static float dot_q6_k_avx512(const struct moe_block_q6_k *x, const struct moe_block_q8_k *y, int64_t nb)
{
    float r;
    q6_k_rows(x, (const uint8_t *)y, 0, nb, 1, &r);
    return r;
}

/* IQ4_NL and MXFP4: two blocks per vector, the codes looked up in the grid
 * by a byte shuffle, then the signed x signed dot as for Q8_0. */
AVX512 static inline __m512i grid64(const uint8_t *q0, const uint8_t *q1, __m512i grid)
{
    const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(nibbles32(q0)), nibbles32(q1), 1);
    return _mm512_shuffle_epi8(grid, idx);
}

#define IQ4_W(k) grid64(x[k].qs, x[k + 1].qs, grid)
#define MX_DW(k) _mm_setr_ps(moe_e8m0_half(x[k].e), moe_e8m0_half(x[k + 1].e), moe_e8m0_half(x[k + 2].e), \
                             moe_e8m0_half(x[k + 3].e))

ROWS_FN(mxfp4_rows, struct moe_block_mxfp4)
{
    const __m512i grid = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)moe_mxfp4_values));
    QUAD_ROWS(IQ4_W, s8_dot, MX_DW, dot_mxfp4_avx2)
}

/* Q4_0 and IQ4_NL (18-byte blocks: f16 d, 16 bytes of codes) x Q8_0.
 *
 * The float sum is defined per block, in four chains, so that gemm.c's
 * tile kernel (one weight row per vector lane) gives the same floats: with
 * T_b block b's integer dot (exact) and s_b = d(w_b) * d(y_b) (a float
 * product), chain c = b mod 4 runs acc_c = fma(s_b, (float)T_b, acc_c) over
 * its blocks in order, and the dot is (acc_0 + acc_2) + (acc_1 + acc_3).
 * Eight (then four) blocks per step: their T reduced together into the
 * lanes of one vector (lane c of each half = chain c), one multiply and
 * one fma per four blocks and token. IQ4_NL's block has Q4_0's layout;
 * its codes index the grid. */
static_assert(sizeof(struct moe_block_iq4_nl) == sizeof(struct moe_block_q4_0) &&
                  offsetof(struct moe_block_iq4_nl, qs) == offsetof(struct moe_block_q4_0, qs),
              "IQ4_NL's block is laid out as Q4_0's");
AVX512 static inline __m512i q4c_codes2(const uint8_t *q0, const uint8_t *q1, int iq4, __m512i grid)
{
    const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(nibbles32(q0)), nibbles32(q1), 1);
    return iq4 ? _mm512_shuffle_epi8(grid, idx) : idx;
}

/* [T_0, T_1, T_2, T_3] from the lanes of two blocks per vector (v0: blocks
 * 0 and 1, v1: 2 and 3; eight lanes each). */
AVX512 static inline __m128i q4c_sum4(__m512i v0, __m512i v1)
{
    const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi64(v0, v1), _mm512_unpackhi_epi64(v0, v1));
    const __m512i b = _mm512_add_epi32(a, _mm512_shuffle_epi32(a, _MM_PERM_CDAB));
    const __m512i c = _mm512_add_epi32(b, _mm512_shuffle_i32x4(b, b, _MM_SHUFFLE(2, 3, 0, 1)));
    /* c: dword 0 = T_0, 2 = T_2, 8 = T_1, 10 = T_3 */
    return _mm512_castsi512_si128(_mm512_permutexvar_epi32(_mm512_setr_epi32(0, 8, 2, 10, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                              0, 0, 0, 0), c));
}

/* [T_0 .. T_7] from four vectors of two blocks each (v[k]: blocks 2k and
 * 2k + 1). */
AVX512 static inline __m256i q4c_sum8(const __m512i v[4])
{
    const __m512i a01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    const __m512i a23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    /* 128-bit lane L: dword e = v[e]'s sum over lane L */
    const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23));
    /* lane 0: T_0, T_2, T_4, T_6; lane 2: T_1, T_3, T_5, T_7 */
    const __m512i c = _mm512_add_epi32(a, _mm512_shuffle_i32x4(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_castsi512_si256(_mm512_permutexvar_epi32(_mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 0, 0, 0,
                                                                              0, 0, 0, 0), c));
}

/* the f16 scales of eight blocks */
#define Q4C_D8(b) _mm256_cvtph_ps(_mm_setr_epi16((short)(b)[0].d, (short)(b)[1].d, (short)(b)[2].d, (short)(b)[3].d, \
                                                 (short)(b)[4].d, (short)(b)[5].d, (short)(b)[6].d, (short)(b)[7].d))

/* The same eight scales from two 64-byte loads and one word permute
 * (their d fields lie in the group's first 128 bytes, 9 words apart)
 * instead of eight loads and seven inserts (q4c_gemv's rows, 1 GiB of
 * 2048-wide Q4_0 rows, 1 thread: 9.4-9.5 -> 10.3-10.5 GB/s). */
AVX512 static inline __m256 q4c_d8_rows(const struct moe_block_q4_0 *b)
{
    static_assert(sizeof(struct moe_block_q4_0) == 18 && offsetof(struct moe_block_q4_0, d) == 0,
                  "Q4_0/IQ4_NL block: f16 d first, 18 bytes");
    const __m512i idx = _mm512_zextsi128_si512(_mm_setr_epi16(0, 9, 18, 27, 36, 45, 54, 63));
    const __m512i h = _mm512_permutex2var_epi16(_mm512_loadu_si512(b), idx,
                                                _mm512_loadu_si512((const uint8_t *)b + 64));
    return _mm256_cvtph_ps(_mm512_castsi512_si128(h));
}

/* one block's exact integer dot (the chains' tail) */
static inline int q4c_block_dot(const struct moe_block_q4_0 *x, const struct moe_block_q8_0 *y, int iq4)
{
    int sumi = 0;
    for (int j = 0; j < MOE_QK4_0 / 2; j++) {
        const int lo = iq4 ? moe_iq4nl_values[x->qs[j] & 0xf] : (x->qs[j] & 0xf) - 8;
        const int hi = iq4 ? moe_iq4nl_values[x->qs[j] >> 4] : (x->qs[j] >> 4) - 8;
        sumi += lo * y->qs[j] + hi * y->qs[j + 16];
    }
    return sumi;
}

AVX512 static inline __attribute__((always_inline)) void q4c_rows(const struct moe_block_q4_0 *x, int iq4,
                                                                  const uint8_t *act, size_t stride, int64_t nb,
                                                                  const int NT, float *out)
{
    const __m512i grid = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)moe_iq4nl_values));
    const __m512i eight = _mm512_set1_epi8(8);
    __m128 acc[4];
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        acc[t] = _mm_setzero_ps();
    int64_t i = 0;
    /* eight blocks per step: chain c takes block i + c, then i + 4 + c */
    for (; i + 8 <= nb; i += 8) {
        __m512i w[4];
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)
            w[k] = q4c_codes2(x[i + 2 * k].qs, x[i + 2 * k + 1].qs, iq4, grid);
        const __m256 dw = Q4C_D8(x + i);
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const struct moe_block_q8_0 *y = (const struct moe_block_q8_0 *)(act + (size_t)t * stride) + i;
            __m512i v[4];
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                const __m512i yy = load2x256(y[2 * k].qs, y[2 * k + 1].qs);
                v[k] = iq4 ? s8_dot(w[k], yy)
                           : _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w[k], yy),
                                              _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, yy));
            }
            const __m256 s = _mm256_mul_ps(dw, Q4C_D8(y));
            const __m256 tf = _mm256_cvtepi32_ps(q4c_sum8(v));
            acc[t] = _mm_fmadd_ps(_mm256_castps256_ps128(s), _mm256_castps256_ps128(tf), acc[t]);
            acc[t] = _mm_fmadd_ps(_mm256_extractf128_ps(s, 1), _mm256_extractf128_ps(tf, 1), acc[t]);
        }
    }
    for (; i + 4 <= nb; i += 4) {
        const __m512i w0 = q4c_codes2(x[i].qs, x[i + 1].qs, iq4, grid);
        const __m512i w1 = q4c_codes2(x[i + 2].qs, x[i + 3].qs, iq4, grid);
        const __m128 dw = f16x4(x[i].d, x[i + 1].d, x[i + 2].d, x[i + 3].d);
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const struct moe_block_q8_0 *y = (const struct moe_block_q8_0 *)(act + (size_t)t * stride) + i;
            const __m512i y0 = load2x256(y[0].qs, y[1].qs), y1 = load2x256(y[2].qs, y[3].qs);
            __m512i v0, v1;
            if (iq4) {
                v0 = s8_dot(w0, y0);
                v1 = s8_dot(w1, y1);
            } else {
                /* unsigned codes: sum(q * y) - 8 * sum(y) */
                v0 = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, y0),
                                      _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, y0));
                v1 = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, y1),
                                      _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, y1));
            }
            const __m128 s = _mm_mul_ps(dw, f16x4(y[0].d, y[1].d, y[2].d, y[3].d));
            acc[t] = _mm_fmadd_ps(s, _mm_cvtepi32_ps(q4c_sum4(v0, v1)), acc[t]);
        }
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
        const struct moe_block_q8_0 *y = (const struct moe_block_q8_0 *)(act + (size_t)t * stride);
        float a[4];
        _mm_storeu_ps(a, acc[t]);
        for (int64_t j = i; j < nb; j++)
            a[j & 3] = __builtin_fmaf(hf(x[j].d) * hf(y[j].d), (float)q4c_block_dot(&x[j], &y[j], iq4), a[j & 3]);
        out[t] = (a[0] + a[2]) + (a[1] + a[3]);
    }
}

/* One token against up to four rows at a time (decode through moe_gemm):
 * q4c_rows' operations per row, with the token's blocks, their scales and
 * (Q4_0) 8 x their sums loaded once for the four rows. */
AVX512 static inline __attribute__((always_inline)) void q4c_gemv(const uint8_t *w, size_t row_bytes, int64_t n_rows,
                                                                  const uint8_t *act, int64_t n, float *y,
                                                                  const float *bias, int iq4)
{
    const __m512i grid = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)moe_iq4nl_values));
    const __m512i eight = _mm512_set1_epi8(8);
    const struct moe_block_q8_0 *yb = (const struct moe_block_q8_0 *)act;
    const int64_t nb = n / MOE_QK4_0;
    for (int64_t r0 = 0; r0 < n_rows; r0 += 4) {
        const int nr = n_rows - r0 < 4 ? (int)(n_rows - r0) : 4;
        const struct moe_block_q4_0 *x[4];
        for (int k = 0; k < 4; k++)
            x[k] = (const struct moe_block_q4_0 *)(w + (size_t)(r0 + (k < nr ? k : 0)) * row_bytes);
        __m128 acc[4] = { _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps() };
        int64_t i = 0;
        for (; i + 8 <= nb; i += 8) {
            __m512i yy[4], e[4];
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
                yy[j] = load2x256(yb[i + 2 * j].qs, yb[i + 2 * j + 1].qs);
                /* -8 * sum(y) per lane: the dpbusd below starts from it */
                if (!iq4)
                    e[j] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, yy[j]));
            }
            const __m256 dy = Q4C_D8(yb + i);
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                if (k >= nr)
                    break;
                {
                    /* the rows two groups ahead: four rows in step are not
                     * streamed ahead by the hardware as one row is */
                    const char *nx = (const char *)(w + (size_t)(r0 + 8 + k) * row_bytes) + (size_t)i * sizeof(x[0][0]);
                    _mm_prefetch(nx, _MM_HINT_T0);
                    _mm_prefetch(nx + 64, _MM_HINT_T0);
                    _mm_prefetch(nx + 128, _MM_HINT_T0);
                }
                __m512i v[4];
                _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
                    const __m512i wq = q4c_codes2(x[k][i + 2 * j].qs, x[k][i + 2 * j + 1].qs, iq4, grid);
                    v[j] = iq4 ? s8_dot(wq, yy[j]) : _mm512_dpbusd_epi32(e[j], wq, yy[j]);
                }
                const __m256 sc = _mm256_mul_ps(q4c_d8_rows(x[k] + i), dy);
                const __m256 tf = _mm256_cvtepi32_ps(q4c_sum8(v));
                acc[k] = _mm_fmadd_ps(_mm256_castps256_ps128(sc), _mm256_castps256_ps128(tf), acc[k]);
                acc[k] = _mm_fmadd_ps(_mm256_extractf128_ps(sc, 1), _mm256_extractf128_ps(tf, 1), acc[k]);
            }
        }
        for (int k = 0; k < nr; k++) {
            /* the rest as q4c_rows: four blocks, then one at a time */
            int64_t j = i;
            for (; j + 4 <= nb; j += 4) {
                const __m512i w0 = q4c_codes2(x[k][j].qs, x[k][j + 1].qs, iq4, grid);
                const __m512i w1 = q4c_codes2(x[k][j + 2].qs, x[k][j + 3].qs, iq4, grid);
                const __m512i y0 = load2x256(yb[j].qs, yb[j + 1].qs), y1 = load2x256(yb[j + 2].qs, yb[j + 3].qs);
                __m512i v0, v1;
                if (iq4) {
                    v0 = s8_dot(w0, y0);
                    v1 = s8_dot(w1, y1);
                } else {
                    v0 = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, y0),
                                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, y0));
                    v1 = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, y1),
                                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, y1));
                }
                const __m128 sc = _mm_mul_ps(f16x4(x[k][j].d, x[k][j + 1].d, x[k][j + 2].d, x[k][j + 3].d),
                                             f16x4(yb[j].d, yb[j + 1].d, yb[j + 2].d, yb[j + 3].d));
                acc[k] = _mm_fmadd_ps(sc, _mm_cvtepi32_ps(q4c_sum4(v0, v1)), acc[k]);
            }
            float a[4];
            _mm_storeu_ps(a, acc[k]);
            for (; j < nb; j++)
                a[j & 3] = __builtin_fmaf(hf(x[k][j].d) * hf(yb[j].d), (float)q4c_block_dot(&x[k][j], &yb[j], iq4),
                                          a[j & 3]);
            const float r = (a[0] + a[2]) + (a[1] + a[3]);
            y[r0 + k] = bias ? r + bias[r0 + k] : r;
        }
    }
}

AVX512 void moe_gemm_gemv_q4_0(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n,
                               float *y, const float *bias)
{
    q4c_gemv(w, row_bytes, n_rows, act, n, y, bias, 0);
}

AVX512 void moe_gemm_gemv_iq4_nl(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n,
                                 float *y, const float *bias)
{
    q4c_gemv(w, row_bytes, n_rows, act, n, y, bias, 1);
}

ROWS_FN(q4_0_rows, struct moe_block_q4_0)
{
    q4c_rows(x, 0, act, stride, nb, NT, out);
}

ROWS_FN(iq4_nl_rows, struct moe_block_iq4_nl)
{
    q4c_rows((const struct moe_block_q4_0 *)x, 1, act, stride, nb, NT, out);
}

AVX512 static float dot_q4_0_avx512(const struct moe_block_q4_0 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float r;
    q4_0_rows(x, (const uint8_t *)y, 0, nb, 1, &r);
    return r;
}

AVX512 static float dot_iq4_nl_avx512(const struct moe_block_iq4_nl *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float r;
    iq4_nl_rows(x, (const uint8_t *)y, 0, nb, 1, &r);
    return r;
}

AVX512 static float dot_mxfp4_avx512(const struct moe_block_mxfp4 *x, const struct moe_block_q8_0 *y, int64_t nb)
{
    float r;
    mxfp4_rows(x, (const uint8_t *)y, 0, nb, 1, &r);
    return r;
}

/* Q8_0 and MXFP4 tiles for gemm.c (vecdot-impl.h): R weight rows x T
 * tokens of QUAD_ROWS, each pair's floats computed by the same operations
 * in the same order as dot_q8_0_avx512 / dot_mxfp4_avx512 (the rows
 * kernels with NT = 1). What is shared moves out of the pairs: a row's
 * weights and scales are unpacked, and a token's blocks loaded and its
 * scales converted, once per step for all pairs. The integer dot is
 * dpbusd(y + 128, w) started at -128 * sum(w), the exact sum(w * y) that
 * s8_dot gives (activations are within +-127), without s8_dot's sign
 * flip per pair. */
#define QUAD_TILE(WEIGHTS, TAIL, wtype)                                                            \
    const __m512i ia = halves32(0, 1), ib = halves32(2, 3), x80 = _mm512_set1_epi8((char)0x80);    \
    const __m512i zero = _mm512_setzero_si512();                                                   \
    __m512 acc0[2][4], acc1[2][4];                                                                 \
    _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)                                            \
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)                                        \
            acc0[r][t] = acc1[r][t] = _mm512_setzero_ps();                                         \
    int64_t i = 0;                                                                                 \
    for (; i + 4 <= nb; i += 4) {                                                                  \
        __m512i w0[2], w1[2], n0[2], n1[2];                                                        \
        __m128 dw[2];                                                                              \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {                                      \
            const wtype *x = (const wtype *)(w + (size_t)r * rb);                                  \
            if (PF) {                                                                              \
                const char *nx = (const char *)(x + i) + (size_t)R * rb;                           \
                _mm_prefetch(nx, _MM_HINT_T0);                                                     \
                _mm_prefetch(nx + 64, _MM_HINT_T0);                                                \
                if (4 * sizeof(wtype) > 128)                                                       \
                    _mm_prefetch(nx + 128, _MM_HINT_T0);                                           \
            }                                                                                      \
            w0[r] = WEIGHTS(i);                                                                    \
            w1[r] = WEIGHTS(i + 2);                                                                \
            dw[r] = _mm_loadu_ps(dws + (size_t)r * nb + i);                                        \
            n0[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, x80, w0[r]));                 \
            n1[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, x80, w1[r]));                 \
        }                                                                                          \
        _Pragma("GCC unroll 4") for (int t = 0; t < T; t++) {                                      \
            const struct moe_block_q8_0 *yb = (const struct moe_block_q8_0 *)(act + (size_t)t * as); \
            const __m512i y0 = _mm512_xor_si512(load2x256(yb[i].qs, yb[i + 1].qs), x80);           \
            const __m512i y1 = _mm512_xor_si512(load2x256(yb[i + 2].qs, yb[i + 3].qs), x80);       \
            const __m128 dy = _mm_loadu_ps(dys + (size_t)t * nb + i);                               \
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {                                  \
                const __m512i v0 = _mm512_dpbusd_epi32(n0[r], y0, w0[r]);                          \
                const __m512i v1 = _mm512_dpbusd_epi32(n1[r], y1, w1[r]);                          \
                const __m512 d4 = _mm512_castps128_ps512(_mm_mul_ps(dw[r], dy));                   \
                acc0[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_permutexvar_ps(ia, d4), acc0[r][t]); \
                acc1[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_permutexvar_ps(ib, d4), acc1[r][t]); \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    _Pragma("GCC unroll 4") for (int t = 0; t < T; t++)                                            \
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {                                      \
            const wtype *x = (const wtype *)(w + (size_t)r * rb);                                  \
            const struct moe_block_q8_0 *yb = (const struct moe_block_q8_0 *)(act + (size_t)t * as); \
            float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r][t], acc1[r][t]));                 \
            if (i < nb)                                                                            \
                s += TAIL(x + i, yb + i, nb - i);                                                  \
            y[t * ldy + r] = s;                                                                    \
        }

#define QUAD_TILE_FN(name)                                                                         \
    AVX512 static inline __attribute__((always_inline)) void name(const uint8_t *w, size_t rb, const uint8_t *act, \
                                                                  size_t as, int64_t nb, const int R, const int T, \
                                                                  float *y, int64_t ldy, const float *dws,     \
                                                                  const float *dys, const int PF)

QUAD_TILE_FN(q8_0_tile)
{
    QUAD_TILE(Q8_0_W, dot_q8_0_avx2, struct moe_block_q8_0)
}

QUAD_TILE_FN(mxfp4_tile)
{
    const __m512i grid = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)moe_mxfp4_values));
    QUAD_TILE(IQ4_W, dot_mxfp4_avx2, struct moe_block_mxfp4)
}

/* The blocks' scales as floats, converted once per tile call rather than
 * once per (row pair, token group, step): the tokens' for a chunk of
 * tokens, each row pair's for all of them (the same values the rows
 * kernels convert, so the products are the same). */
#define QUAD_SCALES 8192
#define QUAD_MAX_NB 2048
AVX512 static inline float q8_0_scale(const struct moe_block_q8_0 *b)
{
    return hf(b->d);
}

AVX512 static inline float mxfp4_scale(const struct moe_block_mxfp4 *b)
{
    return moe_e8m0_half(b->e);
}

/* 2 rows x 4 tokens per call (16 accumulators, 6 registers of unpacked
 * rows), then the last 1-3 tokens, then an odd row; the first token
 * group, which reads the rows from memory, prefetches the next pair's. */
#define QUAD_TILE_CALL(fn, R, T) fn(w + (size_t)r * rb, rb, act + (size_t)t * as, as, nb, R, T, y + t * ldy + r, ldy, dws, dys + (size_t)(t - t0) * nb, t == 0)
#define QUAD_TILE_DRIVER(name, fn, wtype, dtype, wscale)                                                   \
    AVX512 static void name(const uint8_t *w, size_t rb, int nr, const uint8_t *act, size_t as, int64_t n_tok, \
                            int64_t nb, float *y, int64_t ldy)                                      \
    {                                                                                               \
        if (nb > QUAD_MAX_NB) {                                                                     \
            for (int r = 0; r < nr; r++)                                                            \
                for (int64_t t = 0; t < n_tok; t++)                                                 \
                    y[t * ldy + r] = moe_vecdot(dtype, w + (size_t)r * rb, act + (size_t)t * as, nb * 32); \
            return;                                                                                 \
        }                                                                                           \
        float dys[QUAD_SCALES], dws[2 * QUAD_MAX_NB];                                               \
        const int64_t chunk = QUAD_SCALES / nb;                                                     \
        for (int64_t t0 = 0; t0 < n_tok; t0 += chunk) {                                             \
            const int64_t t1 = t0 + chunk < n_tok ? t0 + chunk : n_tok;                             \
            for (int64_t t = t0; t < t1; t++) {                                                     \
                const struct moe_block_q8_0 *yb = (const struct moe_block_q8_0 *)(act + (size_t)t * as); \
                for (int64_t k = 0; k < nb; k++)                                                    \
                    dys[(t - t0) * nb + k] = hf(yb[k].d);                                           \
            }                                                                                       \
            for (int r = 0; r < nr; r += 2) {                                                       \
                const int R2 = nr - r >= 2 ? 2 : 1;                                                 \
                for (int q = 0; q < R2; q++) {                                                      \
                    const wtype *xb = (const wtype *)(w + (size_t)(r + q) * rb);                    \
                    for (int64_t k = 0; k < nb; k++)                                                \
                        dws[q * nb + k] = wscale(&xb[k]);                                           \
                }                                                                                   \
                int64_t t = t0;                                                                     \
                if (R2 == 2) {                                                                      \
                    for (; t + 4 <= t1; t += 4)                                                     \
                        QUAD_TILE_CALL(fn, 2, 4);                                                       \
                    switch (t1 - t) {                                                               \
                    case 3: QUAD_TILE_CALL(fn, 2, 3); break;                                            \
                    case 2: QUAD_TILE_CALL(fn, 2, 2); break;                                            \
                    case 1: QUAD_TILE_CALL(fn, 2, 1); break;                                            \
                    default: break;                                                                 \
                    }                                                                               \
                } else {                                                                            \
                    for (; t + 4 <= t1; t += 4)                                                     \
                        QUAD_TILE_CALL(fn, 1, 4);                                                       \
                    switch (t1 - t) {                                                               \
                    case 3: QUAD_TILE_CALL(fn, 1, 3); break;                                            \
                    case 2: QUAD_TILE_CALL(fn, 1, 2); break;                                            \
                    case 1: QUAD_TILE_CALL(fn, 1, 1); break;                                            \
                    default: break;                                                                 \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

QUAD_TILE_DRIVER(tile_q8_0_avx512, q8_0_tile, struct moe_block_q8_0, MOE_DTYPE_Q8_0, q8_0_scale)
QUAD_TILE_DRIVER(tile_mxfp4_avx512, mxfp4_tile, struct moe_block_mxfp4, MOE_DTYPE_MXFP4, mxfp4_scale)

/* One token (decode) against Q8_0 or MXFP4 rows, four rows at a time.
 * Each row's float is the one QUAD_ROWS gives with NT = 1 (dot_q8_0_avx512,
 * dot_mxfp4_avx512): per four blocks the same scale products dw * dy, the
 * same integer dots (exact, however computed) converted, spread by the same
 * permutes and added by the same fmas into the same two accumulators, the
 * same reduction and tail. What differs is only how the integers are
 * formed and what is shared between the rows: the weights are made
 * unsigned (w + 128: Q8_0 by flipping the sign bit, MXFP4 by looking the
 * codes up in a grid with 128 added) so one dpbusd takes them against the
 * signed activations, started at -128 * sum(y) per lane, which is computed
 * once per call with the token's scales; and the next four rows are
 * prefetched, since a few rows read in step are not streamed ahead by the
 * hardware as one row is. */
#define GEMV_MAX_NB 512
#define Q8_0_U(x, k) _mm512_xor_si512(load2x256((x)[k].qs, (x)[k + 1].qs), x80)
#define MX_U(x, k) grid64((x)[k].qs, (x)[k + 1].qs, gridu)
#define Q8_0_DW4(x, k) f16x4((x)[k].d, (x)[k + 1].d, (x)[k + 2].d, (x)[k + 3].d)
#define MX_DW4(x, k) e8m0_half4((x)[k].e, (x)[k + 1].e, (x)[k + 2].e, (x)[k + 3].e)

/* moe_e8m0_half of four exponents in the lanes of one vector: the same
 * bits (0x00200000 << e below 2, (e - 1) << 23 from 2), without four
 * scalar compare-and-shift chains and inserts (MXFP4 one-token kernel on
 * 1 GiB of 2880-wide rows, 1 thread: 8.3-8.5 -> 8.8-9.0 GB/s). */
AVX512 static inline __m128 e8m0_half4(uint8_t a, uint8_t b, uint8_t c, uint8_t d)
{
    const __m128i e = _mm_setr_epi32(a, b, c, d);
    const __m128i big = _mm_slli_epi32(_mm_sub_epi32(e, _mm_set1_epi32(1)), 23);
    const __m128i small = _mm_sllv_epi32(_mm_set1_epi32(0x00200000), e);
    return _mm_castsi128_ps(_mm_mask_blend_epi32(_mm_cmplt_epu32_mask(e, _mm_set1_epi32(2)), big, small));
}

#define QUAD_GEMV(wtype, WU, DW4, TAIL)                                                              \
    const struct moe_block_q8_0 *yb = (const struct moe_block_q8_0 *)act;                          \
    const __m512i ia = halves32(0, 1), ib = halves32(2, 3), x80 = _mm512_set1_epi8((char)0x80);    \
    (void)x80;                                                                                     \
    float dys[GEMV_MAX_NB];                                                                        \
    __m512i nc[GEMV_MAX_NB / 2];                                                                   \
    const int64_t nb4 = nb & ~(int64_t)3;                                                          \
    for (int64_t k = 0; k < nb4; k += 2)                                                           \
        nc[k / 2] = _mm512_sub_epi32(_mm512_setzero_si512(),                                        \
                                     _mm512_dpbusd_epi32(_mm512_setzero_si512(), x80, load2x256(yb[k].qs, yb[k + 1].qs))); \
    for (int64_t k = 0; k < nb4; k++)                                                              \
        dys[k] = hf(yb[k].d);                                                                      \
    int64_t r = 0;                                                                                 \
    for (; r < n_rows; r += 4) {                                                                   \
        const int R = n_rows - r >= 4 ? 4 : (int)(n_rows - r);                                     \
        __m512 acc0[4], acc1[4];                                                                   \
        const wtype *xr[4];                                                                        \
        _Pragma("GCC unroll 4") for (int q = 0; q < 4; q++) {                                      \
            acc0[q] = acc1[q] = _mm512_setzero_ps();                                               \
            xr[q] = (const wtype *)(w + (size_t)(r + (q < R ? q : 0)) * rb);                       \
        }                                                                                          \
        for (int64_t i = 0; i < nb4; i += 4) {                                                     \
            const __m512i y0 = load2x256(yb[i].qs, yb[i + 1].qs);                                  \
            const __m512i y1 = load2x256(yb[i + 2].qs, yb[i + 3].qs);                              \
            const __m128 dy = _mm_loadu_ps(dys + i);                                               \
            _Pragma("GCC unroll 4") for (int q = 0; q < 4; q++) {                                  \
                const wtype *x = xr[q];                                                            \
                const char *nx = (const char *)(x + i) + 4 * rb;                                   \
                _mm_prefetch(nx, _MM_HINT_T0);                                                     \
                _mm_prefetch(nx + 64, _MM_HINT_T0);                                                \
                if (4 * sizeof(wtype) > 128)                                                       \
                    _mm_prefetch(nx + 128, _MM_HINT_T0);                                           \
                const __m512i v0 = _mm512_dpbusd_epi32(nc[i / 2], WU(x, i), y0);                   \
                const __m512i v1 = _mm512_dpbusd_epi32(nc[i / 2 + 1], WU(x, i + 2), y1);           \
                const __m512 d4 = _mm512_castps128_ps512(_mm_mul_ps(DW4(x, i), dy));               \
                acc0[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_permutexvar_ps(ia, d4), acc0[q]); \
                acc1[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_permutexvar_ps(ib, d4), acc1[q]); \
            }                                                                                      \
        }                                                                                          \
        for (int q = 0; q < R; q++) {                                                              \
            float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[q], acc1[q]));                       \
            if (nb4 < nb)                                                                          \
                s += TAIL(xr[q] + nb4, yb + nb4, nb - nb4);                                        \
            y[r + q] = bias ? s + bias[r + q] : s;                                                 \
        }                                                                                          \
    }

AVX512 static void gemv_q8_0_avx512(const uint8_t *w, size_t rb, int64_t n_rows, const uint8_t *act, int64_t nb,
                                    float *y, const float *bias)
{
    QUAD_GEMV(struct moe_block_q8_0, Q8_0_U, Q8_0_DW4, dot_q8_0_avx2)
}

AVX512 static void gemv_mxfp4_avx512(const uint8_t *w, size_t rb, int64_t n_rows, const uint8_t *act, int64_t nb,
                                     float *y, const float *bias)
{
    const __m512i gridu = _mm512_xor_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)moe_mxfp4_values)),
                                           _mm512_set1_epi8((char)0x80));
    QUAD_GEMV(struct moe_block_mxfp4, MX_U, MX_DW4, dot_mxfp4_avx2)
}
#endif

#ifdef MOE_X86
static int avx512_now(void);
#endif

void moe_gemm_tile_q8_0(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t act_stride,
                        int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
#ifdef MOE_X86
    MOE_ASSERT(avx512_now());
    tile_q8_0_avx512(w, row_bytes, nr, act, act_stride, n_tok, n / MOE_QK8_0, y, ldy);
    tile_bias(y, ldy, nr, n_tok, bias);
#else
    (void)w; (void)row_bytes; (void)nr; (void)act; (void)act_stride; (void)n_tok; (void)n; (void)y; (void)ldy;
    (void)bias;
    MOE_ASSERT(0);
#endif
}

void moe_gemm_tile_mxfp4(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t act_stride,
                         int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
#ifdef MOE_X86
    MOE_ASSERT(avx512_now());
    tile_mxfp4_avx512(w, row_bytes, nr, act, act_stride, n_tok, n / MOE_QK_MXFP4, y, ldy);
    tile_bias(y, ldy, nr, n_tok, bias);
#else
    (void)w; (void)row_bytes; (void)nr; (void)act; (void)act_stride; (void)n_tok; (void)n; (void)y; (void)ldy;
    (void)bias;
    MOE_ASSERT(0);
#endif
}

/* The one-token kernels' fallback: moe_vecdot row by row (+ bias[r]). */
static void gemv_rows(uint32_t t, const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n,
                      float *y, const float *bias)
{
    for (int64_t r = 0; r < n_rows; r++) {
        const float v = moe_vecdot(t, w + (size_t)r * row_bytes, act, n);
        y[r] = bias ? v + bias[r] : v;
    }
}

void moe_gemm_gemv_bf16(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                        const float *bias)
{
#ifdef MOE_X86
    if (has_bf16_now()) {
        gemv_bf16_avx512((const uint16_t *)w, row_bytes / 2, n_rows, (const uint16_t *)act, n, y);
        tile_bias(y, 1, (int)n_rows, 1, bias);
        return;
    }
#endif
    gemv_rows(MOE_DTYPE_BF16, w, row_bytes, n_rows, act, n, y, bias);
}

void moe_gemm_gemv_q8_0(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                        const float *bias)
{
#ifdef MOE_X86
    if (avx512_now() && n / MOE_QK8_0 <= GEMV_MAX_NB) {
        gemv_q8_0_avx512(w, row_bytes, n_rows, act, n / MOE_QK8_0, y, bias);
        return;
    }
#endif
    gemv_rows(MOE_DTYPE_Q8_0, w, row_bytes, n_rows, act, n, y, bias);
}

void moe_gemm_gemv_mxfp4(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                         const float *bias)
{
#ifdef MOE_X86
    if (avx512_now() && n / MOE_QK_MXFP4 <= GEMV_MAX_NB) {
        gemv_mxfp4_avx512(w, row_bytes, n_rows, act, n / MOE_QK_MXFP4, y, bias);
        return;
    }
#endif
    gemv_rows(MOE_DTYPE_MXFP4, w, row_bytes, n_rows, act, n, y, bias);
}

#ifdef MOE_X86

/* Up to four activation rows against one weight row (AVX-512 types). */
#define ROWS_CASE(fn, wtype, qk)                                                                    \
    switch (nt) {                                                                                  \
    case 4: fn((const wtype *)w, act, stride, n / (qk), 4, out); return 1;                         \
    case 3: fn((const wtype *)w, act, stride, n / (qk), 3, out); return 1;                         \
    case 2: fn((const wtype *)w, act, stride, n / (qk), 2, out); return 1;                         \
    default: fn((const wtype *)w, act, stride, n / (qk), 1, out); return 1;                        \
    }

AVX512 static int rows_avx512(uint32_t t, const void *w, const uint8_t *act, size_t stride, int64_t n, int nt,
                              float *out)
{
    switch (t) {
    case MOE_DTYPE_Q4_0: ROWS_CASE(q4_0_rows, struct moe_block_q4_0, MOE_QK4_0)
    case MOE_DTYPE_Q8_0: ROWS_CASE(q8_0_rows, struct moe_block_q8_0, MOE_QK8_0)
    case MOE_DTYPE_IQ4_NL: ROWS_CASE(iq4_nl_rows, struct moe_block_iq4_nl, MOE_QK4_NL)
    case MOE_DTYPE_MXFP4: ROWS_CASE(mxfp4_rows, struct moe_block_mxfp4, MOE_QK_MXFP4)
    case MOE_DTYPE_Q4_K: ROWS_CASE(q4_k_rows, struct moe_block_q4_k, MOE_QK_K)
    case MOE_DTYPE_Q5_K: ROWS_CASE(q5_k_rows, struct moe_block_q5_k, MOE_QK_K)
    case MOE_DTYPE_Q6_K: ROWS_CASE(q6_k_rows, struct moe_block_q6_k, MOE_QK_K)
    default: return 0;
    }
}
#endif

/* ---- dispatch -------------------------------------------------------- */

enum simd { SIMD_SCALAR, SIMD_AVX2, SIMD_AVX512 };
/* Detected once (pthread_once), on the first call from any thread; the
 * fast path is one acquire load, which also makes has_bf16 (written before
 * the release store) visible. Every kernel thread calls simd(). */
static atomic_int simd_level = -1;
static pthread_once_t simd_once = PTHREAD_ONCE_INIT;
static int has_bf16;      /* AVX512_BF16 usable (with SIMD_AVX512 only) */

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

static int avx512bf16_cpu(void)
{
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)); /* leaf 7.1 EAX: AVX512_BF16 */
}
#endif

static void simd_detect(void)
{
    int level = SIMD_SCALAR;
#ifdef MOE_X86
    __builtin_cpu_init();
    /* clang's __builtin_cpu_supports has no "f16c": ask cpuid (leaf 1, ECX bit 29) */
    unsigned a, b, c, d;
    const int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
        level = avx512vnni_usable() ? SIMD_AVX512 : SIMD_AVX2;
    has_bf16 = level == SIMD_AVX512 && avx512bf16_cpu();
#endif
    const char *force = getenv("MOE_CPU_SIMD");
    if (force != NULL && strcmp(force, "scalar") == 0)
        level = SIMD_SCALAR;
    else if (force != NULL && strcmp(force, "avx2") == 0 && level > SIMD_AVX2)
        level = SIMD_AVX2;
    atomic_store_explicit(&simd_level, level, memory_order_release);
}

static int simd(void)
{
    const int level = atomic_load_explicit(&simd_level, memory_order_acquire);
    if (__builtin_expect(level >= 0, 1))
        return level;
    pthread_once(&simd_once, simd_detect);
    return atomic_load_explicit(&simd_level, memory_order_acquire);
}

#ifdef MOE_X86
static int avx512_now(void)
{
    return simd() == SIMD_AVX512;
}

/* AVX2 or better without AVX512_BF16: moe_vecdot's BF16 dot is dot_bf16_avx2 */
static int simd_avx2_now(void)
{
    return simd() >= SIMD_AVX2 && !has_bf16_now();
}

static int has_bf16_now(void)
{
    return simd() == SIMD_AVX512 && has_bf16;
}
#endif

const char *moe_vecdot_impl(void)
{
    static const char *const names[] = { "scalar", "avx2", "avx512vnni" };
    return names[simd()];
}

void moe_vecdot_rows(uint32_t t, const void *w, const void *act, size_t act_stride, int64_t n, int n_rows,
                     float *out)
{
    MOE_ASSERT(n_rows >= 1 && n_rows <= MOE_VECDOT_MAX_ROWS);
#ifdef MOE_X86
    if (simd() == SIMD_AVX512 && rows_avx512(t, w, act, act_stride, n, n_rows, out))
        return;
#endif
    for (int r = 0; r < n_rows; r++)
        out[r] = moe_vecdot(t, w, (const uint8_t *)act + (size_t)r * act_stride, n);
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
        case MOE_DTYPE_Q4_K: return dot_q4_k_avx512(w, act, n / MOE_QK_K);
        case MOE_DTYPE_Q5_K: return dot_q5_k_avx512(w, act, n / MOE_QK_K);
        case MOE_DTYPE_Q6_K: return dot_q6_k_avx512(w, act, n / MOE_QK_K);
        case MOE_DTYPE_IQ4_NL: return dot_iq4_nl_avx512(w, act, n / MOE_QK4_NL);
        case MOE_DTYPE_MXFP4: return dot_mxfp4_avx512(w, act, n / MOE_QK_MXFP4);
        case MOE_DTYPE_BF16:
            if (has_bf16)
                return dot_bf16_avx512(w, act, n);
            break;
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
        case MOE_DTYPE_Q5_K: return dot_q5_k_avx2(w, act, n / MOE_QK_K);
        case MOE_DTYPE_BF16: return dot_bf16_avx2(w, act, n);
        case MOE_DTYPE_IQ4_NL: return dot_iq4_nl_avx2(w, act, n / MOE_QK4_NL);
        case MOE_DTYPE_MXFP4: return dot_mxfp4_avx2(w, act, n / MOE_QK_MXFP4);
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

/* ---- y += a * x (attention's value sums) ----------------------------- */

/* Multiply, then add, rounding after each (no fused multiply-add): the
 * same float as the scalar loop on every path. */
#ifdef MOE_X86
AVX2 static void axpy_f16_avx2(float *y, float a, const uint16_t *x, int64_t n)
{
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(va, v)));
    }
    for (; i < n; i++)
        y[i] += a * moe_fp16_to_fp32(x[i]);
}

AVX2 static void axpy_f32_avx2(float *y, float a, const float *x, int64_t n)
{
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(va, _mm256_loadu_ps(x + i))));
    for (; i < n; i++)
        y[i] += a * x[i];
}

AVX512 static void axpy_f16_avx512(float *y, float a, const uint16_t *x, int64_t n)
{
    const __m512 va = _mm512_set1_ps(a);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i)));
        _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_mul_ps(va, v)));
    }
    for (; i < n; i++)
        y[i] += a * moe_fp16_to_fp32(x[i]);
}
#endif

void moe_vec_axpy(uint32_t t, float *y, float a, const void *x, int64_t n)
{
    MOE_ASSERT(t == MOE_DTYPE_F16 || t == MOE_DTYPE_F32);
#ifdef MOE_X86
    const int level = simd();
    if (t == MOE_DTYPE_F16 && level == SIMD_AVX512) {
        axpy_f16_avx512(y, a, x, n);
        return;
    }
    if (level >= SIMD_AVX2) {
        if (t == MOE_DTYPE_F16)
            axpy_f16_avx2(y, a, x, n);
        else
            axpy_f32_avx2(y, a, x, n);
        return;
    }
#endif
    if (t == MOE_DTYPE_F16) {
        const uint16_t *h = x;
        for (int64_t i = 0; i < n; i++)
            y[i] += a * moe_fp16_to_fp32(h[i]);
    } else {
        const float *f = x;
        for (int64_t i = 0; i < n; i++)
            y[i] += a * f[i];
    }
}

/* ---- activation conversion (dispatch) -------------------------------- */

#ifdef MOE_X86
/* The quantizers above with AVX-512, byte for byte: the product is rounded
 * to float, then to the nearest integer, ties to even (cvtps_epi32 under
 * the default MXCSR, as lrintf under the default rounding mode); Q8_K's
 * max is the first element of largest magnitude, as the scalar loop's
 * strict > keeps it. Finite inputs (a NaN activation is garbage on every
 * path). */
AVX512 static void quant_q8_0_avx512(const float *x, struct moe_block_q8_0 *y, int64_t nb)
{
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < nb; i++, x += MOE_QK8_0) {
        const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absmask), _mm512_and_ps(b, absmask)));
        const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = moe_fp32_to_fp16(d);
        const __m512 vid = _mm512_set1_ps(id);
        _mm_storeu_si128((__m128i *)y[i].qs, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, vid))));
        _mm_storeu_si128((__m128i *)(y[i].qs + 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, vid))));
    }
}

AVX512 static void quant_q8_k_avx512(const float *x, struct moe_block_q8_k *y, int64_t nb)
{
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512i i127 = _mm512_set1_epi32(127);
    for (int64_t i = 0; i < nb; i++, x += MOE_QK_K) {
        __m512 m = _mm512_setzero_ps();
        for (int j = 0; j < MOE_QK_K; j += 16)
            m = _mm512_max_ps(m, _mm512_and_ps(_mm512_loadu_ps(x + j), absmask));
        const float amax = _mm512_reduce_max_ps(m);
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof(y[i]));
            continue;
        }
        float max = 0.0f;
        const __m512 va = _mm512_set1_ps(amax);
        for (int j = 0; j < MOE_QK_K; j += 16) {
            const __mmask16 k = _mm512_cmp_ps_mask(_mm512_and_ps(_mm512_loadu_ps(x + j), absmask), va, _CMP_EQ_OQ);
            if (k) {
                max = x[j + __builtin_ctz(k)];
                break;
            }
        }
        const float iscale = -127.0f / max;
        const __m512 vs = _mm512_set1_ps(iscale);
        for (int j = 0; j < MOE_QK_K / 16; j++) {
            const __m512i v = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(vs, _mm512_loadu_ps(x + j * 16))), i127);
            _mm_storeu_si128((__m128i *)(y[i].qs + j * 16), _mm512_cvtepi32_epi8(v));
            y[i].bsums[j] = (int16_t)_mm512_reduce_add_epi32(v);
        }
        y[i].d = 1.0f / iscale;
    }
}
#endif

void moe_vecdot_quantize_act(uint32_t t, const float *x, void *act, int64_t n)
{
#ifdef MOE_X86
    if (simd() == SIMD_AVX512) {
        switch (moe_dtype_vec_dot_type(t)) {
        case MOE_DTYPE_Q8_0: quant_q8_0_avx512(x, act, n / MOE_QK8_0); return;
        case MOE_DTYPE_Q8_K: quant_q8_k_avx512(x, act, n / MOE_QK_K); return;
        default: break;
        }
    }
#endif
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

/* CPU attention of one (token, query head); see attn.h.
 *
 * The per-row formula this keeps, float for float:
 *
 *   s[r] = moe_vecdot(K's type, K row r, q in K's dot format, head_dim) * scale
 *   max  = the largest s[r] (and the sink), s[r] = expf(s[r] - max),
 *   sum  = the double sum of s[r] in order (plus the sink's), inv = 1 / sum
 *   out  = 0; for r in order: out = out + (s[r] * inv) * V row r
 *
 * with s[r] * inv rounded to half first for an F16 cache and a Q8_0 V row
 * dequantized to floats (both as ggml's flash attention). Each SIMD dot of
 * vecdot.c ends in one horizontal sum per row (_mm512_reduce_add_ps: 256-bit
 * halves added, then 128-bit halves, then lanes (0,2),(1,3), then (0,1);
 * hsum8 on AVX2: 128-bit halves, then the same). Here 16 (8) rows' vector
 * accumulators are reduced together with shuffles whose additions pair the
 * same lanes in the same order, so each lane of the result is the float
 * that row's own reduction gives, without a reduction per row. Shapes the
 * blocked kernels do not cover (and the scalar path) take the per-row
 * formula itself. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common/dtype.h"
#include "common/error.h"
#include "kernels/backend.h"
#include "kernels/blocks.h"
#include "kernels/cpu/attn.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cpu/vecdot.h"
#include "kernels/fp16.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOE_X86 1
#endif

/* Bytes of n cache elements of type t (n a multiple of 32 for Q8_0). */
static inline size_t kv_bytes(uint32_t t, int64_t n)
{
    if (t == MOE_DTYPE_Q8_0)
        return (size_t)(n / 32) * sizeof(struct moe_block_q8_0);
    return (size_t)n * (t == MOE_DTYPE_F16 ? 2 : 4);
}

/* Worker scratch after the scores: q in K's dot format (f16 halves, or
 * q8_0 blocks as ggml's flash attention quantizes it), then a dequantized
 * V row (q8_0, per-row path). */
static size_t attn_q_bytes(uint32_t t, int hd)
{
    return (kv_bytes(t == MOE_DTYPE_F32 ? MOE_DTYPE_F16 : t, hd) + 63) & ~(size_t)63;
}

size_t moe_cpu_attn_scratch(const struct moe_attn_params *ap, int32_t p)
{
    return (size_t)(p + 1) * sizeof(float) + 64 + attn_q_bytes(ap->kv_type, ap->head_dim) +
           (ap->kv_type == MOE_DTYPE_Q8_0 ? (size_t)ap->head_dim_v * sizeof(float) : 0);
}

/* The cache row of position r (through the block table, if any). */
static inline int64_t cache_row(const struct moe_attn_params *ap, int32_t r)
{
    if (ap->host_blocks == NULL)
        return r;
    return (int64_t)ap->host_blocks[r / ap->block_rows] * ap->block_rows + r % ap->block_rows;
}

static inline const uint8_t *k_ptr(const struct moe_attn_params *ap, int32_t r, int kvh)
{
    const int64_t off = cache_row(ap, r) * ap->k_row + (int64_t)kvh * ap->head_dim;
    return (const uint8_t *)ap->k_cache + kv_bytes(ap->kv_type, off);
}

static inline const uint8_t *v_ptr(const struct moe_attn_params *ap, int32_t r, int kvh)
{
    const int64_t off = cache_row(ap, r) * ap->v_row + (int64_t)kvh * ap->head_dim_v;
    return (const uint8_t *)ap->v_cache + kv_bytes(ap->kv_type, off);
}

/* The cache rows of consecutive positions, without a division each. */
struct row_iter {
    const int32_t *blocks;
    int32_t rows, b, o; /* rows a block; position = b * rows + o */
};

static inline struct row_iter row_iter_at(const struct moe_attn_params *ap, int32_t r)
{
    if (ap->host_blocks == NULL)
        return (struct row_iter){ NULL, 0, 0, r };
    return (struct row_iter){ ap->host_blocks, ap->block_rows, r / ap->block_rows, r % ap->block_rows };
}

/* The row of the iterator's position; moves it to the next position. */
static inline int64_t row_iter_next(struct row_iter *it)
{
    if (it->blocks == NULL)
        return it->o++;
    const int64_t row = (int64_t)it->blocks[it->b] * it->rows + it->o;
    if (++it->o == it->rows) {
        it->o = 0;
        it->b++;
    }
    return row;
}

/* ---- the per-row formula (scalar path, other shapes) ------------------ */

static float scores_rows(const struct moe_attn_params *ap, const float *q, const void *qx, float *s, int32_t first,
                         int32_t p, int kvh)
{
    float max = -INFINITY;
    for (int32_t r = first; r <= p; r++) {
        const uint8_t *k = k_ptr(ap, r, kvh);
        if (ap->kv_type == MOE_DTYPE_F32)
            s[r] = moe_vecdot(MOE_DTYPE_F32, k, q, ap->head_dim) * ap->scale;
        else
            s[r] = moe_vecdot(ap->kv_type, k, qx, ap->head_dim) * ap->scale;
        if (s[r] > max)
            max = s[r];
    }
    return max;
}

/* pr[r] as the value sums multiply by (in s); vrow: a V row's floats */
static void values_rows(const struct moe_attn_params *ap, float *out, const float *pr, int32_t first, int32_t p,
                        int kvh, float *vrow)
{
    const int hdv = ap->head_dim_v;
    for (int d = 0; d < hdv; d++)
        out[d] = 0.0f;
    for (int32_t r = first; r <= p; r++) {
        const uint8_t *vb = v_ptr(ap, r, kvh);
        if (ap->kv_type == MOE_DTYPE_Q8_0) {
            moe_dequantize_row(MOE_DTYPE_Q8_0, vb, vrow, hdv);
            moe_vec_axpy(MOE_DTYPE_F32, out, pr[r], vrow, hdv);
        } else {
            moe_vec_axpy(ap->kv_type, out, pr[r], vb, hdv);
        }
    }
}

/* The softmax of scores s[first..p] with maximum max (the sink's logit
 * included when there is one): s[r] = expf(s[r] - max), returns 1 / their
 * double sum, all in row order. */
static float softmax_rows(const struct moe_attn_params *ap, float *s, int32_t first, int32_t p, float max, int h)
{
    const float sink = ap->sinks ? ap->sinks[h] : -INFINITY;
    if (sink > max)
        max = sink;
    double sum = 0.0;
    for (int32_t r = first; r <= p; r++) {
        s[r] = expf(s[r] - max);
        sum += (double)s[r];
    }
    if (ap->sinks)
        sum += (double)expf(sink - max);
    return (float)(1.0 / sum);
}

/* ---- AVX2 --------------------------------------------------------------- */

#ifdef MOE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

/* hsum8's additions for 8 rows at once: lane j of the result is hsum8(S[j]).
 * hsum8 adds the 128-bit halves (lanes i and i+4), then lanes (0,2) and
 * (1,3), then those two. */
AVX2 INLINE __m256 fold128_8(__m256 a, __m256 b) /* [a.lo+a.hi | b.lo+b.hi] */
{
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

AVX2 INLINE __m256 fold64_8(__m256 a, __m256 b) /* per 128 bits: [a0+a2, a1+a3, b0+b2, b1+b3] */
{
    return _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xee));
}

AVX2 INLINE __m256 fold32_8(__m256 a, __m256 b) /* per 128 bits: [a0+a1, a2+a3, b0+b1, b2+b3] */
{
    return _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xdd));
}

AVX2 INLINE __m256 reduce8(const __m256 *S)
{
    return fold32_8(fold64_8(fold128_8(S[0], S[4]), fold128_8(S[1], S[5])),
                    fold64_8(fold128_8(S[2], S[6]), fold128_8(S[3], S[7])));
}

/* vecdot.c's AVX2 Q8_0 block product (signed bytes to 8 int32 lanes). */
AVX2 INLINE __m256 mul_sum_i8(__m256i a, __m256i b)
{
    const __m256i ax = _mm256_sign_epi8(a, a);
    const __m256i sy = _mm256_sign_epi8(b, a);
    const __m256i dot16 = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, _mm256_set1_epi16(1)));
}

/* dot_f16_avx2's accumulators a0 + a1 (hd a multiple of 16); qf: q's
 * halves as floats, 8 a vector */
AVX2 INLINE __m256 acc8_f16(const uint16_t *k, const __m256 *qf, int hd)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (int i = 0; i < hd; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))), qf[i / 8], a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i + 8))), qf[i / 8 + 1], a1);
    }
    return _mm256_add_ps(a0, a1);
}

/* dot_f32_avx2's accumulators (a0 + a1) + (a2 + a3) (hd a multiple of 8) */
AVX2 INLINE __m256 acc8_f32(const float *k, const float *q, int hd)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 32 <= hd; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k + i), _mm256_loadu_ps(q + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k + i + 8), _mm256_loadu_ps(q + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(k + i + 16), _mm256_loadu_ps(q + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(k + i + 24), _mm256_loadu_ps(q + i + 24), a3);
    }
    for (; i < hd; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k + i), _mm256_loadu_ps(q + i), a0);
    return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}

/* dot_q8_0_avx2's accumulator over blocks i0..nb-1 */
AVX2 INLINE __m256 acc8_q8_0(const struct moe_block_q8_0 *x, const struct moe_block_q8_0 *y, int i0, int nb)
{
    __m256 acc = _mm256_setzero_ps();
    for (int i = i0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(x[i].d) * _cvtsh_ss(y[i].d));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[i].qs);
        acc = _mm256_fmadd_ps(d, mul_sum_i8(qx, qy), acc);
    }
    return acc;
}

/* Scores and their maximum with the AVX2 dots; 0 where the shape is not
 * covered (the caller takes the per-row formula). */
/* The K rows of positions r0..r0+n-1 (n <= NR; the rest repeat the first). */
static inline void gather_rows(const struct moe_attn_params *ap, struct row_iter *it, const uint8_t *k0, int n,
                               int nr, const uint8_t **kp)
{
    for (int j = 0; j < n; j++)
        kp[j] = k0 + kv_bytes(ap->kv_type, row_iter_next(it) * ap->k_row);
    for (int j = n; j < nr; j++)
        kp[j] = kp[0];
}

AVX2 INLINE void scores8_t(const struct moe_attn_params *ap, const float *q, const void *qx, const __m256 *qf,
                           float *s, int32_t first, int32_t p, int kvh, float *max, const int hd, const uint32_t kt)
{
    const __m256 vscale = _mm256_set1_ps(ap->scale), ninf = _mm256_set1_ps(-INFINITY);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const uint8_t *k0 = (const uint8_t *)ap->k_cache + kv_bytes(kt, (int64_t)kvh * hd);
    struct row_iter it = row_iter_at(ap, first);
    __m256 vmax = ninf;
    for (int32_t r0 = first; r0 <= p; r0 += 8) {
        const int n = p - r0 + 1 < 8 ? p - r0 + 1 : 8;
        const uint8_t *kp[8];
        gather_rows(ap, &it, k0, n, 8, kp);
        __m256 S[8];
        _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {
            if (kt == MOE_DTYPE_F16)
                S[j] = acc8_f16((const uint16_t *)kp[j], qf, hd);
            else if (kt == MOE_DTYPE_F32)
                S[j] = acc8_f32((const float *)kp[j], q, hd);
            else
                S[j] = acc8_q8_0((const struct moe_block_q8_0 *)kp[j], qx, 0, hd / 32);
        }
        const __m256 sc = _mm256_mul_ps(reduce8(S), vscale);
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
        _mm256_maskstore_ps(s + r0, m, sc);
        /* max(a, b) is b where a is NaN: as the formula's `if (s > max)` */
        vmax = _mm256_max_ps(_mm256_blendv_ps(ninf, sc, _mm256_castsi256_ps(m)), vmax);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    *max = _mm_cvtss_f32(m4);
}

/* Scores and their maximum with the AVX2 dots; 0 where the shape is not
 * covered (the caller takes the per-row formula). */
AVX2 static int scores_avx2(const struct moe_attn_params *ap, const float *q, const void *qx, float *s,
                            int32_t first, int32_t p, int kvh, float *max)
{
    const int hd = ap->head_dim;
    switch (ap->kv_type) {
    case MOE_DTYPE_F16: {
        if (hd % 16 || hd > 256)
            return 0;
        __m256 qf[32];
        for (int c = 0; c < hd / 8; c++)
            qf[c] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)qx + 8 * c)));
        if (hd == 128)
            scores8_t(ap, q, qx, qf, s, first, p, kvh, max, 128, MOE_DTYPE_F16);
        else if (hd == 64)
            scores8_t(ap, q, qx, qf, s, first, p, kvh, max, 64, MOE_DTYPE_F16);
        else
            scores8_t(ap, q, qx, qf, s, first, p, kvh, max, hd, MOE_DTYPE_F16);
        return 1;
    }
    case MOE_DTYPE_F32:
        if (hd % 8)
            return 0;
        scores8_t(ap, q, qx, NULL, s, first, p, kvh, max, hd, MOE_DTYPE_F32);
        return 1;
    default:
        scores8_t(ap, q, qx, NULL, s, first, p, kvh, max, hd, MOE_DTYPE_Q8_0);
        return 1;
    }
}

/* out = sum over rows of pr[r] * V row r, nv vectors of 8 at element d0 in
 * registers (each lane: out = out + pr * v, in row order, as moe_vec_axpy) */
AVX2 static void probs_avx2(float *s, int32_t first, int32_t p, float inv, int f16)
{
    const __m256 vi = _mm256_set1_ps(inv);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int32_t r = first; r <= p; r += 8) {
        const int n = p - r + 1 < 8 ? p - r + 1 : 8;
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
        __m256 x = _mm256_mul_ps(_mm256_maskload_ps(s + r, m), vi);
        if (f16)
            x = _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        _mm256_maskstore_ps(s + r, m, x);
    }
}

AVX2 INLINE __m256 vload8(const uint8_t *vb, uint32_t kt, int d)
{
    if (kt == MOE_DTYPE_F32)
        return _mm256_loadu_ps((const float *)vb + d);
    if (kt == MOE_DTYPE_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)vb + d)));
    const struct moe_block_q8_0 *b = (const struct moe_block_q8_0 *)vb + d / 32;
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + d % 32))));
    return _mm256_mul_ps(q, _mm256_set1_ps(moe_fp16_to_fp32(b->d)));
}

AVX2 INLINE void values8(const struct moe_attn_params *ap, float *out, const float *pr, int32_t first, int32_t p,
                         int kvh, int d0, const int nv, const uint32_t kt)
{
    __m256 acc[8];
    _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
        acc[c] = _mm256_setzero_ps();
    struct row_iter it = row_iter_at(ap, first);
    const uint8_t *v0 = (const uint8_t *)ap->v_cache + kv_bytes(kt, (int64_t)kvh * ap->head_dim_v);
    for (int32_t r = first; r <= p; r++) {
        const uint8_t *vb = v0 + kv_bytes(kt, row_iter_next(&it) * ap->v_row);
        const __m256 a = _mm256_set1_ps(pr[r]);
        _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
            acc[c] = _mm256_add_ps(acc[c], _mm256_mul_ps(a, vload8(vb, kt, d0 + 8 * c)));
    }
    _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
        _mm256_storeu_ps(out + d0 + 8 * c, acc[c]);
}

AVX2 INLINE void values_avx2_t(const struct moe_attn_params *ap, float *out, const float *pr, int32_t first,
                               int32_t p, int kvh, const uint32_t kt)
{
    const int hdv = ap->head_dim_v, full = hdv & ~7;
    for (int d0 = 0; d0 < full; d0 += 64) {
        switch ((full - d0) / 8 < 8 ? (full - d0) / 8 : 8) {
        case 1: values8(ap, out, pr, first, p, kvh, d0, 1, kt); break;
        case 2: values8(ap, out, pr, first, p, kvh, d0, 2, kt); break;
        case 3: values8(ap, out, pr, first, p, kvh, d0, 3, kt); break;
        case 4: values8(ap, out, pr, first, p, kvh, d0, 4, kt); break;
        case 5: values8(ap, out, pr, first, p, kvh, d0, 5, kt); break;
        case 6: values8(ap, out, pr, first, p, kvh, d0, 6, kt); break;
        case 7: values8(ap, out, pr, first, p, kvh, d0, 7, kt); break;
        default: values8(ap, out, pr, first, p, kvh, d0, 8, kt); break;
        }
    }
    /* the last hdv % 8 elements (F32, F16 only): moe_vec_axpy's scalar tail */
    for (int d = full; d < hdv; d++) {
        float o = 0.0f;
        for (int32_t r = first; r <= p; r++) {
            const uint8_t *vb = v_ptr(ap, r, kvh);
            o += pr[r] * (kt == MOE_DTYPE_F16 ? moe_fp16_to_fp32(((const uint16_t *)vb)[d]) : ((const float *)vb)[d]);
        }
        out[d] = o;
    }
}

AVX2 static void values_avx2(const struct moe_attn_params *ap, float *out, const float *pr, int32_t first,
                             int32_t p, int kvh)
{
    switch (ap->kv_type) {
    case MOE_DTYPE_F16: values_avx2_t(ap, out, pr, first, p, kvh, MOE_DTYPE_F16); break;
    case MOE_DTYPE_Q8_0: values_avx2_t(ap, out, pr, first, p, kvh, MOE_DTYPE_Q8_0); break;
    default: values_avx2_t(ap, out, pr, first, p, kvh, MOE_DTYPE_F32); break;
    }
}

/* ---- AVX-512 ------------------------------------------------------------ */

/* _mm512_reduce_add_ps's additions for 16 rows at once: lane j of the
 * result is the reduction of S[j]. */
AVX512 INLINE __m512 fold256(__m512 a, __m512 b) /* [a.lo256 + a.hi256 | b's] */
{
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
}

AVX512 INLINE __m512 fold128(__m512 a, __m512 b) /* 128-bit halves of each 256 */
{
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
}

AVX512 INLINE __m512 fold64(__m512 a, __m512 b) /* per 128 bits: [a0+a2, a1+a3, b0+b2, b1+b3] */
{
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xee));
}

AVX512 INLINE __m512 fold32(__m512 a, __m512 b) /* per 128 bits: [a0+a1, a2+a3, b0+b1, b2+b3] */
{
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xdd));
}

AVX512 INLINE __m512 reduce16(const __m512 *S)
{
    __m512 U[4];
    for (int i = 0; i < 4; i++)
        U[i] = fold128(fold256(S[i], S[i + 4]), fold256(S[i + 8], S[i + 12]));
    return fold32(fold64(U[0], U[1]), fold64(U[2], U[3]));
}

/* 16 rows' hsum8 reductions (the AVX2 tails of the AVX-512 dots) */
AVX512 INLINE __m512 reduce8x2(const __m256 *T)
{
    return _mm512_insertf32x8(_mm512_castps256_ps512(reduce8(T)), reduce8(T + 8), 1);
}

AVX512 INLINE __m128 f16x4(uint16_t a, uint16_t b, uint16_t c, uint16_t d)
{
    return _mm_cvtph_ps(_mm_setr_epi16((short)a, (short)b, (short)c, (short)d, 0, 0, 0, 0));
}

AVX512 INLINE __m512i load2x256(const void *a, const void *b)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

AVX512 INLINE __m512i halves32(int lo, int hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(lo)), _mm256_set1_epi32(hi), 1);
}

AVX512 INLINE __m512i s8_dot(__m512i w, __m512i yx)
{
    const __mmask64 neg = _mm512_movepi8_mask(w);
    const __m512i sy = _mm512_mask_sub_epi8(yx, neg, _mm512_setzero_si512(), yx);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sy);
}

/* The scores of 16 rows kp[j] (before the scale), each moe_vecdot's float on
 * the AVX-512 path: dot_f16_avx512 / dot_f32_avx512 (two accumulators over
 * 32 elements, then the AVX2 dot of the rest), q8_0_rows (four blocks per
 * step, then dot_q8_0_avx2 of the rest). */
AVX512 INLINE __m512 dots16_f16(const uint8_t *const *kp, const __m512 *qf, int hd)
{
    __m512 S[16];
    const int hm = hd & ~31;
    _Pragma("GCC unroll 16") for (int j = 0; j < 16; j++) {
        const uint16_t *k = (const uint16_t *)kp[j];
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (int i = 0; i < hm; i += 32) {
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + i))), qf[i / 16], a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + i + 16))), qf[i / 16 + 1],
                                 a1);
        }
        S[j] = _mm512_add_ps(a0, a1);
    }
    __m512 r = reduce16(S);
    if (hm < hd) { /* 16 left: dot_f16_avx2 */
        const __m256 q0 = _mm512_castps512_ps256(qf[hm / 16]), q1 = _mm512_extractf32x8_ps(qf[hm / 16], 1);
        __m256 T[16];
        for (int j = 0; j < 16; j++) {
            const uint16_t *k = (const uint16_t *)kp[j] + hm;
            const __m256 a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)k)), q0,
                                              _mm256_setzero_ps());
            const __m256 a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + 8))), q1,
                                              _mm256_setzero_ps());
            T[j] = _mm256_add_ps(a0, a1);
        }
        r = _mm512_add_ps(r, reduce8x2(T));
    }
    return r;
}

AVX512 INLINE __m512 dots16_f32(const uint8_t *const *kp, const float *q, int hd)
{
    __m512 S[16];
    const int hm = hd & ~31;
    _Pragma("GCC unroll 16") for (int j = 0; j < 16; j++) {
        const float *k = (const float *)kp[j];
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (int i = 0; i < hm; i += 32) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(k + i), _mm512_loadu_ps(q + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(k + i + 16), _mm512_loadu_ps(q + i + 16), a1);
        }
        S[j] = _mm512_add_ps(a0, a1);
    }
    __m512 r = reduce16(S);
    if (hm < hd) { /* a multiple of 8 left: dot_f32_avx2 */
        __m256 T[16];
        for (int j = 0; j < 16; j++)
            T[j] = acc8_f32((const float *)kp[j] + hm, q + hm, hd - hm);
        r = _mm512_add_ps(r, reduce8x2(T));
    }
    return r;
}

AVX512 INLINE __m512 dots16_q8_0(const uint8_t *const *kp, const struct moe_block_q8_0 *y, int nb)
{
    const __m512i ia = halves32(0, 1), ib = halves32(2, 3);
    __m512 S[16];
    const int nm = nb & ~3;
    _Pragma("GCC unroll 16") for (int j = 0; j < 16; j++) {
        const struct moe_block_q8_0 *x = (const struct moe_block_q8_0 *)kp[j];
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
        for (int i = 0; i < nm; i += 4) {
            const __m512i w0 = load2x256(x[i].qs, x[i + 1].qs), w1 = load2x256(x[i + 2].qs, x[i + 3].qs);
            const __m128 dw = f16x4(x[i].d, x[i + 1].d, x[i + 2].d, x[i + 3].d);
            const __m512i v0 = s8_dot(w0, load2x256(y[i].qs, y[i + 1].qs));
            const __m512i v1 = s8_dot(w1, load2x256(y[i + 2].qs, y[i + 3].qs));
            const __m512 d4 = _mm512_castps128_ps512(_mm_mul_ps(dw, f16x4(y[i].d, y[i + 1].d, y[i + 2].d, y[i + 3].d)));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), _mm512_permutexvar_ps(ia, d4), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), _mm512_permutexvar_ps(ib, d4), acc1);
        }
        S[j] = _mm512_add_ps(acc0, acc1);
    }
    __m512 r = reduce16(S);
    if (nm < nb) { /* dot_q8_0_avx2 of the last blocks */
        __m256 T[16];
        for (int j = 0; j < 16; j++)
            T[j] = acc8_q8_0((const struct moe_block_q8_0 *)kp[j], y, nm, nb);
        r = _mm512_add_ps(r, reduce8x2(T));
    }
    return r;
}

AVX512 INLINE void scores16_t(const struct moe_attn_params *ap, const float *q, const void *qx, const __m512 *qf,
                              float *s, int32_t first, int32_t p, int kvh, float *max, const int hd,
                              const uint32_t kt)
{
    const __m512 vscale = _mm512_set1_ps(ap->scale);
    const uint8_t *k0 = (const uint8_t *)ap->k_cache + kv_bytes(kt, (int64_t)kvh * hd);
    struct row_iter it = row_iter_at(ap, first);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int32_t r0 = first; r0 <= p; r0 += 16) {
        const int n = p - r0 + 1 < 16 ? p - r0 + 1 : 16;
        const uint8_t *kp[16];
        gather_rows(ap, &it, k0, n, 16, kp);
        __m512 d;
        if (kt == MOE_DTYPE_F16)
            d = dots16_f16(kp, qf, hd);
        else if (kt == MOE_DTYPE_F32)
            d = dots16_f32(kp, q, hd);
        else
            d = dots16_q8_0(kp, qx, hd / 32);
        const __m512 sc = _mm512_mul_ps(d, vscale);
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        _mm512_mask_storeu_ps(s + r0, m, sc);
        /* max(a, b) is b where a is NaN: as the formula's `if (s > max)` */
        vmax = _mm512_mask_max_ps(vmax, m, sc, vmax);
    }
    *max = _mm512_reduce_max_ps(vmax);
}

/* The AVX-512 path's scores (head dims 64, 128 and 256 with constant
 * loop bounds) */
AVX512 static int scores_avx512(const struct moe_attn_params *ap, const float *q, const void *qx, float *s,
                                int32_t first, int32_t p, int kvh, float *max)
{
    const int hd = ap->head_dim;
    switch (ap->kv_type) {
    case MOE_DTYPE_F16: {
        if (hd % 16 || hd > 256)
            return 0;
        __m512 qf[16];
        for (int c = 0; c < hd / 16; c++)
            qf[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)qx + 16 * c)));
        if (hd == 128)
            scores16_t(ap, q, qx, qf, s, first, p, kvh, max, 128, MOE_DTYPE_F16);
        else if (hd == 64)
            scores16_t(ap, q, qx, qf, s, first, p, kvh, max, 64, MOE_DTYPE_F16);
        else if (hd == 256)
            scores16_t(ap, q, qx, qf, s, first, p, kvh, max, 256, MOE_DTYPE_F16);
        else
            scores16_t(ap, q, qx, qf, s, first, p, kvh, max, hd, MOE_DTYPE_F16);
        return 1;
    }
    case MOE_DTYPE_F32:
        if (hd % 8)
            return 0;
        if (hd == 128)
            scores16_t(ap, q, qx, NULL, s, first, p, kvh, max, 128, MOE_DTYPE_F32);
        else
            scores16_t(ap, q, qx, NULL, s, first, p, kvh, max, hd, MOE_DTYPE_F32);
        return 1;
    default:
        if (hd == 128)
            scores16_t(ap, q, qx, NULL, s, first, p, kvh, max, 128, MOE_DTYPE_Q8_0);
        else if (hd == 64)
            scores16_t(ap, q, qx, NULL, s, first, p, kvh, max, 64, MOE_DTYPE_Q8_0);
        else
            scores16_t(ap, q, qx, NULL, s, first, p, kvh, max, hd, MOE_DTYPE_Q8_0);
        return 1;
    }
}

/* s[r] * inv for r in first..p (rounded to half and back for an F16
 * cache: F16C's round-to-nearest-even is moe_fp32_to_fp16's, for every
 * float, checked over all 2^32) */
AVX512 static void probs_avx512(float *s, int32_t first, int32_t p, float inv, int f16)
{
    const __m512 vi = _mm512_set1_ps(inv);
    for (int32_t r = first; r <= p; r += 16) {
        const int n = p - r + 1 < 16 ? p - r + 1 : 16;
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + r), vi);
        if (f16)
            x = _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm512_mask_storeu_ps(s + r, m, x);
    }
}

AVX512 INLINE __m512 vload16(const uint8_t *vb, uint32_t kt, int d, __mmask16 m)
{
    if (kt == MOE_DTYPE_F32)
        return _mm512_maskz_loadu_ps(m, (const float *)vb + d);
    if (kt == MOE_DTYPE_F16)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)vb + d));
    /* Q8_0 (head_dim_v a multiple of 32): dequant.c's (float)q * d */
    const struct moe_block_q8_0 *b = (const struct moe_block_q8_0 *)vb + d / 32;
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + d % 32))));
    return _mm512_mul_ps(q, _mm512_set1_ps(moe_fp16_to_fp32(b->d)));
}

/* nv vectors of 16 at element d0 (the last masked by mlast) kept in
 * registers over all rows */
AVX512 INLINE void values16(const struct moe_attn_params *ap, float *out, const float *pr, int32_t first, int32_t p,
                            int kvh, int d0, const int nv, __mmask16 mlast, const uint32_t kt)
{
    __m512 acc[8];
    _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
        acc[c] = _mm512_setzero_ps();
    struct row_iter it = row_iter_at(ap, first);
    const uint8_t *v0 = (const uint8_t *)ap->v_cache + kv_bytes(kt, (int64_t)kvh * ap->head_dim_v);
    for (int32_t r = first; r <= p; r++) {
        const uint8_t *vb = v0 + kv_bytes(kt, row_iter_next(&it) * ap->v_row);
        const __m512 a = _mm512_set1_ps(pr[r]);
        _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
            acc[c] = _mm512_add_ps(acc[c], _mm512_mul_ps(a, vload16(vb, kt, d0 + 16 * c,
                                                                    c == nv - 1 ? mlast : (__mmask16)0xffff)));
    }
    _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
        _mm512_mask_storeu_ps(out + d0 + 16 * c, c == nv - 1 ? mlast : (__mmask16)0xffff, acc[c]);
}

AVX512 INLINE void values_avx512_t(const struct moe_attn_params *ap, float *out, const float *pr, int32_t first,
                                   int32_t p, int kvh, const uint32_t kt)
{
    const int hdv = ap->head_dim_v;
    for (int d0 = 0; d0 < hdv; d0 += 128) {
        const int left = hdv - d0, nv = left >= 128 ? 8 : (left + 15) / 16;
        const __mmask16 ml = left >= 16 * nv ? (__mmask16)0xffff : (__mmask16)((1u << (left % 16)) - 1);
        switch (nv) {
        case 1: values16(ap, out, pr, first, p, kvh, d0, 1, ml, kt); break;
        case 2: values16(ap, out, pr, first, p, kvh, d0, 2, ml, kt); break;
        case 3: values16(ap, out, pr, first, p, kvh, d0, 3, ml, kt); break;
        case 4: values16(ap, out, pr, first, p, kvh, d0, 4, ml, kt); break;
        case 5: values16(ap, out, pr, first, p, kvh, d0, 5, ml, kt); break;
        case 6: values16(ap, out, pr, first, p, kvh, d0, 6, ml, kt); break;
        case 7: values16(ap, out, pr, first, p, kvh, d0, 7, ml, kt); break;
        default: values16(ap, out, pr, first, p, kvh, d0, 8, ml, kt); break;
        }
    }
}

AVX512 static void values_avx512(const struct moe_attn_params *ap, float *out, const float *pr, int32_t first,
                                 int32_t p, int kvh)
{
    switch (ap->kv_type) {
    case MOE_DTYPE_F16: values_avx512_t(ap, out, pr, first, p, kvh, MOE_DTYPE_F16); break;
    case MOE_DTYPE_Q8_0: values_avx512_t(ap, out, pr, first, p, kvh, MOE_DTYPE_Q8_0); break;
    default: values_avx512_t(ap, out, pr, first, p, kvh, MOE_DTYPE_F32); break;
    }
}

/* ---- a GQA group on AVX-512 --------------------------------------------- */

/* The query heads that share a KV head, together: each block of 16 K rows
 * and V rows is loaded (and converted from half or Q8_0) once for all of
 * them, then every head does what moe_cpu_attn_head does with it. Each
 * head's floats are moe_cpu_attn_head's: the same products, the same
 * reductions, the output accumulated in the same row order (kept in the
 * output row between blocks). */
#define GROUP_MAX 16
#define GROUP_HD 256

/* dots16_f16's arithmetic on K rows already converted to floats */
AVX512 INLINE __m512 dots16_f16f(const float *kf, const float *qf, const int hd)
{
    __m512 S[16];
    const int hm = hd & ~31;
    _Pragma("GCC unroll 16") for (int j = 0; j < 16; j++) {
        const float *k = kf + j * GROUP_HD;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (int i = 0; i < hm; i += 32) {
            a0 = _mm512_fmadd_ps(_mm512_load_ps(k + i), _mm512_load_ps(qf + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_load_ps(k + i + 16), _mm512_load_ps(qf + i + 16), a1);
        }
        S[j] = _mm512_add_ps(a0, a1);
    }
    __m512 r = reduce16(S);
    if (hm < hd) { /* 16 left: dot_f16_avx2 */
        __m256 T[16];
        for (int j = 0; j < 16; j++) {
            const float *k = kf + j * GROUP_HD + hm;
            const __m256 a0 = _mm256_fmadd_ps(_mm256_load_ps(k), _mm256_load_ps(qf + hm), _mm256_setzero_ps());
            const __m256 a1 = _mm256_fmadd_ps(_mm256_load_ps(k + 8), _mm256_load_ps(qf + hm + 8),
                                              _mm256_setzero_ps());
            T[j] = _mm256_add_ps(a0, a1);
        }
        r = _mm512_add_ps(r, reduce8x2(T));
    }
    return r;
}

AVX512 INLINE void group_scores_t(const struct moe_attn_params *ap, const float *q, const uint8_t *qx,
                                  size_t qx_stride, const float *qf, float *s, size_t s_stride, int32_t first,
                                  int32_t p, int kvh, float *max, const int hd, const uint32_t kt)
{
    const int G = ap->n_head / ap->n_head_kv;
    const __m512 vscale = _mm512_set1_ps(ap->scale);
    const uint8_t *k0 = (const uint8_t *)ap->k_cache + kv_bytes(kt, (int64_t)kvh * hd);
    struct row_iter it = row_iter_at(ap, first);
    __m512 vmax[GROUP_MAX];
    for (int g = 0; g < G; g++)
        vmax[g] = _mm512_set1_ps(-INFINITY);
    float kf[16 * GROUP_HD] __attribute__((aligned(64)));
    for (int32_t r0 = first; r0 <= p; r0 += 16) {
        const int n = p - r0 + 1 < 16 ? p - r0 + 1 : 16;
        const uint8_t *kp[16];
        gather_rows(ap, &it, k0, n, 16, kp);
        if (kt == MOE_DTYPE_F16)
            for (int j = 0; j < 16; j++)
                _Pragma("GCC unroll 16") for (int c = 0; c < hd / 16; c++)
                    _mm512_store_ps(kf + j * GROUP_HD + 16 * c,
                                    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kp[j] + 16 * c))));
        const __mmask16 m = (__mmask16)((1u << n) - 1);
        for (int g = 0; g < G; g++) {
            __m512 d;
            if (kt == MOE_DTYPE_F16)
                d = dots16_f16f(kf, qf + (size_t)g * GROUP_HD, hd);
            else if (kt == MOE_DTYPE_F32)
                d = dots16_f32(kp, q + (size_t)g * hd, hd);
            else
                d = dots16_q8_0(kp, (const struct moe_block_q8_0 *)(qx + (size_t)g * qx_stride), hd / 32);
            const __m512 sc = _mm512_mul_ps(d, vscale);
            _mm512_mask_storeu_ps(s + (size_t)g * s_stride + r0, m, sc);
            vmax[g] = _mm512_mask_max_ps(vmax[g], m, sc, vmax[g]);
        }
    }
    for (int g = 0; g < G; g++)
        max[g] = _mm512_reduce_max_ps(vmax[g]);
}

/* The group's value sums for elements d0 .. d0 + 16 nv of every head */
AVX512 INLINE void group_values16(const struct moe_attn_params *ap, float *out, const float *pr, size_t s_stride,
                                  int32_t first, int32_t p, int kvh, int d0, const int nv, __mmask16 mlast,
                                  const uint32_t kt)
{
    const int G = ap->n_head / ap->n_head_kv, hdv = ap->head_dim_v;
    const uint8_t *v0 = (const uint8_t *)ap->v_cache + kv_bytes(kt, (int64_t)kvh * hdv);
    struct row_iter it = row_iter_at(ap, first);
    float vf[16 * 128] __attribute__((aligned(64)));
    for (int g = 0; g < G; g++)
        _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
            _mm512_mask_storeu_ps(out + (size_t)g * hdv + d0 + 16 * c, c == nv - 1 ? mlast : (__mmask16)0xffff,
                                  _mm512_setzero_ps());
    for (int32_t r0 = first; r0 <= p; r0 += 16) {
        const int n = p - r0 + 1 < 16 ? p - r0 + 1 : 16;
        for (int j = 0; j < n; j++) {
            const uint8_t *vb = v0 + kv_bytes(kt, row_iter_next(&it) * ap->v_row);
            _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
                _mm512_store_ps(vf + j * 128 + 16 * c,
                                vload16(vb, kt, d0 + 16 * c, c == nv - 1 ? mlast : (__mmask16)0xffff));
        }
        for (int g = 0; g < G; g++) {
            float *o = out + (size_t)g * hdv + d0;
            const float *prg = pr + (size_t)g * s_stride + r0;
            __m512 acc[8];
            _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
                acc[c] = _mm512_maskz_loadu_ps(c == nv - 1 ? mlast : (__mmask16)0xffff, o + 16 * c);
            for (int j = 0; j < n; j++) {
                const __m512 a = _mm512_set1_ps(prg[j]);
                _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
                    acc[c] = _mm512_add_ps(acc[c], _mm512_mul_ps(a, _mm512_load_ps(vf + j * 128 + 16 * c)));
            }
            _Pragma("GCC unroll 8") for (int c = 0; c < nv; c++)
                _mm512_mask_storeu_ps(o + 16 * c, c == nv - 1 ? mlast : (__mmask16)0xffff, acc[c]);
        }
    }
}

AVX512 INLINE void group_values_t(const struct moe_attn_params *ap, float *out, const float *pr, size_t s_stride,
                                  int32_t first, int32_t p, int kvh, const uint32_t kt)
{
    const int hdv = ap->head_dim_v;
    for (int d0 = 0; d0 < hdv; d0 += 128) {
        const int left = hdv - d0, nv = left >= 128 ? 8 : (left + 15) / 16;
        const __mmask16 ml = left >= 16 * nv ? (__mmask16)0xffff : (__mmask16)((1u << (left % 16)) - 1);
        switch (nv) {
        case 1: group_values16(ap, out, pr, s_stride, first, p, kvh, d0, 1, ml, kt); break;
        case 2: group_values16(ap, out, pr, s_stride, first, p, kvh, d0, 2, ml, kt); break;
        case 3: group_values16(ap, out, pr, s_stride, first, p, kvh, d0, 3, ml, kt); break;
        case 4: group_values16(ap, out, pr, s_stride, first, p, kvh, d0, 4, ml, kt); break;
        case 5: group_values16(ap, out, pr, s_stride, first, p, kvh, d0, 5, ml, kt); break;
        case 6: group_values16(ap, out, pr, s_stride, first, p, kvh, d0, 6, ml, kt); break;
        case 7: group_values16(ap, out, pr, s_stride, first, p, kvh, d0, 7, ml, kt); break;
        default: group_values16(ap, out, pr, s_stride, first, p, kvh, d0, 8, ml, kt); break;
        }
    }
}

/* scores rows of the group in the scratch: 64-byte aligned, s_stride floats */
static size_t group_stride(int32_t p)
{
    return ((size_t)(p + 1) + 15) & ~(size_t)15;
}

AVX512 static void group_avx512(const struct moe_attn_params *ap, float *out, const float *q, int32_t p, int kvh,
                                void *scratch)
{
    const int G = ap->n_head / ap->n_head_kv, hd = ap->head_dim;
    const uint32_t kt = ap->kv_type;
    int32_t first = 0;
    if (ap->window > 0 && p - ap->window + 1 > 0)
        first = p - ap->window + 1;
    float *s = scratch;
    const size_t ss = group_stride(p);
    /* q in K's format per head (as moe_cpu_attn_head), F16's as floats */
    uint8_t qx[GROUP_MAX * GROUP_HD * 2] __attribute__((aligned(64)));
    float qf[GROUP_MAX * GROUP_HD] __attribute__((aligned(64)));
    const size_t qxs = GROUP_HD * 2;
    for (int g = 0; g < G; g++) {
        const float *qg = q + (size_t)g * hd;
        if (kt == MOE_DTYPE_F16)
            for (int d = 0; d < hd; d++)
                qf[(size_t)g * GROUP_HD + d] = moe_fp16_to_fp32(moe_fp32_to_fp16(qg[d]));
        else if (kt == MOE_DTYPE_Q8_0)
            moe_vecdot_quantize_act(MOE_DTYPE_Q8_0, qg, qx + (size_t)g * qxs, hd);
    }
    float max[GROUP_MAX];
    switch (kt) {
    case MOE_DTYPE_F16:
        if (hd == 128)
            group_scores_t(ap, q, qx, qxs, qf, s, ss, first, p, kvh, max, 128, MOE_DTYPE_F16);
        else if (hd == 64)
            group_scores_t(ap, q, qx, qxs, qf, s, ss, first, p, kvh, max, 64, MOE_DTYPE_F16);
        else
            group_scores_t(ap, q, qx, qxs, qf, s, ss, first, p, kvh, max, hd, MOE_DTYPE_F16);
        break;
    case MOE_DTYPE_F32: group_scores_t(ap, q, qx, qxs, qf, s, ss, first, p, kvh, max, hd, MOE_DTYPE_F32); break;
    default:
        if (hd == 128)
            group_scores_t(ap, q, qx, qxs, qf, s, ss, first, p, kvh, max, 128, MOE_DTYPE_Q8_0);
        else
            group_scores_t(ap, q, qx, qxs, qf, s, ss, first, p, kvh, max, hd, MOE_DTYPE_Q8_0);
        break;
    }
    for (int g = 0; g < G; g++) {
        float *sg = s + (size_t)g * ss;
        const float inv = softmax_rows(ap, sg, first, p, max[g], kvh * G + g);
        probs_avx512(sg, first, p, inv, kt == MOE_DTYPE_F16);
    }
    switch (kt) {
    case MOE_DTYPE_F16: group_values_t(ap, out, s, ss, first, p, kvh, MOE_DTYPE_F16); break;
    case MOE_DTYPE_Q8_0: group_values_t(ap, out, s, ss, first, p, kvh, MOE_DTYPE_Q8_0); break;
    default: group_values_t(ap, out, s, ss, first, p, kvh, MOE_DTYPE_F32); break;
    }
}
#endif

/* ---- one (token, head) ------------------------------------------------ */

enum { PATH_SCALAR, PATH_AVX2, PATH_AVX512 };

static int path_now(void)
{
    const char *s = moe_vecdot_impl();
    return strcmp(s, "avx512vnni") == 0 ? PATH_AVX512 : strcmp(s, "avx2") == 0 ? PATH_AVX2 : PATH_SCALAR;
}

void moe_cpu_attn_head(const struct moe_attn_params *ap, float *out, const float *q, int32_t p, int h,
                       void *scratch)
{
    const int kvh = h / (ap->n_head / ap->n_head_kv);
    const int hd = ap->head_dim;
    const uint32_t kt = ap->kv_type;
    int32_t first = 0;
    if (ap->window > 0 && p - ap->window + 1 > 0)
        first = p - ap->window + 1;

    /* Scratch: scores [p + 1], q in K's format, a V row. */
    uint8_t *base = scratch;
    float *s = (float *)base;
    uint8_t *qx = base + (((size_t)(p + 1) * sizeof(float) + 63) & ~(size_t)63);
    float *vrow = (float *)(qx + attn_q_bytes(kt, hd));
    if (kt == MOE_DTYPE_F16)
        for (int d = 0; d < hd; d++)
            ((uint16_t *)qx)[d] = moe_fp32_to_fp16(q[d]);
    else if (kt == MOE_DTYPE_Q8_0)
        moe_vecdot_quantize_act(MOE_DTYPE_Q8_0, q, qx, hd);

    const int path = path_now();
    float max;
    int done = 0;
#ifdef MOE_X86
    if (path == PATH_AVX512)
        done = scores_avx512(ap, q, qx, s, first, p, kvh, &max);
    else if (path == PATH_AVX2)
        done = scores_avx2(ap, q, qx, s, first, p, kvh, &max);
#endif
    if (!done)
        max = scores_rows(ap, q, qx, s, first, p, kvh);

    const float inv = softmax_rows(ap, s, first, p, max, h);
    /* s[r] becomes what V row r is multiplied by */
#ifdef MOE_X86
    if (path == PATH_AVX512) {
        probs_avx512(s, first, p, inv, kt == MOE_DTYPE_F16);
        values_avx512(ap, out, s, first, p, kvh);
        return;
    }
    if (path == PATH_AVX2) {
        probs_avx2(s, first, p, inv, kt == MOE_DTYPE_F16);
        values_avx2(ap, out, s, first, p, kvh);
        return;
    }
#endif
    for (int32_t r = first; r <= p; r++) {
        const float pr = s[r] * inv;
        s[r] = kt == MOE_DTYPE_F16 ? moe_fp16_to_fp32(moe_fp32_to_fp16(pr)) : pr;
    }
    values_rows(ap, out, s, first, p, kvh, vrow);
}

size_t moe_cpu_attn_group_scratch(const struct moe_attn_params *ap, int32_t p)
{
#ifdef MOE_X86
    const int G = ap->n_head / ap->n_head_kv, hd = ap->head_dim;
    if (path_now() != PATH_AVX512 || G < 2 || G > GROUP_MAX || hd > GROUP_HD ||
        (ap->kv_type == MOE_DTYPE_F16 && hd % 16) || (ap->kv_type == MOE_DTYPE_F32 && hd % 8))
        return 0;
    return (size_t)G * group_stride(p) * sizeof(float);
#else
    (void)ap;
    (void)p;
    return 0;
#endif
}

void moe_cpu_attn_group(const struct moe_attn_params *ap, float *out, const float *q, int32_t p, int kvh,
                        void *scratch)
{
#ifdef MOE_X86
    group_avx512(ap, out, q, p, kvh, scratch);
#else
    (void)ap, (void)out, (void)q, (void)p, (void)kvh, (void)scratch;
    MOE_ASSERT(0);
#endif
}

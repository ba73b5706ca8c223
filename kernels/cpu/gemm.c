/* Prefill products (see gemm.h).
 *
 * A tile kernel computes a panel of up to GEMM_MR weight rows against all
 * the tokens it is given, holding the panel's unpacked weights in a stack
 * buffer or registers while the tokens stream past, and writes y itself.
 * Each must give, per (row, token), the float moe_vecdot gives on the same
 * path: in practice the kernel and the path's row kernel in vecdot.c share
 * the definition of the float sum (written next to each), and
 * tests/unit/test_gemm.c compares them bit for bit on every path.
 *
 * Adding a type: write the kernel (gemm_tile_fn), add a row to tiles[]
 * with the SIMD level it needs. Types without a row fall back to
 * moe_vecdot_rows, four tokens per call. */
#include <stddef.h>
#include <string.h>

#include "common/dtype.h"
#include "common/error.h"
#include "kernels/blocks.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/vecdot.h"
#include "kernels/cpu/vecdot-impl.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOE_X86 1
#endif

/* the most rows one tile kernel call takes */
#define GEMM_MR 16

/* nr (1..GEMM_MR) rows w + r * row_bytes against n_tok tokens: y[k * ldy +
 * r] (+ bias[r]), n elements per row. */
typedef void (*gemm_tile_fn)(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t act_stride,
                             int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias);

enum gemm_level { LEVEL_SCALAR, LEVEL_AVX2, LEVEL_AVX512 };

/* One token (decode): n_rows rows, y[r] (+ bias[r]). */
typedef void (*gemm_gemv_fn)(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n,
                             float *y, const float *bias);

struct gemm_tile {
    enum gemm_level level;   /* the path it belongs to (moe_vecdot_impl) */
    uint32_t dtype;
    int min_tok;             /* fewer tokens: the row kernels are faster */
    gemm_tile_fn fn;
    gemm_gemv_fn gemv;       /* optional: one token, several rows at a time */
    int whole;               /* unpacks each row once per call (moe_gemm_whole_tokens) */
};


#ifdef MOE_X86
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

/* 16 x 16 dwords transposed in place: r[i] lane j <-> r[j] lane i. */
AVX512 static inline __attribute__((always_inline)) void transpose16(__m512i r[16])
{
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    /* u[4g + e], 128-bit lane L: rows 4g..4g+3, element 4L + e */
    for (int e = 0; e < 4; e++) {
        const __m512i vlo = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), vhi = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xee);
        const __m512i wlo = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44), whi = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xee);
        r[e] = _mm512_shuffle_i32x4(vlo, wlo, 0x88);
        r[4 + e] = _mm512_shuffle_i32x4(vlo, wlo, 0xdd);
        r[8 + e] = _mm512_shuffle_i32x4(vhi, whi, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(vhi, whi, 0xdd);
    }
}

/* ---- Q4_K x Q8_K, AVX-512 VNNI ----------------------------------------
 *
 * One weight row per 32-bit lane: a panel of 16 rows is unpacked per
 * super-block into 64 vectors of codes (group j, four codes 4c..4c+3 of
 * every row: dpbusd against the token's four q8 bytes broadcast), the
 * group scales and the minimums per lane, d and dmin as floats per lane.
 * A token then costs 64 dpbusd, 8 multiplies by the scales and 8 dpwssd
 * for the minimums per super-block for all 16 rows, against 4 maddubs +
 * 4 dpwssd per row in the row kernel. The floats follow the definition
 * at vecdot.c's q4_k_rows: per super-block, the exact integer dot T and
 * minimum term M, acc = fma(d * d(y), T, acc), accm = fma(dmin * d(y), M,
 * accm), then acc - accm; lanes are rows, so the lane arithmetic is that
 * scalar sequence per row. */

#define Q4K_SB 16  /* super-blocks unpacked at a time (82 KiB): rows of up to 4096 at once */
#define Q4K_NT 4   /* tokens in registers at a time */
#define Q4K_G 2    /* groups whose sums are in registers at a time */

struct q4k_panel {
    __m512i q[Q4K_SB][64];   /* [group j * 8 + c]: codes 4c..4c+3 of group j, per row */
    __m512i sc[Q4K_SB][8];   /* scale of group j, per row (int32) */
    __m512i mn[Q4K_SB][8];   /* min of group j twice (int16 pair), per row */
    __m512 d[Q4K_SB], dm[Q4K_SB];
};

/* Q4_K or, with five set, Q5_K (the same header; the fifth bit of code l
 * of group j is bit j of qh[l]). */
AVX512 static void q4k_unpack(struct q4k_panel *p, const uint8_t *w, size_t row_bytes, int nr, int64_t i0, int nsb,
                              int five)
{
    static const uint8_t zero[sizeof(struct moe_block_q5_k)];
    const size_t bsize = five ? sizeof(struct moe_block_q5_k) : sizeof(struct moe_block_q4_k);
    const size_t qs_off = five ? offsetof(struct moe_block_q5_k, qs) : offsetof(struct moe_block_q4_k, qs);
    const __m512i m4 = _mm512_set1_epi8(0xf), one = _mm512_set1_epi8(1);
    const __m512i m6 = _mm512_set1_epi32(0x3f3f3f3f), k4 = _mm512_set1_epi32(0x0f0f0f0f);
    const __m512i k2 = _mm512_set1_epi32(0x03030303), b8 = _mm512_set1_epi32(0xff);
    for (int s = 0; s < nsb; s++) {
        const uint8_t *b[16];
        for (int r = 0; r < 16; r++) {
            b[r] = r < nr ? w + (size_t)r * row_bytes + (size_t)(i0 + s) * bsize : zero;
            /* the next panel's rows (the next call, most often): from
             * memory, 16 rows' blocks in step are not streamed ahead by
             * the hardware as one row's are */
            const char *nx = (const char *)w + (size_t)(r + 16) * row_bytes + (size_t)(i0 + s) * bsize;
            for (size_t o = 0; o < bsize; o += 64)
                _mm_prefetch(nx + o, _MM_HINT_T1);
        }
        /* header: d | dmin, scales[0..3], [4..7], [8..11] per row */
        __m512i h[16];
        for (int r = 0; r < 16; r++)
            h[r] = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)b[r]));
        transpose16(h);
        const __m512i u0 = h[1], u1 = h[2], u2 = h[3];
        /* blocks.h's scale layout with the word operations of
         * vecdot.c's unpack_k_scales, one row per lane */
        const __m512i o[4] = {
            _mm512_and_si512(u0, m6),
            _mm512_or_si512(_mm512_and_si512(u2, k4), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u0, 6), k2), 4)),
            _mm512_and_si512(u1, m6),
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u2, 4), k4),
                            _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u1, 6), k2), 4)),
        };
        for (int j = 0; j < 8; j++) {
            p->sc[s][j] = _mm512_and_si512(_mm512_srli_epi32(o[j / 4], 8 * (j % 4)), b8);
            const __m512i m = _mm512_and_si512(_mm512_srli_epi32(o[2 + j / 4], 8 * (j % 4)), b8);
            p->mn[s][j] = _mm512_or_si512(m, _mm512_slli_epi32(m, 16));
        }
        p->d[s] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h[0]));
        p->dm[s] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h[0], 16)));
        __m512i qh[16];
        if (five) {
            for (int r = 0; r < 16; r++)
                qh[r] = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b[r] + offsetof(struct moe_block_q5_k, qh))));
            transpose16(qh);
        }
        /* codes: dword k of qs (bytes 4k..4k+3) of every row; its low
         * nibbles are codes 4c..4c+3 of group 2 (k / 8), its high ones of
         * group 2 (k / 8) + 1, c = k % 8 */
        for (int half = 0; half < 2; half++) {
            __m512i q[16];
            for (int r = 0; r < 16; r++)
                q[r] = _mm512_loadu_si512(b[r] + qs_off + 64 * half);
            transpose16(q);
            for (int k = 0; k < 16; k++) {
                const int kk = 16 * half + k, j = 2 * (kk / 8), c = kk % 8;
                __m512i lo = _mm512_and_si512(q[k], m4), hi = _mm512_and_si512(_mm512_srli_epi32(q[k], 4), m4);
                if (five) {
                    lo = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh[c], j), one), 4));
                    hi = _mm512_or_si512(hi, _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(qh[c], j + 1), one), 4));
                }
                p->q[s][j * 8 + c] = lo;
                p->q[s][(j + 1) * 8 + c] = hi;
            }
        }
    }
}

/* acc + dpbusd(w, the four bytes at p in every lane): the broadcast as
 * the instruction's memory operand (one fused uop; the compilers emit a
 * separate vpbroadcastd for _mm512_set1_epi32 of a load) */
AVX512 static inline __attribute__((always_inline)) __m512i dpbusd_bcast(__m512i acc, __m512i w, const int8_t *p)
{
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)p));
    return acc;
}

AVX512 static inline __attribute__((always_inline)) void q4k_tokens(const struct q4k_panel *p, int nsb, int64_t i0,
                                                                    const uint8_t *act, size_t stride, const int NT,
                                                                    __m512 *acc, __m512 *accm)
{
    for (int s = 0; s < nsb; s++) {
        const struct moe_block_q8_k *y[Q4K_NT];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
            y[t] = (const struct moe_block_q8_k *)(act + (size_t)t * stride) + i0 + s;
        __m512i isum[Q4K_NT], msum[Q4K_NT];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            isum[t] = _mm512_setzero_si512();
            msum[t] = _mm512_setzero_si512();
        }
        /* Q4K_G groups at a time: Q4K_G x NT independent dpbusd chains
         * (the eight of one group and token are a chain of 8 x 5 cycles) */
        for (int j = 0; j < 8; j += Q4K_G) {
            __m512i ds[Q4K_G][Q4K_NT];
            _Pragma("GCC unroll 4") for (int g = 0; g < Q4K_G; g++)
                _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
                    ds[g][t] = _mm512_setzero_si512();
            _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) {
                _Pragma("GCC unroll 4") for (int g = 0; g < Q4K_G; g++) {
                    const __m512i wq = p->q[s][(j + g) * 8 + c];
                    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
                        ds[g][t] = dpbusd_bcast(ds[g][t], wq, y[t]->qs + 32 * (j + g) + 4 * c);
                }
            }
            _Pragma("GCC unroll 4") for (int g = 0; g < Q4K_G; g++)
                _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                    int32_t bs;
                    memcpy(&bs, y[t]->bsums + 2 * (j + g), 4);
                    isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(ds[g][t], p->sc[s][j + g]));
                    msum[t] = _mm512_dpwssd_epi32(msum[t], p->mn[s][j + g], _mm512_set1_epi32(bs));
                }
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            const __m512 yd = _mm512_set1_ps(y[t]->d);
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(p->d[s], yd), _mm512_cvtepi32_ps(isum[t]), acc[t]);
            accm[t] = _mm512_fmadd_ps(_mm512_mul_ps(p->dm[s], yd), _mm512_cvtepi32_ps(msum[t]), accm[t]);
        }
    }
}

/* Tokens are taken in blocks of GEMM_TOK so that the running sums of a
 * block fit on the stack when a row has more than Q4K_SB super-blocks. */
#define GEMM_TOK 64

/* y[t * ldy + lane] = acc[t] (- accm[t]) (+ bias) for t < nt, lanes in keep */
AVX512 static inline __attribute__((always_inline)) void tile_store(int64_t nt, const __m512 *acc,
                                                                    const __m512 *accm, float *y, int64_t ldy,
                                                                    __mmask16 keep, const float *bias, __m512 vb)
{
    for (int64_t t = 0; t < nt; t++) {
        __m512 v = accm ? _mm512_sub_ps(acc[t], accm[t]) : acc[t];
        if (bias)
            v = _mm512_add_ps(v, vb);
        _mm512_mask_storeu_ps(y + t * ldy, keep, v);
    }
}

AVX512 static void q45k_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                             int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias, int five)
{
    struct q4k_panel p;
    const int64_t nb = n / MOE_QK_K;
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    if (nb <= Q4K_SB) {
        /* the whole rows unpacked once for every token, the sums of four
         * tokens in registers */
        q4k_unpack(&p, w, row_bytes, nr, 0, (int)nb, five);
        for (int64_t k = 0; k < n_tok; k += Q4K_NT) {
            const uint8_t *a = act + (size_t)k * stride;
            __m512 acc[Q4K_NT], accm[Q4K_NT];
            for (int t = 0; t < Q4K_NT; t++)
                acc[t] = accm[t] = _mm512_setzero_ps();
            const int nt = n_tok - k < Q4K_NT ? (int)(n_tok - k) : Q4K_NT;
            switch (nt) {
            case 4: q4k_tokens(&p, (int)nb, 0, a, stride, 4, acc, accm); break;
            case 3: q4k_tokens(&p, (int)nb, 0, a, stride, 3, acc, accm); break;
            case 2: q4k_tokens(&p, (int)nb, 0, a, stride, 2, acc, accm); break;
            default: q4k_tokens(&p, (int)nb, 0, a, stride, 1, acc, accm); break;
            }
            tile_store(nt, acc, accm, y + k * ldy, ldy, keep, bias, vb);
        }
        return;
    }
    __m512 sacc[GEMM_TOK], saccm[GEMM_TOK];
    for (int64_t k0 = 0; k0 < n_tok; k0 += GEMM_TOK) {
        const int64_t nk = n_tok - k0 < GEMM_TOK ? n_tok - k0 : GEMM_TOK;
        for (int64_t k = 0; k < nk; k++)
            sacc[k] = saccm[k] = _mm512_setzero_ps();
        for (int64_t i0 = 0; i0 < nb; i0 += Q4K_SB) {
            const int nsb = nb - i0 < Q4K_SB ? (int)(nb - i0) : Q4K_SB;
            q4k_unpack(&p, w, row_bytes, nr, i0, nsb, five);
            for (int64_t k = 0; k < nk; k += Q4K_NT) {
                const uint8_t *a = act + (size_t)(k0 + k) * stride;
                switch (nk - k < Q4K_NT ? (int)(nk - k) : Q4K_NT) {
                case 4: q4k_tokens(&p, nsb, i0, a, stride, 4, sacc + k, saccm + k); break;
                case 3: q4k_tokens(&p, nsb, i0, a, stride, 3, sacc + k, saccm + k); break;
                case 2: q4k_tokens(&p, nsb, i0, a, stride, 2, sacc + k, saccm + k); break;
                default: q4k_tokens(&p, nsb, i0, a, stride, 1, sacc + k, saccm + k); break;
                }
            }
        }
        tile_store(nk, sacc, saccm, y + k0 * ldy, ldy, keep, bias, vb);
    }
}

AVX512 static void q4k_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                            int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q45k_tile(w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias, 0);
}

/* Q5_K: Q4_K's kernel with the fifth bit in the codes (0..31); the floats
 * as vecdot.c's q5_k_rows (Q4_K's definition). */
AVX512 static void q5k_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                            int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q45k_tile(w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias, 1);
}

/* ---- Q6_K x Q8_K, AVX-512 VNNI ----------------------------------------
 *
 * As Q4_K: one row per lane, 64 vectors of codes 0..63 per super-block
 * (ql's nibble and qh's bit pair of four elements), the 16 group scales
 * per lane (int32) and as pairs (int16) for the block-sum term. The floats
 * follow vecdot.c's q6_k_rows: per super-block the exact S = T - 32 C,
 * acc = fma(d * d(y), S, acc). */

struct q6k_panel {
    __m512i q[Q4K_SB][64];   /* codes 4e..4e+3 per row */
    __m512i sc[Q4K_SB][16];  /* scale of group g (16 elements), per row */
    __m512i sp[Q4K_SB][8];   /* scales of groups 2p, 2p + 1 as an int16 pair */
    __m512 d[Q4K_SB];
};

AVX512 static void q6k_unpack(struct q6k_panel *p, const uint8_t *w, size_t row_bytes, int nr, int64_t i0, int nsb)
{
    static const uint8_t zero[sizeof(struct moe_block_q6_k)];
    const __m512i k4 = _mm512_set1_epi32(0x0f0f0f0f), k2 = _mm512_set1_epi32(0x03030303);
    const __m512i lo16 = _mm512_set1_epi32(0xffff);
    for (int s = 0; s < nsb; s++) {
        const struct moe_block_q6_k *b[16];
        uint16_t dh[16];
        for (int r = 0; r < 16; r++) {
            b[r] = r < nr ? (const struct moe_block_q6_k *)(w + (size_t)r * row_bytes) + i0 + s
                          : (const struct moe_block_q6_k *)zero;
            dh[r] = b[r]->d;
            /* the next panel's rows, as q4k_unpack */
            const char *nx = (const char *)w + (size_t)(r + 16) * row_bytes + (size_t)(i0 + s) * sizeof(*b[r]);
            for (size_t o = 0; o < sizeof(*b[r]); o += 64)
                _mm_prefetch(nx + o, _MM_HINT_T1);
        }
        p->d[s] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dh));
        __m512i h[16];
        for (int r = 0; r < 16; r++)
            h[r] = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)b[r]->scales));
        transpose16(h);
        for (int g = 0; g < 16; g++)
            p->sc[s][g] = _mm512_srai_epi32(_mm512_slli_epi32(h[g / 4], 24 - 8 * (g % 4)), 24);
        for (int q = 0; q < 8; q++)
            p->sp[s][q] = _mm512_or_si512(_mm512_and_si512(p->sc[s][2 * q], lo16), _mm512_slli_epi32(p->sc[s][2 * q + 1], 16));
        __m512i la[16], lb[16], hh[16];
        for (int r = 0; r < 16; r++) {
            la[r] = _mm512_loadu_si512(b[r]->ql);
            lb[r] = _mm512_loadu_si512(b[r]->ql + 64);
            hh[r] = _mm512_loadu_si512(b[r]->qh);
        }
        transpose16(la);
        transpose16(lb);
        transpose16(hh);
        /* codes 4e..4e+3: half n of 128, part (which 32) and l in it */
        for (int e = 0; e < 64; e++) {
            const int n = e / 32, off = (e % 32) * 4, part = off / 32, l = off % 32;
            const int k = n * 16 + (part & 1) * 8 + l / 4;
            const __m512i ql = k < 16 ? la[k] : lb[k - 16];
            const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(ql, 4 * (part >> 1)), k4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(hh[n * 8 + l / 4], 2 * part), k2);
            p->q[s][e] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 4));
        }
    }
}

AVX512 static inline __attribute__((always_inline)) void q6k_tokens(const struct q6k_panel *p, int nsb, int64_t i0,
                                                                    const uint8_t *act, size_t stride, const int NT,
                                                                    __m512 *acc)
{
    for (int s = 0; s < nsb; s++) {
        const struct moe_block_q8_k *y[Q4K_NT];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
            y[t] = (const struct moe_block_q8_k *)(act + (size_t)t * stride) + i0 + s;
        __m512i isum[Q4K_NT], csum[Q4K_NT];
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            isum[t] = _mm512_setzero_si512();
            csum[t] = _mm512_setzero_si512();
        }
        /* two groups at a time, as q4k_tokens */
        for (int g = 0; g < 16; g += 2) {
            __m512i da[Q4K_NT], db[Q4K_NT];
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
                da[t] = db[t] = _mm512_setzero_si512();
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
                const __m512i wa = p->q[s][4 * g + c], wb = p->q[s][4 * (g + 1) + c];
                _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                    da[t] = dpbusd_bcast(da[t], wa, y[t]->qs + 16 * g + 4 * c);
                    db[t] = dpbusd_bcast(db[t], wb, y[t]->qs + 16 * (g + 1) + 4 * c);
                }
            }
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(da[t], p->sc[s][g]));
                isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(db[t], p->sc[s][g + 1]));
            }
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            _Pragma("GCC unroll 8") for (int q = 0; q < 8; q++) {
                int32_t bs;
                memcpy(&bs, y[t]->bsums + 2 * q, 4);
                csum[t] = _mm512_dpwssd_epi32(csum[t], p->sp[s][q], _mm512_set1_epi32(bs));
            }
            const __m512i st = _mm512_sub_epi32(isum[t], _mm512_slli_epi32(csum[t], 5));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(p->d[s], _mm512_set1_ps(y[t]->d)), _mm512_cvtepi32_ps(st), acc[t]);
        }
    }
}

AVX512 static void q6k_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                            int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    struct q6k_panel p;
    const int64_t nb = n / MOE_QK_K;
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    if (nb <= Q4K_SB) {
        /* as q45k_tile: the whole rows unpacked once */
        q6k_unpack(&p, w, row_bytes, nr, 0, (int)nb);
        for (int64_t k = 0; k < n_tok; k += Q4K_NT) {
            const uint8_t *a = act + (size_t)k * stride;
            __m512 acc[Q4K_NT];
            for (int t = 0; t < Q4K_NT; t++)
                acc[t] = _mm512_setzero_ps();
            const int nt = n_tok - k < Q4K_NT ? (int)(n_tok - k) : Q4K_NT;
            switch (nt) {
            case 4: q6k_tokens(&p, (int)nb, 0, a, stride, 4, acc); break;
            case 3: q6k_tokens(&p, (int)nb, 0, a, stride, 3, acc); break;
            case 2: q6k_tokens(&p, (int)nb, 0, a, stride, 2, acc); break;
            default: q6k_tokens(&p, (int)nb, 0, a, stride, 1, acc); break;
            }
            tile_store(nt, acc, NULL, y + k * ldy, ldy, keep, bias, vb);
        }
        return;
    }
    __m512 sacc[GEMM_TOK];
    for (int64_t k0 = 0; k0 < n_tok; k0 += GEMM_TOK) {
        const int64_t nk = n_tok - k0 < GEMM_TOK ? n_tok - k0 : GEMM_TOK;
        for (int64_t k = 0; k < nk; k++)
            sacc[k] = _mm512_setzero_ps();
        for (int64_t i0 = 0; i0 < nb; i0 += Q4K_SB) {
            const int nsb = nb - i0 < Q4K_SB ? (int)(nb - i0) : Q4K_SB;
            q6k_unpack(&p, w, row_bytes, nr, i0, nsb);
            for (int64_t k = 0; k < nk; k += Q4K_NT) {
                const uint8_t *a = act + (size_t)(k0 + k) * stride;
                switch (nk - k < Q4K_NT ? (int)(nk - k) : Q4K_NT) {
                case 4: q6k_tokens(&p, nsb, i0, a, stride, 4, sacc + k); break;
                case 3: q6k_tokens(&p, nsb, i0, a, stride, 3, sacc + k); break;
                case 2: q6k_tokens(&p, nsb, i0, a, stride, 2, sacc + k); break;
                default: q6k_tokens(&p, nsb, i0, a, stride, 1, sacc + k); break;
                }
            }
        }
        tile_store(nk, sacc, NULL, y + k0 * ldy, ldy, keep, bias, vb);
    }
}

/* ---- one token (decode), AVX-512: four rows at a time -------------------
 *
 * The K-quant row kernels need each super-block's integer total before
 * its floats (vecdot.c); for one token, four rows' totals are reduced
 * together and their floats run in the lanes of one vector (lane k = row
 * k: the same scalar operations as vecdot.c's q4_k_rows / q6_k_rows). The
 * integer work is vecdot.c's q4_k_block / q6_k_dot (exact, so any copy of
 * it gives the same totals). */

/* Lane k of *vt: the sum of v[k]'s 16 lanes; of *mt: m[k]'s 8. */
AVX512 static inline void reduce4x(const __m512i v[4], const __m256i m[4], __m128i *vt, __m128i *mt)
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

AVX512 static inline __m512i halves16x(short lo, short hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(lo)), _mm256_set1_epi16(hi), 1);
}

/* Q4_K and (five) Q5_K: the 16 lanes summing to T, the 8 summing to M. */
AVX512 static inline __attribute__((always_inline)) void q45k_block(const uint8_t *blk, const struct moe_block_q8_k *y,
                                                                    int five, __m512i *isum, __m256i *msum)
{
    const __m512i m4 = _mm512_set1_epi8(0xf), shift = halves16x(0, 4), sixteen = _mm512_set1_epi8(16);
    const uint8_t *scales = blk + offsetof(struct moe_block_q4_k, scales);
    const uint8_t *qs = blk + (five ? offsetof(struct moe_block_q5_k, qs) : offsetof(struct moe_block_q4_k, qs));
    uint32_t su[3], u[4];
    memcpy(su, scales, 12);
    const uint32_t m6 = 0x3f3f3f3f, k4 = 0x0f0f0f0f, k2 = 0x03030303;
    u[0] = su[0] & m6;
    u[1] = (su[2] & k4) | ((su[0] >> 6) & k2) << 4;
    u[2] = su[1] & m6;
    u[3] = ((su[2] >> 4) & k4) | ((su[1] >> 6) & k2) << 4;
    const __m128i sm = _mm_loadu_si128((const __m128i *)u);
    const __m512i sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
    *msum = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y->bsums), _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm)));
    __m512i hb = _mm512_setzero_si512();
    if (five)
        hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + offsetof(struct moe_block_q5_k, qh))));
    __m512i acc = _mm512_setzero_si512();
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
        __m512i q = _mm512_and_si512(
            _mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * k))), shift), m4);
        if (five) {
            const __m512i bit = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi8((char)(1 << (2 * k)))),
                                                   _mm256_set1_epi8((char)(1 << (2 * k + 1))), 1);
            q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(hb, bit), q, sixteen);
        }
        acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(q, _mm512_loadu_si512(y->qs + 64 * k)),
                                  _mm512_permutexvar_epi16(halves16x((short)(2 * k), (short)(2 * k + 1)), sc));
    }
    *isum = acc;
}

AVX512 static inline __attribute__((always_inline)) void q45k_gemv(const uint8_t *w, size_t row_bytes, int64_t n_rows,
                                                                   const uint8_t *act, int64_t n, float *y,
                                                                   const float *bias, int five)
{
    const size_t bsize = five ? sizeof(struct moe_block_q5_k) : sizeof(struct moe_block_q4_k);
    const struct moe_block_q8_k *yb = (const struct moe_block_q8_k *)act;
    const int64_t nb = n / MOE_QK_K;
    for (int64_t r0 = 0; r0 < n_rows; r0 += 4) {
        const int nr = n_rows - r0 < 4 ? (int)(n_rows - r0) : 4;
        __m128 acc = _mm_setzero_ps(), accm = _mm_setzero_ps();
        for (int64_t i = 0; i < nb; i++) {
            __m512i v[4];
            __m256i m[4];
            uint16_t hd[4] = { 0, 0, 0, 0 }, hm[4] = { 0, 0, 0, 0 };
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                {
                    /* the block two groups of rows ahead: four rows in step
                     * are not streamed ahead by the hardware as one row is */
                    const char *nx = (const char *)w + (size_t)(r0 + 8 + k) * row_bytes + (size_t)i * bsize;
                    for (size_t o = 0; o < bsize; o += 64)
                        _mm_prefetch(nx + o, _MM_HINT_T0);
                }
                if (k < nr) {
                    const uint8_t *blk = w + (size_t)(r0 + k) * row_bytes + (size_t)i * bsize;
                    q45k_block(blk, &yb[i], five, &v[k], &m[k]);
                    memcpy(&hd[k], blk, 2);
                    memcpy(&hm[k], blk + 2, 2);
                } else {
                    v[k] = _mm512_setzero_si512();
                    m[k] = _mm256_setzero_si256();
                }
            }
            __m128i vt, mt;
            reduce4x(v, m, &vt, &mt);
            const __m128 yd = _mm_set1_ps(yb[i].d);
            const __m128 d = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)hd));
            const __m128 dm = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)hm));
            acc = _mm_fmadd_ps(_mm_mul_ps(d, yd), _mm_cvtepi32_ps(vt), acc);
            accm = _mm_fmadd_ps(_mm_mul_ps(dm, yd), _mm_cvtepi32_ps(mt), accm);
        }
        float out[4];
        _mm_storeu_ps(out, _mm_sub_ps(acc, accm));
        for (int k = 0; k < nr; k++)
            y[r0 + k] = bias ? out[k] + bias[r0 + k] : out[k];
    }
}

AVX512 static void q4k_gemv(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                            const float *bias)
{
    q45k_gemv(w, row_bytes, n_rows, act, n, y, bias, 0);
}

AVX512 static void q5k_gemv(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                            const float *bias)
{
    q45k_gemv(w, row_bytes, n_rows, act, n, y, bias, 1);
}

AVX512 static void q6k_gemv(const uint8_t *w, size_t row_bytes, int64_t n_rows, const uint8_t *act, int64_t n, float *y,
                            const float *bias)
{
    const __m512i m4 = _mm512_set1_epi8(0xf), m2 = _mm512_set1_epi8(3);
    const __m512i sh01 = halves16x(0, 2), sh23 = halves16x(4, 6);
    __m512i idx[4];
    for (int k = 0; k < 4; k++)
        idx[k] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16((short)(4 * k + 1)), _mm_set1_epi16((short)(4 * k)))),
            _mm256_set_m128i(_mm_set1_epi16((short)(4 * k + 3)), _mm_set1_epi16((short)(4 * k + 2))), 1);
    const struct moe_block_q8_k *yb = (const struct moe_block_q8_k *)act;
    const int64_t nb = n / MOE_QK_K;
    for (int64_t r0 = 0; r0 < n_rows; r0 += 4) {
        const int nr = n_rows - r0 < 4 ? (int)(n_rows - r0) : 4;
        __m128 acc = _mm_setzero_ps();
        for (int64_t i = 0; i < nb; i++) {
            __m512i v[4];
            __m256i c[4];
            uint16_t hd[4] = { 0, 0, 0, 0 };
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                if (k >= nr) {
                    v[k] = _mm512_setzero_si512();
                    c[k] = _mm256_setzero_si256();
                    continue;
                }
                const struct moe_block_q6_k *x = (const struct moe_block_q6_k *)(w + (size_t)(r0 + k) * row_bytes) + i;
                {
                    /* two groups of rows ahead, as q45k_gemv */
                    const char *nx = (const char *)w + (size_t)(r0 + 8 + k) * row_bytes + (size_t)i * sizeof(*x);
                    for (size_t o = 0; o < sizeof(*x); o += 64)
                        _mm_prefetch(nx + o, _MM_HINT_T0);
                }
                hd[k] = x->d;
                const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x->scales));
                const __m512i sc = _mm512_castsi256_si512(sc16);
                c[k] = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)yb[i].bsums));
                __m512i a = _mm512_setzero_si512();
                _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
                    const __m512i l = _mm512_loadu_si512(x->ql + 64 * h);
                    const __m512i hh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x->qh + 32 * h)));
                    const __m512i q0 = _mm512_or_si512(_mm512_and_si512(l, m4),
                                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hh, sh01), m2), 4));
                    const __m512i q1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hh, sh23), m2), 4));
                    a = _mm512_dpwssd_epi32(a, _mm512_maddubs_epi16(q0, _mm512_loadu_si512(yb[i].qs + 128 * h)),
                                            _mm512_permutexvar_epi16(idx[2 * h], sc));
                    a = _mm512_dpwssd_epi32(a, _mm512_maddubs_epi16(q1, _mm512_loadu_si512(yb[i].qs + 128 * h + 64)),
                                            _mm512_permutexvar_epi16(idx[2 * h + 1], sc));
                }
                v[k] = a;
            }
            __m128i vt, ct;
            reduce4x(v, c, &vt, &ct);
            const __m128 d = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)hd));
            acc = _mm_fmadd_ps(_mm_mul_ps(d, _mm_set1_ps(yb[i].d)),
                               _mm_cvtepi32_ps(_mm_sub_epi32(vt, _mm_slli_epi32(ct, 5))), acc);
        }
        float out[4];
        _mm_storeu_ps(out, acc);
        for (int k = 0; k < nr; k++)
            y[r0 + k] = bias ? out[k] + bias[r0 + k] : out[k];
    }
}

/* ---- Q4_0 and IQ4_NL x Q8_0, AVX-512 VNNI -------------------------------
 *
 * One weight row per 32-bit lane. A panel of 16 rows is unpacked per
 * Q4T_SB blocks into 8 vectors of signed codes per block (vector k: the
 * codes of elements 4k..4k+3 of every row, code - 8 for Q4_0, the grid
 * value for IQ4_NL), the block's d per lane, and -128 times the sum of its
 * codes per lane. The tokens' Q8_0 values are taken as unsigned (y + 128,
 * an XOR) so that dpbusd multiplies them, broadcast four at a time, by the
 * signed codes: sum((y + 128) * w) - 128 * sum(w) is the block's exact
 * integer dot T for all 16 rows in 8 dpbusd per token, against 2 x 3 per
 * row and pair of blocks in the row kernel. The floats follow the
 * definition at vecdot.c's q4c_rows: per block s_b = d(w) * d(y), chain b
 * mod 4 takes fma(s_b, (float)T_b, acc), the dot is (acc_0 + acc_2) +
 * (acc_1 + acc_3); lanes are rows, so the lane arithmetic is that scalar
 * sequence per row. Panels start at multiples of 4 blocks, so a block's
 * chain is its place in its group of four. */

#define Q4T_SB 16    /* blocks unpacked at a time (10 KiB) */
#define Q4T_NT 4     /* tokens in registers at a time */
#define Q4T_TOK 64   /* tokens whose running sums are kept (16 KiB) */

struct q4t_panel {
    __m512i q[Q4T_SB][8];   /* block s, codes of elements 4k..4k+3 (k < 4: low nibbles of dword k) */
    __m512i c[Q4T_SB];      /* -128 * sum of block s's codes */
    __m512 d[Q4T_SB];
};

AVX512 static void q4t_unpack(struct q4t_panel *p, const uint8_t *w, size_t row_bytes, int nr, int64_t i0,
                                  int nsb, int iq4)
{
    static const uint8_t zero[4 * sizeof(struct moe_block_q4_0)];
    const size_t bb = sizeof(struct moe_block_q4_0);
    const __m512i m4 = _mm512_set1_epi8(0xf), k8 = _mm512_set1_epi8(8), k80 = _mm512_set1_epi8((char)0x80);
    const __m512i grid = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)moe_iq4nl_values));
    /* each row's offset for the scales' gather (rows are < 128 MiB) */
    const __m512i vrow = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)row_bytes));
    const __mmask16 rows = (__mmask16)((1u << nr) - 1);
    for (int s0 = 0; s0 < nsb; s0 += 4) {
        const int nblk = nsb - s0 < 4 ? nsb - s0 : 4;
        /* row r: the 16 code bytes of each of the group's blocks */
        __m512i r[16];
        for (int rr = 0; rr < 16; rr++) {
            const uint8_t *b = rr < nr ? w + (size_t)rr * row_bytes + (size_t)(i0 + s0) * bb : zero;
            /* the next panel's rows, as q4k_unpack */
            const char *nx = (const char *)w + (size_t)(rr + 16) * row_bytes + (size_t)(i0 + s0) * bb;
            _mm_prefetch(nx, _MM_HINT_T1);
            _mm_prefetch(nx + 64, _MM_HINT_T1);
            __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(b + 2)));
            if (nblk > 1)
                v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + bb + 2)), 1);
            if (nblk > 2)
                v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 2 * bb + 2)), 2);
            if (nblk > 3)
                v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 3 * bb + 2)), 3);
            r[rr] = v;
        }
        transpose16(r);
        for (int j = 0; j < nblk; j++) {
            const int s = s0 + j;
            __m512i csum = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++) {
                __m512i lo = _mm512_and_si512(r[4 * j + k], m4);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(r[4 * j + k], 4), m4);
                if (iq4) {
                    lo = _mm512_shuffle_epi8(grid, lo);
                    hi = _mm512_shuffle_epi8(grid, hi);
                } else {
                    lo = _mm512_sub_epi8(lo, k8);
                    hi = _mm512_sub_epi8(hi, k8);
                }
                p->q[s][k] = lo;
                p->q[s][k + 4] = hi;
                csum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(csum, k80, lo), k80, hi);
            }
            p->c[s] = _mm512_sub_epi32(_mm512_setzero_si512(), csum);
            const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, vrow,
                                                          w + (size_t)(i0 + s) * bb, 1);
            p->d[s] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
        }
    }
}

/* NT tokens against a panel: yq[t][s] the token's block s as y + 128,
 * yd[t][s] its d; acc[t][c] chain c's running sums of token t. */
AVX512 static inline __attribute__((always_inline)) void q4t_tokens(const struct q4t_panel *p, int nsb,
                                                                        const uint8_t (*yq)[Q4T_SB][32],
                                                                        const float (*yd)[Q4T_SB], const int NT,
                                                                        __m512 (*acc)[4])
{
    __m512 a[4][Q4T_NT];
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)
            a[c][t] = acc[t][c];
    for (int s0 = 0; s0 < nsb; s0 += 4) {
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) {
            const int s = s0 + c;
            if (s >= nsb)
                break;
            _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
                __m512i lo = p->c[s], hi = _mm512_setzero_si512();
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                    int32_t v0, v1;
                    memcpy(&v0, yq[t][s] + 4 * k, 4);
                    memcpy(&v1, yq[t][s] + 16 + 4 * k, 4);
                    lo = _mm512_dpbusd_epi32(lo, _mm512_set1_epi32(v0), p->q[s][k]);
                    hi = _mm512_dpbusd_epi32(hi, _mm512_set1_epi32(v1), p->q[s][k + 4]);
                }
                const __m512 sc = _mm512_mul_ps(p->d[s], _mm512_set1_ps(yd[t][s]));
                a[c][t] = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), a[c][t]);
            }
        }
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)
            acc[t][c] = a[c][t];
}

AVX512 static inline __attribute__((always_inline)) void q4t_tile(int iq4, const uint8_t *w, size_t row_bytes,
                                                                      int nr, const uint8_t *act, size_t stride,
                                                                      int64_t n_tok, int64_t n, float *y, int64_t ldy,
                                                                      const float *bias)
{
    struct q4t_panel p;
    __m512 sacc[Q4T_TOK][4];
    _Alignas(64) uint8_t yq[Q4T_NT][Q4T_SB][32];
    float yd[Q4T_NT][Q4T_SB];
    const int64_t nb = n / MOE_QK4_0;
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < n_tok; k0 += Q4T_TOK) {
        const int64_t nk = n_tok - k0 < Q4T_TOK ? n_tok - k0 : Q4T_TOK;
        for (int64_t k = 0; k < nk; k++)
            for (int c = 0; c < 4; c++)
                sacc[k][c] = _mm512_setzero_ps();
        for (int64_t i0 = 0; i0 < nb; i0 += Q4T_SB) {
            const int nsb = nb - i0 < Q4T_SB ? (int)(nb - i0) : Q4T_SB;
            q4t_unpack(&p, w, row_bytes, nr, i0, nsb, iq4);
            for (int64_t k = 0; k < nk; k += Q4T_NT) {
                const int nt = nk - k < Q4T_NT ? (int)(nk - k) : Q4T_NT;
                for (int t = 0; t < nt; t++) {
                    const struct moe_block_q8_0 *yb = (const struct moe_block_q8_0 *)(act + (size_t)(k0 + k + t) * stride) + i0;
                    for (int s = 0; s < nsb; s++) {
                        _mm256_store_si256((__m256i *)yq[t][s],
                                           _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)yb[s].qs), flip));
                        yd[t][s] = _cvtsh_ss(yb[s].d);
                    }
                }
                switch (nt) {
                case 4: q4t_tokens(&p, nsb, yq, yd, 4, sacc + k); break;
                case 3: q4t_tokens(&p, nsb, yq, yd, 3, sacc + k); break;
                case 2: q4t_tokens(&p, nsb, yq, yd, 2, sacc + k); break;
                default: q4t_tokens(&p, nsb, yq, yd, 1, sacc + k); break;
                }
            }
        }
        for (int64_t k = 0; k < nk; k++) {
            __m512 v = _mm512_add_ps(_mm512_add_ps(sacc[k][0], sacc[k][2]), _mm512_add_ps(sacc[k][1], sacc[k][3]));
            if (bias)
                v = _mm512_add_ps(v, vb);
            _mm512_mask_storeu_ps(y + (k0 + k) * ldy, keep, v);
        }
    }
}

AVX512 static void q4_0_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                                 int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q4t_tile(0, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}

AVX512 static void iq4_nl_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                                   int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q4t_tile(1, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}
/* ---- Q4_1, Q5_0 and Q5_1, AVX-512 VNNI -----------------------------------
 *
 * These types have only vecdot.c's scalar dots, on every path: one float
 * chain per row over the blocks, with T the block's exact integer dot,
 * Q5_0: acc = acc + (float)T * (d(w) * d(y)); Q4_1 and Q5_1 (Q8_1
 * activations): acc = acc + ((d(w) * d(y)) * (float)T + m(w) * s(y)), each
 * operation rounded (the scalar code is compiled without FMA). The tile is
 * Q4_0's (one row per lane, codes as signed bytes against the tokens'
 * flipped values, -128 * sum(codes) as the start), with the fifth bits
 * added from qh and that float chain per lane. */
enum q5t_kind { Q5T_Q4_1, Q5T_Q5_0, Q5T_Q5_1 };

struct q5t_panel {
    __m512i q[Q4T_SB][8];
    __m512i c[Q4T_SB];
    __m512 d[Q4T_SB], m[Q4T_SB];
};

AVX512 static void q5t_unpack(struct q5t_panel *p, const uint8_t *w, size_t row_bytes, int nr, int64_t i0, int nsb,
                              const int kind)
{
    /* block layouts (kernels/blocks.h): d [m] [qh] qs */
    const size_t bb = kind == Q5T_Q4_1 ? sizeof(struct moe_block_q4_1)
                      : kind == Q5T_Q5_0 ? sizeof(struct moe_block_q5_0) : sizeof(struct moe_block_q5_1);
    const size_t oqs = kind == Q5T_Q4_1 ? offsetof(struct moe_block_q4_1, qs)
                       : kind == Q5T_Q5_0 ? offsetof(struct moe_block_q5_0, qs) : offsetof(struct moe_block_q5_1, qs);
    const size_t oqh = kind == Q5T_Q5_0 ? offsetof(struct moe_block_q5_0, qh) : offsetof(struct moe_block_q5_1, qh);
    static const uint8_t zero[4 * sizeof(struct moe_block_q5_1)];
    const __m512i m4 = _mm512_set1_epi8(0xf), k16 = _mm512_set1_epi8(16), k80 = _mm512_set1_epi8((char)0x80);
    const __m512i vrow = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)row_bytes));
    const __mmask16 rows = (__mmask16)((1u << nr) - 1);
    /* code vector kk holds elements 4kk..4kk+3, whose fifth bits are bits
     * 4(kk % 2)..+3 of byte kk / 2 of qh: that byte in each of the
     * dword's bytes, tested against one bit per byte */
    __m512i hidx[4];
    for (int b = 0; b < 4; b++) {
        /* dword p of each 128-bit lane: its own byte b (4p + b) */
        hidx[b] = _mm512_add_epi8(_mm512_set1_epi8((char)b),
                                  _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12)));
    }
    const __m512i hbit[2] = { _mm512_set1_epi32(0x08040201), _mm512_set1_epi32((int)0x80402010) };
    for (int s0 = 0; s0 < nsb; s0 += 4) {
        const int nblk = nsb - s0 < 4 ? nsb - s0 : 4;
        __m512i r[16];
        for (int rr = 0; rr < 16; rr++) {
            const uint8_t *b = rr < nr ? w + (size_t)rr * row_bytes + (size_t)(i0 + s0) * bb : zero;
            const char *nx = (const char *)w + (size_t)(rr + 16) * row_bytes + (size_t)(i0 + s0) * bb;
            _mm_prefetch(nx, _MM_HINT_T1);
            _mm_prefetch(nx + 64, _MM_HINT_T1);
            __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(b + oqs)));
            if (nblk > 1)
                v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + bb + oqs)), 1);
            if (nblk > 2)
                v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 2 * bb + oqs)), 2);
            if (nblk > 3)
                v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 3 * bb + oqs)), 3);
            r[rr] = v;
        }
        transpose16(r);
        for (int j = 0; j < nblk; j++) {
            const int s = s0 + j;
            const uint8_t *base = w + (size_t)(i0 + s) * bb;
            /* d (and m, the next half-word) of every row */
            const __m512i dm = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, vrow, base, 1);
            p->d[s] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
            p->m[s] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)));
            __m512i qh = _mm512_setzero_si512();
            if (kind != Q5T_Q4_1)
                qh = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, vrow, base + oqh, 1);
            __m512i csum = _mm512_setzero_si512();
            for (int kk = 0; kk < 8; kk++) {
                const __m512i raw = r[4 * j + (kk & 3)];
                __m512i q = kk < 4 ? _mm512_and_si512(raw, m4) : _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                if (kind != Q5T_Q4_1) {
                    const __mmask64 h = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, hidx[kk / 2]), hbit[kk % 2]);
                    q = _mm512_mask_add_epi8(q, h, q, k16);
                }
                if (kind == Q5T_Q5_0)
                    q = _mm512_sub_epi8(q, k16);
                p->q[s][kk] = q;
                csum = _mm512_dpbusd_epi32(csum, k80, q);
            }
            p->c[s] = _mm512_sub_epi32(_mm512_setzero_si512(), csum);
        }
    }
}

/* One token's nsb Q8_0/Q8_1 blocks from yb (blocks ab bytes apart, codes at
 * aq) as the Q4_1/Q5_0/Q5_1 tiles of both paths take them: the 32 codes
 * xor flip, the scale d and, for Q8_1, the sum term s as floats. */
__attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline)) void
q8_token_prep(const uint8_t *yb, size_t ab, size_t aq, int q81, int nsb, __m256i flip, uint8_t (*yq)[32],
              float *yd, float *ys)
{
    for (int s = 0; s < nsb; s++, yb += ab) {
        _mm256_store_si256((__m256i *)yq[s], _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(yb + aq)), flip));
        uint16_t h[2];
        memcpy(h, yb, 4);
        yd[s] = _cvtsh_ss(h[0]);
        ys[s] = q81 ? _cvtsh_ss(h[1]) : 0.0f;
    }
}

AVX512 static inline __attribute__((always_inline)) void q5t_tokens(const struct q5t_panel *p, int nsb,
                                                                    const uint8_t (*yq)[Q4T_SB][32],
                                                                    const float (*yd)[Q4T_SB],
                                                                    const float (*ys)[Q4T_SB], const int NT,
                                                                    const int kind, __m512 *acc)
{
    __m512 a[Q4T_NT];
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        a[t] = acc[t];
    for (int s = 0; s < nsb; s++) {
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            __m512i lo = p->c[s], hi = _mm512_setzero_si512();
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                int32_t v0, v1;
                memcpy(&v0, yq[t][s] + 4 * k, 4);
                memcpy(&v1, yq[t][s] + 16 + 4 * k, 4);
                lo = _mm512_dpbusd_epi32(lo, _mm512_set1_epi32(v0), p->q[s][k]);
                hi = _mm512_dpbusd_epi32(hi, _mm512_set1_epi32(v1), p->q[s][k + 4]);
            }
            const __m512 tf = _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
            const __m512 sc = _mm512_mul_ps(p->d[s], _mm512_set1_ps(yd[t][s]));
            if (kind == Q5T_Q5_0)
                a[t] = _mm512_add_ps(a[t], _mm512_mul_ps(tf, sc));
            else
                a[t] = _mm512_add_ps(a[t], _mm512_add_ps(_mm512_mul_ps(sc, tf),
                                                         _mm512_mul_ps(p->m[s], _mm512_set1_ps(ys[t][s]))));
        }
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        acc[t] = a[t];
}

AVX512 static inline __attribute__((always_inline)) void q5t_tile(const int kind, const uint8_t *w, size_t row_bytes,
                                                                  int nr, const uint8_t *act, size_t stride,
                                                                  int64_t n_tok, int64_t n, float *y, int64_t ldy,
                                                                  const float *bias)
{
    struct q5t_panel p;
    __m512 sacc[Q4T_TOK];
    _Alignas(64) uint8_t yq[Q4T_NT][Q4T_SB][32];
    float yd[Q4T_NT][Q4T_SB], ys[Q4T_NT][Q4T_SB];
    const int64_t nb = n / 32;
    const int q81 = kind != Q5T_Q5_0;   /* Q8_1 activations */
    const size_t ab = q81 ? sizeof(struct moe_block_q8_1) : sizeof(struct moe_block_q8_0);
    const size_t aq = q81 ? offsetof(struct moe_block_q8_1, qs) : offsetof(struct moe_block_q8_0, qs);
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m512 vb = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < n_tok; k0 += Q4T_TOK) {
        const int64_t nk = n_tok - k0 < Q4T_TOK ? n_tok - k0 : Q4T_TOK;
        for (int64_t k = 0; k < nk; k++)
            sacc[k] = _mm512_setzero_ps();
        for (int64_t i0 = 0; i0 < nb; i0 += Q4T_SB) {
            const int nsb = nb - i0 < Q4T_SB ? (int)(nb - i0) : Q4T_SB;
            q5t_unpack(&p, w, row_bytes, nr, i0, nsb, kind);
            for (int64_t k = 0; k < nk; k += Q4T_NT) {
                const int nt = nk - k < Q4T_NT ? (int)(nk - k) : Q4T_NT;
                for (int t = 0; t < nt; t++)
                    q8_token_prep(act + (size_t)(k0 + k + t) * stride + (size_t)i0 * ab, ab, aq, q81, nsb, flip,
                                  yq[t], yd[t], ys[t]);
                switch (nt) {
                case 4: q5t_tokens(&p, nsb, yq, yd, ys, 4, kind, sacc + k); break;
                case 3: q5t_tokens(&p, nsb, yq, yd, ys, 3, kind, sacc + k); break;
                case 2: q5t_tokens(&p, nsb, yq, yd, ys, 2, kind, sacc + k); break;
                default: q5t_tokens(&p, nsb, yq, yd, ys, 1, kind, sacc + k); break;
                }
            }
        }
        for (int64_t k = 0; k < nk; k++) {
            __m512 v = sacc[k];
            if (bias)
                v = _mm512_add_ps(v, vb);
            _mm512_mask_storeu_ps(y + (k0 + k) * ldy, keep, v);
        }
    }
}

AVX512 static void q4_1_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                             int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q5t_tile(Q5T_Q4_1, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}

AVX512 static void q5_0_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                             int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q5t_tile(Q5T_Q5_0, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}

AVX512 static void q5_1_tile(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                             int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q5t_tile(Q5T_Q5_1, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}

/* ---- Q4_K x Q8_K, AVX2 ------------------------------------------------
 *
 * The AVX-512 kernel's scheme with 8 rows per vector and no VNNI: maddubs
 * of four codes of every row by the token's four q8 bytes gives 16-bit
 * pair sums, which add up exactly over a group's 8 chunks (at most 8 x 2
 * x 15 x 127 = 30480), then one madd by the group scale (both halves of a
 * lane) makes the row's int32. Two tokens at a time (16 ymm registers).
 * The floats are vecdot.c's dot_q4_k_avx2 (the definition shared with the
 * AVX-512 path). */
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline __attribute__((always_inline)) void transpose8(__m256i r[8])
{
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int e = 0; e < 4; e++) {
        r[e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x20);
        r[4 + e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x31);
    }
}

#define Q4K8_SB 8   /* super-blocks unpacked at a time (20 KiB for 8 rows) */

struct q4k_panel8 {
    __m256i q[Q4K8_SB][64];
    __m256i sc[Q4K8_SB][8];   /* scale of group j in both halves of the lane */
    __m256i mn[Q4K8_SB][8];   /* min of group j, likewise */
    __m256 d[Q4K8_SB], dm[Q4K8_SB];
};

AVX2 static void q4k_unpack8(struct q4k_panel8 *p, const uint8_t *w, size_t row_bytes, int nr, int64_t i0, int nsb)
{
    static const uint8_t zero[sizeof(struct moe_block_q4_k)];
    const __m256i m4 = _mm256_set1_epi8(0xf);
    const __m256i m6 = _mm256_set1_epi32(0x3f3f3f3f), k4 = _mm256_set1_epi32(0x0f0f0f0f);
    const __m256i k2 = _mm256_set1_epi32(0x03030303), b8 = _mm256_set1_epi32(0xff);
    for (int s = 0; s < nsb; s++) {
        const struct moe_block_q4_k *b[8];
        for (int r = 0; r < 8; r++) {
            b[r] = r < nr ? (const struct moe_block_q4_k *)(w + (size_t)r * row_bytes) + i0 + s
                          : (const struct moe_block_q4_k *)zero;
            /* the next 8 rows, as q4k_unpack */
            const char *nx = (const char *)w + (size_t)(r + 8) * row_bytes + (size_t)(i0 + s) * sizeof(*b[r]);
            for (size_t o = 0; o < sizeof(*b[r]); o += 64)
                _mm_prefetch(nx + o, _MM_HINT_T1);
        }
        __m256i h[8];
        for (int r = 0; r < 8; r++)
            h[r] = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)b[r]));
        transpose8(h);
        const __m256i u0 = h[1], u1 = h[2], u2 = h[3];
        const __m256i o[4] = {
            _mm256_and_si256(u0, m6),
            _mm256_or_si256(_mm256_and_si256(u2, k4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), k2), 4)),
            _mm256_and_si256(u1, m6),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), k4),
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), k2), 4)),
        };
        for (int j = 0; j < 8; j++) {
            const __m256i c = _mm256_and_si256(_mm256_srli_epi32(o[j / 4], 8 * (j % 4)), b8);
            const __m256i m = _mm256_and_si256(_mm256_srli_epi32(o[2 + j / 4], 8 * (j % 4)), b8);
            p->sc[s][j] = _mm256_or_si256(c, _mm256_slli_epi32(c, 16));
            p->mn[s][j] = _mm256_or_si256(m, _mm256_slli_epi32(m, 16));
        }
        const __m256i hd = _mm256_and_si256(h[0], _mm256_set1_epi32(0xffff));
        const __m256i hm = _mm256_srli_epi32(h[0], 16);
        /* 8 x 32-bit -> 8 x 16-bit halves: packus keeps 128-bit lanes */
        p->d[s] = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(hd, hd), 0x08)));
        p->dm[s] = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(hm, hm), 0x08)));
        for (int m = 0; m < 4; m++) {
            __m256i q[8];
            for (int r = 0; r < 8; r++)
                q[r] = _mm256_loadu_si256((const __m256i *)(b[r]->qs + 32 * m));
            transpose8(q);
            for (int e = 0; e < 8; e++) {
                p->q[s][(2 * m) * 8 + e] = _mm256_and_si256(q[e], m4);
                p->q[s][(2 * m + 1) * 8 + e] = _mm256_and_si256(_mm256_srli_epi32(q[e], 4), m4);
            }
        }
    }
}

AVX2 static inline __attribute__((always_inline)) void q4k_tokens8(const struct q4k_panel8 *p, int nsb, int64_t i0,
                                                                   const uint8_t *act, size_t stride, const int NT,
                                                                   __m256 *acc, __m256 *accm)
{
    for (int s = 0; s < nsb; s++) {
        const struct moe_block_q8_k *y[2];
        _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++)
            y[t] = (const struct moe_block_q8_k *)(act + (size_t)t * stride) + i0 + s;
        __m256i isum[2], msum[2];
        _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++) {
            isum[t] = _mm256_setzero_si256();
            msum[t] = _mm256_setzero_si256();
        }
        for (int j = 0; j < 8; j++) {
            __m256i g[2];
            _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++)
                g[t] = _mm256_setzero_si256();
            _Pragma("GCC unroll 8") for (int c = 0; c < 8; c++) {
                const __m256i wq = p->q[s][j * 8 + c];
                _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++) {
                    int32_t yy;
                    memcpy(&yy, y[t]->qs + 32 * j + 4 * c, 4);
                    g[t] = _mm256_add_epi16(g[t], _mm256_maddubs_epi16(wq, _mm256_set1_epi32(yy)));
                }
            }
            _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++) {
                int32_t bs;
                memcpy(&bs, y[t]->bsums + 2 * j, 4);
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(g[t], p->sc[s][j]));
                msum[t] = _mm256_add_epi32(msum[t], _mm256_madd_epi16(p->mn[s][j], _mm256_set1_epi32(bs)));
            }
        }
        _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++) {
            const __m256 yd = _mm256_set1_ps(y[t]->d);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(p->d[s], yd), _mm256_cvtepi32_ps(isum[t]), acc[t]);
            accm[t] = _mm256_fmadd_ps(_mm256_mul_ps(p->dm[s], yd), _mm256_cvtepi32_ps(msum[t]), accm[t]);
        }
    }
}

AVX2 static void q4k_tile_avx2(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                               int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    struct q4k_panel8 p;
    __m256 sacc[GEMM_TOK], saccm[GEMM_TOK];
    const int64_t nb = n / MOE_QK_K;
    for (int r0 = 0; r0 < nr; r0 += 8) {
        const int n8 = nr - r0 < 8 ? nr - r0 : 8;
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 vb = bias ? _mm256_maskload_ps(bias + r0, keep) : _mm256_setzero_ps();
        for (int64_t k0 = 0; k0 < n_tok; k0 += GEMM_TOK) {
            const int64_t nk = n_tok - k0 < GEMM_TOK ? n_tok - k0 : GEMM_TOK;
            for (int64_t k = 0; k < nk; k++)
                sacc[k] = saccm[k] = _mm256_setzero_ps();
            for (int64_t i0 = 0; i0 < nb; i0 += Q4K8_SB) {
                const int nsb = nb - i0 < Q4K8_SB ? (int)(nb - i0) : Q4K8_SB;
                q4k_unpack8(&p, w + (size_t)r0 * row_bytes, row_bytes, n8, i0, nsb);
                for (int64_t k = 0; k < nk; k += 2) {
                    const uint8_t *a = act + (size_t)(k0 + k) * stride;
                    if (nk - k >= 2)
                        q4k_tokens8(&p, nsb, i0, a, stride, 2, sacc + k, saccm + k);
                    else
                        q4k_tokens8(&p, nsb, i0, a, stride, 1, sacc + k, saccm + k);
                }
            }
            for (int64_t k = 0; k < nk; k++) {
                __m256 v = _mm256_sub_ps(sacc[k], saccm[k]);
                if (bias)
                    v = _mm256_add_ps(v, vb);
                _mm256_maskstore_ps(y + (k0 + k) * ldy + r0, keep, v);
            }
        }
    }
}

/* ---- Q4_0 and IQ4_NL x Q8_0, AVX2 ---------------------------------------
 *
 * tinyBLAS's scheme: register tiles of 4 rows x 2 tokens, each pair an
 * 8-lane float accumulator that takes, per block, exactly the operations
 * of vecdot.c's dot_q4_0_avx2 / dot_iq4_nl_avx2 (mul_sum_i8's 8 int32
 * lanes, converted, then fma by the broadcast d(w) * d(y)), and hsum8's
 * order at the end. The rows' signed codes and their absolute values are
 * unpacked once per Q4A_SB blocks and token tile, so that a block costs a
 * pair six operations (sign, maddubs, madd, convert, multiply, fma)
 * against fifteen in the row kernel. */
#define Q4A_SB 32    /* blocks unpacked at a time (8 KiB for 4 rows) */
#define Q4A_TOK 64

struct q4a_panel {
    __m256i q[4][Q4A_SB];   /* row, block: the 32 signed codes in element order */
    __m256i a[4][Q4A_SB];   /* their absolute values */
    float d[4][Q4A_SB];
};

/* vecdot.c's hsum8 */
AVX2 static inline float q4a_hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

AVX2 static void q4a_unpack(struct q4a_panel *p, const uint8_t *w, size_t row_bytes, int nr4, int64_t i0, int nsb,
                            int iq4)
{
    const __m256i grid = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)moe_iq4nl_values));
    const __m256i m4 = _mm256_set1_epi8(0xf), k8 = _mm256_set1_epi8(8);
    for (int r = 0; r < 4; r++) {
        for (int s = 0; s < nsb; s++) {
            if (r >= nr4) {
                p->q[r][s] = p->a[r][s] = _mm256_setzero_si256();
                p->d[r][s] = 0.0f;
                continue;
            }
            const struct moe_block_q4_0 *b = (const struct moe_block_q4_0 *)(w + (size_t)r * row_bytes) + i0 + s;
            const __m128i raw = _mm_loadu_si128((const __m128i *)b->qs);
            const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
            const __m256i q = iq4 ? _mm256_shuffle_epi8(grid, v) : _mm256_sub_epi8(v, k8);
            p->q[r][s] = q;
            p->a[r][s] = _mm256_sign_epi8(q, q);
            p->d[r][s] = _cvtsh_ss(b->d);
        }
    }
}

AVX2 static inline __attribute__((always_inline)) void q4a_tokens(const struct q4a_panel *p, int nsb,
                                                                  const uint8_t *act, size_t stride, int64_t i0,
                                                                  const int NT, __m256 (*acc)[4])
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 c[2][4];
    _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++)
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)
            c[t][r] = acc[t][r];
    for (int s = 0; s < nsb; s++) {
        __m256i yv[2];
        __m256 dy[2];
        _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++) {
            const struct moe_block_q8_0 *yb = (const struct moe_block_q8_0 *)(act + (size_t)t * stride) + i0 + s;
            yv[t] = _mm256_loadu_si256((const __m256i *)yb->qs);
            dy[t] = _mm256_set1_ps(_cvtsh_ss(yb->d));
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
            const __m256 dw = _mm256_set1_ps(p->d[r][s]);
            _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++) {
                const __m256i sy = _mm256_sign_epi8(yv[t], p->q[r][s]);
                const __m256i i = _mm256_madd_epi16(_mm256_maddubs_epi16(p->a[r][s], sy), ones);
                c[t][r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dy[t]), _mm256_cvtepi32_ps(i), c[t][r]);
            }
        }
    }
    _Pragma("GCC unroll 2") for (int t = 0; t < NT; t++)
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++)
            acc[t][r] = c[t][r];
}

AVX2 static inline __attribute__((always_inline)) void q4a_tile(int iq4, const uint8_t *w, size_t row_bytes, int nr,
                                                                const uint8_t *act, size_t stride, int64_t n_tok,
                                                                int64_t n, float *y, int64_t ldy, const float *bias)
{
    struct q4a_panel p;
    __m256 sacc[Q4A_TOK][4];
    const int64_t nb = n / MOE_QK4_0;
    for (int r0 = 0; r0 < nr; r0 += 4) {
        const int nr4 = nr - r0 < 4 ? nr - r0 : 4;
        const uint8_t *wr = w + (size_t)r0 * row_bytes;
        for (int64_t k0 = 0; k0 < n_tok; k0 += Q4A_TOK) {
            const int64_t nk = n_tok - k0 < Q4A_TOK ? n_tok - k0 : Q4A_TOK;
            for (int64_t k = 0; k < nk; k++)
                for (int r = 0; r < 4; r++)
                    sacc[k][r] = _mm256_setzero_ps();
            for (int64_t i0 = 0; i0 < nb; i0 += Q4A_SB) {
                const int nsb = nb - i0 < Q4A_SB ? (int)(nb - i0) : Q4A_SB;
                q4a_unpack(&p, wr, row_bytes, nr4, i0, nsb, iq4);
                for (int64_t k = 0; k < nk; k += 2) {
                    const uint8_t *a = act + (size_t)(k0 + k) * stride;
                    if (nk - k >= 2)
                        q4a_tokens(&p, nsb, a, stride, i0, 2, sacc + k);
                    else
                        q4a_tokens(&p, nsb, a, stride, i0, 1, sacc + k);
                }
            }
            for (int64_t k = 0; k < nk; k++)
                for (int r = 0; r < nr4; r++) {
                    const float v = q4a_hsum8(sacc[k][r]);
                    y[(k0 + k) * ldy + r0 + r] = bias ? v + bias[r0 + r] : v;
                }
        }
    }
}

AVX2 static void q4_0_tile_avx2(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                                int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q4a_tile(0, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}

AVX2 static void iq4_nl_tile_avx2(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                                  int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q4a_tile(1, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}

/* ---- Q4_1, Q5_0 and Q5_1, AVX2 ------------------------------------------
 *
 * The AVX-512 tile's scheme with 8 rows per vector and no VNNI: per pair of
 * code vectors, maddubs of the token's flipped bytes (broadcast) by the
 * signed codes, the two 16-bit results added (at most 2 x 2 x 255 x 31 =
 * 31620) and madd into 32 bits; the scalar dot's single float chain per
 * lane. */
#define Q5A_SB 16

struct q5a_panel {
    __m256i q[Q5A_SB][8];
    __m256i c[Q5A_SB];
    __m256 d[Q5A_SB], m[Q5A_SB];
};

AVX2 static void q5a_unpack(struct q5a_panel *p, const uint8_t *w, size_t row_bytes, int nr, int64_t i0, int nsb,
                            const int kind)
{
    const size_t bb = kind == Q5T_Q4_1 ? sizeof(struct moe_block_q4_1)
                      : kind == Q5T_Q5_0 ? sizeof(struct moe_block_q5_0) : sizeof(struct moe_block_q5_1);
    const size_t oqs = kind == Q5T_Q4_1 ? offsetof(struct moe_block_q4_1, qs)
                       : kind == Q5T_Q5_0 ? offsetof(struct moe_block_q5_0, qs) : offsetof(struct moe_block_q5_1, qs);
    const size_t oqh = kind == Q5T_Q5_0 ? offsetof(struct moe_block_q5_0, qh) : offsetof(struct moe_block_q5_1, qh);
    static const uint8_t zero[2 * sizeof(struct moe_block_q5_1)];
    const __m256i m4 = _mm256_set1_epi8(0xf), k16 = _mm256_set1_epi8(16), k80 = _mm256_set1_epi8((char)0x80);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i hidx[4];
    for (int b = 0; b < 4; b++)
        hidx[b] = _mm256_add_epi8(_mm256_set1_epi8((char)b),
                                  _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12)));
    const __m256i hbit[2] = { _mm256_set1_epi32(0x08040201), _mm256_set1_epi32((int)0x80402010) };
    for (int s0 = 0; s0 < nsb; s0 += 2) {
        const int nblk = nsb - s0 < 2 ? nsb - s0 : 2;
        __m256i r[8];
        for (int rr = 0; rr < 8; rr++) {
            const uint8_t *b = rr < nr ? w + (size_t)rr * row_bytes + (size_t)(i0 + s0) * bb : zero;
            __m256i v = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(b + oqs)));
            if (nblk > 1)
                v = _mm256_inserti128_si256(v, _mm_loadu_si128((const __m128i *)(b + bb + oqs)), 1);
            r[rr] = v;
        }
        transpose8(r);
        for (int j = 0; j < nblk; j++) {
            const int s = s0 + j;
            float d[8], m[8];
            uint32_t qh[8];
            for (int rr = 0; rr < 8; rr++) {
                uint16_t h[2] = { 0, 0 };
                qh[rr] = 0;
                if (rr < nr) {
                    const uint8_t *blk = w + (size_t)rr * row_bytes + (size_t)(i0 + s) * bb;
                    memcpy(h, blk, 4);
                    if (kind != Q5T_Q4_1)
                        memcpy(&qh[rr], blk + oqh, 4);
                }
                d[rr] = _cvtsh_ss(h[0]);
                m[rr] = kind != Q5T_Q5_0 ? _cvtsh_ss(h[1]) : 0.0f;
            }
            p->d[s] = _mm256_loadu_ps(d);
            p->m[s] = _mm256_loadu_ps(m);
            const __m256i qhv = _mm256_loadu_si256((const __m256i *)qh);
            __m256i csum = _mm256_setzero_si256();
            for (int kk = 0; kk < 8; kk++) {
                const __m256i raw = r[4 * j + (kk & 3)];
                __m256i q = kk < 4 ? _mm256_and_si256(raw, m4) : _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                if (kind != Q5T_Q4_1) {
                    const __m256i sel = _mm256_and_si256(_mm256_shuffle_epi8(qhv, hidx[kk / 2]), hbit[kk % 2]);
                    q = _mm256_add_epi8(q, _mm256_and_si256(_mm256_cmpeq_epi8(sel, hbit[kk % 2]), k16));
                }
                if (kind == Q5T_Q5_0)
                    q = _mm256_sub_epi8(q, k16);
                p->q[s][kk] = q;
                csum = _mm256_add_epi32(csum, _mm256_madd_epi16(_mm256_maddubs_epi16(k80, q), ones));
            }
            p->c[s] = _mm256_sub_epi32(_mm256_setzero_si256(), csum);
        }
    }
}

AVX2 static inline __attribute__((always_inline)) void q5a_tokens(const struct q5a_panel *p, int nsb,
                                                                  const uint8_t (*yq)[Q5A_SB][32],
                                                                  const float (*yd)[Q5A_SB],
                                                                  const float (*ys)[Q5A_SB], const int NT,
                                                                  const int kind, __m256 *acc)
{
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 a[4];
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        a[t] = acc[t];
    for (int s = 0; s < nsb; s++) {
        _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++) {
            __m256i isum = p->c[s];
            _Pragma("GCC unroll 4") for (int k = 0; k < 8; k += 2) {
                int32_t v0, v1;
                memcpy(&v0, yq[t][s] + 4 * k, 4);
                memcpy(&v1, yq[t][s] + 4 * k + 4, 4);
                const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_set1_epi32(v0), p->q[s][k]),
                                                     _mm256_maddubs_epi16(_mm256_set1_epi32(v1), p->q[s][k + 1]));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(s16, ones));
            }
            const __m256 tf = _mm256_cvtepi32_ps(isum);
            const __m256 sc = _mm256_mul_ps(p->d[s], _mm256_set1_ps(yd[t][s]));
            if (kind == Q5T_Q5_0)
                a[t] = _mm256_add_ps(a[t], _mm256_mul_ps(tf, sc));
            else
                a[t] = _mm256_add_ps(a[t], _mm256_add_ps(_mm256_mul_ps(sc, tf),
                                                         _mm256_mul_ps(p->m[s], _mm256_set1_ps(ys[t][s]))));
        }
    }
    _Pragma("GCC unroll 4") for (int t = 0; t < NT; t++)
        acc[t] = a[t];
}

AVX2 static inline __attribute__((always_inline)) void q5a_tile(const int kind, const uint8_t *w, size_t row_bytes,
                                                                int nr, const uint8_t *act, size_t stride,
                                                                int64_t n_tok, int64_t n, float *y, int64_t ldy,
                                                                const float *bias)
{
    struct q5a_panel p;
    __m256 sacc[Q4A_TOK];
    _Alignas(32) uint8_t yq[4][Q5A_SB][32];
    float yd[4][Q5A_SB], ys[4][Q5A_SB];
    const int64_t nb = n / 32;
    const int q81 = kind != Q5T_Q5_0;
    const size_t ab = q81 ? sizeof(struct moe_block_q8_1) : sizeof(struct moe_block_q8_0);
    const size_t aq = q81 ? offsetof(struct moe_block_q8_1, qs) : offsetof(struct moe_block_q8_0, qs);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int r0 = 0; r0 < nr; r0 += 8) {
        const int nr8 = nr - r0 < 8 ? nr - r0 : 8;
        const uint8_t *wr = w + (size_t)r0 * row_bytes;
        for (int64_t k0 = 0; k0 < n_tok; k0 += Q4A_TOK) {
            const int64_t nk = n_tok - k0 < Q4A_TOK ? n_tok - k0 : Q4A_TOK;
            for (int64_t k = 0; k < nk; k++)
                sacc[k] = _mm256_setzero_ps();
            for (int64_t i0 = 0; i0 < nb; i0 += Q5A_SB) {
                const int nsb = nb - i0 < Q5A_SB ? (int)(nb - i0) : Q5A_SB;
                q5a_unpack(&p, wr, row_bytes, nr8, i0, nsb, kind);
                for (int64_t k = 0; k < nk; k += 4) {
                    const int nt = nk - k < 4 ? (int)(nk - k) : 4;
                    for (int t = 0; t < nt; t++)
                        q8_token_prep(act + (size_t)(k0 + k + t) * stride + (size_t)i0 * ab, ab, aq, q81, nsb,
                                      flip, yq[t], yd[t], ys[t]);
                    switch (nt) {
                    case 4: q5a_tokens(&p, nsb, yq, yd, ys, 4, kind, sacc + k); break;
                    case 3: q5a_tokens(&p, nsb, yq, yd, ys, 3, kind, sacc + k); break;
                    case 2: q5a_tokens(&p, nsb, yq, yd, ys, 2, kind, sacc + k); break;
                    default: q5a_tokens(&p, nsb, yq, yd, ys, 1, kind, sacc + k); break;
                    }
                }
            }
            for (int64_t k = 0; k < nk; k++) {
                float v[8];
                _mm256_storeu_ps(v, sacc[k]);
                for (int r = 0; r < nr8; r++)
                    y[(k0 + k) * ldy + r0 + r] = bias ? v[r] + bias[r0 + r] : v[r];
            }
        }
    }
}

AVX2 static void q4_1_tile_avx2(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                                int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q5a_tile(Q5T_Q4_1, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}

AVX2 static void q5_0_tile_avx2(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                                int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q5a_tile(Q5T_Q5_0, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}

AVX2 static void q5_1_tile_avx2(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *act, size_t stride,
                                int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    q5a_tile(Q5T_Q5_1, w, row_bytes, nr, act, stride, n_tok, n, y, ldy, bias);
}
#endif

static const struct gemm_tile tiles[] = {
#ifdef MOE_X86
    { LEVEL_AVX512, MOE_DTYPE_Q4_0, 2, q4_0_tile, moe_gemm_gemv_q4_0 },
    { LEVEL_AVX512, MOE_DTYPE_IQ4_NL, 2, iq4_nl_tile, moe_gemm_gemv_iq4_nl },
    { LEVEL_AVX2, MOE_DTYPE_Q4_0, 2, q4_0_tile_avx2 },
    { LEVEL_AVX512, MOE_DTYPE_Q4_1, 1, q4_1_tile },   /* scalar row kernels: any batch */
    { LEVEL_AVX512, MOE_DTYPE_Q5_0, 1, q5_0_tile },
    { LEVEL_AVX512, MOE_DTYPE_Q5_1, 1, q5_1_tile },
    { LEVEL_AVX2, MOE_DTYPE_Q4_1, 1, q4_1_tile_avx2 },
    { LEVEL_AVX2, MOE_DTYPE_Q5_0, 1, q5_0_tile_avx2 },
    { LEVEL_AVX2, MOE_DTYPE_Q5_1, 1, q5_1_tile_avx2 },
    { LEVEL_AVX2, MOE_DTYPE_IQ4_NL, 2, iq4_nl_tile_avx2 },
    /* fewer tokens: the row kernels (measured on experts streamed from
     * memory, Qwen3-shape prompt of 64 tokens: 4-8 per expert) */
    { LEVEL_AVX512, MOE_DTYPE_Q4_K, 8, q4k_tile, q4k_gemv, 1 },
    { LEVEL_AVX512, MOE_DTYPE_Q5_K, 8, q5k_tile, q5k_gemv, 1 },
    { LEVEL_AVX512, MOE_DTYPE_Q6_K, 12, q6k_tile, q6k_gemv, 1 },  /* its unpacking costs more */
    { LEVEL_AVX2, MOE_DTYPE_Q4_K, 2, q4k_tile_avx2 },
#endif
    { LEVEL_SCALAR, MOE_DTYPE_COUNT, 0, NULL },   /* no row; keeps the table non-empty */
    /* one token: four rows in step, the next four prefetched (vecdot.c) */
    { LEVEL_AVX512, MOE_DTYPE_BF16, 2, moe_gemm_tile_bf16, moe_gemm_gemv_bf16 },
    { LEVEL_AVX2, MOE_DTYPE_BF16, 2, moe_gemm_tile_bf16 },
    { LEVEL_AVX512, MOE_DTYPE_Q8_0, 2, moe_gemm_tile_q8_0, moe_gemm_gemv_q8_0 },
    { LEVEL_AVX512, MOE_DTYPE_MXFP4, 2, moe_gemm_tile_mxfp4, moe_gemm_gemv_mxfp4 },
};

static enum gemm_level level(void)
{
    /* moe_vecdot_impl caches the detection (and MOE_CPU_SIMD's cap) */
    const char *impl = moe_vecdot_impl();
    if (strcmp(impl, "avx512vnni") == 0)
        return LEVEL_AVX512;
    return strcmp(impl, "avx2") == 0 ? LEVEL_AVX2 : LEVEL_SCALAR;
}

static const struct gemm_tile *tile_for(uint32_t t)
{
    const enum gemm_level lv = level();
    for (size_t i = 0; i < sizeof(tiles) / sizeof(tiles[0]); i++)
        if (tiles[i].dtype == t && tiles[i].level == lv && tiles[i].fn != NULL)
            return &tiles[i];
    return NULL;
}

int moe_gemm_tiled(uint32_t t)
{
    return tile_for(t) != NULL;
}

int moe_gemm_whole_tokens(uint32_t t)
{
    const struct gemm_tile *k = tile_for(t);
    return k != NULL && k->whole;
}

void moe_gemm(uint32_t t, const void *w, size_t row_bytes, int64_t n_rows, const void *act, size_t act_stride,
              int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    const uint8_t *wb = w, *ab = act;
    const struct gemm_tile *k = tile_for(t);
    if (k != NULL && n_tok == 1 && k->gemv != NULL) {
        k->gemv(wb, row_bytes, n_rows, ab, n, y, bias);
        return;
    }
    if (k != NULL && n_tok >= k->min_tok) {
        for (int64_t r = 0; r < n_rows; r += GEMM_MR) {
            const int nr = n_rows - r < GEMM_MR ? (int)(n_rows - r) : GEMM_MR;
            k->fn(wb + (size_t)r * row_bytes, row_bytes, nr, ab, act_stride, n_tok, n, y + r, ldy,
                  bias ? bias + r : NULL);
        }
        return;
    }
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *wr = wb + (size_t)r * row_bytes;
        const float b = bias ? bias[r] : 0.0f;
        for (int64_t k0 = 0; k0 < n_tok; k0 += MOE_VECDOT_MAX_ROWS) {
            const int nt = n_tok - k0 < MOE_VECDOT_MAX_ROWS ? (int)(n_tok - k0) : MOE_VECDOT_MAX_ROWS;
            float v[MOE_VECDOT_MAX_ROWS];
            moe_vecdot_rows(t, wr, ab + (size_t)k0 * act_stride, act_stride, n, nt, v);
            for (int j = 0; j < nt; j++)
                y[(k0 + j) * ldy + r] = bias ? v[j] + b : v[j];
        }
    }
}

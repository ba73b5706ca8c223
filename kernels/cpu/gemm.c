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

struct gemm_tile {
    enum gemm_level level;   /* the path it belongs to (moe_vecdot_impl) */
    uint32_t dtype;
    int min_tok;             /* fewer tokens: the row kernels are faster */
    gemm_tile_fn fn;
};

static const struct gemm_tile tiles[] = {
    { LEVEL_SCALAR, MOE_DTYPE_COUNT, 0, NULL },   /* no row; keeps the table non-empty */
    /* one token: dot_bf16_avx512 streams a single row fastest (decode) */
    { LEVEL_AVX512, MOE_DTYPE_BF16, 2, moe_gemm_tile_bf16 },
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

void moe_gemm(uint32_t t, const void *w, size_t row_bytes, int64_t n_rows, const void *act, size_t act_stride,
              int64_t n_tok, int64_t n, float *y, int64_t ldy, const float *bias)
{
    const uint8_t *wb = w, *ab = act;
    const struct gemm_tile *k = tile_for(t);
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

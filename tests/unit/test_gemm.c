/* moe_gemm (kernels/cpu/gemm.h): every output equals moe_vecdot for its
 * (row, token) bit for bit (+ the bias), on every path (AVX-512, AVX2,
 * scalar via MOE_CPU_SIMD), for every weight type, on row and token counts
 * that are not multiples of the tile kernels' blocks, and y outside the
 * block is left alone. Each MOE_TEST_RUN runs in its own process, so each
 * path is detected afresh. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/dtype.h"
#include "kernels/blocks.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/vecdot.h"
#include "kernels/fp16.h"
#include "tests/harness.h"
#include "tests/simd_paths.h"

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint32_t next32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

static float randn(void)
{
    float u1 = ((float)(next32() & 0xffffff) + 1.0f) / 16777217.0f;
    float u2 = (float)(next32() & 0xffffff) / 16777216.0f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

/* Offsets of a block's f16 scales (made finite), as test_vecdot.c. */
static void fix_scales(uint32_t t, uint8_t *blk, int extreme)
{
    int offs[2] = { -1, -1 };
    switch (t) {
    case MOE_DTYPE_Q4_0: case MOE_DTYPE_Q5_0: case MOE_DTYPE_Q8_0: case MOE_DTYPE_IQ4_NL: offs[0] = 0; break;
    case MOE_DTYPE_Q4_1: case MOE_DTYPE_Q5_1: case MOE_DTYPE_Q4_K: case MOE_DTYPE_Q5_K:
        offs[0] = 0; offs[1] = 2; break;
    case MOE_DTYPE_Q2_K: offs[0] = 80; offs[1] = 82; break;
    case MOE_DTYPE_Q3_K: offs[0] = 108; break;
    case MOE_DTYPE_Q6_K: offs[0] = 208; break;
    case MOE_DTYPE_MXFP4: blk[0] = (uint8_t)(118 + next32() % 12); break;
    default: break;
    }
    for (int k = 0; k < 2; k++) {
        if (offs[k] < 0)
            continue;
        const uint16_t h = moe_fp32_to_fp16(extreme ? 0.5f : randn() * 0.01f);
        blk[offs[k]] = (uint8_t)h;
        blk[offs[k] + 1] = (uint8_t)(h >> 8);
    }
}

/* rows x n random weights; extreme: every byte 0xff (largest codes,
 * scales and minimums of the K-quants) */
static void random_rows(uint32_t t, uint8_t *w, size_t bytes, int extreme)
{
    const struct moe_dtype_info *di = moe_dtype_info(t);
    if (t == MOE_DTYPE_F32 || t == MOE_DTYPE_F16 || t == MOE_DTYPE_BF16) {
        for (size_t i = 0; i < bytes / di->type_size; i++) {
            const float v = randn() * 0.1f;
            if (t == MOE_DTYPE_F32)
                memcpy(w + 4 * i, &v, 4);
            else {
                const uint16_t h = t == MOE_DTYPE_F16 ? moe_fp32_to_fp16(v) : moe_fp32_to_bf16(v);
                memcpy(w + 2 * i, &h, 2);
            }
        }
        return;
    }
    for (size_t i = 0; i < bytes; i++)
        w[i] = extreme ? 0xff : (uint8_t)next32();
    for (size_t b = 0; b < bytes / di->type_size; b++)
        fix_scales(t, w + b * di->type_size, extreme);
}

/* n_rows x n_tok products of n elements against moe_vecdot. */
static void check_shape(uint32_t t, int64_t n_rows, int64_t n_tok, int64_t n, int extreme)
{
    const size_t rb = moe_dtype_row_bytes(t, n, NULL), ab = moe_vecdot_act_bytes(t, n);
    const int64_t ldy = n_rows + 3;
    uint8_t *w = malloc(rb * (size_t)n_rows), *act = malloc(ab * (size_t)n_tok);
    float *x = malloc((size_t)n * 4), *bias = malloc((size_t)n_rows * 4);
    float *y = malloc((size_t)(ldy * n_tok) * 4);
    CHECK(w && act && x && bias && y);
    random_rows(t, w, rb * (size_t)n_rows, extreme);
    for (int64_t k = 0; k < n_tok; k++) {
        for (int64_t i = 0; i < n; i++)
            x[i] = extreme ? (i % 3 == 0 ? -1.0f : 1.0f) * (float)(k + 1) : randn() * (float)(k % 5 + 1);
        moe_vecdot_quantize_act(t, x, act + (size_t)k * ab, n);
    }
    for (int64_t r = 0; r < n_rows; r++)
        bias[r] = randn();
    for (int b = 0; b < 2; b++) {
        const float guard = -12345.0f;
        for (int64_t i = 0; i < ldy * n_tok; i++)
            y[i] = guard;
        moe_gemm(t, w, rb, n_rows, act, ab, n_tok, n, y, ldy, b ? bias : NULL);
        for (int64_t k = 0; k < n_tok; k++) {
            for (int64_t r = 0; r < ldy; r++) {
                const float got = y[k * ldy + r];
                if (r >= n_rows) {
                    CHECK_MSG(got == guard, "%s: y[%lld][%lld] outside the block written", moe_dtype_name(t),
                              (long long)k, (long long)r);
                    continue;
                }
                float want = moe_vecdot(t, w + (size_t)r * rb, act + (size_t)k * ab, n);
                if (b)
                    want = want + bias[r];
                CHECK_MSG(memcmp(&got, &want, 4) == 0,
                          "%s (%s) rows %lld tok %lld n %lld%s%s: y[tok %lld][row %lld] %.9g, vecdot %.9g",
                          moe_dtype_name(t), moe_vecdot_impl(), (long long)n_rows, (long long)n_tok, (long long)n,
                          b ? " bias" : "", extreme ? " extreme" : "", (long long)k, (long long)r, (double)got,
                          (double)want);
            }
        }
    }
    free(w); free(act); free(x); free(bias); free(y);
}

static void check_type(uint32_t t)
{
    const uint32_t bs = moe_dtype_info(t)->block_size;
    /* lengths: one block, odd block counts, a real width */
    const int64_t lens[3] = { bs == 1 ? 17 : bs, bs == 1 ? 95 : 3 * bs, bs == 1 ? 2048 : (bs == 32 ? 2880 : 2048) };
    static const int64_t rows[] = { 1, 5, 16, 17, 33 };
    static const int64_t toks[] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13 };
    for (size_t li = 0; li < 3; li++)
        for (size_t ri = 0; ri < sizeof(rows) / sizeof(rows[0]); ri++)
            for (size_t ti = 0; ti < sizeof(toks) / sizeof(toks[0]); ti++) {
                if (li == 2 && (ri % 2 || ti % 2))
                    continue;   /* the long rows on fewer shapes */
                check_shape(t, rows[ri], toks[ti], lens[li], 0);
                if (moe_test_failed)
                    return;
            }
    check_shape(t, 19, 6, lens[1], 1);
    if (bs == 1)
        check_shape(t, 7, 9, 100, 0); /* 64 + 32 + 4: every step of the float kernels */
    if (moe_test_failed)
        return;
    /* rows longer than the AVX-512 K-quant tiles unpack at a time (16
     * super-blocks: 17 carry the sums across two panels in blocks of 64
     * tokens), and more tokens than one call's block of running sums (64) */
    check_shape(t, 17, 9, bs == 256 ? 17 * 256 : lens[2], 0);
    if (moe_test_failed)
        return;
    check_shape(t, 5, 70, lens[1], 0);
    if (moe_test_failed)
        return;
    /* the token counts of a prefill: the K-quant tiles unpack rows of up to
     * 16 super-blocks once for all the tokens of a call (the backend then
     * gives them every token), longer rows in blocks of 64 */
    static const int64_t many[] = { 64, 65, 130, 512 };
    for (size_t ti = 0; ti < sizeof(many) / sizeof(many[0]); ti++) {
        check_shape(t, ti % 2 ? 17 : 5, many[ti], bs == 256 ? 8 * 256 : lens[1], 0);
        if (moe_test_failed)
            return;
    }
    if (bs == 256) {
        check_shape(t, 16, 130, 16 * 256, 0);
        if (moe_test_failed)
            return;
        check_shape(t, 3, 130, 17 * 256, 0);
        if (moe_test_failed)
            return;
        check_shape(t, 19, 65, 2 * 256, 1);
    }
}

static void test_all_types(void)
{
    static const uint32_t types[] = {
        MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q4_0, MOE_DTYPE_Q4_1,
        MOE_DTYPE_Q5_0, MOE_DTYPE_Q5_1, MOE_DTYPE_Q8_0, MOE_DTYPE_Q2_K, MOE_DTYPE_Q3_K,
        MOE_DTYPE_Q4_K, MOE_DTYPE_Q5_K, MOE_DTYPE_Q6_K, MOE_DTYPE_IQ4_NL, MOE_DTYPE_MXFP4,
    };
    printf("  implementation: %s; tiled:", moe_vecdot_impl());
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
        if (moe_gemm_tiled(types[i]))
            printf(" %s", moe_dtype_name(types[i]));
    printf("\n");
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        check_type(types[i]);
        if (moe_test_failed)
            return;
    }
}

MOE_TEST_SIMD_PATHS(test_all_types)

int main(void)
{
    MOE_TEST_RUN(test_avx512_path);
    MOE_TEST_RUN(test_avx2_path);
    MOE_TEST_RUN(test_scalar_path);
    return moe_test_exit_code();
}

/* kernels/blocks.h against the rest of the project: every block struct's
 * size and element count against the dtype table (common/dtype.c), the
 * field offsets that tests and the CUDA kernels rely on, the activation
 * format of every weight type against what the kernels compute, the
 * shared grids and unpacking helpers against their definitions; and that
 * the dequantizers, which read rows as structs, still take any address. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/dtype.h"
#include "kernels/blocks.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cpu/vecdot.h"
#include "tests/harness.h"

/* One row per block struct: its type, its size and the elements it holds. */
static const struct {
    uint32_t type;
    size_t size;
    int qk;
} blocks[] = {
    { MOE_DTYPE_Q4_0, sizeof(struct moe_block_q4_0), MOE_QK4_0 },
    { MOE_DTYPE_Q4_1, sizeof(struct moe_block_q4_1), MOE_QK4_1 },
    { MOE_DTYPE_Q5_0, sizeof(struct moe_block_q5_0), MOE_QK5_0 },
    { MOE_DTYPE_Q5_1, sizeof(struct moe_block_q5_1), MOE_QK5_1 },
    { MOE_DTYPE_Q8_0, sizeof(struct moe_block_q8_0), MOE_QK8_0 },
    { MOE_DTYPE_Q8_1, sizeof(struct moe_block_q8_1), MOE_QK8_1 },
    { MOE_DTYPE_IQ4_NL, sizeof(struct moe_block_iq4_nl), MOE_QK4_NL },
    { MOE_DTYPE_MXFP4, sizeof(struct moe_block_mxfp4), MOE_QK_MXFP4 },
    { MOE_DTYPE_Q2_K, sizeof(struct moe_block_q2_k), MOE_QK_K },
    { MOE_DTYPE_Q3_K, sizeof(struct moe_block_q3_k), MOE_QK_K },
    { MOE_DTYPE_Q4_K, sizeof(struct moe_block_q4_k), MOE_QK_K },
    { MOE_DTYPE_Q5_K, sizeof(struct moe_block_q5_k), MOE_QK_K },
    { MOE_DTYPE_Q6_K, sizeof(struct moe_block_q6_k), MOE_QK_K },
    { MOE_DTYPE_Q8_K, sizeof(struct moe_block_q8_k), MOE_QK_K },
};
enum { N_BLOCKS = sizeof(blocks) / sizeof(blocks[0]) };

static const uint32_t elementwise[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16 };

static int has_struct(uint32_t t)
{
    for (int i = 0; i < N_BLOCKS; i++)
        if (blocks[i].type == t)
            return 1;
    return 0;
}

static int is_elementwise(uint32_t t)
{
    for (size_t i = 0; i < sizeof(elementwise) / sizeof(elementwise[0]); i++)
        if (elementwise[i] == t)
            return 1;
    return 0;
}

static void test_sizes_match_dtype_table(void)
{
    for (int i = 0; i < N_BLOCKS; i++) {
        const struct moe_dtype_info *d = moe_dtype_info(blocks[i].type);
        CHECK_MSG(d != NULL, "type %u missing from the dtype table", blocks[i].type);
        CHECK_MSG(d->type_size == blocks[i].size, "%s: struct is %zu bytes, the dtype table says %u",
                  d->name, blocks[i].size, d->type_size);
        CHECK_MSG(d->block_size == (uint32_t)blocks[i].qk, "%s: QK is %d, the dtype table says %u",
                  d->name, blocks[i].qk, d->block_size);
    }
}

/* Every type the CPU backend dequantizes is elementwise or has a struct:
 * a type computed without one would be a layout written out somewhere
 * else. */
static void test_computed_types_have_structs(void)
{
    for (uint32_t t = 0; t < MOE_DTYPE_COUNT; t++) {
        if (moe_dtype_info(t) == NULL || !moe_dequantize_supported(t))
            continue;
        CHECK_MSG(has_struct(t) || is_elementwise(t), "%s is dequantized but has no block struct",
                  moe_dtype_name(t));
    }
}

/* The offsets that the gpu tests' fillers and the fixtures' generator
 * write scales at (ggml-common.h's layouts, counted by hand). */
static void test_field_offsets(void)
{
    CHECK_INT(offsetof(struct moe_block_q4_0, qs), ==, 2);
    CHECK_INT(offsetof(struct moe_block_q4_1, m), ==, 2);
    CHECK_INT(offsetof(struct moe_block_q4_1, qs), ==, 4);
    CHECK_INT(offsetof(struct moe_block_q5_0, qh), ==, 2);
    CHECK_INT(offsetof(struct moe_block_q5_0, qs), ==, 6);
    CHECK_INT(offsetof(struct moe_block_q5_1, qh), ==, 4);
    CHECK_INT(offsetof(struct moe_block_q5_1, qs), ==, 8);
    CHECK_INT(offsetof(struct moe_block_q8_0, qs), ==, 2);
    CHECK_INT(offsetof(struct moe_block_q8_1, s), ==, 2);
    CHECK_INT(offsetof(struct moe_block_q8_1, qs), ==, 4);
    CHECK_INT(offsetof(struct moe_block_iq4_nl, qs), ==, 2);
    CHECK_INT(offsetof(struct moe_block_mxfp4, qs), ==, 1);
    CHECK_INT(offsetof(struct moe_block_q2_k, qs), ==, 16);
    CHECK_INT(offsetof(struct moe_block_q2_k, d), ==, 80);
    CHECK_INT(offsetof(struct moe_block_q2_k, dmin), ==, 82);
    CHECK_INT(offsetof(struct moe_block_q3_k, qs), ==, 32);
    CHECK_INT(offsetof(struct moe_block_q3_k, scales), ==, 96);
    CHECK_INT(offsetof(struct moe_block_q3_k, d), ==, 108);
    CHECK_INT(offsetof(struct moe_block_q4_k, dmin), ==, 2);
    CHECK_INT(offsetof(struct moe_block_q4_k, scales), ==, 4);
    CHECK_INT(offsetof(struct moe_block_q4_k, qs), ==, 16);
    CHECK_INT(offsetof(struct moe_block_q5_k, qh), ==, 16);
    CHECK_INT(offsetof(struct moe_block_q5_k, qs), ==, 48);
    CHECK_INT(offsetof(struct moe_block_q6_k, qh), ==, 128);
    CHECK_INT(offsetof(struct moe_block_q6_k, scales), ==, 192);
    CHECK_INT(offsetof(struct moe_block_q6_k, d), ==, 208);
    CHECK_INT(offsetof(struct moe_block_q8_k, qs), ==, 4);
    CHECK_INT(offsetof(struct moe_block_q8_k, bsums), ==, 260);
}

/* ggml-cpu.c's vec_dot_type column, written out independently of the
 * header's switch. */
static void test_vec_dot_types(void)
{
    static const struct { uint32_t w; int act; } want[] = {
        { MOE_DTYPE_F32, MOE_DTYPE_F32 },     { MOE_DTYPE_F16, MOE_DTYPE_F16 },
        { MOE_DTYPE_BF16, MOE_DTYPE_BF16 },   { MOE_DTYPE_Q4_0, MOE_DTYPE_Q8_0 },
        { MOE_DTYPE_Q4_1, MOE_DTYPE_Q8_1 },   { MOE_DTYPE_Q5_0, MOE_DTYPE_Q8_0 },
        { MOE_DTYPE_Q5_1, MOE_DTYPE_Q8_1 },   { MOE_DTYPE_Q8_0, MOE_DTYPE_Q8_0 },
        { MOE_DTYPE_IQ4_NL, MOE_DTYPE_Q8_0 }, { MOE_DTYPE_MXFP4, MOE_DTYPE_Q8_0 },
        { MOE_DTYPE_Q2_K, MOE_DTYPE_Q8_K },   { MOE_DTYPE_Q3_K, MOE_DTYPE_Q8_K },
        { MOE_DTYPE_Q4_K, MOE_DTYPE_Q8_K },   { MOE_DTYPE_Q5_K, MOE_DTYPE_Q8_K },
        { MOE_DTYPE_Q6_K, MOE_DTYPE_Q8_K },
    };
    int n_with = 0;
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        CHECK_MSG(moe_dtype_vec_dot_type(want[i].w) == want[i].act, "%s: activations %s, expected %s",
                  moe_dtype_name(want[i].w), moe_dtype_name((uint32_t)moe_dtype_vec_dot_type(want[i].w)),
                  moe_dtype_name((uint32_t)want[i].act));
    for (uint32_t t = 0; t < MOE_DTYPE_COUNT + 2; t++)
        n_with += moe_dtype_vec_dot_type(t) >= 0;
    CHECK_INT(n_with, ==, sizeof(want) / sizeof(want[0]));
}

/* For every weight type with a dot product: the CPU computes it; the
 * activation type is elementwise or a block struct; a weight block holds
 * whole activation blocks (the kernels walk both rows block by block); and
 * the CPU's activation row is exactly a row of that type. */
static void test_vec_dot_types_fit_the_kernels(void)
{
    for (uint32_t t = 0; t < MOE_DTYPE_COUNT; t++) {
        const int a = moe_dtype_vec_dot_type(t);
        CHECK_MSG((a >= 0) == (moe_vecdot_supported(t) != 0), "%s: vec_dot_type %d, CPU support %d",
                  moe_dtype_name(t), a, moe_vecdot_supported(t));
        if (a < 0)
            continue;
        const struct moe_dtype_info *w = moe_dtype_info(t), *ai = moe_dtype_info((uint32_t)a);
        CHECK(w != NULL && ai != NULL);
        CHECK_MSG(has_struct((uint32_t)a) || is_elementwise((uint32_t)a), "%s: activation type %s has no struct",
                  w->name, ai->name);
        CHECK_MSG(is_elementwise(t) ? a == (int)t : has_struct((uint32_t)a),
                  "%s: an elementwise type keeps its own activations", w->name);
        CHECK_MSG(w->block_size % ai->block_size == 0, "%s: block of %u, activation block of %u", w->name,
                  w->block_size, ai->block_size);
        const int64_t n = 4 * (int64_t)w->block_size;
        CHECK_U64(moe_vecdot_act_bytes(t, n), ==, moe_dtype_row_bytes((enum moe_dtype)a, (uint64_t)n, NULL));
    }
}

static void test_grids(void)
{
    static const uint32_t iq[4] = { MOE_IQ4NL_GRID(MOE_GRID_WORD) };
    static const uint32_t mx[4] = { MOE_MXFP4_GRID(MOE_GRID_WORD) };
    for (int i = 0; i < 16; i++) {
        CHECK_INT((int8_t)(iq[i / 4] >> 8 * (i % 4)), ==, moe_iq4nl_values[i]);
        CHECK_INT((int8_t)(mx[i / 4] >> 8 * (i % 4)), ==, moe_mxfp4_values[i]);
        if (i > 0)
            CHECK(moe_iq4nl_values[i] > moe_iq4nl_values[i - 1]);
        /* E2M1 (OCP MX): sign, 2 exponent bits (bias 1), 1 mantissa bit;
         * exponent 0 is subnormal. The grid holds twice the value. */
        const int e = (i >> 1) & 3, m = i & 1;
        const float v = e == 0 ? 0.5f * (float)m : ldexpf(1.0f + 0.5f * (float)m, e - 1);
        CHECK_MSG((float)moe_mxfp4_values[i] == 2.0f * (i & 8 ? -v : v), "mxfp4 code %d", i);
    }
}

static void test_e8m0_half(void)
{
    for (int e = 0; e < 256; e++)
        CHECK_MSG(moe_e8m0_half((uint8_t)e) == ldexpf(1.0f, e - 128), "e %d: %g", e,
                  (double)moe_e8m0_half((uint8_t)e));
}

/* The packed 6-bit scales read back what a packer written from the
 * layout's description put in. */
static void test_scale_unpacking(void)
{
    uint32_t s = 12345;
    for (int rep = 0; rep < 200; rep++) {
        int sc[8], mn[8], s3[16];
        uint8_t q[12] = { 0 }, q3[12] = { 0 };
        for (int j = 0; j < 16; j++) {
            s = s * 1103515245u + 12345u;
            if (j < 8) {
                sc[j] = (int)(s >> 10) & 63;
                mn[j] = (int)(s >> 20) & 63;
            }
            s3[j] = (int)(s >> 16) & 63;
        }
        for (int j = 0; j < 4; j++) {
            q[j] = (uint8_t)(sc[j] | (sc[j + 4] >> 4) << 6);
            q[j + 4] = (uint8_t)(mn[j] | (mn[j + 4] >> 4) << 6);
            q[j + 8] = (uint8_t)((sc[j + 4] & 0xf) | (mn[j + 4] & 0xf) << 4);
        }
        for (int j = 0; j < 16; j++) {
            q3[j % 8] |= (uint8_t)((s3[j] & 0xf) << (4 * (j / 8)));
            q3[8 + j % 4] |= (uint8_t)((s3[j] >> 4) << (2 * (j / 4)));
        }
        for (int j = 0; j < 8; j++) {
            int a, b;
            moe_q4k_scale_min(j, q, &a, &b);
            CHECK_MSG(a == sc[j] && b == mn[j], "q4k group %d: %d/%d, packed %d/%d", j, a, b, sc[j], mn[j]);
        }
        for (int j = 0; j < 16; j++)
            CHECK_INT(moe_q3k_scale(q3, j), ==, s3[j] - 32);
    }
}

/* The structs need their alignment, but moe_dequantize_row takes rows at
 * any address (a GGUF file may declare general.alignment = 1): the same
 * bytes at every offset give the same floats. */
static void test_dequant_any_alignment(void)
{
    enum { N = 2048, CAP = N * 4 + 16 };
    static _Alignas(16) unsigned char buf[CAP];
    static float want[N], got[N];
    uint32_t s = 99;
    for (uint32_t t = 0; t < MOE_DTYPE_COUNT; t++) {
        if (!moe_dequantize_supported(t))
            continue;
        const size_t rb = moe_dtype_row_bytes((enum moe_dtype)t, N, NULL);
        CHECK(rb > 0 && rb + 8 <= CAP);
        unsigned char *row = malloc(rb);
        CHECK(row != NULL);
        for (size_t i = 0; i < rb; i++) {
            s = s * 1103515245u + 12345u;
            row[i] = (unsigned char)(s >> 16);
        }
        memcpy(buf, row, rb);
        CHECK_INT(moe_dequantize_row(t, buf, want, N), ==, 0);
        for (int off = 1; off < 8; off++) {
            memcpy(buf + off, row, rb);
            CHECK_INT(moe_dequantize_row(t, buf + off, got, N), ==, 0);
            CHECK_MSG(memcmp(got, want, sizeof(got)) == 0, "%s at offset %d", moe_dtype_name(t), off);
        }
        free(row);
    }
}

int main(void)
{
    MOE_TEST_RUN(test_sizes_match_dtype_table);
    MOE_TEST_RUN(test_computed_types_have_structs);
    MOE_TEST_RUN(test_field_offsets);
    MOE_TEST_RUN(test_vec_dot_types);
    MOE_TEST_RUN(test_vec_dot_types_fit_the_kernels);
    MOE_TEST_RUN(test_grids);
    MOE_TEST_RUN(test_e8m0_half);
    MOE_TEST_RUN(test_scale_unpacking);
    MOE_TEST_RUN(test_dequant_any_alignment);
    return moe_test_exit_code();
}

/* The ggml block-type table: sizes as ggml defines them, lookups by id and
 * name, row-size arithmetic and its errors. */
#include <errno.h>
#include <stdint.h>

#include "common/dtype.h"
#include "tests/harness.h"

static void test_known_sizes(void)
{
    /* Block geometry from ggml-common.h (QK_K = 256). */
    static const struct { int id; const char *name; unsigned bs, ts; } want[] = {
        { 0, "F32", 1, 4 },      { 1, "F16", 1, 2 },       { 30, "BF16", 1, 2 },
        { 2, "Q4_0", 32, 18 },   { 3, "Q4_1", 32, 20 },    { 6, "Q5_0", 32, 22 },
        { 7, "Q5_1", 32, 24 },   { 8, "Q8_0", 32, 34 },    { 9, "Q8_1", 32, 36 },
        { 10, "Q2_K", 256, 84 }, { 11, "Q3_K", 256, 110 }, { 12, "Q4_K", 256, 144 },
        { 13, "Q5_K", 256, 176 },{ 14, "Q6_K", 256, 210 }, { 15, "Q8_K", 256, 292 },
        { 16, "IQ2_XXS", 256, 66 }, { 17, "IQ2_XS", 256, 74 }, { 18, "IQ3_XXS", 256, 98 },
        { 19, "IQ1_S", 256, 50 }, { 20, "IQ4_NL", 32, 18 }, { 21, "IQ3_S", 256, 110 },
        { 22, "IQ2_S", 256, 82 }, { 23, "IQ4_XS", 256, 136 }, { 29, "IQ1_M", 256, 56 },
        { 34, "TQ1_0", 256, 54 }, { 35, "TQ2_0", 256, 66 }, { 39, "MXFP4", 32, 17 },
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        const struct moe_dtype_info *d = moe_dtype_info((uint32_t)want[i].id);
        CHECK_MSG(d != NULL, "type %d missing", want[i].id);
        CHECK_STR(d->name, want[i].name);
        CHECK_INT(d->block_size, ==, want[i].bs);
        CHECK_INT(d->type_size, ==, want[i].ts);
        CHECK_INT(moe_dtype_from_name(want[i].name), ==, want[i].id);
    }
}

static void test_removed_and_out_of_range(void)
{
    static const uint32_t bad[] = { 4, 5, 31, 32, 33, 36, 37, 38, MOE_DTYPE_COUNT, 1000, UINT32_MAX };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        CHECK_MSG(moe_dtype_info(bad[i]) == NULL, "id %u should be unknown", bad[i]);
        CHECK_STR(moe_dtype_name(bad[i]), "?");
    }
    CHECK_INT(moe_dtype_from_name("Q4_0_4_4"), ==, -1);
    CHECK_INT(moe_dtype_from_name("f32"), ==, -1);
}

static void test_row_bytes(void)
{
    int err = 1;
    CHECK_U64(moe_dtype_row_bytes(MOE_DTYPE_Q4_K, 4096, &err), ==, 16 * 144);
    CHECK_INT(err, ==, 0);
    CHECK_U64(moe_dtype_row_bytes(MOE_DTYPE_F16, 7, &err), ==, 14);
    CHECK_U64(moe_dtype_row_bytes(MOE_DTYPE_Q8_0, 33, &err), ==, 0);
    CHECK_INT(err, ==, -EINVAL);
    CHECK_U64(moe_dtype_row_bytes((enum moe_dtype)4, 32, &err), ==, 0);
    CHECK_INT(err, ==, -EINVAL);
    CHECK_U64(moe_dtype_row_bytes(MOE_DTYPE_F64, UINT64_MAX / 4, &err), ==, 0);
    CHECK_INT(err, ==, -EOVERFLOW);
}

int main(void)
{
    MOE_TEST_RUN(test_known_sizes);
    MOE_TEST_RUN(test_removed_and_out_of_range);
    MOE_TEST_RUN(test_row_bytes);
    return moe_test_exit_code();
}

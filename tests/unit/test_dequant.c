/* Dequantization against the gguf Python package, bit for bit, on random
 * blocks of every type we compute (fixtures from
 * tools/ref/make_dequant_fixtures.py), plus argument checks. */
#include <errno.h>
#include <stdlib.h>

#include "common/error.h"
#include "kernels/cpu/dequant.h"
#include "tests/harness.h"

static void check_type(const char *name)
{
    char path[4096];
    const char *root = getenv("MOE_SOURCE_ROOT");
    CHECK_MSG(root != NULL, "MOE_SOURCE_ROOT not set");
    int t = moe_dtype_from_name(name);
    CHECK(t >= 0);
    size_t nb = 0, ny = 0;
    snprintf(path, sizeof(path), "%s/tests/fixtures/dequant/%s.blocks", root, name);
    uint8_t *blocks = moe_test_read_file(path, &nb);
    CHECK_MSG(blocks != NULL, "cannot read %s", path);
    snprintf(path, sizeof(path), "%s/tests/fixtures/dequant/%s.f32", root, name);
    uint32_t *want = moe_test_read_file(path, &ny);
    CHECK_MSG(want != NULL, "cannot read %s", path);
    int64_t n = (int64_t)(ny / 4);
    const struct moe_dtype_info *info = moe_dtype_info((uint32_t)t);
    CHECK_U64(nb, ==, (uint64_t)n / info->block_size * info->type_size);
    /* One guard float past the end must survive. */
    uint32_t *got = malloc((size_t)(n + 1) * 4);
    CHECK(got != NULL);
    got[n] = 0xdeadbeefu;
    CHECK_INT(moe_dequantize_row((uint32_t)t, blocks, (float *)got, n), ==, 0);
    CHECK_INT(got[n], ==, 0xdeadbeefu);
    for (int64_t i = 0; i < n; i++)
        CHECK_MSG(got[i] == want[i], "%s element %lld: got bits %08x, gguf-py %08x", name,
                  (long long)i, got[i], want[i]);
    free(got);
    free(blocks);
    free(want);
}

static void test_f16(void) { check_type("F16"); }
static void test_bf16(void) { check_type("BF16"); }
static void test_q4_0(void) { check_type("Q4_0"); }
static void test_q4_1(void) { check_type("Q4_1"); }
static void test_q5_0(void) { check_type("Q5_0"); }
static void test_q5_1(void) { check_type("Q5_1"); }
static void test_q8_0(void) { check_type("Q8_0"); }
static void test_q2_k(void) { check_type("Q2_K"); }
static void test_q3_k(void) { check_type("Q3_K"); }
static void test_q4_k(void) { check_type("Q4_K"); }
static void test_q5_k(void) { check_type("Q5_K"); }
static void test_q6_k(void) { check_type("Q6_K"); }
static void test_iq4_nl(void) { check_type("IQ4_NL"); }
static void test_mxfp4(void) { check_type("MXFP4"); }

static void test_arguments(void)
{
    uint8_t blk[34] = { 0 };
    float y[64];
    CHECK_INT(moe_dequantize_row(MOE_DTYPE_Q8_0, blk, y, 31), ==, -EINVAL);
    CHECK_INT(moe_dequantize_row(MOE_DTYPE_Q8_0, blk, y, -32), ==, -EINVAL);
    CHECK_INT(moe_dequantize_row(MOE_DTYPE_IQ2_XXS, blk, y, 256), ==, MOE_EUNSUPPORTED);
    CHECK_INT(moe_dequantize_row(4, blk, y, 32), ==, MOE_EUNSUPPORTED);
    CHECK(!moe_dequantize_supported(MOE_DTYPE_IQ2_XXS));
    CHECK(moe_dequantize_supported(MOE_DTYPE_F32));
    float x[3] = { 1.5f, -2.0f, 3.25f };
    CHECK_INT(moe_dequantize_row(MOE_DTYPE_F32, x, y, 3), ==, 0);
    CHECK(y[0] == 1.5f && y[1] == -2.0f && y[2] == 3.25f);
}

/* Q8_K has no gguf-py dequantizer: check it against its definition. */
static void test_q8_k(void)
{
    uint8_t b[292] = { 0 };
    float d = 0.125f;
    memcpy(b, &d, 4);
    for (int i = 0; i < 256; i++)
        b[4 + i] = (uint8_t)(int8_t)(i - 128);
    float y[256];
    CHECK_INT(moe_dequantize_row(MOE_DTYPE_Q8_K, b, y, 256), ==, 0);
    for (int i = 0; i < 256; i++)
        CHECK(y[i] == 0.125f * (float)(i - 128));
}

int main(void)
{
    MOE_TEST_RUN(test_f16);
    MOE_TEST_RUN(test_bf16);
    MOE_TEST_RUN(test_q4_0);
    MOE_TEST_RUN(test_q4_1);
    MOE_TEST_RUN(test_q5_0);
    MOE_TEST_RUN(test_q5_1);
    MOE_TEST_RUN(test_q8_0);
    MOE_TEST_RUN(test_q2_k);
    MOE_TEST_RUN(test_q3_k);
    MOE_TEST_RUN(test_q4_k);
    MOE_TEST_RUN(test_q5_k);
    MOE_TEST_RUN(test_q6_k);
    MOE_TEST_RUN(test_iq4_nl);
    MOE_TEST_RUN(test_mxfp4);
    MOE_TEST_RUN(test_q8_k);
    MOE_TEST_RUN(test_arguments);
    return moe_test_exit_code();
}

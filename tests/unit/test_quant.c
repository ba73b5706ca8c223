/* Quantizers: bit-exact with llama-quantize. shared/ref's F16, Q8_0 and Q4_0
 * variants of tiny-mixtral were made by llama-quantize from the F32 master,
 * so quantizing the master's tensors must reproduce their bytes exactly
 * wherever the variant stores that tensor in that type. Plus round trips
 * and argument checks without shared/ref. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>

#include "common/error.h"
#include "io/gguf.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cpu/quant.h"
#include "kernels/dtype.h"
#include "tests/harness.h"

static void check_variant(const char *variant)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char p32[4096], pq[4096];
    snprintf(p32, sizeof(p32), "%s/models/tiny-mixtral-F32.gguf", ref);
    snprintf(pq, sizeof(pq), "%s/models/tiny-mixtral-%s.gguf", ref, variant);
    struct moe_gguf *g32, *gq;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_gguf_open(&g32, p32, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_gguf_open(&gq, pq, &d) == 0, "%s", d.msg);
    CHECK(moe_gguf_map(g32, &d) == 0 && moe_gguf_map(gq, &d) == 0);
    int compared = 0;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(gq); i++) {
        const struct moe_gguf_tensor *tq = moe_gguf_tensor_at(gq, i);
        const struct moe_gguf_tensor *t32 = moe_gguf_find_tensor(g32, tq->name);
        CHECK(t32 != NULL && t32->dtype == MOE_DTYPE_F32);
        if (tq->dtype == MOE_DTYPE_F32)
            continue;
        CHECK(moe_quantize_supported(tq->dtype));
        uint8_t *out = malloc(tq->size);
        CHECK(out != NULL);
        size_t rb = moe_dtype_row_bytes(tq->dtype, tq->ne[0], NULL);
        const float *src = moe_gguf_tensor_data(g32, t32);
        for (uint64_t r = 0; r < tq->n_elements / tq->ne[0]; r++)
            CHECK(moe_quantize_row(tq->dtype, src + r * tq->ne[0], out + r * rb, (int64_t)tq->ne[0]) == 0);
        CHECK_MSG(memcmp(out, moe_gguf_tensor_data(gq, tq), tq->size) == 0,
                  "%s: %s (%s) differs from llama-quantize", variant, tq->name, moe_dtype_name(tq->dtype));
        free(out);
        compared++;
    }
    printf("  %s: %d tensors bit-exact\n", variant, compared);
    CHECK(compared >= 20);
    moe_gguf_close(g32);
    moe_gguf_close(gq);
}

static void test_f16_vs_llama_quantize(void) { check_variant("F16"); }
static void test_q8_0_vs_llama_quantize(void) { check_variant("Q8_0"); }
static void test_q4_0_vs_llama_quantize(void) { check_variant("Q4_0"); }

static void test_round_trip(void)
{
    static const uint32_t types[] = { MOE_DTYPE_F32, MOE_DTYPE_F16, MOE_DTYPE_BF16, MOE_DTYPE_Q8_0,
                                      MOE_DTYPE_Q4_0 };
    static const double tol[] = { 0, 1e-3, 8e-3, 1.0 / 127, 1.0 / 7 };
    float x[256], y[256];
    for (int i = 0; i < 256; i++)
        x[i] = sinf((float)i * 0.37f) * (1.0f + (float)(i % 7));
    x[5] = 0.0f;
    uint8_t buf[1024];
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        CHECK(moe_quantize_row(types[t], x, buf, 256) == 0);
        CHECK(moe_dequantize_row(types[t], buf, y, 256) == 0);
        for (int b = 0; b < 256; b += 32) {
            float amax = 0;
            for (int j = 0; j < 32; j++)
                amax = fmaxf(amax, fabsf(x[b + j]));
            for (int j = 0; j < 32; j++)
                CHECK_MSG(fabs(y[b + j] - x[b + j]) <= tol[t] * amax + 1e-7, "%s [%d]: %g -> %g",
                          moe_dtype_name(types[t]), b + j, (double)x[b + j], (double)y[b + j]);
        }
    }
    /* an all-zero block stays zero */
    memset(x, 0, sizeof(x));
    CHECK(moe_quantize_row(MOE_DTYPE_Q4_0, x, buf, 32) == 0);
    CHECK(moe_dequantize_row(MOE_DTYPE_Q4_0, buf, y, 32) == 0);
    for (int j = 0; j < 32; j++)
        CHECK(y[j] == 0.0f);
}

static void test_arguments(void)
{
    float x[64] = { 0 };
    uint8_t buf[256];
    CHECK_INT(moe_quantize_row(MOE_DTYPE_Q8_0, x, buf, 33), ==, -EINVAL);
    CHECK_INT(moe_quantize_row(MOE_DTYPE_Q4_K, x, buf, 256), ==, MOE_EUNSUPPORTED);
    CHECK_INT(moe_quantize_row(4, x, buf, 32), ==, MOE_EUNSUPPORTED);
}

int main(void)
{
    MOE_TEST_RUN(test_f16_vs_llama_quantize);
    MOE_TEST_RUN(test_q8_0_vs_llama_quantize);
    MOE_TEST_RUN(test_q4_0_vs_llama_quantize);
    MOE_TEST_RUN(test_round_trip);
    MOE_TEST_RUN(test_arguments);
    return moe_test_exit_code();
}

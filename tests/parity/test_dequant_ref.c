/* Every non-F32 tensor of every shared/ref model, dequantized by the CPU
 * backend, hashes (XXH3-64 of the float32 bytes) to what the gguf Python
 * package produces (tests/fixtures/dequant/ref-hashes.json). */
#include <jansson.h>
#include <stdlib.h>
#include <xxhash.h>

#include "io/gguf.h"
#include "kernels/cpu/dequant.h"
#include "tests/harness.h"

static void test_ref_models(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096];
    snprintf(path, sizeof(path), "%s/tests/fixtures/dequant/ref-hashes.json",
             getenv("MOE_SOURCE_ROOT"));
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    CHECK_MSG(root != NULL, "%s: %s", path, jerr.text);
    const char *model;
    json_t *tensors;
    int n_checked = 0;
    json_object_foreach(root, model, tensors) {
        snprintf(path, sizeof(path), "%s/models/%s", ref, model);
        struct moe_gguf *g;
        struct moe_diag d = { 0 };
        CHECK_MSG(moe_gguf_open(&g, path, &d) == 0, "%s", d.msg);
        /* Every non-F32 tensor of the file must be in the fixture. */
        size_t n_non_f32 = 0;
        for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++)
            n_non_f32 += moe_gguf_tensor_at(g, i)->dtype != MOE_DTYPE_F32;
        CHECK_U64(n_non_f32, ==, json_object_size(tensors));
        const char *tname;
        json_t *want;
        json_object_foreach(tensors, tname, want) {
            const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, tname);
            CHECK_MSG(t != NULL, "%s: tensor %s missing", model, tname);
            CHECK_STR(moe_dtype_name(t->dtype), json_string_value(json_object_get(want, "type")));
            uint8_t *raw = malloc(t->size);
            float *y = malloc(t->n_elements * sizeof(float));
            CHECK(raw && y);
            CHECK_MSG(moe_gguf_pread(g, t, 0, raw, t->size, &d) == 0, "%s", d.msg);
            size_t row_bytes = moe_dtype_row_bytes(t->dtype, t->ne[0], NULL);
            uint64_t rows = t->n_elements / t->ne[0];
            for (uint64_t r = 0; r < rows; r++)
                CHECK_INT(moe_dequantize_row(t->dtype, raw + r * row_bytes, y + r * t->ne[0],
                                             (int64_t)t->ne[0]), ==, 0);
            char hex[17];
            snprintf(hex, sizeof(hex), "%016llx",
                     (unsigned long long)XXH3_64bits(y, t->n_elements * sizeof(float)));
            CHECK_MSG(strcmp(hex, json_string_value(json_object_get(want, "xxh3"))) == 0,
                      "%s: %s (%s): dequantization differs from gguf-py", model, tname,
                      moe_dtype_name(t->dtype));
            free(raw);
            free(y);
            n_checked++;
        }
        moe_gguf_close(g);
    }
    printf("  %d tensors bit-exact\n", n_checked);
    CHECK(n_checked > 100);
    json_decref(root);
}

int main(void)
{
    MOE_TEST_RUN(test_ref_models);
    return moe_test_exit_code();
}

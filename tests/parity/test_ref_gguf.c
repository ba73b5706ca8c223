/* The GGUF reader on every shared/ref model and vocabulary: every tensor's
 * type and shape equal manifest.json's, the file size and file type match,
 * tensor bytes read by pread equal those seen through the mapping, F32
 * tensors are finite, and each vocab file has the token count its
 * tokenizer golden states. Every .gguf under models/ and vocab/ is covered:
 * a file added there without a manifest entry or golden fails the test. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>

#include "io/gguf.h"
#include "common/dtype.h"
#include "tests/harness.h"

static void test_models_match_manifest(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096];
    snprintf(path, sizeof(path), "%s/manifest.json", ref);
    json_t *man = json_load_file(path, 0, NULL);
    CHECK(man != NULL);
    const char *model;
    json_t *mj;
    int n_files = 0, n_tensors = 0;
    json_object_foreach(json_object_get(man, "models"), model, mj) {
        const char *vname;
        json_t *vj;
        json_object_foreach(json_object_get(mj, "variants"), vname, vj) {
            snprintf(path, sizeof(path), "%s/models/%s", ref,
                     json_string_value(json_object_get(vj, "file")));
            struct moe_gguf *g;
            struct moe_diag d = { 0 };
            CHECK_MSG(moe_gguf_open(&g, path, &d) == 0, "%s", d.msg);
            CHECK_MSG(moe_gguf_map(g, &d) == 0, "%s", d.msg);
            CHECK_U64(moe_gguf_file_size(g), ==, json_integer_value(json_object_get(vj, "bytes")));
            uint32_t ft = 0;
            CHECK(moe_gguf_get_u32(g, "general.file_type", &ft, &d) == 0);
            CHECK_U64(ft, ==, json_integer_value(json_object_get(vj, "general.file_type")));
            json_t *types = json_object_get(vj, "tensor_types");
            CHECK_U64(moe_gguf_n_tensors(g), ==, json_object_size(types));
            const char *tname;
            json_t *tj;
            json_object_foreach(types, tname, tj) {
                const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, tname);
                CHECK_MSG(t != NULL, "%s: %s missing", path, tname);
                CHECK_STR(moe_dtype_name(t->dtype), json_string_value(json_object_get(tj, "type")));
                json_t *ne = json_object_get(tj, "ne");
                CHECK_U64(t->n_dims, ==, json_array_size(ne));
                for (size_t i = 0; i < json_array_size(ne); i++)
                    CHECK_U64(t->ne[i], ==, json_integer_value(json_array_get(ne, i)));
                uint8_t *buf = malloc(t->size);
                CHECK(buf != NULL);
                CHECK_MSG(moe_gguf_pread(g, t, 0, buf, t->size, &d) == 0, "%s", d.msg);
                CHECK_MSG(memcmp(buf, moe_gguf_tensor_data(g, t), t->size) == 0,
                          "%s: %s: pread and mmap differ", path, tname);
                CHECK_U64(t->offset % moe_gguf_alignment(g), ==, 0);
                /* a read inside the tensor, at an odd offset */
                if (t->size > 8) {
                    uint8_t part[7];
                    CHECK(moe_gguf_pread(g, t, t->size / 2 + 1, part, sizeof(part), &d) == 0);
                    CHECK(memcmp(part, buf + t->size / 2 + 1, sizeof(part)) == 0);
                }
                if (t->dtype == MOE_DTYPE_F32)
                    for (uint64_t i = 0; i < t->n_elements; i++) {
                        float v;
                        memcpy(&v, buf + i * 4, 4);
                        CHECK_MSG(isfinite(v), "%s: %s[%llu] not finite", path, tname,
                                  (unsigned long long)i);
                    }
                free(buf);
                n_tensors++;
            }
            /* reading past a tensor's end is refused */
            const struct moe_gguf_tensor *t0 = moe_gguf_tensor_at(g, 0);
            uint8_t b[8];
            CHECK(moe_gguf_pread(g, t0, t0->size - 4, b, 8, NULL) == -EINVAL);
            moe_gguf_close(g);
            n_files++;
        }
    }
    printf("  %d files, %d tensors checked\n", n_files, n_tensors);
    CHECK_INT(n_files, ==, 10);
    json_decref(man);
}

static void test_vocab_files(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    static const char *const vocabs[] = { "llama-spm", "qwen2", "llama-bpe", "gpt-2",
                                          "deepseek-llm", "deepseek-coder" };
    for (size_t i = 0; i < sizeof(vocabs) / sizeof(vocabs[0]); i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/tokenizer/tokenizer-%s.json", ref, vocabs[i]);
        json_t *tj = json_load_file(path, 0, NULL);
        CHECK_MSG(tj != NULL, "%s", path);
        snprintf(path, sizeof(path), "%s/vocab/ggml-vocab-%s.gguf", ref, vocabs[i]);
        struct moe_gguf *g;
        struct moe_diag d = { 0 };
        CHECK_MSG(moe_gguf_open(&g, path, &d) == 0, "%s", d.msg);
        CHECK_U64(moe_gguf_n_tensors(g), ==, 0);
        const struct moe_gguf_value *toks;
        CHECK(moe_gguf_get_arr(g, "tokenizer.ggml.tokens", MOE_GGUF_STRING, &toks, &d) == 0);
        CHECK_U64(toks->v.arr.n, ==, json_integer_value(json_object_get(tj, "n_tokens")));
        moe_gguf_close(g);
        json_decref(tj);
    }
}

/* Names of the *.gguf files in dir (at most cap); their count, -1 on error. */
static int list_gguf(const char *dir, char names[][256], int cap)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name);
        if (l < 5 || l >= 256 || strcmp(e->d_name + l - 5, ".gguf") != 0 || n == cap)
            continue;
        snprintf(names[n++], 256, "%s", e->d_name);
    }
    closedir(d);
    return n;
}

static void test_every_file_covered(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    static char names[64][256];
    char path[4096];
    snprintf(path, sizeof(path), "%s/manifest.json", ref);
    json_t *man = json_load_file(path, 0, NULL);
    CHECK(man != NULL);
    snprintf(path, sizeof(path), "%s/models", ref);
    int n = list_gguf(path, names, 64);
    CHECK_INT(n, ==, 10);
    for (int i = 0; i < n; i++) {
        int found = 0;
        const char *model;
        json_t *mj;
        json_object_foreach(json_object_get(man, "models"), model, mj) {
            const char *vname;
            json_t *vj;
            json_object_foreach(json_object_get(mj, "variants"), vname, vj)
                found += strcmp(json_string_value(json_object_get(vj, "file")), names[i]) == 0;
        }
        CHECK_MSG(found == 1, "models/%s: %d manifest.json entries", names[i], found);
    }
    json_decref(man);
    snprintf(path, sizeof(path), "%s/vocab", ref);
    n = list_gguf(path, names, 64);
    CHECK_INT(n, ==, 6);
    for (int i = 0; i < n; i++) {
        CHECK(strncmp(names[i], "ggml-vocab-", 11) == 0);
        snprintf(path, sizeof(path), "%s/tokenizer/tokenizer-%.*s.json", ref,
                 (int)(strlen(names[i]) - 16), names[i] + 11);
        json_t *tj = json_load_file(path, 0, NULL);
        CHECK_MSG(tj != NULL, "vocab/%s: no tokenizer golden %s", names[i], path);
        const char *vf = json_string_value(json_object_get(tj, "vocab_file"));
        CHECK_MSG(vf != NULL, "%s: no vocab_file", path);
        const char *base = strrchr(vf, '/') ? strrchr(vf, '/') + 1 : vf;
        CHECK_STR(base, names[i]);
        json_decref(tj);
    }
}

int main(void)
{
    MOE_TEST_RUN(test_every_file_covered);
    MOE_TEST_RUN(test_models_match_manifest);
    MOE_TEST_RUN(test_vocab_files);
    return moe_test_exit_code();
}

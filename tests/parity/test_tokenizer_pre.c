/* The tokenizer.ggml.pre values of issue 22's families (glm4/glm5,
 * minimax-m2 and its gpt-4o/llama4 aliases, qwen35) against llama.cpp:
 * tools/ref/make_pre_goldens.py set each value on shared/ref's qwen2 and
 * llama-bpe vocabularies and recorded what llama-cpp-python 0.3.36 gives for
 * 60 random mixes of tricky fragments (with and without parse_special).
 * Here the same string is spliced into the same vocab-only GGUF in memory
 * and every token id must be equal. This checks the regex splits and the
 * flags of each value on those vocabularies, not the families' own
 * vocabularies (not downloadable here: doc/tokenizer.md). */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "model/tokenizer.h"
#include "tests/harness.h"

static void test_pre_values(void)
{
    const char *root = getenv("MOE_SOURCE_ROOT");
    CHECK(root != NULL);
    char path[4096];
    snprintf(path, sizeof(path), "%s/tests/fixtures/tokenizer/pre-goldens.json", root);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    CHECK_MSG(j != NULL, "%s: %s", path, jerr.text);
    json_t *texts = json_object_get(j, "texts"), *cases = json_object_get(j, "cases");
    CHECK(json_array_size(texts) > 0 && json_array_size(cases) > 0);
    static int32_t ids[4096];
    for (size_t ci = 0; ci < json_array_size(cases); ci++) {
        json_t *c = json_array_get(cases, ci);
        const char *vocab = json_string_value(json_object_get(c, "vocab"));
        const char *pre = json_string_value(json_object_get(c, "pre"));
        snprintf(path, sizeof(path), "%s/vocab/ggml-vocab-%s.gguf", moe_test_ref_dir(), vocab);
        size_t len = 0, nlen = 0;
        uint8_t *data = moe_test_read_file(path, &len);
        CHECK_MSG(data != NULL, "%s", path);
        uint8_t *mod = moe_test_gguf_set_str(data, len, "tokenizer.ggml.pre", pre, &nlen);
        CHECK_MSG(mod != NULL, "%s: no tokenizer.ggml.pre string", path);
        struct moe_diag d = { 0 };
        struct moe_gguf *g;
        struct moe_tokenizer *t;
        CHECK_MSG(moe_gguf_open_mem(&g, mod, nlen, "pre.gguf", &d) == 0, "%s", d.msg);
        CHECK_MSG(moe_tokenizer_load(&t, g, &d) == 0, "%s with pre %s: %s", vocab, pre, d.msg);
        int same = 0, n = 0;
        for (int sp = 0; sp < 2; sp++) {
            json_t *want_all = json_object_get(c, sp ? "ids_special" : "ids");
            for (size_t ti = 0; ti < json_array_size(texts); ti++, n++) {
                const char *text = json_string_value(json_array_get(texts, ti));
                size_t k = 0;
                const int rc = moe_tokenize(t, text, strlen(text), true, sp == 1, ids, 4096, &k);
                json_t *want = json_array_get(want_all, ti);
                bool ok = rc == 0 && k == json_array_size(want);
                for (size_t i = 0; ok && i < k; i++)
                    ok = ids[i] == (int32_t)json_integer_value(json_array_get(want, i));
                if (!ok && n - same < 3)
                    fprintf(stderr, "    %s/%s%s differs on text %zu (%zu ids, llama.cpp %zu)\n",
                            vocab, pre, sp ? " (special)" : "", ti, k, json_array_size(want));
                same += ok;
            }
        }
        printf("  %s with pre %s: %d / %d texts identical to llama.cpp\n", vocab, pre, same, n);
        CHECK_INT(same, ==, n);
        moe_tokenizer_free(t);
        moe_gguf_close(g);
        free(mod);
        free(data);
    }
    json_decref(j);
}

int main(void)
{
    if (moe_test_ref_dir() == NULL)
        return 77;
    MOE_TEST_RUN(test_pre_values);
    return moe_test_exit_code();
}

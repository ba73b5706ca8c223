/* YaRN RoPE scaling against llama.cpp: shared/ref's tiny gpt-oss and
 * deepseek2 F32 models with YaRN keys added (rebuilt here with the GGUF
 * writer, as tools/ref/make_yarn_goldens.py built them for llama.cpp), F32
 * criteria: max |dlogit| <= 1e-4 on every prompt position.
 * The same models without the keys must differ clearly (YaRN mattered). */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>

#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "model/model.h"
#include "tests/harness.h"

static int copy_with_yarn(const char *src, const char *dst, json_t *keys)
{
    struct moe_gguf *g;
    struct moe_diag d = { 0 };
    if (moe_gguf_open(&g, src, &d) || moe_gguf_map(g, &d))
        return -1;
    struct moe_gguf_writer *w;
    if (moe_gguf_writer_create(&w, dst, &d))
        return -1;
    for (uint64_t i = 0; i < moe_gguf_n_kv(g); i++)
        moe_gguf_writer_add_value(w, moe_gguf_kv_at(g, i)->key, &moe_gguf_kv_at(g, i)->value);
    if (keys) {
        const char *arch = json_string_value(json_object_get(keys, "arch"));
        char k[128];
        snprintf(k, sizeof(k), "%s.rope.scaling.type", arch);
        moe_gguf_writer_add_str(w, k, json_string_value(json_object_get(keys, "type")));
        snprintf(k, sizeof(k), "%s.rope.scaling.factor", arch);
        moe_gguf_writer_add_f32(w, k, (float)json_number_value(json_object_get(keys, "factor")));
        snprintf(k, sizeof(k), "%s.rope.scaling.original_context_length", arch);
        moe_gguf_writer_add_u32(w, k, (uint32_t)json_integer_value(json_object_get(keys, "orig_ctx")));
        if (json_object_get(keys, "log_mul")) {
            snprintf(k, sizeof(k), "%s.rope.scaling.yarn_log_multiplier", arch);
            moe_gguf_writer_add_f32(w, k, (float)json_number_value(json_object_get(keys, "log_mul")));
        }
    }
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        moe_gguf_writer_add_tensor(w, t->name, t->n_dims, t->ne, t->dtype, NULL);
    }
    moe_gguf_writer_begin_data(w);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        moe_gguf_writer_write(w, moe_gguf_tensor_data(g, t), t->size);
    }
    int rc = moe_gguf_writer_finish(w, &d);
    moe_gguf_close(g);
    return rc;
}

static float *logits_of(const char *path, const int32_t *tok, int n, int *V)
{
    struct moe_model *m;
    struct moe_diag d = { 0 };
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64 };
    if (moe_model_load(&m, path, &o, &d)) {
        fprintf(stderr, "  %s\n", d.msg);
        return NULL;
    }
    *V = moe_model_cfg(m)->n_vocab;
    struct moe_seq *s;
    float *lg = malloc((size_t)n * *V * sizeof(float));
    if (moe_seq_create(&s, m, &d) || moe_model_forward(m, s, tok, n, lg, true, NULL, NULL, &d)) {
        free(lg);
        lg = NULL;
    } else {
        moe_seq_free(s);
    }
    moe_model_free(m);
    return lg;
}

static void check(const char *name)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096], src[4096], plain[4096], out[4096];
    snprintf(path, sizeof(path), "%s/tests/fixtures/yarn/%s.json", getenv("MOE_SOURCE_ROOT"), name);
    json_t *j = json_load_file(path, 0, NULL);
    CHECK(j != NULL);
    snprintf(src, sizeof(src), "%s/models/%s.gguf", ref, name);
    snprintf(out, sizeof(out), "%s/%s-yarn.gguf", moe_test_tmpdir(), name);
    snprintf(plain, sizeof(plain), "%s/%s-plain.gguf", moe_test_tmpdir(), name);
    CHECK(copy_with_yarn(src, out, json_object_get(j, "keys")) == 0);
    CHECK(copy_with_yarn(src, plain, NULL) == 0);
    json_t *jt = json_object_get(j, "tokens");
    int n = (int)json_array_size(jt), V = 0, V2 = 0;
    int32_t tok[64];
    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)json_integer_value(json_array_get(jt, (size_t)i));
    float *lg = logits_of(out, tok, n, &V), *lp = logits_of(plain, tok, n, &V2);
    CHECK(lg != NULL && lp != NULL);
    snprintf(path, sizeof(path), "%s/tests/fixtures/yarn/%s.logits.f32", getenv("MOE_SOURCE_ROOT"), name);
    size_t glen = 0;
    float *gold = moe_test_read_file(path, &glen);
    CHECK(gold && glen == (size_t)n * V * 4);
    double maxd = 0, maxp = 0;
    for (size_t i = 0; i < (size_t)n * V; i++) {
        maxd = fmax(maxd, fabs((double)lg[i] - gold[i]));
        maxp = fmax(maxp, fabs((double)lp[i] - gold[i]));
    }
    printf("  %s with YaRN: max |dlogit| %.3g (without YaRN: %.3g)\n", name, maxd, maxp);
    CHECK_MSG(maxd <= 1e-4, "max |dlogit| %g", maxd);
    CHECK_MSG(maxp > 1e-2, "YaRN made no difference (%g)", maxp);
    free(lg);
    free(lp);
    free(gold);
    json_decref(j);
}

static void test_gptoss_yarn(void) { check("tiny-gptoss-F32"); }
static void test_deepseek2_yarn(void) { check("tiny-deepseek2-F32"); }

int main(void)
{
    MOE_TEST_RUN(test_gptoss_yarn);
    MOE_TEST_RUN(test_deepseek2_yarn);
    return moe_test_exit_code();
}

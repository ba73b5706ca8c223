/* Merged ffn_gate_up_exps tensors (issue 22): shared/ref's tiny deepseek2
 * F32 model (llama.cpp's deepseek2 loader takes either layout) rewritten
 * here with every layer's ffn_gate_exps and ffn_up_exps merged into one
 * ffn_gate_up_exps [n_embd, 2 n_ff, n_expert] (per expert: the gate rows,
 * then the up rows, as llama.cpp's build_moe_ffn splits them). The merged
 * model must compute exactly what the split one does: resident, through
 * the expert cache at its minimum budget, from a .moe pack (one blob per
 * expert) and with the weights uploaded (the GPU data path); and match
 * llama.cpp's goldens (max |dlogit| <= 1e-4). llama.cpp itself gives
 * exactly its split goldens on the merged file (checked once with
 * llama-cpp-python 0.3.36: max |dlogit| 0). */
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "io/pack.h"
#include "model/model.h"
#include "tests/harness.h"

/* The up tensor of layer L's gate tensor, or NULL. */
static const struct moe_gguf_tensor *up_of(const struct moe_gguf *g, const struct moe_gguf_tensor *t)
{
    const char *p = strstr(t->name, "ffn_gate_exps.weight");
    if (p == NULL)
        return NULL;
    char name[128];
    snprintf(name, sizeof(name), "%.*sffn_up_exps.weight", (int)(p - t->name), t->name);
    return moe_gguf_find_tensor(g, name);
}

static int write_merged(const char *src, const char *dst, int *n_merged)
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
    *n_merged = 0;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (strstr(t->name, "ffn_up_exps.weight"))
            continue;
        const struct moe_gguf_tensor *u = up_of(g, t);
        if (u == NULL) {
            moe_gguf_writer_add_tensor(w, t->name, t->n_dims, t->ne, t->dtype, NULL);
            continue;
        }
        char name[128];
        const char *p = strstr(t->name, "ffn_gate_exps.weight");
        snprintf(name, sizeof(name), "%.*sffn_gate_up_exps.weight", (int)(p - t->name), t->name);
        const uint64_t ne[3] = { t->ne[0], 2 * t->ne[1], t->ne[2] };
        moe_gguf_writer_add_tensor(w, name, 3, ne, t->dtype, NULL);
        (*n_merged)++;
    }
    moe_gguf_writer_begin_data(w);
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (strstr(t->name, "ffn_up_exps.weight"))
            continue;
        const struct moe_gguf_tensor *u = up_of(g, t);
        if (u == NULL) {
            moe_gguf_writer_write(w, moe_gguf_tensor_data(g, t), t->size);
            continue;
        }
        const size_t half = t->size / t->ne[2];
        const uint8_t *gd = moe_gguf_tensor_data(g, t), *ud = moe_gguf_tensor_data(g, u);
        for (uint64_t e = 0; e < t->ne[2]; e++) {
            moe_gguf_writer_write(w, gd + e * half, half);
            moe_gguf_writer_write(w, ud + e * half, half);
        }
    }
    int rc = moe_gguf_writer_finish(w, &d);
    moe_gguf_close(g);
    return rc;
}

/* Prompt logits [n][V], then 8 greedy steps' [V] each. */
static float *run(const char *path, const int32_t *tok, int n, int cache_experts, bool upload, int *V)
{
    struct moe_model *m;
    struct moe_diag d = { 0 };
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64, .cache_experts = cache_experts,
                                .upload_weights = upload };
    if (moe_model_load(&m, path, &o, &d)) {
        printf("  load %s: %s\n", path, d.msg);
        return NULL;
    }
    *V = moe_model_cfg(m)->n_vocab;
    struct moe_seq *s;
    float *lg = malloc(((size_t)n + 8) * *V * sizeof(float));
    int rc = moe_seq_create(&s, m, &d);
    if (rc == 0) {
        rc = moe_model_forward(m, s, tok, n, lg, true, NULL, NULL, &d);
        for (int i = 0; i < 8 && rc == 0; i++) {
            const float *prev = lg + ((size_t)n + (size_t)i - 1) * *V;
            int32_t next = 0;
            for (int v = 1; v < *V; v++)
                if (prev[v] > prev[next])
                    next = v;
            rc = moe_model_forward(m, s, &next, 1, lg + ((size_t)n + (size_t)i) * *V, false, NULL,
                                   NULL, &d);
        }
        moe_seq_free(s);
    }
    if (rc) {
        printf("  forward %s: %s\n", path, d.msg);
        free(lg);
        lg = NULL;
    }
    moe_model_free(m);
    return lg;
}

static void test_deepseek2_merged(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char src[4096], merged[4096], pack[4096], path[4096];
    snprintf(src, sizeof(src), "%s/models/tiny-deepseek2-F32.gguf", ref);
    snprintf(merged, sizeof(merged), "%s/deepseek2-merged.gguf", moe_test_tmpdir());
    snprintf(pack, sizeof(pack), "%s/deepseek2-merged.moe", moe_test_tmpdir());
    int n_merged = 0;
    CHECK(write_merged(src, merged, &n_merged) == 0);
    CHECK_INT(n_merged, ==, 2); /* layers 1 and 2; layer 0 is dense */
    struct moe_diag d = { 0 };
    struct moe_gguf *g;
    CHECK_MSG(moe_gguf_open(&g, merged, &d) == 0, "%s", d.msg);
    CHECK(moe_gguf_find_tensor(g, "blk.1.ffn_gate_up_exps.weight") != NULL);
    CHECK(moe_gguf_find_tensor(g, "blk.1.ffn_gate_exps.weight") == NULL);
    moe_gguf_close(g);
    struct moe_pack_write_opts po = { .threads = 2, .min_ratio = 1.0001 };
    CHECK_MSG(moe_pack_write(merged, pack, &po, NULL, &d) == 0, "%s", d.msg);

    snprintf(path, sizeof(path), "%s/manifest.json", ref);
    json_error_t jerr;
    json_t *man = json_load_file(path, 0, &jerr);
    CHECK_MSG(man != NULL, "%s: %s", path, jerr.text);
    json_t *jt = json_object_get(json_object_get(json_object_get(json_object_get(man, "models"),
                                 "tiny-deepseek2"), "sequences"), "len33");
    const int n = (int)json_array_size(jt);
    CHECK(n == 33);
    int32_t tok[64];
    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)json_integer_value(json_array_get(jt, (size_t)i));
    json_decref(man);

    int V = 0, V2 = 0, V3 = 0, V4 = 0, V5 = 0;
    float *plain = run(src, tok, n, 0, false, &V), *res = run(merged, tok, n, 0, false, &V2);
    float *cached = run(merged, tok, n, 2, false, &V3), *packed = run(pack, tok, n, 2, false, &V4);
    float *up = run(merged, tok, n, 0, true, &V5);
    CHECK(plain && res && cached && packed && up && V == V2 && V == V3 && V == V4 && V == V5);
    const size_t bytes = ((size_t)n + 8) * (size_t)V * sizeof(float);
    CHECK_MSG(memcmp(plain, res, bytes) == 0, "merged resident differs from split");
    CHECK_MSG(memcmp(plain, cached, bytes) == 0, "merged with 2 cache slots differs");
    CHECK_MSG(memcmp(plain, packed, bytes) == 0, "merged from the pack differs");
    CHECK_MSG(memcmp(plain, up, bytes) == 0, "merged with weights uploaded (GPU data path) differs");

    snprintf(path, sizeof(path), "%s/goldens/tiny-deepseek2-F32/len33.logits.f32", ref);
    size_t glen = 0;
    float *gold = moe_test_read_file(path, &glen);
    CHECK(gold != NULL && glen == (size_t)n * V * 4);
    double maxd = 0;
    for (size_t i = 0; i < (size_t)n * V; i++)
        maxd = fmax(maxd, fabs((double)res[i] - gold[i]));
    printf("  deepseek2 merged gate_up: bit-identical to split (resident, 2 slots, pack, upload);"
           " max |dlogit| vs llama.cpp %.3g\n", maxd);
    CHECK_MSG(maxd <= 1e-4, "max |dlogit| %g", maxd);
    free(gold);
    free(plain);
    free(res);
    free(cached);
    free(packed);
    free(up);
}

int main(void)
{
    MOE_TEST_RUN(test_deepseek2_merged);
    return moe_test_exit_code();
}

/* End-to-end parity of the CPU engine with llama.cpp on the shared/ref
 * goldens (shared/RELIABILITY.md row 18), with the criteria of the CPU
 * engine issue:
 *   F32 weights:  max |dlogit| <= 1e-4, expert ids identical, greedy ids
 *                 identical up to the first step whose margin is < 1e-3;
 *   F16 weights:  max |dlogit| <= 1e-2, expert ids identical, greedy ids
 *                 identical up to the first margin < 1e-2;
 *   quantized:    mean |dlogit| <= 0.05, same argmax on >= 90% of positions,
 *                 same expert set on >= 95% of token-layer pairs.
 * Goldens: logits of every position, routing tensors (ffn_moe_topk-L,
 * weights), greedy continuation with margins. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "tests/harness.h"

enum kind { KIND_F32, KIND_F16, KIND_QUANT };

struct route_rec {
    int n_layer, k;
    int32_t *ids;     /* [n_tok][n_layer][k] */
    float *w;
};

static void on_route(void *ud, int64_t tok, int layer, const int32_t *ids, const float *w, int k)
{
    struct route_rec *r = ud;
    size_t o = ((size_t)tok * r->n_layer + layer) * r->k;
    memcpy(r->ids + o, ids, (size_t)k * sizeof(int32_t));
    memcpy(r->w + o, w, (size_t)k * sizeof(float));
}

static int argmax(const float *v, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b])
            b = i;
    return b;
}

static int same_set(const int32_t *a, const int32_t *b, int k)
{
    for (int i = 0; i < k; i++) {
        int found = 0;
        for (int j = 0; j < k; j++)
            found |= a[i] == b[j];
        if (!found)
            return 0;
    }
    return 1;
}

static void run_variant(const char *model, const char *variant, enum kind kind)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096];
    snprintf(path, sizeof(path), "%s/manifest.json", ref);
    json_error_t jerr;
    json_t *man = json_load_file(path, 0, &jerr);
    CHECK_MSG(man != NULL, "%s: %s", path, jerr.text);
    json_t *seqs = json_object_get(json_object_get(json_object_get(man, "models"), model), "sequences");
    CHECK(seqs != NULL);

    snprintf(path, sizeof(path), "%s/models/%s-%s.gguf", ref, model, variant);
    struct moe_model_opts opts = { .n_threads = 2, .n_ctx = 256 };
    struct moe_model *m;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_model_load(&m, path, &opts, &d) == 0, "%s", d.msg);
    const struct moe_model_cfg *c = moe_model_cfg(m);
    const int V = c->n_vocab, NL = c->n_layer, K = c->n_expert_used;
    struct moe_seq *s;
    CHECK_MSG(moe_seq_create(&s, m, &d) == 0, "%s", d.msg);

    const char *names[] = { "len1", "len7", "len33" };
    for (int si = 0; si < 3; si++) {
        json_t *jt = json_object_get(seqs, names[si]);
        int n = (int)json_array_size(jt);
        int32_t *tok = malloc((size_t)n * sizeof(int32_t));
        for (int i = 0; i < n; i++)
            tok[i] = (int32_t)json_integer_value(json_array_get(jt, (size_t)i));

        /* logits of every position */
        float *lg = malloc((size_t)n * V * sizeof(float));
        struct route_rec rr = { .n_layer = NL, .k = K };
        rr.ids = malloc((size_t)n * NL * K * sizeof(int32_t));
        rr.w = malloc((size_t)n * NL * K * sizeof(float));
        moe_seq_reset(s);
        CHECK_MSG(moe_model_forward(m, s, tok, n, lg, true, on_route, &rr, &d) == 0, "%s", d.msg);

        snprintf(path, sizeof(path), "%s/goldens/%s-%s/%s.logits.f32", ref, model, variant, names[si]);
        size_t glen = 0;
        float *gold = moe_test_read_file(path, &glen);
        CHECK_MSG(gold != NULL && glen == (size_t)n * V * 4, "%s: %zu bytes", path, glen);
        double max_d = 0, sum_d = 0;
        int same_arg = 0;
        for (int t = 0; t < n; t++) {
            for (int i = 0; i < V; i++) {
                double dd = fabs((double)lg[(size_t)t * V + i] - gold[(size_t)t * V + i]);
                sum_d += dd;
                if (dd > max_d)
                    max_d = dd;
            }
            same_arg += argmax(lg + (size_t)t * V, V) == argmax(gold + (size_t)t * V, V);
        }
        double mean_d = sum_d / ((double)n * V);

        /* routing */
        snprintf(path, sizeof(path), "%s/goldens/%s-%s/%s.moe.json", ref, model, variant, names[si]);
        json_t *moe = json_load_file(path, 0, &jerr);
        CHECK_MSG(moe != NULL, "%s: %s", path, jerr.text);
        json_t *tens = json_object_get(moe, "tensors");
        int pairs = 0, same_ids = 0, same_sets = 0;
        for (int L = 0; L < NL; L++) {
            char key[64];
            snprintf(key, sizeof(key), "ffn_moe_topk-%d", L);
            json_t *data = json_object_get(json_object_get(tens, key), "data");
            if (L < c->n_layer_dense_lead)
                continue; /* dense FFN: no routing */
            CHECK_MSG(data != NULL, "%s: no %s", path, key);
            for (int t = 0; t < n; t++) {
                int32_t want[64];
                for (int k = 0; k < K; k++)
                    want[k] = (int32_t)json_integer_value(json_array_get(data, (size_t)(t * K + k)));
                const int32_t *got = rr.ids + ((size_t)t * NL + L) * K;
                pairs++;
                same_ids += memcmp(want, got, (size_t)K * sizeof(int32_t)) == 0;
                same_sets += same_set(want, got, K);
            }
        }
        json_decref(moe);

        printf("  %s-%s %s: max|d| %.3g mean|d| %.3g argmax %d/%d experts %d/%d (sets %d)\n",
               model, variant, names[si], max_d, mean_d, same_arg, n, same_ids, pairs, same_sets);
        if (kind == KIND_F32 || kind == KIND_F16) {
            CHECK_MSG(max_d <= (kind == KIND_F32 ? 1e-4 : 1e-2), "max |dlogit| %g", max_d);
            CHECK_MSG(same_ids == pairs, "expert ids differ on %d of %d token-layer pairs",
                      pairs - same_ids, pairs);
        } else {
            CHECK_MSG(mean_d <= 0.05, "mean |dlogit| %g", mean_d);
            CHECK_MSG(same_arg * 10 >= n * 9, "argmax agrees on %d of %d", same_arg, n);
            CHECK_MSG(same_sets * 20 >= pairs * 19, "expert sets agree on %d of %d", same_sets, pairs);
        }

        /* greedy continuation, one token at a time */
        snprintf(path, sizeof(path), "%s/goldens/%s-%s/%s.greedy.json", ref, model, variant, names[si]);
        json_t *gr = json_load_file(path, 0, &jerr);
        CHECK_MSG(gr != NULL, "%s: %s", path, jerr.text);
        json_t *gids = json_object_get(gr, "ids"), *gmargin = json_object_get(gr, "margin");
        const double mtol = kind == KIND_F32 ? 1e-3 : kind == KIND_F16 ? 1e-2 : 1e-3;
        int next = argmax(lg + (size_t)(n - 1) * V, V), compared = 0;
        for (size_t i = 0; i < json_array_size(gids); i++) {
            if (json_real_value(json_array_get(gmargin, i)) < mtol)
                break;
            int want = (int)json_integer_value(json_array_get(gids, i));
            if (kind == KIND_QUANT && next != want)
                break; /* informational only for quantized weights */
            CHECK_MSG(next == want, "greedy step %zu: %d, llama.cpp %d", i, next, want);
            compared++;
            int32_t t1 = next;
            if (moe_seq_pos(s) >= moe_model_n_ctx(m))
                break;
            CHECK_MSG(moe_model_forward(m, s, &t1, 1, lg, false, NULL, NULL, &d) == 0, "%s", d.msg);
            next = argmax(lg, V);
        }
        printf("    greedy: %d steps identical\n", compared);
        json_decref(gr);
        free(gold);
        free(lg);
        free(rr.ids);
        free(rr.w);
        free(tok);
    }
    moe_seq_free(s);
    moe_model_free(m);
    json_decref(man);
}

static void test_mixtral_f32(void) { run_variant("tiny-mixtral", "F32", KIND_F32); }
static void test_mixtral_f16(void) { run_variant("tiny-mixtral", "F16", KIND_F16); }
static void test_mixtral_q8_0(void) { run_variant("tiny-mixtral", "Q8_0", KIND_QUANT); }
static void test_mixtral_q4_0(void) { run_variant("tiny-mixtral", "Q4_0", KIND_QUANT); }
static void test_qwen3moe_f16(void) { run_variant("tiny-qwen3moe", "F16", KIND_F16); }
static void test_qwen3moe_q8_0(void) { run_variant("tiny-qwen3moe", "Q8_0", KIND_QUANT); }
/* KV cache types against the F32-KV goldens (doc/engine.md): llama.cpp's
 * own F16-vs-F32 KV difference is 2.3e-3 to 4.1e-3 (shared/ref/README.md),
 * ours must stay in that range; q8_0 rounds K, V and q to 8 bits per value
 * (ggml's blocks), about 30x coarser than f16. Tolerances: max |dlogit| and
 * mean |dlogit| over every position of len33, and the last position's
 * argmax. f32 is exact to the F32-weight criterion. */
static void run_kv(const char *model, const char *variant, int kv_type, double max_tol,
                   double mean_tol)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096];
    snprintf(path, sizeof(path), "%s/models/%s-%s.gguf", ref, model, variant);
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 256, .kv_type = kv_type };
    struct moe_model *m;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_model_load(&m, path, &o, &d) == 0, "%s", d.msg);
    struct moe_seq *s;
    CHECK(moe_seq_create(&s, m, &d) == 0);
    snprintf(path, sizeof(path), "%s/manifest.json", ref);
    json_t *man = json_load_file(path, 0, NULL);
    json_t *jt = json_object_get(json_object_get(json_object_get(json_object_get(man, "models"),
                                 model), "sequences"), "len33");
    const int n = (int)json_array_size(jt), V = moe_model_cfg(m)->n_vocab;
    int32_t tok[64];
    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)json_integer_value(json_array_get(jt, (size_t)i));
    float *lg = malloc((size_t)n * V * sizeof(float));
    CHECK(moe_model_forward(m, s, tok, n, lg, true, NULL, NULL, &d) == 0);
    snprintf(path, sizeof(path), "%s/goldens/%s-%s/len33.logits.f32", ref, model, variant);
    size_t glen = 0;
    float *gold = moe_test_read_file(path, &glen);
    CHECK(gold && glen == (size_t)n * V * 4);
    double maxd = 0, sumd = 0;
    for (size_t i = 0; i < (size_t)n * V; i++) {
        const double dd = fabs((double)lg[i] - gold[i]);
        maxd = fmax(maxd, dd);
        sumd += dd;
    }
    const int a = argmax(lg + (size_t)(n - 1) * V, V), ga = argmax(gold + (size_t)(n - 1) * V, V);
    printf("  %s-%s with %s KV: max |dlogit| %.3g mean %.3g, last argmax %d (llama.cpp %d)\n", model,
           variant, moe_kv_type_name(kv_type), maxd, sumd / ((double)n * V), a, ga);
    if (kv_type != MOE_KV_F32)
        CHECK_MSG(maxd > 0, "a %s cache gave exactly the f32 logits", moe_kv_type_name(kv_type));
    CHECK_MSG(maxd <= max_tol, "max |dlogit| %g > %g", maxd, max_tol);
    CHECK_MSG(sumd / ((double)n * V) <= mean_tol, "mean |dlogit| %g > %g", sumd / ((double)n * V),
              mean_tol);
    CHECK_INT(a, ==, ga);
    free(lg);
    free(gold);
    json_decref(man);
    moe_seq_free(s);
    moe_model_free(m);
}

static void test_mixtral_f32_kv_f32(void) { run_kv("tiny-mixtral", "F32", MOE_KV_F32, 1e-4, 1e-5); }
static void test_mixtral_f32_kv_f16(void) { run_kv("tiny-mixtral", "F32", MOE_KV_F16, 1e-2, 1e-3); }
static void test_deepseek2_kv_f16(void) { run_kv("tiny-deepseek2", "F32", MOE_KV_F16, 1e-2, 1e-3); }
static void test_gptoss_kv_f16(void) { run_kv("tiny-gptoss", "F32", MOE_KV_F16, 1e-2, 1e-3); }
static void test_qwen3moe_kv_f16(void) { run_kv("tiny-qwen3moe", "F16", MOE_KV_F16, 2e-2, 2e-3); }
static void test_qwen3moe_kv_q8_0(void) { run_kv("tiny-qwen3moe", "F16", MOE_KV_Q8_0, 0.15, 0.015); }

/* q8_0 needs head dims made of 32-value blocks: refused, naming them */
static void test_kv_q8_0_refused(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    static const char *const files[] = { "tiny-mixtral-F32.gguf", "tiny-deepseek2-F32.gguf" };
    static const char *const why[] = { "head_dim 16", "kv_lora_rank + qk_rope" };
    for (int i = 0; i < 2; i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/models/%s", ref, files[i]);
        struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64, .kv_type = MOE_KV_Q8_0 };
        struct moe_model *m = NULL;
        struct moe_diag d = { 0 };
        CHECK_INT(moe_model_load(&m, path, &o, &d), ==, MOE_EUNSUPPORTED);
        CHECK_MSG(strstr(d.msg, "kv_type q8_0") && strstr(d.msg, why[i]) && strstr(d.msg, files[i]),
                  "%s", d.msg);
        CHECK(m == NULL);
    }
}

static void test_qwen3moe_q4_k_m(void) { run_variant("tiny-qwen3moe", "Q4_K_M", KIND_QUANT); }
static void test_deepseek2_f32(void) { run_variant("tiny-deepseek2", "F32", KIND_F32); }
static void test_gptoss_f32(void) { run_variant("tiny-gptoss", "F32", KIND_F32); }
static void test_gptoss_mxfp4(void) { run_variant("tiny-gptoss", "MXFP4_MOE", KIND_QUANT); }

int main(void)
{
    MOE_TEST_RUN(test_mixtral_f32);
    MOE_TEST_RUN(test_mixtral_f16);
    MOE_TEST_RUN(test_mixtral_f32_kv_f32);
    MOE_TEST_RUN(test_mixtral_f32_kv_f16);
    MOE_TEST_RUN(test_deepseek2_kv_f16);
    MOE_TEST_RUN(test_gptoss_kv_f16);
    MOE_TEST_RUN(test_qwen3moe_kv_f16);
    MOE_TEST_RUN(test_qwen3moe_kv_q8_0);
    MOE_TEST_RUN(test_kv_q8_0_refused);
    MOE_TEST_RUN(test_mixtral_q8_0);
    MOE_TEST_RUN(test_mixtral_q4_0);
    MOE_TEST_RUN(test_qwen3moe_f16);
    MOE_TEST_RUN(test_qwen3moe_q8_0);
    MOE_TEST_RUN(test_qwen3moe_q4_k_m);
    MOE_TEST_RUN(test_deepseek2_f32);
    MOE_TEST_RUN(test_gptoss_f32);
    MOE_TEST_RUN(test_gptoss_mxfp4);
    return moe_test_exit_code();
}

/* Parity with llama.cpp for the architectures shared/ref has no goldens
 * for (qwen2moe, olmoe): tiny F32 models and what llama.cpp (through
 * llama-cpp-python) computes on them, made by tools/ref/make_arch_goldens.py
 * and kept in tests/fixtures/arch/. Criteria as for F32 in shared/ref:
 * max |dlogit| <= 1e-4 on every prompt position, greedy ids identical up to
 * the first step whose margin is below 1e-3. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/arch.h"
#include "model/model.h"
#include "tests/harness.h"

static void run_arch(const char *arch)
{
    char path[4096];
    const char *root = getenv("MOE_SOURCE_ROOT");
    CHECK(root != NULL);
    snprintf(path, sizeof(path), "%s/tests/fixtures/arch/tiny-%s.json", root, arch);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    CHECK_MSG(j != NULL, "%s: %s", path, jerr.text);
    json_t *jt = json_object_get(j, "tokens");
    const int n = (int)json_array_size(jt);
    int32_t tok[256];
    CHECK(n > 0 && n < 256);
    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)json_integer_value(json_array_get(jt, (size_t)i));

    snprintf(path, sizeof(path), "%s/tests/fixtures/arch/tiny-%s-F32.gguf", root, arch);
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 256 };
    struct moe_model *m;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_model_load(&m, path, &o, &d) == 0, "%s", d.msg);
    const int V = moe_model_cfg(m)->n_vocab;
    CHECK_INT(V, ==, json_integer_value(json_object_get(j, "n_vocab")));
    struct moe_seq *s;
    CHECK(moe_seq_create(&s, m, &d) == 0);
    float *lg = malloc((size_t)n * V * sizeof(float));
    CHECK(moe_model_forward(m, s, tok, n, lg, true, NULL, NULL, &d) == 0);

    snprintf(path, sizeof(path), "%s/tests/fixtures/arch/tiny-%s.logits.f32", root, arch);
    size_t glen = 0;
    float *gold = moe_test_read_file(path, &glen);
    CHECK(gold != NULL && glen == (size_t)n * V * 4);
    double maxd = 0;
    for (size_t i = 0; i < (size_t)n * V; i++)
        maxd = fmax(maxd, fabs((double)lg[i] - gold[i]));
    printf("  %s: max |dlogit| %.3g over %d positions\n", arch, maxd, n);
    CHECK_MSG(maxd <= 1e-4, "max |dlogit| %g", maxd);

    json_t *g = json_object_get(j, "greedy");
    int next = 0, steps = 0;
    for (int i = 1; i < V; i++)
        if (lg[(size_t)(n - 1) * V + i] > lg[(size_t)(n - 1) * V + next])
            next = i;
    for (size_t i = 0; i < json_array_size(json_object_get(g, "ids")); i++) {
        if (json_real_value(json_array_get(json_object_get(g, "margin"), i)) < 1e-3)
            break;
        CHECK_INT(next, ==, json_integer_value(json_array_get(json_object_get(g, "ids"), i)));
        steps++;
        int32_t t1 = next;
        CHECK(moe_model_forward(m, s, &t1, 1, lg, false, NULL, NULL, &d) == 0);
        next = 0;
        for (int v = 1; v < V; v++)
            if (lg[v] > lg[next])
                next = v;
    }
    printf("  %s: greedy identical for %d steps\n", arch, steps);
    CHECK(steps >= 4);
    free(lg);
    free(gold);
    moe_seq_free(s);
    moe_model_free(m);
    json_decref(j);
}

/* The families of issue 22 (tools/ref/make_family_goldens.py: glm4moe,
 * minimax-m2, qwen35moe, gemma4): an F32 and
 * a Q8_0 model (quantized by llama.cpp), three prompt lengths each.
 *   F32:  max |dlogit| <= 1e-4 at every position, greedy ids identical up
 *         to the first step whose margin is below 1e-3 (GELU families:
 *         max 1e-3, mean 1e-5, 1e-4 at all positions but one, or but 10% from
 *         20 positions: see below);
 *   Q8_0: mean |dlogit| <= 0.05, argmax equal on >= 90% of positions (as
 *         the quantized shared/ref variants), greedy informational;
 *   both: with the expert cache at its minimum (n_expert_used slots, LRU),
 *         prompt logits and greedy decode bit-identical to all resident. */
static int argmax_row(const float *l, int V)
{
    int b = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > l[b])
            b = i;
    return b;
}

/* Prompt logits [n][V] then n_greedy greedy steps' logits [V] each into out;
 * NULL on failure (message printed). */
static float *run_fam(const char *path, const int32_t *tok, int n, int n_greedy, int cache_experts,
                      int *V_out, int *n_slots)
{
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 256, .cache_experts = cache_experts };
    struct moe_model *m;
    struct moe_diag d = { 0 };
    if (moe_model_load(&m, path, &o, &d) != 0) {
        printf("  load %s: %s\n", path, d.msg);
        return NULL;
    }
    const int V = moe_model_cfg(m)->n_vocab;
    struct moe_seq *s;
    float *lg = malloc(((size_t)n + (size_t)n_greedy) * V * sizeof(float));
    if (lg == NULL || moe_seq_create(&s, m, &d) != 0) {
        free(lg);
        moe_model_free(m);
        return NULL;
    }
    int rc = moe_model_forward(m, s, tok, n, lg, true, NULL, NULL, &d);
    int32_t next = argmax_row(lg + (size_t)(n - 1) * V, V);
    for (int i = 0; i < n_greedy && rc == 0; i++) {
        float *row = lg + ((size_t)n + (size_t)i) * V;
        rc = moe_model_forward(m, s, &next, 1, row, false, NULL, NULL, &d);
        next = argmax_row(row, V);
    }
    if (rc)
        printf("  forward %s: %s\n", path, d.msg);
    struct moe_cache_stats st;
    *n_slots = moe_model_cache_stats(m, &st) ? (int)st.n_slots : 0;
    moe_seq_free(s);
    moe_model_free(m);
    *V_out = V;
    if (rc) {
        free(lg);
        return NULL;
    }
    return lg;
}

static void run_family(const char *arch)
{
    char path[4096];
    const char *root = getenv("MOE_SOURCE_ROOT");
    CHECK(root != NULL);
    snprintf(path, sizeof(path), "%s/tests/fixtures/arch/tiny-%s-fam.json", root, arch);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    CHECK_MSG(j != NULL, "%s: %s", path, jerr.text);
    json_t *seqs = json_object_get(j, "seqs");
    CHECK(json_array_size(seqs) > 0);
    static const char *const vars[] = { "F32", "Q8_0" };
    const struct moe_arch_desc *ad = moe_arch_desc_find(arch);
    CHECK(ad != NULL);
    const bool gelu = ad->gelu;
    for (int vi = 0; vi < 2; vi++) {
        const bool quant = vi == 1;
        json_t *jv = json_object_get(json_object_get(j, "variants"), vars[vi]);
        CHECK_INT(json_array_size(jv), ==, json_array_size(seqs));
        char model[4096];
        snprintf(model, sizeof(model), "%s/tests/fixtures/arch/tiny-%s-%s.gguf", root, arch, vars[vi]);
        for (size_t si = 0; si < json_array_size(seqs); si++) {
            json_t *jt = json_object_get(json_array_get(seqs, si), "tokens");
            const int n = (int)json_array_size(jt);
            int32_t tok[256];
            CHECK(n > 0 && n < 256);
            for (int i = 0; i < n; i++)
                tok[i] = (int32_t)json_integer_value(json_array_get(jt, (size_t)i));
            json_t *g = json_object_get(json_array_get(jv, si), "greedy");
            json_t *gids = json_object_get(g, "ids"), *gm = json_object_get(g, "margin");
            const int ng = (int)json_array_size(gids);
            int V = 0, slots = 0, V2 = 0;
            float *lg = run_fam(model, tok, n, ng, 0, &V, &slots);
            CHECK_MSG(lg != NULL, "%s failed", model);
            CHECK_INT(V, ==, json_integer_value(json_object_get(j, "n_vocab")));

            snprintf(path, sizeof(path), "%s/tests/fixtures/arch/tiny-%s-%s.len%d.logits.f32", root,
                     arch, vars[vi], n);
            size_t glen = 0;
            float *gold = moe_test_read_file(path, &glen);
            CHECK_MSG(gold != NULL && glen == (size_t)n * V * 4, "%s", path);
            double maxd = 0, sumd = 0;
            int same_arg = 0, tight_pos = 0;
            for (int t = 0; t < n; t++) {
                double pmax = 0;
                for (int i = 0; i < V; i++) {
                    const double dd = fabs((double)lg[(size_t)t * V + i] - gold[(size_t)t * V + i]);
                    pmax = fmax(pmax, dd);
                    sumd += dd;
                }
                maxd = fmax(maxd, pmax);
                tight_pos += pmax <= 1e-4;
                same_arg += argmax_row(lg + (size_t)t * V, V) == argmax_row(gold + (size_t)t * V, V);
            }
            free(gold);
            const double meand = sumd / ((double)n * V);
            int steps = 0;
            for (int i = 0; i < ng; i++) {
                if (json_real_value(json_array_get(gm, (size_t)i)) < 1e-3)
                    break;
                const int got = argmax_row(lg + ((size_t)n + (size_t)i - 1) * V, V);
                const int want = (int)json_integer_value(json_array_get(gids, (size_t)i));
                if (quant && got != want)
                    break;
                CHECK_MSG(got == want, "greedy step %d: %d, llama.cpp %d", i, got, want);
                steps++;
            }
            printf("  %s-%s len%d: max|d| %.3g mean|d| %.3g argmax %d/%d, greedy identical for %d"
                   " of %d steps\n", arch, vars[vi], n, maxd, meand, same_arg, n, steps, ng);
            if (!quant && !gelu) {
                CHECK_MSG(maxd <= 1e-4, "max |dlogit| %g", maxd);
            } else if (!quant) {
                /* ggml's GELU reads a table at the input rounded to fp16: where
                 * the two sides' inputs differ by an ulp across a rounding
                 * boundary one activation moves by ~2^-11 of itself, which
                 * shows at that position alone (seen: 3.1e-4 at 1 of 24) */
                CHECK_MSG(maxd <= 1e-3, "max |dlogit| %g", maxd);
                CHECK_MSG(meand <= 1e-5, "mean |dlogit| %g", meand);
                CHECK_MSG(n - tight_pos <= (n >= 20 ? n / 10 : 1), "max |dlogit| <= 1e-4 at only"
                          " %d of %d positions", tight_pos, n);
            } else {
                CHECK_MSG(meand <= 0.05, "mean |dlogit| %g", meand);
                CHECK_MSG(same_arg * 10 >= n * 9, "argmax agrees on %d of %d", same_arg, n);
            }

            /* the expert cache at its minimum: bit-identical to all resident */
            const int k = (int)json_integer_value(json_object_get(j, "n_expert_used"));
            float *lc = run_fam(model, tok, n, ng, k > 0 ? k : 2, &V2, &slots);
            CHECK_MSG(lc != NULL, "%s with the expert cache failed", model);
            CHECK_MSG(slots > 0, "no expert cache");
            CHECK_MSG(memcmp(lc, lg, ((size_t)n + (size_t)ng) * V * sizeof(float)) == 0,
                      "%s len%d: %d cache slots: logits differ from the resident run", vars[vi], n,
                      slots);
            free(lc);
            free(lg);
        }
    }
    json_decref(j);
}

static void test_glm4moe(void) { run_family("glm4moe"); }
static void test_minimax_m2(void) { run_family("minimax-m2"); }
static void test_qwen35moe(void) { run_family("qwen35moe"); }
static void test_gemma4(void) { run_family("gemma4"); }
/* moectl info on the gemma4 fixture: the two layer kinds' dims as
 * tools/ref/make_family_goldens.py wrote them (JSON), and the text lines. */
static void test_gemma4_info(void)
{
    const char *ctl = getenv("MOECTL"), *root = getenv("MOE_SOURCE_ROOT");
    CHECK(ctl != NULL && root != NULL);
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "%s info --json %s/tests/fixtures/arch/tiny-gemma4-F32.gguf", ctl, root);
    FILE *f = popen(cmd, "r");
    CHECK(f != NULL);
    json_error_t jerr;
    json_t *j = json_loadf(f, 0, &jerr);
    CHECK_INT(pclose(f), ==, 0);
    CHECK_MSG(j != NULL, "%s", jerr.text);
    static const struct { const char *k; int v; } want[] = {
        { "n_layer", 4 }, { "n_layer_swa", 3 }, { "head_dim", 32 }, { "head_dim_swa", 16 },
        { "n_rot", 32 }, { "n_rot_swa", 16 }, { "n_head", 2 }, { "n_head_kv", 2 },
        { "n_head_kv_min", 1 }, { "sliding_window", 4 }, { "n_ff", 32 }, { "n_ff_exp", 16 },
        { "n_expert", 6 }, { "n_expert_used", 2 }, { "n_moe_layers", 3 },
        { "final_logit_softcap", 30 },
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        json_t *v = json_object_get(j, want[i].k);
        CHECK_MSG(v != NULL, "%s missing", want[i].k);
        CHECK_MSG(json_number_value(v) == want[i].v, "%s = %g, expected %d", want[i].k,
                  json_number_value(v), want[i].v);
    }
    CHECK(json_real_value(json_object_get(j, "rope_freq_base_swa")) == 10000.0);
    json_decref(j);
    snprintf(cmd, sizeof(cmd), "%s info %s/tests/fixtures/arch/tiny-gemma4-F32.gguf", ctl, root);
    f = popen(cmd, "r");
    CHECK(f != NULL);
    char text[8192];
    const size_t n = fread(text, 1, sizeof(text) - 1, f);
    text[n] = '\0';
    CHECK_INT(pclose(f), ==, 0);
    CHECK_MSG(strstr(text, "sliding layers:    3 of 4, window 4: head dim 16, 16 rope dims, base"
                     " 10000") != NULL, "%s", text);
    CHECK_MSG(strstr(text, "dense MLP:         FFN 32 in every layer, beside the experts (GELU)") != NULL,
              "%s", text);
    CHECK_MSG(strstr(text, "routing:           gating softmax, weights normalized, scale 1") != NULL,
              "%s", text);
}

static void test_qwen2moe(void) { run_arch("qwen2moe"); }
static void test_olmoe(void) { run_arch("olmoe"); }

int main(void)
{
    MOE_TEST_RUN(test_qwen2moe);
    MOE_TEST_RUN(test_olmoe);
    MOE_TEST_RUN(test_glm4moe);
    MOE_TEST_RUN(test_minimax_m2);
    MOE_TEST_RUN(test_qwen35moe);
    MOE_TEST_RUN(test_gemma4);
    MOE_TEST_RUN(test_gemma4_info);
    return moe_test_exit_code();
}

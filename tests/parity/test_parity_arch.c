/* Parity with llama.cpp for the architectures shared/ref has no goldens
 * for (qwen2moe, olmoe): tiny F32 models and what llama.cpp (through
 * llama-cpp-python) computes on them, made by tools/ref/make_arch_goldens.py
 * and kept in tests/fixtures/arch/. Criteria as for F32 in shared/ref:
 * max |dlogit| <= 1e-4 on every prompt position, greedy ids identical up to
 * the first step whose margin is below 1e-3. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>

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

static void test_qwen2moe(void) { run_arch("qwen2moe"); }
static void test_olmoe(void) { run_arch("olmoe"); }

int main(void)
{
    MOE_TEST_RUN(test_qwen2moe);
    MOE_TEST_RUN(test_olmoe);
    return moe_test_exit_code();
}

/* End to end on the GPU (RELIABILITY.md row 18, CUDA half): every shared/ref
 * model run with the CUDA backend against the CPU backend on the same
 * tokens: logits within a per-type tolerance at every position, expert
 * choices equal on F32 models, greedy continuations equal while the margin
 * allows; and an expert cache of a few slots on the GPU gives the logits of
 * every expert resident there. Exits 77 without a CUDA device. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda.h"
#include "model/model.h"
#include "model/options.h"
#include "tests/gpu/probe-impl.h"
#include "tests/harness.h"

#define MAXR 100000

struct routes {
    int32_t ids[MAXR];
    int n;
};

static void on_route(void *ud, int64_t token, int layer, const int32_t *ids, const float *w, int k)
{
    (void)token;
    (void)layer;
    (void)w;
    struct routes *r = ud;
    for (int i = 0; i < k && r->n < MAXR; i++)
        r->ids[r->n++] = ids[i];
}

static float *run(const char *file, const char *backend, int cache, const int32_t *tok, int n,
                  struct routes *rt, int *V)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/models/%s", moe_test_ref_dir(), file);
    struct moe_model_opts o = { .n_threads = 4, .n_ctx = 128, .cache_experts = cache };
    if (moe_model_opts_set(&o, "backend", backend, NULL) != 0)
        return NULL;
    struct moe_model *m;
    struct moe_diag d = { 0 };
    if (moe_model_load(&m, path, &o, &d) != 0) {
        fprintf(stderr, "%s (%s): %s\n", file, backend, d.msg);
        return NULL;
    }
    *V = moe_model_cfg(m)->n_vocab;
    float *lg = malloc((size_t)n * *V * sizeof(float));
    struct moe_seq *s = NULL;
    int rc = moe_seq_create(&s, m, &d);
    if (rc == 0)
        rc = moe_model_forward(m, s, tok, n, lg, true, rt ? on_route : NULL, rt, &d);
    if (rc) {
        fprintf(stderr, "%s (%s): %s\n", file, backend, d.msg);
        free(lg);
        lg = NULL;
    }
    moe_seq_free(s);
    moe_model_free(m);
    return lg;
}

static void compare(const char *file, double tol, bool ids_equal)
{
    int32_t tok[24];
    for (int i = 0; i < 24; i++)
        tok[i] = 1 + (i * 37) % 200;
    static struct routes rc, rg;
    rc.n = rg.n = 0;
    int V = 0;
    float *a = run(file, "cpu", 0, tok, 24, &rc, &V);
    float *b = run(file, "cuda", 0, tok, 24, &rg, &V);
    CHECK(a && b);
    double maxd = 0, maxa = 0;
    for (size_t i = 0; i < (size_t)24 * V; i++) {
        maxd = fmax(maxd, fabs((double)a[i] - b[i]));
        maxa = fmax(maxa, fabs((double)a[i]));
    }
    printf("  %s: max |dlogit| %.3g (max |logit| %.3g)\n", file, maxd, maxa);
    CHECK_MSG(maxd <= tol, "%s: max |dlogit| %g > %g", file, maxd, tol);
    if (ids_equal) {
        CHECK_INT(rc.n, ==, rg.n);
        CHECK_MSG(memcmp(rc.ids, rg.ids, (size_t)rc.n * sizeof(int32_t)) == 0, "%s: expert choices"
                  " differ between CPU and GPU", file);
    }
    /* a few slots on the GPU: the same logits as everything resident there */
    float *c = run(file, "cuda", 8, tok, 24, NULL, &V);
    CHECK(c);
    double d2 = 0;
    for (size_t i = 0; i < (size_t)24 * V; i++)
        d2 = fmax(d2, fabs((double)b[i] - c[i]));
    CHECK_MSG(d2 <= 1e-5 * fmax(1.0, maxa), "%s: cached vs resident on the GPU: %g", file, d2);
    free(a);
    free(b);
    free(c);
}

static void test_mixtral_f32(void) { compare("tiny-mixtral-F32.gguf", 1e-3, true); }
static void test_mixtral_f16(void) { compare("tiny-mixtral-F16.gguf", 5e-3, false); }
static void test_mixtral_q4(void) { compare("tiny-mixtral-Q4_0.gguf", 5e-2, false); }
static void test_qwen3_q4k(void) { compare("tiny-qwen3moe-Q4_K_M.gguf", 5e-2, false); }
static void test_deepseek2(void) { compare("tiny-deepseek2-F32.gguf", 1e-3, true); }
static void test_gptoss(void) { compare("tiny-gptoss-F32.gguf", 1e-3, true); }

int main(void)
{
    /* probed in a child: the cases fork, and CUDA does not survive a fork */
    if (moe_test_cuda_devices() <= 0 || moe_test_ref_dir() == NULL)
        return 77;
    moe_test_run("mixtral F32", test_mixtral_f32);
    moe_test_run("mixtral F16", test_mixtral_f16);
    moe_test_run("mixtral Q4_0", test_mixtral_q4);
    moe_test_run("qwen3moe Q4_K_M", test_qwen3_q4k);
    moe_test_run("deepseek2 F32 (MLA)", test_deepseek2);
    moe_test_run("gpt-oss F32", test_gptoss);
    return moe_test_exit_code();
}

/* End to end on the GPU (RELIABILITY.md row 18, CUDA half): every shared/ref
 * model run with the CUDA backend, on the goldens' own token sequences
 * (manifest.json, len33):
 *   - against the CPU backend on the same device machine: logits within a
 *     per-type tolerance at every position, expert choices equal on the F32
 *     models (counted, not required, on the others);
 *   - against llama.cpp's goldens: logits (F32 1e-3, F16 1e-2 max |d|;
 *     quantized: mean |d| <= 0.05, argmax on >= 90% of positions), and the
 *     greedy continuation, fed back one token at a time, identical up to the
 *     first step whose golden margin is below the tolerance (F32 1e-3, F16
 *     1e-2; informational on quantized weights, as in test_parity_cpu);
 *   - the overlapped data path: a small expert cache on the GPU (two layers'
 *     top-k worth of slots) with a host-RAM tier and speculative prefetch,
 *     against every expert resident on the GPU: the same logits (1e-5 of
 *     the largest), then eight greedy decode steps with the same tokens.
 *
 * And the families of issue 22 whose ops are new to the CUDA backend
 * (gemma4, qwen35moe), from tests/fixtures/arch: GPU against CPU through
 * a prompt and decode steps, against llama.cpp's prompt logits, and two
 * sequences decoding in one batch (run_family below).
 *
 * A model missing from the ref directory is skipped by name (the GPU
 * machine receives a copy of shared/ref that fits its size limit;
 * tools/gpu_check.sh --prepare says which). MOE_GPU_QUICK=1 runs two small
 * models only (the compute-sanitizer subset). Exits 77 without a CUDA
 * device or without shared/ref. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cuda.h"
#include "model/model.h"
#include "model/options.h"
#include "tests/gpu/probe-impl.h"
#include "tests/harness.h"

#define MAXR 100000
#define N_DECODE 8

enum kind { KIND_F32, KIND_F16, KIND_QUANT };

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

static int argmax(const float *v, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b])
            b = i;
    return b;
}

/* One run: the prompt's logits (every position) and n_dec greedy tokens. */
struct run_out {
    float *logits;      /* [n][V] */
    int32_t dec[64];    /* greedy continuation */
    int n_dec, V;
    struct moe_cache_stats cs;
    int has_cache;
};

static int run(const char *path, const char *backend, int cache, size_t host_bytes, int prefetch,
               const int32_t *tok, int n, int n_dec, struct routes *rt, struct run_out *out)
{
    memset(out, 0, sizeof(*out));
    struct moe_model_opts o = { .n_threads = 4, .n_ctx = 256, .cache_experts = cache,
                                .host_bytes = host_bytes };
    struct moe_diag d = { 0 };
    if (strcmp(backend, "cuda") == 0 && moe_test_gpu_stand_in()) {
        backend = "cpu";
        o.upload_weights = true;
    }
    if (moe_model_opts_set(&o, "backend", backend, &d) != 0 ||
        (prefetch && moe_model_opts_set(&o, "prefetch", "gate", &d) != 0)) {
        fprintf(stderr, "options: %s\n", d.msg);
        return -1;
    }
    o.prefetch_always = prefetch != 0;
    struct moe_model *m;
    if (moe_model_load(&m, path, &o, &d) != 0) {
        fprintf(stderr, "%s (%s): %s\n", path, backend, d.msg);
        return -1;
    }
    const int V = moe_model_cfg(m)->n_vocab;
    out->V = V;
    out->logits = malloc((size_t)n * V * sizeof(float));
    float *last = malloc((size_t)V * sizeof(float));
    struct moe_seq *s = NULL;
    int rc = out->logits && last ? moe_seq_create(&s, m, &d) : -1;
    if (rc == 0)
        rc = moe_model_forward(m, s, tok, n, out->logits, true, rt ? on_route : NULL, rt, &d);
    if (rc == 0 && n_dec > 0) {
        int32_t t = argmax(out->logits + (size_t)(n - 1) * V, V);
        for (int i = 0; i < n_dec && rc == 0; i++) {
            out->dec[out->n_dec++] = t;
            if (i + 1 < n_dec && (rc = moe_model_forward(m, s, &t, 1, last, false, NULL, NULL, &d)) == 0)
                t = argmax(last, V);
        }
    }
    if (rc)
        fprintf(stderr, "%s (%s): %s\n", path, backend, d.msg);
    out->has_cache = moe_model_cache_stats(m, &out->cs);
    if (rc == 0 && out->has_cache && moe_model_cache_pinned(m) != 0) {
        fprintf(stderr, "%s (%s): %d experts still pinned after the run\n", path, backend,
                moe_model_cache_pinned(m));
        rc = -1;
    }
    free(last);
    moe_seq_free(s);
    moe_model_free(m);
    if (rc) {
        free(out->logits);
        out->logits = NULL;
    }
    return rc;
}

static json_t *manifest;

static int load_manifest(void)
{
    if (manifest)
        return 0;
    char path[4096];
    snprintf(path, sizeof(path), "%s/manifest.json", moe_test_ref_dir());
    json_error_t e;
    manifest = json_load_file(path, 0, &e);
    if (manifest == NULL)
        fprintf(stderr, "%s: %s\n", path, e.text);
    return manifest ? 0 : -1;
}

static int quick;
static const char *cur_model, *cur_variant;
static enum kind cur_kind;

static void run_variant(void)
{
    const char *model = cur_model, *variant = cur_variant;
    const enum kind kind = cur_kind;
    const char *ref = moe_test_ref_dir();
    char path[4096];
    snprintf(path, sizeof(path), "%s/models/%s-%s.gguf", ref, model, variant);
    if (access(path, R_OK) != 0)
        MOE_SKIP("%s-%s: not in %s/models (not carried to this machine)", model, variant, ref);
    CHECK(load_manifest() == 0);
    json_t *jt = json_object_get(json_object_get(json_object_get(json_object_get(manifest, "models"),
                                 model), "sequences"), quick ? "len7" : "len33");
    CHECK_MSG(jt != NULL, "manifest: no sequence for %s", model);
    const int n = (int)json_array_size(jt);
    int32_t tok[64];
    CHECK(n > 0 && n <= 64);
    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)json_integer_value(json_array_get(jt, (size_t)i));

    /* GPU against CPU on this machine */
    static struct routes rc, rg;
    rc.n = rg.n = 0;
    struct run_out a, b, c;
    CHECK(run(path, "cpu", 0, 0, 0, tok, n, 0, &rc, &a) == 0);
    CHECK(run(path, "cuda", 0, 0, 0, tok, n, 32, &rg, &b) == 0);
    const int V = a.V;
    double maxd = 0, maxa = 0;
    for (size_t i = 0; i < (size_t)n * V; i++) {
        maxd = fmax(maxd, fabs((double)a.logits[i] - b.logits[i]));
        maxa = fmax(maxa, fabs((double)a.logits[i]));
    }
    int same_ids = rc.n == rg.n;
    for (int i = 0; same_ids && i < rc.n; i++)
        same_ids = rc.ids[i] == rg.ids[i];
    int diff_ids = 0;
    for (int i = 0; i < rc.n && i < rg.n; i++)
        diff_ids += rc.ids[i] != rg.ids[i];
    const double tol = kind == KIND_F32 ? 1e-3 : kind == KIND_F16 ? 5e-3 : 5e-2;
    printf("  %s-%s: GPU vs CPU max |dlogit| %.3g (max |logit| %.3g, tol %g); expert ids: %d of %d"
           " differ\n", model, variant, maxd, maxa, tol, diff_ids, rc.n);
    CHECK_MSG(maxd <= tol, "%s-%s: GPU vs CPU max |dlogit| %g > %g", model, variant, maxd, tol);
    if (kind == KIND_F32)
        CHECK_MSG(same_ids, "%s-%s: expert choices differ between CPU and GPU", model, variant);

    /* GPU against llama.cpp's goldens */
    const char *sname = quick ? "len7" : "len33";
    snprintf(path, sizeof(path), "%s/goldens/%s-%s/%s.logits.f32", ref, model, variant, sname);
    size_t glen = 0;
    float *gold = moe_test_read_file(path, &glen);
    if (gold != NULL && glen == (size_t)n * V * 4) {
        double gmax = 0, gsum = 0;
        int same_arg = 0;
        for (int t = 0; t < n; t++) {
            for (int i = 0; i < V; i++) {
                const double dd = fabs((double)b.logits[(size_t)t * V + i] - gold[(size_t)t * V + i]);
                gsum += dd;
                gmax = fmax(gmax, dd);
            }
            same_arg += argmax(b.logits + (size_t)t * V, V) == argmax(gold + (size_t)t * V, V);
        }
        printf("    vs llama.cpp: max |d| %.3g, mean |d| %.3g, argmax %d/%d\n", gmax, gsum / ((double)n * V),
               same_arg, n);
        if (kind == KIND_QUANT) {
            CHECK_MSG(gsum / ((double)n * V) <= 0.05, "mean |dlogit| vs llama.cpp %g", gsum / ((double)n * V));
            CHECK_MSG(same_arg * 10 >= n * 9, "argmax agrees with llama.cpp on %d of %d", same_arg, n);
        } else {
            CHECK_MSG(gmax <= (kind == KIND_F32 ? 1e-3 : 1e-2), "max |dlogit| vs llama.cpp %g", gmax);
        }
    } else {
        printf("    %s: not here, logits vs llama.cpp not compared\n", path);
    }
    free(gold);
    snprintf(path, sizeof(path), "%s/goldens/%s-%s/%s.greedy.json", ref, model, variant, sname);
    json_t *gr = json_load_file(path, 0, NULL);
    if (gr != NULL) {
        json_t *gids = json_object_get(gr, "ids"), *gm = json_object_get(gr, "margin");
        const double mtol = kind == KIND_F16 ? 1e-2 : 1e-3;
        int same = 0, upto = 0;
        for (size_t i = 0; i < json_array_size(gids) && (int)i < b.n_dec; i++) {
            if (json_real_value(json_array_get(gm, i)) < mtol)
                break;
            upto++;
            if ((int)json_integer_value(json_array_get(gids, i)) != b.dec[i])
                break;
            same++;
        }
        printf("    greedy: %d of %d steps identical to llama.cpp (up to the first margin < %g)\n", same,
               upto, mtol);
        if (kind != KIND_QUANT)
            CHECK_MSG(same == upto, "greedy step %d differs from llama.cpp", same);
        json_decref(gr);
    }

    /* a small cache with a host tier and prefetch, against everything
     * resident on the GPU: the overlapped upload path */
    snprintf(path, sizeof(path), "%s/models/%s-%s.gguf", ref, model, variant);
    const int slots = 8;   /* a few: every ref model has 8 or 16 experts per layer */
    CHECK(run(path, "cuda", slots, (size_t)64 << 20, 1, tok, n, N_DECODE, NULL, &c) == 0);
    double d2 = 0;
    for (size_t i = 0; i < (size_t)n * V; i++)
        d2 = fmax(d2, fabs((double)b.logits[i] - c.logits[i]));
    int same_dec = 0;
    while (same_dec < N_DECODE && b.dec[same_dec] == c.dec[same_dec])
        same_dec++;
    printf("    %d-slot cache + host tier + prefetch vs resident: max |d| %.3g; decode %d/%d same;"
           " %llu hits, %llu misses, %llu from the host tier, %llu uploads, %llu host waits\n", slots, d2,
           same_dec, N_DECODE, (unsigned long long)c.cs.hits, (unsigned long long)c.cs.misses,
           (unsigned long long)c.cs.host_hits, (unsigned long long)c.cs.uploads,
           (unsigned long long)c.cs.upload_host_waits);
    CHECK_MSG(d2 <= 1e-5 * fmax(1.0, maxa), "%s-%s: cached vs resident on the GPU: %g", model, variant, d2);
    CHECK_MSG(same_dec == N_DECODE, "%s-%s: cached decode differs at step %d", model, variant, same_dec);
    CHECK(c.has_cache && c.cs.uploads > 0);
    free(a.logits);
    free(b.logits);
    free(c.logits);
}

/* ---- the issue-22 families in tests/fixtures/arch ------------------------ */

/* The prompt's logits (every position), then one decode step per token of
 * `cont` (fed, not sampled) with its logits: [n + n_cont][V]. With two
 * sequences (`pair`), a second sequence runs the same tokens interleaved
 * with the first in one forward_multi batch per step, and its logits are
 * compared to the first's: each sequence's recurrent state and KV rows are
 * its own. NULL on failure. */
static float *run_fam(const char *path, const char *backend, const int32_t *tok, int n,
                      const int32_t *cont, int n_cont, int pair, double *pair_d, int *V_out)
{
    struct moe_model_opts o = { .n_threads = 4, .n_ctx = 256 };
    struct moe_diag d = { 0 };
    if (strcmp(backend, "cuda") == 0 && moe_test_gpu_stand_in()) {
        backend = "cpu";
        o.upload_weights = true;
    }
    if (moe_model_opts_set(&o, "backend", backend, &d) != 0) {
        fprintf(stderr, "options: %s\n", d.msg);
        return NULL;
    }
    struct moe_model *m;
    if (moe_model_load(&m, path, &o, &d) != 0) {
        fprintf(stderr, "%s (%s): %s\n", path, backend, d.msg);
        return NULL;
    }
    const int V = moe_model_cfg(m)->n_vocab;
    *V_out = V;
    float *lg = malloc(((size_t)n + (size_t)n_cont) * V * sizeof(float));
    float *l2 = malloc((size_t)V * sizeof(float));
    struct moe_seq *s = NULL, *s2 = NULL;
    int rc = lg && l2 ? moe_seq_create(&s, m, &d) : -1;
    if (rc == 0 && pair)
        rc = moe_seq_create(&s2, m, &d);
    if (rc == 0)
        rc = moe_model_forward(m, s, tok, n, lg, true, NULL, NULL, &d);
    if (rc == 0 && pair) {
        /* the second sequence's prompt in two batches beside nothing, then
         * every decode step beside the first sequence's */
        rc = moe_model_forward(m, s2, tok, n / 2 > 0 ? n / 2 : n, NULL, false, NULL, NULL, &d);
        if (rc == 0 && n / 2 > 0)
            rc = moe_model_forward(m, s2, tok + n / 2, n - n / 2, l2, false, NULL, NULL, &d);
    }
    *pair_d = 0;
    for (int i = 0; i < n_cont && rc == 0; i++) {
        float *row = lg + ((size_t)n + (size_t)i) * V;
        if (pair) {
            const struct moe_batch_seg segs[2] = {
                { .seq = s2, .tokens = &cont[i], .n = 1, .logits = l2 },
                { .seq = s, .tokens = &cont[i], .n = 1, .logits = row },
            };
            rc = moe_model_forward_multi(m, segs, 2, &d);
            for (int v = 0; rc == 0 && v < V; v++)
                *pair_d = fmax(*pair_d, fabs((double)row[v] - l2[v]));
        } else {
            rc = moe_model_forward(m, s, &cont[i], 1, row, false, NULL, NULL, &d);
        }
    }
    if (rc)
        fprintf(stderr, "%s (%s): %s\n", path, backend, d.msg);
    free(l2);
    moe_seq_free(s2);
    moe_seq_free(s);
    moe_model_free(m);
    if (rc) {
        free(lg);
        return NULL;
    }
    return lg;
}

static const char *cur_arch;

/* One family (tests/fixtures/arch/tiny-<arch>-{F32,Q8_0}.gguf), its longest
 * prompt (len7 and F32 only in the quick subset): the GPU against the CPU backend at
 * every prompt position and 8 decode steps fed the CPU's greedy tokens
 * (F32 1e-3, Q8_0 5e-2 max |dlogit|: the tolerances of the shared/ref
 * models); the GPU's prompt logits against llama.cpp's (F32 1e-3 max,
 * Q8_0 mean 0.05); two sequences decoding in one batch on the GPU equal
 * within 1e-4 of the largest logit (the matmuls' paths differ with the
 * batch's token count, so not bit for bit). */
static void run_family(void)
{
    const char *arch = cur_arch;
    /* meson sets MOE_SOURCE_ROOT; tools/gpu_check.sh's memcheck step runs
     * the test from the repository root without it */
    const char *root = getenv("MOE_SOURCE_ROOT");
    if (root == NULL && access("tests/fixtures/arch", R_OK) == 0)
        root = ".";
    if (root == NULL)
        MOE_SKIP("MOE_SOURCE_ROOT not set and not run from the repository root");
    char path[4096];
    snprintf(path, sizeof(path), "%s/tests/fixtures/arch/tiny-%s-fam.json", root, arch);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    CHECK_MSG(j != NULL, "%s: %s", path, jerr.text);
    json_t *seqs = json_object_get(j, "seqs");
    size_t best = 0;
    for (size_t si = 0; si < json_array_size(seqs); si++) {
        const size_t len = json_array_size(json_object_get(json_array_get(seqs, si), "tokens"));
        const size_t cur = json_array_size(json_object_get(json_array_get(seqs, best), "tokens"));
        if (quick ? len == 7 : len > cur)
            best = si;
    }
    json_t *jt = json_object_get(json_array_get(seqs, best), "tokens");
    const int n = (int)json_array_size(jt);
    int32_t tok[256];
    CHECK(n > 0 && n < 256);
    for (int i = 0; i < n; i++)
        tok[i] = (int32_t)json_integer_value(json_array_get(jt, (size_t)i));
    static const char *const vars[] = { "F32", "Q8_0" };
    for (int vi = 0; vi < (quick ? 1 : 2); vi++) {   /* quick (memcheck): F32 only */
        const int quant = vi == 1;
        char model[4096];
        snprintf(model, sizeof(model), "%s/tests/fixtures/arch/tiny-%s-%s.gguf", root, arch, vars[vi]);
        /* the CPU's greedy continuation, then both backends fed it */
        int V = 0;
        double pd = 0;
        float *g0 = run_fam(model, "cpu", tok, n, NULL, 0, 0, &pd, &V);
        CHECK_MSG(g0 != NULL, "%s on the CPU failed", model);
        int32_t cont[N_DECODE];
        cont[0] = argmax(g0 + (size_t)(n - 1) * V, V);
        free(g0);
        float *a = run_fam(model, "cpu", tok, n, cont, 1, 0, &pd, &V);
        CHECK(a != NULL);
        for (int i = 1; i < N_DECODE; i++) {
            free(a);
            a = run_fam(model, "cpu", tok, n, cont, i, 0, &pd, &V);
            CHECK(a != NULL);
            cont[i] = argmax(a + ((size_t)n + (size_t)i - 1) * V, V);
        }
        free(a);
        a = run_fam(model, "cpu", tok, n, cont, N_DECODE, 0, &pd, &V);
        float *b = run_fam(model, "cuda", tok, n, cont, N_DECODE, 0, &pd, &V);
        CHECK_MSG(a != NULL && b != NULL, "%s: a run failed", model);
        double maxd = 0, maxa = 0, maxdec = 0;
        for (size_t i = 0; i < ((size_t)n + N_DECODE) * V; i++) {
            const double dd = fabs((double)a[i] - b[i]);
            maxd = fmax(maxd, dd);
            maxa = fmax(maxa, fabs((double)a[i]));
            if (i >= (size_t)n * V)
                maxdec = fmax(maxdec, dd);
        }
        const double tol = quant ? 5e-2 : 1e-3;
        printf("  %s-%s len%d: GPU vs CPU max |dlogit| %.3g (decode steps %.3g; max |logit| %.3g,"
               " tol %g)\n", arch, vars[vi], n, maxd, maxdec, maxa, tol);
        CHECK_MSG(maxd <= tol, "%s-%s: GPU vs CPU max |dlogit| %g > %g", arch, vars[vi], maxd, tol);

        snprintf(path, sizeof(path), "%s/tests/fixtures/arch/tiny-%s-%s.len%d.logits.f32", root, arch,
                 vars[vi], n);
        size_t glen = 0;
        float *gold = moe_test_read_file(path, &glen);
        CHECK_MSG(gold != NULL && glen == (size_t)n * V * 4, "%s", path);
        double gmax = 0, gsum = 0;
        for (size_t i = 0; i < (size_t)n * V; i++) {
            const double dd = fabs((double)b[i] - gold[i]);
            gmax = fmax(gmax, dd);
            gsum += dd;
        }
        printf("    vs llama.cpp: max |d| %.3g, mean |d| %.3g\n", gmax, gsum / ((double)n * V));
        if (quant)
            CHECK_MSG(gsum / ((double)n * V) <= 0.05, "mean |dlogit| vs llama.cpp %g", gsum / ((double)n * V));
        else
            CHECK_MSG(gmax <= 1e-3, "max |dlogit| vs llama.cpp %g", gmax);
        free(gold);

        float *c = run_fam(model, "cuda", tok, n, cont, N_DECODE, 1, &pd, &V);
        CHECK_MSG(c != NULL, "%s: two sequences on the GPU failed", model);
        printf("    two sequences in one batch on the GPU: max |d| between them %.3g\n", pd);
        CHECK_MSG(pd <= 1e-4 * fmax(1.0, maxa), "%s-%s: batched sequences differ by %g", arch, vars[vi], pd);
        free(a);
        free(b);
        free(c);
    }
    json_decref(j);
}

static const struct {
    const char *model, *variant;
    enum kind kind;
    int in_quick;
} variants[] = {
    { "tiny-mixtral", "F32", KIND_F32, 1 },
    { "tiny-mixtral", "F16", KIND_F16, 0 },
    { "tiny-mixtral", "Q8_0", KIND_QUANT, 0 },
    { "tiny-mixtral", "Q4_0", KIND_QUANT, 1 },
    { "tiny-qwen3moe", "F16", KIND_F16, 0 },
    { "tiny-qwen3moe", "Q8_0", KIND_QUANT, 0 },
    { "tiny-qwen3moe", "Q4_K_M", KIND_QUANT, 0 },
    { "tiny-deepseek2", "F32", KIND_F32, 0 },
    { "tiny-gptoss", "F32", KIND_F32, 0 },
    { "tiny-gptoss", "MXFP4_MOE", KIND_QUANT, 0 },
};

int main(void)
{
    /* probed in a child: the cases fork, and CUDA does not survive a fork */
    if (moe_test_gpu_stand_in())
        printf("MOE_GPU_STAND_IN=cpu: the CPU backend stands in for the GPU (tests the test, not CUDA)\n");
    else if (moe_test_cuda_devices() <= 0)
        return 77;
    if (moe_test_ref_dir() == NULL)
        return 77;
    quick = getenv("MOE_GPU_QUICK") != NULL && strcmp(getenv("MOE_GPU_QUICK"), "0") != 0;
    for (size_t i = 0; i < sizeof(variants) / sizeof(variants[0]); i++) {
        if (quick && !variants[i].in_quick)
            continue;
        char name[128];
        snprintf(name, sizeof(name), "%s-%s", variants[i].model, variants[i].variant);
        cur_model = variants[i].model;
        cur_variant = variants[i].variant;
        cur_kind = variants[i].kind;
        moe_test_run(name, run_variant);
    }
    /* gemma4 (GELU, scale, row multiply, rope divisors) and qwen35moe (the
     * delta-net ops and a recurrent state per sequence in device memory) */
    static const char *const fams[] = { "gemma4", "qwen35moe" };
    for (size_t i = 0; i < sizeof(fams) / sizeof(fams[0]); i++) {
        char name[128];
        snprintf(name, sizeof(name), "tiny-%s (tests/fixtures/arch)", fams[i]);
        cur_arch = fams[i];
        moe_test_run(name, run_family);
    }
    json_decref(manifest);
    return moe_test_exit_code();
}

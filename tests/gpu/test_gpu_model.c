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
    json_decref(manifest);
    return moe_test_exit_code();
}

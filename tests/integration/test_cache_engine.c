/* The engine through the expert cache: logits are bit-identical to the
 * all-resident run for budgets from the minimum (one layer's top-k) to
 * everything, from a GGUF directly and from a .moe pack (compressed and
 * raw), on every architecture with MoE layers in shared/ref; no expert stays
 * pinned between forward passes; a budget below the minimum is refused. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/expert_cache.h"
#include "io/pack.h"
#include "model/model.h"
#include "model/options.h"
#include "tests/harness.h"

static const int32_t toks[] = { 1, 2088, 1350, 2664, 3094, 1125, 519, 7, 99, 1000, 2000, 3000, 40, 41 };
#define N_TOK ((int)(sizeof(toks) / sizeof(toks[0])))
#define N_GEN 6

/* prompt logits (all positions) then N_GEN greedy steps' logits */
static float *run(const char *path, const struct moe_model_opts *o, int *n_vocab, struct moe_cache_stats *st)
{
    struct moe_model *m;
    struct moe_diag d = { 0 };
    if (moe_model_load(&m, path, o, &d)) {
        fprintf(stderr, "  load %s: %s\n", path, d.msg);
        return NULL;
    }
    const int V = moe_model_cfg(m)->n_vocab;
    *n_vocab = V;
    struct moe_seq *s;
    float *lg = malloc((size_t)(N_TOK + N_GEN) * V * sizeof(float));
    int32_t t[N_TOK];
    for (int i = 0; i < N_TOK; i++)
        t[i] = toks[i] % V;
    int ok = moe_seq_create(&s, m, &d) == 0 && moe_model_forward(m, s, t, N_TOK, lg, true, NULL, NULL, &d) == 0;
    for (int g = 0; ok && g < N_GEN; g++) {
        const float *last = lg + (size_t)(N_TOK - 1 + g) * V;
        int32_t best = 0;
        for (int v = 1; v < V; v++)
            if (last[v] > last[best])
                best = v;
        ok = moe_model_forward(m, s, &best, 1, lg + (size_t)(N_TOK + g) * V, false, NULL, NULL, &d) == 0;
        if (ok && moe_model_cache_pinned(m) > 0) {
            fprintf(stderr, "  %d experts still pinned after a forward pass\n", moe_model_cache_pinned(m));
            ok = 0;
        }
    }
    if (!ok)
        fprintf(stderr, "  forward %s: %s\n", path, d.msg);
    if (st && !moe_model_cache_stats(m, st))
        memset(st, 0, sizeof(*st));
    if (st && st->n_slots > 0) {
        /* per-layer counters add up to the totals */
        static struct moe_cache_layer_stats ls[256];
        uint64_t sh = 0, sm = 0;
        int nl = moe_model_cache_layer_stats(m, ls, 256);
        for (int l = 0; l < nl && l < 256; l++) {
            sh += ls[l].hits;
            sm += ls[l].misses;
        }
        if (sh != st->hits || sm != st->misses) {
            fprintf(stderr, "  per-layer counters %llu/%llu, totals %llu/%llu\n", (unsigned long long)sh,
                    (unsigned long long)sm, (unsigned long long)st->hits, (unsigned long long)st->misses);
            ok = 0;
        }
    }
    moe_seq_free(s);
    moe_model_free(m);
    if (!ok) {
        free(lg);
        return NULL;
    }
    return lg;
}

static void check_model(const char *file, int k)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096], pack[4096], pack_raw[4096];
    snprintf(path, sizeof(path), "%s/models/%s", ref, file);
    int V = 0, V2 = 0;
    struct moe_model_opts base = { .n_threads = 2, .n_ctx = 64 };
    float *want = run(path, &base, &V, NULL);
    CHECK(want != NULL);
    const size_t bytes = (size_t)(N_TOK + N_GEN) * V * sizeof(float);

    snprintf(pack, sizeof(pack), "%s/%s.moe", moe_test_tmpdir(), file);
    snprintf(pack_raw, sizeof(pack_raw), "%s/%s.raw.moe", moe_test_tmpdir(), file);
    struct moe_diag d = { 0 };
    struct moe_pack_write_opts po = { .threads = 2, .min_ratio = 1.0001 };
    CHECK_MSG(moe_pack_write(path, pack, &po, NULL, &d) == 0, "%s", d.msg);
    po.min_ratio = 1000.0; /* nothing compresses that well: every blob raw */
    CHECK_MSG(moe_pack_write(path, pack_raw, &po, NULL, &d) == 0, "%s", d.msg);

    unsigned seed = 7;
    struct { const char *src; int experts; const char *policy; int prefetch; } runs[] = {
        { path, k, "lru", 0 }, { path, k + 1, "layer", 0 }, { path, 0, "lfu", 0 },
        { pack, k, "layer", 0 }, { pack, 0, "lru", 0 }, { pack_raw, k, "lfu", 0 },
        { pack_raw, -1, "layer", 0 }, { path, -1, "lru", 0 }, { pack, -1, "lfu", 0 },
        /* prefetch on: still bit-identical, at the minimum and random budgets */
        { path, k, "layer", 1 }, { pack, -1, "lru", 2 }, { pack_raw, -1, "layer", 1 },
        /* history predictor (prefetch -1 below: mode history, depth 1 or 2) */
        { path, k, "lru", -1 }, { pack, -1, "layer", -2 },
        /* a host-RAM tier below the minimum slots (experts 1000 + k: see below) */
        { pack, 1000 + k, "lru", 0 }, { path, 1000 + k, "layer", 1 },
    };
    for (size_t r = 0; r < sizeof(runs) / sizeof(runs[0]); r++) {
        struct moe_model_opts o = base;
        CHECK(moe_model_opts_set(&o, "cache_policy", runs[r].policy, NULL) == 0);
        o.prefetch = runs[r].prefetch > 0 ? MOE_PREFETCH_GATE
                   : runs[r].prefetch < 0 ? MOE_PREFETCH_HISTORY : MOE_PREFETCH_NONE;
        o.prefetch_depth = runs[r].prefetch < 0 ? -runs[r].prefetch : runs[r].prefetch;
        o.cache_experts = runs[r].experts;
        const int host = runs[r].experts >= 1000;
        if (host) {
            o.cache_experts = runs[r].experts - 1000;
            o.host_bytes = 64u << 20;
        }
        if (runs[r].experts < 0) /* a random budget between the minimum and 3x it */
            o.cache_experts = k + (int)(rand_r(&seed) % (unsigned)(2 * k + 1));
        if (runs[r].experts == 0 && runs[r].src == path)
            o.cache_bytes = 1; /* forces the cache with the minimum below: refused */
        struct moe_cache_stats st;
        float *got = run(runs[r].src, &o, &V2, &st);
        if (runs[r].experts == 0 && runs[r].src == path) {
            CHECK_MSG(got == NULL, "a budget below the minimum was accepted");
            continue;
        }
        CHECK_MSG(got != NULL, "run %zu failed", r);
        CHECK_INT(V2, ==, V);
        CHECK_MSG(memcmp(got, want, bytes) == 0, "%s via %s, %d slots, %s: logits differ from the"
                  " resident run", file, runs[r].src == path ? "GGUF" : "pack", st.n_slots, runs[r].policy);
        printf("  %s %-5s %3d slots %-5s pf %d: hits %llu misses %llu evictions %llu prefetch %llu"
               " (used %llu) stall %.3f s\n", file,
               runs[r].src == path ? "gguf" : runs[r].src == pack ? "pack" : "raw", st.n_slots,
               runs[r].policy, runs[r].prefetch, (unsigned long long)st.hits, (unsigned long long)st.misses,
               (unsigned long long)st.evictions, (unsigned long long)st.prefetch_issued,
               (unsigned long long)st.prefetch_used, st.stall_s);
        if (st.n_slots <= k + 1)
            CHECK(st.evictions > 0);
        if (host) {
            printf("    host tier: %llu hits, %llu inserts\n", (unsigned long long)st.host_hits,
                   (unsigned long long)st.host_inserts);
            CHECK(st.host_hits > 0 && st.host_inserts > 0);
        }
        free(got);
    }
    free(want);
}

/* A corrupt expert in a pack: the forward pass fails with the load's own
 * message (file, layer, expert, offset), not a bare error code, and the
 * model keeps working for tokens routed elsewhere (nothing stays pinned). */
static void test_corrupt_expert_names_it(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096], pack[4096];
    snprintf(path, sizeof(path), "%s/models/tiny-mixtral-Q4_0.gguf", ref);
    snprintf(pack, sizeof(pack), "%s/corrupt.moe", moe_test_tmpdir());
    struct moe_diag d = { 0 };
    struct moe_pack_write_opts po = { .threads = 2, .min_ratio = 1000.0 };
    CHECK_MSG(moe_pack_write(path, pack, &po, NULL, &d) == 0, "%s", d.msg);
    /* flip one byte in every blob of layer 1 */
    struct moe_pack *p;
    CHECK_MSG(moe_pack_open(&p, pack, 0, &d) == 0, "%s", d.msg);
    const uint32_t E = moe_pack_n_expert(p);
    FILE *f = fopen(pack, "r+b");
    CHECK(f != NULL);
    for (uint32_t e = 0; e < E; e++) {
        struct moe_pack_blob b;
        CHECK(moe_pack_blob(p, 1, e, &b, &d) == 0);
        int c;
        CHECK(fseek(f, (long)(b.offset + b.stored_size / 2), SEEK_SET) == 0);
        c = fgetc(f);
        CHECK(fseek(f, (long)(b.offset + b.stored_size / 2), SEEK_SET) == 0);
        fputc(c ^ 0x5a, f);
    }
    fclose(f);
    moe_pack_close(p);

    struct moe_model_opts o = { .n_threads = 2, .n_ctx = 64, .cache_experts = 4 };
    struct moe_model *m;
    CHECK_MSG(moe_model_load(&m, pack, &o, &d) == 0, "%s", d.msg);
    struct moe_seq *s;
    CHECK(moe_seq_create(&s, m, &d) == 0);
    const int32_t t[2] = { 1, 2 };
    memset(&d, 0, sizeof(d));
    int rc = moe_model_forward(m, s, t, 2, NULL, false, NULL, NULL, &d);
    printf("  forward: %s\n", d.msg);
    CHECK_INT(rc, ==, MOE_ECHECKSUM);
    CHECK_MSG(strstr(d.msg, "corrupt.moe") && strstr(d.msg, "layer 1, expert ") &&
              strstr(d.msg, "at offset 0x"), "message does not name file, layer, expert and"
              " offset: %s", d.msg);
    CHECK_INT(moe_model_cache_pinned(m), ==, 0);
    moe_seq_free(s);
    moe_model_free(m);
}

static void test_mixtral_q4_0(void) { check_model("tiny-mixtral-Q4_0.gguf", 2); }
static void test_qwen3moe_q4_k_m(void) { check_model("tiny-qwen3moe-Q4_K_M.gguf", 4); }
static void test_deepseek2(void) { check_model("tiny-deepseek2-F32.gguf", 2); }
static void test_gptoss_mxfp4(void) { check_model("tiny-gptoss-MXFP4_MOE.gguf", 2); }
static void test_mixtral_f16(void) { check_model("tiny-mixtral-F16.gguf", 2); }

int main(void)
{
    MOE_TEST_RUN(test_mixtral_q4_0);
    MOE_TEST_RUN(test_qwen3moe_q4_k_m);
    MOE_TEST_RUN(test_deepseek2);
    MOE_TEST_RUN(test_gptoss_mxfp4);
    MOE_TEST_RUN(test_mixtral_f16);
    MOE_TEST_RUN(test_corrupt_expert_names_it);
    return moe_test_exit_code();
}

/* Prefix reuse across sequences (doc/engine.md "The paged KV pool"): a
 * sequence started with moe_seq_begin over a prompt whose leading blocks
 * are cached runs only the rest, and its logits and greedy tokens are
 * bit-identical to a cold run (a model loaded with prefix_cache off), on
 * every reference architecture:
 *   - a repeated prompt and a prompt that diverges inside the cached part;
 *   - many sequences sharing and diverging from one prefix, in one batch,
 *     while the sequence that computed the prefix still runs;
 *   - eviction under pressure: a small pool, other prompts push the cached
 *     blocks out (counted), blocks with references are never taken, and the
 *     results stay identical. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "tests/harness.h"

#define BT 4          /* tokens per block: short prompts still span blocks */
#define NCTX 128
#define GEN 6         /* greedy steps */

struct pair {
    struct moe_model *warm, *cold;   /* prefix_cache on / off, otherwise the same */
    int V;
};

static int argmax(const float *v, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b])
            b = i;
    return b;
}

static int load(struct moe_model **m, const char *path, bool prefix, int kv_size)
{
    struct moe_model_opts o = { .n_threads = 2, .n_ctx = NCTX, .n_seqs = 8, .kv_block = BT,
                                .kv_size = kv_size, .prefix_cache = prefix };
    struct moe_diag d = { 0 };
    int rc = moe_model_load(m, path, &o, &d);
    if (rc)
        fprintf(stderr, "  %s: %s\n", path, d.msg);
    return rc;
}

static int open_pair(struct pair *p, const char *path, int kv_size)
{
    memset(p, 0, sizeof(*p));
    if (load(&p->warm, path, true, kv_size) || load(&p->cold, path, false, 0))
        return -1;
    p->V = moe_model_cfg(p->warm)->n_vocab;
    return 0;
}

static void close_pair(struct pair *p)
{
    moe_model_free(p->warm);
    moe_model_free(p->cold);
}

/* tokens from a fixed recipe, all regular ids */
static void make_tokens(int32_t *t, int n, int seed, int V)
{
    for (int i = 0; i < n; i++)
        t[i] = (int32_t)(((uint64_t)(seed + 1) * 2654435761u + (uint64_t)i * 40503u) % (uint64_t)(V - 2)) + 1;
}

/* A run of prompt[0..n) then GEN greedy tokens: the logits of positions
 * from..n-1 into lg ([n - from][V]) and each greedy step's into gl
 * ([GEN][V]). With `warm`, the sequence starts through moe_seq_begin (and
 * *cached says from where); cold runs start at 0. */
static int run(struct moe_model *m, struct moe_seq *s, const int32_t *prompt, int n, int *cached,
               float *lg, int from, float *gl, int V)
{
    struct moe_diag d = { 0 };
    int c = 0;
    if (moe_seq_begin(s, prompt, n, n + GEN, &c, &d) != 0) {
        fprintf(stderr, "  begin: %s\n", d.msg);
        return -1;
    }
    if (cached)
        *cached = c;
    if (c > from)
        return -2;   /* the caller asks for logits of positions that were reused */
    float *all = malloc((size_t)(n - c) * (size_t)V * sizeof(float));
    if (moe_model_forward(m, s, prompt + c, n - c, all, true, NULL, NULL, &d) != 0) {
        fprintf(stderr, "  forward: %s\n", d.msg);
        free(all);
        return -1;
    }
    memcpy(lg, all + (size_t)(from - c) * (size_t)V, (size_t)(n - from) * (size_t)V * sizeof(float));
    int32_t next = argmax(all + (size_t)(n - 1 - c) * (size_t)V, V);
    free(all);
    for (int g = 0; g < GEN; g++) {
        if (moe_model_forward(m, s, &next, 1, gl + (size_t)g * (size_t)V, false, NULL, NULL, &d) != 0)
            return -1;
        next = argmax(gl + (size_t)g * (size_t)V, V);
    }
    return 0;
}

/* Warm and cold runs of one prompt agree bit for bit from position `from`. */
static void check_same(struct pair *p, const int32_t *prompt, int n, int from, int want_cached,
                       const char *what)
{
    const size_t V = (size_t)p->V;
    float *lw = malloc((size_t)n * V * 4), *lc = malloc((size_t)n * V * 4);
    float *gw = malloc(GEN * V * 4), *gc = malloc(GEN * V * 4);
    struct moe_seq *sw = NULL, *sc = NULL;
    struct moe_diag d = { 0 };
    CHECK(moe_seq_create(&sw, p->warm, &d) == 0 && moe_seq_create(&sc, p->cold, &d) == 0);
    int cached = -1, cc = -1;
    CHECK_MSG(run(p->warm, sw, prompt, n, &cached, lw, from, gw, p->V) == 0, "%s: warm run", what);
    CHECK_MSG(run(p->cold, sc, prompt, n, &cc, lc, from, gc, p->V) == 0, "%s: cold run", what);
    CHECK_INT(cc, ==, 0);
    CHECK_MSG(cached == want_cached, "%s: %d tokens reused, expected %d", what, cached, want_cached);
    CHECK_MSG(memcmp(lw, lc, (size_t)(n - from) * V * 4) == 0, "%s: prompt logits differ", what);
    CHECK_MSG(memcmp(gw, gc, GEN * V * 4) == 0, "%s: greedy logits differ", what);
    moe_seq_free(sw);
    moe_seq_free(sc);
    free(lw);
    free(lc);
    free(gw);
    free(gc);
}

static const char *const models[] = {
    "tiny-mixtral-F32.gguf", "tiny-qwen3moe-Q8_0.gguf", "tiny-deepseek2-F32.gguf",
    "tiny-gptoss-MXFP4_MOE.gguf", "fixture:tiny-qwen2moe-F32.gguf", "fixture:tiny-olmoe-F32.gguf",
};

static int model_path(char *out, size_t cap, const char *name)
{
    if (strncmp(name, "fixture:", 8) == 0) {
        const char *root = getenv("MOE_SOURCE_ROOT");
        if (root == NULL)
            return -1;
        snprintf(out, cap, "%s/tests/fixtures/arch/%s", root, name + 8);
    } else {
        snprintf(out, cap, "%s/models/%s", moe_test_ref_dir(), name);
    }
    return 0;
}

/* A repeated prompt (every full block but the last token's reused), and
 * one that diverges inside the cached part (the blocks before the
 * divergence reused). */
static void test_repeat_and_diverge(void)
{
    if (moe_test_ref_dir() == NULL)
        MOE_SKIP("shared/ref not found");
    for (size_t k = 0; k < sizeof(models) / sizeof(models[0]) && !moe_test_failed; k++) {
        char path[4096];
        if (model_path(path, sizeof(path), models[k]))
            continue;
        struct pair p;
        CHECK_MSG(open_pair(&p, path, 0) == 0, "%s", path);
        int32_t a[64], b[64];
        make_tokens(a, 42, 1, p.V);
        /* first: nothing cached; the warm model indexes the blocks */
        check_same(&p, a, 42, 0, 0, "first run");
        /* the same prompt: 40 tokens reused (blocks 0..9; 41 is the last) */
        check_same(&p, a, 42, 40, 40, "repeat");
        /* diverging at 18: blocks 0..3 (16 tokens) reused */
        memcpy(b, a, sizeof(b));
        make_tokens(b + 18, 20, 7, p.V);
        check_same(&p, b, 38, 16, 16, "diverging");
        /* a prompt of exactly whole blocks: the last block's token is run */
        check_same(&p, a, 40, 36, 36, "whole blocks");
        struct moe_kv_stats st;
        moe_model_kv_stats(p.warm, &st);
        printf("  %s: %llu lookups, %llu hits, %llu of %llu prompt tokens reused\n", models[k],
               (unsigned long long)st.lookups, (unsigned long long)st.hits,
               (unsigned long long)st.cached_tokens, (unsigned long long)st.prompt_tokens);
        CHECK_U64(st.cached_tokens, ==, 40 + 16 + 36);
        CHECK_INT(st.used, ==, 0);
        close_pair(&p);
    }
}

/* Sequences sharing one prefix of 24 tokens and diverging at different
 * points, run together in one batch while the first one (which computed
 * the prefix) still decodes; each equals its cold run. */
static void test_shared_batch(void)
{
    if (moe_test_ref_dir() == NULL)
        MOE_SKIP("shared/ref not found");
    enum { NS = 6 };
    for (size_t k = 0; k < sizeof(models) / sizeof(models[0]) && !moe_test_failed; k++) {
        char path[4096];
        if (model_path(path, sizeof(path), models[k]))
            continue;
        struct pair p;
        CHECK_MSG(open_pair(&p, path, 0) == 0, "%s", path);
        const size_t V = (size_t)p.V;
        int32_t tok[NS][64];
        int n[NS];
        struct moe_seq *s[NS], *c[NS];
        struct moe_diag d = { 0 };
        for (int i = 0; i < NS; i++) {
            make_tokens(tok[i], 64, 3, p.V);   /* the shared prefix */
            /* sequence i diverges at 8 + 4i (i = 0: never, within its 30 tokens) */
            if (i > 0)
                make_tokens(tok[i] + 8 + 4 * i, 64 - 8 - 4 * i, 100 + i, p.V);
            n[i] = 30;
            CHECK(moe_seq_create(&s[i], p.warm, &d) == 0 && moe_seq_create(&c[i], p.cold, &d) == 0);
        }
        /* sequence 0 runs its prompt first and keeps decoding */
        int cached[NS];
        float *wl = malloc(NS * (GEN + 1) * V * 4), *cl = malloc(NS * (GEN + 1) * V * 4);
        CHECK(moe_seq_begin(s[0], tok[0], n[0], n[0] + GEN, &cached[0], &d) == 0);
        CHECK_INT(cached[0], ==, 0);
        CHECK(moe_model_forward(p.warm, s[0], tok[0], n[0], wl, false, NULL, NULL, &d) == 0);
        for (int i = 1; i < NS; i++) {
            CHECK(moe_seq_begin(s[i], tok[i], n[i], n[i] + GEN, &cached[i], &d) == 0);
            /* the whole blocks before its divergence, from sequence 0's blocks */
            CHECK_MSG(cached[i] == (8 + 4 * i) / BT * BT, "sequence %d reused %d", i, cached[i]);
        }
        struct moe_kv_stats st;
        moe_model_kv_stats(p.warm, &st);
        int sum = 0;
        for (int i = 0; i < NS; i++)
            sum += (n[i] + GEN + BT - 1) / BT;
        /* shared blocks count once */
        CHECK_MSG(st.used + st.reserved < sum, "%d used + %d reserved, %d without sharing", st.used,
                  st.reserved, sum);
        /* one batch: sequences 1.. their remaining prompts, sequence 0 a token */
        int32_t next[NS];
        next[0] = argmax(wl, p.V);
        struct moe_batch_seg segs[NS];
        segs[0] = (struct moe_batch_seg){ .seq = s[0], .tokens = &next[0], .n = 1, .logits = wl };
        for (int i = 1; i < NS; i++)
            segs[i] = (struct moe_batch_seg){ .seq = s[i], .tokens = tok[i] + cached[i],
                                              .n = n[i] - cached[i], .logits = wl + (size_t)i * V };
        CHECK_MSG(moe_model_forward_multi(p.warm, segs, NS, &d) == 0, "%s", d.msg);
        for (int g = 0; g < GEN; g++) {
            for (int i = 0; i < NS; i++) {
                next[i] = argmax(wl + ((size_t)g * NS + (size_t)i) * V, p.V);
                segs[i] = (struct moe_batch_seg){ .seq = s[i], .tokens = &next[i], .n = 1,
                                                  .logits = wl + ((size_t)(g + 1) * NS + (size_t)i) * V };
            }
            if (g < GEN - 1)
                CHECK_MSG(moe_model_forward_multi(p.warm, segs, NS, &d) == 0, "%s", d.msg);
        }
        /* cold: each alone, the same tokens */
        for (int i = 0; i < NS; i++) {
            int cc;
            CHECK(moe_seq_begin(c[i], tok[i], n[i], n[i] + GEN, &cc, &d) == 0 && cc == 0);
            float *l0 = cl + (size_t)i * V;
            CHECK(moe_model_forward(p.cold, c[i], tok[i], n[i], l0, false, NULL, NULL, &d) == 0);
            int32_t t = argmax(l0, p.V);
            if (i == 0) {   /* its first greedy step ran in the batch */
                CHECK(moe_model_forward(p.cold, c[i], &t, 1, l0, false, NULL, NULL, &d) == 0);
                t = argmax(l0, p.V);
            }
            for (int g = 0; g < GEN - 1; g++) {
                float *lg = cl + ((size_t)(g + 1) * NS + (size_t)i) * V;
                CHECK(moe_model_forward(p.cold, c[i], &t, 1, lg, false, NULL, NULL, &d) == 0);
                t = argmax(lg, p.V);
            }
        }
        for (int i = 0; i < NS; i++)
            for (int g = 0; g < GEN; g++)
                CHECK_MSG(memcmp(wl + ((size_t)g * NS + (size_t)i) * V, cl + ((size_t)g * NS + (size_t)i) * V,
                                 V * 4) == 0, "%s: sequence %d step %d differs", models[k], i, g);
        printf("  %s: %d sequences sharing a prefix (reused %d %d %d %d %d tokens) identical\n",
               models[k], NS, cached[1], cached[2], cached[3], cached[4], cached[5]);
        for (int i = 0; i < NS; i++) {
            moe_seq_free(s[i]);
            moe_seq_free(c[i]);
        }
        moe_model_kv_stats(p.warm, &st);
        CHECK_INT(st.used, ==, 0);
        CHECK_INT(st.reserved, ==, 0);
        free(wl);
        free(cl);
        close_pair(&p);
    }
}

/* A pool of 16 blocks (64 tokens): a held sequence's blocks survive other
 * prompts that cycle through the rest of the pool; an idle cached prompt is
 * evicted; results equal cold runs throughout. */
static void test_eviction(void)
{
    if (moe_test_ref_dir() == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096];
    snprintf(path, sizeof(path), "%s/models/tiny-mixtral-F32.gguf", moe_test_ref_dir());
    struct pair p;
    CHECK(open_pair(&p, path, 16 * BT) == 0);
    const size_t V = (size_t)p.V;
    struct moe_diag d = { 0 };
    int32_t x[32], h[32], y[8][32];
    make_tokens(x, 21, 11, p.V);
    make_tokens(h, 21, 12, p.V);
    for (int i = 0; i < 8; i++)
        make_tokens(y[i], 21, 20 + i, p.V);
    /* x: run once, released: 5 idle cached blocks */
    check_same(&p, x, 21, 0, 0, "x cold");
    struct moe_kv_stats st;
    moe_model_kv_stats(p.warm, &st);
    CHECK_INT(st.cached, >=, 5);
    /* h: held (prompt run, 6 blocks reserved and taken) while others cycle */
    struct moe_seq *held;
    int hc;
    CHECK(moe_seq_create(&held, p.warm, &d) == 0);
    CHECK(moe_seq_begin(held, h, 21, 21 + GEN, &hc, &d) == 0 && hc == 0);
    float *hl = malloc(V * 4);
    CHECK(moe_model_forward(p.warm, held, h, 21, hl, false, NULL, NULL, &d) == 0);
    /* 8 prompts of 7 blocks each through the other 9 blocks: x's go, and
     * every idle block is reused again and again */
    for (int i = 0; i < 8 && !moe_test_failed; i++)
        check_same(&p, y[i], 21, 0, 0, "pressure");
    moe_model_kv_stats(p.warm, &st);
    printf("  after the pressure: %llu evictions, %d cached, %d used\n",
           (unsigned long long)st.evictions, st.cached, st.used);
    CHECK(st.evictions >= 5);
    /* a request that cannot be reserved beside the held one waits */
    struct moe_seq *big;
    int bc;
    int32_t z[64];
    make_tokens(z, 64, 99, p.V);
    CHECK(moe_seq_create(&big, p.warm, &d) == 0);
    CHECK_INT(moe_seq_begin(big, z, 40, 60, &bc, &d), ==, -EAGAIN);
    CHECK_INT(moe_seq_begin(big, z, 60, 70, &bc, &d), ==, MOE_ELIMIT);   /* more than the pool */
    CHECK_MSG(strstr(d.msg, "the pool holds 16"), "%s", d.msg);
    moe_seq_free(big);
    /* x again: evicted, so run cold, and identical */
    check_same(&p, x, 21, 0, 0, "x after eviction");
    /* the held sequence: its blocks were never taken, it decodes as cold */
    struct moe_seq *hc_seq;
    float *gw = malloc(GEN * V * 4), *gc = malloc(GEN * V * 4), *lc = malloc(V * 4);
    CHECK(moe_seq_create(&hc_seq, p.cold, &d) == 0);
    CHECK(moe_model_forward(p.cold, hc_seq, h, 21, lc, false, NULL, NULL, &d) == 0);
    CHECK(memcmp(hl, lc, V * 4) == 0);
    int32_t tw = argmax(hl, p.V), tc = tw;
    for (int g = 0; g < GEN; g++) {
        CHECK(moe_model_forward(p.warm, held, &tw, 1, gw + (size_t)g * V, false, NULL, NULL, &d) == 0);
        CHECK(moe_model_forward(p.cold, hc_seq, &tc, 1, gc + (size_t)g * V, false, NULL, NULL, &d) == 0);
        tw = argmax(gw + (size_t)g * V, p.V);
        tc = argmax(gc + (size_t)g * V, p.V);
    }
    CHECK_MSG(memcmp(gw, gc, GEN * V * 4) == 0, "the held sequence's decode differs");
    moe_seq_free(held);
    moe_seq_free(hc_seq);
    moe_model_kv_stats(p.warm, &st);
    CHECK_INT(st.used, ==, 0);
    CHECK_INT(st.reserved, ==, 0);
    CHECK_INT(st.free + st.cached, ==, st.n_blocks);
    free(hl);
    free(gw);
    free(gc);
    free(lc);
    close_pair(&p);
}

int main(void)
{
    MOE_TEST_RUN(test_repeat_and_diverge);
    MOE_TEST_RUN(test_shared_batch);
    MOE_TEST_RUN(test_eviction);
    return moe_test_exit_code();
}

/* The paged KV pool's bookkeeping (model/kv.h) against a model: random
 * sequences start over prompts that share prefixes, look them up, reserve,
 * grow, publish their full blocks and end, on pools small enough that
 * eviction is constant. A shadow of every block's references, the index
 * and the LRU order says what each call must do: no block with references
 * is ever handed out or evicted, an eviction takes the least recently
 * released cached block and only when no free block is left, lookups find
 * exactly the published blocks, and at the end every block is free or
 * cached (no leak). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/rng.h"
#include "model/kv.h"
#include "tests/harness.h"

#define MAXB 64        /* blocks */
#define BT 4           /* tokens per block */
#define MAXS 6         /* sequences */
#define MAXT (16 * BT) /* tokens per sequence */

struct shadow {
    int ref[MAXB];
    bool indexed[MAXB];
    uint64_t hash[MAXB], parent[MAXB];
    int32_t toks[MAXB][BT];
    uint64_t released[MAXB];   /* when the last reference went (LRU order) */
    int reserved;
    uint64_t clock;
};

struct sim_seq {
    bool live;
    int32_t toks[MAXT];
    int n_tok;                 /* tokens whose rows are allocated */
    int blocks[MAXT / BT];
    int n_blocks, n_pub, reserved;
    uint64_t hashes[MAXT / BT];
};

static uint64_t rs[4];

static int rnd(int n)
{
    return (int)(moe_xoshiro256ss(rs) % (uint64_t)n);
}

static int shadow_available(const struct shadow *sh, int n_blocks)
{
    int busy = 0;
    for (int i = 0; i < n_blocks; i++)
        busy += sh->ref[i] > 0;
    return n_blocks - busy - sh->reserved;
}

static void shadow_unref(struct shadow *sh, int id)
{
    if (--sh->ref[id] == 0)
        sh->released[id] = ++sh->clock;
}

/* The block the pool must hand out next: a free one if any (which one is
 * the pool's choice), else the least recently released cached one. */
static int expected_victim(const struct shadow *sh, int n_blocks, bool *any_free)
{
    int best = -1;
    *any_free = false;
    for (int i = 0; i < n_blocks; i++) {
        if (sh->ref[i] > 0)
            continue;
        if (!sh->indexed[i])
            *any_free = true;
        else if (best < 0 || sh->released[i] < sh->released[best])
            best = i;
    }
    return best;
}

static void check_alloc(struct moe_kv_pool *p, struct shadow *sh, int n_blocks, int id)
{
    bool any_free;
    const int victim = expected_victim(sh, n_blocks, &any_free);
    CHECK_MSG(id >= 0 && id < n_blocks, "alloc gave %d", id);
    CHECK_MSG(sh->ref[id] == 0, "alloc gave block %d, which has %d references", id, sh->ref[id]);
    if (any_free)
        CHECK_MSG(!sh->indexed[id], "alloc evicted block %d while a free block was left", id);
    else
        CHECK_MSG(id == victim, "alloc evicted block %d, the least recently used is %d", id, victim);
    sh->indexed[id] = false;
    sh->ref[id] = 1;
    CHECK_INT(moe_kv_pool_refs(p, id), ==, 1);
}

static void release(struct moe_kv_pool *p, struct shadow *sh, struct sim_seq *s)
{
    for (int b = 0; b < s->n_blocks; b++) {
        moe_kv_pool_unref(p, s->blocks[b]);
        shadow_unref(sh, s->blocks[b]);
    }
    CHECK(moe_kv_pool_reserve(p, -s->reserved));
    sh->reserved -= s->reserved;
    memset(s, 0, sizeof(*s));
}

static void run_sim(uint64_t seed, int n_blocks, int steps)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        rs[i] = moe_splitmix64(&x);
    struct moe_kv_pool *p;
    CHECK(moe_kv_pool_create(&p, n_blocks, BT) == 0);
    static struct shadow sh;
    static struct sim_seq seqs[MAXS];
    memset(&sh, 0, sizeof(sh));
    memset(seqs, 0, sizeof(seqs));
    /* three shared prefixes of 8 blocks; tokens from a small alphabet */
    int32_t prefix[3][MAXT];
    for (int k = 0; k < 3; k++)
        for (int t = 0; t < MAXT; t++)
            prefix[k][t] = rnd(5);
    struct moe_diag d = { 0 };
    int evictions = 0, hits = 0;
    for (int step = 0; step < steps; step++) {
        struct sim_seq *s = &seqs[rnd(MAXS)];
        const int op = rnd(10);
        if (!s->live) {
            /* start: a prompt sharing 0..all of a prefix, then its own tokens */
            const int k = rnd(3), share = rnd(MAXT), n = 1 + rnd(MAXT - 1);
            for (int t = 0; t < n; t++)
                s->toks[t] = t < share ? prefix[k][t] : rnd(5);
            uint64_t parent = 0;
            int matched[MAXT / BT], m = 0, idle = 0;
            for (int b = 0; (b + 1) * BT <= n - 1; b++) {
                const uint64_t h = moe_kv_chain_hash(parent, s->toks + b * BT, BT);
                const int id = moe_kv_pool_lookup(p, h, parent, s->toks + b * BT);
                int want = -1;
                for (int i = 0; i < n_blocks && want < 0; i++)
                    if (sh.indexed[i] && sh.hash[i] == h && sh.parent[i] == parent &&
                        memcmp(sh.toks[i], s->toks + b * BT, sizeof(sh.toks[i])) == 0)
                        want = i;
                CHECK_MSG(id == want, "lookup of block %d gave %d, published: %d", b, id, want);
                if (id < 0)
                    break;
                s->hashes[m] = h;
                matched[m++] = id;
                idle += sh.ref[id] == 0;
                parent = h;
            }
            const int need = (n + 8 + BT - 1) / BT - m;   /* the prompt and 8 more tokens */
            const bool ok = shadow_available(&sh, n_blocks) - idle >= need;
            if (!ok)
                continue;   /* the engine would wait */
            for (int i = 0; i < m; i++) {
                moe_kv_pool_ref(p, matched[i]);
                sh.ref[matched[i]]++;
                s->blocks[i] = matched[i];
            }
            CHECK(moe_kv_pool_reserve(p, need));
            sh.reserved += need;
            hits += m > 0;
            s->live = true;
            s->reserved = need;
            s->n_blocks = s->n_pub = m;
            s->n_tok = m * BT;
            /* the rest of the prompt is "run": its tokens take rows */
            while (s->n_tok < n) {
                if (s->n_tok == s->n_blocks * BT) {
                    const int id = moe_kv_pool_alloc(p, true);
                    check_alloc(p, &sh, n_blocks, id);
                    if (moe_test_failed)
                        return;
                    s->reserved--;
                    sh.reserved--;
                    s->blocks[s->n_blocks++] = id;
                }
                s->n_tok++;
            }
        } else if (op < 5 && s->n_tok < MAXT) {
            /* grow by one token: from the reservation, else unreserved */
            s->toks[s->n_tok] = rnd(5);
            if (s->n_tok == s->n_blocks * BT) {
                const bool res = s->reserved > 0;
                const int avail = shadow_available(&sh, n_blocks);
                const int id = moe_kv_pool_alloc(p, res);
                if (!res && avail <= 0) {
                    CHECK_MSG(id == -1, "unreserved alloc gave %d with nothing available", id);
                    continue;
                }
                bool any_free;
                const bool evicts = !(expected_victim(&sh, n_blocks, &any_free), any_free);
                check_alloc(p, &sh, n_blocks, id);
                if (moe_test_failed)
                    return;
                evictions += evicts;
                if (res) {
                    s->reserved--;
                    sh.reserved--;
                }
                s->blocks[s->n_blocks++] = id;
            }
            s->n_tok++;
        } else if (op < 8) {
            /* publish the full blocks not yet offered */
            for (; (s->n_pub + 1) * BT <= s->n_tok; s->n_pub++) {
                const int b = s->n_pub, id = s->blocks[b];
                const uint64_t parent = b ? s->hashes[b - 1] : 0;
                const uint64_t h = moe_kv_chain_hash(parent, s->toks + b * BT, BT);
                s->hashes[b] = h;
                if (sh.indexed[id])
                    continue;   /* a reused block */
                bool dup = false;
                for (int i = 0; i < n_blocks; i++)
                    dup |= sh.indexed[i] && sh.hash[i] == h && sh.parent[i] == parent &&
                           memcmp(sh.toks[i], s->toks + b * BT, sizeof(sh.toks[i])) == 0;
                const bool put = moe_kv_pool_publish(p, id, h, parent, s->toks + b * BT);
                CHECK_MSG(put == !dup, "publish of block %d: %d, a duplicate: %d", id, put, dup);
                if (put) {
                    sh.indexed[id] = true;
                    sh.hash[id] = h;
                    sh.parent[id] = parent;
                    memcpy(sh.toks[id], s->toks + b * BT, sizeof(sh.toks[id]));
                }
            }
        } else {
            release(p, &sh, s);
        }
        CHECK_MSG(moe_kv_pool_check(p, &d) == 0, "step %d: %s", step, d.msg);
        CHECK_INT(moe_kv_pool_available(p), ==, shadow_available(&sh, n_blocks));
        for (int i = 0; i < n_blocks; i++)
            CHECK_INT(moe_kv_pool_refs(p, i), ==, sh.ref[i]);
    }
    for (int i = 0; i < MAXS; i++)
        if (seqs[i].live)
            release(p, &sh, &seqs[i]);
    struct moe_kv_stats st;
    moe_kv_pool_stats(p, &st);
    CHECK_MSG(moe_kv_pool_check(p, &d) == 0, "%s", d.msg);
    CHECK_INT(st.used, ==, 0);
    CHECK_INT(st.reserved, ==, 0);
    CHECK_INT(st.free + st.cached, ==, n_blocks);
    CHECK_INT(moe_kv_pool_available(p), ==, n_blocks);
    CHECK_U64(st.evictions, >=, (uint64_t)evictions);
    printf("  seed %llu, %d blocks: %d prefix hits, %llu evictions, %d cached at the end\n",
           (unsigned long long)seed, n_blocks, hits, (unsigned long long)st.evictions, st.cached);
    /* the sequences shared prefixes and the pool ran out: both paths ran */
    CHECK(hits > 0 && st.evictions > 0);
    moe_kv_pool_destroy(p);
}

static void test_random_small(void) { run_sim(1, 12, 20000); }
static void test_random_medium(void) { run_sim(2, 40, 20000); }
static void test_random_seeds(void)
{
    for (uint64_t seed = 3; seed < 13 && !moe_test_failed; seed++)
        run_sim(seed, 16 + (int)seed, 5000);
}

static void test_bad_args(void)
{
    struct moe_kv_pool *p = (struct moe_kv_pool *)1;
    CHECK_INT(moe_kv_pool_create(&p, 0, 16), ==, -EINVAL);
    CHECK(p == NULL);
    CHECK_INT(moe_kv_pool_create(&p, 4, 0), ==, -EINVAL);
    CHECK(moe_kv_pool_create(&p, 2, 1) == 0);
    CHECK(!moe_kv_pool_reserve(p, 3));
    CHECK(moe_kv_pool_reserve(p, 2));
    CHECK_INT(moe_kv_pool_alloc(p, false), ==, -1);   /* everything is promised */
    CHECK(moe_kv_pool_alloc(p, true) >= 0);
    moe_kv_pool_destroy(p);
    moe_kv_pool_destroy(NULL);
}

int main(void)
{
    MOE_TEST_RUN(test_bad_args);
    MOE_TEST_RUN(test_random_small);
    MOE_TEST_RUN(test_random_medium);
    MOE_TEST_RUN(test_random_seeds);
    return moe_test_exit_code();
}

/* Cache simulation: trace parsing (both formats, bad lines named), LRU and
 * LFU against naive reference implementations, Belady against an
 * exhaustive search for the optimum on small random traces (it must be
 * exact), and the policies on the real gemma trace of shared/traces. */
#include <math.h>
#include <stdlib.h>

#include "cache/sim.h"
#include "common/error.h"
#include "tests/harness.h"

static uint64_t rng = 0x1234567;

static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng % n);
}

static void make_trace(struct moe_trace *t, int n, int n_keys)
{
    t->n_layer = 1;
    t->n_expert = n_keys;
    t->n_expert_used = 1;
    t->n = n;
    t->a = calloc((size_t)n, sizeof(struct moe_access));
    for (int i = 0; i < n; i++) {
        t->a[i].layer = 0;
        t->a[i].expert = (int32_t)rnd((uint32_t)n_keys);
        t->a[i].step = i;
    }
}

/* reference LRU: a recency list */
static int64_t ref_lru(const struct moe_trace *t, int cap)
{
    int list[64], n = 0;
    int64_t hits = 0;
    for (int64_t i = 0; i < t->n; i++) {
        int k = t->a[i].expert, pos = -1;
        for (int j = 0; j < n; j++)
            if (list[j] == k)
                pos = j;
        if (pos >= 0) {
            hits++;
            memmove(&list[pos], &list[pos + 1], (size_t)(n - pos - 1) * sizeof(int));
            n--;
        } else if (n == cap) {
            memmove(&list[0], &list[1], (size_t)(n - 1) * sizeof(int)); /* drop the oldest */
            n--;
        }
        list[n++] = k;
    }
    return hits;
}

/* exhaustive optimum: try every victim at every miss */
static int64_t best_hits(const struct moe_trace *t, int64_t i, int *cache, int n, int cap)
{
    if (i == t->n)
        return 0;
    int k = t->a[i].expert;
    for (int j = 0; j < n; j++)
        if (cache[j] == k)
            return 1 + best_hits(t, i + 1, cache, n, cap);
    if (n < cap) {
        cache[n] = k;
        return best_hits(t, i + 1, cache, n + 1, cap);
    }
    int64_t best = -1;
    for (int v = 0; v < n; v++) {
        int saved = cache[v];
        cache[v] = k;
        int64_t h = best_hits(t, i + 1, cache, n, cap);
        if (h > best)
            best = h;
        cache[v] = saved;
    }
    return best;
}

static void test_belady_is_optimal_and_lru_exact(void)
{
    for (int rep = 0; rep < 300; rep++) {
        struct moe_trace t;
        int n_keys = 2 + (int)rnd(4), n = 4 + (int)rnd(9), cap = 1 + (int)rnd(3);
        make_trace(&t, n, n_keys);
        struct moe_sim_result r;
        CHECK(moe_cache_sim(&t, MOE_POLICY_BELADY, cap, NULL, &r) == 0);
        int cache[8];
        int64_t opt = best_hits(&t, 0, cache, 0, cap);
        CHECK_MSG(r.hits == opt, "rep %d: belady %lld, optimum %lld", rep, (long long)r.hits, (long long)opt);
        CHECK(moe_cache_sim(&t, MOE_POLICY_LRU, cap, NULL, &r) == 0);
        CHECK_INT(r.hits, ==, ref_lru(&t, cap));
        for (int p = MOE_POLICY_LRU; p <= MOE_POLICY_LAYER; p++) {
            CHECK(moe_cache_sim(&t, (enum moe_policy_kind)p, cap, NULL, &r) == 0);
            CHECK(r.hits <= opt && r.accesses == n);
        }
        free(t.a);
    }
}

/* reference LFU with the same decay and tie rule (least recent first) */
static void test_lfu_matches_reference(void)
{
    for (int rep = 0; rep < 100; rep++) {
        struct moe_trace t;
        int n_keys = 3 + (int)rnd(5), n = 30, cap = 2 + (int)rnd(2);
        make_trace(&t, n, n_keys);
        double cnt[16] = { 0 };
        int stamp[16] = { 0 }, inc[16], nc = 0;
        int64_t last[16] = { 0 }, hits = 0;
        for (int i = 0; i < n; i++) {
            int k = t.a[i].expert, found = 0;
            for (int j = 0; j < nc; j++)
                found |= inc[j] == k;
            if (found) {
                hits++;
            } else if (nc < cap) {
                inc[nc++] = k;
            } else {
                int v = 0;
                double vb = INFINITY;
                for (int j = 0; j < nc; j++) {
                    double c = cnt[inc[j]] * pow(0.9, i - stamp[inc[j]]);
                    if (c < vb || (c == vb && last[inc[j]] < last[inc[v]])) {
                        vb = c;
                        v = j;
                    }
                }
                inc[v] = k;
            }
            cnt[k] = cnt[k] * pow(0.9, i - stamp[k]) + 1.0;
            stamp[k] = i;
            last[k] = i;
        }
        struct moe_sim_result r;
        CHECK(moe_cache_sim(&t, MOE_POLICY_LFU, cap, NULL, &r) == 0);
        CHECK_INT(r.hits, ==, hits);
        free(t.a);
    }
}

static void test_parse_formats(void)
{
    static const char csv[] =
        "# route_trace v1\n# model=x arch=y n_layer=2 n_expert=4 n_expert_used=2\n"
        "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n"
        "0,1,0,0,0,3,0.6,0,100\n0,1,0,0,1,1,0.4,0,100\n0,1,0,1,0,2,0.7,0,100\n"
        "0,1,1,0,0,3,0.9,1,0\r\n";
    struct moe_trace t;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_trace_parse(&t, csv, sizeof(csv) - 1, "t.csv", &d) == 0, "%s", d.msg);
    CHECK(t.n == 4 && t.n_layer == 2 && t.n_expert == 4 && t.n_expert_used == 2);
    CHECK(t.a[2].layer == 1 && t.a[2].expert == 2 && t.a[3].step == 1 && t.a[0].step == 0);
    moe_trace_free(&t);
    static const char own[] = "0 0 5:0.7 2:0.3\n0 1 1:0.5 0:0.5\n1 0 5:0.6 4:0.4\n";
    CHECK_MSG(moe_trace_parse(&t, own, sizeof(own) - 1, "t.txt", &d) == 0, "%s", d.msg);
    CHECK(t.n == 6 && t.n_layer == 2 && t.n_expert == 6 && t.a[4].expert == 5 && t.a[4].step == 1);
    moe_trace_free(&t);
    static const char *const bad[] = {
        "0 0 5:0.7 x:0.3\n", "0 0\n", "zero 0 1:1\n", "0 0 5\n", "0 99999 1:1\n", "",
        "# route_trace v1\nturn,phase\n0,1,0,0,0\n", "# n_layer=1 n_expert=2\n0 0 7:1\n",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        moe_diag_clear(&d);
        CHECK_MSG(moe_trace_parse(&t, bad[i], strlen(bad[i]), "bad.txt", &d) == MOE_EFORMAT,
                  "case %zu accepted", i);
        CHECK(strstr(d.msg, "bad.txt") != NULL);
    }
    CHECK(moe_trace_load(&t, "/nonexistent/trace", &d) != 0);
}

static void test_gemma_trace(void)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        MOE_SKIP("shared/ref not found");
    char path[4096];
    snprintf(path, sizeof(path), "%s/../traces/gemma.route.csv", ref);
    struct moe_trace t;
    struct moe_diag d = { 0 };
    CHECK_MSG(moe_trace_load(&t, path, &d) == 0, "%s", d.msg);
    CHECK(t.n_layer == 30 && t.n_expert == 128 && t.n == 28260);
    const int cap = 30 * 128 / 10;
    struct moe_sim_result b, r;
    CHECK(moe_cache_sim(&t, MOE_POLICY_BELADY, cap, NULL, &b) == 0);
    for (int p = MOE_POLICY_LRU; p <= MOE_POLICY_LAYER; p++) {
        CHECK(moe_cache_sim(&t, (enum moe_policy_kind)p, cap, NULL, &r) == 0);
        printf("  10%%: %s %.4f = %.3f of belady %.4f\n", moe_policy_name((enum moe_policy_kind)p),
               r.hit_rate, r.hit_rate / b.hit_rate, b.hit_rate);
        CHECK(r.hits <= b.hits);
        if (p == MOE_POLICY_LAYER)
            CHECK(r.hit_rate >= 0.78 * b.hit_rate); /* regression guard, see doc/cache.md */
    }
    moe_trace_free(&t);
}

int main(void)
{
    MOE_TEST_RUN(test_belady_is_optimal_and_lru_exact);
    MOE_TEST_RUN(test_lfu_matches_reference);
    MOE_TEST_RUN(test_parse_formats);
    MOE_TEST_RUN(test_gemma_trace);
    return moe_test_exit_code();
}

/* Host tier: byte budget, LRU order, pinned entries never evicted, and a
 * randomized run against a plain model of the LRU. */
#include <errno.h>
#include <stdlib.h>

#include "cache/host_tier.h"
#include "common/alloc.h"
#include "tests/harness.h"

static void fill(struct moe_host_tier *t, uint32_t l, uint32_t e, size_t n)
{
    void *b = NULL;
    if (moe_host_tier_reserve(t, l, e, n, &b) == 0) {
        memset(b, (int)(l * 16 + e), n);
        moe_host_tier_commit(t, l, e, true);
    }
}

static void test_lru_and_budget(void)
{
    struct moe_host_tier *t = NULL;
    CHECK(moe_host_tier_create(&t, 3000, NULL) == 0);
    fill(t, 0, 0, 1000);
    fill(t, 0, 1, 1000);
    fill(t, 0, 2, 1000);
    const void *d;
    size_t n;
    CHECK(moe_host_tier_acquire(t, 0, 0, &d, &n));  /* (0,0) becomes most recent */
    CHECK(n == 1000 && ((const uint8_t *)d)[999] == 0);
    moe_host_tier_release(t, 0, 0);
    fill(t, 0, 3, 1000);                           /* evicts (0,1), the LRU */
    CHECK(!moe_host_tier_acquire(t, 0, 1, &d, &n));
    CHECK(moe_host_tier_acquire(t, 0, 2, &d, &n));  /* pinned from here */
    fill(t, 0, 4, 2000);                           /* evicts (0,0) and (0,3), not (0,2) */
    CHECK(!moe_host_tier_acquire(t, 0, 0, &d, &n));
    CHECK(!moe_host_tier_acquire(t, 0, 3, &d, &n));
    void *b;
    CHECK(moe_host_tier_acquire(t, 0, 4, &d, &n));
    CHECK_INT(moe_host_tier_reserve(t, 1, 0, 1500, &b), ==, MOE_ELIMIT); /* all pinned */
    moe_host_tier_release(t, 0, 4);
    CHECK_INT(moe_host_tier_reserve(t, 1, 0, 4000, &b), ==, MOE_ELIMIT);
    CHECK_INT(moe_host_tier_reserve(t, 0, 4, 10, &b), ==, -EEXIST);
    moe_host_tier_release(t, 0, 2);
    /* a failed load leaves nothing (and (0,2), now the LRU, made room) */
    CHECK(moe_host_tier_reserve(t, 2, 0, 500, &b) == 0);
    CHECK_INT(moe_host_tier_reserve(t, 2, 0, 500, &b), ==, -EEXIST); /* being filled */
    CHECK(!moe_host_tier_acquire(t, 2, 0, &d, &n));                  /* not visible yet */
    moe_host_tier_commit(t, 2, 0, false);
    CHECK(!moe_host_tier_acquire(t, 2, 0, &d, &n));
    struct moe_host_tier_stats st;
    moe_host_tier_stats(t, &st);
    CHECK_U64(st.used_bytes, ==, 2000);
    CHECK_INT(st.n_entries, ==, 1);
    CHECK_INT(st.n_pinned, ==, 0);
    CHECK_U64(st.evictions, ==, 4);
    moe_host_tier_set_budget(t, 1000);
    moe_host_tier_stats(t, &st);
    CHECK(st.used_bytes <= 1000);
    moe_host_tier_destroy(t);
}

/* Model: arrays of present/size/last-use; pins held at random. */
static void test_randomized_against_model(void)
{
    enum { K = 24 };
    struct moe_host_tier *t = NULL;
    const size_t budget = 10000;
    CHECK(moe_host_tier_create(&t, budget, NULL) == 0);
    int pins[K] = {0};
    uint64_t rng = 12345;
    for (int step = 0; step < 20000; step++) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        unsigned k = (unsigned)(rng >> 33) % K, op = (unsigned)(rng >> 50) % 3;
        const void *d;
        size_t n;
        if (op == 0) {
            if (moe_host_tier_acquire(t, k / 8, k % 8, &d, &n)) {
                CHECK(((const uint8_t *)d)[0] == (uint8_t)((k / 8) * 16 + k % 8));
                CHECK(n == 300 + 100 * k);
                pins[k]++;
            }
        } else if (op == 1) {
            if (pins[k]) {
                moe_host_tier_release(t, k / 8, k % 8);
                pins[k]--;
            }
        } else {
            void *b;
            int rc = moe_host_tier_reserve(t, k / 8, k % 8, 300 + 100 * k, &b);
            CHECK(rc == 0 || rc == -EEXIST || rc == MOE_ELIMIT);
            if (rc == 0) {
                memset(b, (int)((k / 8) * 16 + k % 8), 300 + 100 * k);
                moe_host_tier_commit(t, k / 8, k % 8, (rng & 1) != 0);
            }
        }
        /* invariants: budget held; every pinned key is still present */
        struct moe_host_tier_stats st;
        moe_host_tier_stats(t, &st);
        CHECK(st.used_bytes <= budget);
        for (unsigned j = 0; j < K; j++)
            if (pins[j]) {
                CHECK(moe_host_tier_acquire(t, j / 8, j % 8, &d, &n));
                moe_host_tier_release(t, j / 8, j % 8);
            }
    }
    for (unsigned j = 0; j < K; j++)
        while (pins[j]--)
            moe_host_tier_release(t, j / 8, j % 8);
    long live = moe_alloc_live();
    moe_host_tier_destroy(t);
    CHECK(moe_alloc_live() < live);
}

int main(void)
{
    MOE_TEST_RUN(test_lru_and_budget);
    MOE_TEST_RUN(test_randomized_against_model);
    return moe_test_exit_code();
}

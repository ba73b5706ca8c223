/* The expert cache's invariants under random load (shared/RELIABILITY.md
 * row 20): random sequences of acquire / wait / release / prefetch /
 * cancel-stale (and so evictions) over random budgets,
 * checked against a simple model of what is pinned. A pinned expert's bytes
 * never change while pinned (it is never evicted or overwritten), every
 * ready expert holds exactly its own bytes (no completion lands in a reused
 * slot), -EAGAIN only happens when every slot is pinned, and nothing stays
 * pinned at the end. Experts come from a small generated model through the
 * real expert source (io_uring or pread). */
#include <errno.h>
#include <stdlib.h>
#include <sys/wait.h>

#include "cache/expert_cache.h"
#include "io/expert_src.h"
#include "kernels/backend.h"
#include "tests/harness.h"

#define MAXK 256

static void run(int use_pread)
{
    const char *gen = getenv("MOE_GEN");
    if (gen == NULL)
        MOE_SKIP("MOE_GEN not set");
    char path[4096], cmd[8192];
    snprintf(path, sizeof(path), "%s/m.gguf", moe_test_tmpdir());
    snprintf(cmd, sizeof(cmd), "%s --arch llama --n-embd 64 --n-layer 3 --n-head 2 --n-head-kv 1"
             " --head-dim 32 --n-expert 8 --n-expert-used 2 --n-ff-exp 64 --type Q8_0 --quiet -o %s",
             gen, path);
    CHECK(system(cmd) == 0);
    struct moe_diag d = { 0 };
    struct moe_io_config io = { .uring = { .force_pread = use_pread } };
    struct moe_expert_src *src;
    CHECK_MSG(moe_expert_src_open(&src, path, &io, &d) == 0, "%s", d.msg);
    const int L = (int)moe_expert_src_n_layer(src), E = (int)moe_expert_src_n_expert(src);
    size_t slot = 0;
    for (int l = 0; l < L; l++)
        if (moe_expert_src_layout(src, (uint32_t)l)->raw_size > slot)
            slot = (size_t)moe_expert_src_layout(src, (uint32_t)l)->raw_size;
    /* reference bytes of every expert */
    uint8_t *ref[MAXK];
    for (int k = 0; k < L * E; k++) {
        ref[k] = calloc(1, slot);
        size_t n = (size_t)moe_expert_src_layout(src, (uint32_t)(k / E))->raw_size;
        CHECK(moe_expert_src_load_sync(src, (uint32_t)(k / E), (uint32_t)(k % E), ref[k], n, &d) == 0);
    }
    struct moe_backend *be;
    CHECK(moe_backend_cpu_create(&be, 1, &d) == 0);
    unsigned seed = 1234u + (unsigned)use_pread;
    long ops = 0, again = 0, waits = 0, prefetches = 0, cancels = 0;
    for (int round = 0; round < 12; round++) {
        const int n_slots = 1 + (int)(rand_r(&seed) % 10);
        struct moe_expert_cache *c;
        CHECK_MSG(moe_expert_cache_create(&c, src, be, slot, n_slots,
                                          (enum moe_policy_kind)(rand_r(&seed) % 3), &d) == 0, "%s", d.msg);
        int pins[MAXK] = { 0 }, loading[MAXK] = { 0 }, n_pinned_keys = 0;
        const uint8_t *ptr[MAXK] = { 0 };
        for (int step = 0; step < 400; step++, ops++) {
            const int k = (int)(rand_r(&seed) % (unsigned)(L * E)), op = (int)(rand_r(&seed) % 12);
            if (op == 10) { /* prefetch: never evicts a pinned expert */
                int r = moe_expert_cache_prefetch(c, k / E, k % E, step, 1 + (int)(rand_r(&seed) % 3));
                CHECK_MSG(r >= 0, "prefetch: %d", r);
                prefetches += r == 1;
                continue;
            }
            if (op == 11) { /* drop stale queued prefetches */
                cancels += moe_expert_cache_cancel_stale(c, (int)(rand_r(&seed) % (unsigned)L));
                continue;
            }
            if (op < 5) { /* acquire */
                const uint8_t *data = NULL;
                int r = moe_expert_cache_acquire(c, k / E, k % E, step, &data, &d);
                if (r == -EAGAIN) {
                    again++;
                    /* only when every slot is held by a pinned expert, or by a
                     * prefetch in flight (at most a quarter of the slots) */
                    const int pf_share = n_slots / 4 > 0 ? n_slots / 4 : 1;
                    CHECK_MSG(n_pinned_keys >= n_slots - pf_share, "EAGAIN with %d of %d slots"
                              " pinned", n_pinned_keys, n_slots);
                    continue;
                }
                CHECK_MSG(r == 0 || r == 1, "acquire: %d %s", r, d.msg);
                if (pins[k]++ == 0)
                    n_pinned_keys++;
                if (r == 1) {
                    CHECK(loading[k] == 0 || ptr[k] == NULL || ptr[k] == data);
                    ptr[k] = data;
                } else {
                    loading[k] = 1;
                }
            } else if (op < 7) { /* wait for one loading expert */
                int32_t wl[MAXK], we[MAXK], ix[MAXK], n = 0;
                for (int j = 0; j < L * E; j++)
                    if (pins[j] && loading[j]) {
                        wl[n] = j / E;
                        we[n] = j % E;
                        ix[n++] = j;
                    }
                if (n == 0)
                    continue;
                int which = -1;
                const uint8_t *data = NULL;
                CHECK_MSG(moe_expert_cache_wait_any(c, wl, we, n, &which, &data, &d) == 0, "%s", d.msg);
                waits++;
                loading[ix[which]] = 0;
                ptr[ix[which]] = data;
            } else { /* release something pinned and ready */
                int j0 = (int)(rand_r(&seed) % (unsigned)(L * E));
                for (int t = 0; t < L * E; t++) {
                    int j = (j0 + t) % (L * E);
                    if (pins[j] && !loading[j]) {
                        moe_expert_cache_release(c, j / E, j % E);
                        if (--pins[j] == 0) {
                            n_pinned_keys--;
                            ptr[j] = NULL;
                        }
                        break;
                    }
                }
            }
            /* every pinned, ready expert still holds its own bytes */
            for (int j = 0; j < L * E; j++)
                if (pins[j] && !loading[j] && ptr[j]) {
                    size_t n = (size_t)moe_expert_src_layout(src, (uint32_t)(j / E))->raw_size;
                    CHECK_MSG(memcmp(ptr[j], ref[j], n) == 0, "round %d step %d: expert (%d, %d)"
                              " changed while pinned", round, step, j / E, j % E);
                }
            CHECK_INT(moe_expert_cache_pinned(c), ==, n_pinned_keys);
        }
        /* drain: wait for loads, release everything */
        for (int j = 0; j < L * E; j++) {
            if (pins[j] && loading[j]) {
                int32_t wl = j / E, we = j % E;
                int which;
                const uint8_t *data;
                CHECK(moe_expert_cache_wait_any(c, &wl, &we, 1, &which, &data, &d) == 0);
                CHECK(memcmp(data, ref[j], (size_t)moe_expert_src_layout(src, (uint32_t)wl)->raw_size) == 0);
            }
            while (pins[j]-- > 0)
                moe_expert_cache_release(c, j / E, j % E);
        }
        CHECK_INT(moe_expert_cache_pinned(c), ==, 0);
        struct moe_cache_stats st;
        moe_expert_cache_stats(c, &st);
        CHECK(st.loads_failed == 0);
        moe_expert_cache_destroy(c);
    }
    printf("  %ld operations (%ld waits, %ld EAGAIN, %ld prefetches, %ld cancelled) over 12 random"
           " budgets\n", ops, waits, again, prefetches, cancels);
    for (int k = 0; k < L * E; k++)
        free(ref[k]);
    moe_backend_destroy(be);
    moe_expert_src_close(src);
}

static void test_random_uring(void) { run(0); }
static void test_random_pread(void) { run(1); }

int main(void)
{
    MOE_TEST_RUN(test_random_uring);
    MOE_TEST_RUN(test_random_pread);
    return moe_test_exit_code();
}

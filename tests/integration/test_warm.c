/* Warm restarts (cache/warm.h, model/warm.c): the statistics file round-
 * trips; a corrupt, truncated, stale or foreign file is refused with its
 * reason; kill -9 at any moment of a write leaves the old file or the new
 * one, never a broken one; and a second run of moectl on the same pack
 * starts with the hottest experts of the first loading and its policy
 * seeded with what the first learned, hitting at least as often over its
 * first tokens as a cold start. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache/warm.h"
#include "common/alloc.h"
#include "io/pack.h"
#include "tests/harness.h"

static void fill_policy(struct moe_warm *w, uint32_t seed)
{
    const size_t n = (size_t)w->n_layer * w->n_expert, nn = n * w->n_expert;
    w->pol_trans = moe_malloc(nn * 4);
    w->pol_follows = moe_malloc(n * 4);
    for (size_t i = 0; i < nn; i++)
        w->pol_trans[i] = (uint32_t)(i * 13) ^ seed;
    for (size_t i = 0; i < n; i++)
        w->pol_follows[i] = (uint32_t)(i * 5) ^ seed;
    w->pol_stats = moe_malloc(MOE_WARM_POLICY_STATS * sizeof(double));
    for (int i = 0; i < MOE_WARM_POLICY_STATS; i++)
        w->pol_stats[i] = i * 0.5 + seed;
}

static void fill(struct moe_warm *w, uint32_t n_layer, uint32_t n_expert, bool hist, uint32_t seed)
{
    *w = (struct moe_warm){ .n_layer = n_layer, .n_expert = n_expert, .k = 2, .model_id = 0xabcdef };
    const size_t n = (size_t)n_layer * n_expert, nn = n * n_expert;
    w->uses = moe_malloc(n * 4);
    for (size_t i = 0; i < n; i++)
        w->uses[i] = (uint32_t)(i * 2654435761u) ^ seed;
    if (hist) {
        w->tr_tok = moe_malloc(nn * 4);
        w->tr_layer = moe_malloc(nn * 4);
        for (size_t i = 0; i < nn; i++) {
            w->tr_tok[i] = (uint32_t)i ^ seed;
            w->tr_layer[i] = (uint32_t)(i * 7) ^ seed;
        }
    }
}

static bool same(const struct moe_warm *a, const struct moe_warm *b)
{
    const size_t n = (size_t)a->n_layer * a->n_expert, nn = n * a->n_expert;
    if (memcmp(a->uses, b->uses, n * 4) != 0 || (a->tr_tok == NULL) != (b->tr_tok == NULL) ||
        (a->pol_trans == NULL) != (b->pol_trans == NULL))
        return false;
    if (a->pol_trans != NULL &&
        (memcmp(a->pol_trans, b->pol_trans, nn * 4) != 0 || memcmp(a->pol_follows, b->pol_follows, n * 4) != 0 ||
         memcmp(a->pol_stats, b->pol_stats, MOE_WARM_POLICY_STATS * sizeof(double)) != 0))
        return false;
    return a->tr_tok == NULL ||
           (memcmp(a->tr_tok, b->tr_tok, nn * 4) == 0 && memcmp(a->tr_layer, b->tr_layer, nn * 4) == 0);
}

static void test_round_trip_and_refusals(void)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/m.warm", moe_test_tmpdir());
    struct moe_warm a, b;
    struct moe_diag d = { 0 };
    fill(&a, 4, 16, true, 1);
    b = (struct moe_warm){ .n_layer = 4, .n_expert = 16, .k = 2, .model_id = 0xabcdef };
    CHECK_INT(moe_warm_read(path, &b, &d), ==, -ENOENT);
    CHECK_MSG(moe_warm_write(path, &a, &d) == 0, "%s", d.msg);
    CHECK_MSG(moe_warm_read(path, &b, &d) == 0, "%s", d.msg);
    CHECK(same(&a, &b));
    moe_warm_free(&b);
    /* another model: stale */
    b.model_id = 0x1234;
    memset(&d, 0, sizeof(d));
    CHECK_INT(moe_warm_read(path, &b, &d), ==, MOE_EFORMAT);
    CHECK_MSG(strstr(d.msg, "stale") && strstr(d.msg, "m.warm"), "%s", d.msg);
    b.model_id = 0xabcdef;
    b.n_expert = 8;
    memset(&d, 0, sizeof(d));
    CHECK_INT(moe_warm_read(path, &b, &d), ==, MOE_EFORMAT);
    b.n_expert = 16;
    /* one flipped byte in the contents, then in the header */
    size_t len;
    char *bytes = moe_test_read_file(path, &len);
    CHECK(bytes != NULL && len > 100);
    for (int where = 0; where < 2; where++) {
        char *copy = malloc(len);
        memcpy(copy, bytes, len);
        copy[where ? 20 : len - 3] ^= 0x40;
        FILE *f = fopen(path, "wb");
        fwrite(copy, 1, len, f);
        fclose(f);
        free(copy);
        memset(&d, 0, sizeof(d));
        CHECK_INT(moe_warm_read(path, &b, &d), ==, MOE_ECHECKSUM);
        CHECK_MSG(strstr(d.msg, "corrupt"), "%s", d.msg);
        CHECK(b.uses == NULL);
    }
    /* truncated */
    FILE *f = fopen(path, "wb");
    fwrite(bytes, 1, len - 4, f);
    fclose(f);
    memset(&d, 0, sizeof(d));
    CHECK_INT(moe_warm_read(path, &b, &d), ==, MOE_EFORMAT);
    CHECK_MSG(strstr(d.msg, "truncated"), "%s", d.msg);
    free(bytes);
    /* no tables: uses only */
    moe_free(a.tr_tok);
    moe_free(a.tr_layer);
    a.tr_tok = a.tr_layer = NULL;
    CHECK(moe_warm_write(path, &a, &d) == 0);
    CHECK(moe_warm_read(path, &b, &d) == 0 && same(&a, &b) && b.tr_tok == NULL);
    moe_warm_free(&b);
    /* the policy's table, alone and beside the history's: each file the
     * size of what it holds, each read back as written */
    const long long uses = 4 * 16 * 4, table = uses * 16;
    for (int hist = 0; hist < 2; hist++) {
        moe_warm_free(&a);
        fill(&a, 4, 16, hist, 3);
        fill_policy(&a, 5);
        memset(&d, 0, sizeof(d));
        CHECK_MSG(moe_warm_write(path, &a, &d) == 0, "%s", d.msg);
        bytes = moe_test_read_file(path, &len);
        CHECK_INT((long long)len, ==, 64 + uses + (hist ? 2 * table : 0) + table + uses + 256);
        free(bytes);
        b = (struct moe_warm){ .n_layer = 4, .n_expert = 16, .k = 2, .model_id = 0xabcdef };
        CHECK_MSG(moe_warm_read(path, &b, &d) == 0, "%s", d.msg);
        CHECK(same(&a, &b) && b.pol_trans != NULL && (b.tr_tok != NULL) == hist);
        moe_warm_free(&b);
    }
    moe_warm_free(&a);
}

/* A child rewrites the file with A and B in turn (2 MB each, synced); after
 * each kill -9, at a random moment, the file is A or B, whole. */
static void test_kill_during_write(void)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/k.warm", moe_test_tmpdir());
    struct moe_warm a, b2, got;
    fill(&a, 16, 128, true, 11);
    fill(&b2, 16, 128, true, 22);
    unsigned seed = (unsigned)time(NULL);
    int a_seen = 0, b_seen = 0;
    for (int round = 0; round < 12; round++) {
        pid_t pid = fork();
        if (pid == 0) {
            for (int i = 0;; i++)
                moe_warm_write(path, i % 2 ? &b2 : &a, NULL);
        }
        usleep(5000 + (useconds_t)(rand_r(&seed) % 400000));
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        got = (struct moe_warm){ .n_layer = 16, .n_expert = 128, .k = 2, .model_id = 0xabcdef };
        struct moe_diag d = { 0 };
        int rc = moe_warm_read(path, &got, &d);
        if (rc == -ENOENT)
            continue;   /* killed before the first rename */
        CHECK_MSG(rc == 0, "round %d: %s", round, d.msg);
        const bool is_a = same(&got, &a), is_b = same(&got, &b2);
        CHECK_MSG(is_a || is_b, "round %d: the file is neither the old nor the new one", round);
        a_seen += is_a;
        b_seen += is_b;
        moe_warm_free(&got);
    }
    printf("  12 kills: the file was whole each time (A %d, B %d)\n", a_seen, b_seen);
    moe_warm_free(&a);
    moe_warm_free(&b2);
}

static long long stat_of(const char *text, const char *key)
{
    char k[64];
    snprintf(k, sizeof(k), "\"%s\": ", key);
    const char *p = strstr(text, k);
    return p ? atoll(p + strlen(k)) : -1;
}

/* moectl run twice on a pack with warm_start: the second run starts
 * loading what the first used most, and hits at least as often. Prefetch
 * off: the default (gate under the governor) turns on and off with measured
 * step times, which would make the hit counts depend on the machine's load. */
static void test_second_run_is_warm(void)
{
    const char *ctl = getenv("MOECTL");
    const char *ref = moe_test_ref_dir();
    if (ctl == NULL || ref == NULL)
        MOE_SKIP("MOECTL / shared/ref not available");
    char src[4096], pack[4096], cmd[8192], out[65536];
    snprintf(src, sizeof(src), "%s/models/tiny-qwen3moe-Q8_0.gguf", ref);
    snprintf(pack, sizeof(pack), "%s/w.moe", moe_test_tmpdir());
    struct moe_diag d = { 0 };
    struct moe_pack_write_opts po = { .threads = 2 };
    CHECK_MSG(moe_pack_write(src, pack, &po, NULL, &d) == 0, "%s", d.msg);
    const char *toks = "1,17,300,400,5,60,700,800,9,10,11,12,13,14,15,16";
    long long hits[2], misses[2], warm[2];
    for (int run = 0; run < 2; run++) {
        snprintf(cmd, sizeof(cmd), "%s run --model %s --tokens %s -n 24 --threads 2 --ctx-size 64"
                 " --cache-experts 24 --prefetch none --warm-start --stats 2>&1 >/dev/null", ctl, pack, toks);
        CHECK_INT(moe_test_run_cmd(cmd, out, sizeof(out)), ==, 0);
        hits[run] = stat_of(out, "hits");
        misses[run] = stat_of(out, "misses");
        warm[run] = stat_of(out, "warm_loads");
    }
    printf("  cold: %lld hits %lld misses; warm: %lld warm loads, %lld hits %lld misses\n", hits[0],
           misses[0], warm[1], hits[1], misses[1]);
    CHECK_INT(warm[0], ==, 0);
    CHECK(warm[1] > 0 && warm[1] <= 24);
    CHECK(hits[1] >= hits[0]);
    /* the default policy (predict) saved its transition counts beside the
     * uses, and the second run read them without a warning */
    char wp[4200];
    snprintf(wp, sizeof(wp), "%s.warm", pack);
    size_t wlen;
    char *wbytes = moe_test_read_file(wp, &wlen);
    CHECK(wbytes != NULL && wlen > 64);
    uint32_t nl, ne;
    memcpy(&nl, wbytes + 16, 4);   /* the header: magic, version, size, n_layer, n_expert */
    memcpy(&ne, wbytes + 20, 4);
    const long long wu = (long long)nl * ne * 4;
    CHECK_INT((long long)wlen, ==, 64 + wu + wu * ne + wu + 256);
    free(wbytes);
    CHECK_MSG(strstr(out, "warm start ignored") == NULL, "%s", out);
    /* a corrupt file: warned about, and the run goes on cold */
    char wpath[4200];
    snprintf(wpath, sizeof(wpath), "%s.warm", pack);
    FILE *f = fopen(wpath, "r+b");
    CHECK(f != NULL);
    fseek(f, 100, SEEK_SET);
    fputc(0x5a, f);
    fclose(f);
    snprintf(cmd, sizeof(cmd), "%s run --model %s --tokens %s -n 4 --threads 2 --ctx-size 64"
             " --cache-experts 24 --prefetch none --warm-start --stats 2>&1 >/dev/null", ctl, pack, toks);
    CHECK_INT(moe_test_run_cmd(cmd, out, sizeof(out)), ==, 0);
    CHECK_MSG(strstr(out, "warm start ignored") && strstr(out, "corrupt"), "%s", out);
    CHECK_INT(stat_of(out, "warm_loads"), ==, 0);
}

int main(void)
{
    MOE_TEST_RUN(test_round_trip_and_refusals);
    MOE_TEST_RUN(test_kill_during_write);
    MOE_TEST_RUN(test_second_run_is_warm);
    return moe_test_exit_code();
}

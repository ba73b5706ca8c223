/* The expert cache's overlapped upload against a fake device (issue 20,
 * shared/RELIABILITY.md row 20): a backend whose memory is plain host
 * memory but which, like a GPU, has a compute stream and a copy stream that
 * run only when the test says so. Operations queue on a stream in order; an
 * event marks a point of a stream and completes once the stream has run
 * past it; a wait on a stream holds it until the event it waited for has
 * completed. The test queues "kernels" on the compute stream that check,
 * when they run, that the slot they read holds exactly its expert's bytes.
 *
 * What it proves, with the real expert source underneath:
 *  - the host never waits for an upload on a hit: acquire and wait_any hand
 *    out a slot whose copy has not run, and only the compute stream waits;
 *  - a slot is never overwritten before its last-use event completed: the
 *    next upload into it waits on the copy stream for the kernels queued
 *    before the release;
 *  - a staging buffer is never rewritten while its upload has not run (the
 *    fake checks the source's bytes when the copy runs), and a slot whose
 *    upload is still queued is reused only after the host waited for it;
 *  - a host-tier hit is uploaded on the copy stream, its tier entry pinned
 *    until the copy ran;
 *  - random acquire / wait / release / prefetch / cancel sequences with the
 *    streams advanced at random keep all of the above; nothing stays pinned
 *    (slots, tier entries) and every page-locked buffer is freed. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cache/expert_cache.h"
#include "cache/host_tier.h"
#include "io/expert_src.h"
#include "kernels/backend.h"
#include "tests/harness.h"

#define MAXK 256
#define MAXOPS 65536

enum { COMPUTE = 0, COPY = 1 };
enum { OP_WAIT, OP_COPY, OP_READ };

/* A point of a stream: complete once that stream has run pos operations. */
struct point {
    int stream;
    uint64_t pos;
};

struct fake_ev {
    struct point at;   /* pos 0: never recorded, complete */
};

struct op {
    int kind;
    struct point wait;           /* OP_WAIT */
    void *dst;                   /* OP_COPY */
    const uint8_t *src;
    size_t n;
    uint64_t src_sum;            /* the source's bytes when the copy was queued */
    const uint8_t *read;         /* OP_READ: the slot a kernel reads, */
    const uint8_t *expect;       /*          the bytes it must find */
    size_t len;                  /*          and how many */
};

struct fstream {
    struct op *ops;
    uint64_t run, queued;        /* operations run / queued so far */
};

static struct fake {
    pthread_mutex_t mu;
    struct fstream s[2];
    long host_allocs, host_frees, events_live;
    long host_syncs;             /* event_sync calls */
    long violations;
    char why[512];
    uint64_t uploads, upload_bytes;
} F;

static uint64_t sum_of(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void violation(const char *what)
{
    if (F.violations++ == 0)
        snprintf(F.why, sizeof(F.why), "%s", what);
}

static int point_done(struct point p)
{
    return p.pos <= F.s[p.stream].run;
}

/* Runs up to max operations of stream k (mutex held); how many ran. */
static int run_stream(int k, int max)
{
    struct fstream *st = &F.s[k];
    int n = 0;
    while (n < max && st->run < st->queued) {
        struct op *o = &st->ops[st->run % MAXOPS];
        if (o->kind == OP_WAIT && !point_done(o->wait))
            break;
        if (o->kind == OP_COPY) {
            if (sum_of(o->src, o->n) != o->src_sum)
                violation("a staging buffer changed before its upload ran");
            memcpy(o->dst, o->src, o->n);
        } else if (o->kind == OP_READ) {
            if (memcmp(o->read, o->expect, o->len) != 0)
                violation("a kernel read a slot that did not hold its expert");
        }
        st->run++;
        n++;
    }
    return n;
}

static void push(int k, struct op o)
{
    struct fstream *st = &F.s[k];
    if (st->queued - st->run >= MAXOPS) {
        violation("stream overflow");
        return;
    }
    st->ops[st->queued++ % MAXOPS] = o;
}

/* Runs both streams until neither can move. */
static void drain_locked(void)
{
    while (run_stream(COPY, 1 << 30) + run_stream(COMPUTE, 1 << 30) > 0)
        ;
}

/* ---- the fake backend's ops -------------------------------------------- */

static void *f_alloc(struct moe_backend *be, size_t n)
{
    (void)be;
    return malloc(n ? n : 1);
}

static void f_free(struct moe_backend *be, void *p)
{
    (void)be;
    free(p);
}

static void *f_host_alloc(struct moe_backend *be, size_t n)
{
    (void)be;
    void *p = NULL;
    if (posix_memalign(&p, 4096, n ? n : 1) != 0)
        return NULL;
    pthread_mutex_lock(&F.mu);
    F.host_allocs++;
    pthread_mutex_unlock(&F.mu);
    return p;
}

static void f_host_free(struct moe_backend *be, void *p)
{
    (void)be;
    if (p == NULL)
        return;
    pthread_mutex_lock(&F.mu);
    F.host_frees++;
    pthread_mutex_unlock(&F.mu);
    free(p);
}

static int f_event_init(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    ev->h = calloc(1, sizeof(struct fake_ev));
    pthread_mutex_lock(&F.mu);
    F.events_live += ev->h != NULL;
    pthread_mutex_unlock(&F.mu);
    return ev->h ? 0 : -ENOMEM;
}

static void f_event_fini(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    if (ev->h == NULL)
        return;
    pthread_mutex_lock(&F.mu);
    F.events_live--;
    pthread_mutex_unlock(&F.mu);
    free(ev->h);
    ev->h = NULL;
}

static struct fake_ev *E_(struct moe_event *ev)
{
    return ev->h;
}

static int f_upload_async(struct moe_backend *be, void *dst, const void *src, size_t n,
                          struct moe_event *after, struct moe_event *done)
{
    (void)be;
    pthread_mutex_lock(&F.mu);
    if (after)
        push(COPY, (struct op){ .kind = OP_WAIT, .wait = E_(after)->at });
    push(COPY, (struct op){ .kind = OP_COPY, .dst = dst, .src = src, .n = n, .src_sum = sum_of(src, n) });
    if (done)
        E_(done)->at = (struct point){ COPY, F.s[COPY].queued };
    F.uploads++;
    F.upload_bytes += n;
    pthread_mutex_unlock(&F.mu);
    return 0;
}

static int f_event_record(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    pthread_mutex_lock(&F.mu);
    E_(ev)->at = (struct point){ COMPUTE, F.s[COMPUTE].queued };
    pthread_mutex_unlock(&F.mu);
    return 0;
}

static int f_event_query(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    pthread_mutex_lock(&F.mu);
    int done = point_done(E_(ev)->at);
    pthread_mutex_unlock(&F.mu);
    return done;
}

/* The host waits: the device runs until the event completes. */
static int f_event_sync(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    pthread_mutex_lock(&F.mu);
    F.host_syncs++;
    while (!point_done(E_(ev)->at))
        if (run_stream(COPY, 1) + run_stream(COMPUTE, 1) == 0) {
            violation("event_sync on an event that can never complete");
            break;
        }
    pthread_mutex_unlock(&F.mu);
    return 0;
}

static int f_stream_wait(struct moe_backend *be, struct moe_event *ev)
{
    (void)be;
    pthread_mutex_lock(&F.mu);
    push(COMPUTE, (struct op){ .kind = OP_WAIT, .wait = E_(ev)->at });
    pthread_mutex_unlock(&F.mu);
    return 0;
}

static void f_copy_stats(struct moe_backend *be, struct moe_copy_stats *out)
{
    (void)be;
    pthread_mutex_lock(&F.mu);
    *out = (struct moe_copy_stats){ .uploads = F.uploads, .bytes = F.upload_bytes };
    pthread_mutex_unlock(&F.mu);
}

static void f_destroy(struct moe_backend *be)
{
    (void)be;
}

static const struct moe_backend_ops fake_ops = {
    .name = "fake-gpu",
    .destroy = f_destroy,
    .alloc = f_alloc,
    .free = f_free,
    .host_alloc = f_host_alloc,
    .host_free = f_host_free,
    .event_init = f_event_init,
    .event_fini = f_event_fini,
    .upload_async = f_upload_async,
    .event_record = f_event_record,
    .event_query = f_event_query,
    .event_sync = f_event_sync,
    .stream_wait = f_stream_wait,
    .copy_stats = f_copy_stats,
    .host_memory = 0,
};

static struct moe_backend fake_be = { .ops = &fake_ops };

static void fake_reset(void)
{
    free(F.s[0].ops);
    free(F.s[1].ops);
    memset(&F, 0, sizeof(F));
    pthread_mutex_init(&F.mu, NULL);
    F.s[0].ops = calloc(MAXOPS, sizeof(struct op));
    F.s[1].ops = calloc(MAXOPS, sizeof(struct op));
}

static struct moe_expert_src *src;
static int L, E;
static size_t slot_bytes;
static uint8_t *ref[MAXK];

/* A kernel of the engine reading expert k's slot, queued on the compute
 * stream. */
static void kernel_read(const uint8_t *slot, int k)
{
    const size_t n = (size_t)moe_expert_src_layout(src, (uint32_t)(k / E))->raw_size;
    pthread_mutex_lock(&F.mu);
    push(COMPUTE, (struct op){ .kind = OP_READ, .read = slot, .expect = ref[k], .len = n });
    pthread_mutex_unlock(&F.mu);
}

static int run_copy(int max)
{
    pthread_mutex_lock(&F.mu);
    int n = run_stream(COPY, max);
    pthread_mutex_unlock(&F.mu);
    return n;
}

static int run_compute(int max)
{
    pthread_mutex_lock(&F.mu);
    int n = run_stream(COMPUTE, max);
    pthread_mutex_unlock(&F.mu);
    return n;
}

static void drain(void)
{
    pthread_mutex_lock(&F.mu);
    drain_locked();
    pthread_mutex_unlock(&F.mu);
}

static long syncs(void)
{
    pthread_mutex_lock(&F.mu);
    long n = F.host_syncs;
    pthread_mutex_unlock(&F.mu);
    return n;
}

/* ---- the model: a small generated GGUF through the real expert source -- */

static int open_model(void)
{
    const char *gen = getenv("MOE_GEN");
    if (gen == NULL)
        return 77;
    char path[4096], cmd[8192];
    snprintf(path, sizeof(path), "%s/m.gguf", moe_test_tmpdir());
    snprintf(cmd, sizeof(cmd), "%s --arch llama --n-embd 64 --n-layer 3 --n-head 2 --n-head-kv 1"
             " --head-dim 32 --n-expert 8 --n-expert-used 2 --n-ff-exp 64 --type Q8_0 --quiet -o %s",
             gen, path);
    if (system(cmd) != 0)
        return -1;
    struct moe_diag d = { 0 };
    if (moe_expert_src_open(&src, path, NULL, &d) != 0) {
        fprintf(stderr, "%s\n", d.msg);
        return -1;
    }
    L = (int)moe_expert_src_n_layer(src);
    E = (int)moe_expert_src_n_expert(src);
    slot_bytes = 0;
    for (int l = 0; l < L; l++)
        if (moe_expert_src_layout(src, (uint32_t)l)->raw_size > slot_bytes)
            slot_bytes = (size_t)moe_expert_src_layout(src, (uint32_t)l)->raw_size;
    for (int k = 0; k < L * E; k++) {
        ref[k] = calloc(1, slot_bytes);
        size_t n = (size_t)moe_expert_src_layout(src, (uint32_t)(k / E))->raw_size;
        if (moe_expert_src_load_sync(src, (uint32_t)(k / E), (uint32_t)(k % E), ref[k], n, &d) != 0)
            return -1;
    }
    fake_reset();
    return 0;
}

static void close_model(void)
{
    for (int k = 0; k < L * E; k++) {
        free(ref[k]);
        ref[k] = NULL;
    }
    moe_expert_src_close(src);
    src = NULL;
}

#define OPEN_MODEL() do { int _r = open_model(); if (_r == 77) MOE_SKIP("MOE_GEN not set"); \
        CHECK_MSG(_r == 0, "cannot open the generated model"); } while (0)

static struct moe_expert_cache *new_cache(int n_slots)
{
    struct moe_diag d = { 0 };
    struct moe_expert_cache *c = NULL;
    if (moe_expert_cache_create(&c, src, &fake_be, slot_bytes, n_slots, MOE_POLICY_LRU, &d) != 0 ||
        moe_expert_cache_set_staging(c, &d) != 0) {
        fprintf(stderr, "cache: %s\n", d.msg);
        moe_expert_cache_destroy(c);
        return NULL;
    }
    return c;
}

/* Acquires (l, e) and waits for its load (not for its upload). */
static int get(struct moe_expert_cache *c, int l, int e, const uint8_t **data)
{
    struct moe_diag d = { 0 };
    int r = moe_expert_cache_acquire(c, l, e, 0, data, &d);
    if (r == 0) {
        int32_t wl = l, we = e;
        int which;
        r = moe_expert_cache_wait_any(c, &wl, &we, 1, &which, data, &d) == 0 ? 1 : -1;
    }
    if (r < 0)
        fprintf(stderr, "acquire (%d, %d): %d %s\n", l, e, r, d.msg);
    return r;
}

/* Teardown checks shared by every case. */
static int finish(struct moe_expert_cache *c, struct moe_host_tier *t)
{
    drain();
    int pinned = moe_expert_cache_pinned(c);
    moe_expert_cache_destroy(c);
    struct moe_host_tier_stats ts = { 0 };
    if (t) {
        moe_host_tier_stats(t, &ts);
        moe_host_tier_destroy(t);
    }
    if (pinned != 0 || ts.n_pinned != 0 || F.host_allocs != F.host_frees || F.events_live != 0 ||
        F.violations != 0) {
        fprintf(stderr, "  pinned %d, tier pinned %u, host buffers %ld allocated %ld freed, events %ld"
                " live, %ld violations%s%s\n", pinned, ts.n_pinned, F.host_allocs, F.host_frees,
                F.events_live, F.violations, F.violations ? ": " : "", F.why);
        return -1;
    }
    return 0;
}

/* ---- cases ---------------------------------------------------------------- */

/* A miss is handed out before its copy ran; a hit on it too; only the
 * compute stream waits, and the kernels see the expert's bytes. */
static void test_hit_never_waits_on_host(void)
{
    OPEN_MODEL();
    struct moe_expert_cache *c = new_cache(4);
    CHECK(c != NULL);
    CHECK_INT(F.host_allocs, ==, 1);   /* the staging: page-locked memory of the backend */
    const uint8_t *a = NULL, *b = NULL;
    CHECK_INT(get(c, 1, 3, &a), ==, 1);
    CHECK_INT(F.s[COPY].run, ==, 0);   /* the upload is queued, not run */
    kernel_read(a, 1 * E + 3);
    moe_expert_cache_release(c, 1, 3);
    /* the compute stream cannot pass the wait for the upload */
    CHECK_INT(run_compute(100), ==, 0);
    const long s0 = syncs();
    struct moe_diag d = { 0 };
    CHECK_INT(moe_expert_cache_acquire(c, 1, 3, 1, &b, &d), ==, 1);   /* a hit, upload still queued */
    CHECK(b == a);
    kernel_read(b, 1 * E + 3);
    moe_expert_cache_release(c, 1, 3);
    CHECK_INT(syncs(), ==, s0);
    CHECK_INT(syncs(), ==, 0);
    CHECK_INT(run_compute(100), ==, 0);
    CHECK(run_copy(100) > 0);
    CHECK(run_compute(100) >= 2);      /* both kernels ran, after the copy */
    struct moe_cache_stats st;
    moe_expert_cache_stats(c, &st);
    CHECK_U64(st.hits, ==, 1);
    CHECK_U64(st.uploads, ==, 1);
    CHECK_U64(st.upload_host_waits, ==, 0);
    CHECK(finish(c, NULL) == 0);
    close_model();
}

/* One slot: the next expert's upload waits for the kernels queued on the
 * previous one before its release. */
static void test_reuse_waits_for_last_use(void)
{
    OPEN_MODEL();
    struct moe_expert_cache *c = new_cache(1);
    CHECK(c != NULL);
    const uint8_t *a = NULL, *b = NULL;
    CHECK_INT(get(c, 0, 1, &a), ==, 1);
    CHECK(run_copy(100) > 0);          /* A is on the device */
    kernel_read(a, 0 * E + 1);    /* queued, not run */
    moe_expert_cache_release(c, 0, 1);
    CHECK_INT(get(c, 0, 2, &b), ==, 1);  /* evicts A; B's copy is queued behind A's readers */
    CHECK(b == a);
    CHECK_INT(syncs(), ==, 0);
    CHECK_INT(run_copy(100), ==, 0);   /* blocked on A's last use */
    kernel_read(b, 0 * E + 2);
    moe_expert_cache_release(c, 0, 2);
    CHECK_INT(run_compute(2), ==, 2);  /* A's wait and kernel: still A's bytes */
    CHECK(run_copy(100) > 0);          /* now B lands */
    CHECK(run_compute(100) > 0);       /* B's kernel after it */
    CHECK(finish(c, NULL) == 0);
    close_model();
}

/* A prefetched expert whose upload has not run is the only candidate: the
 * host waits for it (counted) rather than rewrite the staging under it. */
static void test_busy_victim_waits(void)
{
    OPEN_MODEL();
    struct moe_expert_cache *c = new_cache(1);
    CHECK(c != NULL);
    CHECK_INT(moe_expert_cache_prefetch(c, 2, 5, 0, 1), ==, 1);
    /* let the load finish: a demand for another expert has to wait for the slot */
    const uint8_t *b = NULL;
    struct moe_diag d = { 0 };
    int r;
    while ((r = moe_expert_cache_acquire(c, 2, 6, 0, &b, &d)) == -EAGAIN)
        CHECK_INT(moe_expert_cache_wait_slot(c), ==, 0);
    CHECK_MSG(r >= 0, "acquire: %d %s", r, d.msg);
    struct moe_cache_stats st;
    moe_expert_cache_stats(c, &st);
    CHECK_U64(st.upload_host_waits, ==, 1);
    CHECK_INT(syncs(), ==, 1);
    if (r == 0) {
        int32_t wl = 2, we = 6;
        int which;
        CHECK(moe_expert_cache_wait_any(c, &wl, &we, 1, &which, &b, &d) == 0);
    }
    kernel_read(b, 2 * E + 6);
    moe_expert_cache_release(c, 2, 6);
    CHECK(finish(c, NULL) == 0);
    close_model();
}

/* A host-tier hit is uploaded on the copy stream; the tier's entry stays
 * pinned until the copy ran, then the next acquire unpins it. */
static void test_tier_hit_async(void)
{
    OPEN_MODEL();
    struct moe_diag d = { 0 };
    struct moe_host_tier *t = NULL;
    CHECK(moe_host_tier_create(&t, 64 * slot_bytes, &d) == 0);
    struct moe_expert_cache *c = new_cache(1);
    CHECK(c != NULL);
    moe_expert_cache_set_host_tier(c, t);
    const uint8_t *a = NULL;
    CHECK_INT(get(c, 1, 0, &a), ==, 1);       /* from disk, kept in the tier */
    moe_expert_cache_release(c, 1, 0);
    drain();
    CHECK_INT(get(c, 1, 1, &a), ==, 1);       /* evicts (1, 0): its copy ran */
    moe_expert_cache_release(c, 1, 1);
    drain();
    const long s0 = syncs();
    CHECK_INT(moe_expert_cache_acquire(c, 1, 0, 1, &a, &d), ==, 1);   /* tier hit */
    CHECK_INT(syncs(), ==, s0);
    struct moe_host_tier_stats ts;
    moe_host_tier_stats(t, &ts);
    CHECK_INT(ts.n_pinned, ==, 1);            /* the copy still reads it */
    kernel_read(a, 1 * E + 0);
    moe_expert_cache_release(c, 1, 0);
    CHECK_INT(run_compute(100), ==, 0);       /* waits for the tier's copy */
    CHECK(run_copy(100) > 0);
    CHECK(run_compute(100) > 0);
    const uint8_t *b = NULL;
    CHECK_INT(moe_expert_cache_acquire(c, 1, 0, 2, &b, &d), ==, 1);
    moe_expert_cache_release(c, 1, 0);
    moe_host_tier_stats(t, &ts);
    CHECK_INT(ts.n_pinned, ==, 0);
    struct moe_cache_stats st;
    moe_expert_cache_stats(c, &st);
    CHECK_U64(st.host_hits, ==, 1);
    CHECK_U64(st.upload_host_waits, ==, 0);
    CHECK(finish(c, t) == 0);
    close_model();
}

/* Random sequences, streams advanced at random. */
static void test_random_streams(void)
{
    OPEN_MODEL();
    unsigned seed = 20;
    long hits = 0, host_waits = 0;
    for (int round = 0; round < 8; round++) {
        fake_reset();
        struct moe_diag d = { 0 };
        struct moe_host_tier *t = NULL;
        if (round & 1) {
            CHECK(moe_host_tier_create(&t, (size_t)(2 + round) * slot_bytes, &d) == 0);
        }
        const int n_slots = 1 + (int)(rand_r(&seed) % 8);
        struct moe_expert_cache *c = new_cache(n_slots);
        CHECK(c != NULL);
        if (t)
            moe_expert_cache_set_host_tier(c, t);
        int pins[MAXK] = { 0 }, loading[MAXK] = { 0 };
        const uint8_t *ptr[MAXK] = { 0 };
        for (int step = 0; step < 500; step++) {
            const int k = (int)(rand_r(&seed) % (unsigned)(L * E)), op = (int)(rand_r(&seed) % 16);
            if (op == 0) {
                run_copy(1 + (int)(rand_r(&seed) % 3));
            } else if (op == 1) {
                run_compute(1 + (int)(rand_r(&seed) % 5));
            } else if (op == 2) {
                moe_expert_cache_prefetch(c, k / E, k % E, step, 2);
            } else if (op == 3) {
                moe_expert_cache_cancel_stale(c, (int)(rand_r(&seed) % (unsigned)L));
            } else if (op < 9) {
                const uint8_t *data = NULL;
                struct moe_cache_stats s0, s1;
                moe_expert_cache_stats(c, &s0);
                const long y0 = syncs();
                int r = moe_expert_cache_acquire(c, k / E, k % E, step, &data, &d);
                moe_expert_cache_stats(c, &s1);
                if (r == -EAGAIN)
                    continue;
                CHECK_MSG(r == 0 || r == 1, "acquire: %d %s", r, d.msg);
                if (s1.hits > s0.hits) {
                    hits++;
                    CHECK_MSG(syncs() == y0, "the host waited on a hit");
                }
                /* a pinned expert never moves */
                CHECK(r == 0 || pins[k] == 0 || loading[k] || ptr[k] == data);
                pins[k]++;
                if (r == 1) {
                    ptr[k] = data;
                    kernel_read(data, k);
                } else {
                    loading[k] = 1;
                }
            } else if (op < 11) {
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
                loading[ix[which]] = 0;
                ptr[ix[which]] = data;
                kernel_read(data, ix[which]);
            } else {
                int j0 = (int)(rand_r(&seed) % (unsigned)(L * E));
                for (int u = 0; u < L * E; u++) {
                    int j = (j0 + u) % (L * E);
                    if (pins[j] && !loading[j]) {
                        moe_expert_cache_release(c, j / E, j % E);
                        if (--pins[j] == 0)
                            ptr[j] = NULL;
                        break;
                    }
                }
            }
            CHECK_MSG(F.violations == 0, "round %d step %d: %s", round, step, F.why);
        }
        for (int j = 0; j < L * E; j++) {
            if (pins[j] && loading[j]) {
                int32_t wl = j / E, we = j % E;
                int which;
                const uint8_t *data;
                CHECK(moe_expert_cache_wait_any(c, &wl, &we, 1, &which, &data, &d) == 0);
                kernel_read(data, j);
            }
            while (pins[j]-- > 0)
                moe_expert_cache_release(c, j / E, j % E);
        }
        struct moe_cache_stats st;
        moe_expert_cache_stats(c, &st);
        host_waits += (long)st.upload_host_waits;
        CHECK(st.loads_failed == 0);
        CHECK_MSG(finish(c, t) == 0, "round %d", round);
    }
    printf("  %ld hits without a host wait; %ld reuses of a slot still uploading waited\n", hits,
           host_waits);
    close_model();
}

int main(void)
{
    MOE_TEST_RUN(test_hit_never_waits_on_host);
    MOE_TEST_RUN(test_reuse_waits_for_last_use);
    MOE_TEST_RUN(test_busy_victim_waits);
    MOE_TEST_RUN(test_tier_hit_async);
    MOE_TEST_RUN(test_random_streams);
    return moe_test_exit_code();
}

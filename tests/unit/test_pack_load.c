/* Expert loads (io/expert_src.h) from packs and GGUFs: the same bytes as
 * the synchronous reader in every mode (io_uring + O_DIRECT, forced pread,
 * tmpfs without O_DIRECT); injected short reads, EAGAIN, EINTR are retried;
 * EIO, a flipped blob byte, a bad index entry and a truncated file fail
 * only the expert concerned, with its layer and expert in the message
 * (shared/RELIABILITY.md rows 4-6). Packs are made twice, every blob
 * compressed and every blob raw (read straight into page-aligned
 * destinations; one destination in three is unaligned and staged). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/log.h"
#include "io/expert_src.h"
#include "io/pack-impl.h"
#include "tests/harness.h"

static const char *ref_model(const char *name, char *buf, size_t n)
{
    const char *ref = moe_test_ref_dir();
    if (ref == NULL)
        return NULL;
    snprintf(buf, n, "%s/models/%s.gguf", ref, name);
    return access(buf, R_OK) == 0 ? buf : NULL;
}

static int pack_of(const char *src, const char *name, double min_ratio, char *out, size_t n)
{
    snprintf(out, n, "%s/%s.moe", moe_test_tmpdir(), name);
    struct moe_diag d = {0};
    struct moe_pack_write_opts o = { .threads = 2, .min_ratio = min_ratio, .level = 1 };
    int rc = moe_pack_write(src, out, &o, NULL, &d);
    if (rc < 0)
        fprintf(stderr, "  pack: %s\n", d.msg);
    return rc;
}

/* ---- a batch of async loads -------------------------------------------- */

struct job {
    uint32_t layer, expert;
    uint8_t *base;          /* page-aligned allocation holding dst */
    uint8_t *dst;
    size_t size;
    _Atomic int calls;
    int status;
    char msg[MOE_DIAG_MSG_MAX];
};

struct batch {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned left;
};

static struct batch B = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0 };

static void on_done(void *arg, uint32_t layer, uint32_t expert, int status,
                    const struct moe_diag *diag)
{
    struct job *j = arg;
    if (j->layer != layer || j->expert != expert)
        j->status = -9999;
    else
        j->status = status;
    if (status < 0)
        snprintf(j->msg, sizeof(j->msg), "%s", diag->msg);
    j->calls++;
    pthread_mutex_lock(&B.mu);
    B.left--;
    pthread_cond_broadcast(&B.cv);
    pthread_mutex_unlock(&B.mu);
}

/* Loads every expert of the source asynchronously (all submitted at once,
 * every other one as a prefetch); returns the jobs (caller frees). */
static struct job *load_all(struct moe_expert_src *s, unsigned *n_out, uint8_t fill)
{
    uint32_t nl = moe_expert_src_n_layer(s), ne = moe_expert_src_n_expert(s);
    struct job *jobs = calloc((size_t)nl * ne, sizeof(*jobs));
    unsigned n = 0;
    for (uint32_t l = 0; l < nl; l++) {
        const struct moe_expert_layout *L = moe_expert_src_layout(s, l);
        for (uint32_t e = 0; L && e < ne; e++) {
            struct job *j = &jobs[n++];
            j->layer = l;
            j->expert = e;
            j->size = (size_t)L->raw_size;
            /* two in three page-aligned (raw blobs are read straight into
             * them), one not (read through a staging buffer) */
            j->base = aligned_alloc(4096, (j->size + 2 * 4096) / 4096 * 4096);
            j->dst = j->base + (n % 3 == 0 ? 64 : 0);
            memset(j->dst, fill, j->size);
        }
    }
    pthread_mutex_lock(&B.mu);
    B.left = 0;
    pthread_mutex_unlock(&B.mu);
    for (unsigned i = 0; i < n; i++) {
        struct moe_diag d = {0};
        pthread_mutex_lock(&B.mu);
        B.left++;
        pthread_mutex_unlock(&B.mu);
        int rc = moe_expert_src_load(s, jobs[i].layer, jobs[i].expert, jobs[i].dst, jobs[i].size,
                                     (i & 1) ? MOE_LOAD_PREFETCH : 0, on_done, &jobs[i], &d);
        if (rc < 0) {
            jobs[i].status = rc;
            snprintf(jobs[i].msg, sizeof(jobs[i].msg), "submit: %s", d.msg);
            pthread_mutex_lock(&B.mu);
            B.left--;
            pthread_mutex_unlock(&B.mu);
        }
    }
    pthread_mutex_lock(&B.mu);
    while (B.left > 0)
        pthread_cond_wait(&B.cv, &B.mu);
    pthread_mutex_unlock(&B.mu);
    *n_out = n;
    return jobs;
}

static void free_jobs(struct job *jobs, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        free(jobs[i].base);
    free(jobs);
}

/* Every job ok, called once, equal to the synchronous pack reader's bytes
 * (or, for GGUF sources, to the GGUF's slices). */
static int check_jobs(struct job *jobs, unsigned n, const struct moe_pack *p,
                      const struct moe_gguf *g, const struct moe_expert_src *s)
{
    for (unsigned i = 0; i < n; i++) {
        struct job *j = &jobs[i];
        if (j->calls != 1 || j->status != 0) {
            fprintf(stderr, "  (%u,%u): calls %d status %d %s\n", j->layer, j->expert, j->calls,
                    j->status, j->msg);
            return -1;
        }
        uint8_t *want = calloc(1, j->size);
        struct moe_diag d = {0};
        if (p) {
            if (moe_pack_read_expert(p, j->layer, j->expert, want, j->size, NULL, &d) < 0) {
                fprintf(stderr, "  %s\n", d.msg);
                free(want);
                return -1;
            }
        } else {
            const struct moe_expert_layout *L = moe_expert_src_layout(s, j->layer);
            for (uint32_t k = 0; k < L->n_slices; k++) {
                const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, L->s[k].name);
                moe_gguf_pread(g, t, j->expert * L->s[k].size, want + L->s[k].offset,
                               (size_t)L->s[k].size, &d);
            }
        }
        int same = memcmp(want, j->dst, j->size) == 0;
        if (!p) {
            /* a GGUF read straight into dst leaves the file's neighbouring
             * bytes in the padding between slices: compare the slices */
            const struct moe_expert_layout *L = moe_expert_src_layout(s, j->layer);
            same = 1;
            for (uint32_t k = 0; k < L->n_slices; k++)
                same &= memcmp(want + L->s[k].offset, (uint8_t *)j->dst + L->s[k].offset,
                               (size_t)L->s[k].size) == 0;
        }
        free(want);
        if (!same) {
            fprintf(stderr, "  (%u,%u): bytes differ\n", j->layer, j->expert);
            return -1;
        }
    }
    return 0;
}

static int log_calls;

static void count_log(enum moe_log_level level, const char *msg, void *arg)
{
    (void)arg;
    fprintf(stderr, "  log (%s): %s\n", moe_log_level_name(level), msg);
    log_calls++;
}

static int run_source(const char *path, const struct moe_io_config *cfg, bool expect_uring,
                      bool expect_direct)
{
    struct moe_diag d = {0};
    struct moe_expert_src *s = NULL;
    struct moe_pack *p = NULL;
    struct moe_gguf *g = NULL;
    int bad = -1;
    if (moe_expert_src_open(&s, path, cfg, &d) < 0) {
        fprintf(stderr, "  open %s: %s\n", path, d.msg);
        return -1;
    }
    if (moe_expert_src_uses_uring(s) != expect_uring ||
        moe_expert_src_uses_direct(s) != expect_direct) {
        fprintf(stderr, "  %s: uring %d direct %d, expected %d %d\n", path,
                moe_expert_src_uses_uring(s), moe_expert_src_uses_direct(s), expect_uring,
                expect_direct);
        goto out;
    }
    if (moe_expert_src_is_pack(s) ? moe_pack_open(&p, path, 0, &d) < 0
                                  : moe_gguf_open(&g, path, &d) < 0)
        goto out;
    unsigned n;
    struct job *jobs = load_all(s, &n, 0x5a);
    bad = check_jobs(jobs, n, p, g, s);
    struct moe_io_stats st;
    moe_expert_src_stats(s, &st);
    if (st.loads_ok != n || st.loads_failed != 0)
        bad = -1;
    free_jobs(jobs, n);
out:
    moe_pack_close(p);
    moe_gguf_close(g);
    moe_expert_src_close(s);
    return bad;
}

static bool uring_works(void)
{
    char tmp[600];
    snprintf(tmp, sizeof(tmp), "%s/probe", moe_test_tmpdir());
    int fd = open(tmp, O_CREAT | O_WRONLY, 0644);
    if (fd >= 0)
        close(fd);
    struct moe_uring *r = NULL;
    struct moe_uring_config c = { 0 };
    if (moe_uring_open(&r, tmp, &c, NULL) < 0)
        return false;
    bool ok = moe_uring_is_uring(r);
    moe_uring_close(r);
    return ok;
}

static void test_every_mode_same_bytes(void)
{
    const char *names[] = { "tiny-qwen3moe-F16", "tiny-qwen3moe-Q4_K_M", "tiny-gptoss-MXFP4_MOE",
                            "tiny-deepseek2-F32" };
    bool ur = uring_works();
    int tested = 0;
    for (unsigned m = 0; m < 4; m++) {
        char src[600], pk[600];
        if (ref_model(names[m], src, sizeof(src)) == NULL)
            continue;
        char raw[600];
        CHECK(pack_of(src, names[m], 1e-9, pk, sizeof(pk)) == 0);   /* every blob compressed */
        char rname[80];
        snprintf(rname, sizeof(rname), "%s-raw", names[m]);
        CHECK(pack_of(src, rname, 1e9, raw, sizeof(raw)) == 0);     /* every blob raw */
        for (unsigned mode = 0; mode < 3; mode++) {
            /* small requests and a shallow queue: blobs are split and the
             * queue is full most of the time */
            struct moe_io_config c = { .uring = { .queue_depth = 4, .chunk_bytes = 8192 },
                                       .n_threads = 2 };
            if (mode == 1)
                c.uring.force_pread = true;
            if (mode == 2)
                c.uring = (struct moe_uring_config){0};
            bool eu = ur && mode != 1;
            CHECK_MSG(run_source(pk, &c, eu, true) == 0, "%s pack mode %u", names[m], mode);
            CHECK_MSG(run_source(raw, &c, eu, true) == 0, "%s raw pack mode %u", names[m], mode);
            CHECK_MSG(run_source(src, &c, eu, true) == 0, "%s gguf mode %u", names[m], mode);
        }
        tested++;
    }
    if (tested == 0)
        MOE_SKIP("no shared/ref models");
}

/* A GGUF whose expert slices are whole pages (moe-gen Q8_0, 256 x 512:
 * 34 pages each): the store lays each slice out at its file offset within
 * a page and reads it straight into a page-aligned destination; the
 * slices' bytes are the file's in every mode, aligned or not. */
static void test_gguf_direct_layout(void)
{
    const char *gen = getenv("MOE_GEN");
    if (gen == NULL)
        MOE_SKIP("MOE_GEN not set");
    char path[600], cmd[1400];
    snprintf(path, sizeof(path), "%s/pages.gguf", moe_test_tmpdir());
    snprintf(cmd, sizeof(cmd), "%s --arch llama --type Q8_0 --n-embd 256 --n-layer 2 --n-head 4"
             " --n-head-kv 2 --head-dim 64 --n-expert 4 --n-expert-used 2 --n-ff-exp 512 --n-vocab 512"
             " --quiet -o %s", gen, path);
    CHECK(system(cmd) == 0);
    struct moe_diag d = { 0 };
    struct moe_expert_src *s = NULL;
    CHECK_MSG(moe_expert_src_open(&s, path, NULL, &d) == 0, "%s", d.msg);
    const struct moe_expert_layout *L = moe_expert_src_layout(s, 0);
    CHECK(L != NULL && L->n_slices == 3);
    uint64_t prev_end = 0;
    for (uint32_t k = 0; k < L->n_slices; k++) {
        CHECK_INT(L->s[k].size % 4096, ==, 0);
        CHECK_INT(L->s[k].offset % 4096, ==, L->s[k].src_offset % 4096);
        CHECK(L->s[k].offset - L->s[k].offset % 4096 >= prev_end);   /* pages of its own */
        prev_end = (L->s[k].offset + L->s[k].size + 4095) / 4096 * 4096;
    }
    CHECK_INT(L->raw_size, ==, prev_end);
    /* every layer reads straight into slots where O_DIRECT works: its
     * staging buffers wait for a load that cannot go direct (the unaligned
     * destinations of run_source below) */
    CHECK(moe_expert_src_lazy_stages(s) == moe_expert_src_uses_direct(s));
    /* the plan sizes slots by the same layout */
    struct moe_gguf *g = NULL;
    CHECK(moe_gguf_open(&g, path, &d) == 0);
    struct moe_expert_layout *lays = NULL;
    uint32_t nl = 0, ne = 0;
    CHECK(moe_expert_layouts_from_gguf(g, &lays, &nl, &ne, &d) == 0);
    CHECK(moe_expert_layout_direct(&lays[0], 4096));
    CHECK_INT(lays[0].raw_size, ==, L->raw_size);
    moe_free(lays);
    moe_gguf_close(g);
    moe_expert_src_close(s);
    bool ur = uring_works();
    for (unsigned mode = 0; mode < 2; mode++) {
        struct moe_io_config c = { .uring = { .queue_depth = 4, .chunk_bytes = 8192, .force_pread = mode == 1 },
                                   .n_threads = 2 };
        CHECK_MSG(run_source(path, &c, ur && mode == 0, true) == 0, "mode %u", mode);
    }
}

/* ---- the reader alone ------------------------------------------------- */

static int order[8], n_order;

static void note_done(void *arg, int status)
{
    order[n_order++] = status == 0 ? (int)(intptr_t)arg : -1;
}

/* An urgent read overtakes the reads queued before it that have not
 * started; the counters add up (requests, bytes, depth never above the
 * queue's). */
static void test_urgent_reads_first(void)
{
    char path[600];
    snprintf(path, sizeof(path), "%s/urgent.bin", moe_test_tmpdir());
    enum { PART = 16384, N = 5 };
    uint8_t *file = malloc(PART * N);
    for (size_t i = 0; i < PART * N; i++)
        file[i] = (uint8_t)(i * 7 + i / 4096);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL && fwrite(file, 1, PART * N, f) == PART * N);
    fclose(f);
    for (int mode = 0; mode < 2; mode++) {
        struct moe_uring_config c = { .queue_depth = 1, .chunk_bytes = 4096, .force_pread = mode == 1 };
        struct moe_uring *r = NULL;
        CHECK(moe_uring_open(&r, path, &c, NULL) == 0);
        uint8_t *buf = aligned_alloc(4096, PART * N);
        n_order = 0;
        for (int i = 0; i < N - 1; i++)
            CHECK(moe_uring_read(r, (uint64_t)i * PART, buf + i * PART, PART, PART, -1, note_done,
                                 (void *)(intptr_t)i) == 0);
        CHECK(moe_uring_read_urgent(r, (uint64_t)(N - 1) * PART, buf + (N - 1) * PART, PART, PART, -1,
                                    note_done, (void *)(intptr_t)(N - 1)) == 0);
        while (moe_uring_pending(r) > 0)
            CHECK(moe_uring_run(r, true) >= 0);
        CHECK_INT(n_order, ==, N);
        if (moe_uring_is_uring(r)) {
            /* one request in flight: each run finishes at most one read, so
             * callbacks come in completion order (pread finishes them all
             * in one run and calls back last-first) */
            CHECK_INT(order[0], ==, N - 1);   /* nothing had started: the urgent read went first */
            for (int i = 1; i < N; i++)
                CHECK_INT(order[i], ==, i - 1);
        }
        CHECK(memcmp(buf, file, PART * N) == 0);
        struct moe_uring_stats st;
        moe_uring_stats(r, &st);
        CHECK_INT(st.requests, ==, PART * N / 4096);
        CHECK_INT(st.bytes, ==, PART * N);
        CHECK_INT(st.max_depth, ==, 1);
        CHECK(st.depth_s <= st.busy_s + 1e-9 && st.busy_s > 0);
        free(buf);
        moe_uring_close(r);
    }
    free(file);
}

static void test_env_forces_pread(void)
{
    char src[600], pk[600];
    if (ref_model("tiny-mixtral-Q8_0", src, sizeof(src)) == NULL)
        MOE_SKIP("no model");
    CHECK(pack_of(src, "env", 0, pk, sizeof(pk)) == 0);
    setenv("MOE_IO_FORCE_PREAD", "1", 1);
    log_calls = 0;
    struct moe_io_config c = { 0 };
    CHECK(run_source(pk, &c, false, true) == 0);
    CHECK_INT(log_calls, ==, 1);  /* "disabled by configuration", once */
    unsetenv("MOE_IO_FORCE_PREAD");
}

static _Atomic unsigned n_einval;

/* Some filesystems take O_DIRECT at open and refuse the read (EINVAL). */
static int refuse_direct(void *ctx, uint64_t off, size_t len, int res)
{
    (void)ctx;
    (void)off;
    (void)len;
    if (n_einval++ == 0)
        return -EINVAL;
    return res;
}

/* tmpfs refuses O_DIRECT at open before Linux 6.6 and takes it since; the
 * read-time refusal is injected. Either way: buffered reads, logged once,
 * the same bytes. */
static void test_tmpfs_falls_back_to_buffered(void)
{
    struct statfs sf;
    if (statfs("/dev/shm", &sf) < 0 || sf.f_type != 0x01021994 /* TMPFS_MAGIC */)
        MOE_SKIP("no tmpfs at /dev/shm");
    char src[600], pk[600], shm[600];
    if (ref_model("tiny-mixtral-F16", src, sizeof(src)) == NULL)
        MOE_SKIP("no model");
    CHECK(pack_of(src, "shm", 0, pk, sizeof(pk)) == 0);
    snprintf(shm, sizeof(shm), "/dev/shm/moe-test-%d.moe", (int)getpid());
    size_t len;
    void *bytes = moe_test_read_file(pk, &len);
    CHECK(bytes != NULL);
    FILE *f = fopen(shm, "wb");
    CHECK(f != NULL);
    CHECK(fwrite(bytes, 1, len, f) == len);
    fclose(f);
    free(bytes);
    log_calls = 0;
    struct moe_io_config c = { .uring = { .queue_depth = 8 } };
    struct moe_diag d = {0};
    struct moe_expert_src *s = NULL;
    CHECK(moe_expert_src_open(&s, shm, &c, &d) == 0);
    bool direct_at_open = moe_expert_src_uses_direct(s);
    CHECK_INT(log_calls, ==, direct_at_open ? 0 : 1);
    n_einval = 0;
    moe_expert_src_set_fault_hook(s, refuse_direct, NULL);
    unsigned n;
    struct job *jobs = load_all(s, &n, 0);
    struct moe_pack *p = NULL;
    CHECK(moe_pack_open(&p, shm, 0, &d) == 0);
    int rc = check_jobs(jobs, n, p, NULL, s);
    CHECK(!moe_expert_src_uses_direct(s));
    CHECK_INT(log_calls, ==, 1);  /* refused at open or at the first read: one line */
    moe_pack_close(p);
    free_jobs(jobs, n);
    moe_expert_src_close(s);
    unlink(shm);
    CHECK(rc == 0);
}

/* ---- fault injection -------------------------------------------------- */

static _Atomic unsigned n_req;
static uint64_t eio_off = UINT64_MAX;

static int flaky(void *ctx, uint64_t off, size_t len, int res)
{
    (void)ctx;
    /* a hash of the request number, not k % 5: requests that retry in
     * lockstep would otherwise meet the same fault every time */
    uint64_t k = (uint64_t)n_req++ * 0x9e3779b97f4a7c15ull;
    k = (k ^ (k >> 29)) >> 7;
    if (off == eio_off)
        return -EIO;
    if (res <= 0)
        return res;
    switch (k % 5) {
    case 1: return -EAGAIN;
    case 2: return res > 1 ? res / 2 + 1 : res;  /* short, misaligned remainder */
    case 3: return -EINTR;
    default: return (size_t)res == len && len > 4096 ? 4096 : res; /* short, aligned */
    }
}

static void test_injected_faults(void)
{
    char src[600], pk[600];
    if (ref_model("tiny-qwen3moe-Q8_0", src, sizeof(src)) == NULL)
        MOE_SKIP("no model");
    for (unsigned mode = 0; mode < 4; mode++) {
        /* modes 0, 1: every blob compressed; 2, 3: every blob raw (read
         * into the destination directly); odd: pread */
        CHECK(pack_of(src, mode < 2 ? "flaky" : "flaky-raw", mode < 2 ? 1e-9 : 1e9, pk, sizeof(pk)) == 0);
        struct moe_io_config c = { .uring = { .queue_depth = 8, .chunk_bytes = 16384,
                                              .force_pread = mode % 2 == 1 } };
        struct moe_diag d = {0};
        struct moe_expert_src *s = NULL;
        struct moe_pack *p = NULL;
        CHECK(moe_expert_src_open(&s, pk, &c, &d) == 0);
        CHECK(moe_pack_open(&p, pk, 0, &d) == 0);
        /* EIO on the first request of (layer 1, expert 2) */
        struct moe_pack_blob b;
        CHECK(moe_pack_blob(p, 1, 2, &b, &d) == 0);
        eio_off = b.offset;
        n_req = 0;
        moe_expert_src_set_fault_hook(s, flaky, NULL);
        unsigned n;
        struct job *jobs = load_all(s, &n, 0);
        CHECK(n_req > n);
        int failed = 0;
        for (unsigned i = 0; i < n; i++) {
            struct job *j = &jobs[i];
            CHECK(j->calls == 1);
            if (j->layer == 1 && j->expert == 2) {
                CHECK_INT(j->status, ==, -EIO);
                CHECK_MSG(strstr(j->msg, "layer 1, expert 2") != NULL, "%s", j->msg);
                failed++;
                j->status = 0;
                moe_pack_read_expert(p, 1, 2, j->dst, j->size, NULL, &d); /* for check_jobs */
            }
        }
        CHECK_INT(failed, ==, 1);
        CHECK_MSG(check_jobs(jobs, n, p, NULL, s) == 0, "mode %u", mode);
        struct moe_io_stats st;
        moe_expert_src_stats(s, &st);
        CHECK_U64(st.io_errors, ==, 1);
        CHECK_U64(st.loads_ok, ==, n - 1);
        free_jobs(jobs, n);
        eio_off = UINT64_MAX;
        moe_pack_close(p);
        moe_expert_src_close(s);
    }
}

static int patch(const char *path, uint64_t off, const void *p, size_t n)
{
    int fd = open(path, O_RDWR);
    int ok = fd >= 0 && pwrite(fd, p, n, (off_t)off) == (ssize_t)n;
    if (fd >= 0)
        close(fd);
    return ok ? 0 : -1;
}

static void corruption_and_truncation(const char *src, bool raw)
{
    char pk[600];
    CHECK(pack_of(src, raw ? "corrupt-raw" : "corrupt", raw ? 1e9 : 1e-9, pk, sizeof(pk)) == 0);
    struct moe_diag d = {0};
    struct moe_pack *p = NULL;
    CHECK(moe_pack_open(&p, pk, 0, &d) == 0);
    struct moe_pack_blob b;
    CHECK(moe_pack_blob(p, 2, 5, &b, &d) == 0);
    uint32_t nl = moe_pack_n_layer(p), ne = moe_pack_n_expert(p);
    moe_pack_close(p);
    uint8_t x = 0xff;
    CHECK(patch(pk, b.offset + 7, &x, 1) == 0);               /* blob (2, 5) */
    struct pack_header h;
    int fd = open(pk, O_RDONLY);
    CHECK(pread(fd, &h, sizeof(h), 0) == (ssize_t)sizeof(h));
    close(fd);
    uint64_t eoff = h.index_offset + (0 * (uint64_t)ne + 1) * sizeof(struct pack_entry_rec);
    CHECK(patch(pk, eoff + 16, &x, 1) == 0);                  /* raw size of entry (0, 1) */

    struct moe_expert_src *s = NULL;
    CHECK(moe_expert_src_open(&s, pk, NULL, &d) == 0);
    unsigned n;
    struct job *jobs = load_all(s, &n, 0xee);
    CHECK_INT(n, ==, nl * ne);
    for (unsigned i = 0; i < n; i++) {
        struct job *j = &jobs[i];
        if (j->layer == 2 && j->expert == 5) {
            CHECK_INT(j->status, ==, MOE_ECHECKSUM);
            CHECK_INT(j->calls, ==, 1);
            CHECK_MSG(strstr(j->msg, "layer 2, expert 5") != NULL, "%s", j->msg);
            /* a compressed blob never reaches dst; a raw one is read into
             * it before the check (its contents are then unspecified) */
            for (size_t k = 0; k < j->size && !raw; k++)
                CHECK(j->dst[k] == 0xee);
        } else if (j->layer == 0 && j->expert == 1) {
            CHECK_INT(j->status, ==, MOE_EFORMAT);   /* refused at submit */
            CHECK_INT(j->calls, ==, 0);
            CHECK_MSG(strstr(j->msg, "layer 0, expert 1") != NULL, "%s", j->msg);
            for (size_t k = 0; k < j->size; k++)
                CHECK(j->dst[k] == 0xee);
        } else {
            CHECK_MSG(j->status == 0 && j->calls == 1, "(%u,%u) %s", j->layer, j->expert, j->msg);
        }
    }
    struct moe_io_stats st;
    moe_expert_src_stats(s, &st);
    CHECK_U64(st.checksum_errors, ==, 1);
    CHECK_U64(st.format_errors, ==, 1);
    free_jobs(jobs, n);

    /* The file shrinks under an open source: the last blob's read meets
     * the end of the file: MOE_EFORMAT for that expert only. */
    CHECK(moe_pack_open(&p, pk, 0, &d) == 0);
    struct moe_pack_blob last, first;
    CHECK(moe_pack_blob(p, nl - 1, ne - 1, &last, &d) == 0);
    CHECK(moe_pack_blob(p, 0, 0, &first, &d) == 0);
    moe_pack_close(p);
    CHECK(truncate(pk, (off_t)last.offset) == 0);
    uint8_t *dst = malloc(last.raw_size);
    int rc = moe_expert_src_load_sync(s, nl - 1, ne - 1, dst, last.raw_size, &d);
    CHECK_INT(rc, ==, MOE_EFORMAT);
    CHECK_MSG(strstr(d.msg, "end of file") && strstr(d.msg, "expert 7"), "%s", d.msg);
    moe_diag_clear(&d);
    CHECK(moe_expert_src_load_sync(s, 0, 0, dst, first.raw_size, &d) == 0);
    free(dst);
    moe_expert_src_close(s);
}

static void test_corruption_and_truncation(void)
{
    char src[600];
    if (ref_model("tiny-mixtral-F16", src, sizeof(src)) == NULL)
        MOE_SKIP("no model");
    corruption_and_truncation(src, false);
    corruption_and_truncation(src, true);
}

static void test_close_cancels_queued_loads(void)
{
    char src[600], pk[600];
    if (ref_model("tiny-qwen3moe-F16", src, sizeof(src)) == NULL)
        MOE_SKIP("no model");
    CHECK(pack_of(src, "cancel", 0, pk, sizeof(pk)) == 0);
    struct moe_io_config c = { .uring = { .queue_depth = 1, .chunk_bytes = 4096 }, .n_threads = 1,
                               .n_staging = 1 };
    struct moe_diag d = {0};
    struct moe_expert_src *s = NULL;
    CHECK(moe_expert_src_open(&s, pk, &c, &d) == 0);
    const struct moe_expert_layout *L = moe_expert_src_layout(s, 0);
    uint32_t ne = moe_expert_src_n_expert(s);
    struct job *jobs = calloc(ne, sizeof(*jobs));
    B.left = ne;
    for (uint32_t e = 0; e < ne; e++) {
        jobs[e].layer = 0;
        jobs[e].expert = e;
        jobs[e].size = (size_t)L->raw_size;
        jobs[e].dst = malloc(jobs[e].size);
        CHECK(moe_expert_src_load(s, 0, e, jobs[e].dst, jobs[e].size, 0, on_done, &jobs[e],
                                  &d) == 0);
    }
    moe_expert_src_close(s);
    int cancelled = 0;
    for (uint32_t e = 0; e < ne; e++) {
        CHECK_INT(jobs[e].calls, ==, 1);
        CHECK(jobs[e].status == 0 || jobs[e].status == -ECANCELED);
        cancelled += jobs[e].status == -ECANCELED;
        free(jobs[e].dst);
    }
    free(jobs);
    CHECK_INT(B.left, ==, 0);
    fprintf(stderr, "  %d of %u cancelled\n", cancelled, ne);
}

int main(void)
{
    moe_log_set(count_log, NULL); /* the fallback notices go through the library's log hook */
    MOE_TEST_RUN(test_every_mode_same_bytes);
    MOE_TEST_RUN(test_gguf_direct_layout);
    MOE_TEST_RUN(test_urgent_reads_first);
    MOE_TEST_RUN(test_env_forces_pread);
    MOE_TEST_RUN(test_tmpfs_falls_back_to_buffered);
    MOE_TEST_RUN(test_injected_faults);
    MOE_TEST_RUN(test_corruption_and_truncation);
    MOE_TEST_RUN(test_close_cancels_queued_loads);
    return moe_test_exit_code();
}

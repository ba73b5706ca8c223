/* Expert loads over io/uring.h and a decompression pool.
 *
 * Threads: one I/O thread owns the ring: it starts queued loads while a
 * staging buffer is free and runs completions; N pool threads check and
 * decode finished reads into the destinations and run the callbacks.
 * One mutex guards the queues; the I/O thread sleeps in the ring (woken by
 * its eventfd), the pool on a condition variable. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/fault.h"
#include "common/log.h"
#include "common/queue.h"
#include "io/expert_src.h"
#include "io/file.h"

struct stage {
    struct stage *next;
    uint8_t *buf;
    int index;                  /* registered buffer index */
};

struct lreq {
    struct moe_qnode qn;        /* in urgent, prefetch or decode */
    struct moe_expert_src *s;
    uint32_t layer, expert;
    void *dst;
    size_t dst_size;
    moe_expert_done_fn cb;
    void *arg;
    struct moe_pack_blob blob;  /* packs */
    struct stage *st;
    size_t pos[MOE_EXPERT_MAX_SLICES]; /* GGUF: where each slice landed in the stage */
    bool direct;                /* raw blob read into dst; only its unaligned tail is staged */
    bool gguf_direct;           /* GGUF: every slice read straight into dst (no stage, no copy) */
    unsigned reads;             /* outstanding reads */
    int status;
    uint64_t fail_off;          /* where the failed read was */
    bool prefetch;              /* MOE_LOAD_PREFETCH */
    uint64_t t_queued, t_started; /* CLOCK_MONOTONIC ns */
};

struct moe_expert_src {
    char *path;
    struct moe_pack *pack;
    struct moe_gguf *gguf;
    struct moe_expert_layout *layouts;  /* GGUF */
    bool *direct_layer;         /* GGUF: the layer's layout puts slices where O_DIRECT can read them */
    uint32_t n_layer, n_expert;
    struct moe_uring *io;
    size_t align, stage_cap;
    unsigned n_stages, n_workers, n_started;
    unsigned n_reserve;         /* staging buffers prefetches leave free for demand loads */
    struct stage *stages, *free_stages;
    /* GGUF whose every layer is read straight into page-aligned slots: a
     * stage is only a ticket bounding the loads in flight, and its buffer
     * is allocated the first time a load cannot go direct (unaligned dst) */
    bool lazy_stages;
    pthread_t io_thread, *workers;
    bool io_started;
    pthread_mutex_t mu;
    pthread_cond_t pool_cv;
    struct moe_queue urgent, prefetch, decode;
    bool stopping, io_done;
    /* fault injection (common/fault.h): the file ranges of the reads in
     * flight for the targeted expert(s); I/O thread only */
    struct { uint64_t off, end; const struct lreq *r; } fr[32];
    unsigned n_fr;
    _Atomic uint64_t st_ok, st_failed, st_cks, st_fmt, st_io, st_cancel, st_stored, st_raw;
    _Atomic uint64_t st_stage_wait_ns, st_load_ns;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void q_push(struct moe_queue *q, struct lreq *r)
{
    moe_queue_push(q, &r->qn);
}

/* NULL when empty. */
static struct lreq *q_pop(struct moe_queue *q)
{
    struct moe_qnode *n = moe_queue_pop(q);
    return n ? moe_container_of(n, struct lreq, qn) : NULL;
}

static uint64_t down(uint64_t x, uint64_t a) { return x / a * a; }
static uint64_t up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* ---- I/O thread -------------------------------------------------------- */

/* A read of a targeted expert: its range, for the fault hook. */
static void fault_track(struct moe_expert_src *s, const struct lreq *r, uint64_t off, uint64_t len)
{
    const enum moe_fault_kind k = moe_fault_spec()->kind;
    if (k == MOE_FAULT_NONE || s->n_fr == sizeof(s->fr) / sizeof(s->fr[0]) ||
        !moe_fault_wants(k, (long)r->layer, (long)r->expert))
        return;
    s->fr[s->n_fr].off = off;
    s->fr[s->n_fr].end = off + len;
    s->fr[s->n_fr++].r = r;
}

static void fault_untrack(struct moe_expert_src *s, const struct lreq *r)
{
    for (unsigned i = 0; i < s->n_fr;)
        if (s->fr[i].r == r)
            s->fr[i] = s->fr[--s->n_fr];
        else
            i++;
}

/* The reader's fault hook: changes the result of a read that overlaps a
 * targeted expert's bytes (I/O thread). */
static int fault_hook(void *ctx, uint64_t offset, size_t len, int res)
{
    struct moe_expert_src *s = ctx;
    bool hit = false;
    for (unsigned i = 0; i < s->n_fr && !hit; i++)
        hit = offset < s->fr[i].end && offset + len > s->fr[i].off;
    if (!hit)
        return res;
    const enum moe_fault_kind k = moe_fault_spec()->kind;
    switch (k) {
    case MOE_FAULT_EIO:
        return moe_fault_fire(k, -1, -1) ? -EIO : res;
    case MOE_FAULT_EAGAIN:
        return moe_fault_fire(k, -1, -1) ? -EAGAIN : res;
    case MOE_FAULT_EOF:
        return moe_fault_fire(k, -1, -1) ? 0 : res;
    case MOE_FAULT_SHORT:
        return res > 1 && moe_fault_fire(k, -1, -1) ? res / 2 : res;
    default:
        return res;
    }
}

static void read_done(void *arg, int status)
{
    struct lreq *r = arg;
    if (status < 0 && r->status == 0)
        r->status = status;
    if (--r->reads > 0)
        return;
    struct moe_expert_src *s = r->s;
    if (s->n_fr)
        fault_untrack(s, r);
    pthread_mutex_lock(&s->mu);
    q_push(&s->decode, r);
    pthread_cond_signal(&s->pool_cv);
    pthread_mutex_unlock(&s->mu);
}

/* The stage's buffer, allocated on first use where stages are lazy. */
static int stage_buf(struct moe_expert_src *s, struct lreq *r)
{
    if (r->st->buf != NULL)
        return 0;
    void *p = NULL;
    if (posix_memalign(&p, s->align, s->stage_cap) != 0)
        return -ENOMEM;
    r->st->buf = p;
    return 0;
}

/* Queues the reads of one load (I/O thread, mutex held). */
static void start_reads(struct moe_expert_src *s, struct lreq *r)
{
    const uint64_t A = s->align;
    int rc = 0;
    /* a demand load's reads overtake the queued reads of prefetches */
    int (*const read)(struct moe_uring *, uint64_t, void *, size_t, size_t, int, moe_uring_done_fn,
                      void *) = r->prefetch ? moe_uring_read : moe_uring_read_urgent;
    const uint64_t n = r->blob.stored_size;
    r->direct = s->pack && r->blob.codec == MOE_CODEC_RAW && n == r->dst_size && n == r->blob.raw_size &&
                r->blob.offset % A == 0 && (uintptr_t)r->dst % A == 0 && n >= A;
    if (r->direct) {
        /* A raw blob is the expert itself: its aligned bulk goes straight
         * into the destination (no copy on the decode worker, which on a
         * small machine competes with compute), the tail through the stage */
        const uint64_t bulk = down(n, A), tail = n - bulk;
        r->reads = tail ? 2 : 1;
        r->fail_off = r->blob.offset;
        fault_track(s, r, r->blob.offset, n);
        rc = read(s->io, r->blob.offset, r->dst, (size_t)bulk, (size_t)bulk, -1, read_done, r);
        if (rc < 0) {
            r->reads = 0;
        } else if (tail) {
            rc = read(s->io, r->blob.offset + bulk, r->st->buf, (size_t)up(tail, A), (size_t)tail,
                                r->st->index, read_done, r);
            if (rc < 0) {
                r->fail_off = r->blob.offset + bulk;
                r->reads--; /* the bulk read still completes */
            }
        }
    } else if (s->pack) {
        size_t len = (size_t)up(r->blob.stored_size, A);
        r->reads = 1;
        fault_track(s, r, r->blob.offset, r->blob.stored_size);
        r->fail_off = r->blob.offset;
        rc = read(s->io, r->blob.offset, r->st->buf, len, (size_t)r->blob.stored_size,
                            r->st->index, read_done, r);
        if (rc < 0)
            r->reads = 0;
    } else {
        /* one aligned superset read per slice: straight into dst where the
         * layer's layout puts each slice at its file offset within a page
         * (moe_expert_layout_direct) and dst is page-aligned, else into
         * the stage, from which the worker copies the slices */
        const struct moe_expert_layout *L = &s->layouts[r->layer];
        size_t pos = 0;
        r->reads = L->n_slices;
        r->gguf_direct = s->direct_layer[r->layer] && (uintptr_t)r->dst % A == 0 && r->dst_size % A == 0;
        for (uint32_t k = 0; k < L->n_slices; k++) {
            const struct moe_expert_slice *sl = &L->s[k];
            uint64_t off = sl->src_offset + (uint64_t)r->expert * sl->size;
            uint64_t a0 = down(off, A), a1 = up(off + sl->size, A);
            r->pos[k] = pos + (size_t)(off - a0);
            fault_track(s, r, off, sl->size);
            if (r->gguf_direct) {
                /* [a0, a1) lands on [offset - (off - a0), ...): whole pages
                 * of dst that no other slice's read touches */
                uint8_t *d = (uint8_t *)r->dst + sl->offset - (off - a0);
                rc = read(s->io, a0, d, (size_t)(a1 - a0), (size_t)(off + sl->size - a0), -1,
                                    read_done, r);
            } else {
                rc = stage_buf(s, r);
                if (rc == 0)
                    rc = read(s->io, a0, r->st->buf + pos, (size_t)(a1 - a0), (size_t)(off + sl->size - a0),
                              s->lazy_stages ? -1 : r->st->index, read_done, r);
            }
            if (rc < 0) {
                r->fail_off = a0;
                r->reads -= L->n_slices - k; /* those never start */
                break;
            }
            pos += (size_t)(a1 - a0);
        }
    }
    if (rc < 0) {
        r->status = rc;
        if (r->reads == 0) {
            fault_untrack(s, r);
            q_push(&s->decode, r);
        }
        pthread_cond_signal(&s->pool_cv);
    }
}

static void *io_main(void *arg)
{
    struct moe_expert_src *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        if (s->stopping) {
            struct lreq *r;
            while ((r = q_pop(&s->urgent)) || (r = q_pop(&s->prefetch))) {
                r->status = -ECANCELED;
                q_push(&s->decode, r);
            }
            pthread_cond_broadcast(&s->pool_cv);
            if (moe_uring_pending(s->io) == 0)
                break;
        }
        /* prefetches leave a few buffers to demand loads, which would
         * otherwise wait behind them for one */
        for (;;) {
            unsigned nfree = 0;
            for (const struct stage *st = s->free_stages; st && nfree <= s->n_reserve; st = st->next)
                nfree++;
            const bool urg = !moe_queue_empty(&s->urgent);
            if (nfree == 0 || (!urg && (moe_queue_empty(&s->prefetch) || nfree <= s->n_reserve)))
                break;
            struct lreq *r = urg ? q_pop(&s->urgent) : q_pop(&s->prefetch);
            r->st = s->free_stages;
            s->free_stages = r->st->next;
            r->t_started = now_ns();
            if (!r->prefetch)
                s->st_stage_wait_ns += r->t_started - r->t_queued;
            start_reads(s, r);
        }
        pthread_mutex_unlock(&s->mu);
        int rc = moe_uring_run(s->io, true);
        pthread_mutex_lock(&s->mu);
        if (rc < 0) {
            /* The ring itself failed: nothing more can be read. */
            moe_log(MOE_LOG_ERROR, "io: %s: io_uring failed (%s); failing all loads", s->path,
                    strerror(-rc));
            s->stopping = true;
        }
    }
    s->io_done = true;
    pthread_cond_broadcast(&s->pool_cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- pool --------------------------------------------------------------- */

static int decode(struct moe_expert_src *s, struct lreq *r, struct moe_codec_dctx *d,
                  struct moe_diag *diag)
{
    if (r->status < 0) {
        if (r->status == -ECANCELED)
            return moe_diag_set(diag, -ECANCELED, "%s: expert (layer %u, expert %u): cancelled",
                                s->path, r->layer, r->expert);
        return moe_diag_set(diag, r->status, "%s: expert (layer %u, expert %u): read at offset "
                            "0x%" PRIx64 " failed: %s", s->path, r->layer, r->expert,
                            r->fail_off, r->status == MOE_EFORMAT ? "unexpected end of file "
                            "(truncated?)" : moe_strerror(r->status));
    }
    /* fault injection: one flipped byte of the blob as read */
    const bool flip = s->pack && moe_fault_spec()->kind == MOE_FAULT_CHECKSUM &&
                      moe_fault_fire(MOE_FAULT_CHECKSUM, (long)r->layer, (long)r->expert);
    if (r->direct) {
        const uint64_t bulk = down(r->blob.stored_size, s->align);
        memcpy((uint8_t *)r->dst + bulk, r->st->buf, (size_t)(r->blob.stored_size - bulk));
        if (flip)
            ((uint8_t *)r->dst)[r->blob.stored_size / 2] ^= 0x5a;
        return moe_pack_check_blob(s->pack, &r->blob, r->dst, diag);
    }
    if (flip)
        r->st->buf[r->blob.stored_size / 2] ^= 0x5a;
    if (s->pack)
        return moe_pack_decode_blob(s->pack, &r->blob, d, r->st->buf, r->dst, r->dst_size, diag);
    if (r->gguf_direct)
        return 0;   /* every slice is where it belongs; padding holds the file's neighbouring bytes */
    const struct moe_expert_layout *L = &s->layouts[r->layer];
    uint8_t *dst = r->dst;
    uint64_t end = 0;
    for (uint32_t k = 0; k < L->n_slices; k++) {
        memset(dst + end, 0, (size_t)(L->s[k].offset - end));  /* padding */
        memcpy(dst + L->s[k].offset, r->st->buf + r->pos[k], (size_t)L->s[k].size);
        end = L->s[k].offset + L->s[k].size;
    }
    return 0;
}

static void *pool_main(void *arg)
{
    struct moe_expert_src *s = arg;
    struct moe_codec_dctx *d = NULL;
    int derr = moe_codec_dctx_create(&d);
    pthread_mutex_lock(&s->mu);
    for (;;) {
        struct lreq *r = q_pop(&s->decode);
        if (r == NULL) {
            if (s->io_done)
                break;
            pthread_cond_wait(&s->pool_cv, &s->mu);
            continue;
        }
        pthread_mutex_unlock(&s->mu);
        struct moe_diag diag = {0};
        /* a decoder context refused once (memory pressure, an injected
         * fault) is asked for again: one load fails, not every later one
         * this worker takes */
        if (derr < 0)
            derr = moe_codec_dctx_create(&d);
        int rc = derr < 0 ? moe_diag_set(&diag, -ENOMEM, "%s: out of memory", s->path)
                          : decode(s, r, d, &diag);
        pthread_mutex_lock(&s->mu);
        if (r->st) {
            r->st->next = s->free_stages;
            s->free_stages = r->st;
        }
        pthread_mutex_unlock(&s->mu);
        moe_uring_wake(s->io);
        if (r->t_started)
            s->st_load_ns += now_ns() - r->t_started;
        if (rc == 0) {
            s->st_ok++;
            s->st_stored += s->pack ? r->blob.stored_size : r->dst_size;
            s->st_raw += r->dst_size;
        } else {
            s->st_failed++;
            if (rc == MOE_ECHECKSUM)
                s->st_cks++;
            else if (rc == MOE_EFORMAT)
                s->st_fmt++;
            else if (rc == -ECANCELED)
                s->st_cancel++;
            else
                s->st_io++;
        }
        r->cb(r->arg, r->layer, r->expert, rc, &diag);
        moe_free(r);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    moe_codec_dctx_destroy(d);
    return NULL;
}

/* ---- open/close ------------------------------------------------------- */

unsigned moe_expert_src_n_staging(const struct moe_io_config *cfg, size_t stage_cap)
{
    const struct moe_io_config c = cfg ? *cfg : (struct moe_io_config){ 0 };
    if (c.n_staging)
        return c.n_staging;
    const unsigned threads = c.n_threads == 0 ? 2 : c.n_threads > 64 ? 64 : c.n_threads;
    const uint64_t qd = c.uring.queue_depth ? c.uring.queue_depth : MOE_URING_DEFAULT_QD;
    const uint64_t chunk = c.uring.chunk_bytes ? c.uring.chunk_bytes : MOE_URING_DEFAULT_CHUNK;
    const uint64_t cap = stage_cap ? stage_cap : 1;
    /* enough blobs to keep the queue full, plus one per decoder */
    const uint64_t fill = (qd * chunk + cap - 1) / cap;
    return threads + 1 + (unsigned)(fill < 64 ? fill : 64);
}

int moe_expert_src_open(struct moe_expert_src **out, const char *path,
                        const struct moe_io_config *cfg, struct moe_diag *diag)
{
    *out = NULL;
    struct moe_io_config c = cfg ? *cfg : (struct moe_io_config){0};
    if (c.n_threads == 0)
        c.n_threads = 2;
    if (c.n_threads > 64)
        c.n_threads = 64;
    struct moe_expert_src *s = moe_calloc(1, sizeof(*s));
    if (s == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
    int rc;
    bool sync_ok = false;
    s->path = moe_strndup(path, strlen(path));
    if (s->path == NULL) {
        rc = moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    enum moe_file_kind kind;
    if ((rc = moe_file_probe(path, &kind, diag)) < 0)
        goto fail;
    uint64_t max_stage = 0;
    if (kind == MOE_FILE_PACK) {
        rc = moe_pack_open(&s->pack, path, 0, diag);
        if (rc < 0)
            goto fail;
        s->n_layer = moe_pack_n_layer(s->pack);
        s->n_expert = moe_pack_n_expert(s->pack);
        max_stage = moe_pack_max_stored(s->pack);
    } else if (kind == MOE_FILE_GGUF) {
        rc = moe_gguf_open(&s->gguf, path, diag);
        if (rc < 0)
            goto fail;
        if (moe_gguf_n_parts(s->gguf) > 1) {
            /* the reader reads one file; a split set's experts span several */
            rc = moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: a split GGUF (%u parts) with an expert"
                              " cache budget: pack it first (moectl pack %s -o MODEL.moe) or serve"
                              " it without a budget (experts resident)", path,
                              moe_gguf_n_parts(s->gguf), path);
            goto fail;
        }
        rc = moe_expert_layouts_from_gguf(s->gguf, &s->layouts, &s->n_layer, &s->n_expert, diag);
        if (rc < 0)
            goto fail;
    } else {
        rc = moe_diag_set(diag, MOE_EFORMAT, "%s: neither a .moe pack nor a GGUF (bad magic)", path);
        goto fail;
    }
    rc = moe_uring_open(&s->io, path, &c.uring, diag);
    if (rc < 0)
        goto fail;
    s->align = moe_uring_align(s->io) > 4096 ? moe_uring_align(s->io) : 4096;
    if (s->gguf) {
        /* the layouts the plan sizes slots by (model/plan.c) are made the
         * same way, with 4096 */
        s->direct_layer = moe_calloc(s->n_layer ? s->n_layer : 1, sizeof(bool));
        if (s->direct_layer == NULL) {
            rc = moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
            goto fail;
        }
        for (uint32_t l = 0; l < s->n_layer; l++)
            s->direct_layer[l] = moe_expert_layout_direct(&s->layouts[l], MOE_EXPERT_DIRECT_ALIGN) &&
                                 s->align == MOE_EXPERT_DIRECT_ALIGN && moe_uring_is_direct(s->io);
        for (uint32_t l = 0; l < s->n_layer; l++) {
            uint64_t need = 0;
            for (uint32_t k = 0; k < s->layouts[l].n_slices; k++)
                need += up(s->layouts[l].s[k].size, s->align) + s->align;
            if (need > max_stage)
                max_stage = need;
        }
    }
    s->stage_cap = (size_t)up(max_stage ? max_stage : 1, s->align);
    if (c.n_staging == 0)
        c.n_staging = moe_expert_src_n_staging(&c, s->stage_cap);
    s->n_stages = c.n_staging;
    s->lazy_stages = s->gguf != NULL && s->n_layer > 0;
    for (uint32_t l = 0; s->lazy_stages && l < s->n_layer; l++)
        s->lazy_stages = s->layouts[l].n_slices == 0 || s->direct_layer[l];
    s->n_reserve = s->n_stages > 3 ? 2 : s->n_stages > 1 ? 1 : 0;
    s->stages = moe_calloc(s->n_stages, sizeof(*s->stages));
    struct iovec *iov = moe_calloc(s->n_stages, sizeof(*iov));
    if (s->stages == NULL || iov == NULL) {
        moe_free(iov);
        rc = moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    for (unsigned i = 0; i < s->n_stages; i++) {
        /* CUDA: these would be cudaHostRegister'ed too, so that raw blobs
         * can be uploaded straight from the staging buffer. */
        void *p = NULL;
        if (!s->lazy_stages && posix_memalign(&p, s->align, s->stage_cap) != 0) {
            moe_free(iov);
            rc = moe_diag_set(diag, -ENOMEM, "%s: out of memory (%u staging buffers of %zu bytes)",
                              path, s->n_stages, s->stage_cap);
            goto fail;
        }
        s->stages[i].buf = p;
        s->stages[i].index = (int)i;
        s->stages[i].next = s->free_stages;
        s->free_stages = &s->stages[i];
        iov[i] = (struct iovec){ p, s->stage_cap };
    }
    if (!s->lazy_stages)
        moe_uring_register_buffers(s->io, iov, s->n_stages);
    moe_free(iov);
    /* fault injection (tests: MOE_FAULT_INJECT, or moe_fault_set in-process);
     * without a fault the hook sees no tracked range and returns at once */
    moe_uring_set_fault_hook(s->io, fault_hook, s);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->pool_cv, NULL);
    sync_ok = true;
    s->workers = moe_calloc(c.n_threads, sizeof(*s->workers));
    if (s->workers == NULL) {
        rc = moe_diag_set(diag, -ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    for (; s->n_started < c.n_threads; s->n_started++)
        if (pthread_create(&s->workers[s->n_started], NULL, pool_main, s) != 0)
            break;
    if (s->n_started == 0 || pthread_create(&s->io_thread, NULL, io_main, s) != 0) {
        rc = moe_diag_set(diag, -EAGAIN, "%s: cannot start I/O threads", path);
        goto fail;
    }
    s->io_started = true;
    *out = s;
    return 0;
fail:
    if (!sync_ok) {
        pthread_mutex_init(&s->mu, NULL);
        pthread_cond_init(&s->pool_cv, NULL);
    }
    moe_expert_src_close(s);
    return rc;
}

void moe_expert_src_close(struct moe_expert_src *s)
{
    if (s == NULL)
        return;
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    if (!s->io_started)
        s->io_done = true;
    pthread_cond_broadcast(&s->pool_cv);
    pthread_mutex_unlock(&s->mu);
    if (s->io_started) {
        moe_uring_wake(s->io);
        pthread_join(s->io_thread, NULL);
    }
    for (unsigned i = 0; i < s->n_started; i++)
        pthread_join(s->workers[i], NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->pool_cv);
    moe_uring_close(s->io);
    for (unsigned i = 0; s->stages && i < s->n_stages; i++)
        free(s->stages[i].buf);
    moe_free(s->stages);
    moe_free(s->workers);
    moe_free(s->layouts);
    moe_free(s->direct_layer);
    moe_gguf_close(s->gguf);
    moe_pack_close(s->pack);
    moe_free(s->path);
    moe_free(s);
}

bool moe_expert_src_is_pack(const struct moe_expert_src *s) { return s->pack != NULL; }
const struct moe_pack *moe_expert_src_pack(const struct moe_expert_src *s) { return s->pack; }
uint32_t moe_expert_src_n_layer(const struct moe_expert_src *s) { return s->n_layer; }
uint32_t moe_expert_src_n_expert(const struct moe_expert_src *s) { return s->n_expert; }
bool moe_expert_src_uses_uring(const struct moe_expert_src *s) { return moe_uring_is_uring(s->io); }
bool moe_expert_src_uses_direct(const struct moe_expert_src *s) { return moe_uring_is_direct(s->io); }
bool moe_expert_src_lazy_stages(const struct moe_expert_src *s) { return s->lazy_stages; }

const struct moe_gguf *moe_expert_src_gguf(const struct moe_expert_src *s)
{
    return s->pack ? moe_pack_gguf(s->pack) : s->gguf;
}

const struct moe_expert_layout *moe_expert_src_layout(const struct moe_expert_src *s,
                                                      uint32_t layer)
{
    if (s->pack)
        return moe_pack_layout(s->pack, layer);
    if (layer >= s->n_layer || s->layouts[layer].n_slices == 0)
        return NULL;
    return &s->layouts[layer];
}

void moe_expert_src_set_fault_hook(struct moe_expert_src *s, moe_uring_fault_fn fn, void *ctx)
{
    pthread_mutex_lock(&s->mu);
    moe_uring_set_fault_hook(s->io, fn, ctx);
    pthread_mutex_unlock(&s->mu);
}

int moe_expert_src_load(struct moe_expert_src *s, uint32_t layer, uint32_t expert, void *dst,
                        size_t dst_size, unsigned flags, moe_expert_done_fn cb, void *arg,
                        struct moe_diag *diag)
{
    const struct moe_expert_layout *L = moe_expert_src_layout(s, layer);
    if (L == NULL || expert >= s->n_expert)
        return moe_diag_set(diag, -ENOENT, "%s: no expert (layer %u, expert %u): %u layers x %u "
                            "experts", s->path, layer, expert, s->n_layer, s->n_expert);
    if (dst_size != L->raw_size || dst == NULL || cb == NULL)
        return moe_diag_set(diag, -EINVAL, "%s: expert (layer %u, expert %u): destination of %zu "
                            "bytes, the expert has %" PRIu64, s->path, layer, expert, dst_size,
                            L->raw_size);
    struct moe_pack_blob b = {0};
    if (s->pack) {
        int rc = moe_pack_blob(s->pack, layer, expert, &b, diag);
        if (rc < 0) {
            s->st_fmt += rc == MOE_EFORMAT;
            return rc;
        }
    }
    struct lreq *r = moe_calloc(1, sizeof(*r));
    if (r == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: expert (layer %u, expert %u): out of memory for the"
                            " load", s->path, layer, expert);
    *r = (struct lreq){ .s = s, .layer = layer, .expert = expert, .dst = dst,
                        .dst_size = dst_size, .cb = cb, .arg = arg, .blob = b,
                        .prefetch = (flags & MOE_LOAD_PREFETCH) != 0, .t_queued = now_ns() };
    pthread_mutex_lock(&s->mu);
    if (s->stopping) {
        pthread_mutex_unlock(&s->mu);
        moe_free(r);
        return moe_diag_set(diag, -ECANCELED, "%s: closing", s->path);
    }
    q_push(flags & MOE_LOAD_PREFETCH ? &s->prefetch : &s->urgent, r);
    pthread_mutex_unlock(&s->mu);
    moe_uring_wake(s->io);
    return 0;
}

unsigned moe_expert_src_cancel_prefetches(struct moe_expert_src *s,
                                          bool (*stale)(void *ctx, void *arg, uint32_t layer,
                                                        uint32_t expert),
                                          void *ctx)
{
    /* One pass sorts the queue into what stays (in its order) and what
     * goes; the callbacks run after the lock is dropped. */
    struct moe_queue keep = { 0 }, gone = { 0 };
    pthread_mutex_lock(&s->mu);
    struct lreq *r;
    while ((r = q_pop(&s->prefetch)) != NULL)
        q_push(stale(ctx, r->arg, r->layer, r->expert) ? &gone : &keep, r);
    s->prefetch = keep;
    pthread_mutex_unlock(&s->mu);
    const unsigned n = (unsigned)gone.n;
    while ((r = q_pop(&gone)) != NULL) {
        struct moe_diag d = { 0 };
        moe_diag_set(&d, -ECANCELED, "%s: expert (layer %u, expert %u): prefetch cancelled", s->path,
                     r->layer, r->expert);
        s->st_cancel++;
        r->cb(r->arg, r->layer, r->expert, -ECANCELED, &d);
        moe_free(r);
    }
    return n;
}

struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
    int status;
    struct moe_diag diag;
};

static void sync_done(void *arg, uint32_t layer, uint32_t expert, int status,
                      const struct moe_diag *diag)
{
    (void)layer;
    (void)expert;
    struct waiter *w = arg;
    pthread_mutex_lock(&w->mu);
    w->status = status;
    if (status < 0)
        w->diag = *diag;
    w->done = true;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

int moe_expert_src_load_sync(struct moe_expert_src *s, uint32_t layer, uint32_t expert,
                             void *dst, size_t dst_size, struct moe_diag *diag)
{
    struct waiter w = { .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER };
    int rc = moe_expert_src_load(s, layer, expert, dst, dst_size, 0, sync_done, &w, diag);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    if (w.status < 0)
        moe_diag_set(diag, w.status, "%s", w.diag.msg);
    return w.status;
}

void moe_expert_src_stats(struct moe_expert_src *s, struct moe_io_stats *o)
{
    *o = (struct moe_io_stats){ .loads_ok = s->st_ok, .loads_failed = s->st_failed,
                                .checksum_errors = s->st_cks, .format_errors = s->st_fmt,
                                .io_errors = s->st_io, .cancelled = s->st_cancel,
                                .stored_bytes = s->st_stored, .raw_bytes = s->st_raw,
                                .read_retries = moe_uring_retries(s->io),
                                .queue_depth = moe_uring_queue_depth(s->io), .n_staging = s->n_stages,
                                .stage_wait_s = (double)s->st_stage_wait_ns * 1e-9,
                                .load_s = (double)s->st_load_ns * 1e-9 };
    moe_uring_stats(s->io, &o->ring);
}

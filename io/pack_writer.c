/* .moe pack writer: GGUF in, pack out (doc/pack-format.md).
 *
 * Blobs are produced by worker threads into a ring of slots and written in
 * (layer, expert) order by the calling thread, so memory is bounded by the
 * number of slots times the largest expert, not by the model. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "common/alloc.h"
#include "io/file.h"
#include "io/pack-impl.h"
#include "common/dtype.h"

#define COPY_CHUNK (4u << 20)

static uint64_t align_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) / a * a;
}

/* Encoded size of a metadata value's body (GGUF v2/v3: u64 lengths). */
static uint64_t value_bytes(const struct moe_gguf_value *v)
{
    switch (v->type) {
    case MOE_GGUF_STRING:
        return 8 + v->v.str.len;
    case MOE_GGUF_ARRAY: {
        uint64_t n = 12;
        if (v->v.arr.elem_type == MOE_GGUF_STRING) {
            const struct moe_gguf_str *s = v->v.arr.data;
            for (uint64_t i = 0; i < v->v.arr.n; i++)
                n += 8 + s[i].len;
        } else if (v->v.arr.elem_type == MOE_GGUF_ARRAY) {
            const struct moe_gguf_value *a = v->v.arr.data;
            for (uint64_t i = 0; i < v->v.arr.n; i++)
                n += value_bytes(&a[i]);
        } else {
            n += v->v.arr.n * moe_gguf_type_size(v->v.arr.elem_type);
        }
        return n;
    }
    default:
        return moe_gguf_type_size(v->type);
    }
}

/* ---- the blob pipeline ----------------------------------------------- */

enum { SLOT_FREE, SLOT_BUSY, SLOT_DONE };

struct slot {
    uint8_t *raw, *grp, *cbuf;
    size_t cbuf_cap;
    int state;
    uint64_t idx;
    const uint8_t *out;
    size_t out_n;
    uint32_t codec;
    uint64_t xxh3;
    int err;
    struct moe_diag diag;
};

struct job {
    uint32_t layer, expert;
};

struct wctx {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t next_claim, next_write, n_jobs;
    struct job *jobs;
    unsigned n_slots;
    struct slot *slots;
    bool abort;
    int src_fd;                 /* the source, or its first split part */
    int *part_fds;              /* split sets: parts 2..n (index part - 1) */
    uint32_t n_parts;
    const char *src;
    const struct moe_expert_layout *layouts;
    int level;
    double min_ratio;
};

static int produce(struct wctx *w, struct moe_codec_cctx *cc, struct slot *s, const struct job *j)
{
    const struct moe_expert_layout *L = &w->layouts[j->layer];
    size_t raw_n = (size_t)L->raw_size;
    memset(s->raw, 0, raw_n);
    for (uint32_t k = 0; k < L->n_slices; k++) {
        const struct moe_expert_slice *sl = &L->s[k];
        const int fd = sl->src_part > 0 && sl->src_part < w->n_parts ? w->part_fds[sl->src_part - 1]
                                                                   : w->src_fd;
        int rc = moe_file_pread(fd, s->raw + sl->offset, (size_t)sl->size,
                                sl->src_offset + (uint64_t)j->expert * sl->size, NULL);
        if (rc < 0)
            return moe_diag_set(&s->diag, rc, "%s: tensor %s, expert %u: read failed: %s", w->src,
                                sl->name, j->expert, moe_strerror(rc));
    }
    const uint8_t *in = s->raw;
    if (L->n_groups) {
        moe_codec_bg16_encode(s->grp, s->raw, raw_n, L->groups, L->n_groups);
        in = s->grp;
    }
    size_t cn = 0;
    int rc = moe_codec_compress(cc, s->cbuf, s->cbuf_cap, &cn, in, raw_n);
    if (rc < 0)
        return moe_diag_set(&s->diag, rc, "%s: blob (layer %u, expert %u): zstd failed", w->src,
                            j->layer, j->expert);
    if (cn > 0 && (double)raw_n / (double)cn >= w->min_ratio) {
        s->out = s->cbuf;
        s->out_n = cn;
        s->codec = L->n_groups ? MOE_CODEC_ZSTD_BG16 : MOE_CODEC_ZSTD;
    } else {
        s->out = s->raw;
        s->out_n = raw_n;
        s->codec = MOE_CODEC_RAW;
    }
    s->xxh3 = XXH3_64bits(s->out, s->out_n);
    return 0;
}

static void *worker(void *arg)
{
    struct wctx *w = arg;
    struct moe_codec_cctx *cc = NULL;
    int cerr = moe_codec_cctx_create(&cc, w->level);
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->abort && w->next_claim < w->n_jobs &&
               w->next_claim >= w->next_write + w->n_slots)
            pthread_cond_wait(&w->cv, &w->mu);
        if (w->abort || w->next_claim >= w->n_jobs)
            break;
        uint64_t idx = w->next_claim++;
        struct slot *s = &w->slots[idx % w->n_slots];
        s->state = SLOT_BUSY;
        s->idx = idx;
        pthread_mutex_unlock(&w->mu);
        moe_diag_clear(&s->diag);
        s->err = cerr < 0 ? moe_diag_set(&s->diag, cerr, "%s: out of memory", w->src)
                          : produce(w, cc, s, &w->jobs[idx]);
        pthread_mutex_lock(&w->mu);
        s->state = SLOT_DONE;
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    moe_codec_cctx_destroy(cc);
    return NULL;
}

/* ---- temporary file -------------------------------------------------- */

/* Creates "<dst>.tmp" exclusively and locks it. A leftover one nobody
 * holds (a killed pack) is removed first; a locked one is -EBUSY. */
static int tmp_create(const char *tmp, bool *removed, struct moe_diag *diag)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        int fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd >= 0) {
            if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
                int e = errno;
                close(fd);
                return moe_diag_set(diag, -e, "%s: lock: %s", tmp, strerror(e));
            }
            return fd;
        }
        if (errno != EEXIST)
            return moe_diag_set(diag, -errno, "%s: %s", tmp, strerror(errno));
        int old = open(tmp, O_RDONLY | O_CLOEXEC);
        if (old >= 0) {
            if (flock(old, LOCK_EX | LOCK_NB) < 0) {
                close(old);
                return moe_diag_set(diag, -EBUSY, "%s: another pack is writing this file", tmp);
            }
            close(old);
        }
        if (unlink(tmp) < 0 && errno != ENOENT)
            return moe_diag_set(diag, -errno, "%s: cannot remove the leftover temporary file: %s",
                                tmp, strerror(errno));
        *removed = true;
    }
    return moe_diag_set(diag, -EEXIST, "%s: keeps reappearing; another pack is running?", tmp);
}

static int fsync_dir_of(const char *path)
{
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == dir)
        dir[1] = 0;
    else
        *slash = 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

/* ---- dense section ---------------------------------------------------- */

struct dense_out {
    int fd;
    uint64_t pos;          /* absolute */
    XXH3_state_t *h;
    const char *tmp;
};

static int dense_put(struct dense_out *o, const void *p, size_t n, struct moe_diag *diag)
{
    int rc = moe_file_pwrite(o->fd, p, n, o->pos);
    if (rc < 0)
        return moe_diag_set(diag, rc, "%s: write: %s", o->tmp, strerror(-rc));
    XXH3_64bits_update(o->h, p, n);
    o->pos += n;
    return 0;
}

static int dense_zero(struct dense_out *o, uint64_t n, struct moe_diag *diag)
{
    static const uint8_t z[4096];
    while (n > 0) {
        size_t k = n < sizeof(z) ? (size_t)n : sizeof(z);
        int rc = dense_put(o, z, k, diag);
        if (rc < 0)
            return rc;
        n -= k;
    }
    return 0;
}

static bool is_split_key(const char *key)
{
    return strncmp(key, "split.", 6) == 0;
}

/* Copies the source's bytes [from, to) into the dense section. */
static int copy_range(int src_fd, uint64_t from, uint64_t to, struct dense_out *o, uint8_t *buf,
                      const char *src, struct moe_diag *diag)
{
    int rc = 0;
    for (uint64_t off = from; rc == 0 && off < to;) {
        size_t k = to - off < COPY_CHUNK ? (size_t)(to - off) : COPY_CHUNK;
        rc = moe_file_pread(src_fd, buf, k, off, NULL);
        if (rc < 0)
            return moe_diag_set(diag, rc, "%s: reading metadata: %s", src, moe_strerror(rc));
        rc = dense_put(o, buf, k, diag);
        off += k;
    }
    return rc;
}

/* Writes the embedded GGUF (v3): the source's key/values byte for byte and
 * its non-expert tensors. */
static int write_dense(const struct moe_gguf *g, int src_fd, struct dense_out *o,
                       uint8_t *buf, struct moe_diag *diag)
{
    const char *src = moe_gguf_path(g);
    const uint64_t n_kv_src = moe_gguf_n_kv(g);
    uint64_t n_kv = 0, kv_end = 24;
    for (uint64_t i = 0; i < n_kv_src; i++) {
        const struct moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        if (kv->file_offset != kv_end)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: key %s at offset %" PRIu64 ", expected %"
                                PRIu64 " (unexpected metadata layout)", src, kv->key,
                                kv->file_offset, kv_end);
        kv_end += 8 + strlen(kv->key) + 4 + value_bytes(&kv->value);
        n_kv += !is_split_key(kv->key);
    }
    uint64_t n_dense = 0;
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++)
        n_dense += !moe_expert_tensor_name(moe_gguf_tensor_at(g, i)->name, NULL);
    uint8_t hdr[24];
    uint32_t magic_ver[2] = { 0x46554747u /* "GGUF" */, 3 };
    memcpy(hdr, magic_ver, 8);
    memcpy(hdr + 8, &n_dense, 8);
    memcpy(hdr + 16, &n_kv, 8);
    int rc = dense_put(o, hdr, sizeof(hdr), diag);
    /* each key/value byte for byte, except a split set's split.* keys: the
     * pack is one file */
    for (uint64_t i = 0; rc == 0 && i < n_kv_src; i++) {
        const struct moe_gguf_kv *kv = moe_gguf_kv_at(g, i);
        const uint64_t end = i + 1 < n_kv_src ? moe_gguf_kv_at(g, i + 1)->file_offset : kv_end;
        if (!is_split_key(kv->key))
            rc = copy_range(src_fd, kv->file_offset, end, o, buf, src, diag);
    }
    const uint64_t a = moe_gguf_alignment(g);
    uint64_t data_pos = 0;
    for (uint64_t i = 0; rc == 0 && i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (moe_expert_tensor_name(t->name, NULL))
            continue;
        uint64_t len = strlen(t->name);
        rc = dense_put(o, &len, 8, diag);
        if (rc == 0)
            rc = dense_put(o, t->name, len, diag);
        if (rc == 0)
            rc = dense_put(o, &t->n_dims, 4, diag);
        if (rc == 0)
            rc = dense_put(o, t->ne, 8 * (size_t)t->n_dims, diag);
        if (rc == 0)
            rc = dense_put(o, &t->dtype, 4, diag);
        data_pos = align_up(data_pos, a);
        if (rc == 0)
            rc = dense_put(o, &data_pos, 8, diag);
        data_pos += t->size;
    }
    if (rc < 0)
        return rc;
    const uint64_t base = MOE_PACK_BLOB_ALIGN; /* the embedded file starts here */
    rc = dense_zero(o, align_up(o->pos - base, a) - (o->pos - base), diag);
    uint64_t data_start = o->pos;
    for (uint64_t i = 0; rc == 0 && i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        if (moe_expert_tensor_name(t->name, NULL))
            continue;
        uint64_t rel = o->pos - data_start;
        rc = dense_zero(o, align_up(rel, a) - rel, diag);
        for (uint64_t off = 0; rc == 0 && off < t->size;) {
            size_t k = t->size - off < COPY_CHUNK ? (size_t)(t->size - off) : COPY_CHUNK;
            rc = moe_gguf_pread(g, t, off, buf, k, diag);
            if (rc == 0)
                rc = dense_put(o, buf, k, diag);
            off += k;
        }
    }
    return rc;
}

/* ---- moe_pack_write ---------------------------------------------------- */

/* Everything one moe_pack_write holds, released in one place (pack_release)
 * whichever step failed. */
struct pack_run {
    const char *src, *dst;
    char *tmp;                  /* "<dst>.tmp" */
    struct moe_gguf *g;
    struct moe_expert_layout *layouts;
    uint32_t n_layer, n_expert;
    uint64_t n_entries;
    struct wctx w;
    pthread_t *th;
    unsigned n_started;
    bool sync_ok;               /* w.mu and w.cv initialized */
    int out_fd;
    uint8_t *buf;               /* COPY_CHUNK bytes for the dense section */
    struct pack_entry_rec *entries;
    struct pack_tensor_rec *recs;
    XXH3_state_t *xs;
};

/* A split source: one descriptor per further part. */
static int open_parts(struct pack_run *p, struct moe_diag *diag)
{
    const uint32_t n = moe_gguf_n_parts(p->g);
    if (n <= 1)
        return 0;
    p->w.part_fds = moe_malloc((size_t)(n - 1) * sizeof(int));
    if (p->w.part_fds == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", p->src);
    for (uint32_t i = 1; i < n; i++) {
        const char *path = moe_gguf_part_path(p->g, i);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return moe_diag_set(diag, -errno, "%s: %s", path, strerror(errno));
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        p->w.part_fds[i - 1] = fd;
        p->w.n_parts = i + 1;
    }
    return 0;
}

/* Opens the source, checks it is not the output, allocates the per-run
 * buffers and creates the locked temporary file. */
static int pack_open(struct pack_run *p, struct moe_pack_stats *st, struct moe_diag *diag)
{
    int rc = moe_gguf_open(&p->g, p->src, diag);
    if (rc < 0)
        return rc;
    rc = moe_expert_layouts_from_gguf(p->g, &p->layouts, &p->n_layer, &p->n_expert, diag);
    if (rc < 0)
        return rc;
    p->w.layouts = p->layouts;
    struct stat ss, ds;
    if (stat(p->src, &ss) == 0 && stat(p->dst, &ds) == 0 && ss.st_dev == ds.st_dev &&
        ss.st_ino == ds.st_ino)
        return moe_diag_set(diag, -EINVAL, "%s: output is the input file", p->dst);
    p->w.src_fd = open(p->src, O_RDONLY | O_CLOEXEC);
    if (p->w.src_fd < 0)
        return moe_diag_set(diag, -errno, "%s: %s", p->src, strerror(errno));
    posix_fadvise(p->w.src_fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    if ((rc = open_parts(p, diag)))
        return rc;

    size_t dl = strlen(p->dst);
    p->tmp = moe_malloc(dl + 5);
    p->buf = moe_malloc(COPY_CHUNK);
    p->xs = XXH3_createState();
    p->n_entries = (uint64_t)p->n_layer * p->n_expert;
    p->entries = moe_calloc((size_t)p->n_entries, sizeof(*p->entries));
    p->w.jobs = moe_calloc((size_t)p->n_entries, sizeof(*p->w.jobs));
    if (p->tmp == NULL || p->buf == NULL || p->xs == NULL || p->entries == NULL || p->w.jobs == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", p->dst);
    memcpy(p->tmp, p->dst, dl);
    memcpy(p->tmp + dl, ".tmp", 5);
    int fd = tmp_create(p->tmp, &st->removed_stale_tmp, diag);
    if (fd < 0)
        return fd;
    p->out_fd = fd;
    return 0;
}

/* The blob slots and the worker threads that fill them. */
static int pack_start_workers(struct pack_run *p, unsigned threads, uint64_t max_raw, bool any_groups,
                              struct moe_diag *diag)
{
    struct wctx *w = &p->w;
    w->n_slots = threads + 1;
    w->slots = moe_calloc(w->n_slots, sizeof(*w->slots));
    p->th = moe_calloc(threads, sizeof(*p->th));
    if (w->slots == NULL || p->th == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", p->dst);
    for (unsigned i = 0; i < w->n_slots; i++) {
        struct slot *s = &w->slots[i];
        s->cbuf_cap = moe_codec_bound((size_t)max_raw);
        s->raw = moe_malloc((size_t)max_raw);
        s->grp = any_groups ? moe_malloc((size_t)max_raw) : NULL;
        s->cbuf = moe_malloc(s->cbuf_cap);
        if (s->raw == NULL || s->cbuf == NULL || (any_groups && s->grp == NULL))
            return moe_diag_set(diag, -ENOMEM, "%s: out of memory (%u buffers of %" PRIu64 " bytes)",
                                p->dst, w->n_slots, max_raw);
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    p->sync_ok = true;
    for (; p->n_started < threads; p->n_started++)
        if (pthread_create(&p->th[p->n_started], NULL, worker, w) != 0)
            return moe_diag_set(diag, -EAGAIN, "%s: cannot start worker threads", p->dst);
    return 0;
}

/* Blobs: produced by the workers, written here in (layer, expert) order
 * from h->blobs_offset; sets h->n_tensors and h->blobs_end. */
static int pack_blobs(struct pack_run *p, const struct moe_pack_write_opts *o, struct pack_header *h,
                      struct moe_pack_stats *st, struct moe_diag *diag)
{
    struct wctx *w = &p->w;
    const struct moe_expert_layout *layouts = p->layouts;
    uint64_t max_raw = 0, total = h->dense_size, done = h->dense_size;
    bool any_groups = false;
    for (uint32_t l = 0; l < p->n_layer; l++) {
        if (layouts[l].n_slices == 0)
            continue;
        h->n_tensors += layouts[l].n_slices;
        for (uint32_t e = 0; e < p->n_expert; e++)
            w->jobs[w->n_jobs++] = (struct job){ l, e };
        if (layouts[l].raw_size > max_raw)
            max_raw = layouts[l].raw_size;
        any_groups |= layouts[l].n_groups > 0;
        total += layouts[l].raw_size * p->n_expert;
    }
    int rc = pack_start_workers(p, o->threads, max_raw, any_groups, diag);
    if (rc < 0)
        return rc;
    uint64_t pos = h->blobs_offset;
    for (uint64_t i = 0; i < w->n_jobs; i++) {
        struct slot *s = &w->slots[i % w->n_slots];
        pthread_mutex_lock(&w->mu);
        while (!(s->state == SLOT_DONE && s->idx == i))
            pthread_cond_wait(&w->cv, &w->mu);
        pthread_mutex_unlock(&w->mu);
        if (s->err < 0)
            return moe_diag_set(diag, s->err, "%s", s->diag.msg);
        rc = moe_file_pwrite(p->out_fd, s->out, s->out_n, pos);
        if (rc < 0)
            return moe_diag_set(diag, rc, "%s: write: %s", p->tmp, strerror(-rc));
        const struct job *j = &w->jobs[i];
        const struct moe_expert_layout *L = &layouts[j->layer];
        struct pack_entry_rec *er = &p->entries[(uint64_t)j->layer * p->n_expert + j->expert];
        er->offset = pos;
        er->stored_size = s->out_n;
        er->raw_size = L->raw_size;
        er->xxh3 = s->xxh3;
        er->codec = s->codec;
        moe_pack_stats_add(st, L, L->raw_size, s->out_n, s->codec != MOE_CODEC_RAW);
        pos = align_up(pos + s->out_n, MOE_PACK_BLOB_ALIGN);
        done += L->raw_size;
        pthread_mutex_lock(&w->mu);
        s->state = SLOT_FREE;
        w->next_write++;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
        if (o->progress)
            o->progress(o->progress_arg, done, total);
    }
    h->blobs_end = pos;
    return 0;
}

/* Index (tensor records, then entries) after the blobs, the header, fsync
 * and the rename that publishes the pack. */
static int pack_finish(struct pack_run *p, struct pack_header *h, struct moe_pack_stats *st,
                       struct moe_diag *diag)
{
    p->recs = moe_calloc(h->n_tensors, sizeof(*p->recs));
    if (p->recs == NULL)
        return moe_diag_set(diag, -ENOMEM, "%s: out of memory", p->dst);
    uint32_t k = 0;
    for (uint32_t l = 0; l < p->n_layer; l++) {
        const struct moe_expert_layout *L = &p->layouts[l];
        for (uint32_t s = 0; s < L->n_slices; s++, k++) {
            const struct moe_gguf_tensor *t = moe_gguf_find_tensor(p->g, L->s[s].name);
            struct pack_tensor_rec *r = &p->recs[k];
            snprintf(r->name, sizeof(r->name), "%s", t->name);
            r->layer = l;
            r->dtype = t->dtype;
            r->n_dims = t->n_dims;
            for (unsigned dd = 0; dd < 4; dd++)
                r->ne[dd] = t->ne[dd];
            r->blob_offset = L->s[s].offset;
            r->slice_size = L->s[s].size;
        }
    }
    for (uint64_t i = 0; i < p->n_entries; i++)
        p->entries[i].entry_xxh3 = XXH3_64bits(&p->entries[i], PACK_ENTRY_HASHED);
    h->tensors_offset = h->blobs_end;
    size_t tsize = (size_t)h->n_tensors * sizeof(*p->recs);
    h->tensors_xxh3 = XXH3_64bits(p->recs, tsize);
    h->index_offset = h->tensors_offset + tsize;
    size_t isize = (size_t)p->n_entries * sizeof(*p->entries);
    h->file_size = align_up(h->index_offset + isize, MOE_PACK_BLOB_ALIGN);
    h->header_xxh3 = XXH3_64bits(h, offsetof(struct pack_header, header_xxh3));
    int rc;
    const int fd = p->out_fd;
    if ((rc = moe_file_pwrite(fd, p->recs, tsize, h->tensors_offset)) < 0 ||
        (rc = moe_file_pwrite(fd, p->entries, isize, h->index_offset)) < 0 ||
        (rc = ftruncate(fd, (off_t)h->file_size) < 0 ? -errno : 0) < 0 ||
        (rc = moe_file_pwrite(fd, h, sizeof(*h), 0)) < 0 ||
        (rc = fsync(fd) < 0 ? -errno : 0) < 0)
        return moe_diag_set(diag, rc, "%s: %s", p->tmp, strerror(-rc));
    if (rename(p->tmp, p->dst) < 0)
        return moe_diag_set(diag, -errno, "%s: rename to %s: %s", p->tmp, p->dst, strerror(errno));
    fsync_dir_of(p->dst);
    st->file_size = h->file_size;
    return 0;
}

/* Stops and joins the workers, then frees and closes everything. */
static void pack_release(struct pack_run *p)
{
    struct wctx *w = &p->w;
    if (p->sync_ok) {
        pthread_mutex_lock(&w->mu);
        w->abort = true;
        pthread_cond_broadcast(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
    for (unsigned i = 0; i < p->n_started; i++)
        pthread_join(p->th[i], NULL);
    if (p->sync_ok) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
    }
    if (w->slots)
        for (unsigned i = 0; i < w->n_slots; i++) {
            moe_free(w->slots[i].raw);
            moe_free(w->slots[i].grp);
            moe_free(w->slots[i].cbuf);
        }
    moe_free(w->slots);
    moe_free(p->th);
    moe_free(w->jobs);
    moe_free(p->recs);
    moe_free(p->entries);
    if (p->xs)
        XXH3_freeState(p->xs);
    moe_free(p->buf);
    if (p->out_fd >= 0)
        close(p->out_fd);
    moe_free(p->tmp);
    if (w->src_fd >= 0)
        close(w->src_fd);
    for (uint32_t i = 1; i < w->n_parts; i++)
        close(w->part_fds[i - 1]);
    moe_free(w->part_fds);
    moe_free(p->layouts);
    moe_gguf_close(p->g);
}

int moe_pack_write(const char *src, const char *dst, const struct moe_pack_write_opts *opts,
                   struct moe_pack_stats *stats, struct moe_diag *diag)
{
    struct moe_pack_write_opts o = opts ? *opts : (struct moe_pack_write_opts){0};
    if (o.level == 0)
        o.level = MOE_PACK_DEFAULT_LEVEL;
    if (o.min_ratio == 0)
        o.min_ratio = MOE_PACK_DEFAULT_MIN_RATIO;
    if (o.threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o.threads = n > 0 ? (unsigned)n : 1;
    }
    if (o.threads > 256)
        o.threads = 256;
    struct moe_pack_stats st_local;
    struct moe_pack_stats *st = stats ? stats : &st_local;
    memset(st, 0, sizeof(*st));

    struct pack_run p = { .src = src, .dst = dst, .out_fd = -1,
                          .w = { .src = src, .src_fd = -1, .level = o.level, .min_ratio = o.min_ratio } };
    int rc = pack_open(&p, st, diag);
    if (rc < 0)
        goto out;

    /* Dense section: the embedded GGUF at 4096. */
    XXH3_64bits_reset(p.xs);
    struct dense_out d = { .fd = p.out_fd, .pos = MOE_PACK_BLOB_ALIGN, .h = p.xs, .tmp = p.tmp };
    rc = write_dense(p.g, p.w.src_fd, &d, p.buf, diag);
    if (rc < 0)
        goto out;
    struct pack_header h = { .version = MOE_PACK_VERSION, .header_size = sizeof(h),
                             .blob_align = MOE_PACK_BLOB_ALIGN, .n_layer = p.n_layer,
                             .n_expert = p.n_expert, .dense_offset = MOE_PACK_BLOB_ALIGN,
                             .dense_size = d.pos - MOE_PACK_BLOB_ALIGN,
                             .dense_xxh3 = XXH3_64bits_digest(p.xs),
                             .src_size = moe_gguf_file_size(p.g) };
    memcpy(h.magic, PACK_MAGIC, 8);
    h.blobs_offset = align_up(d.pos, MOE_PACK_BLOB_ALIGN);
    st->dense_bytes = h.dense_size;

    if ((rc = pack_blobs(&p, &o, &h, st, diag)) < 0 || (rc = pack_finish(&p, &h, st, diag)) < 0)
        goto out;
    rc = 0;
out:
    /* a temporary file this run created is never left behind on failure */
    if (rc < 0 && p.out_fd >= 0)
        unlink(p.tmp);
    pack_release(&p);
    return rc;
}

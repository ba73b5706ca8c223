#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "cache/expert_cache.h"
#include "cache/host_tier.h"
#include "common/alloc.h"
#include "common/log.h"
#include "io/expert_src.h"
#include "kernels/backend.h"

/* A staged slot (backend memory that is not host memory) is READY as soon as
 * its upload is queued on the copy stream: `ready` completes when the bytes
 * are on the device, and whoever computes with the slot makes the compute
 * stream wait for it (stream_wait), so the host never waits for an upload.
 * Every release records `last_use` on the compute stream, after the
 * kernels that read the slot; the next upload into the slot waits for it
 * on the copy stream. The staging buffer is the source of the upload until
 * `ready` completes: before a slot is reused (its staging rewritten by the
 * next load), `ready` is queried, and a slot whose upload is still running
 * is chosen only when no other can be (the host then waits for it).
 * A host-tier hit is uploaded from the tier's buffer, which stays pinned in
 * the tier until `ready` completes (tier_hold). */
enum slot_state { SLOT_EMPTY, SLOT_LOADING, SLOT_READY, SLOT_FAILED };

struct slot {
    enum slot_state state;
    int prefetched;       /* loaded by a prefetch and not used yet */
    int pf_inflight;      /* a prefetch's load is in flight (counts against the bound) */
    int cancel_req;       /* cancel_stale chose it (under mu; read by the source's stale test) */
    int32_t key;          /* layer * n_expert + expert, or -1 */
    int pins;
    int status;           /* load error for SLOT_FAILED */
    char msg[MOE_DIAG_MSG_MAX];
    uint8_t *data;        /* backend memory */
    uint8_t *stage;       /* host memory the load lands in first (staging), or NULL */
    struct moe_event ready;     /* copy stream: the upload into data has finished */
    struct moe_event last_use;  /* compute stream: the kernels that read data have finished */
    int upload_pending;   /* `ready` recorded and not yet seen complete */
    int tier_hold;        /* the host tier's entry for key is pinned until `ready` */
    struct moe_expert_cache *c;
};

struct moe_expert_cache {
    struct moe_expert_src *src;
    struct moe_backend *be;
    int n_layer, n_expert, n_slots;
    size_t slot_bytes;
    uint8_t *mem;
    uint8_t *slot_base;   /* mem rounded up to a page */
    uint8_t *stage_mem;   /* staging: one host buffer per slot */
    int stage_pinned;     /* stage_mem came from the backend's host_alloc */
    int n_held;           /* slots with tier_hold set */
    struct slot *slots;
    int32_t *slot_of;     /* [key] -> slot or -1 */
    int32_t *cand;        /* scratch: candidate keys for the policy */
    int32_t *cand_slot;
    int32_t *predicted;   /* [key] step for which the expert was predicted, or -1 */
    uint64_t *layer_hits, *layer_misses, *layer_bytes; /* [n_layer] */
    double *layer_stall;                  /* [n_layer] waits for that layer's experts */
    struct moe_host_tier *host;
    int prefetch_inflight;
    struct moe_policy *policy;
    int64_t clock;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct moe_cache_stats st;
};

/* Where a load writes: the slot itself when backend memory is host memory,
 * else the slot's host staging buffer (uploaded when the load completes). */
static void *load_dst(struct slot *s)
{
    return s->stage ? s->stage : s->data;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

size_t moe_expert_cache_slot_stride(size_t slot_bytes)
{
    return (slot_bytes + MOE_CACHE_SLOT_ALIGN - 1) & ~(size_t)(MOE_CACHE_SLOT_ALIGN - 1);
}

size_t moe_expert_cache_pool_bytes(size_t slot_bytes, int n_slots)
{
    const size_t stride = moe_expert_cache_slot_stride(slot_bytes);
    if (n_slots < 0 || (n_slots > 0 && (size_t)n_slots > (SIZE_MAX - MOE_CACHE_SLOT_ALIGN) / stride))
        return 0;
    return (size_t)n_slots * stride + MOE_CACHE_SLOT_ALIGN;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* linux/mman.h, Linux 5.14 */
#endif

/* Host slots are committed when the cache is made: transparent huge pages
 * asked for (where the kernel's THP mode is madvise or always), then every
 * page faulted in (MADV_POPULATE_WRITE). Otherwise the first fill of the
 * cache faults the pool in 4 KiB at a time inside the reader: an O_DIRECT
 * read pins its destination pages, faulting in those not yet there on the
 * one I/O thread, so the fill ran at the page-fault rate, not the disk's
 * (issue 18: 7 GiB of fresh slots read at 0.65-0.75 GB/s during a prefill
 * on a VM where first-touch of 4 KiB pages ran at 0.3-1.5 GB/s and of huge
 * pages at 4 GB/s; doc/benchmarks.md). Best effort: older kernels refuse
 * the advice (EINVAL) and the pool faults in on use as before. */
static void pool_commit(void *mem, size_t bytes)
{
    const uintptr_t a = ((uintptr_t)mem + 4095) & ~(uintptr_t)4095;
    const uintptr_t e = ((uintptr_t)mem + bytes) & ~(uintptr_t)4095;
    if (e <= a)
        return;
    (void)madvise((void *)a, e - a, MADV_HUGEPAGE);
    (void)madvise((void *)a, e - a, MADV_POPULATE_WRITE);
}

int moe_expert_cache_create(struct moe_expert_cache **out, struct moe_expert_src *src,
                            struct moe_backend *be, size_t slot_bytes, int n_slots,
                            enum moe_policy_kind policy, struct moe_diag *diag)
{
    *out = NULL;
    if (n_slots < 1 || slot_bytes == 0 || policy == MOE_POLICY_BELADY)
        return moe_diag_set(diag, -EINVAL, "expert cache: %d slots of %zu bytes, policy %s",
                            n_slots, slot_bytes, moe_policy_name(policy));
    struct moe_expert_cache *c = moe_calloc(1, sizeof(*c));
    if (c == NULL)
        return moe_diag_set(diag, -ENOMEM, "expert cache: out of memory");
    c->src = src;
    c->be = be;
    c->n_layer = (int)moe_expert_src_n_layer(src);
    c->n_expert = (int)moe_expert_src_n_expert(src);
    c->n_slots = n_slots;
    c->slot_bytes = moe_expert_cache_slot_stride(slot_bytes);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    const size_t n_keys = (size_t)c->n_layer * (size_t)c->n_expert;
    c->slots = moe_calloc((size_t)n_slots, sizeof(struct slot));
    c->slot_of = moe_malloc(n_keys * sizeof(int32_t));
    c->cand = moe_malloc((size_t)n_slots * sizeof(int32_t));
    c->cand_slot = moe_malloc((size_t)n_slots * sizeof(int32_t));
    c->policy = moe_policy_create(policy, c->n_layer, c->n_expert, NULL);
    c->predicted = moe_malloc(n_keys * sizeof(int32_t));
    c->layer_hits = moe_calloc((size_t)(c->n_layer > 0 ? c->n_layer : 1), sizeof(uint64_t));
    c->layer_misses = moe_calloc((size_t)(c->n_layer > 0 ? c->n_layer : 1), sizeof(uint64_t));
    c->layer_bytes = moe_calloc((size_t)(c->n_layer > 0 ? c->n_layer : 1), sizeof(uint64_t));
    c->layer_stall = moe_calloc((size_t)(c->n_layer > 0 ? c->n_layer : 1), sizeof(double));
    const size_t pool = moe_expert_cache_pool_bytes(slot_bytes, n_slots);
    if (pool == 0) {
        moe_expert_cache_destroy(c);
        return moe_diag_set(diag, MOE_ELIMIT, "expert cache: %d slots of %zu bytes overflow", n_slots,
                            c->slot_bytes);
    }
    c->mem = c->slots ? be->ops->alloc(be, pool) : NULL;
    c->slot_base = c->mem ? c->mem + (-(uintptr_t)c->mem & (MOE_CACHE_SLOT_ALIGN - 1)) : NULL;
    if (!c->slots || !c->slot_of || !c->cand || !c->cand_slot || !c->policy || !c->mem || !c->predicted ||
        !c->layer_hits || !c->layer_misses || !c->layer_bytes || !c->layer_stall) {
        size_t mib = ((size_t)n_slots * c->slot_bytes) >> 20;
        moe_expert_cache_destroy(c);
        return moe_diag_set(diag, -ENOMEM, "expert cache: cannot allocate %d slots x %zu bytes"
                            " (%zu MiB)", n_slots, slot_bytes, mib);
    }
    if (be->ops->host_memory)
        pool_commit(c->mem, pool);
    for (size_t k = 0; k < n_keys; k++) {
        c->slot_of[k] = -1;
        c->predicted[k] = -1;
    }
    for (int i = 0; i < n_slots; i++) {
        c->slots[i].key = -1;
        c->slots[i].data = c->slot_base + (size_t)i * c->slot_bytes;
        c->slots[i].c = c;
        int rc = be->ops->event_init(be, &c->slots[i].ready);
        if (rc == 0)
            rc = be->ops->event_init(be, &c->slots[i].last_use);
        if (rc != 0) {
            moe_expert_cache_destroy(c);
            return moe_diag_set(diag, rc, "expert cache: cannot create the events of %d slots on %s",
                                n_slots, be->ops->name);
        }
    }
    c->st.n_slots = n_slots;
    c->st.slot_bytes = c->slot_bytes;
    *out = c;
    return 0;
}

void moe_expert_cache_destroy(struct moe_expert_cache *c)
{
    if (c == NULL)
        return;
    /* loads in flight write into our slots: wait for them */
    pthread_mutex_lock(&c->mu);
    for (;;) {
        int loading = 0;
        for (int i = 0; c->slots && i < c->n_slots; i++)
            loading += c->slots[i].state == SLOT_LOADING;
        if (!loading)
            break;
        pthread_cond_wait(&c->cv, &c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    moe_expert_cache_quiesce(c);
    for (int i = 0; c->slots && i < c->n_slots; i++) {
        /* kernels may still read the slots we are about to free */
        c->be->ops->event_sync(c->be, &c->slots[i].last_use);
        c->be->ops->event_fini(c->be, &c->slots[i].ready);
        c->be->ops->event_fini(c->be, &c->slots[i].last_use);
    }
    if (c->mem)
        c->be->ops->free(c->be, c->mem);
    if (c->stage_pinned)
        c->be->ops->host_free(c->be, c->stage_mem);
    else
        moe_free(c->stage_mem);
    moe_policy_free(c->policy);
    moe_free(c->slots);
    moe_free(c->slot_of);
    moe_free(c->cand);
    moe_free(c->cand_slot);
    moe_free(c->predicted);
    moe_free(c->layer_hits);
    moe_free(c->layer_misses);
    moe_free(c->layer_bytes);
    moe_free(c->layer_stall);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    moe_free(c);
}

int moe_expert_cache_set_staging(struct moe_expert_cache *c, struct moe_diag *diag)
{
    if (c->stage_mem)
        return 0;
    /* page-aligned like the slots: the expert store reads raw blobs into
     * them directly (O_DIRECT), and the device copies from them by DMA
     * (page-locked memory from the backend), so NVMe -> staging -> device
     * makes no other host copy */
    const size_t bytes = (size_t)c->n_slots * c->slot_bytes;
    c->stage_mem = c->be->ops->host_alloc(c->be, bytes);
    c->stage_pinned = c->stage_mem != NULL;
    if (c->stage_mem == NULL) {
        moe_log(MOE_LOG_WARN, "expert cache: %zu MiB of staging could not be page-locked on %s;"
                " uploads go through ordinary memory (slower)", bytes >> 20, c->be->ops->name);
        c->stage_mem = moe_malloc_aligned(4096, bytes);
    }
    if (c->stage_mem == NULL)
        return moe_diag_set(diag, -ENOMEM, "expert cache: cannot allocate %zu MiB of host staging",
                            bytes >> 20);
    for (int i = 0; i < c->n_slots; i++)
        c->slots[i].stage = c->stage_mem + (size_t)i * c->slot_bytes;
    return 0;
}

void moe_expert_cache_set_host_tier(struct moe_expert_cache *c, struct moe_host_tier *t)
{
    c->host = t;
}

static void load_done(void *arg, uint32_t layer, uint32_t expert, int status, const struct moe_diag *diag);

/* A cancelled prefetch: forgotten, or (if a demand acquire pinned it in the
 * meantime) loaded again at once as an urgent load. */
static void prefetch_cancelled(struct slot *s, uint32_t layer, uint32_t expert)
{
    struct moe_expert_cache *c = s->c;
    pthread_mutex_lock(&c->mu);
    s->cancel_req = 0;
    if (s->pf_inflight) {
        s->pf_inflight = 0;
        c->prefetch_inflight--;
    }
    if (s->pins == 0) {
        c->slot_of[s->key] = -1;
        s->key = -1;
        s->state = SLOT_EMPTY;
        s->prefetched = 0;
        c->st.prefetch_cancelled++;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
        return;
    }
    s->prefetched = 0;
    pthread_mutex_unlock(&c->mu);
    const struct moe_expert_layout *lay = moe_expert_src_layout(c->src, layer);
    struct moe_diag d = { 0 };
    int rc = lay ? moe_expert_src_load(c->src, layer, expert, load_dst(s), (size_t)lay->raw_size, 0,
                                      load_done, s, &d)
                 : -ENOENT;
    if (rc != 0)
        load_done(s, layer, expert, rc, &d);
}

static void load_done(void *arg, uint32_t layer, uint32_t expert, int status, const struct moe_diag *diag)
{
    struct slot *s = arg;
    struct moe_expert_cache *c = s->c;
    if (status == -ECANCELED && s->cancel_req) {
        prefetch_cancelled(s, layer, expert);
        return;
    }
    struct moe_diag up = { 0 };
    if (status == 0 && s->stage) {
        /* staged: queued on the copy stream after the slot's last readers;
         * whoever computes with the slot waits for `ready` on the device */
        const struct moe_expert_layout *lay = moe_expert_src_layout(c->src, layer);
        int rc = lay ? c->be->ops->upload_async(c->be, s->data, s->stage, (size_t)lay->raw_size,
                                                &s->last_use, &s->ready)
                     : -ENOENT;
        if (rc != 0) {
            status = moe_diag_set(&up, rc, "expert (layer %u, expert %u): upload to %s memory"
                                  " failed: %s", layer, expert, c->be->ops->name, moe_strerror(rc));
            diag = &up;
        }
    }
    if (status == 0 && c->host != NULL) {
        /* keep a copy in the host tier; the slot is ours until we publish it */
        const struct moe_expert_layout *lay = moe_expert_src_layout(c->src, layer);
        void *buf = NULL;
        if (lay && moe_host_tier_reserve(c->host, layer, expert, (size_t)lay->raw_size, &buf) == 0) {
            memcpy(buf, load_dst(s), (size_t)lay->raw_size);
            moe_host_tier_commit(c->host, layer, expert, true);
            pthread_mutex_lock(&c->mu);
            c->st.host_inserts++;
            pthread_mutex_unlock(&c->mu);
        }
    }
    pthread_mutex_lock(&c->mu);
    if (s->pf_inflight) {
        s->pf_inflight = 0;
        c->prefetch_inflight--;
    }
    if (status == 0) {
        s->state = SLOT_READY;
        s->upload_pending = s->stage != NULL;
        c->st.loads_ok++;
        c->st.bytes_loaded += c->slot_bytes;
        if ((int)layer < c->n_layer)
            c->layer_bytes[layer] += c->slot_bytes;
    } else if (s->pins == 0) {
        /* a failed prefetch nobody waits for: forget it, a demand load retries */
        c->slot_of[s->key] = -1;
        s->key = -1;
        s->state = SLOT_EMPTY;
        s->prefetched = 0;
        c->st.loads_failed++;
    } else {
        s->state = SLOT_FAILED;
        s->status = status;
        snprintf(s->msg, sizeof(s->msg), "%s", diag && diag->msg[0] ? diag->msg : moe_strerror(status));
        c->st.loads_failed++;
    }
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* Whether the upload into s has finished (mutex held): queries `ready`
 * (unless `known`: the caller waited for it) and, when it has completed,
 * forgets it and unpins the host tier's entry it was copied from. */
static int upload_done(struct moe_expert_cache *c, struct slot *s, int known)
{
    if (!s->upload_pending)
        return 1;
    if (!known && c->be->ops->event_query(c->be, &s->ready) == 0)
        return 0;
    /* complete, or the device failed (the slot's bytes do not matter then:
     * the next op reports the error) */
    s->upload_pending = 0;
    if (s->tier_hold) {
        s->tier_hold = 0;
        c->n_held--;
        moe_host_tier_release(c->host, (uint32_t)(s->key / c->n_expert), (uint32_t)(s->key % c->n_expert));
    }
    return 1;
}

/* Unpins the tier entries of finished host-tier uploads (mutex held). */
static void reap_tier_holds(struct moe_expert_cache *c)
{
    for (int i = 0; i < c->n_slots && c->n_held > 0; i++)
        if (c->slots[i].tier_hold)
            upload_done(c, &c->slots[i], 0);
}

/* A free slot or the policy's victim among unpinned READY slots; -1 if
 * none. A slot whose upload is still running (its staging buffer, or the
 * tier's buffer, is being read) is taken only when nothing else can be,
 * after the host waited for it. Called with the mutex held. */
static int find_slot(struct moe_expert_cache *c, int cur_layer, int32_t step, int for_prefetch)
{
    int n = 0, busy = -1;
    for (int i = 0; i < c->n_slots; i++) {
        struct slot *s = &c->slots[i];
        if (s->state == SLOT_EMPTY) {
            MOE_ASSERT(!s->upload_pending);   /* only READY slots have uploads */
            return i;
        }
        /* a prefetch never evicts an expert predicted for this step */
        if (s->state == SLOT_READY && s->pins == 0 && !(for_prefetch && c->predicted[s->key] == step)) {
            if (!upload_done(c, s, 0)) {
                busy = busy < 0 ? i : busy;
                continue;
            }
            c->cand[n] = s->key;
            c->cand_slot[n++] = i;
        }
    }
    if (n == 0 && busy >= 0) {
        /* every candidate is still being uploaded: wait for one (not a hit:
         * the caller would otherwise get -EAGAIN with nothing to wait on) */
        struct slot *s = &c->slots[busy];
        c->st.upload_host_waits++;
        c->be->ops->event_sync(c->be, &s->ready);
        upload_done(c, s, 1);
        c->cand[n] = s->key;
        c->cand_slot[n++] = busy;
    }
    if (n == 0)
        return -1;
    const int v = c->cand_slot[moe_policy_victim(c->policy, c->cand, n, cur_layer, step)];
    if (c->slots[v].prefetched) {
        c->st.prefetch_wasted++;
        c->slots[v].prefetched = 0;
    }
    c->slot_of[c->slots[v].key] = -1;
    c->slots[v].key = -1;
    c->slots[v].state = SLOT_EMPTY;
    c->st.evictions++;
    return v;
}

/* A demand load that could not start: the slot is empty again and unpinned. */
static void abandon_slot(struct moe_expert_cache *c, struct slot *s, int32_t key)
{
    pthread_mutex_lock(&c->mu);
    s->state = SLOT_EMPTY;
    s->key = -1;
    s->pins = 0;
    c->slot_of[key] = -1;
    c->st.loads_failed++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

/* The engine is about to compute with the pinned, READY slot s: its
 * kernels must start after the upload (the compute stream waits on the
 * device; the host does not). Called without the mutex: a pinned slot is
 * never reloaded, so `ready` does not change meanwhile. */
static int wait_upload(struct moe_expert_cache *c, struct slot *s, int pending, int layer, int expert,
                       struct moe_diag *diag)
{
    if (!pending)
        return 0;
    int rc = c->be->ops->stream_wait(c->be, &s->ready);
    if (rc != 0)
        moe_diag_set(diag, rc, "expert (layer %d, expert %d): waiting for its upload on %s: %s", layer,
                     expert, c->be->ops->name, moe_strerror(rc));
    return rc;
}

/* Fills the chosen slot s (LOADING) from the host tier if the tier holds
 * (layer, expert), and publishes it READY: on a staged cache the copy is
 * queued on the copy stream like a load from disk (*pending: it may still
 * run; the tier's entry stays pinned until it has). A demand load counts
 * as a host-tier hit. Returns 1 (filled), 0 (not in the tier), or a
 * negative error of the upload (the tier's entry released, the slot left
 * LOADING for the caller to give up). */
static int from_tier(struct moe_expert_cache *c, struct slot *s, int layer, int expert, int demand,
                     int *pending)
{
    const void *hdata;
    size_t hsize;
    *pending = 0;
    if (c->host == NULL || !moe_host_tier_acquire(c->host, (uint32_t)layer, (uint32_t)expert, &hdata, &hsize))
        return 0;
    const size_t n = hsize < c->slot_bytes ? hsize : c->slot_bytes;
    int rc = 0, done = 1;
    if (s->stage) {
        rc = c->be->ops->upload_async(c->be, s->data, hdata, n, &s->last_use, &s->ready);
        done = rc != 0 || c->be->ops->event_query(c->be, &s->ready) != 0;
    } else {
        memcpy(s->data, hdata, n);
    }
    if (done)
        moe_host_tier_release(c->host, (uint32_t)layer, (uint32_t)expert);
    if (rc != 0)
        return rc;
    *pending = !done;
    pthread_mutex_lock(&c->mu);
    s->state = SLOT_READY;
    s->upload_pending = !done;
    s->tier_hold = !done;
    c->n_held += !done;
    if (demand)
        c->st.host_hits++;
    else
        c->st.host_prefetches++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return 1;
}

int moe_expert_cache_acquire(struct moe_expert_cache *c, int layer, int expert, int32_t step,
                             const uint8_t **data, struct moe_diag *diag)
{
    if (layer < 0 || layer >= c->n_layer || expert < 0 || expert >= c->n_expert)
        return moe_diag_set(diag, -EINVAL, "expert cache: no expert (layer %d, expert %d)", layer, expert);
    const int32_t key = layer * c->n_expert + expert;
    pthread_mutex_lock(&c->mu);
    if (c->n_held > 0)
        reap_tier_holds(c);
    int i = c->slot_of[key];
    if (i >= 0) {
        struct slot *s = &c->slots[i];
        s->pins++;
        if (s->prefetched) {
            s->prefetched = 0;
            c->st.prefetch_used++;
        }
        moe_policy_access(c->policy, layer, expert, c->clock++, step);
        c->st.hits++;
        c->layer_hits[layer]++;
        int ready = s->state == SLOT_READY;
        const int pending = ready && s->upload_pending;
        if (ready)
            *data = s->data;
        pthread_mutex_unlock(&c->mu);
        const int rc = wait_upload(c, s, pending, layer, expert, diag);
        if (rc != 0) {
            moe_expert_cache_release(c, layer, expert);
            return rc;
        }
        return ready ? 1 : 0; /* LOADING or FAILED: wait_any reports which */
    }
    i = find_slot(c, layer, step, 0);
    if (i < 0) {
        pthread_mutex_unlock(&c->mu);
        return -EAGAIN;
    }
    struct slot *s = &c->slots[i];
    s->key = key;
    s->state = SLOT_LOADING;
    s->prefetched = 0;
    s->pins = 1;
    s->status = 0;
    c->slot_of[key] = i;
    moe_policy_access(c->policy, layer, expert, c->clock++, step);
    c->st.misses++;
    c->layer_misses[layer]++;
    pthread_mutex_unlock(&c->mu);
    const struct moe_expert_layout *lay = moe_expert_src_layout(c->src, (uint32_t)layer);
    int pending = 0;
    const int tier = lay ? from_tier(c, s, layer, expert, 1, &pending) : 0;
    if (tier < 0) {
        abandon_slot(c, s, key);
        return moe_diag_set(diag, tier, "expert (layer %d, expert %d): upload from the host tier"
                            " failed: %s", layer, expert, moe_strerror(tier));
    }
    if (tier == 1) {
        /* the caller's kernels wait for the copy on the device */
        const int wrc = wait_upload(c, s, pending, layer, expert, diag);
        if (wrc != 0) {
            moe_expert_cache_release(c, layer, expert);
            return wrc;
        }
        *data = s->data;
        return 1;
    }
    int rc = lay ? moe_expert_src_load(c->src, (uint32_t)layer, (uint32_t)expert, load_dst(s),
                                      (size_t)lay->raw_size, 0, load_done, s, diag)
                 : moe_diag_set(diag, -ENOENT, "expert cache: layer %d has no experts", layer);
    if (rc != 0) {
        abandon_slot(c, s, key);
        return rc;
    }
    return 0;
}

int moe_expert_cache_wait_any(struct moe_expert_cache *c, const int32_t *layers,
                              const int32_t *experts, int n, int *which, const uint8_t **data,
                              struct moe_diag *diag)
{
    const double t0 = now_s();
    pthread_mutex_lock(&c->mu);
    for (;;) {
        for (int j = 0; j < n; j++) {
            const int i = c->slot_of[layers[j] * c->n_expert + experts[j]];
            if (i < 0)
                continue;
            struct slot *s = &c->slots[i];
            if (s->state == SLOT_READY || s->state == SLOT_FAILED) {
                *which = j;
                int rc = 0, pending = 0;
                if (s->state == SLOT_READY) {
                    *data = s->data;
                    pending = s->upload_pending;
                } else {
                    rc = moe_diag_set(diag, s->status, "%s", s->msg);
                }
                const double waited = now_s() - t0;
                c->st.stall_s += waited;
                c->layer_stall[layers[j]] += waited;
                pthread_mutex_unlock(&c->mu);
                if (rc == 0)
                    rc = wait_upload(c, s, pending, layers[j], experts[j], diag);
                return rc;
            }
        }
        pthread_cond_wait(&c->cv, &c->mu);
    }
}

void moe_expert_cache_release(struct moe_expert_cache *c, int layer, int expert)
{
    pthread_mutex_lock(&c->mu);
    const int i = c->slot_of[layer * c->n_expert + expert];
    if (i >= 0 && c->slots[i].pins > 0) {
        struct slot *s = &c->slots[i];
        /* the caller has queued the kernels that read the slot: the next
         * upload into it waits for them (a LOADING slot was not read) */
        if (s->state == SLOT_READY && s->stage != NULL)
            c->be->ops->event_record(c->be, &s->last_use);
        if (--s->pins == 0 && s->state == SLOT_FAILED) {
            /* a failed load never stays cached: the next acquire retries */
            c->slot_of[s->key] = -1;
            s->key = -1;
            s->state = SLOT_EMPTY;
        }
    }
    pthread_mutex_unlock(&c->mu);
}

int moe_expert_cache_prefetch(struct moe_expert_cache *c, int layer, int expert, int32_t step,
                              int max_inflight)
{
    if (layer < 0 || layer >= c->n_layer || expert < 0 || expert >= c->n_expert)
        return -EINVAL;
    const int32_t key = layer * c->n_expert + expert;
    pthread_mutex_lock(&c->mu);
    c->predicted[key] = step;
    if (c->slot_of[key] >= 0) {
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    /* never more than a quarter of the slots hold prefetched, unused experts
     * (in flight or loaded), so prefetches cannot crowd out what demand loads
     * still need */
    int held = 0;
    for (int j = 0; j < c->n_slots; j++)
        held += c->slots[j].prefetched;
    const int share = c->n_slots / 4 > 0 ? c->n_slots / 4 : 1;
    int i = c->prefetch_inflight < max_inflight && held < share ? find_slot(c, layer, step, 1) : -1;
    if (i < 0) {
        c->st.prefetch_dropped++;
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    struct slot *s = &c->slots[i];
    s->key = key;
    s->state = SLOT_LOADING;
    s->prefetched = 1;
    s->pf_inflight = 1;
    s->pins = 0;
    s->status = 0;
    c->slot_of[key] = i;
    c->prefetch_inflight++;
    c->st.prefetch_issued++;
    moe_policy_touch(c->policy, layer, expert, c->clock++);
    pthread_mutex_unlock(&c->mu);
    const struct moe_expert_layout *lay = moe_expert_src_layout(c->src, (uint32_t)layer);
    struct moe_diag d = { 0 };
    int pending = 0;
    /* from the host tier when it holds the expert: a copy, not a disk read */
    int rc = lay ? from_tier(c, s, layer, expert, 0, &pending) : 0;
    if (rc == 1) {
        pthread_mutex_lock(&c->mu);
        s->pf_inflight = 0;
        c->prefetch_inflight--;
        pthread_mutex_unlock(&c->mu);
        return 1;
    }
    if (rc == 0)
        rc = lay ? moe_expert_src_load(c->src, (uint32_t)layer, (uint32_t)expert, load_dst(s),
                                       (size_t)lay->raw_size, MOE_LOAD_PREFETCH, load_done, s, &d)
                 : -ENOENT;
    if (rc != 0) {
        pthread_mutex_lock(&c->mu);
        s->state = SLOT_EMPTY;
        s->key = -1;
        s->prefetched = 0;
        s->pf_inflight = 0;
        c->slot_of[key] = -1;
        c->prefetch_inflight--;
        pthread_mutex_unlock(&c->mu);
        return rc;
    }
    return 1;
}

int moe_expert_cache_policy_export(struct moe_expert_cache *c, uint32_t *trans, uint32_t *follows,
                                   double *stats)
{
    pthread_mutex_lock(&c->mu);
    const int rc = moe_policy_export(c->policy, trans, follows, stats);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

void moe_expert_cache_policy_seed(struct moe_expert_cache *c, const uint32_t *uses, int k, const uint32_t *trans,
                                  const uint32_t *follows, const double *stats)
{
    pthread_mutex_lock(&c->mu);
    moe_policy_seed(c->policy, uses, k, trans, follows, stats);
    pthread_mutex_unlock(&c->mu);
}

int moe_expert_cache_warm(struct moe_expert_cache *c, int layer, int expert)
{
    if (layer < 0 || layer >= c->n_layer || expert < 0 || expert >= c->n_expert)
        return -EINVAL;
    const int32_t key = layer * c->n_expert + expert;
    pthread_mutex_lock(&c->mu);
    if (c->slot_of[key] >= 0) {
        pthread_mutex_unlock(&c->mu);
        return 0;
    }
    int i = -1;
    for (int j = 0; j < c->n_slots && i < 0; j++)
        if (c->slots[j].state == SLOT_EMPTY)
            i = j;
    if (i < 0) {
        pthread_mutex_unlock(&c->mu);
        return -ENOSPC;
    }
    struct slot *s = &c->slots[i];
    /* an EMPTY slot has no upload in flight; its events stay the slot's */
    MOE_ASSERT(!s->upload_pending && !s->tier_hold);
    *s = (struct slot){ .state = SLOT_LOADING, .key = key, .data = s->data, .stage = s->stage,
                        .ready = s->ready, .last_use = s->last_use, .c = c };
    c->slot_of[key] = i;
    moe_policy_touch(c->policy, layer, expert, c->clock++);
    pthread_mutex_unlock(&c->mu);
    const struct moe_expert_layout *lay = moe_expert_src_layout(c->src, (uint32_t)layer);
    struct moe_diag d = { 0 };
    int rc = lay ? moe_expert_src_load(c->src, (uint32_t)layer, (uint32_t)expert, load_dst(s),
                                      (size_t)lay->raw_size, MOE_LOAD_PREFETCH, load_done, s, &d)
                 : -ENOENT;
    if (rc != 0) {
        pthread_mutex_lock(&c->mu);
        s->state = SLOT_EMPTY;
        s->key = -1;
        c->slot_of[key] = -1;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
        return rc;
    }
    return 1;
}

/* Under the source's lock (lock order: source, then cache). A demand
 * acquire may have pinned the slot since it was chosen: keep it then. */
static bool is_stale(void *ctx, void *arg, uint32_t layer, uint32_t expert)
{
    struct moe_expert_cache *c = ctx;
    struct slot *s = arg;
    (void)layer;
    (void)expert;
    pthread_mutex_lock(&c->mu);
    bool stale = s->cancel_req && s->pins == 0;
    if (!stale)
        s->cancel_req = 0;
    pthread_mutex_unlock(&c->mu);
    return stale;
}

int moe_expert_cache_cancel_stale(struct moe_expert_cache *c, int cur_layer)
{
    int n = 0;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_slots; i++) {
        struct slot *s = &c->slots[i];
        if (s->pf_inflight && s->pins == 0 && s->key >= 0 && s->key / c->n_expert <= cur_layer) {
            s->cancel_req = 1;
            n++;
        }
    }
    pthread_mutex_unlock(&c->mu);
    if (n == 0)
        return 0;
    int done = (int)moe_expert_src_cancel_prefetches(c->src, is_stale, c);
    /* the rest had started: they complete normally */
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_slots; i++)
        c->slots[i].cancel_req = 0;
    pthread_mutex_unlock(&c->mu);
    return done;
}

int moe_expert_cache_lookup(struct moe_expert_cache *c, int layer, int expert)
{
    if (layer < 0 || layer >= c->n_layer || expert < 0 || expert >= c->n_expert)
        return 0;
    pthread_mutex_lock(&c->mu);
    const int i = c->slot_of[layer * c->n_expert + expert];
    const int r = i < 0 ? 0 : c->slots[i].state == SLOT_READY ? 2 : c->slots[i].state == SLOT_LOADING;
    pthread_mutex_unlock(&c->mu);
    return r;
}

int moe_expert_cache_wait_slot(struct moe_expert_cache *c)
{
    const double t0 = now_s();
    pthread_mutex_lock(&c->mu);
    for (;;) {
        int usable = 0, unpinned = 0;
        for (int i = 0; i < c->n_slots; i++) {
            const struct slot *s = &c->slots[i];
            usable |= s->state == SLOT_EMPTY || (s->state == SLOT_READY && s->pins == 0);
            unpinned |= s->pins == 0;
        }
        if (usable || !unpinned) {
            c->st.stall_s += now_s() - t0;
            pthread_mutex_unlock(&c->mu);
            return usable ? 0 : -EAGAIN;
        }
        pthread_cond_wait(&c->cv, &c->mu);
    }
}

void moe_expert_cache_quiesce(struct moe_expert_cache *c)
{
    pthread_mutex_lock(&c->mu);
    for (int i = 0; c->slots && i < c->n_slots; i++) {
        struct slot *s = &c->slots[i];
        if (s->upload_pending) {
            c->be->ops->event_sync(c->be, &s->ready);
            upload_done(c, s, 1);
        }
    }
    pthread_mutex_unlock(&c->mu);
}

void moe_expert_cache_stats(struct moe_expert_cache *c, struct moe_cache_stats *out)
{
    struct moe_copy_stats cs = { 0 };
    if (c->stage_mem != NULL)
        c->be->ops->copy_stats(c->be, &cs);
    pthread_mutex_lock(&c->mu);
    *out = c->st;
    pthread_mutex_unlock(&c->mu);
    out->uploads = cs.uploads;
    out->upload_bytes = cs.bytes;
    out->uploads_timed = cs.timed;
    out->upload_timed_bytes = cs.timed_bytes;
    out->upload_s = cs.busy_s;
    /* the store's error counters: why loads failed */
    struct moe_io_stats io;
    moe_expert_src_stats(c->src, &io);
    out->checksum_errors = io.checksum_errors;
    out->format_errors = io.format_errors;
    out->io_errors = io.io_errors;
    out->read_retries = io.read_retries;
    out->io_requests = io.ring.requests;
    out->io_bytes = io.ring.bytes;
    out->io_busy_s = io.ring.busy_s;
    out->io_depth_s = io.ring.depth_s;
    out->io_pages_s = io.ring.pages_s;
    out->io_max_depth = io.ring.max_depth;
    out->io_queue_depth = io.queue_depth;
    out->io_staging = io.n_staging;
    out->io_stage_wait_s = io.stage_wait_s;
    out->io_load_s = io.load_s;
}

int moe_expert_cache_layer_stats(struct moe_expert_cache *c, struct moe_cache_layer_stats *out,
                                 int max)
{
    pthread_mutex_lock(&c->mu);
    for (int l = 0; l < c->n_layer && l < max; l++)
        out[l] = (struct moe_cache_layer_stats){ .hits = c->layer_hits[l], .misses = c->layer_misses[l],
                                                 .bytes_loaded = c->layer_bytes[l],
                                                 .stall_s = c->layer_stall[l] };
    pthread_mutex_unlock(&c->mu);
    return c->n_layer;
}

int moe_expert_cache_pinned(struct moe_expert_cache *c)
{
    int n = 0;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_slots; i++)
        n += c->slots[i].pins > 0;
    pthread_mutex_unlock(&c->mu);
    return n;
}

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "cache/host_tier.h"
#include "common/alloc.h"

#define N_BUCKETS 4096u   /* chains stay short: a tier holds thousands of experts at most */

struct entry {
    struct entry *hnext;          /* hash chain */
    struct entry *prev, *next;    /* LRU list, most recent at head; only ready entries */
    uint64_t key;
    void *buf;
    size_t size;
    unsigned pins;
    bool ready;                   /* committed */
};

struct moe_host_tier {
    pthread_mutex_t mu;
    struct entry *buckets[N_BUCKETS];
    struct entry *head, *tail;
    size_t budget, used;
    unsigned n_entries;
    struct moe_host_tier_stats st;
};

static uint64_t key_of(uint32_t layer, uint32_t expert)
{
    return (uint64_t)layer << 32 | expert;
}

static unsigned bucket_of(uint64_t k)
{
    k *= 0x9e3779b97f4a7c15ull;
    return (unsigned)(k >> 52) % N_BUCKETS;
}

static struct entry *find(struct moe_host_tier *t, uint64_t k)
{
    for (struct entry *e = t->buckets[bucket_of(k)]; e; e = e->hnext)
        if (e->key == k)
            return e;
    return NULL;
}

static void lru_unlink(struct moe_host_tier *t, struct entry *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        t->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        t->tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push_head(struct moe_host_tier *t, struct entry *e)
{
    e->prev = NULL;
    e->next = t->head;
    if (t->head)
        t->head->prev = e;
    else
        t->tail = e;
    t->head = e;
}

static void remove_entry(struct moe_host_tier *t, struct entry *e)
{
    struct entry **pp = &t->buckets[bucket_of(e->key)];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    if (e->ready)
        lru_unlink(t, e);
    t->used -= e->size;
    t->n_entries--;
    free(e->buf);
    moe_free(e);
}

/* Evicts unpinned entries from the LRU tail until `need` more bytes fit. */
static bool make_room(struct moe_host_tier *t, size_t need)
{
    struct entry *e = t->tail;
    while (t->used + need > t->budget && e) {
        struct entry *prev = e->prev;
        if (e->pins == 0) {
            remove_entry(t, e);
            t->st.evictions++;
        }
        e = prev;
    }
    return t->used + need <= t->budget;
}

int moe_host_tier_create(struct moe_host_tier **out, size_t budget_bytes, struct moe_diag *diag)
{
    *out = moe_calloc(1, sizeof(**out));
    if (*out == NULL)
        return moe_diag_set(diag, -ENOMEM, "host tier: out of memory");
    pthread_mutex_init(&(*out)->mu, NULL);
    (*out)->budget = budget_bytes;
    return 0;
}

void moe_host_tier_destroy(struct moe_host_tier *t)
{
    if (t == NULL)
        return;
    for (unsigned b = 0; b < N_BUCKETS; b++)
        while (t->buckets[b]) {
            MOE_ASSERT(t->buckets[b]->pins == 0);
            remove_entry(t, t->buckets[b]);
        }
    pthread_mutex_destroy(&t->mu);
    moe_free(t);
}

bool moe_host_tier_acquire(struct moe_host_tier *t, uint32_t layer, uint32_t expert,
                           const void **data, size_t *size)
{
    pthread_mutex_lock(&t->mu);
    struct entry *e = find(t, key_of(layer, expert));
    bool hit = e && e->ready;
    if (hit) {
        e->pins++;
        lru_unlink(t, e);
        lru_push_head(t, e);
        *data = e->buf;
        *size = e->size;
        t->st.hits++;
    } else {
        t->st.misses++;
    }
    pthread_mutex_unlock(&t->mu);
    return hit;
}

bool moe_host_tier_contains(struct moe_host_tier *t, uint32_t layer, uint32_t expert)
{
    pthread_mutex_lock(&t->mu);
    const struct entry *e = find(t, key_of(layer, expert));
    const bool held = e && e->ready;
    pthread_mutex_unlock(&t->mu);
    return held;
}

void moe_host_tier_release(struct moe_host_tier *t, uint32_t layer, uint32_t expert)
{
    pthread_mutex_lock(&t->mu);
    struct entry *e = find(t, key_of(layer, expert));
    MOE_ASSERT(e && e->ready && e->pins > 0);
    e->pins--;
    /* over budget after a shrink: the entry goes as soon as it is free */
    if (t->used > t->budget)
        make_room(t, 0);
    pthread_mutex_unlock(&t->mu);
}

int moe_host_tier_reserve(struct moe_host_tier *t, uint32_t layer, uint32_t expert, size_t size,
                          void **buf)
{
    *buf = NULL;
    uint64_t k = key_of(layer, expert);
    pthread_mutex_lock(&t->mu);
    int rc = 0;
    if (find(t, k)) {
        rc = -EEXIST;
    } else if (size > t->budget || !make_room(t, size)) {
        t->st.refused++;
        rc = MOE_ELIMIT;
    } else {
        struct entry *e = moe_calloc(1, sizeof(*e));
        void *p = NULL;
        /* CUDA: cudaHostAlloc(&p, size, cudaHostAllocPortable) here (or
         * cudaHostRegister after this), so that uploads are DMA from
         * page-locked memory; fall back to pageable memory and log once
         * when the pinned allocation is refused (RELIABILITY row 19). */
        if (e == NULL || posix_memalign(&p, 4096, size ? size : 1) != 0) {
            moe_free(e);
            rc = -ENOMEM;
        } else {
            e->key = k;
            e->buf = p;
            e->size = size;
            e->pins = 1;
            unsigned b = bucket_of(k);
            e->hnext = t->buckets[b];
            t->buckets[b] = e;
            t->used += size;
            t->n_entries++;
            *buf = p;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

void moe_host_tier_commit(struct moe_host_tier *t, uint32_t layer, uint32_t expert, bool ok)
{
    pthread_mutex_lock(&t->mu);
    struct entry *e = find(t, key_of(layer, expert));
    MOE_ASSERT(e && !e->ready && e->pins == 1);
    e->pins = 0;
    if (ok) {
        e->ready = true;
        lru_push_head(t, e);
        t->st.inserts++;
        if (t->used > t->budget)
            make_room(t, 0);
    } else {
        remove_entry(t, e);
    }
    pthread_mutex_unlock(&t->mu);
}

void moe_host_tier_set_budget(struct moe_host_tier *t, size_t budget_bytes)
{
    pthread_mutex_lock(&t->mu);
    t->budget = budget_bytes;
    make_room(t, 0);
    pthread_mutex_unlock(&t->mu);
}

void moe_host_tier_stats(struct moe_host_tier *t, struct moe_host_tier_stats *out)
{
    pthread_mutex_lock(&t->mu);
    *out = t->st;
    out->used_bytes = t->used;
    out->budget_bytes = t->budget;
    out->n_entries = t->n_entries;
    unsigned pinned = 0;
    for (unsigned b = 0; b < N_BUCKETS; b++)
        for (struct entry *e = t->buckets[b]; e; e = e->hnext)
            pinned += e->pins > 0;
    out->n_pinned = pinned;
    pthread_mutex_unlock(&t->mu);
}

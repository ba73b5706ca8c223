/* The paged KV pool's bookkeeping (kv.h). */
#include "model/kv.h"

#include <errno.h>
#include <string.h>
#include <xxhash.h>

#include "common/alloc.h"

struct moe_kv_pool {
    int n_blocks, bt;
    int32_t *ref;              /* [n_blocks] */
    uint8_t *indexed;          /* [n_blocks] */
    uint64_t *hash, *parent;   /* [n_blocks]: chain hash, the previous block's */
    int32_t *toks;             /* [n_blocks][bt]: an indexed block's tokens */
    int32_t *prev, *next;      /* LRU list of idle-cached blocks (head: oldest) */
    int lru_head, lru_tail, n_cached;
    int32_t *free_ids;         /* stack of free blocks */
    int n_free;
    int32_t *bucket;           /* [n_bucket] index chains by hash */
    int32_t *chain;            /* [n_blocks] next in the chain */
    uint32_t n_bucket;
    int n_used, reserved;
    uint64_t evictions, lookups, hits, prompt_tokens, cached_tokens;
};

int moe_kv_pool_create(struct moe_kv_pool **out, int n_blocks, int block_tokens)
{
    *out = NULL;
    if (n_blocks < 1 || block_tokens < 1 || n_blocks > (1 << 28) || block_tokens > (1 << 16))
        return -EINVAL;
    struct moe_kv_pool *p = moe_calloc(1, sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    const size_t n = (size_t)n_blocks;
    p->n_blocks = n_blocks;
    p->bt = block_tokens;
    p->n_bucket = 1;
    while (p->n_bucket < 2 * (uint32_t)n_blocks)
        p->n_bucket <<= 1;
    p->ref = moe_calloc(n, sizeof(int32_t));
    p->indexed = moe_calloc(n, 1);
    p->hash = moe_calloc(n, sizeof(uint64_t));
    p->parent = moe_calloc(n, sizeof(uint64_t));
    p->toks = moe_calloc(n * (size_t)block_tokens, sizeof(int32_t));
    p->prev = moe_calloc(n, sizeof(int32_t));
    p->next = moe_calloc(n, sizeof(int32_t));
    p->free_ids = moe_calloc(n, sizeof(int32_t));
    p->chain = moe_calloc(n, sizeof(int32_t));
    p->bucket = moe_calloc(p->n_bucket, sizeof(int32_t));
    if (!p->ref || !p->indexed || !p->hash || !p->parent || !p->toks || !p->prev || !p->next ||
        !p->free_ids || !p->chain || !p->bucket) {
        moe_kv_pool_destroy(p);
        return -ENOMEM;
    }
    /* lowest ids first: a fresh pool hands out blocks 0, 1, 2, ... */
    for (int i = 0; i < n_blocks; i++)
        p->free_ids[i] = n_blocks - 1 - i;
    p->n_free = n_blocks;
    for (uint32_t b = 0; b < p->n_bucket; b++)
        p->bucket[b] = -1;
    p->lru_head = p->lru_tail = -1;
    *out = p;
    return 0;
}

void moe_kv_pool_destroy(struct moe_kv_pool *p)
{
    if (p == NULL)
        return;
    moe_free(p->ref);
    moe_free(p->indexed);
    moe_free(p->hash);
    moe_free(p->parent);
    moe_free(p->toks);
    moe_free(p->prev);
    moe_free(p->next);
    moe_free(p->free_ids);
    moe_free(p->chain);
    moe_free(p->bucket);
    moe_free(p);
}

/* ---- the LRU list of idle-cached blocks ---- */

static void lru_push(struct moe_kv_pool *p, int id)
{
    p->prev[id] = p->lru_tail;
    p->next[id] = -1;
    if (p->lru_tail >= 0)
        p->next[p->lru_tail] = id;
    else
        p->lru_head = id;
    p->lru_tail = id;
    p->n_cached++;
}

static void lru_remove(struct moe_kv_pool *p, int id)
{
    if (p->prev[id] >= 0)
        p->next[p->prev[id]] = p->next[id];
    else
        p->lru_head = p->next[id];
    if (p->next[id] >= 0)
        p->prev[p->next[id]] = p->prev[id];
    else
        p->lru_tail = p->prev[id];
    p->n_cached--;
}

/* ---- the index ---- */

static uint32_t bucket_of(const struct moe_kv_pool *p, uint64_t hash)
{
    return (uint32_t)(hash ^ (hash >> 32)) & (p->n_bucket - 1);
}

static void index_remove(struct moe_kv_pool *p, int id)
{
    int32_t *at = &p->bucket[bucket_of(p, p->hash[id])];
    while (*at != id) {
        MOE_ASSERT(*at >= 0);
        at = &p->chain[*at];
    }
    *at = p->chain[id];
    p->indexed[id] = 0;
}

uint64_t moe_kv_chain_hash(uint64_t parent, const int32_t *tokens, int n)
{
    return XXH3_64bits_withSeed(tokens, (size_t)n * sizeof(int32_t), parent);
}

int moe_kv_pool_lookup(const struct moe_kv_pool *p, uint64_t hash, uint64_t parent,
                       const int32_t *tokens)
{
    for (int id = p->bucket[bucket_of(p, hash)]; id >= 0; id = p->chain[id])
        if (p->hash[id] == hash && p->parent[id] == parent &&
            memcmp(p->toks + (size_t)id * (size_t)p->bt, tokens, (size_t)p->bt * sizeof(int32_t)) == 0)
            return id;
    return -1;
}

bool moe_kv_pool_publish(struct moe_kv_pool *p, int id, uint64_t hash, uint64_t parent,
                         const int32_t *tokens)
{
    MOE_ASSERT(id >= 0 && id < p->n_blocks && p->ref[id] > 0 && !p->indexed[id]);
    if (moe_kv_pool_lookup(p, hash, parent, tokens) >= 0)
        return false;
    p->hash[id] = hash;
    p->parent[id] = parent;
    memcpy(p->toks + (size_t)id * (size_t)p->bt, tokens, (size_t)p->bt * sizeof(int32_t));
    const uint32_t b = bucket_of(p, hash);
    p->chain[id] = p->bucket[b];
    p->bucket[b] = id;
    p->indexed[id] = 1;
    return true;
}

/* ---- blocks ---- */

int moe_kv_pool_available(const struct moe_kv_pool *p)
{
    return p->n_free + p->n_cached - p->reserved;
}

bool moe_kv_pool_reserve(struct moe_kv_pool *p, int n)
{
    if (n > 0 && moe_kv_pool_available(p) < n)
        return false;
    MOE_ASSERT(p->reserved + n >= 0);
    p->reserved += n;
    return true;
}

int moe_kv_pool_alloc(struct moe_kv_pool *p, bool reserved)
{
    if (reserved) {
        MOE_ASSERT(p->reserved > 0);
        p->reserved--;
    } else if (moe_kv_pool_available(p) <= 0) {
        return -1;
    }
    int id;
    if (p->n_free > 0) {
        id = p->free_ids[--p->n_free];
    } else {
        /* the least recently used idle-cached block: never one with
         * references, those are not on the list */
        id = p->lru_head;
        MOE_ASSERT(id >= 0 && p->ref[id] == 0 && p->indexed[id]);
        lru_remove(p, id);
        index_remove(p, id);
        p->evictions++;
    }
    p->ref[id] = 1;
    p->n_used++;
    return id;
}

void moe_kv_pool_ref(struct moe_kv_pool *p, int id)
{
    MOE_ASSERT(id >= 0 && id < p->n_blocks);
    if (p->ref[id] == 0) {
        MOE_ASSERT(p->indexed[id]);   /* a free block is reached only through alloc */
        lru_remove(p, id);
        p->n_used++;
    }
    p->ref[id]++;
}

void moe_kv_pool_unref(struct moe_kv_pool *p, int id)
{
    MOE_ASSERT(id >= 0 && id < p->n_blocks && p->ref[id] > 0);
    if (--p->ref[id] > 0)
        return;
    p->n_used--;
    if (p->indexed[id])
        lru_push(p, id);
    else
        p->free_ids[p->n_free++] = id;
}

int moe_kv_pool_refs(const struct moe_kv_pool *p, int id)
{
    return id >= 0 && id < p->n_blocks ? p->ref[id] : -1;
}

void moe_kv_pool_count_lookup(struct moe_kv_pool *p, int prompt_tokens, int cached_tokens)
{
    p->lookups++;
    p->hits += cached_tokens > 0;
    p->prompt_tokens += (uint64_t)prompt_tokens;
    p->cached_tokens += (uint64_t)cached_tokens;
}

void moe_kv_pool_stats(const struct moe_kv_pool *p, struct moe_kv_stats *out)
{
    *out = (struct moe_kv_stats){
        .n_blocks = p->n_blocks, .block_tokens = p->bt, .used = p->n_used, .cached = p->n_cached,
        .free = p->n_free, .reserved = p->reserved, .evictions = p->evictions,
        .lookups = p->lookups, .hits = p->hits, .prompt_tokens = p->prompt_tokens,
        .cached_tokens = p->cached_tokens,
    };
}

int moe_kv_pool_check(const struct moe_kv_pool *p, struct moe_diag *d)
{
    int used = 0, n_indexed = 0;
    for (int i = 0; i < p->n_blocks; i++) {
        if (p->ref[i] < 0)
            return moe_diag_set(d, MOE_EFORMAT, "block %d: %d references", i, p->ref[i]);
        used += p->ref[i] > 0;
        n_indexed += p->indexed[i];
    }
    if (used != p->n_used || used + p->n_cached + p->n_free != p->n_blocks)
        return moe_diag_set(d, MOE_EFORMAT, "%d used (counted %d) + %d cached + %d free != %d blocks",
                            used, p->n_used, p->n_cached, p->n_free, p->n_blocks);
    int n = 0, last = -1;
    for (int id = p->lru_head; id >= 0; id = p->next[id], n++) {
        if (n > p->n_blocks || p->prev[id] != last || p->ref[id] != 0 || !p->indexed[id])
            return moe_diag_set(d, MOE_EFORMAT, "LRU list broken at block %d", id);
        last = id;
    }
    if (n != p->n_cached || last != p->lru_tail)
        return moe_diag_set(d, MOE_EFORMAT, "LRU list holds %d blocks, counted %d", n, p->n_cached);
    for (int i = 0; i < p->n_free; i++) {
        const int id = p->free_ids[i];
        if (id < 0 || id >= p->n_blocks || p->ref[id] != 0 || p->indexed[id])
            return moe_diag_set(d, MOE_EFORMAT, "free block %d is in use or indexed", id);
    }
    int in_index = 0;
    for (uint32_t b = 0; b < p->n_bucket; b++)
        for (int id = p->bucket[b]; id >= 0; id = p->chain[id]) {
            if (in_index++ > p->n_blocks || !p->indexed[id] || bucket_of(p, p->hash[id]) != b)
                return moe_diag_set(d, MOE_EFORMAT, "index bucket %u broken at block %d", b, id);
        }
    if (in_index != n_indexed)
        return moe_diag_set(d, MOE_EFORMAT, "index holds %d blocks, %d marked", in_index, n_indexed);
    if (p->reserved < 0 || p->reserved > p->n_free + p->n_cached)
        return moe_diag_set(d, MOE_EFORMAT, "%d blocks reserved, %d free or cached", p->reserved,
                            p->n_free + p->n_cached);
    return 0;
}

/* The paged KV pool's bookkeeping (host side): fixed-size blocks of
 * block_tokens cache rows, one pool for every sequence, reference counts,
 * reservations, and the prefix index that lets a new sequence reuse the
 * blocks of an earlier one (vLLM's automatic prefix caching).
 *
 * Blocks: a block is free, in use (ref > 0), or idle-cached (ref 0 and in
 * the prefix index). Freeing the last reference of an indexed block keeps
 * its contents for a later hit, at the tail of an LRU list; an allocation
 * takes a free block first and otherwise evicts the least recently used
 * idle-cached block. A block with references is never evicted nor handed
 * out again.
 *
 * Reservations: a sequence may reserve blocks when it starts, so that its
 * later allocations cannot fail (moe_kv_pool_alloc with `reserved`).
 * Unreserved allocations succeed only beyond every reservation.
 *
 * The prefix index: a full block is known by the hash chain of its tokens,
 * hash_i = H(hash_{i-1}, tokens of block i) (moe_kv_chain_hash; XXH3), as
 * vLLM keys blocks; a lookup also compares the block's tokens and its
 * parent's hash, so a hit is the same tokens at the same positions after a
 * prefix with the same 64-bit chain hash.
 *
 * Memory: the pool owns only host arrays (the KV memory itself is the
 * model's, in backend memory). Not thread-safe: the engine thread owns it.
 */
#ifndef MOE_MODEL_KV_H
#define MOE_MODEL_KV_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_kv_pool;

/* Counters of a pool (moe_kv_pool_stats). */
struct moe_kv_stats {
    int n_blocks, block_tokens;
    int used;               /* blocks with references */
    int cached;             /* idle-cached blocks (ref 0, in the prefix index) */
    int free;               /* neither */
    int reserved;           /* blocks promised to sequences, not yet allocated */
    uint64_t evictions;     /* idle-cached blocks reused for new contents */
    uint64_t lookups;       /* prefix lookups (sequences started with a prompt) */
    uint64_t hits;          /* lookups that reused at least one block */
    uint64_t prompt_tokens; /* prompt tokens of those lookups */
    uint64_t cached_tokens; /* of which served from cached blocks */
};

/* n_blocks >= 1 blocks of block_tokens >= 1 rows. -ENOMEM. */
int moe_kv_pool_create(struct moe_kv_pool **out, int n_blocks, int block_tokens);
void moe_kv_pool_destroy(struct moe_kv_pool *p);

/* Blocks an unreserved allocation could take now: free and idle-cached
 * blocks less the reservations. */
int moe_kv_pool_available(const struct moe_kv_pool *p);
/* Moves n blocks into (n > 0) or out of (n < 0) the reservations; false
 * (nothing changed) when fewer than n are available. */
bool moe_kv_pool_reserve(struct moe_kv_pool *p, int n);
/* A block with one reference: from a reservation (`reserved`: one is
 * released; always succeeds), else only if one is available. -1 when none. */
int moe_kv_pool_alloc(struct moe_kv_pool *p, bool reserved);
void moe_kv_pool_ref(struct moe_kv_pool *p, int id);
/* Drops a reference; at zero the block becomes idle-cached (if indexed)
 * or free. */
void moe_kv_pool_unref(struct moe_kv_pool *p, int id);
int moe_kv_pool_refs(const struct moe_kv_pool *p, int id);

/* The chain hash of a full block of n tokens after a block with hash
 * `parent` (0 for the first block). */
uint64_t moe_kv_chain_hash(uint64_t parent, const int32_t *tokens, int n);
/* The indexed block holding `tokens` (block_tokens of them) after a prefix
 * whose last block hashes to `parent`, with chain hash `hash`; -1 when none.
 * Takes no reference. */
int moe_kv_pool_lookup(const struct moe_kv_pool *p, uint64_t hash, uint64_t parent,
                       const int32_t *tokens);
/* Indexes block id (referenced, full, not yet indexed) under its chain
 * hash; false when an equal block is already indexed (id stays private). */
bool moe_kv_pool_publish(struct moe_kv_pool *p, int id, uint64_t hash, uint64_t parent,
                         const int32_t *tokens);
/* Counts one prefix lookup of a prompt of prompt_tokens that reused
 * cached_tokens. */
void moe_kv_pool_count_lookup(struct moe_kv_pool *p, int prompt_tokens, int cached_tokens);
void moe_kv_pool_stats(const struct moe_kv_pool *p, struct moe_kv_stats *out);
/* Consistency of the lists, the index and the counters (tests): 0, or
 * MOE_EFORMAT with what is wrong in d. */
int moe_kv_pool_check(const struct moe_kv_pool *p, struct moe_diag *d);

#ifdef __cplusplus
}
#endif

#endif

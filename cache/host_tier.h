/* Host-RAM tier: a byte-budgeted LRU of decompressed experts, between the
 * store on disk and the device cache.
 *
 * An entry is keyed by (layer, expert) and holds the expert's raw blob (the
 * layout of io/pack.h). Flow on a device-cache miss: acquire (hit: upload
 * from the returned bytes, then release) or reserve a buffer, load the
 * expert into it (io/expert_src.h), commit. Entries in use (acquired, or
 * reserved and not yet committed) are pinned and never evicted; eviction
 * takes the least recently used unpinned entries until the new one fits.
 *
 * Memory: buffers are 4096-aligned host allocations. With the CUDA backend
 * they should be page-locked (cudaHostAlloc, or cudaHostRegister on these
 * buffers) so that the H2D copy is a DMA from them: see the note in
 * host_tier.c where they are allocated.
 *
 * Threading: every function is thread-safe (one mutex). Pointers returned
 * by acquire/reserve stay valid until the matching release/commit.
 */
#ifndef MOE_CACHE_HOST_TIER_H
#define MOE_CACHE_HOST_TIER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#ifdef __cplusplus
extern "C" {
#endif

struct moe_host_tier;

struct moe_host_tier_stats {
    uint64_t hits, misses, inserts, evictions, refused;
    size_t used_bytes, budget_bytes;
    unsigned n_entries, n_pinned;
};

int moe_host_tier_create(struct moe_host_tier **out, size_t budget_bytes, struct moe_diag *diag);
/* Every entry must be released/committed first (MOE_ASSERT). NULL ok. */
void moe_host_tier_destroy(struct moe_host_tier *t);

/* Hit: pins the entry, sets *data and *size, returns true. Miss: false. */
bool moe_host_tier_acquire(struct moe_host_tier *t, uint32_t layer, uint32_t expert,
                           const void **data, size_t *size);
void moe_host_tier_release(struct moe_host_tier *t, uint32_t layer, uint32_t expert);

/* Whether (layer, expert) is held (ready), without pinning it, counting
 * a hit or miss, or touching the LRU order: a hint, stale at once. */
bool moe_host_tier_contains(struct moe_host_tier *t, uint32_t layer, uint32_t expert);

/* A pinned, not yet visible buffer of `size` bytes for (layer, expert).
 * -EEXIST when the entry exists or is being filled; MOE_ELIMIT when it
 * cannot fit (larger than the budget, or the rest is pinned); -ENOMEM. */
int moe_host_tier_reserve(struct moe_host_tier *t, uint32_t layer, uint32_t expert, size_t size,
                          void **buf);
/* ok: publishes the reserved entry; !ok: drops it. Unpins it either way. */
void moe_host_tier_commit(struct moe_host_tier *t, uint32_t layer, uint32_t expert, bool ok);

/* Changes the budget (evicting unpinned entries down to it). */
void moe_host_tier_set_budget(struct moe_host_tier *t, size_t budget_bytes);

void moe_host_tier_stats(struct moe_host_tier *t, struct moe_host_tier_stats *out);

#ifdef __cplusplus
}
#endif

#endif

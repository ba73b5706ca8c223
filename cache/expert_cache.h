/* The expert cache: equal-size slots in backend memory holding experts
 * loaded from an expert source (a .moe pack or a GGUF, io/expert_src.h).
 *
 * Slot states: EMPTY -> LOADING (read, verify, decompress: the expert
 * source's pipeline) -> READY, or FAILED when the load reported an error.
 * A slot is pinned while a caller uses it (acquire ... release, with a
 * reference count) and is never evicted while pinned or loading: victims
 * are chosen by the policy (cache/policy.h) among unpinned READY slots
 * only, so a completion can never land in a slot that was reused.
 *
 * Staged caches (backend memory is not host memory: CUDA, or the CPU
 * backend told to act so): a load lands in the slot's page-locked staging
 * buffer and its upload is queued on the backend's copy stream with a
 * per-slot "ready" event; the slot is READY from then on. acquire and
 * wait_any, when they hand out a slot whose upload may still run, make the
 * backend's compute stream wait for that event (the host never waits for
 * an upload on a hit). release records a per-slot "last use" event on the
 * compute stream, after the kernels the caller queued on the slot; the
 * next upload into the slot waits for it on the copy stream. A slot whose
 * upload has not finished is reused only when no other slot can be, after
 * the host waited for it (counted in upload_host_waits). Host-tier hits are
 * uploaded on the copy stream too, from the tier's buffer, which stays
 * pinned in the tier until its upload has finished. On the CPU backend
 * every event is complete at once, so the same state machine runs there.
 *
 * Threading: acquire/wait/release/prefetch/cancel_stale are called by the
 * engine thread (the thread that drives the backend's compute stream);
 * load completions, and their uploads, arrive on the expert source's
 * worker threads. One mutex guards the slot table; waiting uses a
 * condition variable.
 */
#ifndef MOE_CACHE_EXPERT_CACHE_H
#define MOE_CACHE_EXPERT_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "cache/policy.h"
#include "cache/stats.h"
#include "common/error.h"

struct moe_backend;
struct moe_expert_src;
struct moe_expert_cache;


/* Slots start on a page (the expert store reads raw blobs straight into
 * them with O_DIRECT): each takes its size rounded up to a page, and the
 * pool one page more to align the first. */
#define MOE_CACHE_SLOT_ALIGN 4096u
size_t moe_expert_cache_slot_stride(size_t slot_bytes);
/* Bytes the pool of n_slots slots of slot_bytes takes; 0 on overflow. */
size_t moe_expert_cache_pool_bytes(size_t slot_bytes, int n_slots);

/* n_slots slots of slot_bytes each (slot_bytes >= the largest expert). */
int moe_expert_cache_create(struct moe_expert_cache **out, struct moe_expert_src *src,
                            struct moe_backend *be, size_t slot_bytes, int n_slots,
                            enum moe_policy_kind policy, struct moe_diag *diag);
void moe_expert_cache_destroy(struct moe_expert_cache *c);

/* Loads land in a host buffer per slot and are uploaded into the slot when
 * they complete (a backend whose memory is not host memory). Call before the
 * first acquire. -ENOMEM naming the size. */
int moe_expert_cache_set_staging(struct moe_expert_cache *c, struct moe_diag *diag);

struct moe_host_tier;
/* Puts a host-RAM tier (cache/host_tier.h, borrowed; set before the first
 * acquire) below the slots: a slot miss that the tier holds is copied from
 * RAM instead of read from disk (on CUDA this is the pinned-memory upload),
 * and every expert loaded from disk is also kept in the tier. */
void moe_expert_cache_set_host_tier(struct moe_expert_cache *c, struct moe_host_tier *t);

/* Makes (layer, expert) resident and pins it. Returns 1 when it is ready
 * (*data set), 0 when a load is under way (pinned; use wait_any), -EAGAIN
 * when every slot is pinned or loading (nothing pinned: try again after a
 * release), or a negative error from starting the load (diag set). */
int moe_expert_cache_acquire(struct moe_expert_cache *c, int layer, int expert, int32_t step,
                             const uint8_t **data, struct moe_diag *diag);

/* Waits until one of the n pinned, loading experts is ready or failed;
 * *which is its index. Returns 0 (ready, *data set) or the load's error
 * (diag names the layer and expert; the expert stays pinned: release it). */
int moe_expert_cache_wait_any(struct moe_expert_cache *c, const int32_t *layers,
                              const int32_t *experts, int n, int *which, const uint8_t **data,
                              struct moe_diag *diag);

void moe_expert_cache_release(struct moe_expert_cache *c, int layer, int expert);

/* Blocks until some slot could be taken by an acquire (empty, or ready and
 * unpinned): for a caller whose acquire got -EAGAIN while only prefetches
 * were in flight. Returns -EAGAIN at once if every slot is pinned (waiting
 * could not help). */
/* Cancels queued prefetches that have not started, nobody pinned, and whose
 * layer is cur_layer or earlier (the engine is past them: the prediction was
 * wrong). A prefetch pinned by a demand acquire meanwhile is re-issued as an
 * urgent load instead. Returns how many were cancelled. */
int moe_expert_cache_cancel_stale(struct moe_expert_cache *c, int cur_layer);

int moe_expert_cache_wait_slot(struct moe_expert_cache *c);

/* Where (layer, expert) is without touching it (no pin, no policy access,
 * no load): 2 ready in a slot, 1 loading into one, 0 not in the cache.
 * The hybrid lanes' test for a miss; the answer may be stale at once. */
int moe_expert_cache_lookup(struct moe_expert_cache *c, int layer, int expert);

/* Starts a low-priority load of (layer, expert), unpinned, if it is not
 * cached, a slot can be freed without evicting an expert predicted for this
 * step or pinned, fewer than max_inflight prefetches are in flight, and
 * fewer than a quarter of the slots hold prefetched experts not used yet
 * (else it is dropped and counted). Marks the expert as predicted for
 * `step` either way, so that later prefetches of the step do not evict it.
 * Returns 1 when a load started, 0 when not needed or dropped, or a
 * negative error. */
/* Warm start: a low-priority load of (layer, expert) into an empty slot,
 * never evicting anything (a warm restart fills the cache with what was
 * hot before while requests already run). 1 when a load started, 0 when it
 * is cached already, -ENOSPC when no slot is empty, or a negative error. */
int moe_expert_cache_warm(struct moe_expert_cache *c, int layer, int expert);

/* Warm restarts: the policy's learned transitions out (moe_policy_export:
 * -1 for a policy without them) and a fresh policy seeded with a previous
 * run's uses and transitions (moe_policy_seed; before the first access). */
int moe_expert_cache_policy_export(struct moe_expert_cache *c, uint32_t *trans, uint32_t *follows,
                                   double *stats);
void moe_expert_cache_policy_seed(struct moe_expert_cache *c, const uint32_t *uses, int k, const uint32_t *trans,
                                  const uint32_t *follows, const double *stats);

int moe_expert_cache_prefetch(struct moe_expert_cache *c, int layer, int expert, int32_t step,
                              int max_inflight);

/* Waits (on the host) for every upload queued so far and unpins the host
 * tier's entries they read. For teardown and tests; destroy calls it. */
void moe_expert_cache_quiesce(struct moe_expert_cache *c);

void moe_expert_cache_stats(struct moe_expert_cache *c, struct moe_cache_stats *out);
/* Per layer: hits, misses, bytes loaded into slots, stall (out has room for
 * max entries); returns n_layer. */
int moe_expert_cache_layer_stats(struct moe_expert_cache *c, struct moe_cache_layer_stats *out,
                                 int max);
/* Experts currently pinned (0 between forward passes). */
int moe_expert_cache_pinned(struct moe_expert_cache *c);

#endif

/* Trace-driven simulation of a global expert cache of `capacity` slots keyed
 * by (layer, expert): every access in file order is a hit or a miss; a miss
 * loads the expert, evicting the policy's victim when the cache is full.
 * MOE_POLICY_BELADY evicts the expert whose next use is furthest away (or
 * never): the offline optimum for the same capacity (Belady's MIN).
 *
 * Prefetch (not with Belady, which stays the demand-paging optimum) replays
 * what the engine does after each layer: when a run of visits to layer L
 * ends (a visit is one token step's accesses to one layer), the experts
 * predicted for layers L+1..L+depth are loaded if absent, as the engine's
 * moe_expert_cache_prefetch does: the victim comes from the policy but is
 * never an expert predicted for the same step, prefetched experts not yet
 * used hold at most a quarter of the slots (more are dropped), and a
 * prefetch does not count as a use for the policy. Loads are instant, so
 * the simulation measures what prediction does to hits and to traffic, not
 * whether loads arrive in time.
 *   history  cache/history.h, learning from the trace as it replays
 *   oracle   the experts the trace really uses at the next visit of each
 *            layer: the ceiling for any predictor at that depth
 */
#ifndef MOE_CACHE_SIM_H
#define MOE_CACHE_SIM_H

#include <stdint.h>

#include "cache/policy.h"
#include "cache/trace.h"

enum moe_sim_prefetch_kind {
    MOE_SIM_PREFETCH_NONE,
    MOE_SIM_PREFETCH_HISTORY,
    MOE_SIM_PREFETCH_ORACLE,
};

/* "none", "history", "oracle"; -1 if unknown. */
int moe_sim_prefetch_from_name(const char *name);
const char *moe_sim_prefetch_name(enum moe_sim_prefetch_kind k);

struct moe_sim_prefetch {
    enum moe_sim_prefetch_kind kind;
    int depth;                  /* layers ahead, >= 1 */
};

struct moe_sim_result {
    int64_t accesses, hits;
    double hit_rate;
    /* prefetch: loaded, hit by a demand access before eviction, evicted or
     * left unused at the end, not loaded for the slot share */
    int64_t pf_issued, pf_used, pf_wasted, pf_dropped;
    int64_t loads;              /* misses + prefetches loaded: the traffic */
};

/* Per-layer figures of one simulation (moe_sim_opts.per_layer), over the
 * whole trace: the layer's accesses and hits, and the mean number of the
 * layer's experts cached, sampled after every access of any layer. They
 * show how a policy shares the slots between layers against Belady. */
struct moe_sim_layer {
    int64_t accesses, hits;
    double slots;
};

/* One simulation's settings. Designated initializers leave what is not
 * named at its default: no prefetch, the policy's default parameters. */
struct moe_sim_opts {
    enum moe_policy_kind policy;
    int capacity;                           /* slots, >= 1 */
    const struct moe_policy_params *params; /* NULL: moe_policy_defaults() */
    struct moe_sim_prefetch prefetch;       /* kind MOE_SIM_PREFETCH_NONE (0): none */
    struct moe_sim_layer *per_layer;        /* NULL, or the trace's n_layer entries, filled */
    /* An oracle, not a policy: > 0 keeps every expert that the rest of its
     * layer's current visit or the next `lookahead` visits of its layer use
     * out of the policy's candidates while any other is left. What knowing
     * the next tokens' routing would be worth to a demand-paging cache (the
     * ceiling for any online predictor feeding the policy); not with Belady. */
    int lookahead;
    /* A warm start as the engine makes one (model/warm.c, not with Belady):
     * warm_uses [n_layer][n_expert] (NULL: a cold start) are the accesses
     * of a previous run; the most used experts fill the empty cache first
     * (up to capacity, ties to the lower key; touched, not used, in that
     * order), and with warm_seed the policy starts from them and from
     * warm_trans/warm_follows/warm_stats (moe_policy_seed; NULL: frequencies
     * only). */
    const uint32_t *warm_uses, *warm_trans, *warm_follows;
    const double *warm_stats;               /* MOE_POLICY_STATS, or NULL */
    int warm_seed;
    /* Filled after the run when not NULL, for a next warm run: every key's
     * accesses [n_layer][n_expert], and the policy's transition counts
     * (moe_policy_export; left zero for policies without them). */
    uint32_t *out_uses, *out_trans, *out_follows;
    double *out_stats;
};

/* 0, -EINVAL (capacity < 1, a bad prefetch, prefetch or lookahead with
 * Belady, lookahead < 0) or -ENOMEM. */
int moe_cache_sim(const struct moe_trace *t, const struct moe_sim_opts *o, struct moe_sim_result *r);

#endif

/* Trace-driven simulation of a global expert cache of `capacity` slots keyed
 * by (layer, expert): every access in file order is a hit or a miss; a miss
 * loads the expert, evicting the policy's victim when the cache is full.
 * MOE_POLICY_BELADY evicts the expert whose next use is furthest away (or
 * never): the offline optimum for the same capacity (Belady's MIN). */
#ifndef MOE_CACHE_SIM_H
#define MOE_CACHE_SIM_H

#include <stdint.h>

#include "cache/policy.h"
#include "cache/trace.h"

struct moe_sim_result {
    int64_t accesses, hits;
    double hit_rate;
};

/* 0, -EINVAL (capacity < 1) or -ENOMEM. */
int moe_cache_sim(const struct moe_trace *t, enum moe_policy_kind kind, int capacity,
                  const struct moe_policy_params *params, struct moe_sim_result *r);

#endif

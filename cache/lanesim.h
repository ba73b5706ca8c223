/* The lane simulator: replays a routing trace through a device expert
 * cache under a hardware profile and predicts the time per token of each
 * miss-lane mode (copy-only, cpu-only, auto with cache/lane.h's rule and
 * governor), for `moectl cache-sim --lanes`.
 *
 * The trace is cut into layer steps as the engine runs it: a run of
 * consecutive accesses to one layer is one step (one token in decode, the
 * whole batch of a layer-major prefill), and a pass over the layers is one
 * token step (the governor's clock). Each layer step, on one clock:
 *   - the device computes the layer's dense part (dense bytes, a roofline
 *     over the step's tokens); then the routing is known;
 *   - a miss outside the host tier is read from the store first (one disk,
 *     in order);
 *   - COPY misses go over the link one after the other (the copy stream
 *     carries across steps); the device computes the hits, waiting for any
 *     still in flight, and each copied expert once it has arrived;
 *   - CPU misses are computed one after the other on the CPU lane, which
 *     pays cpu_sync_s once per step it is used;
 *   - COPY|CPU misses are computed on the CPU and their uploads queued
 *     behind; they are hits once arrived;
 *   - the step ends when both lanes have.
 * Copies are inserted into a cache of `capacity` slots, the victim chosen by
 * the cache policy among the slots not used by the step and not in flight.
 * Every mode starts with the same cache: empty, or (warm) the most used
 * experts of the whole trace, what a warm file (cache/warm.h) from an
 * earlier run of the same workload would load. Prefetch is not simulated.
 *
 * Under auto the lane state starts from the profile's rates, as the
 * engine's calibration at load would measure them (time one upload and one
 * expert on the CPU), or with `uncalibrated` from moe_lane_rates_default();
 * either way it goes on learning from the simulated lane times through the
 * moe_lane_observe_* calls the engine makes. The expected reuse and the
 * eviction's come from moe_lane_reuse, as in the engine.
 *
 * Deterministic: the same trace and options give the same figures.
 */
#ifndef MOE_CACHE_LANESIM_H
#define MOE_CACHE_LANESIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache/lane.h"
#include "cache/policy.h"
#include "cache/trace.h"

struct moe_lanesim_profile {
    const char *name;
    const char *about;
    struct moe_lane_rates hw;
};

/* The built-in profiles ("desktop", "server", "egpu"), n of them. */
const struct moe_lanesim_profile *moe_lanesim_profiles(int *n);
/* NULL if unknown. */
const struct moe_lanesim_profile *moe_lanesim_profile_find(const char *name);

struct moe_lanesim_opts {
    enum moe_policy_kind policy;            /* not MOE_POLICY_BELADY */
    int capacity;                           /* device slots, >= 1 */
    const struct moe_policy_params *params; /* NULL: defaults */
    struct moe_lane_rates hw;               /* the machine */
    enum moe_miss_lane mode;
    const uint64_t *expert_bytes;           /* [n_layer], each >= 1 */
    const uint64_t *dense_bytes;            /* [n_layer] or NULL: no dense part */
    int host_capacity;                      /* experts the host tier holds; <= 0: all */
    bool warm;                              /* start with the most used experts cached */
    bool no_governor;                       /* auto: the rule alone */
    bool uncalibrated;                      /* auto: start from the default rates, not hw */
    bool serial;                            /* the lanes do not overlap (the CPU backend as the
                                             * device): a step takes the sum of its work */
    double reuse_min, bg_horizon;           /* auto: the rule's knobs; < 0: its defaults */
};

struct moe_lanesim_result {
    double total_s, prefill_s, decode_s;
    int64_t prefill_tokens, decode_tokens;  /* tokens of the passes of > 1 and of 1 token */
    int64_t layer_steps, hits, misses;      /* misses: experts per step, not accesses */
    int64_t n_copy, n_cpu, n_both, disk_reads;
    double link_busy_s, cpu_busy_s;
    uint64_t gov_steps[MOE_MISS_LANE_COUNT];
};

/* 0, -EINVAL (bad options) or -ENOMEM. */
int moe_lanesim_run(const struct moe_trace *t, const struct moe_lanesim_opts *o,
                    struct moe_lanesim_result *r);

/* Reads "# layer=L expert_bytes=B dense_bytes=D" header lines (the
 * route_trace v1 CSV has them) from a trace's text into the n_layer
 * arrays; layers without a line keep what the arrays held. Returns the
 * number of layers found. */
int moe_lanesim_read_bytes(const char *text, size_t len, int n_layer, uint64_t *expert_bytes,
                           uint64_t *dense_bytes);

#endif

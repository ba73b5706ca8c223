/* The prefetch governor: decides, decode step by decode step, whether the
 * engine issues prefetches.
 *
 * Accurate prediction can still slow decoding: when the disk is the
 * bottleneck, every prefetch is one more load competing with the misses.
 * So the effect is measured end to end: decode steps alternate a probe with
 * prefetch on and one with it off (MOE_GOV_PROBE steps each), the faster
 * setting runs for MOE_GOV_EXPLOIT steps, then it probes again. Prefetch
 * must win clearly (3%) since it costs disk bandwidth. With `always` set,
 * prefetch stays on and only the step counts are kept.
 *
 * Plain data, owned by the engine thread; not thread-safe.
 */
#ifndef MOE_CACHE_GOVERNOR_H
#define MOE_CACHE_GOVERNOR_H

#include <stdbool.h>
#include <stdint.h>

enum { MOE_GOV_PROBE = 8, MOE_GOV_EXPLOIT = 48 };   /* in decode steps */

struct moe_prefetch_gov {
    bool always;
    int phase, left;        /* phase 0: probe on, 1: probe off, 2: exploit */
    bool use;               /* the setting exploited */
    double sum[2];          /* seconds of the probe steps, [off, on] */
    int n[2];
    uint64_t steps[2];      /* decode steps run with prefetch off / on */
};

void moe_prefetch_gov_init(struct moe_prefetch_gov *g, bool always);
/* Whether the next decode step prefetches. */
bool moe_prefetch_gov_on(const struct moe_prefetch_gov *g);
/* Records a decode step run with prefetch `on` that took dt seconds. */
void moe_prefetch_gov_step(struct moe_prefetch_gov *g, bool on, double dt);

#endif

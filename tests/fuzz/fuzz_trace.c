/* Fuzz entry for routing traces (cache/trace.c: route_trace v1 CSV and
 * moed's own format) and the cache simulator behind `moectl cache-sim`: any
 * bytes as a trace file. Never a crash, a hang or an over-read; a trace that
 * parses has every access inside its n_layer x n_expert and n_expert_used
 * <= n_expert, and small ones replay through the simulator (LRU and
 * `predict` with history and oracle prefetch, Belady) with consistent
 * counts. */
#include <stdlib.h>
#include <string.h>

#include "cache/sim.h"
#include "cache/trace.h"

/* The options of one simulation: SIM(policy, capacity[, .prefetch = pf]);
 * the capacity opens the variadic part so that it is never empty. */
#define SIM(policy_, ...) (&(struct moe_sim_opts){ .policy = (policy_), .capacity = __VA_ARGS__ })

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct moe_trace t;
    struct moe_diag d = { 0 };
    if (moe_trace_parse(&t, (const char *)data, size, "fuzz.trace", &d) != 0) {
        if (d.msg[0] == '\0' || strstr(d.msg, "fuzz.trace") == NULL)
            abort();
        return 0;
    }
    if (t.n_layer < 1 || t.n_expert < 1 || t.n_expert_used < 0 || t.n_expert_used > t.n_expert)
        abort();
    for (int64_t i = 0; i < t.n; i++)
        if (t.a[i].layer < 0 || t.a[i].layer >= t.n_layer || t.a[i].expert < 0 ||
            t.a[i].expert >= t.n_expert)
            abort();
    /* the simulator keeps n_layer x n_expert^2 transition counts: small
     * shapes only */
    if (t.n <= 4096 && (int64_t)t.n_layer * t.n_expert * t.n_expert <= (1 << 20)) {
        const struct moe_sim_prefetch pf[] = { { MOE_SIM_PREFETCH_HISTORY, 2 },
                                               { MOE_SIM_PREFETCH_ORACLE, 1 } };
        for (int cap = 1; cap <= 7; cap += 3) {
            struct moe_sim_result b, r;
            if (moe_cache_sim(&t, SIM(MOE_POLICY_BELADY, cap), &b) != 0)
                continue;
            if (b.hits > b.accesses || b.accesses != t.n)
                abort();
            for (int k = 0; k < 2; k++) {
                if (moe_cache_sim(&t, SIM(MOE_POLICY_PREDICT, cap, .prefetch = pf[k]), &r) != 0)
                    continue;
                if (r.hits > r.accesses || r.pf_used + r.pf_wasted != r.pf_issued ||
                    r.loads != t.n - r.hits + r.pf_issued)
                    abort();
            }
            if (moe_cache_sim(&t, SIM(MOE_POLICY_LRU, cap), &r) == 0 && r.hits > b.hits)
                abort(); /* Belady is the optimum of demand paging */
        }
    }
    moe_trace_free(&t);
    return 0;
}

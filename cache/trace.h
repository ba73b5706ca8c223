/* Expert-routing traces: the sequence of (layer, expert) accesses of a run,
 * in execution order, for cache simulation and prefetch studies.
 *
 * Two formats are read (moe_trace_load detects which):
 *  - `route_trace v1` CSV (shared/traces/README.md): '#' header lines with
 *    n_layer/n_expert/n_expert_used, a column header, then one row per
 *    (step, layer, slot): turn,phase,step,layer,slot,expert,weight,...
 *  - moed's own text format, which `moectl eval --routing` writes: optional
 *    '#' lines (`# moe_trace v1 n_layer=.. n_expert=.. n_expert_used=..`),
 *    then one line per token and MoE layer: `token layer id:weight ...`.
 * Every input error is MOE_EFORMAT naming the file and line.
 */
#ifndef MOE_CACHE_TRACE_H
#define MOE_CACHE_TRACE_H

#include <stdint.h>

#include "common/error.h"

struct moe_access {
    int32_t layer, expert;
    int32_t step;        /* token step (prefill and decode steps numbered in file order) */
    float weight;
};

struct moe_trace {
    int n_layer, n_expert, n_expert_used;    /* from the header, else inferred */
    int64_t n;                               /* accesses */
    struct moe_access *a;
};

int moe_trace_load(struct moe_trace *t, const char *path, struct moe_diag *diag);
/* From memory (tests, fuzzing); `name` is used in messages. */
int moe_trace_parse(struct moe_trace *t, const char *text, size_t len, const char *name,
                    struct moe_diag *diag);
void moe_trace_free(struct moe_trace *t);

#endif

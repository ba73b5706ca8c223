/* Warm-restart statistics: what the expert cache learned in one run (how
 * often each expert was routed to, and the history predictor's transition
 * counts), written beside the model at exit and read at the next start, so
 * the next run pre-loads the hottest experts and predicts from the first
 * token.
 *
 * The file ("<model>.warm") is written to a temporary name, synced and
 * renamed over the old one, so a crash (kill -9 included) at any point
 * leaves the old file or the new one, never a broken one. It carries a
 * version, the model's identity and an XXH3 of its contents: a stale file
 * (another model, another shape) or a corrupt one is refused with a message
 * the caller logs as a warning, and the run goes on cold.
 *
 * Tables (header field `tables`, a bit each): 1 the history predictor's
 * two transition tables, 2 the policy's transition counts. A file written
 * before the policy's table existed (tables 0 or 1) reads as it did.
 *
 * Errors: 0, or a negative code with a message naming the file.
 */
#ifndef MOE_CACHE_WARM_H
#define MOE_CACHE_WARM_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"

#define MOE_WARM_POLICY_STATS 32   /* = MOE_POLICY_STATS (cache/policy.h) */

struct moe_warm {
    uint32_t n_layer, n_expert, k;
    uint64_t model_id;        /* identity of the model (caller's hash) */
    uint32_t *uses;           /* [n_layer][n_expert] tokens routed to each expert */
    uint32_t *tr_tok;         /* [n_layer][n_expert][n_expert] or NULL (history predictor) */
    uint32_t *tr_layer;       /* the same shape, or NULL */
    /* the eviction policy's transition counts and scalars
     * (moe_policy_export), or NULL: [n_layer][n_expert][n_expert],
     * [n_layer][n_expert] and MOE_WARM_POLICY_STATS doubles */
    uint32_t *pol_trans, *pol_follows;
    double *pol_stats;
};

/* Writes w to path atomically. */
int moe_warm_write(const char *path, const struct moe_warm *w, struct moe_diag *diag);

/* Reads path into w, whose n_layer, n_expert, k and model_id say what is
 * expected; allocates uses (and the tables when the file has them; freed by
 * moe_warm_free). -ENOENT when there is no file (no message); MOE_EFORMAT
 * for a file of another model or shape (stale), MOE_ECHECKSUM for a
 * corrupt one, MOE_EUNSUPPORTED for another version. */
int moe_warm_read(const char *path, struct moe_warm *w, struct moe_diag *diag);

void moe_warm_free(struct moe_warm *w);

#endif

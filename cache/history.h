/* History predictor of routing, shared by the engine's `--prefetch history`
 * and `moectl cache-sim --prefetch history`.
 *
 * Per MoE layer it counts two kinds of transitions between top-k choices:
 * (expert chosen at the previous token) -> (expert chosen now), and
 * (expert chosen at the previous layer for the same token) -> (expert
 * chosen now). A prediction for layer l sums, over the experts of l's
 * latest choice (and, optionally, of another layer's latest choice), the
 * counts of what followed them, and returns the k highest. Memory:
 * 2 x n_layer x n_expert^2 x 4 bytes (3.9 MB for 30 x 128).
 */
#ifndef MOE_CACHE_HISTORY_H
#define MOE_CACHE_HISTORY_H

#include <stdint.h>

struct moe_history {
    int n_layer, n_expert, k;
    uint32_t *tr_tok;    /* [n_layer][n_expert][n_expert] previous token -> now */
    uint32_t *tr_layer;  /* [n_layer][n_expert][n_expert] previous layer -> now */
    int32_t *last;       /* [n_layer][k] the latest choice, -1 = none */
    uint64_t *score;     /* [n_expert] scratch of moe_history_predict */
};

/* 0, -EINVAL (a size < 1) or -ENOMEM. */
int moe_history_init(struct moe_history *h, int n_layer, int n_expert, int k);
void moe_history_free(struct moe_history *h);

/* Records one token's choice at `layer` (k ids in [0, n_expert); others are
 * ignored): counts the transitions from the layer's latest choice and, when
 * prev_layer >= 0, from prev_layer's latest choice (the same token's, the
 * caller's promise), then makes `ids` the layer's latest choice. */
void moe_history_learn(struct moe_history *h, int layer, const int32_t *ids, int prev_layer);

/* Writes up to k experts predicted for `layer`'s next choice into out, the
 * most likely first (ties: the lower id): scored from `layer`'s latest
 * choice and, when from_layer >= 0, from_layer's latest choice. Experts that
 * never followed are not predicted. Returns the number written. */
int moe_history_predict(struct moe_history *h, int layer, int from_layer, int32_t *out);

#endif

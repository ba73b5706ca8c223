#include <errno.h>
#include <string.h>

#include "cache/history.h"
#include "common/alloc.h"

int moe_history_init(struct moe_history *h, int n_layer, int n_expert, int k)
{
    memset(h, 0, sizeof(*h));
    if (n_layer < 1 || n_expert < 1 || k < 1 || k > n_expert)
        return -EINVAL;
    const size_t nn = (size_t)n_layer * (size_t)n_expert * (size_t)n_expert;
    h->n_layer = n_layer;
    h->n_expert = n_expert;
    h->k = k;
    h->tr_tok = moe_calloc(nn, sizeof(uint32_t));
    h->tr_layer = moe_calloc(nn, sizeof(uint32_t));
    h->last = moe_malloc((size_t)n_layer * (size_t)k * sizeof(int32_t));
    h->score = moe_malloc((size_t)n_expert * sizeof(uint64_t));
    if (h->tr_tok == NULL || h->tr_layer == NULL || h->last == NULL || h->score == NULL) {
        moe_history_free(h);
        return -ENOMEM;
    }
    for (size_t i = 0; i < (size_t)n_layer * (size_t)k; i++)
        h->last[i] = -1;
    return 0;
}

void moe_history_free(struct moe_history *h)
{
    moe_free(h->tr_tok);
    moe_free(h->tr_layer);
    moe_free(h->last);
    moe_free(h->score);
    memset(h, 0, sizeof(*h));
}

static int valid(const struct moe_history *h, int32_t e)
{
    return e >= 0 && e < h->n_expert;
}

void moe_history_learn(struct moe_history *h, int layer, const int32_t *ids, int prev_layer)
{
    if (layer < 0 || layer >= h->n_layer)
        return;
    const int K = h->k;
    const size_t X = (size_t)h->n_expert;
    uint32_t *tt = h->tr_tok + (size_t)layer * X * X, *tl = h->tr_layer + (size_t)layer * X * X;
    int32_t *last = h->last + (size_t)layer * K;
    const int32_t *prev = prev_layer >= 0 && prev_layer < h->n_layer && prev_layer != layer
                              ? h->last + (size_t)prev_layer * K : NULL;
    for (int a = 0; a < K; a++) {
        for (int b = 0; b < K; b++) {
            if (!valid(h, ids[b]))
                continue;
            if (valid(h, last[a]))
                tt[(size_t)last[a] * X + (size_t)ids[b]]++;
            if (prev && valid(h, prev[a]))
                tl[(size_t)prev[a] * X + (size_t)ids[b]]++;
        }
    }
    for (int a = 0; a < K; a++)
        last[a] = valid(h, ids[a]) ? ids[a] : -1;
}

int moe_history_predict(struct moe_history *h, int layer, int from_layer, int32_t *out)
{
    if (layer < 0 || layer >= h->n_layer)
        return 0;
    const int K = h->k, X = h->n_expert;
    const uint32_t *tt = h->tr_tok + (size_t)layer * X * X, *tl = h->tr_layer + (size_t)layer * X * X;
    const int32_t *last = h->last + (size_t)layer * K;
    const int32_t *from = from_layer >= 0 && from_layer < h->n_layer && from_layer != layer
                              ? h->last + (size_t)from_layer * K : NULL;
    /* scores are counts: exact in 64 bits, so ties break only by id */
    uint64_t *score = h->score;
    memset(score, 0, (size_t)X * sizeof(*score));
    for (int a = 0; a < K; a++) {
        if (last[a] >= 0)
            for (int e = 0; e < X; e++)
                score[e] += tt[(size_t)last[a] * X + e];
        if (from && from[a] >= 0)
            for (int e = 0; e < X; e++)
                score[e] += tl[(size_t)from[a] * X + e];
    }
    int n = 0;
    for (; n < K; n++) {
        int best = -1;
        for (int e = 0; e < X; e++)
            if (score[e] > 0 && (best < 0 || score[e] > score[best]))
                best = e;
        if (best < 0)
            break;
        out[n] = best;
        score[best] = 0;
    }
    return n;
}

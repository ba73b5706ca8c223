#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cache/policy.h"
#include "common/alloc.h"

struct moe_policy {
    enum moe_policy_kind kind;
    int n_layer, n_expert;
    struct moe_policy_params prm;
    int64_t *last;          /* [key] last access time */
    double *count;          /* [key] LFU count, or layer-policy frequency */
    int32_t *stamp;         /* [key] step (LFU) or layer visit (layer) of the count */
    int32_t *visit;         /* [layer] visits so far (layer policy) */
    int32_t *visit_step;    /* [layer] step of the current visit */
    int32_t *seen;          /* [key] visit in which the key was last counted */
};

int moe_policy_from_name(const char *name)
{
    static const char *const names[] = { "lru", "lfu", "layer", "belady" };
    for (int i = 0; i < 4; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

const char *moe_policy_name(enum moe_policy_kind k)
{
    static const char *const names[] = { "lru", "lfu", "layer", "belady" };
    return (unsigned)k < 4 ? names[k] : "?";
}

void moe_policy_defaults(struct moe_policy_params *p)
{
    p->lfu_decay = 0.9;
    p->layer_alpha = 0.05;
    p->layer_beta = 1.0;
    p->layer_recent = 0.2;
}

struct moe_policy *moe_policy_create(enum moe_policy_kind kind, int n_layer, int n_expert,
                                     const struct moe_policy_params *params)
{
    if (kind == MOE_POLICY_BELADY || n_layer <= 0 || n_expert <= 0)
        return NULL;
    struct moe_policy *p = moe_calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    const size_t nk = (size_t)n_layer * (size_t)n_expert;
    p->kind = kind;
    p->n_layer = n_layer;
    p->n_expert = n_expert;
    if (params)
        p->prm = *params;
    else
        moe_policy_defaults(&p->prm);
    p->last = moe_calloc(nk, sizeof(int64_t));
    p->count = moe_calloc(nk, sizeof(double));
    p->stamp = moe_calloc(nk, sizeof(int32_t));
    p->seen = moe_calloc(nk, sizeof(int32_t));
    p->visit = moe_calloc((size_t)n_layer, sizeof(int32_t));
    p->visit_step = moe_calloc((size_t)n_layer, sizeof(int32_t));
    if (!p->last || !p->count || !p->stamp || !p->seen || !p->visit || !p->visit_step) {
        moe_policy_free(p);
        return NULL;
    }
    for (int l = 0; l < n_layer; l++)
        p->visit_step[l] = -1;
    for (size_t k = 0; k < nk; k++)
        p->seen[k] = -1;
    return p;
}

void moe_policy_free(struct moe_policy *p)
{
    if (p == NULL)
        return;
    moe_free(p->last);
    moe_free(p->count);
    moe_free(p->stamp);
    moe_free(p->seen);
    moe_free(p->visit);
    moe_free(p->visit_step);
    moe_free(p);
}

static double lfu_now(const struct moe_policy *p, int32_t key, int32_t step)
{
    return p->count[key] * pow(p->prm.lfu_decay, (double)(step - p->stamp[key]));
}

/* frequency of key at its layer's current visit count */
static double freq_now(const struct moe_policy *p, int32_t key, int layer)
{
    return p->count[key] * pow(1.0 - p->prm.layer_alpha, (double)(p->visit[layer] - p->stamp[key]));
}

void moe_policy_access(struct moe_policy *p, int layer, int expert, int64_t now, int32_t step)
{
    const int32_t key = layer * p->n_expert + expert;
    p->last[key] = now;
    switch (p->kind) {
    case MOE_POLICY_LFU:
        p->count[key] = lfu_now(p, key, step) + 1.0;
        p->stamp[key] = step;
        break;
    case MOE_POLICY_LAYER:
        /* a new token step at this layer is a new visit */
        if (p->visit_step[layer] != step) {
            p->visit_step[layer] = step;
            p->visit[layer]++;
        }
        if (p->seen[key] != p->visit[layer]) { /* count once per visit */
            p->count[key] = freq_now(p, key, layer) + p->prm.layer_alpha;
            p->stamp[key] = p->visit[layer];
            p->seen[key] = p->visit[layer];
        }
        break;
    default:
        break;
    }
}

int moe_policy_victim(struct moe_policy *p, const int32_t *keys, int n, int cur_layer, int32_t step)
{
    int best = 0;
    double best_score = INFINITY;
    for (int i = 0; i < n; i++) {
        const int32_t key = keys[i];
        double score;
        switch (p->kind) {
        case MOE_POLICY_LFU:
            score = lfu_now(p, key, step);
            break;
        case MOE_POLICY_LAYER: {
            const int layer = key / p->n_expert;
            /* layers until this layer is computed again: 1 for the next one,
             * n_layer for the one being computed now */
            int dist = (layer - cur_layer + p->n_layer) % p->n_layer;
            if (dist == 0)
                dist = p->n_layer;
            /* used at this layer's latest visit (the current one counts as
             * latest only once the layer has moved on) */
            const int recent = p->seen[key] >= p->visit[layer] - (layer == cur_layer ? 1 : 0);
            double pr = freq_now(p, key, layer) + (recent ? p->prm.layer_recent : 0.0);
            if (pr > 1.0)
                pr = 1.0;
            if (pr < 1e-6)
                pr = 1e-6;
            /* expected accesses-in-layers until the next use if each visit
             * uses it with probability pr: dist + n_layer * (1 - pr) / pr.
             * Keep the soonest, evict the latest (Belady, in expectation). */
            score = -((double)dist * p->prm.layer_beta + (double)p->n_layer * (1.0 - pr) / pr);
            break;
        }
        default:
            score = 0.0;
            break;
        }
        /* ties (and LRU) by age: the least recently used goes first */
        if (score < best_score || (score == best_score && p->last[key] < p->last[keys[best]])) {
            best = i;
            best_score = score;
        }
    }
    return best;
}

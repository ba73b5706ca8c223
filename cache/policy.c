#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "cache/policy.h"
#include "common/alloc.h"

/* predict's recency buckets: 1..8 visits since the latest use, 9-16, more
 * or never */
#define PRED_SINCE_BUCKETS 10
#define PRED_REUSE_PRIOR 10.0   /* weight of the overall rate in a bucket's estimate */
/* predict's frequency time scales when pred_alpha is 0: EMA weights
 * 0.01 x 2^j per layer visit (memories of ~100 down to ~6 visits) */
#define PRED_ALPHAS 5
#define PRED_ALPHA_MIN 0.01
#define PRED_FREQ_CLIP 1e-3     /* the frequency's log loss: f in [clip, 1 - clip] */
#define PRED_POW_N 1024         /* (1 - alpha)^d tabulated for d below this */
#define SEED_VISITS_MAX 1000    /* moe_policy_seed: the history a warm start stands for */
#define SEEDED_STEP INT32_MIN   /* visit_step of a layer whose only visits are seeded */

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
    /* predict */
    int words;              /* 64-bit words of one layer's expert set */
    uint64_t *set;          /* [layer][words] experts used at the latest visit */
    uint64_t *pset;         /* [layer][words] ... at the visit before */
    float *tc;              /* [layer][a][b] visits using b right after a visit using a */
    float *tn;              /* [layer][a] visits using a that were followed by a visit */
    int cur_layer;          /* layer of the latest visit, -1 before any */
    int layer_major;        /* the latest visit repeated the layer before it (prefill) */
    int32_t *pseen;         /* [key] the visit of the use before `seen` (-1: none) */
    /* reuse by recency, learned from the routing: of the experts whose
     * latest use was s visits before a visit of their layer (bucket
     * since_bucket(s)), how many that visit used */
    double reuse_n[PRED_SINCE_BUCKETS], reuse_d[PRED_SINCE_BUCKETS];
    double used_n, used_d;  /* the same over every bucket */
    /* frequency: one exponentially weighted count per time scale, decayed
     * from stamp[key]; the counts before the latest use (made at pseen[key])
     * give the estimate the finished visit was predicted with */
    int n_alpha;
    double alpha[PRED_ALPHAS];
    double *fc;             /* [key][n_alpha] */
    double *fc_prev;        /* [key][n_alpha] */
    double loss[PRED_ALPHAS]; /* log loss of each scale's estimate over the finished visits */
    double *keep_pow;       /* [j][PRED_POW_N] (1 - alpha[j])^d */
    double *gathered;       /* [layer][n_alpha] 1 - (1 - alpha[j])^visit[layer] */
};

/* predict's fixed shape parameters (doc/cache.md) */
#define PRED_TRANS_PRIOR 20.0
#define PRED_OTHER_LAYERS 100.0 /* layer-major order: other layers wait this many cycles */

int moe_policy_from_name(const char *name)
{
    static const char *const names[] = { "lru", "lfu", "layer", "belady", "predict" };
    for (int i = 0; i < MOE_POLICY_COUNT; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

const char *moe_policy_name(enum moe_policy_kind k)
{
    static const char *const names[] = { "lru", "lfu", "layer", "belady", "predict" };
    return (unsigned)k < MOE_POLICY_COUNT ? names[k] : "?";
}

void moe_policy_defaults(struct moe_policy_params *p)
{
    p->lfu_decay = 0.9;
    p->layer_alpha = 0.05;
    p->layer_beta = 1.0;
    p->layer_recent = 0.2;
    p->pred_alpha = 0.0;
    p->pred_freq = 0.5;
    p->pred_trans = 1.2;
    p->pred_dist = 1.0;
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
    p->cur_layer = -1;
    if (kind == MOE_POLICY_PREDICT) {
        p->words = (n_expert + 63) / 64;
        p->set = moe_calloc((size_t)n_layer * (size_t)p->words, sizeof(uint64_t));
        p->pset = moe_calloc((size_t)n_layer * (size_t)p->words, sizeof(uint64_t));
        p->tc = moe_calloc(nk * (size_t)n_expert, sizeof(float));
        p->tn = moe_calloc(nk, sizeof(float));
        p->pseen = moe_malloc(nk * sizeof(int32_t));
        p->n_alpha = p->prm.pred_alpha > 0.0 ? 1 : PRED_ALPHAS;
        for (int j = 0; j < p->n_alpha; j++)
            p->alpha[j] = p->prm.pred_alpha > 0.0 ? p->prm.pred_alpha : PRED_ALPHA_MIN * (double)(1 << j);
        p->fc = moe_calloc(nk * (size_t)p->n_alpha, sizeof(double));
        p->fc_prev = moe_calloc(nk * (size_t)p->n_alpha, sizeof(double));
        p->keep_pow = moe_malloc((size_t)p->n_alpha * PRED_POW_N * sizeof(double));
        p->gathered = moe_calloc((size_t)n_layer * (size_t)p->n_alpha, sizeof(double));
        if (!p->set || !p->pset || !p->tc || !p->tn || !p->pseen || !p->fc || !p->fc_prev || !p->keep_pow ||
            !p->gathered) {
            moe_policy_free(p);
            return NULL;
        }
        for (int j = 0; j < p->n_alpha; j++)
            for (int d = 0; d < PRED_POW_N; d++)
                p->keep_pow[j * PRED_POW_N + d] = pow(1.0 - p->alpha[j], (double)d);
    }
    for (int l = 0; l < n_layer; l++)
        p->visit_step[l] = -1;
    for (size_t k = 0; k < nk; k++) {
        p->seen[k] = -1;
        if (p->pseen)
            p->pseen[k] = -1;
    }
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
    moe_free(p->set);
    moe_free(p->pset);
    moe_free(p->tc);
    moe_free(p->tn);
    moe_free(p->pseen);
    moe_free(p->fc);
    moe_free(p->fc_prev);
    moe_free(p->keep_pow);
    moe_free(p->gathered);
    moe_free(p);
}

static double lfu_now(const struct moe_policy *p, int32_t key, int32_t step)
{
    return p->count[key] * pow(p->prm.lfu_decay, (double)(step - p->stamp[key]));
}

/* layer: frequency of key at its layer's current visit count */
static double freq_now(const struct moe_policy *p, int32_t key, int layer)
{
    return p->count[key] * pow(1.0 - p->prm.layer_alpha, (double)(p->visit[layer] - p->stamp[key]));
}

/* predict: the time scale whose estimates predicted the finished visits
 * best so far (the first of near-equal ones) */
static int pred_scale(const struct moe_policy *p)
{
    int b = 0;
    for (int j = 1; j < p->n_alpha; j++)
        if (p->loss[j] < p->loss[b] - 1e-9 * p->loss[b])
            b = j;
    return b;
}

/* predict: (1 - alpha[j])^d, d >= 0 */
static double pred_keep(const struct moe_policy *p, int j, int32_t d)
{
    return d < PRED_POW_N ? p->keep_pow[j * PRED_POW_N + d] : pow(1.0 - p->alpha[j], (double)d);
}

/* predict: the frequency on scale j at a visit v >= 1 of the layer, from
 * counts c last updated at visit st <= v, divided by the weight the average
 * has gathered by then, 1 - (1 - alpha)^v (so that a short history is not
 * read as a rare expert) */
static double pred_freq(const struct moe_policy *p, const double *c, int32_t st, int j, int32_t v,
                        double gathered)
{
    return c[j] * pred_keep(p, j, v - st) / gathered;
}

static int since_bucket(int32_t since)
{
    return since <= 8 ? since - 1 : since <= 16 ? 8 : 9;
}

/* predict: a new token step at `layer` starts a new visit. The finished
 * visit's experts become the "previous" set, and each of them counts one
 * more visit that was followed by another; every expert of the layer counts
 * in the reuse statistics by its recency at the start of the finished
 * visit. */
static void pred_visit(struct moe_policy *p, int layer, int32_t step)
{
    if (p->visit_step[layer] == step)
        return;
    uint64_t *set = p->set + (size_t)layer * p->words, *pset = p->pset + (size_t)layer * p->words;
    float *tn = p->tn + (size_t)layer * p->n_expert;
    const int32_t v = p->visit[layer]; /* the finished visit, 0: none */
    /* a seeded history (moe_policy_seed) has no finished visit to score */
    if (v > 0 && p->visit_step[layer] != SEEDED_STEP) {
        const int32_t *seen = p->seen + (size_t)layer * p->n_expert;
        const int32_t *pseen = p->pseen + (size_t)layer * p->n_expert;
        const int32_t *stamp = p->stamp + (size_t)layer * p->n_expert;
        /* each time scale's frequency at the visit before, as the
         * probability of a use in this one: its log loss picks the scale */
        double gath[PRED_ALPHAS];   /* the weight gathered by visit v - 1 */
        for (int j = 0; j < p->n_alpha; j++)
            gath[j] = 1.0 - pred_keep(p, j, v - 1);
        for (int e = 0; p->n_alpha > 1 && v >= 2 && e < p->n_expert; e++) {
            const size_t k = (size_t)layer * p->n_expert + (size_t)e;
            const int used = seen[e] == v;
            const double *c = (used ? p->fc_prev : p->fc) + k * (size_t)p->n_alpha;
            for (int j = 0; j < p->n_alpha; j++) {
                double f = pred_freq(p, c, used ? pseen[e] : stamp[e], j, v - 1, gath[j]);
                f = f < PRED_FREQ_CLIP ? PRED_FREQ_CLIP : f > 1.0 - PRED_FREQ_CLIP ? 1.0 - PRED_FREQ_CLIP : f;
                p->loss[j] -= log(used ? f : 1.0 - f);
            }
        }
        for (int e = 0; e < p->n_expert; e++) {
            const int used = seen[e] == v;
            const int32_t before = used ? pseen[e] : seen[e];
            const int b = before < 0 ? PRED_SINCE_BUCKETS - 1 : since_bucket(v - before);
            p->reuse_d[b] += 1.0;
            p->reuse_n[b] += used;
            p->used_d += 1.0;
            p->used_n += used;
        }
    }
    for (int w = 0; w < p->words; w++) {
        for (uint64_t m = set[w]; m; m &= m - 1)
            tn[w * 64 + __builtin_ctzll(m)] += 1.0f;
        pset[w] = set[w];
        set[w] = 0;
    }
    p->visit_step[layer] = step;
    p->visit[layer]++;
    for (int j = 0; j < p->n_alpha; j++)
        p->gathered[layer * p->n_alpha + j] = 1.0 - pred_keep(p, j, p->visit[layer]);
    if (p->cur_layer >= 0)
        p->layer_major = layer == p->cur_layer;
    p->cur_layer = layer;
}

/* predict: mean over the experts a of `from` of P(expert at the next visit | a) */
static double pred_trans(const struct moe_policy *p, int layer, int expert, const uint64_t *from)
{
    const float *tc = p->tc + (size_t)layer * p->n_expert * p->n_expert;
    const float *tn = p->tn + (size_t)layer * p->n_expert;
    double c = 0.0, n = 0.0;
    for (int w = 0; w < p->words; w++) {
        for (uint64_t m = from[w]; m; m &= m - 1) {
            const int a = w * 64 + __builtin_ctzll(m);
            c += tc[(size_t)a * p->n_expert + expert];
            n += tn[a];
        }
    }
    return n > 0.0 ? c / (n + PRED_TRANS_PRIOR) : 0.0;
}

/* predict: expected wait (in layer visits) until the key's next use */
static double pred_wait(const struct moe_policy *p, int32_t key, int cur_layer)
{
    const int layer = key / p->n_expert, expert = key % p->n_expert, nl = p->n_layer;
    /* the layer being computed: its latest visit is the current one */
    const int cur = layer == cur_layer;
    const int32_t last = p->seen[key];
    /* the current layer's experts not used yet in this visit may be needed
     * now: predicted from the previous visit; the others from the latest */
    const int pending = cur && last < p->visit[layer];
    /* the visit that may use it next, and its recency then */
    const int32_t next = pending ? p->visit[layer] : p->visit[layer] + 1;
    const int b = last < 0 ? PRED_SINCE_BUCKETS - 1 : since_bucket(next - last);
    const int j = pred_scale(p);
    double pr = p->visit[layer] > 0 ? p->prm.pred_freq * pred_freq(p, p->fc + (size_t)key * p->n_alpha, p->stamp[key],
                                                                  j, p->visit[layer],
                                                                  p->gathered[layer * p->n_alpha + j])
                                    : 0.0;
    if (p->used_d > 0.0) {
        /* how much more often than the average expert one of this recency
         * was used, estimated with the average as a prior */
        const double g = p->used_n / p->used_d;
        const double r = (p->reuse_n[b] + PRED_REUSE_PRIOR * g) / (p->reuse_d[b] + PRED_REUSE_PRIOR) - g;
        if (r > 0.0)
            pr += r;
    }
    const uint64_t *from = (pending ? p->pset : p->set) + (size_t)layer * p->words;
    pr += p->prm.pred_trans * pred_trans(p, layer, expert, from);
    if (pr > 1.0)
        pr = 1.0;
    if (pr < 1e-6)
        pr = 1e-6;
    const double cycles = (1.0 - pr) / pr;
    if (p->layer_major) /* prefill: the current layer is the one visited next */
        return cur ? cycles : nl * (PRED_OTHER_LAYERS + cycles);
    int dist = (layer - cur_layer + nl) % nl;
    if (dist == 0)
        dist = pending ? 1 : nl;
    return p->prm.pred_dist * dist + nl * cycles;
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
    case MOE_POLICY_PREDICT:
        pred_visit(p, layer, step);
        if (p->seen[key] != p->visit[layer]) { /* first use in this visit */
            uint64_t *set = p->set + (size_t)layer * p->words;
            const uint64_t *pset = p->pset + (size_t)layer * p->words;
            float *tc = p->tc + (size_t)layer * p->n_expert * p->n_expert;
            for (int w = 0; w < p->words; w++)
                for (uint64_t m = pset[w]; m; m &= m - 1)
                    tc[(size_t)(w * 64 + __builtin_ctzll(m)) * p->n_expert + expert] += 1.0f;
            set[expert / 64] |= 1ull << (expert % 64);
            double *c = p->fc + (size_t)key * p->n_alpha, *cp = p->fc_prev + (size_t)key * p->n_alpha;
            for (int j = 0; j < p->n_alpha; j++) {
                cp[j] = c[j];
                c[j] = c[j] * pred_keep(p, j, p->visit[layer] - p->stamp[key]) + p->alpha[j];
            }
            p->stamp[key] = p->visit[layer];
            p->pseen[key] = p->seen[key];
            p->seen[key] = p->visit[layer];
        }
        break;
    default:
        break;
    }
}

/* predict's scalars in a warm file: reuse by recency, overall reuse, the
 * number of time scales, each one's log loss */
_Static_assert(2 * PRED_SINCE_BUCKETS + 2 + PRED_ALPHAS + 1 <= MOE_POLICY_STATS, "policy stats");

int moe_policy_export(const struct moe_policy *p, uint32_t *trans, uint32_t *follows, double *stats)
{
    if (p->kind != MOE_POLICY_PREDICT)
        return -1;
    if (stats != NULL) {
        memset(stats, 0, MOE_POLICY_STATS * sizeof(double));
        int i = 0;
        for (int b = 0; b < PRED_SINCE_BUCKETS; b++) {
            stats[i++] = p->reuse_n[b];
            stats[i++] = p->reuse_d[b];
        }
        stats[i++] = p->used_n;
        stats[i++] = p->used_d;
        stats[i++] = p->n_alpha;
        for (int j = 0; j < p->n_alpha; j++)
            stats[i++] = p->loss[j];
    }
    const size_t nk = (size_t)p->n_layer * (size_t)p->n_expert;
    for (size_t i = 0; i < nk * (size_t)p->n_expert; i++)
        trans[i] = (uint32_t)lrintf(p->tc[i]);
    for (size_t i = 0; i < nk; i++)
        follows[i] = (uint32_t)lrintf(p->tn[i]);
    return 0;
}

void moe_policy_seed(struct moe_policy *p, const uint32_t *uses, int k, const uint32_t *trans,
                     const uint32_t *follows, const double *stats)
{
    if (p->kind != MOE_POLICY_LAYER && p->kind != MOE_POLICY_PREDICT)
        return;
    if (p->kind == MOE_POLICY_PREDICT && stats != NULL) {
        bool ok = stats[2 * PRED_SINCE_BUCKETS + 2] == (double)p->n_alpha;
        for (int i = 0; ok && i < MOE_POLICY_STATS; i++)
            ok = isfinite(stats[i]) && stats[i] >= 0.0;
        int i = 0;
        for (int b = 0; ok && b < PRED_SINCE_BUCKETS; b++) {
            p->reuse_n[b] = stats[i++];
            p->reuse_d[b] = stats[i++];
        }
        if (ok) {
            p->used_n = stats[i++];
            p->used_d = stats[i++];
            i++;
            for (int j = 0; j < p->n_alpha; j++)
                p->loss[j] = stats[i++];
        }
    }
    const int ne = p->n_expert;
    for (int l = 0; uses != NULL && k > 0 && l < p->n_layer; l++) {
        const uint32_t *u = uses + (size_t)l * (size_t)ne;
        uint64_t sum = 0;
        for (int e = 0; e < ne; e++)
            sum += u[e];
        const uint64_t tokens = sum / (uint64_t)k;
        if (tokens == 0)
            continue;
        const int32_t v0 = tokens < SEED_VISITS_MAX ? (int32_t)tokens : SEED_VISITS_MAX;
        p->visit[l] = v0;
        p->visit_step[l] = SEEDED_STEP;
        for (int e = 0; e < ne; e++) {
            const size_t key = (size_t)l * (size_t)ne + (size_t)e;
            double f = (double)u[e] / (double)tokens;
            f = f > 1.0 ? 1.0 : f;
            p->stamp[key] = v0;
            if (p->kind == MOE_POLICY_LAYER) {
                p->count[key] = f;
                continue;
            }
            /* an average that has gathered v0 visits at rate f */
            for (int j = 0; j < p->n_alpha; j++)
                p->fc[key * (size_t)p->n_alpha + (size_t)j] = f * (1.0 - pred_keep(p, j, v0));
        }
        for (int j = 0; p->kind == MOE_POLICY_PREDICT && j < p->n_alpha; j++)
            p->gathered[l * p->n_alpha + j] = 1.0 - pred_keep(p, j, v0);
    }
    if (p->kind != MOE_POLICY_PREDICT || trans == NULL || follows == NULL)
        return;
    const size_t nk = (size_t)p->n_layer * (size_t)ne;
    for (size_t i = 0; i < nk * (size_t)ne; i++)
        p->tc[i] = (float)trans[i];
    for (size_t i = 0; i < nk; i++)
        p->tn[i] = (float)follows[i];
}

void moe_policy_touch(struct moe_policy *p, int layer, int expert, int64_t now)
{
    p->last[layer * p->n_expert + expert] = now;
}

int moe_policy_victim(struct moe_policy *p, const int32_t *keys, int n, int cur_layer, int32_t step)
{
    if (p->kind == MOE_POLICY_PREDICT && cur_layer >= 0 && cur_layer < p->n_layer)
        pred_visit(p, cur_layer, step);
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
        case MOE_POLICY_PREDICT:
            score = -pred_wait(p, key, cur_layer);
            break;
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

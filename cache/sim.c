#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cache/history.h"
#include "cache/sim.h"
#include "common/alloc.h"

int moe_sim_prefetch_from_name(const char *name)
{
    static const char *const names[] = { "none", "history", "oracle" };
    for (int i = 0; i < 3; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

const char *moe_sim_prefetch_name(enum moe_sim_prefetch_kind k)
{
    static const char *const names[] = { "none", "history", "oracle" };
    return (unsigned)k < 3 ? names[k] : "?";
}

/* per-layer figures: the experts of each layer cached now */
struct layer_acc {
    struct moe_sim_layer *out;  /* NULL: not asked for */
    int *occ;
    int n_layer;
};

static int layer_acc_init(struct layer_acc *la, const struct moe_trace *t, struct moe_sim_layer *out)
{
    la->out = out;
    la->n_layer = t->n_layer;
    la->occ = NULL;
    if (out == NULL)
        return 0;
    memset(out, 0, (size_t)t->n_layer * sizeof(*out));
    la->occ = moe_calloc((size_t)t->n_layer, sizeof(int));
    return la->occ ? 0 : -ENOMEM;
}

static void layer_acc_move(struct layer_acc *la, int layer, int delta)
{
    if (la->out)
        la->occ[layer] += delta;
}

/* after access number i (hit or not) at `layer` */
static void layer_acc_access(struct layer_acc *la, int layer, int hit)
{
    if (la->out == NULL)
        return;
    la->out[layer].accesses++;
    la->out[layer].hits += hit;
    for (int l = 0; l < la->n_layer; l++)
        la->out[l].slots += la->occ[l];
}

static void layer_acc_done(struct layer_acc *la, int64_t n)
{
    if (la->out && n > 0)
        for (int l = 0; l < la->n_layer; l++)
            la->out[l].slots /= (double)n;
    moe_free(la->occ);
    la->occ = NULL;
}

struct sim {
    const struct moe_trace *t;
    struct moe_policy *p;
    int capacity, n_cached;
    int32_t *slot_of;       /* [key] slot, -1 = absent */
    int32_t *keys;          /* [slot] key */
    uint8_t *prefetched;    /* [slot] loaded by a prefetch and not used yet */
    int32_t *predicted;     /* [key] step of the latest prediction, -1 = none */
    int32_t *cand, *cand_slot;
    int held;               /* slots with prefetched set */
    struct moe_sim_result *r;
    struct layer_acc la;
    /* lookahead oracle: visit numbers count each layer's visits from 0 */
    int lookahead;
    int64_t *next_visit;    /* [key] visit of its layer with its next use, INT64_MAX: none */
    int64_t *started;       /* [layer] visits begun so far */
};

/* lookahead: the rest of the key's layer's current visit or one of the next
 * `lookahead` visits uses it */
static int sim_protected(const struct sim *s, int32_t key)
{
    return s->next_visit[key] < s->started[key / s->t->n_expert] + s->lookahead;
}

/* Empties a slot for `key` at `layer`, step `step` (the policy's victim when
 * full) and fills it; -1 when a prefetch finds no candidate. */
static int sim_insert(struct sim *s, int32_t key, int layer, int32_t step, int for_prefetch)
{
    int slot;
    if (s->n_cached < s->capacity) {
        slot = s->n_cached++;
    } else {
        int n = 0;
        for (int pass = s->lookahead > 0 ? 0 : 1; pass < 2 && n == 0; pass++)
            for (int i = 0; i < s->capacity; i++)
                if ((!for_prefetch || s->predicted[s->keys[i]] != step) &&
                    (pass == 1 || !sim_protected(s, s->keys[i]))) {
                    s->cand[n] = s->keys[i];
                    s->cand_slot[n++] = i;
                }
        if (n == 0)
            return -1;
        slot = s->cand_slot[moe_policy_victim(s->p, s->cand, n, layer, step)];
        if (s->prefetched[slot]) {
            s->prefetched[slot] = 0;
            s->held--;
            s->r->pf_wasted++;
        }
        s->slot_of[s->keys[slot]] = -1;
        layer_acc_move(&s->la, s->keys[slot] / s->t->n_expert, -1);
    }
    layer_acc_move(&s->la, key / s->t->n_expert, +1);
    s->keys[slot] = key;
    s->slot_of[key] = slot;
    return slot;
}

static void sim_prefetch(struct sim *s, int layer, int expert, int32_t step, int64_t now)
{
    const int32_t key = layer * s->t->n_expert + expert;
    s->predicted[key] = step;
    if (s->slot_of[key] >= 0)
        return;
    const int share = s->capacity / 4 > 0 ? s->capacity / 4 : 1;
    const int slot = s->held < share ? sim_insert(s, key, layer, step, 1) : -1;
    if (slot < 0) {
        s->r->pf_dropped++;
        return;
    }
    s->prefetched[slot] = 1;
    s->held++;
    moe_policy_touch(s->p, layer, expert, now);
    s->r->pf_issued++;
}

/* Belady: the victim is the cached key whose next use is furthest. */
static int belady_run(const struct moe_trace *t, int capacity, struct moe_sim_result *r,
                      struct moe_sim_layer *per_layer)
{
    struct layer_acc la;
    const int64_t nk = (int64_t)t->n_layer * t->n_expert;
    int32_t *slot_of = moe_malloc((size_t)nk * sizeof(int32_t));
    int32_t *keys = moe_malloc((size_t)capacity * sizeof(int32_t));
    int64_t *next_use = moe_malloc((size_t)t->n * sizeof(int64_t));
    int64_t *next_of_key = moe_malloc((size_t)nk * sizeof(int64_t));
    int64_t *last_pos = moe_malloc((size_t)nk * sizeof(int64_t));
    int rc = layer_acc_init(&la, t, per_layer);
    if (rc || !slot_of || !keys || (t->n && !next_use) || !next_of_key || !last_pos) {
        rc = -ENOMEM;
        goto out;
    }
    for (int64_t k = 0; k < nk; k++) {
        slot_of[k] = -1;
        last_pos[k] = t->n;
    }
    /* next_use[i]: position of the next access to the same key, or n */
    for (int64_t i = t->n - 1; i >= 0; i--) {
        const int64_t k = (int64_t)t->a[i].layer * t->n_expert + t->a[i].expert;
        next_use[i] = last_pos[k];
        last_pos[k] = i;
    }
    int n_cached = 0;
    for (int64_t i = 0; i < t->n; i++) {
        const int32_t key = t->a[i].layer * t->n_expert + t->a[i].expert;
        const int hit = slot_of[key] >= 0;
        if (hit) {
            r->hits++;
        } else {
            int slot;
            if (n_cached < capacity) {
                slot = n_cached++;
            } else {
                slot = 0;
                for (int s = 1; s < capacity; s++)
                    if (next_of_key[keys[s]] > next_of_key[keys[slot]])
                        slot = s;
                slot_of[keys[slot]] = -1;
                layer_acc_move(&la, keys[slot] / t->n_expert, -1);
            }
            layer_acc_move(&la, t->a[i].layer, +1);
            keys[slot] = key;
            slot_of[key] = slot;
            r->loads++;
        }
        next_of_key[key] = next_use[i];
        layer_acc_access(&la, t->a[i].layer, hit);
    }
    rc = 0;
out:
    layer_acc_done(&la, t->n);
    moe_free(slot_of);
    moe_free(keys);
    moe_free(next_use);
    moe_free(next_of_key);
    moe_free(last_pos);
    return rc;
}

/* Keys by warm uses, the most used first (ties: the lower key). */
static int cmp_warm(const void *a, const void *b, void *ctx)
{
    const uint32_t *u = ctx;
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return u[x] != u[y] ? (u[x] < u[y] ? 1 : -1) : (x > y) - (x < y);
}

/* A warm start: the policy seeded (warm_seed), then the most used experts
 * loaded into the empty slots, touched in that order at times before the
 * trace's first access (as model/warm.c does before serving). */
static int sim_warm(struct sim *s, const struct moe_sim_opts *o)
{
    const struct moe_trace *t = s->t;
    const int64_t nk = (int64_t)t->n_layer * t->n_expert;
    if (o->warm_seed)
        moe_policy_seed(s->p, o->warm_uses, t->n_expert_used > 0 ? t->n_expert_used : 1, o->warm_trans,
                        o->warm_follows, o->warm_stats);
    int32_t *order = moe_malloc((size_t)nk * sizeof(int32_t));
    if (order == NULL)
        return -ENOMEM;
    for (int64_t k = 0; k < nk; k++)
        order[k] = (int32_t)k;
    qsort_r(order, (size_t)nk, sizeof(int32_t), cmp_warm, (void *)o->warm_uses);
    for (int64_t i = 0; i < nk && s->n_cached < s->capacity && o->warm_uses[order[i]] > 0; i++) {
        const int32_t key = order[i];
        sim_insert(s, key, key / t->n_expert, -1, 0);
        moe_policy_touch(s->p, key / t->n_expert, key % t->n_expert, i - nk);
    }
    moe_free(order);
    return 0;
}

/* index of the first access of the visit after the one holding access i
 * (the same layer and step), or t->n */
static int64_t visit_end(const struct moe_trace *t, int64_t i)
{
    int64_t j = i + 1;
    while (j < t->n && t->a[j].layer == t->a[i].layer && t->a[j].step == t->a[i].step)
        j++;
    return j;
}

int moe_cache_sim(const struct moe_trace *t, const struct moe_sim_opts *o, struct moe_sim_result *r)
{
    memset(r, 0, sizeof(*r));
    const enum moe_policy_kind kind = o->policy;
    const int capacity = o->capacity;
    const struct moe_sim_prefetch *pf = &o->prefetch;
    const enum moe_sim_prefetch_kind pk = pf->kind;
    if (capacity < 1 || (unsigned)pk > MOE_SIM_PREFETCH_ORACLE ||
        (pk != MOE_SIM_PREFETCH_NONE && (pf->depth < 1 || kind == MOE_POLICY_BELADY)) ||
        o->lookahead < 0 || (o->lookahead > 0 && kind == MOE_POLICY_BELADY) ||
        (o->warm_uses != NULL && kind == MOE_POLICY_BELADY))
        return -EINVAL;
    r->accesses = t->n;
    if (kind == MOE_POLICY_BELADY) {
        int rc = belady_run(t, capacity, r, o->per_layer);
        r->hit_rate = rc == 0 && t->n ? (double)r->hits / (double)t->n : 0.0;
        return rc;
    }
    const int64_t nk = (int64_t)t->n_layer * t->n_expert;
    const int K = t->n_expert_used > 0 ? t->n_expert_used : 1;
    struct sim s = { .t = t, .capacity = capacity, .r = r, .lookahead = o->lookahead };
    int64_t *vis_idx = NULL, *next_acc = NULL; /* lookahead: per access */
    struct moe_history hist = { 0 };
    int32_t *ids = NULL;
    int64_t *vis = NULL, *vis_first = NULL, *cursor = NULL; /* oracle: visits per layer */
    int rc = -ENOMEM;
    s.slot_of = moe_malloc((size_t)nk * sizeof(int32_t));
    s.keys = moe_malloc((size_t)capacity * sizeof(int32_t));
    s.prefetched = moe_calloc((size_t)capacity, 1);
    s.predicted = moe_malloc((size_t)nk * sizeof(int32_t));
    s.cand = moe_malloc((size_t)capacity * sizeof(int32_t));
    s.cand_slot = moe_malloc((size_t)capacity * sizeof(int32_t));
    ids = moe_malloc((size_t)K * sizeof(int32_t));
    if (!s.slot_of || !s.keys || !s.prefetched || !s.predicted || !s.cand || !s.cand_slot || !ids ||
        layer_acc_init(&s.la, t, o->per_layer))
        goto out;
    if ((s.p = moe_policy_create(kind, t->n_layer, t->n_expert, o->params)) == NULL)
        goto out;
    if (s.lookahead > 0) {
        vis_idx = moe_malloc((size_t)(t->n ? t->n : 1) * sizeof(int64_t));
        next_acc = moe_malloc((size_t)(t->n ? t->n : 1) * sizeof(int64_t));
        s.next_visit = moe_malloc((size_t)nk * sizeof(int64_t));
        s.started = moe_calloc((size_t)t->n_layer, sizeof(int64_t));
        if (!vis_idx || !next_acc || !s.next_visit || !s.started)
            goto out;
        for (int64_t i = 0; i < t->n; i++) {
            const int first = i == 0 || t->a[i].layer != t->a[i - 1].layer || t->a[i].step != t->a[i - 1].step;
            vis_idx[i] = s.started[t->a[i].layer] += first;
            vis_idx[i]--;
        }
        for (int64_t k = 0; k < nk; k++)
            s.next_visit[k] = INT64_MAX;
        for (int64_t i = t->n - 1; i >= 0; i--) {
            const int64_t k = (int64_t)t->a[i].layer * t->n_expert + t->a[i].expert;
            next_acc[i] = s.next_visit[k] == INT64_MAX ? t->n : s.next_visit[k];
            s.next_visit[k] = i; /* for now the access index */
        }
        for (int64_t k = 0; k < nk; k++)
            if (s.next_visit[k] != INT64_MAX)
                s.next_visit[k] = vis_idx[s.next_visit[k]];
        for (int l = 0; l < t->n_layer; l++)
            s.started[l] = 0;
    }
    for (int64_t k = 0; k < nk; k++) {
        s.slot_of[k] = -1;
        s.predicted[k] = -1;
    }
    if (o->warm_uses != NULL && (rc = sim_warm(&s, o)) != 0)
        goto out;
    rc = -ENOMEM;
    if (pk == MOE_SIM_PREFETCH_HISTORY) {
        if ((rc = moe_history_init(&hist, t->n_layer, t->n_expert, K)) != 0)
            goto out;
        rc = -ENOMEM;
    }
    if (pk == MOE_SIM_PREFETCH_ORACLE) {
        /* vis[vis_first[l] ..]: the start of every visit to layer l, in order */
        vis = moe_malloc((size_t)(t->n ? t->n : 1) * sizeof(int64_t));
        vis_first = moe_calloc((size_t)t->n_layer + 1, sizeof(int64_t));
        cursor = moe_calloc((size_t)t->n_layer, sizeof(int64_t));
        if (!vis || !vis_first || !cursor)
            goto out;
        for (int64_t i = 0; i < t->n; i = visit_end(t, i))
            vis_first[t->a[i].layer + 1]++;
        for (int l = 0; l < t->n_layer; l++) {
            vis_first[l + 1] += vis_first[l];
            cursor[l] = vis_first[l];
        }
        for (int64_t i = 0; i < t->n; i = visit_end(t, i))
            vis[cursor[t->a[i].layer]++] = i;
        for (int l = 0; l < t->n_layer; l++)
            cursor[l] = vis_first[l];
    }
    int prev_run_layer = -1;  /* layer of the run before the current one */
    for (int64_t i = 0; i < t->n; i++) {
        const struct moe_access *a = &t->a[i];
        const int32_t key = a->layer * t->n_expert + a->expert;
        if (s.lookahead > 0) {
            s.started[a->layer] = vis_idx[i] + 1;
            s.next_visit[key] = next_acc[i] < t->n ? vis_idx[next_acc[i]] : INT64_MAX;
        }
        const int slot = s.slot_of[key];
        const int hit = slot >= 0;
        if (hit) {
            r->hits++;
            if (s.prefetched[slot]) {
                s.prefetched[slot] = 0;
                s.held--;
                r->pf_used++;
            }
        } else {
            sim_insert(&s, key, a->layer, a->step, 0);
            r->loads++;
        }
        moe_policy_access(s.p, a->layer, a->expert, i, a->step);
        layer_acc_access(&s.la, a->layer, hit);
        const int last_of_visit = i + 1 == t->n || t->a[i + 1].layer != a->layer ||
                                  t->a[i + 1].step != a->step;
        if (!last_of_visit || pk == MOE_SIM_PREFETCH_NONE)
            continue;
        const int run_end = i + 1 == t->n || t->a[i + 1].layer != a->layer;
        if (pk == MOE_SIM_PREFETCH_HISTORY) {
            /* this visit's choice, in trace order */
            int n = 0;
            for (int64_t j = i; j >= 0 && t->a[j].layer == a->layer && t->a[j].step == a->step; j--)
                n++;
            for (int k = 0; k < K; k++)
                ids[k] = k < n ? t->a[i - n + 1 + k].expert : -1;
            /* the last visit of a run follows the previous layer's run: in
             * decode the same token, in layer-major prefill the last token
             * (as the engine learns from the batch's last token) */
            const int link = run_end && prev_run_layer == a->layer - 1 ? a->layer - 1 : -1;
            moe_history_learn(&hist, a->layer, ids, link);
        }
        if (pk == MOE_SIM_PREFETCH_ORACLE) {
            /* every visit to this layer up to here is in the past */
            const int64_t end = vis_first[a->layer + 1];
            while (cursor[a->layer] < end && vis[cursor[a->layer]] <= i)
                cursor[a->layer]++;
        }
        if (!run_end)
            continue;
        prev_run_layer = a->layer;
        for (int d = 1; d <= pf->depth && a->layer + d < t->n_layer; d++) {
            const int l = a->layer + d;
            if (pk == MOE_SIM_PREFETCH_HISTORY) {
                const int n = moe_history_predict(&hist, l, d == 1 ? a->layer : -1, ids);
                for (int k = 0; k < n; k++)
                    sim_prefetch(&s, l, ids[k], a->step, i);
            } else {
                while (cursor[l] < vis_first[l + 1] && vis[cursor[l]] <= i)
                    cursor[l]++;
                if (cursor[l] == vis_first[l + 1])
                    continue;
                const int64_t v = vis[cursor[l]], e = visit_end(t, v);
                for (int64_t j = v; j < e; j++)
                    sim_prefetch(&s, l, t->a[j].expert, a->step, i);
            }
        }
    }
    if (o->out_uses != NULL) {
        memset(o->out_uses, 0, (size_t)nk * sizeof(uint32_t));
        for (int64_t i = 0; i < t->n; i++)
            o->out_uses[t->a[i].layer * t->n_expert + t->a[i].expert]++;
    }
    if (o->out_trans != NULL && o->out_follows != NULL &&
        moe_policy_export(s.p, o->out_trans, o->out_follows, o->out_stats) != 0) {
        memset(o->out_trans, 0, (size_t)nk * (size_t)t->n_expert * sizeof(uint32_t));
        memset(o->out_follows, 0, (size_t)nk * sizeof(uint32_t));
    }
    r->pf_wasted += s.held; /* never used before the end */
    r->loads += r->pf_issued;
    r->hit_rate = t->n ? (double)r->hits / (double)t->n : 0.0;
    rc = 0;
out:
    layer_acc_done(&s.la, t->n);
    moe_policy_free(s.p);
    moe_history_free(&hist);
    moe_free(s.slot_of);
    moe_free(s.keys);
    moe_free(s.prefetched);
    moe_free(s.predicted);
    moe_free(s.cand);
    moe_free(s.cand_slot);
    moe_free(ids);
    moe_free(vis_idx);
    moe_free(next_acc);
    moe_free(s.next_visit);
    moe_free(s.started);
    moe_free(vis);
    moe_free(vis_first);
    moe_free(cursor);
    return rc;
}

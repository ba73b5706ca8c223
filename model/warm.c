/* Warm restarts (cache/warm.h) for a loaded model: what the statistics
 * file identifies a model by, reading it at load (the hottest experts are
 * loaded into empty slots in the background; the eviction policy and the
 * history predictor get their counts back) and writing it at exit. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "cache/expert_cache.h"
#include "cache/policy.h"
#include "cache/warm.h"

_Static_assert(MOE_POLICY_STATS == MOE_WARM_POLICY_STATS, "warm policy stats");
#include "common/alloc.h"
#include "common/log.h"
#include "io/gguf.h"
#include "model/model-impl.h"

/* The model's identity: its shape and its size on disk, so a statistics
 * file from another model (or another quantization of it) is stale. */
static uint64_t model_id(const struct moe_model *m)
{
    const struct moe_model_cfg *c = &m->cfg;
    struct {
        char arch[32];
        int32_t n_layer, n_expert, k, n_embd, n_vocab, n_ff_exp;
        uint64_t slot_bytes, dense_bytes;
    } id;
    memset(&id, 0, sizeof(id));
    memcpy(id.arch, c->arch_name, sizeof(id.arch));
    id.n_layer = c->n_layer;
    id.n_expert = c->n_expert;
    id.k = c->n_expert_used;
    id.n_embd = c->n_embd;
    id.n_vocab = c->n_vocab;
    id.n_ff_exp = c->n_ff_exp;
    id.slot_bytes = m->plan.slot_bytes;
    id.dense_bytes = m->plan.dense_bytes;
    return XXH3_64bits(&id, sizeof(id));
}

static void warm_view(const struct moe_model *m, struct moe_warm *w)
{
    *w = (struct moe_warm){ .n_layer = (uint32_t)m->cfg.n_layer, .n_expert = (uint32_t)m->cfg.n_expert,
                            .k = (uint32_t)m->cfg.n_expert_used, .model_id = model_id(m) };
}

/* Experts by their recorded uses, the most used first (ties: lower key). */
static int cmp_uses_desc(const void *a, const void *b, void *ctx)
{
    const uint32_t *u = ctx;
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return u[x] != u[y] ? (u[x] < u[y] ? 1 : -1) : (x > y) - (x < y);
}

static void start_warm_loads(struct moe_model *m)
{
    const size_t n = (size_t)m->cfg.n_layer * (size_t)m->cfg.n_expert;
    int32_t *order = moe_malloc(n * sizeof(int32_t));
    if (order == NULL)
        return;
    for (size_t i = 0; i < n; i++)
        order[i] = (int32_t)i;
    qsort_r(order, n, sizeof(int32_t), cmp_uses_desc, m->ex.uses);
    for (size_t i = 0; i < n && m->ex.uses[order[i]] > 0; i++) {
        const int r = moe_expert_cache_warm(m->ex.cache, order[i] / m->cfg.n_expert,
                                            order[i] % m->cfg.n_expert);
        if (r < 0)
            break;   /* every slot taken (or the source failed): the rest stays cold */
        m->ex.warm_loads += r;
    }
    moe_free(order);
}

void moe_model_warm_load(struct moe_model *m, const char *path)
{
    const size_t n = (size_t)m->cfg.n_layer * (size_t)m->cfg.n_expert;
    const size_t len = strlen(path);
    m->ex.uses = moe_calloc(n, sizeof(uint32_t));
    m->ex.warm_path = moe_malloc(len + 6);
    if (m->ex.uses == NULL || m->ex.warm_path == NULL) {
        moe_log(MOE_LOG_WARN, "warm start: out of memory; starting cold");
        return;
    }
    memcpy(m->ex.warm_path, path, len);
    memcpy(m->ex.warm_path + len, ".warm", 6);
    struct moe_warm w;
    warm_view(m, &w);
    struct moe_diag d = { 0 };
    int rc = moe_warm_read(m->ex.warm_path, &w, &d);
    if (rc == -ENOENT)
        return;
    if (rc != 0) {
        moe_log(MOE_LOG_WARN, "warm start ignored, starting cold: %s", d.msg);
        return;
    }
    memcpy(m->ex.uses, w.uses, n * sizeof(uint32_t));
    /* the eviction policy starts from what it learned (frequencies, and
     * predict's transitions when the file has them): a warm start that only
     * pre-loads leaves it deciding from nothing for the first tokens */
    moe_expert_cache_policy_seed(m->ex.cache, w.uses, m->cfg.n_expert_used, w.pol_trans, w.pol_follows,
                                 w.pol_stats);
    if (m->ex.prefetch_history && w.tr_tok != NULL) {
        const size_t nn = n * (size_t)m->cfg.n_expert * sizeof(uint32_t);
        memcpy(m->ex.hist.tr_tok, w.tr_tok, nn);
        memcpy(m->ex.hist.tr_layer, w.tr_layer, nn);
    }
    moe_warm_free(&w);
    start_warm_loads(m);
    moe_log(MOE_LOG_INFO, "warm start: loading the %d experts hottest in the last run (%s)",
            m->ex.warm_loads, m->ex.warm_path);
}

int moe_model_warm_save(struct moe_model *m, struct moe_diag *diag)
{
    if (m->ex.warm_path == NULL || m->ex.uses == NULL)
        return 0;
    struct moe_warm w;
    warm_view(m, &w);
    w.uses = m->ex.uses;
    if (m->ex.prefetch_history) {
        w.tr_tok = m->ex.hist.tr_tok;
        w.tr_layer = m->ex.hist.tr_layer;
    }
    const size_t n = (size_t)m->cfg.n_layer * (size_t)m->cfg.n_expert;
    uint32_t *trans = moe_malloc(n * (size_t)m->cfg.n_expert * sizeof(uint32_t));
    uint32_t *follows = moe_malloc(n * sizeof(uint32_t));
    double stats[MOE_POLICY_STATS];
    if (trans != NULL && follows != NULL &&
        moe_expert_cache_policy_export(m->ex.cache, trans, follows, stats) == 0) {
        w.pol_trans = trans;
        w.pol_follows = follows;
        w.pol_stats = stats;
    }
    const int rc = moe_warm_write(m->ex.warm_path, &w, diag);
    moe_free(trans);
    moe_free(follows);
    return rc;
}

int moe_model_warm_loads(const struct moe_model *m)
{
    return m->ex.warm_loads;
}

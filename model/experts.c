/* The experts of a MoE layer: resident in the mapped file, or through the
 * expert cache (pinned while computed, loaded on a miss), and the
 * predictors that prefetch the next layers' experts.
 *
 * The MoE block groups the batch by expert, like ggml's mul_mat_id: each
 * expert's matrices are read once per batch for all the tokens routed to
 * it, and each output lands in its (token, slot) row, so the order in which
 * experts are computed never changes the result. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cache/expert_cache.h"
#include "cache/host_tier.h"
#include "common/alloc.h"
#include "common/log.h"
#include "io/expert_src.h"
#include "io/gguf.h"
#include "kernels/backend.h"
#include "kernels/cpu/threadpool.h"
#include "model/model-impl.h"

/* The CPU lane of a device backend (doc/cache.md "Hybrid lanes"): its own
 * CPU backend (the kernels of kernels/cpu, on their own thread pool) and
 * host buffers for one batch. miss_lane = copy needs neither, but the
 * lanes are still counted. */
static int lane_create(struct moe_model *m, const struct moe_model_opts *o, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    m->ex.lanes = true;
    m->ex.miss_lane = o->miss_lane;
    moe_lane_init(&m->ex.lane, (enum moe_miss_lane)o->miss_lane, NULL);
    m->be->ops->copy_stats(m->be, &m->ex.link0);
    if (o->miss_lane == MOE_MISS_LANE_COPY)
        return 0;
    int rc = moe_lane_reuse_init(&m->ex.reuse, c->n_layer, c->n_expert, c->n_expert_used, m->plan.n_slots);
    if (rc)
        return moe_diag_set(diag, rc, "CPU lane: out of memory for the reuse estimate");
    m->ex.lane_miss = moe_calloc((size_t)c->n_expert, sizeof(*m->ex.lane_miss));
    m->ex.lane_choice = moe_calloc((size_t)c->n_expert, 1);
    m->ex.lane_j = moe_calloc((size_t)c->n_expert, sizeof(int32_t));
    if (!m->ex.lane_miss || !m->ex.lane_choice || !m->ex.lane_j)
        return moe_diag_set(diag, -ENOMEM, "CPU lane: out of memory");
    rc = moe_backend_cpu_create(&m->ex.lane_be, o->n_threads > 0 ? o->n_threads
                                : moe_threadpool_default_threads(), diag);
    if (rc)
        return rc;
    struct model_acts tmp;
    struct model_act_item items[MODEL_ACT_ITEMS];
    size_t shared, per_worker;
    moe_model_acts_layout(c, m->n_batch, m->n_ctx, &tmp, items, &shared, &per_worker);
    if ((rc = m->ex.lane_be->ops->reserve(m->ex.lane_be, shared, 0)))
        return moe_diag_set(diag, rc, "CPU lane: cannot reserve %zu bytes of scratch", shared);
    const size_t B = (size_t)m->n_batch, E = (size_t)c->n_embd, F = (size_t)c->n_ff_exp;
    /* the two buffers that cross the link: page-locked where the backend
     * gives it (CUDA: DMA, no staging by the driver), else ordinary */
    m->ex.lane_x = m->be->ops->host_alloc(m->be, B * E * sizeof(float));
    m->ex.lane_de = m->be->ops->host_alloc(m->be, B * E * sizeof(float));
    m->ex.lane_pinned = m->ex.lane_x != NULL && m->ex.lane_de != NULL;
    if (!m->ex.lane_pinned) {
        if (m->ex.lane_x)
            m->be->ops->host_free(m->be, m->ex.lane_x);
        if (m->ex.lane_de)
            m->be->ops->host_free(m->be, m->ex.lane_de);
        m->ex.lane_x = moe_malloc(B * E * sizeof(float));
        m->ex.lane_de = moe_malloc(B * E * sizeof(float));
    }
    m->ex.lane_xe = moe_malloc(B * E * sizeof(float));
    m->ex.lane_ge = moe_malloc(B * F * sizeof(float));
    m->ex.lane_ue = moe_malloc(B * F * sizeof(float));
    m->ex.lane_dst = moe_malloc(B * sizeof(int32_t));
    /* aligned like a slot: a raw pack blob is read straight into it */
    m->ex.lane_blob = moe_malloc_aligned(MOE_CACHE_SLOT_ALIGN, moe_expert_cache_slot_stride(m->plan.slot_bytes));
    if (!m->ex.lane_x || !m->ex.lane_xe || !m->ex.lane_de || !m->ex.lane_ge || !m->ex.lane_ue ||
        !m->ex.lane_dst || !m->ex.lane_blob)
        return moe_diag_set(diag, -ENOMEM, "CPU lane: out of memory for %zu tokens' buffers", B);
    return 0;
}

int moe_model_experts_create(struct moe_model *m, const struct moe_model_opts *o, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_model_plan *p = &m->plan;
    const long n_slots = p->n_slots, working_set = (long)p->n_moe_layers * c->n_expert_used;
    if (n_slots < working_set)
        moe_log(MOE_LOG_WARN, "the expert cache holds %ld experts, below one token's working"
                " set of %ld (%d MoE layers x top-%d): LRU will hit about 0%%", n_slots, working_set,
                p->n_moe_layers, c->n_expert_used);
    const int pol = o->cache_policy;
    if (o->prefetch != MOE_PREFETCH_NONE) {
        m->ex.prefetch_history = o->prefetch == MOE_PREFETCH_HISTORY;
        if (m->ex.prefetch_history) {
            if (moe_history_init(&m->ex.hist, c->n_layer, c->n_expert, c->n_expert_used) != 0)
                return moe_diag_set(diag, -ENOMEM, "history predictor: out of memory");
        }
        m->ex.prefetch_depth = o->prefetch_depth > 0 ? o->prefetch_depth : 1;
        if (m->ex.prefetch_depth > c->n_layer)
            m->ex.prefetch_depth = c->n_layer;
        moe_prefetch_gov_init(&m->ex.gov, o->prefetch_always);
        if (!m->ex.prefetch_history) {
            /* the gate predictor's scratch: one normed row and its router logits */
            m->ex.pf_logits = m->be->ops->alloc(m->be, (size_t)c->n_expert * sizeof(float));
            m->ex.pf_x = m->be->ops->alloc(m->be, (size_t)c->n_embd * sizeof(float));
            if (m->ex.pf_logits == NULL || m->ex.pf_x == NULL)
                return moe_diag_set(diag, -ENOMEM, "prefetch: out of %s memory", m->be->ops->name);
        }
    }
    m->ex.pend_l = moe_malloc((size_t)c->n_expert * sizeof(int32_t));
    m->ex.pend_e = moe_malloc((size_t)c->n_expert * sizeof(int32_t));
    m->ex.pend_state = moe_malloc((size_t)c->n_expert * sizeof(int32_t));
    if (!m->ex.pend_l || !m->ex.pend_e || !m->ex.pend_state)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    int rc = moe_expert_cache_create(&m->ex.cache, m->ex.src, m->be, p->slot_bytes, p->n_slots,
                                     (enum moe_policy_kind)pol, diag);
    if (rc == 0 && (!m->be->ops->host_memory || o->upload_weights))
        rc = moe_expert_cache_set_staging(m->ex.cache, diag);
    if (rc == 0 && o->host_bytes > 0) {
        if ((rc = moe_host_tier_create(&m->ex.host, o->host_bytes, diag)) == 0)
            moe_expert_cache_set_host_tier(m->ex.cache, m->ex.host);
    }
    if (rc == 0 && (!m->be->ops->host_memory || o->upload_weights))
        rc = lane_create(m, o, diag);
    return rc;
}

void moe_model_experts_free(struct moe_model *m)
{
    struct model_experts *ex = &m->ex;
    moe_free(ex->uses);
    moe_free(ex->warm_path);
    moe_history_free(&ex->hist);
    moe_free(ex->pend_l);
    moe_free(ex->pend_e);
    moe_free(ex->pend_state);
    moe_expert_cache_destroy(ex->cache);   /* waits for loads, which may fill the tier */
    moe_host_tier_destroy(ex->host);
    moe_backend_destroy(ex->lane_be);
    if (ex->lane_pinned) {
        m->be->ops->host_free(m->be, ex->lane_x);
        m->be->ops->host_free(m->be, ex->lane_de);
    } else {
        moe_free(ex->lane_x);
        moe_free(ex->lane_de);
    }
    moe_free(ex->lane_xe);
    moe_free(ex->lane_ge);
    moe_free(ex->lane_ue);
    moe_free(ex->lane_dst);
    moe_free(ex->lane_blob);
    moe_free(ex->lane_miss);
    moe_free(ex->lane_choice);
    moe_free(ex->lane_j);
    moe_lane_reuse_free(&ex->reuse);
    if (m->be) {
        if (ex->pf_logits)
            m->be->ops->free(m->be, ex->pf_logits);
        if (ex->pf_x)
            m->be->ops->free(m->be, ex->pf_x);
    }
}

bool moe_model_cache_stats(struct moe_model *m, struct moe_cache_stats *out)
{
    if (m->ex.cache == NULL)
        return false;
    moe_expert_cache_stats(m->ex.cache, out);
    const struct moe_cache_stats *l = &m->ex.lane_st;
    out->lane_cpu = l->lane_cpu;
    out->lane_copy = l->lane_copy;
    out->lane_both = l->lane_both;
    out->lane_cpu_bytes = l->lane_cpu_bytes;
    out->lane_copy_bytes = l->lane_copy_bytes;
    out->lane_both_bytes = l->lane_both_bytes;
    out->lane_cpu_s = l->lane_cpu_s;
    out->lane_copy_wait_s = l->lane_copy_wait_s;
    if (m->ex.lanes && m->ex.miss_lane == MOE_MISS_LANE_AUTO) {
        out->lane_steps_auto = m->ex.lane.gov.steps[MOE_MISS_LANE_AUTO];
        out->lane_steps_copy = m->ex.lane.gov.steps[MOE_MISS_LANE_COPY];
        out->lane_steps_cpu = m->ex.lane.gov.steps[MOE_MISS_LANE_CPU];
    }
    return true;
}

int moe_model_cache_layer_stats(struct moe_model *m, struct moe_cache_layer_stats *out, int max)
{
    return m->ex.cache ? moe_expert_cache_layer_stats(m->ex.cache, out, max) : -1;
}

int moe_model_cache_pinned(struct moe_model *m)
{
    return m->ex.cache ? moe_expert_cache_pinned(m->ex.cache) : -1;
}

/* ---- computing experts ------------------------------------------------ */

/* ---- forward --------------------------------------------------------- */

static struct moe_weight expert_weight(const struct expert_tensor *t, int e)
{
    struct moe_weight w = {
        .data = t->data + (size_t)e * t->expert_stride,
        .dtype = t->dtype,
        .n_in = t->n_in,
        .n_out = t->n_out,
        .row_bytes = t->row_bytes,
    };
    return w;
}

/* silu(gate) * up, gpt-oss's clamped variant, or gelu(gate) * up (gemma4) */
static int glu_on(struct moe_model *m, struct moe_backend *be, float *y, const float *g, const float *u,
                  int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    if (c->ad->gelu)
        return be->ops->geglu(be, y, g, u, n);
    if (!c->ad->swiglu_oai)
        return be->ops->swiglu(be, y, g, u, n);
    return be->ops->swiglu_oai(be, y, g, u, n, c->ad->swiglu_alpha, c->ad->swiglu_limit);
}

static int glu(struct moe_model *m, float *y, const float *g, const float *u, int64_t n)
{
    return glu_on(m, m->be, y, g, u, n);
}

/* One expert's FFN over the tokens routed to it (grouped by moe_block);
 * outputs land in slot_out per (token, slot), so the order in which
 * experts are computed never changes the result. */
static int expert_ffn(struct moe_model *m, int e, const struct moe_weight *wg, const struct moe_weight *wu,
                      const struct moe_weight *wd, const float *bg, const float *bu, const float *bd)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    const int K = c->n_expert_used, E = c->n_embd;
    const int cnt = m->a.expert_count[e];
    const int32_t *list = m->a.tok_by_expert + m->a.expert_start[e];
    for (int i = 0; i < cnt; i++)
        m->a.row_idx[i] = list[i] / K;   /* (token, slot) -> token row */
    TRY(ops->copy_rows(be, m->a.xe, E, NULL, m->a.xn, E, m->a.row_idx, cnt, E));
    TRY(ops->matmul(be, m->a.ge, wg, bg, m->a.xe, cnt));
    TRY(ops->matmul(be, m->a.ue, wu, bu, m->a.xe, cnt));
    TRY(glu(m, m->a.ge, m->a.ge, m->a.ue, (int64_t)cnt * c->n_ff_exp));
    TRY(ops->matmul(be, m->a.de, wd, bd, m->a.ge, cnt));
    TRY(ops->copy_rows(be, m->a.slot_out, E, list, m->a.de, E, NULL, cnt, E));
    return 0;
}

/* pairs per run of experts_together in a batch with more pairs than
 * n_batch: Qwen3-30B-A3B's shape at 512 tokens, 2 threads, 1400 -> 1500
 * tok/s against one run per expert, no better with 512 (doc/benchmarks.md) */
#define EXPERT_RUN_ROWS 128

/* The experts e0..e1-1 of a layer at once, when their (token, slot) pairs
 * fit the activation buffers (at most n_batch rows; every expert of the
 * layer for decode and short batches, runs of consecutive experts for a
 * prefill): the pairs are in expert order (group_by_expert), so expert e's
 * rows are rows expert_start[e] - expert_start[e0].. of xe, ge, ue and de;
 * then one matmul op for every expert's gate and up (each expert's input
 * converted once for both), one glu over all rows, one op for every down,
 * one scatter. Each expert's rows see the same operations as in
 * expert_ffn. At most 256 experts. */
static int experts_together(struct moe_model *m, const struct layer *L, int e0, int e1)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    const int K = c->n_expert_used;
    const int64_t E = c->n_embd, F = c->n_ff_exp, base = m->a.expert_start[e0];
    const int64_t rows = m->a.expert_start[e1 - 1] + m->a.expert_count[e1 - 1] - base;
    const int32_t *pairs = m->a.tok_by_expert + base;
    struct moe_matmul_job jobs[2 * 256];
    for (int64_t i = 0; i < rows; i++)
        m->a.row_idx[i] = pairs[i] / K;
    TRY(ops->copy_rows(be, m->a.xe, E, NULL, m->a.xn, E, m->a.row_idx, rows, E));
    int nj = 0;
    for (int e = e0; e < e1; e++) {
        const int cnt = m->a.expert_count[e];
        if (cnt == 0)
            continue;
        const int64_t r0 = m->a.expert_start[e] - base;
        const float *x = m->a.xe + r0 * E;
        jobs[nj++] = (struct moe_matmul_job){ .y = m->a.ge + r0 * F, .w = expert_weight(&L->gate, e),
                                              .bias = L->gate_b ? L->gate_b + e * F : NULL, .x = x,
                                              .n_tok = cnt };
        jobs[nj++] = (struct moe_matmul_job){ .y = m->a.ue + r0 * F, .w = expert_weight(&L->up, e),
                                              .bias = L->up_b ? L->up_b + e * F : NULL, .x = x, .n_tok = cnt };
    }
    TRY(moe_model_matmuls(m, jobs, nj));
    TRY(glu(m, m->a.ge, m->a.ge, m->a.ue, rows * F));
    nj = 0;
    for (int e = e0; e < e1; e++) {
        const int cnt = m->a.expert_count[e];
        if (cnt == 0)
            continue;
        const int64_t r0 = m->a.expert_start[e] - base;
        jobs[nj++] = (struct moe_matmul_job){ .y = m->a.de + r0 * E, .w = expert_weight(&L->down, e),
                                              .bias = L->down_b ? L->down_b + e * E : NULL,
                                              .x = m->a.ge + r0 * F, .n_tok = cnt };
    }
    TRY(moe_model_matmuls(m, jobs, nj));
    TRY(ops->copy_rows(be, m->a.slot_out, E, pairs, m->a.de, E, NULL, rows, E));
    return 0;
}

static struct moe_weight slot_weight(const struct expert_tensor *t, const uint8_t *blob)
{
    struct moe_weight w = {
        .data = blob + t->slot_offset, .dtype = t->dtype, .n_in = t->n_in, .n_out = t->n_out,
        .row_bytes = t->row_bytes,
    };
    return w;
}

static int expert_ffn_cached(struct moe_model *m, const struct layer *L, int e, const uint8_t *blob)
{
    struct moe_weight wg = slot_weight(&L->gate, blob), wu = slot_weight(&L->up, blob);
    struct moe_weight wd = slot_weight(&L->down, blob);
    const struct bias_slices *b = &L->bias_off;
    return expert_ffn(m, e, &wg, &wu, &wd, b->gate >= 0 ? (const float *)(blob + b->gate) : NULL,
                      b->up >= 0 ? (const float *)(blob + b->up) : NULL,
                      b->down >= 0 ? (const float *)(blob + b->down) : NULL);
}

/* Expert e of layer il could not be loaded (rc, message in d): every
 * sequence with a token routed to it fails alone (its status and message
 * set, the first error kept), its rows of the expert's output are zeroed
 * so that the batch's arithmetic stays finite, and the other sequences of
 * the batch go on. A sticky backend error fails the whole pass instead. */
static int expert_failed(struct moe_model *m, int il, int e, int rc, const struct moe_diag *d)
{
    if (rc == MOE_EGPU_FATAL)
        return rc;
    const int K = m->cfg.n_expert_used, E = m->cfg.n_embd;
    const int cnt = m->a.expert_count[e];
    const int32_t *list = m->a.tok_by_expert + m->a.expert_start[e];
    for (int i = 0; i < cnt; i++) {
        const int64_t t = list[i] / K;
        for (int j = 0; j < m->a.n_segs; j++) {
            struct seg *g = &m->a.segs[j];
            if (t < g->off || t >= g->off + g->n)
                continue;
            if (g->status == 0) {
                g->status = rc;
                if (d->msg[0]) {
                    const size_t l = strnlen(d->msg, sizeof(g->err) - 1);
                    memcpy(g->err, d->msg, l);   /* a long path is cut */
                    g->err[l] = '\0';
                } else
                    snprintf(g->err, sizeof(g->err), "layer %d, expert %d: %s", il, e, moe_strerror(rc));
            }
            break;
        }
        TRY(m->be->ops->fill(m->be, m->a.slot_out + (size_t)list[i] * E, 0.0f, E));
    }
    moe_log(MOE_LOG_WARN, "expert (layer %d, expert %d) failed to load; the sequences routed to it"
            " fail: %s", il, e, d->msg[0] ? d->msg : moe_strerror(rc));
    return 0;
}

/* ---- the CPU lane ----------------------------------------------------- */

static double lane_now(void);

/* A cached expert on the device lane. Where ops run synchronously (the CPU
 * backend acting as a device) its time is the device's expert rate for
 * the lane rule; a GPU's kernels are asynchronous, so there the rule keeps
 * its default. */
static int expert_ffn_timed(struct moe_model *m, const struct layer *L, int il, int e, const uint8_t *blob)
{
    if (m->ex.lane_j == NULL || !m->be->ops->host_memory || m->ex.miss_lane != MOE_MISS_LANE_AUTO)
        return expert_ffn_cached(m, L, e, blob);
    const struct moe_expert_layout *lay = moe_expert_src_layout(m->ex.src, (uint32_t)il);
    const uint64_t bytes = lay ? lay->raw_size : 0;
    const double t0 = lane_now();
    const int rc = expert_ffn_cached(m, L, e, blob);
    if (rc == 0)
        moe_lane_observe_dev(&m->ex.lane, bytes, bytes * (uint64_t)m->a.expert_count[e], lane_now() - t0);
    return rc;
}


static double lane_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Where the CPU lane found an expert's bytes, for lane_put. */
enum lane_from { LANE_TIER, LANE_MAPPED, LANE_RESERVED, LANE_BUF };

struct lane_w {
    struct moe_weight g, u, d;
    const float *bg, *bu, *bd;
    enum lane_from from;
    double disk_s;       /* the time a read from the source took (0: none) */
};

/* Host memory holding expert e of layer il: the host tier's copy (pinned
 * until lane_put), the mapped GGUF (GGUF direct), or else read from the
 * source now, into a reserved tier entry (kept for next time) or the
 * lane's own buffer. Expert biases (gpt-oss) come from a blob only. */
static int lane_get(struct moe_model *m, const struct layer *L, int il, int e, struct lane_w *w,
                    struct moe_diag *d)
{
    const struct moe_expert_layout *lay = moe_expert_src_layout(m->ex.src, (uint32_t)il);
    if (lay == NULL)
        return moe_diag_set(d, -ENOENT, "CPU lane: layer %d has no experts", il);
    const void *hd = NULL;
    size_t hs = 0;
    const uint8_t *blob = NULL;
    w->disk_s = 0;
    if (m->ex.host && moe_host_tier_acquire(m->ex.host, (uint32_t)il, (uint32_t)e, &hd, &hs)) {
        w->from = LANE_TIER;
        blob = hd;
    } else if (L->gate.host && L->up.host && L->down.host && L->bias_off.gate < 0 &&
               L->bias_off.up < 0 && L->bias_off.down < 0) {
        const struct expert_tensor *t[3] = { &L->gate, &L->up, &L->down };
        struct moe_weight *o[3] = { &w->g, &w->u, &w->d };
        for (int i = 0; i < 3; i++)
            *o[i] = (struct moe_weight){ .data = t[i]->host + (size_t)e * t[i]->expert_stride,
                                         .dtype = t[i]->dtype, .n_in = t[i]->n_in,
                                         .n_out = t[i]->n_out, .row_bytes = t[i]->row_bytes };
        w->bg = w->bu = w->bd = NULL;
        w->from = LANE_MAPPED;
        return 0;
    } else {
        void *buf = NULL;
        const size_t size = (size_t)lay->raw_size;
        if (m->ex.host && moe_host_tier_reserve(m->ex.host, (uint32_t)il, (uint32_t)e, size, &buf) == 0) {
            w->from = LANE_RESERVED;
        } else {
            buf = m->ex.lane_blob;
            w->from = LANE_BUF;
        }
        const double t0 = lane_now();
        const int rc = moe_expert_src_load_sync(m->ex.src, (uint32_t)il, (uint32_t)e, buf, size, d);
        w->disk_s = lane_now() - t0;
        if (rc != 0) {
            if (w->from == LANE_RESERVED)
                moe_host_tier_commit(m->ex.host, (uint32_t)il, (uint32_t)e, false);
            return rc;
        }
        blob = buf;
    }
    w->g = slot_weight(&L->gate, blob);
    w->u = slot_weight(&L->up, blob);
    w->d = slot_weight(&L->down, blob);
    const struct bias_slices *b = &L->bias_off;
    w->bg = b->gate >= 0 ? (const float *)(blob + b->gate) : NULL;
    w->bu = b->up >= 0 ? (const float *)(blob + b->up) : NULL;
    w->bd = b->down >= 0 ? (const float *)(blob + b->down) : NULL;
    return 0;
}

static void lane_put(struct moe_model *m, int il, int e, const struct lane_w *w, bool ok)
{
    if (w->from == LANE_TIER)
        moe_host_tier_release(m->ex.host, (uint32_t)il, (uint32_t)e);
    else if (w->from == LANE_RESERVED)
        moe_host_tier_commit(m->ex.host, (uint32_t)il, (uint32_t)e, ok);
}

/* The CPU lane's outputs so far (rows 0..n of lane_de) into their
 * (token, slot) rows of slot_out: one upload through the device's de
 * buffer and one scatter, both on the compute stream after the kernels
 * already queued there (which may still be using de). */
static int lane_flush(struct moe_model *m, int64_t n)
{
    const int64_t E = m->cfg.n_embd;
    if (n == 0)
        return 0;
    TRY(m->be->ops->upload(m->be, m->a.de, m->ex.lane_de, (size_t)(n * E) * sizeof(float)));
    return m->be->ops->copy_rows(m->be, m->a.slot_out, E, m->ex.lane_dst, m->a.de, E, NULL, n, E);
}

/* Expert e's FFN on the CPU lane over its tokens' rows of lane_x, into
 * rows r0.. of lane_de: the operations of expert_ffn, in its order, on the
 * CPU backend, so that a CPU backend playing the device gives the same
 * bits. */
static int lane_ffn(struct moe_model *m, const struct lane_w *w, int e, int64_t r0)
{
    const struct moe_model_cfg *c = &m->cfg;
    struct moe_backend *be = m->ex.lane_be;
    const struct moe_backend_ops *ops = be->ops;
    const int K = c->n_expert_used, E = c->n_embd;
    const int cnt = m->a.expert_count[e];
    const int32_t *list = m->a.tok_by_expert + m->a.expert_start[e];
    for (int i = 0; i < cnt; i++) {
        m->a.row_idx[i] = list[i] / K;
        m->ex.lane_dst[r0 + i] = list[i];
    }
    TRY(ops->copy_rows(be, m->ex.lane_xe, E, NULL, m->ex.lane_x, E, m->a.row_idx, cnt, E));
    TRY(ops->matmul(be, m->ex.lane_ge, &w->g, w->bg, m->ex.lane_xe, cnt));
    TRY(ops->matmul(be, m->ex.lane_ue, &w->u, w->bu, m->ex.lane_xe, cnt));
    TRY(glu_on(m, be, m->ex.lane_ge, m->ex.lane_ge, m->ex.lane_ue, (int64_t)cnt * c->n_ff_exp));
    return ops->matmul(be, m->ex.lane_de + r0 * E, &w->d, w->bd, m->ex.lane_ge, cnt);
}

/* Every expert of layer il in state `cpu` (experts_cached's pend list) on
 * the CPU lane, then their outputs into slot_out. An expert whose bytes
 * cannot be read fails the sequences routed to it (expert_failed). The
 * rule's measurements: the CPU's rate on the experts computed (reads from
 * the source taken out, and counted as the disk's rate), and the round
 * trip of the activations (sync_s, the download of xn, plus the uploads
 * here). */
static int lane_run(struct moe_model *m, int il, int np, int cpu, double sync_s, struct moe_diag *diag)
{
    const struct layer *L = &m->w.layers[il];
    const struct moe_expert_layout *lay = moe_expert_src_layout(m->ex.src, (uint32_t)il);
    const uint64_t bytes = lay ? lay->raw_size : 0;
    uint64_t cpu_b = 0, cpu_tb = 0, disk_b = 0;
    double disk_s = 0, flush_s = 0;
    const double t0 = lane_now();
    int64_t rows = 0;
    int rc = 0;
    for (int j = 0; j < np && rc == 0; j++) {
        if (m->ex.pend_state[j] != cpu)
            continue;
        const int e = m->ex.pend_e[j];
        const int64_t cnt = m->a.expert_count[e];
        if (rows + cnt > m->n_batch) {
            const double f0 = lane_now();
            rc = lane_flush(m, rows);
            flush_s += lane_now() - f0;
            rows = 0;
            if (rc != 0)
                break;
        }
        struct lane_w w;
        struct moe_diag d = { 0 };
        rc = lane_get(m, L, il, e, &w, &d);
        if (w.disk_s > 0) {
            disk_s += w.disk_s;
            disk_b += rc == 0 ? bytes : 0;
        }
        if (rc != 0) {
            rc = expert_failed(m, il, e, rc, &d);
            if (rc != 0)
                return moe_diag_set(diag, rc, "layer %d, expert %d: %s", il, e, moe_strerror(rc));
            continue;
        }
        rc = lane_ffn(m, &w, e, rows);
        lane_put(m, il, e, &w, rc == 0);
        if (rc != 0)
            return moe_diag_set(diag, rc, "CPU lane: layer %d, expert %d: %s", il, e, moe_strerror(rc));
        rows += cnt;
        cpu_b += bytes;
        cpu_tb += bytes * (uint64_t)cnt;
    }
    const double f0 = lane_now();
    if (rc == 0)
        rc = lane_flush(m, rows);
    flush_s += lane_now() - f0;
    if (rc != 0)
        return moe_diag_set(diag, rc, "CPU lane: layer %d: outputs to the device: %s", il, moe_strerror(rc));
    moe_lane_observe_cpu(&m->ex.lane, cpu_b, cpu_tb, lane_now() - t0 - disk_s - flush_s);
    moe_lane_observe_disk(&m->ex.lane, disk_b, disk_s);
    moe_lane_observe_sync(&m->ex.lane, sync_s + flush_s);
    return 0;
}

/* Whether the CPU lane can read expert e of layer il without a disk read:
 * the host tier holds it, or it is in the mapped GGUF (not with expert
 * biases, which come from a blob). */
static bool lane_in_host(struct moe_model *m, const struct layer *L, int il, int e)
{
    if (m->ex.host && moe_host_tier_contains(m->ex.host, (uint32_t)il, (uint32_t)e))
        return true;
    return L->gate.host && L->up.host && L->down.host && L->bias_off.gate < 0 && L->bias_off.up < 0 &&
           L->bias_off.down < 0;
}

/* Assigns layer il's misses to lanes (doc/cache.md "Hybrid lanes"). A hit,
 * or an expert already loading (a prefetch) unless the lane is forced to
 * the CPU, stays with the device. Each miss goes to the copy lane
 * (acquired by experts_cached like before), to the CPU lane (state `cpu`),
 * or to both: the CPU computes it, and its load is started after the
 * step's own copies (lane_bg), unpinned, so that it lands in the cache for
 * later steps. Under auto the rule of cache/lane.h decides from the
 * measured rates, the tokens routed to each miss, whether its bytes are in
 * host memory and its expected reuse; its governor may run a fixed mode
 * for a while. Returns how many the CPU lane computes; *n_bg of them, in
 * lane_j[0..*n_bg), are to be copied as well. */
static int lane_assign(struct moe_model *m, int il, int np, int cpu, int *n_bg)
{
    const struct layer *L = &m->w.layers[il];
    struct moe_cache_stats *st = &m->ex.lane_st;
    const struct moe_expert_layout *lay = moe_expert_src_layout(m->ex.src, (uint32_t)il);
    const uint64_t bytes = lay ? lay->raw_size : 0;
    const enum moe_miss_lane mode = m->ex.lane_be ? moe_lane_current(&m->ex.lane) : MOE_MISS_LANE_COPY;
    struct moe_lane_step step = { 0 };
    int nm = 0;
    *n_bg = 0;
    for (int j = 0; j < np; j++) {
        const int e = m->ex.pend_e[j];
        const int where = moe_expert_cache_lookup(m->ex.cache, il, e);
        if (where == 2 || (where == 1 && mode != MOE_MISS_LANE_CPU)) {
            step.hit_bytes += bytes;
            step.hit_token_bytes += bytes * (uint64_t)m->a.expert_count[e];
            continue;
        }
        if (m->ex.lane_j == NULL) {
            /* copy configured: no rule, only the counters */
            st->lane_copy++;
            st->lane_copy_bytes += bytes;
            continue;
        }
        m->ex.lane_j[nm] = j;
        m->ex.lane_miss[nm++] = (struct moe_lane_miss){ .bytes = bytes, .n_tokens = m->a.expert_count[e] };
    }
    if (m->ex.lane_j == NULL)
        return 0;
    if (!m->ex.reuse_seeded) {
        /* a warm start's counts (loaded after the lanes were made) */
        m->ex.reuse_seeded = true;
        if (m->ex.uses != NULL)
            moe_lane_reuse_seed(&m->ex.reuse, m->ex.uses);
    }
    /* every visit counts for the frequencies, those without misses too */
    moe_lane_reuse_visit(&m->ex.reuse, il, m->ex.pend_e, np, nm);
    if (nm == 0)
        return 0;
    if (mode == MOE_MISS_LANE_AUTO) {
        step.evict_reuse = moe_lane_reuse_victim(&m->ex.reuse, il);
        for (int i = 0; i < nm; i++) {
            const int e = m->ex.pend_e[m->ex.lane_j[i]];
            m->ex.lane_miss[i].in_host = lane_in_host(m, L, il, e);
            m->ex.lane_miss[i].expected_reuse = moe_lane_reuse_expect(&m->ex.reuse, il, e);
        }
        moe_lane_decide(&m->ex.lane, &step, m->ex.lane_miss, nm, m->ex.lane_choice);
    } else {
        memset(m->ex.lane_choice, mode == MOE_MISS_LANE_CPU ? MOE_LANE_CPU : MOE_LANE_COPY, (size_t)nm);
    }
    int copies = 0;
    for (int i = 0; i < nm; i++)
        copies += (m->ex.lane_choice[i] & MOE_LANE_COPY) != 0;
    moe_lane_reuse_inserted(&m->ex.reuse, il, copies);
    int ncpu = 0;
    for (int i = 0; i < nm; i++) {
        const int j = m->ex.lane_j[i];
        const int ch = m->ex.lane_choice[i];
        if (!(ch & MOE_LANE_CPU)) {
            st->lane_copy++;
            st->lane_copy_bytes += bytes;
            continue;
        }
        if (ch & MOE_LANE_COPY) {
            st->lane_both++;
            st->lane_both_bytes += bytes;
            m->ex.lane_j[(*n_bg)++] = m->ex.pend_e[j];   /* (*n_bg <= i: compacts in place) */
        } else {
            st->lane_cpu++;
            st->lane_cpu_bytes += bytes;
        }
        m->ex.pend_state[j] = cpu;
        ncpu++;
    }
    return ncpu;
}

/* The background copies of lane_assign's "both" misses, after the step's
 * own loads were queued: acquired (a load starts, unless every slot is
 * pinned) and released at once, so that each lands in the cache unpinned;
 * a failure only means it stays a miss. */
static void lane_bg(struct moe_model *m, int il, int n_bg)
{
    for (int i = 0; i < n_bg; i++) {
        const uint8_t *blob = NULL;
        struct moe_diag d = { 0 };
        const int e = m->ex.lane_j[i];
        if (moe_expert_cache_acquire(m->ex.cache, il, e, m->step, &blob, &d) >= 0)
            moe_expert_cache_release(m->ex.cache, il, e);
    }
}

/* After a forward pass: the copy stream's rate since the last pass (CUDA
 * times its uploads; the CPU backend times nothing, so the rule keeps its
 * default link rate there) and the pass's time for the governor. */
void moe_model_experts_step(struct moe_model *m, int64_t n, double seconds)
{
    if (m->ex.lane_j == NULL)
        return;
    struct moe_copy_stats cs;
    m->be->ops->copy_stats(m->be, &cs);
    moe_lane_observe_link(&m->ex.lane, cs.timed_bytes - m->ex.link0.timed_bytes, cs.busy_s - m->ex.link0.busy_s);
    m->ex.link0 = cs;
    moe_lane_observe_step(&m->ex.lane, seconds, (int)n);
}

/* The layer's experts through the cache: pin the ready ones and start loads
 * for the others, compute what is ready, then each missing expert as soon as
 * it arrives; release each right after its compute so that a cache of one
 * layer's top-k slots still serves batches that touch more experts. */
static int experts_cached(struct moe_model *m, int il, int64_t n, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct layer *L = &m->w.layers[il];
    enum { TODO = 0, LOADING = 1, DONE = 2, CPU = 3 };
    int np = 0;
    for (int e = 0; e < c->n_expert; e++)
        if (m->a.expert_count[e] > 0) {
            m->ex.pend_e[np] = e;
            m->ex.pend_l[np] = il;
            m->ex.pend_state[np++] = TODO;
        }
    int n_bg = 0;
    const int ncpu = m->ex.lanes ? lane_assign(m, il, np, CPU, &n_bg) : 0;
    int remaining = np - ncpu, rc = 0;
    struct moe_diag d = { 0 };
    /* the CPU lane's input, before any of this layer's kernels are queued
     * (the download waits for the compute stream) */
    bool lane_done = ncpu == 0;
    double lane_t0 = 0, dl_s = 0;
    if (!lane_done) {
        lane_t0 = lane_now();
        rc = m->be->ops->download(m->be, m->ex.lane_x, m->a.xn,
                                  (size_t)(n * c->n_embd) * sizeof(float));
        if (rc != 0)
            return moe_diag_set(diag, rc, "layer %d: CPU lane: download of the hidden states: %s", il,
                                moe_strerror(rc));
        dl_s = lane_now() - lane_t0;
        m->ex.lane_st.lane_cpu_s += dl_s;
    }
    int32_t wl[1024], we[1024], wi[1024];
    bool swept = m->ex.prefetch_depth == 0;
    while (remaining > 0 && rc == 0) {
        for (int j = 0; j < np && rc == 0; j++) {
            if (m->ex.pend_state[j] != TODO)
                continue;
            const uint8_t *blob = NULL;
            int r = moe_expert_cache_acquire(m->ex.cache, il, m->ex.pend_e[j], m->step, &blob, &d);
            if (r == -EAGAIN)
                break; /* every slot pinned: compute what we hold first */
            if (r < 0) {
                /* the load could not start (nothing stays pinned) */
                rc = expert_failed(m, il, m->ex.pend_e[j], r, &d);
                moe_diag_clear(&d);
                m->ex.pend_state[j] = DONE;
                remaining--;
                continue;
            }
            if (r == 1) {
                rc = expert_ffn_timed(m, L, il, m->ex.pend_e[j], blob);
                moe_expert_cache_release(m->ex.cache, il, m->ex.pend_e[j]);
                m->ex.pend_state[j] = DONE;
                remaining--;
            } else {
                m->ex.pend_state[j] = LOADING;
            }
        }
        if (rc == 0 && !lane_done) {
            /* the hits are queued on the device and the misses' copies
             * under way: the CPU lane computes its share meanwhile */
            lane_done = true;
            lane_bg(m, il, n_bg);
            lane_t0 = lane_now();
            rc = lane_run(m, il, np, CPU, dl_s, &d);
            m->ex.lane_st.lane_cpu_s += lane_now() - lane_t0;
        }
        if (rc != 0 || remaining == 0)
            break;
        if (!swept) {
            /* this layer's experts are pinned: queued prefetches for it (or
             * earlier layers) that nobody pinned were wrong predictions */
            moe_expert_cache_cancel_stale(m->ex.cache, il);
            swept = true;
        }
        int nw = 0;
        for (int j = 0; j < np; j++)
            if (m->ex.pend_state[j] == LOADING) {
                wl[nw] = il;
                we[nw] = m->ex.pend_e[j];
                wi[nw++] = j;
            }
        if (nw == 0) {
            /* nothing of ours in flight: the slots are held by prefetches
             * (or by another user); wait for one to become usable */
            if (moe_expert_cache_wait_slot(m->ex.cache) != 0) {
                rc = moe_diag_set(&d, MOE_ELIMIT, "expert cache: every slot is pinned; no slot for"
                                  " layer %d", il);
                break;
            }
            continue;
        }
        int which = 0;
        const uint8_t *blob = NULL;
        const double w0 = m->ex.lanes ? lane_now() : 0;
        rc = moe_expert_cache_wait_any(m->ex.cache, wl, we, nw, &which, &blob, &d);
        if (m->ex.lanes)
            m->ex.lane_st.lane_copy_wait_s += lane_now() - w0;
        const int j = wi[which];
        if (rc == 0) {
            rc = expert_ffn_timed(m, L, il, m->ex.pend_e[j], blob);
        } else {
            /* its load failed: the slot is released below and never cached */
            rc = expert_failed(m, il, m->ex.pend_e[j], rc, &d);
            moe_diag_clear(&d);
        }
        moe_expert_cache_release(m->ex.cache, il, m->ex.pend_e[j]);
        m->ex.pend_state[j] = DONE;
        remaining--;
    }
    if (rc == 0 && !lane_done) {
        /* every other expert went to the CPU lane */
        lane_bg(m, il, n_bg);
        lane_t0 = lane_now();
        rc = lane_run(m, il, np, CPU, dl_s, &d);
        m->ex.lane_st.lane_cpu_s += lane_now() - lane_t0;
    }
    if (rc != 0) {
        /* unpin what this layer still holds; loads in flight finish into
         * unpinned slots and stay cached */
        for (int j = 0; j < np; j++)
            if (m->ex.pend_state[j] == LOADING)
                moe_expert_cache_release(m->ex.cache, il, m->ex.pend_e[j]);
        /* the load's own message names the file, layer, expert and offset */
        if (d.code != 0)
            moe_diag_set(diag, rc, "%s", d.msg);
        else
            moe_diag_set(diag, rc, "layer %d: experts: %s", il, moe_strerror(rc));
    }
    return rc;
}

/* Learns the transitions of layer il from this batch's routing, token by
 * token: the previous token's choice at il, and for the batch's last token
 * (the only one whose choice at il - 1 is still remembered) this token's
 * choice at il - 1. */
static void history_learn(struct moe_model *m, int il, int64_t n)
{
    const int K = m->cfg.n_expert_used;
    const int prev_l = il - 1 >= 0 && m->w.layers[il - 1].moe ? il - 1 : -1;
    for (int64_t t = 0; t < n; t++)
        moe_history_learn(&m->ex.hist, il, m->a.ids + t * K, t == n - 1 ? prev_l : -1);
}


/* Group the (token, slot) pairs of the batch by expert. */
static void group_by_expert(struct moe_model *m, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const int K = c->n_expert_used;
    struct model_acts *a = &m->a;
    memset(a->expert_count, 0, (size_t)c->n_expert * sizeof(int32_t));
    for (int64_t i = 0; i < n * K; i++)
        a->expert_count[a->ids[i]]++;
    int32_t acc = 0;
    for (int e = 0; e < c->n_expert; e++) {
        a->expert_start[e] = acc;
        acc += a->expert_count[e];
        a->expert_count[e] = 0;
    }
    for (int64_t i = 0; i < n * K; i++) {
        int e = a->ids[i];
        a->tok_by_expert[a->expert_start[e] + a->expert_count[e]++] = (int32_t)i;
    }
}

int moe_model_experts_run(struct moe_model *m, int il, int64_t n, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct layer *L = &m->w.layers[il];
    if (m->ex.prefetch_history)
        history_learn(m, il, n);
    group_by_expert(m, n);
    if (m->ex.uses != NULL) {
        uint32_t *u = m->ex.uses + (size_t)il * (size_t)c->n_expert;
        for (int e = 0; e < c->n_expert; e++)
            u[e] = u[e] > UINT32_MAX - (uint32_t)m->a.expert_count[e] ? UINT32_MAX
                                                                    : u[e] + (uint32_t)m->a.expert_count[e];
    }
    if (m->ex.cache != NULL)
        return experts_cached(m, il, n, diag);
    const int64_t E = c->n_embd, F = c->n_ff_exp;
    /* runs of consecutive experts whose pairs fit the buffers (n_batch
     * rows), each as one set of matmul ops: every expert at once when the
     * batch's pairs fit, else runs of about EXPERT_RUN_ROWS pairs, so that a
     * prefill's experts of a few tokens each share the thread pool's runs
     * (and gate and up the conversion of their input) instead of three runs
     * per expert, while a run's rows of xe, ge, ue and de stay in L2 */
    const int64_t cap = n * c->n_expert_used <= m->n_batch ? m->n_batch : EXPERT_RUN_ROWS;
    for (int e0 = 0; e0 < c->n_expert;) {
        int64_t rows = 0;
        int e1 = e0, used = 0;
        while (e1 < c->n_expert && rows + m->a.expert_count[e1] <= m->n_batch &&
               (rows == 0 || rows + m->a.expert_count[e1] <= cap) && used < 256) {
            rows += m->a.expert_count[e1];
            used += m->a.expert_count[e1] > 0;
            e1++;
        }
        if (e1 == e0) {
            /* more pairs than the buffers' rows (not with top-k's distinct
             * experts per token and n <= n_batch): on its own */
            const int e = e0++;
            struct moe_weight wg = expert_weight(&L->gate, e), wu = expert_weight(&L->up, e);
            struct moe_weight wd = expert_weight(&L->down, e);
            TRY(expert_ffn(m, e, &wg, &wu, &wd, L->gate_b ? L->gate_b + e * F : NULL,
                           L->up_b ? L->up_b + e * F : NULL, L->down_b ? L->down_b + e * E : NULL));
            continue;
        }
        if (rows > 0)
            TRY(experts_together(m, L, e0, e1));
        e0 = e1;
    }
    return 0;
}

/* ---- prefetch ---------------------------------------------------------- */

/* History predictor: after layer il, predict layer il + d's experts from the
 * counts: what followed the previous token's experts at that layer, plus (for
 * the next layer) what followed this token's experts at layer il. */
static void prefetch_history(struct moe_model *m, int il)
{
    const struct moe_model_cfg *c = &m->cfg;
    const int max_inflight = c->n_expert_used * m->ex.prefetch_depth;
    int32_t ids[1024];
    if (c->n_expert_used > 1024)
        return;
    for (int d = 1; d <= m->ex.prefetch_depth && il + d < c->n_layer; d++) {
        const int l = il + d;
        if (!m->w.layers[l].moe)
            continue;
        const int n = moe_history_predict(&m->ex.hist, l, d == 1 && m->w.layers[il].moe ? il : -1, ids);
        for (int k = 0; k < n; k++)
            moe_expert_cache_prefetch(m->ex.cache, l, ids[k], m->step, max_inflight);
    }
}

/* Speculative gating: the hidden state after layer L, normed and routed by
 * the routers of layers L+1..L+depth, predicts their experts well enough
 * (residual streams change slowly) to start loading them while layer L+1's
 * attention runs. Loads are low priority, bounded, and never evict an
 * expert pinned or predicted for this step. */
static void prefetch_gate(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    const int K = c->n_expert_used, E = c->n_embd;
    const int max_inflight = c->n_expert_used * m->ex.prefetch_depth;
    for (int d = 1; d <= m->ex.prefetch_depth && il + d < c->n_layer; d++) {
        const struct layer *L = &m->w.layers[il + d];
        if (!L->moe)
            continue;
        for (int64_t t = 0; t < n; t++) {
            int32_t ids[64];
            float w[64];
            float *logits = m->ex.pf_logits;
            if (L->router_scale) {   /* gemma4's router input (forward.c ffn_beside) */
                if (ops->rmsnorm(m->be, m->ex.pf_x, m->a.x + t * E, NULL, 1, E, c->rms_eps) ||
                    ops->scale(m->be, m->ex.pf_x, m->ex.pf_x, 1.0f / sqrtf((float)E), E) ||
                    ops->mul_rows(m->be, m->ex.pf_x, m->ex.pf_x, L->router_scale, 1, E))
                    return;
            } else if (ops->rmsnorm(m->be, m->ex.pf_x, m->a.x + t * E, L->ffn_norm, 1, E, c->rms_eps)) {
                return;
            }
            if (ops->matmul(m->be, logits, &L->router, L->router_bias, m->ex.pf_x, 1))
                return;
            struct moe_gating_params gp = c->gating;
            gp.bias = L->sel_bias;
            gp.n_group = c->n_expert_groups;
            gp.n_group_used = c->n_group_used;
            if (K > 64 || ops->router_topk(m->be, logits, 1, &gp, ids, w))
                return;
            for (int k = 0; k < K; k++)
                moe_expert_cache_prefetch(m->ex.cache, il + d, ids[k], m->step, max_inflight);
        }
    }
}

bool moe_model_prefetch_steps(const struct moe_model *m, uint64_t *on, uint64_t *off)
{
    *on = m->ex.gov.steps[1];
    *off = m->ex.gov.steps[0];
    return m->ex.prefetch_depth > 0;
}

void moe_model_experts_prefetch(struct moe_model *m, int il, int64_t n)
{
    if (m->ex.prefetch_history)
        prefetch_history(m, il);
    else
        prefetch_gate(m, il, n);
}

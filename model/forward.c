/* The forward pass (see model.h).
 *
 * One layer, for a batch of n tokens of one sequence (shapes in floats):
 *
 *   xn   = rmsnorm(x) * attn_norm                       [n][n_embd]
 *   q,k,v = Wq xn (+bq), Wk xn (+bk), Wv xn (+bv)       [n][n_head*hd], [n][n_kv*hd]
 *   q,k  = qk-norm (qwen3moe: per head; olmoe: whole)   then RoPE at each position
 *   KV cache rows pos..pos+n-1 = k, v
 *   a    = softmax(q.k * scale, causal) . v              [n][n_head*hd]
 *   x   += Wo a
 *   xn   = rmsnorm(x) * ffn_norm
 *   ids, w = gating(Wr xn)                              [n][k]
 *   x   += sum_k w_k * down_e(silu(gate_e xn) * up_e xn)   (+ shared expert)
 *
 * and at the end logits = Wout (rmsnorm(x) * output_norm).
 *
 * deepseek2 replaces attention with multi-head latent attention (MLA) in
 * llama.cpp's absorbed form: the KV cache holds per token only the
 * normalised latent c (kv_lora_rank) and the shared rotary key k_pe; each
 * head's query is q_abs = Wk_b[h] q_nope (in latent space) followed by its
 * rotated q_pe, values are the latent itself, and each head's output is
 * mapped back with Wv_b[h]. Its first layers have a dense FFN, MoE layers add
 * a shared expert, and routing is sigmoid with a selection bias.
 * gpt-oss adds q/k/v/o biases, attention sinks, a sliding window on even
 * layers, a router bias, expert biases and the clamped SwiGLU.
 *
 * The experts themselves run in experts.c; the per-token sum of their
 * outputs runs here over the k slots in selection order, products first,
 * as ggml does.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <string.h>
#include <time.h>

#include "common/dtype.h"
#include "model/model-impl.h"

/* MLA in llama.cpp's absorbed form (see the top of this file). The
 * architecture row's flags select this and every other variant below. */
static int attention_mla(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->w.layers[il];
    const int H = c->n_head, nope = c->qk_nope, rope = c->qk_rope, lat = c->kv_lora_rank;
    const int qk = nope + rope, krow = lat + rope, vh = c->v_head_dim;

    /* queries [n][H][nope + rope] */
    if (c->q_lora_rank > 0) {
        TRY(ops->matmul(be, m->a.qa, &L->wq_a, NULL, m->a.xn, n));
        TRY(ops->rmsnorm(be, m->a.qa, m->a.qa, L->q_a_norm, n, c->q_lora_rank, c->rms_eps));
        TRY(ops->matmul(be, m->a.q, &L->wq_b, NULL, m->a.qa, n));
    } else {
        TRY(ops->matmul(be, m->a.q, &L->wq, NULL, m->a.xn, n));
    }
    /* latent and shared rotary key [n][lat + rope]: norm the latent part */
    TRY(ops->matmul(be, m->a.k, &L->wkv_a, NULL, m->a.xn, n));
    for (int64_t t = 0; t < n; t++)
        TRY(ops->rmsnorm(be, m->a.k + t * krow, m->a.k + t * krow, L->kv_a_norm, 1, lat, c->rms_eps));
    TRY(ops->rope(be, m->a.q, n, H, qk, nope, m->a.pos, &c->rope));
    TRY(ops->rope(be, m->a.k, n, 1, krow, lat, m->a.pos, &c->rope));
    uint8_t *kc = m->kv.k + (size_t)L->kv_slot * m->kv.k_layer;
    TRY(ops->kv_store(be, kc, m->a.k, n, m->a.kvrow, krow, krow, 0, m->kv_dtype));

    /* assembled queries in m->a.v: [n][H][lat + rope] = (Wk_b[h] q_nope, q_pe) */
    float *qc = m->a.v;
    for (int h = 0; h < H; h++) {
        TRY(ops->copy_rows(be, m->a.hq, nope, NULL, m->a.q + h * qk, (int64_t)H * qk, NULL, n, nope));
        TRY(ops->matmul(be, m->a.hout, &L->wk_b[h], NULL, m->a.hq, n));
        TRY(ops->copy_rows(be, qc + h * krow, (int64_t)H * krow, NULL, m->a.hout, lat, NULL, n, lat));
        TRY(ops->copy_rows(be, qc + h * krow + lat, (int64_t)H * krow, NULL, m->a.q + h * qk + nope,
                           (int64_t)H * qk, NULL, n, rope));
    }
    for (int i = 0; i < m->a.n_segs; i++) {
        const struct seg *g = &m->a.segs[i];
        struct moe_attn_params ap = {
            .n_head = H, .n_head_kv = 1, .head_dim = krow, .head_dim_v = lat,
            .k_row = krow, .v_row = krow, .scale = c->kq_scale, .kv_type = m->kv_dtype,
            .k_cache = kc, .v_cache = kc, .host_blocks = g->s->blocks, .block_rows = m->kv.block,
        };
        TRY(ops->attention(be, m->a.att + g->off * H * lat, qc + g->off * H * krow, g->n,
                           m->a.pos + g->off, &ap));
    }
    /* per head back from the latent: [n][H][vh] in m->a.tmp */
    for (int h = 0; h < H; h++) {
        TRY(ops->copy_rows(be, m->a.hq, lat, NULL, m->a.att + h * lat, (int64_t)H * lat, NULL, n, lat));
        TRY(ops->matmul(be, m->a.hout, &L->wv_b[h], NULL, m->a.hq, n));
        TRY(ops->copy_rows(be, m->a.tmp + h * vh, (int64_t)H * vh, NULL, m->a.hout, vh, NULL, n, vh));
    }
    TRY(ops->matmul(be, m->a.att, &L->wo, NULL, m->a.tmp, n));
    TRY(ops->add(be, m->a.x, m->a.x, m->a.att, n * c->n_embd));
    return 0;
}

static int attention_block(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->w.layers[il];
    /* the layer's own dims (gemma4's differ per layer kind); KV rows are
     * c->k_row long, this layer's kvd of them used */
    const int hd = L->hd, n_kv = L->n_kv, kvd = n_kv * hd, qd = c->n_head * hd;

    TRY(ops->rmsnorm(be, m->a.xn, m->a.x, L->attn_norm, n, c->n_embd, c->rms_eps));
    if (c->ad->mla)
        return attention_mla(m, il, n);
    if (L->recurrent)
        return moe_deltanet_layer(m, il, n);
    const bool gated = c->ad->attn_out_gate;
    const struct moe_matmul_job qkv[3] = {
        { .y = gated ? m->dn.qg : m->a.q, .w = L->wq, .bias = L->bq, .x = m->a.xn, .n_tok = n },
        { .y = m->a.k, .w = L->wk, .bias = L->bk, .x = m->a.xn, .n_tok = n },
        { .y = m->a.v, .w = L->wv, .bias = L->bv, .x = m->a.xn, .n_tok = n },
    };
    TRY(moe_model_matmuls(m, qkv, L->v_is_k ? 2 : 3));
    if (gated)
        TRY(moe_attn_gate_split(m, n));
    if (L->v_is_k)   /* gemma4 without attn_v: V is K's projection, before K's norm */
        TRY(ops->copy_rows(be, m->a.v, kvd, NULL, m->a.k, kvd, NULL, n, kvd));
    if (c->ad->qk_norm || c->ad->qk_norm_optional) {
        if (L->q_norm)
            TRY(ops->rmsnorm(be, m->a.q, m->a.q, L->q_norm, n * c->n_head, hd, c->rms_eps));
        if (L->k_norm)
            TRY(ops->rmsnorm(be, m->a.k, m->a.k, L->k_norm, n * n_kv, hd, c->rms_eps));
    } else if (c->ad->qk_norm_full) {
        TRY(ops->rmsnorm(be, m->a.q, m->a.q, L->q_norm, n, qd, c->rms_eps));
        TRY(ops->rmsnorm(be, m->a.k, m->a.k, L->k_norm, n, kvd, c->rms_eps));
    }
    if (c->ad->v_norm)
        TRY(ops->rmsnorm(be, m->a.v, m->a.v, NULL, n * n_kv, hd, c->rms_eps));
    TRY(ops->rope(be, m->a.q, n, c->n_head, hd, 0, m->a.pos, &L->rope));
    TRY(ops->rope(be, m->a.k, n, n_kv, hd, 0, m->a.pos, &L->rope));
    /* every token's K and V into its pool row, then attention per sequence
     * through its block table */
    uint8_t *kc = m->kv.k + (size_t)L->kv_slot * m->kv.k_layer;
    uint8_t *vc = m->kv.v + (size_t)L->kv_slot * m->kv.v_layer;
    TRY(ops->kv_store(be, kc, m->a.k, n, m->a.kvrow, kvd, c->k_row, 0, m->kv_dtype));
    TRY(ops->kv_store(be, vc, m->a.v, n, m->a.kvrow, kvd, c->v_row, 0, m->kv_dtype));
    for (int i = 0; i < m->a.n_segs; i++) {
        const struct seg *g = &m->a.segs[i];
        const int32_t *pos = m->a.pos + g->off;
        struct moe_attn_params ap = {
            .n_head = c->n_head, .n_head_kv = n_kv, .head_dim = hd, .head_dim_v = hd,
            .k_row = c->k_row, .v_row = c->v_row, .scale = c->kq_scale, .kv_type = m->kv_dtype,
            .k_cache = kc, .v_cache = vc, .window = L->window, .sinks = L->sinks,
            .host_blocks = g->s->blocks, .block_rows = m->kv.block,
        };
        TRY(ops->attention(be, m->a.att + g->off * qd, m->a.q + g->off * qd, g->n, pos, &ap));
    }
    if (gated)
        TRY(moe_attn_gate_apply(m, n));
    TRY(ops->matmul(be, m->a.tmp, &L->wo, L->bo, m->a.att, n));
    if (L->attn_post_norm)
        TRY(ops->rmsnorm(be, m->a.tmp, m->a.tmp, L->attn_post_norm, n, c->n_embd, c->rms_eps));
    TRY(ops->add(be, m->a.x, m->a.x, m->a.tmp, n * c->n_embd));
    return 0;
}

static int dense_ffn(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->w.layers[il];
    TRY(ops->rmsnorm(be, m->a.xn, m->a.x, L->ffn_norm, n, c->n_embd, c->rms_eps));
    const struct moe_matmul_job gu[2] = {
        { .y = m->a.ge, .w = L->ffn_gate, .x = m->a.xn, .n_tok = n },
        { .y = m->a.ue, .w = L->ffn_up, .x = m->a.xn, .n_tok = n },
    };
    TRY(moe_model_matmuls(m, gu, 2));
    TRY(ops->swiglu(be, m->a.ge, m->a.ge, m->a.ue, n * c->n_ff));
    TRY(ops->matmul(be, m->a.tmp, &L->ffn_down, NULL, m->a.ge, n));
    TRY(ops->add(be, m->a.x, m->a.x, m->a.tmp, n * c->n_embd));
    return 0;
}

/* The k expert outputs of each token in m->a.slot_out, each first scaled by
 * its expert's ffn_down_exps.scale where the layer has one, summed with
 * the routing weights in selection order (products first, as ggml does)
 * into y. */
static int sum_experts(struct moe_model *m, const struct layer *L, int64_t n, float *y)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    const int K = c->n_expert_used, E = c->n_embd;
    TRY(ops->fill(be, y, 0.0f, n * E));
    for (int64_t t = 0; t < n; t++) {
        float *out = y + t * E;
        for (int k = 0; k < K; k++) {
            float *so = m->a.slot_out + (size_t)(t * K + k) * E;
            if (L->down_scale)
                TRY(ops->scale(be, so, so, L->down_scale[m->a.ids[t * K + k]], E));
            TRY(ops->axpy(be, out, m->a.weights[t * K + k], so, E));
        }
    }
    return 0;
}

/* y = down(act(gate xn) * up xn) for the dense MLP of width n_ff. */
static int dense_mlp(struct moe_model *m, const struct layer *L, int64_t n, float *y)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    const struct moe_matmul_job gu[2] = {
        { .y = m->a.ge, .w = L->ffn_gate, .x = m->a.xn, .n_tok = n },
        { .y = m->a.ue, .w = L->ffn_up, .x = m->a.xn, .n_tok = n },
    };
    TRY(moe_model_matmuls(m, gu, 2));
    if (c->ad->gelu)
        TRY(ops->geglu(be, m->a.ge, m->a.ge, m->a.ue, n * c->n_ff));
    else
        TRY(ops->swiglu(be, m->a.ge, m->a.ge, m->a.ue, n * c->n_ff));
    return ops->matmul(be, y, &L->ffn_down, NULL, m->a.ge, n);
}

/* gemma4's FFN (dense_beside_moe): on a MoE layer the experts over
 * pre_ffw_norm_2(x), routed from rmsnorm(x) / sqrt(n_embd) *
 * ffn_gate_inp.scale, then post_ffw_norm_2; the dense MLP over ffn_norm(x)
 * then post_ffw_norm_1; their sum. A layer without experts: the MLP alone.
 * Then post_ffw_norm, the residual and layer_output_scale. */
static int ffn_beside(struct moe_model *m, int il, int64_t n, int64_t tok0, moe_route_fn route,
                      void *ud, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->w.layers[il];
    const int K = c->n_expert_used, E = c->n_embd;
    if (L->moe) {
        TRY(ops->rmsnorm(be, m->a.tmp, m->a.x, NULL, n, E, c->rms_eps));
        TRY(ops->scale(be, m->a.tmp, m->a.tmp, 1.0f / sqrtf((float)E), n * E));
        TRY(ops->mul_rows(be, m->a.tmp, m->a.tmp, L->router_scale, n, E));
        TRY(ops->matmul(be, m->a.rlogits, &L->router, NULL, m->a.tmp, n));
        struct moe_gating_params gp = c->gating;
        TRY(ops->router_topk(be, m->a.rlogits, n, &gp, m->a.ids, m->a.weights));
        if (route)
            for (int64_t t = 0; t < n; t++)
                route(ud, tok0 + t, il, m->a.ids + t * K, m->a.weights + t * K, K);
        TRY(ops->rmsnorm(be, m->a.xn, m->a.x, L->ffn_pre_norm_2, n, E, c->rms_eps));
        TRY(moe_model_experts_run(m, il, n, diag));
        TRY(sum_experts(m, L, n, m->a.tmp));
        TRY(ops->rmsnorm(be, m->a.tmp, m->a.tmp, L->ffn_post_norm_2, n, E, c->rms_eps));
    }
    TRY(ops->rmsnorm(be, m->a.xn, m->a.x, L->ffn_norm, n, E, c->rms_eps));
    TRY(dense_mlp(m, L, n, m->a.de));
    if (L->moe) {
        TRY(ops->rmsnorm(be, m->a.de, m->a.de, L->ffn_post_norm_1, n, E, c->rms_eps));
        TRY(ops->add(be, m->a.de, m->a.de, m->a.tmp, n * E));
    }
    TRY(ops->rmsnorm(be, m->a.de, m->a.de, L->ffn_post_norm, n, E, c->rms_eps));
    TRY(ops->add(be, m->a.x, m->a.x, m->a.de, n * E));
    if (L->out_scale)
        TRY(ops->scale(be, m->a.x, m->a.x, L->out_scale[0], n * E));
    return 0;
}

/* Route the batch, run each chosen expert over its tokens (experts.c), sum
 * the k outputs of each token with their weights in selection order
 * (products first, as ggml does), add the shared expert, then the
 * residual. */
static int moe_block(struct moe_model *m, int il, int64_t n, int64_t tok0, moe_route_fn route,
                     void *ud, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->w.layers[il];
    const int K = c->n_expert_used, E = c->n_embd;

    if (c->ad->dense_beside_moe)
        return ffn_beside(m, il, n, tok0, route, ud, diag);
    if (!L->moe)
        return dense_ffn(m, il, n);
    TRY(ops->rmsnorm(be, m->a.xn, m->a.x, L->ffn_norm, n, E, c->rms_eps));
    TRY(ops->matmul(be, m->a.rlogits, &L->router, L->router_bias, m->a.xn, n));
    struct moe_gating_params gp = c->gating;
    gp.bias = L->sel_bias;
    gp.n_group = c->n_expert_groups;
    gp.n_group_used = c->n_group_used;
    TRY(ops->router_topk(be, m->a.rlogits, n, &gp, m->a.ids, m->a.weights));
    if (route)
        for (int64_t t = 0; t < n; t++)
            route(ud, tok0 + t, il, m->a.ids + t * K, m->a.weights + t * K, K);
    TRY(moe_model_experts_run(m, il, n, diag));

    TRY(ops->fill(be, m->a.tmp, 0.0f, n * E));
    for (int64_t t = 0; t < n; t++) {
        float *out = m->a.tmp + t * E;
        for (int k = 0; k < K; k++)
            TRY(ops->axpy(be, out, m->a.weights[t * K + k], m->a.slot_out + (size_t)(t * K + k) * E, E));
    }
    if (c->n_ff_shexp > 0) {
        const struct moe_matmul_job gu[2] = {
            { .y = m->a.ge, .w = L->sh_gate, .x = m->a.xn, .n_tok = n },
            { .y = m->a.ue, .w = L->sh_up, .x = m->a.xn, .n_tok = n },
        };
        TRY(moe_model_matmuls(m, gu, 2));
        TRY(ops->swiglu(be, m->a.ge, m->a.ge, m->a.ue, n * c->n_ff_shexp));
        TRY(ops->matmul(be, m->a.de, &L->sh_down, NULL, m->a.ge, n));
        if (L->sh_gate_inp) {
            struct moe_weight gi = {
                .data = L->sh_gate_inp, .dtype = MOE_DTYPE_F32, .n_in = E, .n_out = 1,
                .row_bytes = (size_t)E * sizeof(float),
            };
            TRY(ops->matmul(be, m->a.sh_tmp, &gi, NULL, m->a.xn, n));
            TRY(ops->gate_rows(be, m->a.de, m->a.sh_tmp, n, E));
        }
        TRY(ops->add(be, m->a.tmp, m->a.tmp, m->a.de, n * E));
    }
    TRY(ops->add(be, m->a.x, m->a.x, m->a.tmp, n * E));
    return 0;
}
static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The last layer's FFN only for the rows whose output is read (as
 * llama.cpp keeps only its output rows, inp_out_ids, before the last
 * layer's FFN): the KV of every row is written by the attention before
 * it, and a row's FFN does not depend on the others (every op is
 * batch-invariant), so the rows that are read get the same floats.
 * Returns the number of rows that are read (n when a segment reads all
 * of its rows). */
static int64_t out_rows(const struct moe_model *m, int64_t n)
{
    int64_t k = 0;
    for (int i = 0; i < m->a.n_segs; i++) {
        const struct seg *g = &m->a.segs[i];
        if (g->out == SEG_OUT_ALL)
            return n;
        k += g->out == SEG_OUT_LAST && g->n > 0;
    }
    return k;
}

/* Moves each segment's read row to the front of m->a.x (in order: row j
 * comes from a row >= j, so nothing is overwritten before it is moved)
 * and points the segments at them; out_rows_restore undoes it. */
static int out_rows_gather(struct moe_model *m)
{
    const int64_t E = m->cfg.n_embd;
    int64_t j = 0;
    for (int i = 0; i < m->a.n_segs; i++) {
        struct seg *g = &m->a.segs[i];
        g->off_all = g->off;
        g->n_all = g->n;
        g->off = j;
        g->n = g->out == SEG_OUT_LAST && g->n_all > 0;
        if (g->n == 0)
            continue;
        const int64_t src = g->off_all + g->n_all - 1;
        if (src != j)
            TRY(m->be->ops->copy_rows(m->be, m->a.x + j * E, E, NULL, m->a.x + src * E, E, NULL, 1, E));
        j++;
    }
    return 0;
}

/* The rows back to their places, last first (row j goes to a row >= j
 * that no row before it occupies), and the segments' layout restored. */
static int out_rows_restore(struct moe_model *m)
{
    const int64_t E = m->cfg.n_embd;
    int rc = 0;
    for (int i = m->a.n_segs - 1; i >= 0; i--) {
        struct seg *g = &m->a.segs[i];
        const int64_t dst = g->off_all + g->n_all - 1;
        if (g->n == 1 && dst != g->off && rc == 0)
            rc = m->be->ops->copy_rows(m->be, m->a.x + dst * E, E, NULL, m->a.x + g->off * E, E, NULL, 1, E);
        g->off = g->off_all;
        g->n = g->n_all;
    }
    return rc;
}

/* Runs the n tokens laid out by m->a.segs (positions in m->a.pos, embeddings
 * gathered by the caller into m->a.x) through every layer. */
static int forward_layers(struct moe_model *m, int64_t n, int64_t tok0, moe_route_fn route, void *ud,
                          struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const bool decode = m->ex.prefetch_depth > 0 && n <= 4;
    const bool pf = decode && moe_prefetch_gov_on(&m->ex.gov);
    const double t0 = decode ? mono_s() : 0;
    const double t_lanes = m->ex.lanes ? mono_s() : 0;   /* the hybrid lanes' governor */
    /* delta-net models: a sequence's recurrent state starts at zero, and
     * counts as lost until this step has run every layer for it */
    for (int i = 0; c->deltanet && i < m->a.n_segs; i++) {
        struct moe_seq *s = m->a.segs[i].s;
        if (s->pos == 0)
            TRY(m->be->ops->fill(m->be, s->rs, 0.0f, (int64_t)moe_deltanet_state_floats(m)));
        s->rs_lost = true;
    }
    for (int il = 0; il < c->n_layer; il++) {
        TRY(attention_block(m, il, n));
        /* a routing trace records every row's experts: then all rows */
        const int64_t nf = il == c->n_layer - 1 && route == NULL ? out_rows(m, n) : n;
        if (nf < n) {
            TRY(out_rows_gather(m));
            int rc = nf > 0 ? moe_block(m, il, nf, tok0, route, ud, diag) : 0;
            const int rc2 = out_rows_restore(m);
            TRY(rc ? rc : rc2);
        } else {
            TRY(moe_block(m, il, n, tok0, route, ud, diag));
        }
        if (pf && nf > 0)
            moe_model_experts_prefetch(m, il, nf);
        /* sequences fail alone when an expert of theirs failed to load
         * (experts.c); once every one has, nothing is left to compute */
        int failed = 0;
        for (int i = 0; i < m->a.n_segs; i++)
            failed += m->a.segs[i].status != 0;
        if (failed == m->a.n_segs) {
            m->step++;
            return moe_diag_set(diag, m->a.segs[0].status, "%s", m->a.segs[0].err);
        }
    }
    if (decode)
        moe_prefetch_gov_step(&m->ex.gov, pf, mono_s() - t0);
    if (m->ex.lanes)
        moe_model_experts_step(m, n, mono_s() - t_lanes);
    /* a sequence that failed alone keeps its position, and its rows are
     * never published for reuse */
    for (int i = 0; i < m->a.n_segs; i++) {
        if (m->a.segs[i].status != 0)
            continue;
        m->a.segs[i].s->rs_lost = false;
        m->a.segs[i].s->pos += (int)m->a.segs[i].n;
        moe_seq_publish(m->a.segs[i].s);
    }
    m->step++;
    return 0;
}

/* Logits of n normed rows xn (backend memory) into host memory, through
 * the backend's logits buffer logit_rows rows at a time. */
static int output_logits(struct moe_model *m, const float *xn, int64_t n, float *host)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    for (int64_t r0 = 0; r0 < n; r0 += m->a.logit_rows) {
        const int64_t nr = n - r0 < m->a.logit_rows ? n - r0 : m->a.logit_rows;
        TRY(ops->matmul(m->be, m->a.logits_dev, &m->w.output, NULL, xn + r0 * c->n_embd, nr));
        TRY(ops->download(m->be, host + r0 * c->n_vocab, m->a.logits_dev,
                          (size_t)nr * (size_t)c->n_vocab * sizeof(float)));
    }
    if (c->logit_softcap > 0.0f) {
        /* gemma4: cap * tanh(logit / cap), as ggml's scale, tanh, scale */
        const float cap = c->logit_softcap, inv = 1.0f / cap;
        for (size_t i = 0; i < (size_t)n * (size_t)c->n_vocab; i++)
            host[i] = tanhf(host[i] * inv) * cap;
    }
    return 0;
}

/* Token embeddings of n tokens into x (backend memory), scaled where the
 * row says (gemma4: x sqrt(n_embd)). */
static int embed(struct moe_model *m, float *x, const int32_t *tokens, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    TRY(m->be->ops->get_rows(m->be, x, &m->w.tok_embd, tokens, (int)n));
    if (c->embd_scale > 0.0f)
        TRY(m->be->ops->scale(m->be, x, x, c->embd_scale, n * c->n_embd));
    return 0;
}

static int forward_batch(struct moe_model *m, struct moe_seq *s, const int32_t *tokens, int64_t n,
                         int64_t tok0, float *logits, bool all_logits, moe_route_fn route, void *ud,
                         struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    TRY(moe_seq_grow(s, s->pos + (int)n, diag));
    for (int64_t t = 0; t < n; t++) {
        m->a.pos[t] = s->pos + (int32_t)t;
        m->a.kvrow[t] = moe_seq_row(s, s->pos + (int)t);
        s->toks[s->pos + t] = tokens[t];
    }
    m->a.segs[0] = (struct seg){ .s = s, .off = 0, .n = n,
                                 .out = logits == NULL ? SEG_OUT_NONE : all_logits ? SEG_OUT_ALL : SEG_OUT_LAST };
    m->a.segs[0].err[0] = '\0';
    m->a.n_segs = 1;
    TRY(embed(m, m->a.x, tokens, n));
    TRY(forward_layers(m, n, tok0, route, ud, diag));
    if (logits == NULL)
        return 0;
    if (all_logits) {
        TRY(ops->rmsnorm(be, m->a.xn, m->a.x, m->w.output_norm, n, c->n_embd, c->rms_eps));
        TRY(output_logits(m, m->a.xn, n, logits + tok0 * c->n_vocab));
    } else {
        const float *last = m->a.x + (n - 1) * c->n_embd;
        TRY(ops->rmsnorm(be, m->a.xn, last, m->w.output_norm, 1, c->n_embd, c->rms_eps));
        TRY(output_logits(m, m->a.xn, 1, logits));
    }
    return 0;
}

static int forward_multi(struct moe_model *m, const struct moe_batch_seg *segs, int n_segs,
                         struct moe_diag *diag);

int moe_model_forward_multi(struct moe_model *m, const struct moe_batch_seg *segs, int n_segs,
                            struct moe_diag *diag)
{
    m->a.n_segs = 0;
    m->a.fwd_rc = 0;
    moe_diag_clear(&m->a.fwd_diag);
    int rc = forward_multi(m, segs, n_segs, &m->a.fwd_diag);
    if (rc == 0)
        return 0;
    /* some sequences failed alone (segs[].status), or all of them together */
    bool alone = false;
    for (int i = 0; i < m->a.n_segs; i++)
        alone |= m->a.segs[i].status != 0;
    if (!alone)
        m->a.fwd_rc = rc;
    return moe_diag_set(diag, rc, "%s", m->a.fwd_diag.msg);
}

int moe_model_forward_failed(const struct moe_model *m, int i, struct moe_diag *diag)
{
    if (i >= 0 && i < m->a.n_segs && m->a.segs[i].status != 0)
        return moe_diag_set(diag, m->a.segs[i].status, "%s", m->a.segs[i].err);
    if (m->a.fwd_rc != 0)
        return moe_diag_set(diag, m->a.fwd_rc, "%s", m->a.fwd_diag.msg);
    if (i < 0 || i >= m->a.n_segs)
        return moe_diag_set(diag, -EINVAL, "forward: no batch entry %d", i);
    return 0;
}

static int forward_multi(struct moe_model *m, const struct moe_batch_seg *segs, int n_segs,
                         struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    if (n_segs <= 0)
        return moe_diag_set(diag, -EINVAL, "forward: empty batch");
    int64_t n = 0;
    for (int i = 0; i < n_segs; i++) {
        const struct moe_batch_seg *g = &segs[i];
        if (g->seq == NULL || g->seq->m != m || g->n <= 0 || g->tokens == NULL)
            return moe_diag_set(diag, -EINVAL, "forward: batch entry %d has no sequence or tokens",
                                i);
        for (int j = 0; j < i; j++)
            if (segs[j].seq == g->seq)
                return moe_diag_set(diag, -EINVAL, "forward: batch entries %d and %d are the same"
                                    " sequence", j, i);
        if (g->seq->rs_lost && g->seq->pos > 0)
            return moe_diag_set(diag, -EINVAL, "forward: batch entry %d: the sequence's recurrent"
                                " state was lost by a failed step; reset it", i);
        if (g->n > m->n_ctx - g->seq->pos)
            return moe_diag_set(diag, MOE_ELIMIT, "forward: batch entry %d: %d tokens at position"
                                " %d exceed the context of %d", i, g->n, g->seq->pos, m->n_ctx);
        for (int t = 0; t < g->n; t++)
            if (g->tokens[t] < 0 || g->tokens[t] >= c->n_vocab)
                return moe_diag_set(diag, -EINVAL, "forward: batch entry %d token %d is id %d,"
                                    " expected 0..%d", i, t, g->tokens[t], c->n_vocab - 1);
        n += g->n;
    }
    if (n > m->n_batch)
        return moe_diag_set(diag, MOE_ELIMIT, "forward: %" PRId64 " tokens in one batch, the"
                            " model was loaded for at most %d", n, m->n_batch);
    for (int i = 0; i < n_segs; i++) {
        int rc = moe_seq_grow(segs[i].seq, segs[i].seq->pos + segs[i].n, diag);
        if (rc)
            return rc;
    }
    int64_t off = 0;
    int rc = 0;
    for (int i = 0; i < n_segs && rc == 0; i++) {
        const struct moe_batch_seg *g = &segs[i];
        m->a.segs[i] = (struct seg){ .s = g->seq, .off = off, .n = g->n,
                                     .out = g->logits != NULL ? SEG_OUT_LAST : SEG_OUT_NONE };
        m->a.segs[i].err[0] = '\0';
        for (int t = 0; t < g->n; t++) {
            m->a.pos[off + t] = g->seq->pos + t;
            m->a.kvrow[off + t] = moe_seq_row(g->seq, g->seq->pos + t);
            g->seq->toks[g->seq->pos + t] = g->tokens[t];
        }
        rc = embed(m, m->a.x + off * c->n_embd, g->tokens, g->n);
        off += g->n;
    }
    m->a.n_segs = n_segs;
    if (rc == 0)
        rc = forward_layers(m, n, 0, NULL, NULL, diag);
    for (int i = 0; i < n_segs && rc == 0; i++) {
        const struct moe_batch_seg *g = &segs[i];
        if (g->logits == NULL || m->a.segs[i].status != 0)
            continue;
        const float *last = m->a.x + (m->a.segs[i].off + g->n - 1) * c->n_embd;
        rc = ops->rmsnorm(be, m->a.xn, last, m->w.output_norm, 1, c->n_embd, c->rms_eps);
        if (rc == 0)
            rc = output_logits(m, m->a.xn, 1, g->logits);
    }
    if (rc) {
        int failed = 0;
        for (int i = 0; i < m->a.n_segs; i++)
            failed += m->a.segs[i].status != 0;
        if (failed == m->a.n_segs)   /* each failed alone (forward_layers stopped) */
            return rc;
        for (int i = 0; i < m->a.n_segs; i++)   /* not their own failure: all fail */
            m->a.segs[i].status = 0;
        return moe_diag_set(diag, rc, "forward of %d sequences (%" PRId64 " tokens): %s", n_segs,
                            n, moe_strerror(rc));
    }
    for (int i = 0; i < m->a.n_segs; i++)
        if (m->a.segs[i].status != 0) {
            int failed = 0;
            for (int j = 0; j < m->a.n_segs; j++)
                failed += m->a.segs[j].status != 0;
            return moe_diag_set(diag, m->a.segs[i].status, "forward: %d of %d sequences failed"
                                " (moe_model_forward_failed); the first: %s", failed, m->a.n_segs,
                                m->a.segs[i].err);
        }
    return 0;
}

int moe_model_forward(struct moe_model *m, struct moe_seq *s, const int32_t *tokens, int64_t n,
                      float *logits, bool all_logits, moe_route_fn route, void *route_ud,
                      struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    if (n <= 0)
        return moe_diag_set(diag, -EINVAL, "forward: empty batch");
    if (s->rs_lost && s->pos > 0)
        return moe_diag_set(diag, -EINVAL, "forward: the sequence's recurrent state was lost by a"
                            " failed step; reset it");
    if (n > m->n_ctx - s->pos)
        return moe_diag_set(diag, MOE_ELIMIT, "forward: %" PRId64 " tokens at position %d exceed"
                            " the context of %d", n, s->pos, m->n_ctx);
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->n_vocab)
            return moe_diag_set(diag, -EINVAL, "forward: token %" PRId64 " is id %d, expected"
                                " 0..%d", i, tokens[i], c->n_vocab - 1);
    for (int64_t t0 = 0; t0 < n; t0 += m->n_batch) {
        int64_t nb = n - t0 < m->n_batch ? n - t0 : m->n_batch;
        bool last = t0 + nb == n;
        float *lg = NULL;
        if (logits && all_logits)
            lg = logits;
        else if (logits && last)
            lg = logits;
        int rc = forward_batch(m, s, tokens + t0, nb, t0, lg, all_logits, route, route_ud, diag);
        if (rc)
            return moe_diag_set(diag, rc, "forward at position %d: %s", s->pos, moe_strerror(rc));
    }
    return 0;
}

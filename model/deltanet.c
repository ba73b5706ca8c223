/* Gated delta-net layers (qwen35moe: Qwen3.5/3.6 MoE), computed as
 * llama.cpp computes them (its qwen35moe graph and ggml's CPU ssm_conv and
 * gated_delta_net ops), and the gated attention of the same models.
 *
 * One delta-net layer, for the tokens of one sequence (xn = the normed
 * input, D = ssm.state_size, n_k key heads, n_v value heads):
 *
 *   qkv = W_qkv xn        [conv_dim = 2 n_k D + n_v D]: q | k | v
 *   z   = W_gate xn       [n_v D]
 *   b   = sigmoid(W_beta xn)                  [n_v]
 *   g   = softplus(W_alpha xn + dt_bias) * a  [n_v] (a < 0: the log decay)
 *   c   = silu(causal conv of qkv over the last d_conv tokens, per channel);
 *         the conv state holds each channel's last d_conv - 1 inputs
 *   q,k = per key head L2-normalised (x / sqrt(sum x^2 + eps))
 *   per value head h, with key head h % n_k (ggml's broadcast), the state
 *   S [D x D] (key index i, value index j):
 *         S *= exp(g_h);  d_j = (v_j - sum_i S_ij k_i) * b_h;
 *         S_ij += k_i d_j;  o_j = (sum_i S_ij q_i) / sqrt(D)
 *   o   = per value head rmsnorm(o) * ssm_norm * silu(z)
 *   x  += W_out o
 *
 * The state S of every value head and the conv state are the sequence's
 * recurrent state (struct moe_seq rs, backend memory), one slot per
 * delta-net layer.
 *
 * Everything runs through backend ops (kernels/backend.h): the projections
 * as matmuls, the conv as ssm_conv and the rest (activations of b and g,
 * the L2 norms, the recurrence, the gated norm) as gated_delta_net, both
 * once per sequence of the batch. A backend without those two ops cannot
 * run these layers and the model refuses it at load.
 */
#include <errno.h>

#include "common/alloc.h"
#include "model/model-impl.h"

size_t moe_deltanet_state_floats(const struct moe_model *m)
{
    const struct model_deltanet *d = &m->dn;
    return (size_t)m->cfg.n_recurrent * (d->conv_floats + d->ssm_floats);
}

void moe_deltanet_free(struct moe_model *m)
{
    struct model_deltanet *d = &m->dn;
    float **bufs[] = { &d->qkv, &d->conv, &d->z, &d->beta, &d->gdecay, &d->core, &d->qg, &d->gate };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
        if (*bufs[i] != NULL && m->be != NULL)
            m->be->ops->free(m->be, *bufs[i]);
        *bufs[i] = NULL;
    }
    moe_free(d->rs_index);
    d->rs_index = NULL;
}

int moe_deltanet_init(struct moe_model *m, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    struct model_deltanet *d = &m->dn;
    if (!c->deltanet)
        return 0;
    const struct moe_backend_ops *ops = m->be->ops;
    if (ops->ssm_conv == NULL || ops->gated_delta_net == NULL)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: the %s backend has no delta-net ops"
                            " (ssm_conv, gated_delta_net)", c->arch_name, ops->name);
    const size_t B = (size_t)m->n_batch, D = (size_t)c->ssm_d_state;
    d->key_dim = c->ssm_n_k * c->ssm_d_state;
    d->d_inner = c->ssm_n_v * c->ssm_d_state;
    d->conv_dim = 2 * d->key_dim + d->d_inner;
    d->conv_floats = (size_t)d->conv_dim * (size_t)(c->ssm_d_conv - 1);
    d->ssm_floats = (size_t)c->ssm_n_v * D * D;
    d->rs_index = moe_calloc((size_t)c->n_layer, sizeof(int));
    if (d->rs_index == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    const size_t qd = (size_t)c->n_head * (size_t)c->head_dim;
    struct { float **p; size_t floats; } bufs[] = {
        { &d->qkv, B * (size_t)d->conv_dim }, { &d->conv, B * (size_t)d->conv_dim },
        { &d->z, B * (size_t)d->d_inner }, { &d->beta, B * (size_t)c->ssm_n_v },
        { &d->gdecay, B * (size_t)c->ssm_n_v }, { &d->core, B * (size_t)d->d_inner },
        { &d->qg, B * 2 * qd }, { &d->gate, B * qd },
    };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        if ((*bufs[i].p = ops->alloc(m->be, bufs[i].floats * sizeof(float))) == NULL)
            return moe_diag_set(diag, -ENOMEM, "out of %s memory allocating delta-net scratch for"
                                " %d tokens", ops->name, m->n_batch);
    int slot = 0;
    for (int il = 0; il < c->n_layer; il++)
        d->rs_index[il] = moe_model_cfg_recurrent(c, il) ? slot++ : -1;
    return 0;
}

int moe_deltanet_layer(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct model_deltanet *d = &m->dn;
    struct layer *L = &m->w.layers[il];
    const int NV = c->ssm_n_v, C = d->conv_dim;
    const struct moe_matmul_job jobs[4] = {
        { .y = d->qkv, .w = L->ssm_qkv, .x = m->a.xn, .n_tok = n },
        { .y = d->z, .w = L->ssm_z, .x = m->a.xn, .n_tok = n },
        { .y = d->beta, .w = L->ssm_beta, .x = m->a.xn, .n_tok = n },
        { .y = d->gdecay, .w = L->ssm_alpha, .x = m->a.xn, .n_tok = n },
    };
    TRY(moe_model_matmuls(m, jobs, 4));
    const struct moe_gdn_params gp = {
        .n_k = c->ssm_n_k, .n_v = NV, .d_state = c->ssm_d_state, .eps = c->rms_eps,
        .dt_bias = L->ssm_dt, .a = L->ssm_a, .norm = L->ssm_norm,
    };
    const size_t per_seq = moe_deltanet_state_floats(m) / (size_t)c->n_recurrent;
    for (int i = 0; i < m->a.n_segs; i++) {
        const struct seg *g = &m->a.segs[i];
        float *st = g->s->rs + (size_t)d->rs_index[il] * per_seq;
        TRY(ops->ssm_conv(be, d->conv + g->off * C, d->qkv + g->off * C, st, L->ssm_conv, g->n, C,
                          c->ssm_d_conv));
        TRY(ops->gated_delta_net(be, d->core + g->off * d->d_inner, d->conv + g->off * C,
                                 d->z + g->off * d->d_inner, d->beta + g->off * NV,
                                 d->gdecay + g->off * NV, st + d->conv_floats, g->n, &gp));
    }
    TRY(ops->matmul(be, m->a.tmp, &L->ssm_out, NULL, d->core, n));
    TRY(ops->add(be, m->a.x, m->a.x, m->a.tmp, n * c->n_embd));
    return 0;
}

/* The [n][H][2 hd] projection in dn.qg: each head's first hd into m->a.q,
 * the rest into dn.gate. */
int moe_attn_gate_split(struct moe_model *m, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const int64_t rows = n * c->n_head, hd = c->head_dim;
    const struct moe_backend_ops *ops = m->be->ops;
    TRY(ops->copy_rows(m->be, m->a.q, hd, NULL, m->dn.qg, 2 * hd, NULL, rows, hd));
    return ops->copy_rows(m->be, m->dn.gate, hd, NULL, m->dn.qg + hd, 2 * hd, NULL, rows, hd);
}

/* m->a.att *= sigmoid(dn.gate), elementwise: a gate per row of one. */
int moe_attn_gate_apply(struct moe_model *m, int64_t n)
{
    const int64_t qd = (int64_t)m->cfg.n_head * m->cfg.head_dim;
    return m->be->ops->gate_rows(m->be, m->a.att, m->dn.gate, n * qd, 1);
}

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
 * recurrent state (struct moe_seq rs), one slot per delta-net layer.
 *
 * The projections run through the backend's matmuls; the conv, the
 * recurrence and the elementwise steps run here on host memory, so these
 * layers need a backend whose memory is host memory (the CPU backend; the
 * loader refuses others). Single-threaded: the recurrence is O(n_v D^2)
 * per token, small beside the projections.
 */
#include <errno.h>
#include <math.h>
#include <string.h>

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
    float **bufs[] = { &d->qkv, &d->conv, &d->z, &d->beta, &d->gdecay, &d->core, &d->win,
                       &d->delta, &d->qg, &d->gate };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
        moe_free(*bufs[i]);
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
    if (!m->be->ops->host_memory)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: delta-net layers need host memory; the %s"
                            " backend has none", c->arch_name, m->be->ops->name);
    const size_t B = (size_t)m->n_batch, D = (size_t)c->ssm_d_state;
    d->key_dim = c->ssm_n_k * c->ssm_d_state;
    d->d_inner = c->ssm_n_v * c->ssm_d_state;
    d->conv_dim = 2 * d->key_dim + d->d_inner;
    d->conv_floats = (size_t)d->conv_dim * (size_t)(c->ssm_d_conv - 1);
    d->ssm_floats = (size_t)c->ssm_n_v * D * D;
    d->rs_index = moe_calloc((size_t)c->n_layer, sizeof(int));
    const size_t qd = (size_t)c->n_head * (size_t)c->head_dim;
    d->qkv = moe_malloc(B * (size_t)d->conv_dim * sizeof(float));
    d->conv = moe_malloc(B * (size_t)d->conv_dim * sizeof(float));
    d->z = moe_malloc(B * (size_t)d->d_inner * sizeof(float));
    d->beta = moe_malloc(B * (size_t)c->ssm_n_v * sizeof(float));
    d->gdecay = moe_malloc(B * (size_t)c->ssm_n_v * sizeof(float));
    d->core = moe_malloc(B * (size_t)d->d_inner * sizeof(float));
    d->win = moe_malloc((B + (size_t)c->ssm_d_conv) * sizeof(float));
    d->delta = moe_malloc(D * sizeof(float));
    d->qg = moe_malloc(B * 2 * qd * sizeof(float));
    d->gate = moe_malloc(B * qd * sizeof(float));
    if (d->rs_index == NULL || d->qkv == NULL || d->conv == NULL || d->z == NULL ||
        d->beta == NULL || d->gdecay == NULL || d->core == NULL || d->win == NULL ||
        d->delta == NULL || d->qg == NULL || d->gate == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory allocating delta-net scratch for %d"
                            " tokens", m->n_batch);
    int slot = 0;
    for (int il = 0; il < c->n_layer; il++)
        d->rs_index[il] = moe_model_cfg_recurrent(c, il) ? slot++ : -1;
    return 0;
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float softplus(float x) { return x > 20.0f ? x : logf(1.0f + expf(x)); }

/* ggml's rms_norm (sum of squares in double) of x[n] into y, times eps' */
static float rms_scale(const float *x, int n, float eps)
{
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += (double)(x[i] * x[i]);
    const float mean = (float)(sum / n);
    return 1.0f / sqrtf(mean + eps);
}

static float dot(const float *a, const float *b, int n)
{
    float s = 0.0f;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* The causal conv over one sequence's n tokens (rows of qkv at stride
 * conv_dim), its state updated; silu of the result into out. */
static void conv_seq(struct model_deltanet *d, int d_conv, const float *w, float *state,
                     const float *qkv, float *out, int64_t n)
{
    const int C = d->conv_dim, K = d_conv, hist = d_conv - 1;
    float *win = d->win;
    for (int ch = 0; ch < C; ch++) {
        float *st = state + (size_t)ch * (size_t)hist;
        const float *wc = w + (size_t)ch * (size_t)K;
        memcpy(win, st, (size_t)hist * sizeof(float));
        for (int64_t t = 0; t < n; t++)
            win[hist + t] = qkv[t * C + ch];
        for (int64_t t = 0; t < n; t++) {
            float sum = 0.0f;
            for (int i = 0; i < K; i++)
                sum += win[t + i] * wc[i];
            out[t * C + ch] = silu(sum);
        }
        memcpy(st, win + n, (size_t)hist * sizeof(float));
    }
}

/* The gated delta rule over one sequence's n tokens (conv rows q | k | v),
 * per value head, its states S updated; outputs into core [n][n_v D]. */
static void recur_seq(const struct moe_model_cfg *c, struct model_deltanet *d, float *ssm,
                      const float *conv, const float *beta, const float *gdecay, float *core,
                      int64_t n)
{
    const int D = c->ssm_d_state, NV = c->ssm_n_v, NK = c->ssm_n_k, C = d->conv_dim;
    const float scale = 1.0f / sqrtf((float)D);
    float *delta = d->delta;
    for (int h = 0; h < NV; h++) {
        float *S = ssm + (size_t)h * (size_t)D * (size_t)D; /* row j: S[.][j] */
        const int hk = h % NK;
        for (int64_t t = 0; t < n; t++) {
            const float *q = conv + t * C + hk * D;
            const float *k = conv + t * C + d->key_dim + hk * D;
            const float *v = conv + t * C + 2 * d->key_dim + h * D;
            const float b = beta[t * NV + h], eg = expf(gdecay[t * NV + h]);
            for (int i = 0; i < D * D; i++)
                S[i] *= eg;
            for (int j = 0; j < D; j++)
                delta[j] = (v[j] - dot(S + (size_t)j * D, k, D)) * b;
            for (int j = 0; j < D; j++) {
                float *row = S + (size_t)j * D;
                for (int i = 0; i < D; i++)
                    row[i] += k[i] * delta[j];
            }
            float *o = core + t * d->d_inner + h * D;
            for (int j = 0; j < D; j++)
                o[j] = dot(S + (size_t)j * D, q, D) * scale;
        }
    }
}

int moe_deltanet_layer(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct model_deltanet *d = &m->dn;
    struct layer *L = &m->w.layers[il];
    const int D = c->ssm_d_state, NV = c->ssm_n_v, NK = c->ssm_n_k, C = d->conv_dim;
    const struct moe_matmul_job jobs[4] = {
        { .y = d->qkv, .w = L->ssm_qkv, .x = m->a.xn, .n_tok = n },
        { .y = d->z, .w = L->ssm_z, .x = m->a.xn, .n_tok = n },
        { .y = d->beta, .w = L->ssm_beta, .x = m->a.xn, .n_tok = n },
        { .y = d->gdecay, .w = L->ssm_alpha, .x = m->a.xn, .n_tok = n },
    };
    TRY(moe_model_matmuls(m, jobs, 4));
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < NV; h++) {
            d->beta[t * NV + h] = sigmoid(d->beta[t * NV + h]);
            d->gdecay[t * NV + h] = softplus(d->gdecay[t * NV + h] + L->ssm_dt[h]) * L->ssm_a[h];
        }
    const size_t per_seq = moe_deltanet_state_floats(m) / (size_t)c->n_recurrent;
    for (int i = 0; i < m->a.n_segs; i++) {
        const struct seg *g = &m->a.segs[i];
        float *st = g->s->rs + (size_t)d->rs_index[il] * per_seq;
        conv_seq(d, c->ssm_d_conv, L->ssm_conv, st, d->qkv + g->off * C, d->conv + g->off * C,
                 g->n);
    }
    /* q and k: L2 norm per key head, as ggml's rms_norm(eps / D) x 1/sqrt(D) */
    const float l2s = 1.0f / sqrtf((float)D), l2eps = c->rms_eps / (float)D;
    for (int64_t t = 0; t < n; t++)
        for (int hh = 0; hh < 2 * NK; hh++) {
            float *x = d->conv + t * C + hh * D;
            const float sc = rms_scale(x, D, l2eps);
            for (int j = 0; j < D; j++)
                x[j] = (x[j] * sc) * l2s;
        }
    for (int i = 0; i < m->a.n_segs; i++) {
        const struct seg *g = &m->a.segs[i];
        float *ssm = g->s->rs + (size_t)d->rs_index[il] * per_seq + d->conv_floats;
        recur_seq(c, d, ssm, d->conv + g->off * C, d->beta + g->off * NV, d->gdecay + g->off * NV,
                  d->core + g->off * d->d_inner, g->n);
    }
    /* gated RMSNorm per value head */
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < NV; h++) {
            float *o = d->core + t * d->d_inner + h * D;
            const float *z = d->z + t * d->d_inner + h * D;
            const float sc = rms_scale(o, D, c->rms_eps);
            for (int j = 0; j < D; j++)
                o[j] = ((o[j] * sc) * L->ssm_norm[j]) * silu(z[j]);
        }
    TRY(ops->matmul(be, m->a.tmp, &L->ssm_out, NULL, d->core, n));
    TRY(ops->add(be, m->a.x, m->a.x, m->a.tmp, n * c->n_embd));
    return 0;
}

void moe_attn_gate_split(struct moe_model *m, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const int H = c->n_head, hd = c->head_dim;
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < H; h++) {
            const float *src = m->dn.qg + (t * H + h) * 2 * hd;
            memcpy(m->a.q + (t * H + h) * hd, src, (size_t)hd * sizeof(float));
            memcpy(m->dn.gate + (t * H + h) * hd, src + hd, (size_t)hd * sizeof(float));
        }
}

void moe_attn_gate_apply(struct moe_model *m, int64_t n)
{
    const int64_t qd = (int64_t)m->cfg.n_head * m->cfg.head_dim;
    for (int64_t i = 0; i < n * qd; i++)
        m->a.att[i] *= sigmoid(m->dn.gate[i]);
}

/* Model loading and the forward pass (see model.h).
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
 * The MoE block groups the batch by expert, like ggml's mul_mat_id: each
 * expert's matrices are read once per batch for all the tokens routed to it.
 * The per-token sum runs over the k slots in selection order, products
 * first, as ggml does.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/alloc.h"
#include "io/gguf.h"
#include "kernels/cpu/dequant.h"
#include "kernels/dtype.h"
#include "model/model.h"

struct expert_tensor {
    const uint8_t *data;       /* start of the 3-D tensor */
    uint32_t dtype;
    int64_t n_in, n_out;
    size_t row_bytes, expert_bytes;
};

struct layer {
    struct moe_weight wq, wk, wv, wo;
    float *bq, *bk, *bv;                 /* owned f32, or NULL */
    float *attn_norm, *ffn_norm;         /* owned f32 */
    float *q_norm, *k_norm;              /* owned f32, or NULL */
    struct moe_weight router;
    struct expert_tensor gate, up, down;
    /* qwen2moe shared expert */
    struct moe_weight sh_gate, sh_up, sh_down;
    float *sh_gate_inp;                  /* [n_embd], or NULL */
};

struct moe_model {
    struct moe_model_cfg cfg;
    struct moe_gguf *gguf;
    struct moe_backend *be;
    int n_ctx, n_batch;
    bool kv_f16;
    struct moe_weight tok_embd, output;
    float *output_norm;
    struct layer *layers;

    /* scratch, sized for n_batch tokens */
    float *x, *xn, *q, *k, *v, *att, *tmp, *logits_tmp;
    float *rlogits;
    int32_t *ids;
    float *weights;
    float *xe, *ge, *ue, *de, *slot_out, *sh_tmp;
    int32_t *pos;
    int32_t *tok_by_expert;              /* [n_batch * k]: (token*k + slot) grouped by expert */
    int32_t *expert_count, *expert_start;
};

struct moe_seq {
    struct moe_model *m;
    int pos;
    void *k_cache, *v_cache;             /* per layer: [n_ctx][n_kv*hd] */
    size_t layer_bytes;
};

const char *moe_model_supported_archs(void)
{
    return "llama (Mixtral-style MoE), qwen2moe, qwen3moe, olmoe";
}

/* ---- configuration --------------------------------------------------- */

static int get_u32_req(const struct moe_gguf *g, const char *arch, const char *suffix, int *out,
                       struct moe_diag *diag)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    uint32_t v;
    int rc = moe_gguf_get_u32(g, key, &v, diag);
    if (rc == -ENOENT)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key '%s'", moe_gguf_path(g), key);
    if (rc)
        return rc;
    if (v > (1u << 30))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' = %u is out of range",
                            moe_gguf_path(g), key, v);
    *out = (int)v;
    return 0;
}

static int get_u32_opt(const struct moe_gguf *g, const char *arch, const char *suffix, int *out,
                       int def, struct moe_diag *diag)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    uint32_t v;
    int rc = moe_gguf_get_u32(g, key, &v, diag);
    if (rc == -ENOENT) {
        *out = def;
        return 0;
    }
    if (rc)
        return rc;
    if (v > (1u << 30))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' = %u is out of range",
                            moe_gguf_path(g), key, v);
    *out = (int)v;
    return 0;
}

static int get_f32_opt(const struct moe_gguf *g, const char *arch, const char *suffix, float *out,
                       float def, struct moe_diag *diag)
{
    char key[128];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    int rc = moe_gguf_get_f32(g, key, out, diag);
    if (rc == -ENOENT) {
        *out = def;
        return 0;
    }
    return rc;
}

static int read_cfg(const struct moe_gguf *g, struct moe_model_cfg *c, struct moe_diag *diag)
{
    const char *path = moe_gguf_path(g);
    struct moe_gguf_str a;
    int rc = moe_gguf_get_str(g, "general.architecture", &a, diag);
    if (rc == -ENOENT)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key 'general.architecture'", path);
    if (rc)
        return rc;
    if (a.len >= sizeof(c->arch_name))
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: architecture name too long; supported: %s",
                            path, moe_model_supported_archs());
    memcpy(c->arch_name, a.ptr, a.len);
    c->arch_name[a.len] = '\0';
    const char *arch = c->arch_name;
    if (strcmp(arch, "llama") == 0)
        c->arch = MOE_ARCH_LLAMA;
    else if (strcmp(arch, "qwen2moe") == 0)
        c->arch = MOE_ARCH_QWEN2MOE;
    else if (strcmp(arch, "qwen3moe") == 0)
        c->arch = MOE_ARCH_QWEN3MOE;
    else if (strcmp(arch, "olmoe") == 0)
        c->arch = MOE_ARCH_OLMOE;
    else
        return moe_diag_set(diag, MOE_EUNSUPPORTED,
                            "%s: architecture '%s' is not supported; supported: %s", path, arch,
                            moe_model_supported_archs());

    int n_ff = 0, n_rot = 0;
    if ((rc = get_u32_req(g, arch, "embedding_length", &c->n_embd, diag)) ||
        (rc = get_u32_req(g, arch, "block_count", &c->n_layer, diag)) ||
        (rc = get_u32_req(g, arch, "attention.head_count", &c->n_head, diag)) ||
        (rc = get_u32_opt(g, arch, "attention.head_count_kv", &c->n_head_kv, c->n_head, diag)) ||
        (rc = get_u32_opt(g, arch, "context_length", &c->n_ctx_train, 4096, diag)) ||
        (rc = get_u32_opt(g, arch, "feed_forward_length", &n_ff, 0, diag)) ||
        (rc = get_u32_opt(g, arch, "expert_feed_forward_length", &c->n_ff_exp, n_ff, diag)) ||
        (rc = get_u32_opt(g, arch, "expert_shared_feed_forward_length", &c->n_ff_shexp, 0, diag)) ||
        (rc = get_u32_req(g, arch, "expert_count", &c->n_expert, diag)) ||
        (rc = get_u32_req(g, arch, "expert_used_count", &c->n_expert_used, diag)))
        return rc;
    if (c->n_embd <= 0 || c->n_layer <= 0 || c->n_head <= 0 || c->n_head_kv <= 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: embedding_length, block_count and head counts"
                            " must be positive", path);
    if (c->n_head % c->n_head_kv != 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s.attention.head_count %d is not a multiple of"
                            " head_count_kv %d", path, arch, c->n_head, c->n_head_kv);
    if (c->n_expert <= 0)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.expert_count is 0: a dense model, not"
                            " a mixture of experts", path, arch);
    if (c->n_expert > 1024)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s.expert_count %d exceeds 1024", path, arch,
                            c->n_expert);
    if (c->n_expert_used <= 0 || c->n_expert_used > c->n_expert)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s.expert_used_count %d, expected 1..%d"
                            " (expert_count)", path, arch, c->n_expert_used, c->n_expert);
    int hd_default = c->n_embd / c->n_head, hd_v = 0;
    if ((rc = get_u32_opt(g, arch, "attention.key_length", &c->head_dim, hd_default, diag)) ||
        (rc = get_u32_opt(g, arch, "attention.value_length", &hd_v, c->head_dim, diag)) ||
        (rc = get_u32_opt(g, arch, "rope.dimension_count", &n_rot, c->head_dim, diag)))
        return rc;
    if (hd_v != c->head_dim || c->head_dim <= 0 || c->head_dim % 2 != 0)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: head dims key %d / value %d: expected equal,"
                            " even and positive", path, c->head_dim, hd_v);
    if (n_rot <= 0 || n_rot > c->head_dim || n_rot % 2 != 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s.rope.dimension_count %d, expected an even"
                            " number in 2..%d", path, arch, n_rot, c->head_dim);
    if ((rc = get_f32_opt(g, arch, "attention.layer_norm_rms_epsilon", &c->rms_eps, 1e-5f, diag)) ||
        (rc = get_f32_opt(g, arch, "rope.freq_base", &c->rope.freq_base, 10000.0f, diag)))
        return rc;
    float factor = 1.0f;
    if ((rc = get_f32_opt(g, arch, "rope.scaling.factor", &factor, 1.0f, diag)))
        return rc;
    if (!(c->rms_eps > 0.0f) || !(c->rope.freq_base > 0.0f) || !(factor > 0.0f))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: rms epsilon, rope.freq_base and"
                            " rope.scaling.factor must be positive", path);
    c->rope.n_rot = n_rot;
    c->rope.freq_scale = 1.0f / factor;
    /* Per-arch rules as llama.cpp applies them. */
    c->rope.mode = c->arch == MOE_ARCH_LLAMA ? MOE_ROPE_NORM : MOE_ROPE_NEOX;
    c->gating.func = MOE_GATING_SOFTMAX;
    c->gating.n_expert = c->n_expert;
    c->gating.k = c->n_expert_used;
    c->gating.norm = c->arch == MOE_ARCH_LLAMA || c->arch == MOE_ARCH_QWEN3MOE;
    c->gating.scale = 1.0f;
    c->qk_norm = c->arch == MOE_ARCH_QWEN3MOE;
    c->qk_norm_full = c->arch == MOE_ARCH_OLMOE;
    c->qkv_bias = c->arch == MOE_ARCH_QWEN2MOE;
    return 0;
}

/* ---- tensor binding -------------------------------------------------- */

static const struct moe_gguf_tensor *find_tensor(const struct moe_gguf *g, const char *name,
                                                 int n_dims, const int64_t *ne, bool required,
                                                 struct moe_diag *diag, int *rc)
{
    const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, name);
    *rc = 0;
    if (t == NULL) {
        if (required)
            *rc = moe_diag_set(diag, MOE_EFORMAT, "%s: missing tensor '%s'", moe_gguf_path(g), name);
        return NULL;
    }
    /* Trailing dims of 1 are equivalent to fewer dims. */
    bool ok = true;
    for (int d = 0; d < 4; d++) {
        int64_t want = d < n_dims ? ne[d] : 1;
        if ((int64_t)t->ne[d] != want)
            ok = false;
    }
    if (!ok) {
        char want[96], got[96];
        snprintf(want, sizeof(want), "[%" PRId64 ", %" PRId64 ", %" PRId64 "]", ne[0],
                 n_dims > 1 ? ne[1] : 1, n_dims > 2 ? ne[2] : 1);
        snprintf(got, sizeof(got), "[%" PRIu64 ", %" PRIu64 ", %" PRIu64 "]", t->ne[0], t->ne[1],
                 t->ne[2]);
        *rc = moe_diag_set(diag, MOE_EFORMAT, "%s: tensor '%s' has shape %s, expected %s",
                           moe_gguf_path(g), name, got, want);
        return NULL;
    }
    return t;
}

static int bind_matrix(struct moe_model *m, const char *name, int64_t n_in, int64_t n_out,
                       bool required, struct moe_weight *w, struct moe_diag *diag)
{
    int rc;
    const int64_t ne[2] = { n_in, n_out };
    const struct moe_gguf_tensor *t = find_tensor(m->gguf, name, 2, ne, required, diag, &rc);
    memset(w, 0, sizeof(*w));
    if (t == NULL)
        return rc;
    if (!m->be->ops->supports(m->be, t->dtype))
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: tensor '%s' has type %s, which the %s"
                            " backend cannot compute", moe_gguf_path(m->gguf), name,
                            moe_dtype_name(t->dtype), m->be->ops->name);
    w->data = moe_gguf_tensor_data(m->gguf, t);
    w->dtype = t->dtype;
    w->n_in = n_in;
    w->n_out = n_out;
    w->row_bytes = moe_dtype_row_bytes(t->dtype, (uint64_t)n_in, NULL);
    return 0;
}

static int bind_experts(struct moe_model *m, const char *name, int64_t n_in, int64_t n_out,
                        struct expert_tensor *e, struct moe_diag *diag)
{
    int rc;
    const int64_t ne[3] = { n_in, n_out, m->cfg.n_expert };
    const struct moe_gguf_tensor *t = find_tensor(m->gguf, name, 3, ne, true, diag, &rc);
    if (t == NULL)
        return rc;
    if (!m->be->ops->supports(m->be, t->dtype))
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: tensor '%s' has type %s, which the %s"
                            " backend cannot compute", moe_gguf_path(m->gguf), name,
                            moe_dtype_name(t->dtype), m->be->ops->name);
    e->data = moe_gguf_tensor_data(m->gguf, t);
    e->dtype = t->dtype;
    e->n_in = n_in;
    e->n_out = n_out;
    e->row_bytes = moe_dtype_row_bytes(t->dtype, (uint64_t)n_in, NULL);
    e->expert_bytes = e->row_bytes * (size_t)n_out;
    return 0;
}

/* 1-D weights (norms, biases) are converted to owned float arrays. */
static int bind_vector(struct moe_model *m, const char *name, int64_t n, bool required, float **out,
                       struct moe_diag *diag)
{
    int rc;
    *out = NULL;
    const struct moe_gguf_tensor *t = find_tensor(m->gguf, name, 1, &n, required, diag, &rc);
    if (t == NULL)
        return rc;
    if (!moe_dequantize_supported(t->dtype))
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: tensor '%s' has type %s, expected F32",
                            moe_gguf_path(m->gguf), name, moe_dtype_name(t->dtype));
    float *v = moe_malloc((size_t)n * sizeof(float));
    if (v == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    moe_dequantize_row(t->dtype, moe_gguf_tensor_data(m->gguf, t), v, n);
    *out = v;
    return 0;
}

static int bind_layer(struct moe_model *m, int il, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    struct layer *L = &m->layers[il];
    const int64_t E = c->n_embd, hd = c->head_dim;
    const int64_t qd = (int64_t)c->n_head * hd, kvd = (int64_t)c->n_head_kv * hd;
    char n[96];
    int rc;
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d." s, il), n)
    if ((rc = bind_vector(m, NAME("attn_norm.weight"), E, true, &L->attn_norm, diag)) ||
        (rc = bind_matrix(m, NAME("attn_q.weight"), E, qd, true, &L->wq, diag)) ||
        (rc = bind_matrix(m, NAME("attn_k.weight"), E, kvd, true, &L->wk, diag)) ||
        (rc = bind_matrix(m, NAME("attn_v.weight"), E, kvd, true, &L->wv, diag)) ||
        (rc = bind_matrix(m, NAME("attn_output.weight"), qd, E, true, &L->wo, diag)) ||
        (rc = bind_vector(m, NAME("ffn_norm.weight"), E, true, &L->ffn_norm, diag)) ||
        (rc = bind_matrix(m, NAME("ffn_gate_inp.weight"), E, c->n_expert, true, &L->router, diag)) ||
        (rc = bind_experts(m, NAME("ffn_gate_exps.weight"), E, c->n_ff_exp, &L->gate, diag)) ||
        (rc = bind_experts(m, NAME("ffn_up_exps.weight"), E, c->n_ff_exp, &L->up, diag)) ||
        (rc = bind_experts(m, NAME("ffn_down_exps.weight"), c->n_ff_exp, E, &L->down, diag)))
        return rc;
    if (c->qkv_bias &&
        ((rc = bind_vector(m, NAME("attn_q.bias"), qd, true, &L->bq, diag)) ||
         (rc = bind_vector(m, NAME("attn_k.bias"), kvd, true, &L->bk, diag)) ||
         (rc = bind_vector(m, NAME("attn_v.bias"), kvd, true, &L->bv, diag))))
        return rc;
    if (c->qk_norm &&
        ((rc = bind_vector(m, NAME("attn_q_norm.weight"), hd, true, &L->q_norm, diag)) ||
         (rc = bind_vector(m, NAME("attn_k_norm.weight"), hd, true, &L->k_norm, diag))))
        return rc;
    if (c->qk_norm_full &&
        ((rc = bind_vector(m, NAME("attn_q_norm.weight"), qd, true, &L->q_norm, diag)) ||
         (rc = bind_vector(m, NAME("attn_k_norm.weight"), kvd, true, &L->k_norm, diag))))
        return rc;
    if (c->n_ff_shexp > 0 &&
        ((rc = bind_vector(m, NAME("ffn_gate_inp_shexp.weight"), E, true, &L->sh_gate_inp, diag)) ||
         (rc = bind_matrix(m, NAME("ffn_gate_shexp.weight"), E, c->n_ff_shexp, true, &L->sh_gate, diag)) ||
         (rc = bind_matrix(m, NAME("ffn_up_shexp.weight"), E, c->n_ff_shexp, true, &L->sh_up, diag)) ||
         (rc = bind_matrix(m, NAME("ffn_down_shexp.weight"), c->n_ff_shexp, E, true, &L->sh_down, diag))))
        return rc;
#undef NAME
    return 0;
}

static int n_online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 && n < 1024 ? (int)n : 1;
}

static void *scratch(struct moe_model *m, size_t bytes, int *failed)
{
    void *p = moe_calloc(1, bytes ? bytes : 1);
    if (p == NULL)
        *failed = 1;
    (void)m;
    return p;
}

static int alloc_scratch(struct moe_model *m, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const size_t B = (size_t)m->n_batch, K = (size_t)c->n_expert_used, F = sizeof(float);
    const size_t E = (size_t)c->n_embd, qd = (size_t)c->n_head * c->head_dim;
    const size_t kvd = (size_t)c->n_head_kv * c->head_dim;
    size_t ff = (size_t)c->n_ff_exp > (size_t)c->n_ff_shexp ? (size_t)c->n_ff_exp : (size_t)c->n_ff_shexp;
    int failed = 0;
    m->x = scratch(m, B * E * F, &failed);
    m->xn = scratch(m, B * E * F, &failed);
    m->q = scratch(m, B * qd * F, &failed);
    m->k = scratch(m, B * kvd * F, &failed);
    m->v = scratch(m, B * kvd * F, &failed);
    m->att = scratch(m, B * qd * F, &failed);
    m->tmp = scratch(m, B * E * F, &failed);
    m->rlogits = scratch(m, B * (size_t)c->n_expert * F, &failed);
    m->ids = scratch(m, B * K * sizeof(int32_t), &failed);
    m->weights = scratch(m, B * K * F, &failed);
    m->xe = scratch(m, B * E * F, &failed);
    m->ge = scratch(m, B * ff * F, &failed);
    m->ue = scratch(m, B * ff * F, &failed);
    m->de = scratch(m, B * E * F, &failed);
    m->slot_out = scratch(m, B * K * E * F, &failed);
    m->sh_tmp = scratch(m, B * F, &failed);
    m->pos = scratch(m, B * sizeof(int32_t), &failed);
    m->tok_by_expert = scratch(m, B * K * sizeof(int32_t), &failed);
    m->expert_count = scratch(m, (size_t)c->n_expert * sizeof(int32_t), &failed);
    m->expert_start = scratch(m, (size_t)c->n_expert * sizeof(int32_t), &failed);
    m->logits_tmp = scratch(m, (size_t)c->n_vocab * F, &failed);
    if (failed)
        return moe_diag_set(diag, -ENOMEM, "out of memory allocating scratch for %d tokens",
                            m->n_batch);
    /* Backend scratch: the largest activation row set of a matmul (f32 is the
     * widest format), and per worker one row of attention scores. */
    size_t widest = E > qd ? E : qd;
    if (ff > widest)
        widest = ff;
    size_t shared = B * widest * 4 + 4096;
    size_t per_worker = (size_t)m->n_ctx * F + (size_t)c->head_dim * 2 + 64;
    int rc = m->be->ops->reserve(m->be, shared, per_worker);
    if (rc)
        return moe_diag_set(diag, rc, "backend: cannot reserve %zu bytes of scratch", shared);
    return 0;
}

int moe_model_load(struct moe_model **out, const char *path, const struct moe_model_opts *opts,
                   struct moe_diag *diag)
{
    *out = NULL;
    struct moe_model_opts o = opts ? *opts : (struct moe_model_opts){ 0 };
    struct moe_model *m = moe_calloc(1, sizeof(*m));
    if (m == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    int rc = moe_gguf_open(&m->gguf, path, diag);
    if (rc)
        goto fail;
    if ((rc = read_cfg(m->gguf, &m->cfg, diag)))
        goto fail;
    struct moe_model_cfg *c = &m->cfg;
    if ((rc = moe_gguf_map(m->gguf, diag)))
        goto fail;
    if ((rc = moe_backend_cpu_create(&m->be, o.n_threads > 0 ? o.n_threads : n_online_cpus(), diag)))
        goto fail;

    /* Vocabulary size from the embedding matrix, which must exist. */
    const struct moe_gguf_tensor *te = moe_gguf_find_tensor(m->gguf, "token_embd.weight");
    if (te == NULL) {
        rc = moe_diag_set(diag, MOE_EFORMAT, "%s: missing tensor 'token_embd.weight'", path);
        goto fail;
    }
    if (te->n_dims != 2 || te->ne[0] != (uint64_t)c->n_embd || te->ne[1] > (1u << 24)) {
        rc = moe_diag_set(diag, MOE_EFORMAT, "%s: tensor 'token_embd.weight' has shape [%" PRIu64
                          ", %" PRIu64 "], expected [%d, n_vocab]", path, te->ne[0], te->ne[1],
                          c->n_embd);
        goto fail;
    }
    c->n_vocab = (int)te->ne[1];
    if ((rc = bind_matrix(m, "token_embd.weight", c->n_embd, c->n_vocab, true, &m->tok_embd, diag)) ||
        (rc = bind_vector(m, "output_norm.weight", c->n_embd, true, &m->output_norm, diag)) ||
        (rc = bind_matrix(m, "output.weight", c->n_embd, c->n_vocab, false, &m->output, diag)))
        goto fail;
    if (m->output.data == NULL)
        m->output = m->tok_embd; /* tied embeddings */
    m->layers = moe_calloc((size_t)c->n_layer, sizeof(struct layer));
    if (m->layers == NULL) {
        rc = moe_diag_set(diag, -ENOMEM, "out of memory");
        goto fail;
    }
    for (int il = 0; il < c->n_layer; il++)
        if ((rc = bind_layer(m, il, diag)))
            goto fail;

    m->n_ctx = o.n_ctx > 0 ? o.n_ctx : (c->n_ctx_train < 4096 ? c->n_ctx_train : 4096);
    if (m->n_ctx <= 0 || m->n_ctx > (1 << 20)) {
        rc = moe_diag_set(diag, -EINVAL, "context length %d, expected 1..1048576", m->n_ctx);
        goto fail;
    }
    m->n_batch = o.n_batch > 0 ? o.n_batch : 512;
    if (m->n_batch > m->n_ctx)
        m->n_batch = m->n_ctx;
    m->kv_f16 = o.kv_f16;
    if ((rc = alloc_scratch(m, diag)))
        goto fail;
    *out = m;
    return 0;
fail:
    moe_model_free(m);
    return rc;
}

void moe_model_free(struct moe_model *m)
{
    if (m == NULL)
        return;
    if (m->layers) {
        for (int il = 0; il < m->cfg.n_layer; il++) {
            struct layer *L = &m->layers[il];
            moe_free(L->attn_norm);
            moe_free(L->ffn_norm);
            moe_free(L->q_norm);
            moe_free(L->k_norm);
            moe_free(L->bq);
            moe_free(L->bk);
            moe_free(L->bv);
            moe_free(L->sh_gate_inp);
        }
        moe_free(m->layers);
    }
    moe_free(m->output_norm);
    void *bufs[] = { m->x, m->xn, m->q, m->k, m->v, m->att, m->tmp, m->rlogits, m->ids, m->weights,
                     m->xe, m->ge, m->ue, m->de, m->slot_out, m->sh_tmp, m->pos, m->tok_by_expert,
                     m->expert_count, m->expert_start, m->logits_tmp };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        moe_free(bufs[i]);
    moe_backend_destroy(m->be);
    moe_gguf_close(m->gguf);
    moe_free(m);
}

const struct moe_model_cfg *moe_model_cfg(const struct moe_model *m) { return &m->cfg; }
const struct moe_gguf *moe_model_gguf(const struct moe_model *m) { return m->gguf; }
int moe_model_n_ctx(const struct moe_model *m) { return m->n_ctx; }
int moe_model_n_batch(const struct moe_model *m) { return m->n_batch; }

/* ---- sequences ------------------------------------------------------- */

int moe_seq_create(struct moe_seq **out, struct moe_model *m, struct moe_diag *diag)
{
    *out = NULL;
    struct moe_seq *s = moe_calloc(1, sizeof(*s));
    if (s == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    s->m = m;
    const size_t kvd = (size_t)m->cfg.n_head_kv * m->cfg.head_dim;
    s->layer_bytes = (size_t)m->n_ctx * kvd * (m->kv_f16 ? 2 : 4);
    size_t total = s->layer_bytes * (size_t)m->cfg.n_layer;
    s->k_cache = m->be->ops->alloc(m->be, total);
    s->v_cache = m->be->ops->alloc(m->be, total);
    if (s->k_cache == NULL || s->v_cache == NULL) {
        moe_seq_free(s);
        return moe_diag_set(diag, -ENOMEM, "KV cache: cannot allocate 2 x %zu MiB", total >> 20);
    }
    *out = s;
    return 0;
}

void moe_seq_free(struct moe_seq *s)
{
    if (s == NULL)
        return;
    s->m->be->ops->free(s->m->be, s->k_cache);
    s->m->be->ops->free(s->m->be, s->v_cache);
    moe_free(s);
}

int moe_seq_pos(const struct moe_seq *s) { return s->pos; }
void moe_seq_reset(struct moe_seq *s) { s->pos = 0; }

/* ---- forward --------------------------------------------------------- */

static struct moe_weight expert_weight(const struct expert_tensor *t, int e)
{
    struct moe_weight w = {
        .data = t->data + (size_t)e * t->expert_bytes,
        .dtype = t->dtype,
        .n_in = t->n_in,
        .n_out = t->n_out,
        .row_bytes = t->row_bytes,
    };
    return w;
}

#define TRY(call) do { int rc_ = (call); if (rc_) return rc_; } while (0)

static int attention_block(struct moe_model *m, struct moe_seq *s, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->layers[il];
    const int hd = c->head_dim, kvd = c->n_head_kv * hd, qd = c->n_head * hd;

    TRY(ops->rmsnorm(be, m->xn, m->x, L->attn_norm, n, c->n_embd, c->rms_eps));
    TRY(ops->matmul(be, m->q, &L->wq, L->bq, m->xn, n));
    TRY(ops->matmul(be, m->k, &L->wk, L->bk, m->xn, n));
    TRY(ops->matmul(be, m->v, &L->wv, L->bv, m->xn, n));
    if (c->qk_norm) {
        TRY(ops->rmsnorm(be, m->q, m->q, L->q_norm, n * c->n_head, hd, c->rms_eps));
        TRY(ops->rmsnorm(be, m->k, m->k, L->k_norm, n * c->n_head_kv, hd, c->rms_eps));
    } else if (c->qk_norm_full) {
        TRY(ops->rmsnorm(be, m->q, m->q, L->q_norm, n, qd, c->rms_eps));
        TRY(ops->rmsnorm(be, m->k, m->k, L->k_norm, n, kvd, c->rms_eps));
    }
    TRY(ops->rope(be, m->q, n, c->n_head, hd, 0, m->pos, &c->rope));
    TRY(ops->rope(be, m->k, n, c->n_head_kv, hd, 0, m->pos, &c->rope));
    uint8_t *kc = (uint8_t *)s->k_cache + (size_t)il * s->layer_bytes;
    uint8_t *vc = (uint8_t *)s->v_cache + (size_t)il * s->layer_bytes;
    TRY(ops->kv_store(be, kc, m->k, n, m->pos, kvd, kvd, 0, m->kv_f16));
    TRY(ops->kv_store(be, vc, m->v, n, m->pos, kvd, kvd, 0, m->kv_f16));
    struct moe_attn_params ap = {
        .n_head = c->n_head, .n_head_kv = c->n_head_kv, .head_dim = hd, .head_dim_v = hd,
        .k_row = kvd, .v_row = kvd,
        .scale = 1.0f / sqrtf((float)hd), .kv_f16 = m->kv_f16,
        .k_cache = kc, .v_cache = vc,
    };
    TRY(ops->attention(be, m->att, m->q, n, m->pos, &ap));
    TRY(ops->matmul(be, m->tmp, &L->wo, NULL, m->att, n));
    TRY(ops->add(be, m->x, m->x, m->tmp, n * c->n_embd));
    return 0;
}

static int moe_block(struct moe_model *m, int il, int64_t n, int64_t tok0, moe_route_fn route,
                     void *ud)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->layers[il];
    const int K = c->n_expert_used, E = c->n_embd;

    TRY(ops->rmsnorm(be, m->xn, m->x, L->ffn_norm, n, E, c->rms_eps));
    TRY(ops->matmul(be, m->rlogits, &L->router, NULL, m->xn, n));
    TRY(ops->router_topk(be, m->rlogits, n, &c->gating, m->ids, m->weights));
    if (route)
        for (int64_t t = 0; t < n; t++)
            route(ud, tok0 + t, il, m->ids + t * K, m->weights + t * K, K);

    /* Group (token, slot) pairs by expert. */
    memset(m->expert_count, 0, (size_t)c->n_expert * sizeof(int32_t));
    for (int64_t i = 0; i < n * K; i++)
        m->expert_count[m->ids[i]]++;
    int32_t acc = 0;
    for (int e = 0; e < c->n_expert; e++) {
        m->expert_start[e] = acc;
        acc += m->expert_count[e];
        m->expert_count[e] = 0;
    }
    for (int64_t i = 0; i < n * K; i++) {
        int e = m->ids[i];
        m->tok_by_expert[m->expert_start[e] + m->expert_count[e]++] = (int32_t)i;
    }

    for (int e = 0; e < c->n_expert; e++) {
        const int cnt = m->expert_count[e];
        if (cnt == 0)
            continue;
        const int32_t *list = m->tok_by_expert + m->expert_start[e];
        for (int i = 0; i < cnt; i++)
            memcpy(m->xe + (size_t)i * E, m->xn + (size_t)(list[i] / K) * E, (size_t)E * sizeof(float));
        struct moe_weight wg = expert_weight(&L->gate, e), wu = expert_weight(&L->up, e);
        struct moe_weight wd = expert_weight(&L->down, e);
        TRY(ops->matmul(be, m->ge, &wg, NULL, m->xe, cnt));
        TRY(ops->matmul(be, m->ue, &wu, NULL, m->xe, cnt));
        TRY(ops->swiglu(be, m->ge, m->ge, m->ue, (int64_t)cnt * c->n_ff_exp));
        TRY(ops->matmul(be, m->de, &wd, NULL, m->ge, cnt));
        for (int i = 0; i < cnt; i++)
            memcpy(m->slot_out + (size_t)list[i] * E, m->de + (size_t)i * E, (size_t)E * sizeof(float));
    }

    /* moe_out = sum over slots of weight * expert output, then the residual. */
    for (int64_t t = 0; t < n; t++) {
        float *out = m->tmp + t * E;
        memset(out, 0, (size_t)E * sizeof(float));
        for (int k = 0; k < K; k++)
            TRY(ops->axpy(be, out, m->weights[t * K + k], m->slot_out + (size_t)(t * K + k) * E, E));
    }
    if (c->n_ff_shexp > 0) {
        struct moe_weight gi = {
            .data = L->sh_gate_inp, .dtype = MOE_DTYPE_F32, .n_in = E, .n_out = 1,
            .row_bytes = (size_t)E * sizeof(float),
        };
        TRY(ops->matmul(be, m->sh_tmp, &gi, NULL, m->xn, n));
        TRY(ops->matmul(be, m->ge, &L->sh_gate, NULL, m->xn, n));
        TRY(ops->matmul(be, m->ue, &L->sh_up, NULL, m->xn, n));
        TRY(ops->swiglu(be, m->ge, m->ge, m->ue, n * c->n_ff_shexp));
        TRY(ops->matmul(be, m->de, &L->sh_down, NULL, m->ge, n));
        for (int64_t t = 0; t < n; t++) {
            const float g = 1.0f / (1.0f + expf(-m->sh_tmp[t]));
            float *d = m->de + t * E;
            for (int i = 0; i < E; i++)
                d[i] *= g;
        }
        TRY(ops->add(be, m->tmp, m->tmp, m->de, n * E));
    }
    TRY(ops->add(be, m->x, m->x, m->tmp, n * E));
    return 0;
}

static int forward_batch(struct moe_model *m, struct moe_seq *s, const int32_t *tokens, int64_t n,
                         int64_t tok0, float *logits, bool all_logits, moe_route_fn route, void *ud)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    for (int64_t t = 0; t < n; t++)
        m->pos[t] = s->pos + (int32_t)t;
    TRY(ops->get_rows(be, m->x, &m->tok_embd, tokens, (int)n));
    for (int il = 0; il < c->n_layer; il++) {
        TRY(attention_block(m, s, il, n));
        TRY(moe_block(m, il, n, tok0, route, ud));
    }
    s->pos += (int)n;
    if (logits == NULL)
        return 0;
    if (all_logits) {
        TRY(ops->rmsnorm(be, m->xn, m->x, m->output_norm, n, c->n_embd, c->rms_eps));
        TRY(ops->matmul(be, logits + tok0 * c->n_vocab, &m->output, NULL, m->xn, n));
    } else {
        const float *last = m->x + (n - 1) * c->n_embd;
        TRY(ops->rmsnorm(be, m->xn, last, m->output_norm, 1, c->n_embd, c->rms_eps));
        TRY(ops->matmul(be, logits, &m->output, NULL, m->xn, 1));
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
        int rc = forward_batch(m, s, tokens + t0, nb, t0, lg, all_logits, route, route_ud);
        if (rc)
            return moe_diag_set(diag, rc, "forward at position %d: %s", s->pos, moe_strerror(rc));
    }
    return 0;
}

/* Loading a model: binding every tensor the architecture needs (shapes and
 * types checked, messages naming the tensor), uploading the weights where
 * the backend's memory is not host memory, scratch, freeing; and the
 * sequences' KV caches. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/buf.h"
#include "common/dtype.h"
#include "io/expert_src.h"
#include "io/file.h"
#include "io/gguf.h"
#include "io/pack.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cpu/threadpool.h"
#include "kernels/cuda.h"
#include "model/hparams.h"
#include "model/model-impl.h"
#include "model/options.h"

/* ---- tensor binding -------------------------------------------------- */

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

/* The backend must be able to multiply the weight type; say which tensor. */
static int check_computable(struct moe_model *m, const char *name, uint32_t dtype, struct moe_diag *diag)
{
    if (m->be->ops->supports(m->be, dtype))
        return 0;
    return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: tensor '%s' has type %s, which the %s backend"
                        " cannot compute", moe_gguf_path(m->gguf), name, moe_dtype_name(dtype),
                        m->be->ops->name);
}

/* Remembers a bound weight (the upload pass may move it to the backend). */
static int remember(struct moe_model *m, void **field, size_t bytes, struct moe_diag *diag)
{
    if (*field == NULL || bytes == 0)
        return 0;
    if (moe_array_grow((void **)&m->w.bound, &m->w.cap_bound, m->w.n_bound + 1, sizeof(struct bound), 0))
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    m->w.bound[m->w.n_bound++] = (struct bound){ .field = field, .bytes = bytes, .host = NULL };
    return 0;
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
    if ((rc = check_computable(m, name, t->dtype, diag)))
        return rc;
    w->data = moe_gguf_tensor_data(m->gguf, t);
    w->dtype = t->dtype;
    w->n_in = n_in;
    w->n_out = n_out;
    w->row_bytes = moe_dtype_row_bytes(t->dtype, (uint64_t)n_in, NULL);
    return remember(m, (void **)(void *)&w->data, w->row_bytes * (size_t)n_out, diag);
}

/* A slice of the cached experts' blob (cache mode): found by name in the
 * source's layout, shape checked like a tensor's. */
static const struct moe_expert_slice *find_slice(struct moe_model *m, const char *name, int n_dims,
                                                 const int64_t *ne, struct moe_diag *diag, int *rc)
{
    *rc = 0;
    const int layer = moe_tensor_layer(name);
    const struct moe_expert_layout *lay = layer >= 0 ? moe_expert_src_layout(m->ex.src, (uint32_t)layer) : NULL;
    for (uint32_t i = 0; lay && i < lay->n_slices; i++) {
        const struct moe_expert_slice *sl = &lay->s[i];
        if (strcmp(sl->name, name) != 0)
            continue;
        for (int d = 0; d < 4; d++)
            if ((int64_t)sl->ne[d] != (d < n_dims ? ne[d] : 1)) {
                *rc = moe_diag_set(diag, MOE_EFORMAT, "%s: expert tensor '%s' has slices of shape"
                                   " [%llu, %llu], expected [%lld, %lld]", moe_gguf_path(m->gguf), name,
                                   (unsigned long long)sl->ne[0], (unsigned long long)sl->ne[1],
                                   (long long)ne[0], (long long)(n_dims > 1 ? ne[1] : 1));
                return NULL;
            }
        return sl;
    }
    *rc = moe_diag_set(diag, MOE_EFORMAT, "%s: missing expert tensor '%s'", moe_gguf_path(m->gguf), name);
    return NULL;
}

static int bind_experts(struct moe_model *m, const char *name, int64_t n_in, int64_t n_out,
                        struct expert_tensor *e, struct moe_diag *diag)
{
    int rc;
    if (m->ex.src != NULL) {
        const int64_t ne[2] = { n_in, n_out };
        const struct moe_expert_slice *sl = find_slice(m, name, 2, ne, diag, &rc);
        if (sl == NULL)
            return rc;
        if ((rc = check_computable(m, name, sl->dtype, diag)))
            return rc;
        e->data = NULL;
        e->dtype = sl->dtype;
        e->n_in = n_in;
        e->n_out = n_out;
        e->row_bytes = moe_dtype_row_bytes(sl->dtype, (uint64_t)n_in, NULL);
        e->expert_bytes = sl->size;
        e->expert_stride = sl->size;
        e->slot_offset = sl->offset;
        e->host = NULL;
        if (!moe_expert_src_is_pack(m->ex.src)) {
            /* GGUF direct: the mapped tensor, which the CPU lane reads in
             * place (never uploaded: not remembered) */
            const int64_t ne3[3] = { n_in, n_out, m->cfg.n_expert };
            const struct moe_gguf_tensor *t = find_tensor(m->gguf, name, 3, ne3, true, diag, &rc);
            if (t == NULL)
                return rc;
            e->host = moe_gguf_tensor_data(m->gguf, t);
        }
        return 0;
    }
    const int64_t ne[3] = { n_in, n_out, m->cfg.n_expert };
    const struct moe_gguf_tensor *t = find_tensor(m->gguf, name, 3, ne, true, diag, &rc);
    if (t == NULL)
        return rc;
    if ((rc = check_computable(m, name, t->dtype, diag)))
        return rc;
    e->data = moe_gguf_tensor_data(m->gguf, t);
    e->dtype = t->dtype;
    e->n_in = n_in;
    e->n_out = n_out;
    e->row_bytes = moe_dtype_row_bytes(t->dtype, (uint64_t)n_in, NULL);
    e->expert_bytes = e->row_bytes * (size_t)n_out;
    e->expert_stride = e->expert_bytes;
    return remember(m, (void **)(void *)&e->data, e->expert_bytes * (size_t)m->cfg.n_expert, diag);
}

/* An expert's gate and up projections: ffn_gate_exps and ffn_up_exps, or
 * one merged ffn_gate_up_exps [n_embd, 2 n_ff, n_expert] (newer converters;
 * llama.cpp's build_moe_ffn takes rows 0..n_ff-1 as gate, n_ff.. as up).
 * Merged, gate and up are views of the one tensor or of the one slice of
 * an expert's blob: an expert stays one blob in the cache and the pack. */
static int bind_gate_up(struct moe_model *m, int il, int64_t n_in, int64_t n_ff,
                        struct expert_tensor *gate, struct expert_tensor *up, struct moe_diag *diag)
{
    char n[96];
    snprintf(n, sizeof(n), "blk.%d.ffn_gate_up_exps.weight", il);
    bool merged = false;
    if (m->ex.src != NULL) { /* a pack's dense section has no expert tensors: the layout */
        const struct moe_expert_layout *lay = moe_expert_src_layout(m->ex.src, (uint32_t)il);
        for (uint32_t i = 0; lay && i < lay->n_slices; i++)
            merged |= strcmp(lay->s[i].name, n) == 0;
    } else {
        merged = moe_gguf_find_tensor(m->gguf, n) != NULL;
    }
    if (!merged) {
        int rc;
        char u[96];
        snprintf(n, sizeof(n), "blk.%d.ffn_gate_exps.weight", il);
        snprintf(u, sizeof(u), "blk.%d.ffn_up_exps.weight", il);
        return (rc = bind_experts(m, n, n_in, n_ff, gate, diag)) ||
               (rc = bind_experts(m, u, n_in, n_ff, up, diag)) ? rc : 0;
    }
    if (m->cfg.ad->expert_bias)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: '%s' with expert biases (%s) is not"
                            " supported", moe_gguf_path(m->gguf), n, m->cfg.arch_name);
    int rc = bind_experts(m, n, n_in, 2 * n_ff, gate, diag);
    if (rc)
        return rc;
    const size_t half = gate->row_bytes * (size_t)n_ff;
    gate->n_out = n_ff;
    gate->expert_bytes = half;
    gate->expert_stride = 2 * half;
    *up = *gate;
    up->slot_offset = gate->slot_offset + half;
    if (gate->host != NULL)
        up->host = gate->host + half;
    if (gate->data == NULL)
        return 0; /* cache mode: views of the slice */
    up->data = gate->data + half;
    return remember(m, (void **)(void *)&up->data, 2 * half * (size_t)m->cfg.n_expert - half, diag);
}

/* Small F32-convertible tensors [n] or [n, n2] (norms, biases) are
 * converted to owned float arrays. */
static int bind_vector2(struct moe_model *m, const char *name, int64_t n, int64_t n2, float **out,
                        struct moe_diag *diag)
{
    int rc;
    *out = NULL;
    const int64_t ne[2] = { n, n2 };
    const struct moe_gguf_tensor *t = find_tensor(m->gguf, name, n2 > 1 ? 2 : 1, ne, true, diag, &rc);
    if (t == NULL)
        return rc;
    if (!moe_dequantize_supported(t->dtype))
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: tensor '%s' has type %s, expected F32",
                            moe_gguf_path(m->gguf), name, moe_dtype_name(t->dtype));
    float *v = moe_malloc((size_t)n * (size_t)n2 * sizeof(float));
    const size_t rb = moe_dtype_row_bytes(t->dtype, (uint64_t)n, NULL);
    /* read, not touched through the mapping: a page fault there reads
     * read_ahead_kb around these few KiB, the neighbouring experts' bytes
     * included, into the page cache */
    uint8_t *src = moe_malloc(rb * (size_t)n2);
    if (v == NULL || src == NULL) {
        moe_free(v);
        moe_free(src);
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    }
    if ((rc = moe_gguf_pread(m->gguf, t, 0, src, rb * (size_t)n2, diag))) {
        moe_free(v);
        moe_free(src);
        return rc;
    }
    for (int64_t r = 0; r < n2; r++)
        moe_dequantize_row(t->dtype, src + (size_t)r * rb, v + r * n, n);
    moe_free(src);
    *out = v;
    return remember(m, (void **)out, (size_t)n * (size_t)n2 * sizeof(float), diag);
}

static int bind_vector(struct moe_model *m, const char *name, int64_t n, bool required, float **out,
                       struct moe_diag *diag)
{
    *out = NULL;
    if (!required && moe_gguf_find_tensor(m->gguf, name) == NULL)
        return 0;
    return bind_vector2(m, name, n, 1, out, diag);
}

/* A 3-D tensor [n_in, n_out, n] as n matrices (MLA's per-head k_b, v_b). */
static int bind_stack(struct moe_model *m, const char *name, int64_t n_in, int64_t n_out, int n,
                      struct moe_weight *w, struct moe_diag *diag)
{
    struct expert_tensor t;
    const int64_t ne[3] = { n_in, n_out, n };
    int rc;
    const struct moe_gguf_tensor *gt = find_tensor(m->gguf, name, 3, ne, true, diag, &rc);
    if (gt == NULL)
        return rc;
    if ((rc = check_computable(m, name, gt->dtype, diag)))
        return rc;
    t.data = moe_gguf_tensor_data(m->gguf, gt);
    t.dtype = gt->dtype;
    t.n_in = n_in;
    t.n_out = n_out;
    t.row_bytes = moe_dtype_row_bytes(gt->dtype, (uint64_t)n_in, NULL);
    t.expert_bytes = t.row_bytes * (size_t)n_out;
    for (int i = 0; i < n; i++) {
        w[i].data = t.data + (size_t)i * t.expert_bytes;
        w[i].dtype = t.dtype;
        w[i].n_in = n_in;
        w[i].n_out = n_out;
        w[i].row_bytes = t.row_bytes;
        if ((rc = remember(m, (void **)(void *)&w[i].data, t.expert_bytes, diag)))
            return rc;
    }
    return 0;
}

/* A 2-D F32-convertible tensor [n, n_expert] as owned floats (expert biases). */
static int bind_expert_bias(struct moe_model *m, const char *name, int64_t n, float **out,
                            struct moe_diag *diag)
{
    return bind_vector2(m, name, n, m->cfg.n_expert, out, diag);
}

static int bind_attention(struct moe_model *m, int il, struct layer *L, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    /* this layer's dims and RoPE: the model's, or gemma4's per layer kind */
    L->hd = c->head_dim;
    L->n_kv = c->n_head_kv;
    L->rope = c->rope;
    if (c->ad->swa_pattern) {
        const bool swa = c->layer_swa[il] != 0;
        L->hd = swa ? c->head_dim_swa : c->head_dim_full;
        L->n_kv = c->layer_n_head_kv[il];
        if (swa) {
            L->rope.n_rot = c->n_rot_swa;
            L->rope.freq_base = c->rope_base_swa;
            L->rope.freq_scale = 1.0f;
        } else {
            L->rope.freq_factors = m->w.rope_freqs;
        }
    }
    const int64_t E = c->n_embd, hd = L->hd;
    const int64_t qd = (int64_t)c->n_head * hd, kvd = (int64_t)L->n_kv * hd;
    char n[96];
    int rc;
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d." s, il), n)
    if ((rc = bind_vector(m, NAME("attn_norm.weight"), E, true, &L->attn_norm, diag)))
        return rc;
    if (c->ad->mla) {
        const int64_t qk = c->qk_nope + c->qk_rope, H = c->n_head;
        if (c->q_lora_rank > 0) {
            if ((rc = bind_matrix(m, NAME("attn_q_a.weight"), E, c->q_lora_rank, true, &L->wq_a, diag)) ||
                (rc = bind_vector(m, NAME("attn_q_a_norm.weight"), c->q_lora_rank, true, &L->q_a_norm, diag)) ||
                (rc = bind_matrix(m, NAME("attn_q_b.weight"), c->q_lora_rank, H * qk, true, &L->wq_b, diag)))
                return rc;
        } else if ((rc = bind_matrix(m, NAME("attn_q.weight"), E, H * qk, true, &L->wq, diag))) {
            return rc;
        }
        return (rc = bind_matrix(m, NAME("attn_kv_a_mqa.weight"), E, c->kv_lora_rank + c->qk_rope, true,
                                 &L->wkv_a, diag)) ||
               (rc = bind_vector(m, NAME("attn_kv_a_norm.weight"), c->kv_lora_rank, true, &L->kv_a_norm, diag)) ||
               (rc = bind_stack(m, NAME("attn_k_b.weight"), c->qk_nope, c->kv_lora_rank, c->n_head, L->wk_b, diag)) ||
               (rc = bind_stack(m, NAME("attn_v_b.weight"), c->kv_lora_rank, c->v_head_dim, c->n_head, L->wv_b, diag)) ||
               (rc = bind_matrix(m, NAME("attn_output.weight"), H * c->v_head_dim, E, true, &L->wo, diag))
                   ? rc : 0;
    }
    if (c->ad->v_norm && moe_gguf_find_tensor(m->gguf, NAME("attn_qkv.weight")) != NULL)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: '%s' (fused q/k/v) is not supported for"
                            " %s", moe_gguf_path(m->gguf), n, c->arch_name);
    /* qwen35moe: per head the query and its output gate */
    const int64_t qrows = c->ad->attn_out_gate ? 2 * qd : qd;
    if ((rc = bind_matrix(m, NAME("attn_q.weight"), E, qrows, true, &L->wq, diag)) ||
        (rc = bind_matrix(m, NAME("attn_k.weight"), E, kvd, true, &L->wk, diag)) ||
        (rc = bind_matrix(m, NAME("attn_v.weight"), E, kvd, !c->ad->v_norm, &L->wv, diag)) ||
        (rc = bind_matrix(m, NAME("attn_output.weight"), qd, E, true, &L->wo, diag)))
        return rc;
    L->v_is_k = L->wv.data == NULL;   /* gemma4 without attn_v: V from K's projection */
    if (c->ad->sandwich_norms &&
        (rc = bind_vector(m, NAME("post_attention_norm.weight"), E, true, &L->attn_post_norm, diag)))
        return rc;
    if (c->ad->qkv_bias &&
        ((rc = bind_vector(m, NAME("attn_q.bias"), qd, true, &L->bq, diag)) ||
         (rc = bind_vector(m, NAME("attn_k.bias"), kvd, true, &L->bk, diag)) ||
         (rc = bind_vector(m, NAME("attn_v.bias"), kvd, true, &L->bv, diag))))
        return rc;
    if (c->ad->qkv_bias_optional &&
        ((rc = bind_vector(m, NAME("attn_q.bias"), qd, false, &L->bq, diag)) ||
         (rc = bind_vector(m, NAME("attn_k.bias"), kvd, false, &L->bk, diag)) ||
         (rc = bind_vector(m, NAME("attn_v.bias"), kvd, false, &L->bv, diag))))
        return rc;
    if (c->ad->qk_norm_optional &&
        ((rc = bind_vector(m, NAME("attn_q_norm.weight"), hd, false, &L->q_norm, diag)) ||
         (rc = bind_vector(m, NAME("attn_k_norm.weight"), hd, false, &L->k_norm, diag))))
        return rc;
    if (c->ad->attn_out_bias && (rc = bind_vector(m, NAME("attn_output.bias"), E, true, &L->bo, diag)))
        return rc;
    if (c->ad->sinks && (rc = bind_vector(m, NAME("attn_sinks.weight"), c->n_head, true, &L->sinks, diag)))
        return rc;
    if (c->ad->qk_norm &&
        ((rc = bind_vector(m, NAME("attn_q_norm.weight"), hd, true, &L->q_norm, diag)) ||
         (rc = bind_vector(m, NAME("attn_k_norm.weight"), hd, true, &L->k_norm, diag))))
        return rc;
    if (c->ad->qk_norm_full &&
        ((rc = bind_vector(m, NAME("attn_q_norm.weight"), qd, true, &L->q_norm, diag)) ||
         (rc = bind_vector(m, NAME("attn_k_norm.weight"), kvd, true, &L->k_norm, diag))))
        return rc;
    /* llama.cpp's gpt-oss pattern: even layers use the sliding window;
     * gemma4's: the layers attention.sliding_window_pattern marks */
    if (c->ad->swa_pattern)
        L->window = c->layer_swa[il] ? c->swa_window : 0;
    else
        L->window = c->swa_window > 0 && il % 2 == 0 ? c->swa_window : 0;
#undef NAME
    return 0;
}

/* gemma4's FFN: the dense MLP in every layer with post_ffw_norm; a layer
 * with a router adds the experts and the MoE branch's norms and scales. */
static int bind_ffn_beside(struct moe_model *m, int il, struct layer *L, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const int64_t E = c->n_embd;
    char n[96];
    int rc;
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d." s, il), n)
    if ((rc = bind_matrix(m, NAME("ffn_gate.weight"), E, c->n_ff, true, &L->ffn_gate, diag)) ||
        (rc = bind_matrix(m, NAME("ffn_up.weight"), E, c->n_ff, true, &L->ffn_up, diag)) ||
        (rc = bind_matrix(m, NAME("ffn_down.weight"), c->n_ff, E, true, &L->ffn_down, diag)) ||
        (rc = bind_vector(m, NAME("post_ffw_norm.weight"), E, true, &L->ffn_post_norm, diag)) ||
        (rc = bind_vector(m, NAME("layer_output_scale.weight"), 1, false, &L->out_scale, diag)))
        return rc;
    L->moe = moe_gguf_find_tensor(m->gguf, NAME("ffn_gate_inp.weight")) != NULL;
    if (!L->moe)
        return 0;
    if ((rc = bind_matrix(m, NAME("ffn_gate_inp.weight"), E, c->n_expert, true, &L->router, diag)) ||
        (rc = bind_vector(m, NAME("ffn_gate_inp.scale"), E, true, &L->router_scale, diag)) ||
        (rc = bind_vector(m, NAME("pre_ffw_norm_2.weight"), E, true, &L->ffn_pre_norm_2, diag)) ||
        (rc = bind_vector(m, NAME("post_ffw_norm_1.weight"), E, true, &L->ffn_post_norm_1, diag)) ||
        (rc = bind_vector(m, NAME("post_ffw_norm_2.weight"), E, true, &L->ffn_post_norm_2, diag)) ||
        (rc = bind_gate_up(m, il, E, c->n_ff_exp, &L->gate, &L->up, diag)) ||
        (rc = bind_experts(m, NAME("ffn_down_exps.weight"), c->n_ff_exp, E, &L->down, diag)) ||
        (rc = bind_vector(m, NAME("ffn_down_exps.scale"), c->n_expert, false, &L->down_scale, diag)))
        return rc;
    L->bias_off = (struct bias_slices){ -1, -1, -1 };
#undef NAME
    return 0;
}

/* A gated delta-net layer (qwen35moe), as llama.cpp's loader shapes it:
 * attn_qkv [n_embd, conv_dim] (conv_dim = 2 key_dim + d_inner), attn_gate
 * [n_embd, d_inner], ssm_conv1d [d_conv, conv_dim], ssm_dt.bias and ssm_a
 * [n_v], ssm_beta and ssm_alpha [n_embd, n_v], ssm_norm [d_state], ssm_out
 * [d_inner, n_embd]. */
static int bind_deltanet(struct moe_model *m, int il, struct layer *L, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const int64_t E = c->n_embd, nv = c->ssm_n_v, ds = c->ssm_d_state;
    const int64_t d_inner = nv * ds, conv_dim = 2 * (int64_t)c->ssm_n_k * ds + d_inner;
    char n[96];
    int rc;
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d." s, il), n)
    return (rc = bind_vector(m, NAME("attn_norm.weight"), E, true, &L->attn_norm, diag)) ||
           (rc = bind_matrix(m, NAME("attn_qkv.weight"), E, conv_dim, true, &L->ssm_qkv, diag)) ||
           (rc = bind_matrix(m, NAME("attn_gate.weight"), E, d_inner, true, &L->ssm_z, diag)) ||
           (rc = bind_vector2(m, NAME("ssm_conv1d.weight"), c->ssm_d_conv, conv_dim, &L->ssm_conv,
                              diag)) ||
           (rc = bind_vector(m, NAME("ssm_dt.bias"), nv, true, &L->ssm_dt, diag)) ||
           (rc = bind_vector(m, NAME("ssm_a"), nv, true, &L->ssm_a, diag)) ||
           (rc = bind_matrix(m, NAME("ssm_beta.weight"), E, nv, true, &L->ssm_beta, diag)) ||
           (rc = bind_matrix(m, NAME("ssm_alpha.weight"), E, nv, true, &L->ssm_alpha, diag)) ||
           (rc = bind_vector(m, NAME("ssm_norm.weight"), ds, true, &L->ssm_norm, diag)) ||
           (rc = bind_matrix(m, NAME("ssm_out.weight"), d_inner, E, true, &L->ssm_out, diag))
               ? rc : 0;
#undef NAME
}

static int bind_layer(struct moe_model *m, int il, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    struct layer *L = &m->w.layers[il];
    const int64_t E = c->n_embd;
    char n[96];
    int rc;
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d." s, il), n)
    L->recurrent = moe_model_cfg_recurrent(c, il);
    L->kv_slot = il;   /* only attention layers have K/V rows */
    for (int j = 0; j < il; j++)
        L->kv_slot -= moe_model_cfg_recurrent(c, j);
    if ((rc = L->recurrent ? bind_deltanet(m, il, L, diag) : bind_attention(m, il, L, diag)))
        return rc;
    /* gpt-oss names its FFN norm post_attention_norm */
    char norm[96];
    snprintf(norm, sizeof(norm), "blk.%d.%s.weight", il, c->ad->ffn_norm);
    if ((rc = bind_vector(m, norm, E, true, &L->ffn_norm, diag)))
        return rc;
    if (c->ad->dense_beside_moe)
        return bind_ffn_beside(m, il, L, diag);
    L->moe = il >= c->n_layer_dense_lead;
    if (!L->moe)
        return (rc = bind_matrix(m, NAME("ffn_gate.weight"), E, c->n_ff, true, &L->ffn_gate, diag)) ||
               (rc = bind_matrix(m, NAME("ffn_up.weight"), E, c->n_ff, true, &L->ffn_up, diag)) ||
               (rc = bind_matrix(m, NAME("ffn_down.weight"), c->n_ff, E, true, &L->ffn_down, diag))
                   ? rc : 0;
    if ((rc = bind_matrix(m, NAME("ffn_gate_inp.weight"), E, c->n_expert, true, &L->router, diag)) ||
        (rc = bind_gate_up(m, il, E, c->n_ff_exp, &L->gate, &L->up, diag)) ||
        (rc = bind_experts(m, NAME("ffn_down_exps.weight"), c->n_ff_exp, E, &L->down, diag)))
        return rc;
    if (((c->ad->gating_from_keys && c->gating.func == MOE_GATING_SIGMOID) || c->ad->sel_bias) &&
        (rc = bind_vector(m, NAME("exp_probs_b.bias"), c->n_expert, true, &L->sel_bias, diag)))
        return rc;
    L->bias_off = (struct bias_slices){ -1, -1, -1 };
    if (c->ad->router_bias &&
        (rc = bind_vector(m, NAME("ffn_gate_inp.bias"), c->n_expert, true, &L->router_bias, diag)))
        return rc;
    if (c->ad->expert_bias && m->ex.src != NULL) {
        const char *names[3] = { "ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias" };
        int64_t *offs[3] = { &L->bias_off.gate, &L->bias_off.up, &L->bias_off.down };
        const int64_t lens[3] = { c->n_ff_exp, c->n_ff_exp, E };
        for (int b = 0; b < 3; b++) {
            char bn[96];
            snprintf(bn, sizeof(bn), "blk.%d.%s", il, names[b]);
            const struct moe_expert_slice *sl = find_slice(m, bn, 1, &lens[b], diag, &rc);
            if (sl == NULL)
                return rc;
            if (sl->dtype != MOE_DTYPE_F32)
                return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: '%s' has type %s, expected F32",
                                    moe_gguf_path(m->gguf), bn, moe_dtype_name(sl->dtype));
            *offs[b] = (int64_t)sl->offset;
        }
    } else if (c->ad->expert_bias &&
        ((rc = bind_expert_bias(m, NAME("ffn_gate_exps.bias"), c->n_ff_exp, &L->gate_b, diag)) ||
         (rc = bind_expert_bias(m, NAME("ffn_up_exps.bias"), c->n_ff_exp, &L->up_b, diag)) ||
         (rc = bind_expert_bias(m, NAME("ffn_down_exps.bias"), E, &L->down_b, diag))))
        return rc;
    if (c->n_ff_shexp > 0 &&
        ((c->ad->shexp_gated &&
          (rc = bind_vector(m, NAME("ffn_gate_inp_shexp.weight"), E, true, &L->sh_gate_inp, diag))) ||
         (rc = bind_matrix(m, NAME("ffn_gate_shexp.weight"), E, c->n_ff_shexp, true, &L->sh_gate, diag)) ||
         (rc = bind_matrix(m, NAME("ffn_up_shexp.weight"), E, c->n_ff_shexp, true, &L->sh_up, diag)) ||
         (rc = bind_matrix(m, NAME("ffn_down_shexp.weight"), c->n_ff_shexp, E, true, &L->sh_down, diag))))
        return rc;
#undef NAME
    return 0;
}

/* Host bookkeeping (ids, positions, lists). */
static void *scratch(struct moe_model *m, size_t bytes, int *failed)
{
    void *p = moe_calloc(1, bytes ? bytes : 1);
    if (p == NULL)
        *failed = 1;
    (void)m;
    return p;
}

/* Activations: backend memory (device memory on a GPU backend). */
static void *bscratch(struct moe_model *m, size_t bytes, int *failed)
{
    void *p = m->be->ops->alloc(m->be, bytes ? bytes : 1);
    if (p == NULL)
        *failed = 1;
    return p;
}


static int alloc_scratch(struct moe_model *m, struct moe_diag *diag)
{
    struct model_act_item items[MODEL_ACT_ITEMS];
    size_t shared, per_worker;
    const int n = moe_model_acts_layout(&m->cfg, m->n_batch, m->n_ctx, &m->a, items, &shared,
                                        &per_worker);
    int failed = 0;
    for (int i = 0; i < n; i++)
        *items[i].field = items[i].host ? scratch(m, items[i].bytes, &failed)
                                        : bscratch(m, items[i].bytes, &failed);
    if (failed)
        return moe_diag_set(diag, -ENOMEM, "out of memory allocating scratch for %d tokens",
                            m->n_batch);
    int rc = m->be->ops->reserve(m->be, shared, per_worker);
    if (rc)
        return moe_diag_set(diag, rc, "backend: cannot reserve %zu bytes of scratch", shared);
    return 0;
}

/* The paged KV pool: the plan's blocks, K and V rows of every layer in
 * backend memory, and the bookkeeping. */
static int alloc_kv(struct moe_model *m, const struct moe_model_opts *o, struct moe_diag *diag)
{
    const struct moe_model_plan *p = &m->plan;
    const size_t rows = (size_t)p->kv_blocks * (size_t)p->kv_block;
    m->kv.block = p->kv_block;
    /* a recurrent state cannot be taken from cached KV blocks (doc/engine.md) */
    m->kv.prefix_cache = o->prefix_cache && !m->cfg.deltanet;
    m->kv.k_layer = rows * moe_kv_row_bytes(m->kv_type, m->cfg.k_row);
    m->kv.v_layer = rows * moe_kv_row_bytes(m->kv_type, m->cfg.v_row);
    const size_t kt = m->kv.k_layer * (size_t)m->cfg.n_kv_layers,
                 vt = m->kv.v_layer * (size_t)m->cfg.n_kv_layers;
    MOE_ASSERT(kt + vt == p->kv_bytes);   /* the plan's KV term is this */
    int rc = moe_kv_pool_create(&m->kv.pool, p->kv_blocks, p->kv_block);
    if (rc)
        return moe_diag_set(diag, rc, "KV pool of %d blocks: %s", p->kv_blocks, moe_strerror(rc));
    m->kv.k = m->be->ops->alloc(m->be, kt);
    m->kv.v = vt ? m->be->ops->alloc(m->be, vt) : NULL;
    if (m->kv.k == NULL || (vt && m->kv.v == NULL))
        return moe_diag_set(diag, -ENOMEM, "KV pool: cannot allocate %.1f + %.1f MiB in %s memory"
                            " (%d blocks of %d tokens)", (double)kt / 1048576.0,
                            (double)vt / 1048576.0, m->be->ops->name, p->kv_blocks, p->kv_block);
    return 0;
}

/* Moves every bound weight into backend memory (a GPU backend; or the CPU
 * backend when asked, which tests this path). What the host reads stays
 * there: the deepseek selection bias (the router's top-k runs on the host),
 * gemma4's per-expert down scales and layer output scale (scalars of the
 * scale op) and rope_freqs (the rope op's divisors are host memory). */
static int upload_weights(struct moe_model *m, const struct moe_model_opts *o, struct moe_diag *diag)
{
    if (!m->w.upload)
        return 0;
    size_t total = 0;
    for (size_t i = 0; i < m->w.n_bound; i++) {
        struct bound *b = &m->w.bound[i];
        bool host_only = false;
        for (int il = 0; il < m->cfg.n_layer; il++)
            host_only |= b->field == (void **)&m->w.layers[il].sel_bias ||
                         b->field == (void **)&m->w.layers[il].down_scale ||
                         b->field == (void **)&m->w.layers[il].out_scale;
        host_only |= b->field == (void **)&m->w.rope_freqs;
        if (host_only)
            continue;
        void *d = m->be->ops->alloc(m->be, b->bytes);
        if (d == NULL)
            return moe_diag_set(diag, -ENOMEM, "weights: cannot allocate %zu MiB more in %s memory"
                                " (%zu MiB uploaded so far)", b->bytes >> 20, m->be->ops->name,
                                total >> 20);
        int rc = m->be->ops->upload(m->be, d, *b->field, b->bytes);
        b->host = *b->field;
        *b->field = d;
        if (rc)
            return moe_diag_set(diag, rc, "weights: upload of %zu bytes failed", b->bytes);
        total += b->bytes;
        if (o->progress && (i % 16 == 15 || i + 1 == m->w.n_bound))
            o->progress(o->progress_ud, "uploading", (double)(i + 1) / (double)m->w.n_bound);
    }
    return 0;
}

/* The plan's dense_copied: every bound weight still in the file's mapping
 * is read into backend (anonymous host) memory, then the page cache behind
 * the mapping is given back. With an expert cache the cache fills the
 * memory budget, and mapped weights are page cache the kernel may reclaim
 * at the limit: each refault of a dense page then waited behind the expert
 * reads and read read_ahead_kb around it, experts' bytes included, which
 * pushed out more (issue 18: GGUF-direct prefill under a cgroup limit).
 * Anonymous memory is not reclaimed without swap. */
static int copy_dense(struct moe_model *m, struct moe_diag *diag)
{
    size_t total = 0;
    for (size_t i = 0; i < m->w.n_bound; i++) {
        struct bound *b = &m->w.bound[i];
        if (b->host != NULL || !moe_gguf_maps(m->gguf, *b->field, b->bytes))
            continue;   /* already a copy (norms dequantized at bind time) */
        void *d = m->be->ops->alloc(m->be, b->bytes);
        if (d == NULL)
            return moe_diag_set(diag, -ENOMEM, "weights: cannot allocate %zu MiB more for the dense"
                                " weights (%zu MiB copied so far)", b->bytes >> 20, total >> 20);
        int rc = moe_gguf_read_mapped(m->gguf, *b->field, b->bytes, d, diag);
        b->host = *b->field;
        *b->field = d;
        if (rc)
            return rc;
        total += b->bytes;
    }
    const struct moe_pack *pk = m->ex.src ? moe_expert_src_pack(m->ex.src) : NULL;
    if (pk)
        moe_pack_drop_cache(pk);
    else
        moe_gguf_drop_cache(m->gguf);
    return 0;
}

/* The plan of what this load opened (the same terms moe_model_plan() gives
 * for the path); context, batch and cache sizes come from it. */
static int plan_loaded(struct moe_model *m, const struct moe_model_opts *o, bool is_pack,
                       struct moe_diag *diag)
{
    struct moe_model_plan *p = &m->plan;
    struct moe_hparams hp;
    struct moe_sizes sz;
    int rc = moe_hparams_load(&hp, m->gguf, diag);
    if (rc)
        return rc;
    moe_sizes_compute(&sz, m->gguf, &hp);
    p->pack = is_pack;
    p->dense_bytes = sz.dense_bytes;
    p->expert_cache = m->ex.src != NULL;
    if ((rc = moe_model_plan_opts(&m->cfg, o, p, diag)))
        return rc;
    size_t slot = 0;
    int n_moe = 0;
    bool all_direct = false;
    if (m->ex.src != NULL)
        moe_model_slot_of_src(m->ex.src, &slot, &n_moe, &p->lazy_stages);
    else if ((rc = moe_model_slot_of_gguf(m->gguf, &slot, &n_moe, &all_direct, diag)))
        return rc;
    if ((rc = moe_model_plan_cache(o, slot, n_moe, p, diag)))
        return rc;
    m->n_ctx = p->n_ctx;
    m->n_batch = p->n_batch;
    m->kv_type = p->kv_type;
    m->kv_dtype = moe_kv_dtype(p->kv_type);
    return 0;
}

int moe_model_load(struct moe_model **out, const char *path, const struct moe_model_opts *opts,
                   struct moe_diag *diag)
{
    *out = NULL;
    struct moe_model_opts o = opts ? *opts : (struct moe_model_opts){ 0 };
    /* the plan resolves what the options leave to it (the expert cache's
     * size without a budget); loading then follows it exactly */
    struct moe_model_plan pre;
    int rc = moe_model_plan(path, &o, &pre, diag);
    if (rc)
        return rc;
    o = pre.opts;
    struct moe_model *m = moe_calloc(1, sizeof(*m));
    if (m == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    /* A pack (or a GGUF with a cache budget) goes through an expert source;
     * its GGUF view holds the metadata and dense tensors. */
    enum moe_file_kind kind = MOE_FILE_UNKNOWN;
    if ((rc = moe_file_probe(path, &kind, diag)))
        goto fail;
    const bool is_pack = kind == MOE_FILE_PACK;
    if (is_pack || o.cache_bytes > 0 || o.cache_experts > 0) {
        struct moe_io_config io = { .uring = { .force_pread = o.force_pread } };
        if ((rc = moe_expert_src_open(&m->ex.src, path, &io, diag)))
            goto fail;
        m->gguf = (struct moe_gguf *)moe_expert_src_gguf(m->ex.src); /* borrowed; map() is idempotent */
    } else if ((rc = moe_gguf_open(&m->gguf, path, diag))) {
        goto fail;
    }
    if ((rc = moe_model_read_cfg(m->gguf, &m->cfg, diag)))
        goto fail;
    struct moe_model_cfg *c = &m->cfg;
    if ((rc = plan_loaded(m, &o, is_pack, diag)))
        goto fail;
    /* what only the header-time plan knows: the budgets and the reasons */
    m->plan.host_budget = pre.host_budget;
    m->plan.device_budget = pre.device_budget;
    m->plan.auto_sized = pre.auto_sized;
    memcpy(m->plan.host_why, pre.host_why, sizeof(pre.host_why));
    memcpy(m->plan.cache_why, pre.cache_why, sizeof(pre.cache_why));
    memcpy(m->plan.prefetch_why, pre.prefetch_why, sizeof(pre.prefetch_why));
    m->plan.opts = o;
    if ((rc = moe_gguf_map(m->gguf, diag)))
        goto fail;
    if (o.backend == MOE_BACKEND_CUDA)
        rc = moe_backend_cuda_create(&m->be, 0, diag);
    else
        rc = moe_backend_cpu_create(&m->be, o.n_threads > 0 ? o.n_threads : moe_threadpool_default_threads(), diag);
    if (rc)
        goto fail;
    if (c->deltanet && (m->be->ops->ssm_conv == NULL || m->be->ops->gated_delta_net == NULL)) {
        rc = moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: architecture '%s' (gated delta-net layers)"
                          " needs the ssm_conv and gated_delta_net ops that the %s backend does not"
                          " have (doc/%s.md); use the cpu backend", path, c->arch_name,
                          m->be->ops->name, m->be->ops->name);
        goto fail;
    }
    if (!m->be->ops->kv_supports(m->be, m->kv_dtype)) {
        rc = moe_diag_set(diag, MOE_EUNSUPPORTED, "kv_type %s: the %s backend cannot hold a KV cache"
                          " of this type yet (doc/%s.md); use f16", moe_kv_type_name(m->kv_type),
                          m->be->ops->name, m->be->ops->name);
        goto fail;
    }

    if ((rc = bind_matrix(m, "token_embd.weight", c->n_embd, c->n_vocab, true, &m->w.tok_embd, diag)) ||
        (rc = bind_vector(m, "output_norm.weight", c->n_embd, true, &m->w.output_norm, diag)) ||
        (rc = bind_matrix(m, "output.weight", c->n_embd, c->n_vocab, false, &m->w.output, diag)))
        goto fail;
    if (c->ad->gelu || c->ad->dense_beside_moe || c->ad->embd_scale) {
        /* ops only some backends have (kernels/backend.h): refused, not guessed */
        const struct moe_backend_ops *bo = m->be->ops;
        if (bo->geglu == NULL || bo->scale == NULL || bo->mul_rows == NULL) {
            rc = moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: architecture '%s' needs GELU, scale and"
                              " row-multiply ops that the %s backend does not have yet (doc/%s.md);"
                              " use the cpu backend", path, c->arch_name, bo->name, bo->name);
            goto fail;
        }
    }
    if (c->ad->swa_pattern) {
        bool global = false;
        for (int il = 0; il < c->n_layer; il++)
            global |= c->layer_swa[il] == 0;
        if (global && (rc = bind_vector(m, "rope_freqs.weight", c->head_dim_full / 2, true,
                                        &m->w.rope_freqs, diag)))
            goto fail;
    }
    const bool tied = m->w.output.data == NULL;
    if (tied)
        m->w.output = m->w.tok_embd; /* tied embeddings */
    m->w.layers = moe_calloc((size_t)c->n_layer, sizeof(struct layer));
    if (m->w.layers == NULL) {
        rc = moe_diag_set(diag, -ENOMEM, "out of memory");
        goto fail;
    }
    for (int il = 0; il < c->n_layer; il++) {
        if ((rc = bind_layer(m, il, diag)))
            goto fail;
        if (o.progress)
            o.progress(o.progress_ud, "binding", (double)(il + 1) / c->n_layer);
    }

    /* before the expert cache commits its pool: the page cache the binding
     * read is given back first */
    if (m->plan.dense_copied && (rc = copy_dense(m, diag)))
        goto fail;
    if (m->ex.src != NULL && (rc = moe_model_experts_create(m, &o, diag)))
        goto fail;
    if (m->ex.cache != NULL && o.warm_start)
        moe_model_warm_load(m, path);
    m->w.upload = !m->be->ops->host_memory || o.upload_weights;
    /* resident weights read straight from the mapping: map them now, not
     * in the first request's forward pass (best effort) */
    if (m->ex.src == NULL && !m->w.upload)
        (void)moe_gguf_populate(m->gguf);
    if ((rc = upload_weights(m, &o, diag)))
        goto fail;
    if (tied)
        m->w.output = m->w.tok_embd;
    if ((rc = alloc_scratch(m, diag)) || (rc = alloc_kv(m, &o, diag)) ||
        (rc = moe_deltanet_init(m, diag)))
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
    /* uploaded weights: free the backend copies, restore the host pointers */
    for (size_t i = 0; i < m->w.n_bound; i++)
        if (m->w.bound[i].host) {
            m->be->ops->free(m->be, *m->w.bound[i].field);
            *m->w.bound[i].field = m->w.bound[i].host;
        }
    moe_free(m->w.bound);
    if (m->w.layers) {
        for (int il = 0; il < m->cfg.n_layer; il++) {
            struct layer *L = &m->w.layers[il];
            moe_free(L->attn_norm);
            moe_free(L->ffn_norm);
            moe_free(L->q_norm);
            moe_free(L->k_norm);
            moe_free(L->bq);
            moe_free(L->bk);
            moe_free(L->bv);
            moe_free(L->sh_gate_inp);
            moe_free(L->bo);
            moe_free(L->sinks);
            moe_free(L->q_a_norm);
            moe_free(L->kv_a_norm);
            moe_free(L->router_bias);
            moe_free(L->sel_bias);
            moe_free(L->gate_b);
            moe_free(L->up_b);
            moe_free(L->down_b);
            moe_free(L->ssm_conv);
            moe_free(L->ssm_dt);
            moe_free(L->ssm_a);
            moe_free(L->ssm_norm);
            moe_free(L->attn_post_norm);
            moe_free(L->ffn_post_norm);
            moe_free(L->ffn_post_norm_1);
            moe_free(L->ffn_pre_norm_2);
            moe_free(L->ffn_post_norm_2);
            moe_free(L->router_scale);
            moe_free(L->down_scale);
            moe_free(L->out_scale);
        }
        moe_free(m->w.layers);
    }
    moe_free(m->w.output_norm);
    moe_free(m->w.rope_freqs);
    if (m->cfg.ad != NULL) {
        struct model_act_item items[MODEL_ACT_ITEMS];
        size_t shared, per_worker;
        const int n = moe_model_acts_layout(&m->cfg, m->n_batch, m->n_ctx, &m->a, items, &shared,
                                            &per_worker);
        for (int i = 0; i < n; i++) {
            if (items[i].host)
                moe_free(*items[i].field);
            else if (*items[i].field && m->be)
                m->be->ops->free(m->be, *items[i].field);
        }
    }
    if (m->be) {
        if (m->kv.k)
            m->be->ops->free(m->be, m->kv.k);
        if (m->kv.v)
            m->be->ops->free(m->be, m->kv.v);
    }
    moe_kv_pool_destroy(m->kv.pool);
    moe_deltanet_free(m);
    moe_model_experts_free(m);   /* waits for loads before the backend goes */
    moe_backend_destroy(m->be);
    if (m->ex.src)
        moe_expert_src_close(m->ex.src); /* owns the GGUF view */
    else
        moe_gguf_close(m->gguf);
    moe_free(m);
}

const struct moe_model_cfg *moe_model_cfg(const struct moe_model *m) { return &m->cfg; }
const struct moe_gguf *moe_model_gguf(const struct moe_model *m) { return m->gguf; }
int moe_model_n_ctx(const struct moe_model *m) { return m->n_ctx; }
int moe_model_n_batch(const struct moe_model *m) { return m->n_batch; }
const struct moe_model_plan *moe_model_plan_of(const struct moe_model *m) { return &m->plan; }

/* ---- sequences ------------------------------------------------------- */

/* ---- sequences ------------------------------------------------------- */

int moe_seq_create(struct moe_seq **out, struct moe_model *m, struct moe_diag *diag)
{
    *out = NULL;
    struct moe_seq *s = moe_calloc(1, sizeof(*s));
    if (s == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    s->m = m;
    s->max_blocks = (m->n_ctx + m->kv.block - 1) / m->kv.block;
    s->blocks = moe_calloc((size_t)s->max_blocks, sizeof(int32_t));
    s->hashes = moe_calloc((size_t)s->max_blocks, sizeof(uint64_t));
    s->toks = moe_calloc((size_t)m->n_ctx, sizeof(int32_t));
    /* the recurrent state is backend memory (the delta-net ops read it);
     * forward zeroes it at position 0 */
    const size_t rs = moe_deltanet_state_floats(m);
    s->rs = rs ? m->be->ops->alloc(m->be, rs * sizeof(float)) : NULL;
    if (s->blocks == NULL || s->hashes == NULL || s->toks == NULL || (rs && s->rs == NULL)) {
        moe_seq_free(s);
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    }
    *out = s;
    return 0;
}

void moe_seq_free(struct moe_seq *s)
{
    if (s == NULL)
        return;
    if (s->blocks)
        moe_seq_reset(s);
    moe_free(s->blocks);
    moe_free(s->hashes);
    moe_free(s->toks);
    if (s->rs != NULL)
        s->m->be->ops->free(s->m->be, s->rs);
    moe_free(s);
}

int moe_seq_pos(const struct moe_seq *s) { return s->pos; }

void moe_seq_reset(struct moe_seq *s)
{
    struct moe_kv_pool *p = s->m->kv.pool;
    for (int b = 0; b < s->n_blocks; b++)
        moe_kv_pool_unref(p, s->blocks[b]);
    moe_kv_pool_reserve(p, -s->reserved);
    s->n_blocks = s->reserved = s->n_hashed = 0;
    s->pos = 0;
}

int moe_seq_grow(struct moe_seq *s, int end, struct moe_diag *diag)
{
    struct moe_model *m = s->m;
    const int need = (end + m->kv.block - 1) / m->kv.block;
    MOE_ASSERT(need <= s->max_blocks);
    while (s->n_blocks < need) {
        const bool res = s->reserved > 0;
        const int id = moe_kv_pool_alloc(m->kv.pool, res);
        if (id < 0) {
            struct moe_kv_stats st;
            moe_kv_pool_stats(m->kv.pool, &st);
            return moe_diag_set(diag, MOE_ELIMIT, "KV pool: no block left for position %d (%d blocks"
                                " of %d tokens: %d in use, %d reserved by other sequences; raise"
                                " kv_size)", s->n_blocks * m->kv.block, st.n_blocks, st.block_tokens,
                                st.used, st.reserved);
        }
        s->reserved -= res;
        s->blocks[s->n_blocks++] = id;
    }
    return 0;
}

void moe_seq_publish(struct moe_seq *s)
{
    struct moe_model *m = s->m;
    const int bt = m->kv.block;
    for (; (s->n_hashed + 1) * bt <= s->pos; s->n_hashed++) {
        const int b = s->n_hashed;
        const uint64_t parent = b ? s->hashes[b - 1] : 0;
        s->hashes[b] = moe_kv_chain_hash(parent, s->toks + (size_t)b * (size_t)bt, bt);
        /* a block reused from the index is indexed already */
        if (m->kv.prefix_cache && moe_kv_pool_lookup(m->kv.pool, s->hashes[b], parent,
                                                     s->toks + (size_t)b * (size_t)bt) < 0)
            moe_kv_pool_publish(m->kv.pool, s->blocks[b], s->hashes[b], parent,
                                s->toks + (size_t)b * (size_t)bt);
    }
}

int moe_seq_begin(struct moe_seq *s, const int32_t *prompt, int n, int n_total, int *cached,
                  struct moe_diag *diag)
{
    struct moe_model *m = s->m;
    struct moe_kv_pool *p = m->kv.pool;
    const int bt = m->kv.block;
    *cached = 0;
    moe_seq_reset(s);
    if (n <= 0 || n_total < n || n_total > m->n_ctx)
        return moe_diag_set(diag, -EINVAL, "sequence of %d prompt tokens growing to %d, expected"
                            " 1..%d (the context)", n, n_total, m->n_ctx);
    const int total_blocks = (n_total + bt - 1) / bt;
    struct moe_kv_stats st;
    moe_kv_pool_stats(p, &st);
    if (total_blocks > st.n_blocks)
        return moe_diag_set(diag, MOE_ELIMIT, "%d tokens (prompt %d) need %d KV blocks of %d tokens;"
                            " the pool holds %d (kv_size)", n_total, n, total_blocks, bt, st.n_blocks);
    /* the longest cached run of full blocks, the last prompt token excluded */
    int m_blocks = 0, idle = 0;
    uint64_t parent = 0;
    for (int b = 0; m->kv.prefix_cache && (b + 1) * bt <= n - 1; b++) {
        const uint64_t h = moe_kv_chain_hash(parent, prompt + (size_t)b * (size_t)bt, bt);
        const int id = moe_kv_pool_lookup(p, h, parent, prompt + (size_t)b * (size_t)bt);
        if (id < 0)
            break;
        s->blocks[m_blocks] = id;
        s->hashes[m_blocks++] = h;
        idle += moe_kv_pool_refs(p, id) == 0;
        parent = h;
    }
    /* taking idle cached blocks makes them unavailable to the reservation */
    if (moe_kv_pool_available(p) - idle < total_blocks - m_blocks)
        return -EAGAIN;
    for (int b = 0; b < m_blocks; b++)
        moe_kv_pool_ref(p, s->blocks[b]);
    const bool reserved = moe_kv_pool_reserve(p, total_blocks - m_blocks);
    MOE_ASSERT(reserved);   /* checked just above */
    s->n_blocks = s->n_hashed = m_blocks;
    s->reserved = total_blocks - m_blocks;
    s->pos = m_blocks * bt;
    memcpy(s->toks, prompt, (size_t)s->pos * sizeof(int32_t));
    if (m->kv.prefix_cache)
        moe_kv_pool_count_lookup(p, n, s->pos);
    *cached = s->pos;
    return 0;
}

void moe_model_kv_stats(const struct moe_model *m, struct moe_kv_stats *out)
{
    moe_kv_pool_stats(m->kv.pool, out);
}

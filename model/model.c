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
#include <time.h>
#include <unistd.h>

#include "common/alloc.h"
#include "common/log.h"
#include "io/gguf.h"
#include "kernels/cpu/dequant.h"
#include "kernels/cuda.h"
#include "common/dtype.h"
#include "cache/expert_cache.h"
#include "cache/history.h"
#include "cache/host_tier.h"
#include "io/expert_src.h"
#include "model/hparams.h"
#include "model/model.h"

struct expert_tensor {
    const uint8_t *data;       /* start of the 3-D tensor (resident experts) */
    uint32_t dtype;
    int64_t n_in, n_out;
    size_t row_bytes, expert_bytes;
    uint64_t slot_offset;      /* where the slice sits in a cached expert's blob */
};

/* gpt-oss expert biases inside a cached expert's blob (offset, or -1) */
struct bias_slices {
    int64_t gate, up, down;
};

struct layer {
    struct moe_weight wq, wk, wv, wo;
    float *bq, *bk, *bv, *bo;            /* owned f32, or NULL */
    float *attn_norm, *ffn_norm;         /* owned f32 */
    float *q_norm, *k_norm;              /* owned f32, or NULL */
    float *sinks;                        /* [n_head] (gpt-oss) */
    int window;                          /* sliding window of this layer, 0 = full */
    /* MLA (deepseek2) */
    struct moe_weight wq_a, wq_b, wkv_a;
    float *q_a_norm, *kv_a_norm;
    struct moe_weight wk_b[256], wv_b[256]; /* per head */
    /* FFN: dense (leading deepseek2 layers) or MoE */
    bool moe;
    struct moe_weight ffn_gate, ffn_up, ffn_down;
    struct moe_weight router;
    float *router_bias;                  /* [n_expert] added to logits (gpt-oss) */
    float *sel_bias;                     /* [n_expert] selection bias (deepseek2) */
    struct expert_tensor gate, up, down;
    float *gate_b, *up_b, *down_b;       /* [n_expert][n] expert biases (gpt-oss) */
    struct bias_slices bias_off;         /* the same, cached experts */
    /* shared expert */
    struct moe_weight sh_gate, sh_up, sh_down;
    float *sh_gate_inp;                  /* [n_embd], or NULL (qwen2moe) */
};

enum { PF_PROBE = 8, PF_EXPLOIT = 48 };   /* prefetch governor, in decode steps */

/* A weight the model binds: a matrix's data, a stack's slice, a resident
 * expert tensor or a model-owned f32 vector. On a backend whose memory is
 * not host memory each one is uploaded at load; `host` keeps the original
 * pointer so that freeing restores it. */
struct bound {
    void **field;
    size_t bytes;
    void *host;          /* non-NULL once uploaded */
};

/* One sequence's tokens inside a batch: rows off..off+n-1 of the scratch. */
struct seg {
    struct moe_seq *s;
    int64_t off, n;
};

struct moe_model {
    struct moe_model_cfg cfg;
    struct moe_gguf *gguf;               /* owned unless src is set (then the source's) */
    struct moe_expert_src *src;          /* experts through the cache, or NULL (resident) */
    struct moe_expert_cache *cache;
    struct moe_host_tier *host;
    struct moe_backend *be;
    int n_ctx, n_batch;
    bool kv_f16;
    struct moe_weight tok_embd, output;
    float *output_norm;
    struct layer *layers;
    struct bound *bound;                 /* everything bound, for the upload */
    int n_bound, cap_bound;
    bool upload;                         /* weights live in backend memory */

    /* scratch, sized for n_batch tokens */
    float *x, *xn, *q, *k, *v, *att, *tmp;   /* activations: backend memory, like every
                                              * float buffer below unless marked host */
    float *qa, *hq, *hout;               /* MLA: q_a, one head's gather/scatter rows */
    float *rlogits;
    int32_t *ids;
    float *weights;
    float *xe, *ge, *ue, *de, *slot_out, *sh_tmp;
    int32_t *pos;
    struct seg *segs;                    /* [n_batch]: the sequences of this batch */
    int n_segs;
    int32_t *tok_by_expert;              /* [n_batch * k]: (token*k + slot) grouped by expert */
    int32_t *row_idx;                    /* [n_batch * k] host: token rows of one expert's batch */
    float *logits_dev;                   /* [logit_rows][n_vocab] backend memory */
    int logit_rows;
    float *pf_logits;                    /* [n_expert] backend memory (prefetch gate) */
    int32_t *expert_count, *expert_start;
    int32_t *pend_l, *pend_e, *pend_state; /* per-layer acquisition bookkeeping [n_expert] */
    int32_t step;                        /* token steps run, for the cache policy */
    int prefetch_depth;                  /* 0 = off */
    bool prefetch_history;               /* history predictor instead of speculative gating */
    /* Prefetch governor: accurate prediction can still slow decoding (when
     * the disk is the bottleneck, every prefetch is one more load), so the
     * effect is measured end to end. Decode steps alternate a probe with
     * prefetch on and one with it off (PF_PROBE steps each), the faster
     * setting runs for PF_EXPLOIT steps, then it probes again. */
    bool prefetch_always;
    int pf_phase, pf_left;               /* 0 probe on, 1 probe off, 2 exploit */
    bool pf_use;                         /* the setting exploited */
    double pf_sum[2];
    int pf_n[2];
    uint64_t pf_steps[2];                /* decode steps run with prefetch off / on */
    float *pf_x;                         /* [n_embd] prefetch scratch */
    struct moe_history hist;             /* history predictor (cache/history.h) */
};

struct moe_seq {
    struct moe_model *m;
    int pos;
    void *k_cache, *v_cache;             /* per layer: [n_ctx][k_row], [n_ctx][v_row] */
    size_t layer_bytes, v_layer_bytes;
};

/* ---- configuration --------------------------------------------------- */

static float f32_or(const struct moe_gguf *g, const char *arch, const char *suffix, float def,
                    int *rc, struct moe_diag *diag)
{
    char key[160];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    float v;
    int r = moe_gguf_get_f32(g, key, &v, diag);
    if (r == -ENOENT)
        return def;
    if (r == 0 && !(v == v && v > -1e30f && v < 1e30f))
        r = moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' is not a finite number", moe_gguf_path(g), key);
    if (r)
        *rc = r;
    return v;
}

static float yarn_get_mscale(float scale, float mscale)
{
    return scale <= 1.0f ? 1.0f : 0.1f * mscale * logf(scale) + 1.0f;
}

/* YaRN parameters as llama.cpp derives them from the metadata (its context
 * set-up and, for deepseek2, its graph): the ramp's correction dims from
 * beta_fast/beta_slow over the original context, the magnitude factor that
 * rope multiplies into cos/sin, and deepseek2's kq_scale adjustment from
 * rope.scaling.yarn_log_multiplier (stored x0.1 by the converter). */
static int read_yarn(const struct moe_gguf *g, struct moe_model_cfg *c, bool yarn, float factor,
                     struct moe_diag *diag)
{
    const char *arch = c->arch_name;
    int rc = 0;
    const float ext = f32_or(g, arch, "rope.scaling.yarn_ext_factor", -1.0f, &rc, diag);
    const float beta_fast = f32_or(g, arch, "rope.scaling.yarn_beta_fast", 32.0f, &rc, diag);
    const float beta_slow = f32_or(g, arch, "rope.scaling.yarn_beta_slow", 1.0f, &rc, diag);
    const float rope_attn = f32_or(g, arch, "rope.scaling.attn_factor", 1.0f, &rc, diag);
    float log_mul = f32_or(g, arch, "rope.scaling.yarn_log_multiplier", 0.0f, &rc, diag);
    if (rc)
        return rc;
    uint32_t n_ctx_orig = (uint32_t)c->n_ctx_train;
    char key[160];
    snprintf(key, sizeof(key), "%s.rope.scaling.original_context_length", arch);
    rc = moe_gguf_get_u32(g, key, &n_ctx_orig, diag);
    if (rc && rc != -ENOENT)
        return rc;
    if (c->ad->yarn_log_mul_x10)
        log_mul /= 0.1f;
    c->rope.ext_factor = ext >= 0.0f ? ext : (yarn ? 1.0f : 0.0f);
    float af = 1.0f;
    if (c->rope.ext_factor != 0.0f) {
        if (log_mul != 0.0f) {
            const float m = c->ad->yarn_log_mul_x10 && log_mul != 1.0f ? log_mul : 1.0f;
            af = yarn_get_mscale(factor, m) / yarn_get_mscale(factor, log_mul);
        } else {
            af = yarn_get_mscale(factor, 1.0f);
        }
        af *= 1.0f / (1.0f + 0.1f * logf(factor));
    }
    af *= rope_attn;
    c->rope.attn_factor = af;
    const float n_dims = (float)c->rope.n_rot, base = c->rope.freq_base;
    const float lo = floorf(n_dims * logf((float)n_ctx_orig / (beta_fast * 2.0f * (float)M_PI)) / (2.0f * logf(base)));
    const float hi = ceilf(n_dims * logf((float)n_ctx_orig / (beta_slow * 2.0f * (float)M_PI)) / (2.0f * logf(base)));
    c->rope.corr_dims[0] = fmaxf(0.0f, lo);
    c->rope.corr_dims[1] = fminf(n_dims - 1.0f, hi);
    if (c->ad->mla && c->rope.ext_factor != 0.0f) {
        const float org = af * (1.0f + 0.1f * logf(factor));
        const float ms = org * (1.0f + 0.1f * log_mul * logf(factor));
        c->kq_scale = ms * ms / sqrtf((float)(c->qk_nope + c->qk_rope));
    }
    return 0;
}

/* Attention dims: MLA's latent layout or plain heads. The metadata was
 * validated by moe_hparams_validate(); these are the shapes the engine
 * computes, and what it cannot compute is refused here. */
static int read_attention_dims(const struct moe_hparams *hp, struct moe_model_cfg *c, const char *path,
                               struct moe_diag *diag)
{
    const char *arch = c->arch_name;
    const int n_rot = (int)hp->n_rot, hd_v = (int)hp->head_dim_v;
    c->head_dim = (int)hp->head_dim;
    c->head_dim_v = hd_v;
    if (!c->ad->mla) {
        if (hd_v != c->head_dim || c->head_dim <= 0 || c->head_dim % 2 != 0)
            return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: head dims key %d / value %d: expected"
                                " equal, even and positive", path, c->head_dim, hd_v);
        if (n_rot <= 0 || n_rot > c->head_dim || n_rot % 2 != 0)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: %s.rope.dimension_count %d, expected an even"
                                " number in 2..%d", path, arch, n_rot, c->head_dim);
        c->k_row = c->v_row = (int64_t)c->n_head_kv * c->head_dim;
        c->kq_scale = 1.0f / sqrtf((float)c->head_dim);
        return 0;
    }
    const int k_mla = (int)hp->key_length_mla, v_mla = (int)hp->value_length_mla;
    c->q_lora_rank = (int)hp->q_lora_rank;
    c->kv_lora_rank = (int)hp->kv_lora_rank;
    if (k_mla == 0 || v_mla == 0)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s without key_length_mla/value_length_mla"
                            " (the pre-2025 MLA layout with a joint kv_b tensor) is not supported;"
                            " reconvert with a current llama.cpp", path, arch);
    if (c->kv_lora_rank <= 0 || n_rot <= 0 || n_rot >= k_mla || n_rot % 2 != 0 ||
        c->head_dim != c->kv_lora_rank + n_rot || hd_v != c->kv_lora_rank)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s MLA dims inconsistent: key_length %d,"
                            " value_length %d, kv_lora_rank %d, rope.dimension_count %d,"
                            " key_length_mla %d (expected key_length = kv_lora_rank + rope dims,"
                            " value_length = kv_lora_rank)", path, arch, c->head_dim, hd_v,
                            c->kv_lora_rank, n_rot, k_mla);
    if (c->n_head > 256)
        return moe_diag_set(diag, MOE_ELIMIT, "%s: %d heads, at most 256 supported", path, c->n_head);
    c->qk_rope = n_rot;
    c->qk_nope = k_mla - n_rot;
    c->v_head_dim = v_mla;
    c->n_head_kv = 1;
    c->k_row = c->kv_lora_rank + n_rot;
    c->v_row = 0;
    c->kq_scale = 1.0f / sqrtf((float)k_mla);
    return 0;
}

/* Routing: the row's defaults, overridden by the expert_gating_func /
 * expert_weights_* keys where the row reads them. */
static int read_gating(const struct moe_hparams *hp, struct moe_model_cfg *c, const char *path,
                       struct moe_diag *diag)
{
    const struct moe_arch_desc *ad = c->ad;
    c->gating = (struct moe_gating_params){
        .func = ad->gating, .n_expert = c->n_expert, .k = c->n_expert_used,
        .norm = ad->gating_norm, .scale = 1.0f,
    };
    if (!ad->gating_from_keys)
        return 0;
    const int func = hp->expert_gating_func ? (int)hp->expert_gating_func : 1;
    if (func != 1 && func != 2)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.expert_gating_func %d, expected"
                            " 1 (softmax) or 2 (sigmoid)", path, c->arch_name, func);
    c->gating.func = func == 2 ? MOE_GATING_SIGMOID : MOE_GATING_SOFTMAX;
    c->gating.norm = hp->expert_weights_norm;
    c->gating.scale = hp->expert_weights_scale > 0.0f ? hp->expert_weights_scale : 1.0f;
    return 0;
}

/* The forward pass's configuration: hyper-parameters loaded and validated
 * by model/hparams.c, the architecture's row, and the few limits of the
 * engine itself. */
static int read_cfg(const struct moe_gguf *g, struct moe_model_cfg *c, struct moe_diag *diag)
{
    const char *path = moe_gguf_path(g);
    struct moe_hparams hp;
    int rc;
    if ((rc = moe_hparams_load(&hp, g, diag)) || (rc = moe_hparams_check_supported(&hp, path, diag)) ||
        (rc = moe_hparams_validate(&hp, g, diag)))
        return rc;
    c->ad = moe_arch_desc_find(hp.arch);
    snprintf(c->arch_name, sizeof(c->arch_name), "%s", hp.arch);
    const char *arch = c->arch_name;
    c->n_embd = (int)hp.n_embd;
    c->n_layer = (int)hp.n_layer;
    c->n_head = (int)hp.n_head;
    c->n_head_kv = (int)hp.n_head_kv;
    c->n_ctx_train = hp.n_ctx_train ? (int)hp.n_ctx_train : 4096;
    c->n_expert = (int)hp.n_expert;
    c->n_expert_used = (int)hp.n_expert_used;
    c->n_ff = (int)hp.n_ff;
    c->n_ff_exp = (int)hp.n_ff_exp;
    c->n_ff_shexp = (int)hp.n_ff_shexp;
    c->n_layer_dense_lead = (int)hp.n_layer_dense_lead;
    c->n_expert_groups = (int)hp.n_expert_groups;
    c->n_group_used = (int)hp.n_group_used;
    /* the per-layer acquisition bookkeeping holds at most 1024 experts */
    if (c->n_expert > 1024)
        return moe_diag_set(diag, MOE_ELIMIT, "%s: %s.expert_count %d exceeds the engine's 1024",
                            path, arch, c->n_expert);
    if (c->n_expert_groups > 1 && c->n_group_used <= 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s.expert_group_count %d without"
                            " expert_group_used_count", path, arch, c->n_expert_groups);
    if ((rc = read_attention_dims(&hp, c, path, diag)) || (rc = read_gating(&hp, c, path, diag)))
        return rc;
    c->rms_eps = hp.rms_eps > 0.0f ? hp.rms_eps : 1e-5f;
    c->rope.mode = c->ad->rope_mode;
    c->rope.freq_base = hp.rope_freq_base > 0.0f ? hp.rope_freq_base : 10000.0f;
    const float factor = hp.rope_scaling_factor > 0.0f ? hp.rope_scaling_factor : 1.0f;
    const bool yarn = strcmp(hp.rope_scaling_type, "yarn") == 0;
    if (hp.rope_scaling_type[0] && strcmp(hp.rope_scaling_type, "none") != 0 &&
        strcmp(hp.rope_scaling_type, "linear") != 0 && !yarn)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.rope.scaling.type = '%s': expected none,"
                            " linear or yarn", path, arch, hp.rope_scaling_type);
    c->rope.n_rot = (int)hp.n_rot;
    c->rope.freq_scale = 1.0f / factor;
    c->swa_window = c->ad->swa_even_layers ? (int)hp.sliding_window : 0;
    return read_yarn(g, c, yarn, factor, diag);
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
    if (m->n_bound == m->cap_bound) {
        int cap = m->cap_bound ? m->cap_bound * 2 : 256;
        struct bound *b = moe_realloc(m->bound, (size_t)cap * sizeof(*b));
        if (b == NULL)
            return moe_diag_set(diag, -ENOMEM, "out of memory");
        m->bound = b;
        m->cap_bound = cap;
    }
    m->bound[m->n_bound++] = (struct bound){ .field = field, .bytes = bytes, .host = NULL };
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
    const struct moe_expert_layout *lay = layer >= 0 ? moe_expert_src_layout(m->src, (uint32_t)layer) : NULL;
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
    if (m->src != NULL) {
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
        e->slot_offset = sl->offset;
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
    return remember(m, (void **)(void *)&e->data, e->expert_bytes * (size_t)m->cfg.n_expert, diag);
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
    if (v == NULL)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    const uint8_t *src = moe_gguf_tensor_data(m->gguf, t);
    const size_t rb = moe_dtype_row_bytes(t->dtype, (uint64_t)n, NULL);
    for (int64_t r = 0; r < n2; r++)
        moe_dequantize_row(t->dtype, src + (size_t)r * rb, v + r * n, n);
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
    const int64_t E = c->n_embd, hd = c->head_dim;
    const int64_t qd = (int64_t)c->n_head * hd, kvd = (int64_t)c->n_head_kv * hd;
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
    if ((rc = bind_matrix(m, NAME("attn_q.weight"), E, qd, true, &L->wq, diag)) ||
        (rc = bind_matrix(m, NAME("attn_k.weight"), E, kvd, true, &L->wk, diag)) ||
        (rc = bind_matrix(m, NAME("attn_v.weight"), E, kvd, true, &L->wv, diag)) ||
        (rc = bind_matrix(m, NAME("attn_output.weight"), qd, E, true, &L->wo, diag)))
        return rc;
    if (c->ad->qkv_bias &&
        ((rc = bind_vector(m, NAME("attn_q.bias"), qd, true, &L->bq, diag)) ||
         (rc = bind_vector(m, NAME("attn_k.bias"), kvd, true, &L->bk, diag)) ||
         (rc = bind_vector(m, NAME("attn_v.bias"), kvd, true, &L->bv, diag))))
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
    /* llama.cpp's gpt-oss pattern: even layers use the sliding window */
    L->window = c->swa_window > 0 && il % 2 == 0 ? c->swa_window : 0;
#undef NAME
    return 0;
}

static int bind_layer(struct moe_model *m, int il, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    struct layer *L = &m->layers[il];
    const int64_t E = c->n_embd;
    char n[96];
    int rc;
#define NAME(s) (snprintf(n, sizeof(n), "blk.%d." s, il), n)
    if ((rc = bind_attention(m, il, L, diag)))
        return rc;
    /* gpt-oss names its FFN norm post_attention_norm */
    char norm[96];
    snprintf(norm, sizeof(norm), "blk.%d.%s.weight", il, c->ad->ffn_norm);
    if ((rc = bind_vector(m, norm, E, true, &L->ffn_norm, diag)))
        return rc;
    L->moe = il >= c->n_layer_dense_lead;
    if (!L->moe)
        return (rc = bind_matrix(m, NAME("ffn_gate.weight"), E, c->n_ff, true, &L->ffn_gate, diag)) ||
               (rc = bind_matrix(m, NAME("ffn_up.weight"), E, c->n_ff, true, &L->ffn_up, diag)) ||
               (rc = bind_matrix(m, NAME("ffn_down.weight"), c->n_ff, E, true, &L->ffn_down, diag))
                   ? rc : 0;
    if ((rc = bind_matrix(m, NAME("ffn_gate_inp.weight"), E, c->n_expert, true, &L->router, diag)) ||
        (rc = bind_experts(m, NAME("ffn_gate_exps.weight"), E, c->n_ff_exp, &L->gate, diag)) ||
        (rc = bind_experts(m, NAME("ffn_up_exps.weight"), E, c->n_ff_exp, &L->up, diag)) ||
        (rc = bind_experts(m, NAME("ffn_down_exps.weight"), c->n_ff_exp, E, &L->down, diag)))
        return rc;
    if (c->ad->gating_from_keys && c->gating.func == MOE_GATING_SIGMOID &&
        (rc = bind_vector(m, NAME("exp_probs_b.bias"), c->n_expert, true, &L->sel_bias, diag)))
        return rc;
    L->bias_off = (struct bias_slices){ -1, -1, -1 };
    if (c->ad->router_bias &&
        (rc = bind_vector(m, NAME("ffn_gate_inp.bias"), c->n_expert, true, &L->router_bias, diag)))
        return rc;
    if (c->ad->expert_bias && m->src != NULL) {
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

static int n_online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 && n < 1024 ? (int)n : 1;
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

static size_t zmax(size_t a, size_t b)
{
    return a > b ? a : b;
}

static int alloc_scratch(struct moe_model *m, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const size_t B = (size_t)m->n_batch, K = (size_t)c->n_expert_used, F = sizeof(float);
    const size_t E = (size_t)c->n_embd, H = (size_t)c->n_head;
    const size_t qk = c->ad->mla ? (size_t)(c->qk_nope + c->qk_rope) : (size_t)c->head_dim;
    const size_t qd = H * zmax((size_t)c->head_dim, qk);
    const size_t kvd = zmax((size_t)c->n_head_kv * c->head_dim, (size_t)c->k_row);
    const size_t ad = H * zmax((size_t)c->head_dim_v, (size_t)c->v_head_dim);
    const size_t ff = zmax(zmax((size_t)c->n_ff_exp, (size_t)c->n_ff_shexp),
                           c->n_layer_dense_lead > 0 ? (size_t)c->n_ff : 0);
    const size_t lat = zmax((size_t)c->kv_lora_rank, zmax((size_t)c->qk_nope, (size_t)c->v_head_dim));
    int failed = 0;
    m->x = bscratch(m, B * E * F, &failed);
    m->xn = bscratch(m, B * E * F, &failed);
    m->q = bscratch(m, B * qd * F, &failed);
    m->k = bscratch(m, B * kvd * F, &failed);
    m->v = bscratch(m, B * qd * F, &failed);   /* V rows, or MLA's assembled queries */
    m->att = bscratch(m, B * ad * F, &failed);
    m->tmp = bscratch(m, B * zmax(E, ad) * F, &failed);
    m->qa = bscratch(m, B * zmax((size_t)c->q_lora_rank, 1) * F, &failed);
    m->hq = bscratch(m, B * zmax(lat, 1) * F, &failed);
    m->hout = bscratch(m, B * zmax(lat, 1) * F, &failed);
    m->rlogits = bscratch(m, B * (size_t)c->n_expert * F, &failed);
    m->xe = bscratch(m, B * E * F, &failed);
    m->ge = bscratch(m, B * ff * F, &failed);
    m->ue = bscratch(m, B * ff * F, &failed);
    m->de = bscratch(m, B * E * F, &failed);
    m->slot_out = bscratch(m, B * K * E * F, &failed);
    m->sh_tmp = bscratch(m, B * F, &failed);
    /* logits: up to 64 rows at a time through the backend */
    m->logit_rows = m->n_batch < 64 ? m->n_batch : 64;
    m->logits_dev = bscratch(m, (size_t)m->logit_rows * (size_t)c->n_vocab * F, &failed);
    m->pf_logits = bscratch(m, (size_t)c->n_expert * F, &failed);
    m->pf_x = bscratch(m, E * F, &failed);
    /* host */
    m->ids = scratch(m, B * K * sizeof(int32_t), &failed);
    m->weights = scratch(m, B * K * F, &failed);
    m->pos = scratch(m, B * sizeof(int32_t), &failed);
    m->segs = scratch(m, B * sizeof(struct seg), &failed);
    m->tok_by_expert = scratch(m, B * K * sizeof(int32_t), &failed);
    m->row_idx = scratch(m, B * K * sizeof(int32_t), &failed);
    m->expert_count = scratch(m, (size_t)c->n_expert * sizeof(int32_t), &failed);
    m->expert_start = scratch(m, (size_t)c->n_expert * sizeof(int32_t), &failed);
    if (failed)
        return moe_diag_set(diag, -ENOMEM, "out of memory allocating scratch for %d tokens",
                            m->n_batch);
    /* Backend scratch: the largest activation rows of a matmul (f32 is the
     * widest format), and per worker one row of attention scores. */
    size_t widest = zmax(zmax(E, qd), zmax(ff, ad));
    widest = zmax(widest, zmax((size_t)c->q_lora_rank, lat));
    size_t shared = B * widest * 4 + 4096;
    size_t per_worker = (size_t)m->n_ctx * F + (size_t)c->head_dim * 2 + 64;
    int rc = m->be->ops->reserve(m->be, shared, per_worker);
    if (rc)
        return moe_diag_set(diag, rc, "backend: cannot reserve %zu bytes of scratch", shared);
    return 0;
}

static int create_cache(struct moe_model *m, const struct moe_model_opts *o, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    size_t slot = 0;
    int n_moe = 0;
    for (uint32_t l = 0; l < moe_expert_src_n_layer(m->src); l++) {
        const struct moe_expert_layout *lay = moe_expert_src_layout(m->src, l);
        if (lay && lay->n_slices) {
            n_moe++;
            if (lay->raw_size > slot)
                slot = (size_t)lay->raw_size;
        }
    }
    if (slot == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: no expert tensors", moe_gguf_path(m->gguf));
    long n_slots = o->cache_experts > 0 ? o->cache_experts
                 : o->cache_bytes > 0 ? (long)(o->cache_bytes / slot)
                 : (long)n_moe * c->n_expert;
    if (n_slots < c->n_expert_used)
        return moe_diag_set(diag, MOE_ELIMIT, "expert cache of %ld experts (%zu bytes each) is below"
                            " the minimum of %d: one layer's top-k must fit", n_slots, slot,
                            c->n_expert_used);
    if (n_slots > (long)n_moe * c->n_expert)
        n_slots = (long)n_moe * c->n_expert;
    const long working_set = (long)n_moe * c->n_expert_used;
    if (n_slots < working_set)
        moe_log(MOE_LOG_WARN, "the expert cache holds %ld experts, below one token's working"
                " set of %ld (%d MoE layers x top-%d): LRU will hit about 0%%", n_slots, working_set,
                n_moe, c->n_expert_used);
    int pol = moe_policy_from_name(o->cache_policy ? o->cache_policy : "layer");
    if (pol < 0 || pol == MOE_POLICY_BELADY)
        return moe_diag_set(diag, -EINVAL, "cache policy '%s': expected lru, lfu, layer or predict",
                            o->cache_policy);
    if (o->prefetch && strcmp(o->prefetch, "none") != 0) {
        if (strcmp(o->prefetch, "gate") != 0 && strcmp(o->prefetch, "history") != 0)
            return moe_diag_set(diag, -EINVAL, "prefetch '%s': expected none, gate or history",
                                o->prefetch);
        m->prefetch_history = strcmp(o->prefetch, "history") == 0;
        if (m->prefetch_history) {
            if (moe_history_init(&m->hist, c->n_layer, c->n_expert, c->n_expert_used) != 0)
                return moe_diag_set(diag, -ENOMEM, "history predictor: out of memory");
        }
        m->prefetch_depth = o->prefetch_depth > 0 ? o->prefetch_depth : 1;
        if (m->prefetch_depth > c->n_layer)
            m->prefetch_depth = c->n_layer;
        m->prefetch_always = o->prefetch_always;
        m->pf_phase = 0;
        m->pf_left = PF_PROBE;
    }
    m->pend_l = moe_malloc((size_t)c->n_expert * sizeof(int32_t));
    m->pend_e = moe_malloc((size_t)c->n_expert * sizeof(int32_t));
    m->pend_state = moe_malloc((size_t)c->n_expert * sizeof(int32_t));
    if (!m->pend_l || !m->pend_e || !m->pend_state)
        return moe_diag_set(diag, -ENOMEM, "out of memory");
    int rc = moe_expert_cache_create(&m->cache, m->src, m->be, slot, (int)n_slots,
                                     (enum moe_policy_kind)pol, diag);
    if (rc == 0 && (!m->be->ops->host_memory || o->upload_weights))
        rc = moe_expert_cache_set_staging(m->cache, diag);
    if (rc == 0 && o->host_bytes > 0) {
        if ((rc = moe_host_tier_create(&m->host, o->host_bytes, diag)) == 0)
            moe_expert_cache_set_host_tier(m->cache, m->host);
    }
    return rc;
}

/* Moves every bound weight into backend memory (a GPU backend; or the CPU
 * backend when asked, which tests this path). The deepseek selection bias
 * stays on the host: the router's top-k runs there. */
static int upload_weights(struct moe_model *m, struct moe_diag *diag)
{
    if (!m->upload)
        return 0;
    size_t total = 0;
    for (int i = 0; i < m->n_bound; i++) {
        struct bound *b = &m->bound[i];
        bool host_only = false;
        for (int il = 0; il < m->cfg.n_layer; il++)
            host_only |= b->field == (void **)&m->layers[il].sel_bias;
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
    }
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
    /* A pack (or a GGUF with a cache budget) goes through an expert source;
     * its GGUF view holds the metadata and dense tensors. */
    bool is_pack = false;
    {
        FILE *f = fopen(path, "rb");
        char magic[8] = { 0 };
        if (f) {
            is_pack = fread(magic, 1, 8, f) == 8 && memcmp(magic, "MOEPACK", 8) == 0;
            fclose(f);
        }
    }
    int rc;
    if (is_pack || o.cache_bytes > 0 || o.cache_experts > 0) {
        struct moe_io_config io = { .uring = { .force_pread = o.force_pread } };
        if ((rc = moe_expert_src_open(&m->src, path, &io, diag)))
            goto fail;
        m->gguf = (struct moe_gguf *)moe_expert_src_gguf(m->src); /* borrowed; map() is idempotent */
    } else if ((rc = moe_gguf_open(&m->gguf, path, diag))) {
        goto fail;
    }
    if ((rc = read_cfg(m->gguf, &m->cfg, diag)))
        goto fail;
    struct moe_model_cfg *c = &m->cfg;
    if ((rc = moe_gguf_map(m->gguf, diag)))
        goto fail;
    if (o.backend && strcmp(o.backend, "cuda") == 0)
        rc = moe_backend_cuda_create(&m->be, 0, diag);
    else if (o.backend && strcmp(o.backend, "cpu") != 0)
        rc = moe_diag_set(diag, -EINVAL, "backend '%s': expected cpu or cuda", o.backend);
    else
        rc = moe_backend_cpu_create(&m->be, o.n_threads > 0 ? o.n_threads : n_online_cpus(), diag);
    if (rc)
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
    const bool tied = m->output.data == NULL;
    if (tied)
        m->output = m->tok_embd; /* tied embeddings */
    m->layers = moe_calloc((size_t)c->n_layer, sizeof(struct layer));
    if (m->layers == NULL) {
        rc = moe_diag_set(diag, -ENOMEM, "out of memory");
        goto fail;
    }
    for (int il = 0; il < c->n_layer; il++)
        if ((rc = bind_layer(m, il, diag)))
            goto fail;

    if (m->src != NULL && (rc = create_cache(m, &o, diag)))
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
    m->upload = !m->be->ops->host_memory || o.upload_weights;
    if ((rc = upload_weights(m, diag)))
        goto fail;
    if (tied)
        m->output = m->tok_embd;
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
    /* uploaded weights: free the backend copies, restore the host pointers */
    for (int i = 0; i < m->n_bound; i++)
        if (m->bound[i].host) {
            m->be->ops->free(m->be, *m->bound[i].field);
            *m->bound[i].field = m->bound[i].host;
        }
    moe_free(m->bound);
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
            moe_free(L->bo);
            moe_free(L->sinks);
            moe_free(L->q_a_norm);
            moe_free(L->kv_a_norm);
            moe_free(L->router_bias);
            moe_free(L->sel_bias);
            moe_free(L->gate_b);
            moe_free(L->up_b);
            moe_free(L->down_b);
        }
        moe_free(m->layers);
    }
    moe_free(m->output_norm);
    void *bufs[] = { m->ids, m->weights, m->pos, m->segs, m->tok_by_expert, m->row_idx,
                     m->expert_count, m->expert_start };
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        moe_free(bufs[i]);
    void *dbufs[] = { m->x, m->xn, m->q, m->k, m->v, m->att, m->tmp, m->qa, m->hq, m->hout,
                      m->rlogits, m->xe, m->ge, m->ue, m->de, m->slot_out, m->sh_tmp,
                      m->logits_dev, m->pf_logits, m->pf_x };
    for (size_t i = 0; m->be && i < sizeof(dbufs) / sizeof(dbufs[0]); i++)
        if (dbufs[i])
            m->be->ops->free(m->be, dbufs[i]);
    moe_history_free(&m->hist);
    moe_free(m->pend_l);
    moe_free(m->pend_e);
    moe_free(m->pend_state);
    moe_expert_cache_destroy(m->cache);   /* waits for loads, which may fill the tier */
    moe_host_tier_destroy(m->host);
    moe_backend_destroy(m->be);
    if (m->src)
        moe_expert_src_close(m->src); /* owns the GGUF view */
    else
        moe_gguf_close(m->gguf);
    moe_free(m);
}

bool moe_model_cache_stats(struct moe_model *m, struct moe_cache_stats *out)
{
    if (m->cache == NULL)
        return false;
    moe_expert_cache_stats(m->cache, out);
    return true;
}

int moe_model_cache_layer_stats(struct moe_model *m, uint64_t *hits, uint64_t *misses, int max)
{
    return m->cache ? moe_expert_cache_layer_stats(m->cache, hits, misses, max) : -1;
}

int moe_model_cache_layer_stats_ex(struct moe_model *m, struct moe_cache_layer_stats *out, int max)
{
    return m->cache ? moe_expert_cache_layer_stats_ex(m->cache, out, max) : -1;
}

int moe_model_cache_pinned(struct moe_model *m)
{
    return m->cache ? moe_expert_cache_pinned(m->cache) : -1;
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
    const size_t es = m->kv_f16 ? 2 : 4;
    s->layer_bytes = (size_t)m->n_ctx * (size_t)m->cfg.k_row * es;
    s->v_layer_bytes = (size_t)m->n_ctx * (size_t)m->cfg.v_row * es;
    size_t kt = s->layer_bytes * (size_t)m->cfg.n_layer, vt = s->v_layer_bytes * (size_t)m->cfg.n_layer;
    s->k_cache = m->be->ops->alloc(m->be, kt);
    s->v_cache = vt ? m->be->ops->alloc(m->be, vt) : NULL;
    if (s->k_cache == NULL || (vt && s->v_cache == NULL)) {
        moe_seq_free(s);
        return moe_diag_set(diag, -ENOMEM, "KV cache: cannot allocate %zu + %zu MiB", kt >> 20,
                            vt >> 20);
    }
    *out = s;
    return 0;
}

void moe_seq_free(struct moe_seq *s)
{
    if (s == NULL)
        return;
    s->m->be->ops->free(s->m->be, s->k_cache);
    if (s->v_cache)
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

/* MLA in llama.cpp's absorbed form (see the top of this file). */
static int attention_mla(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->layers[il];
    const int H = c->n_head, nope = c->qk_nope, rope = c->qk_rope, lat = c->kv_lora_rank;
    const int qk = nope + rope, krow = lat + rope, vh = c->v_head_dim;

    /* queries [n][H][nope + rope] */
    if (c->q_lora_rank > 0) {
        TRY(ops->matmul(be, m->qa, &L->wq_a, NULL, m->xn, n));
        TRY(ops->rmsnorm(be, m->qa, m->qa, L->q_a_norm, n, c->q_lora_rank, c->rms_eps));
        TRY(ops->matmul(be, m->q, &L->wq_b, NULL, m->qa, n));
    } else {
        TRY(ops->matmul(be, m->q, &L->wq, NULL, m->xn, n));
    }
    /* latent and shared rotary key [n][lat + rope]: norm the latent part */
    TRY(ops->matmul(be, m->k, &L->wkv_a, NULL, m->xn, n));
    for (int64_t t = 0; t < n; t++)
        TRY(ops->rmsnorm(be, m->k + t * krow, m->k + t * krow, L->kv_a_norm, 1, lat, c->rms_eps));
    TRY(ops->rope(be, m->q, n, H, qk, nope, m->pos, &c->rope));
    TRY(ops->rope(be, m->k, n, 1, krow, lat, m->pos, &c->rope));
    for (int i = 0; i < m->n_segs; i++) {
        const struct seg *g = &m->segs[i];
        uint8_t *kc = (uint8_t *)g->s->k_cache + (size_t)il * g->s->layer_bytes;
        TRY(ops->kv_store(be, kc, m->k + g->off * krow, g->n, m->pos + g->off, krow, krow, 0,
                          m->kv_f16));
    }

    /* assembled queries in m->v: [n][H][lat + rope] = (Wk_b[h] q_nope, q_pe) */
    float *qc = m->v;
    for (int h = 0; h < H; h++) {
        TRY(ops->copy_rows(be, m->hq, nope, NULL, m->q + h * qk, (int64_t)H * qk, NULL, n, nope));
        TRY(ops->matmul(be, m->hout, &L->wk_b[h], NULL, m->hq, n));
        TRY(ops->copy_rows(be, qc + h * krow, (int64_t)H * krow, NULL, m->hout, lat, NULL, n, lat));
        TRY(ops->copy_rows(be, qc + h * krow + lat, (int64_t)H * krow, NULL, m->q + h * qk + nope,
                           (int64_t)H * qk, NULL, n, rope));
    }
    for (int i = 0; i < m->n_segs; i++) {
        const struct seg *g = &m->segs[i];
        uint8_t *kc = (uint8_t *)g->s->k_cache + (size_t)il * g->s->layer_bytes;
        struct moe_attn_params ap = {
            .n_head = H, .n_head_kv = 1, .head_dim = krow, .head_dim_v = lat,
            .k_row = krow, .v_row = krow, .scale = c->kq_scale, .kv_f16 = m->kv_f16,
            .k_cache = kc, .v_cache = kc,
        };
        TRY(ops->attention(be, m->att + g->off * H * lat, qc + g->off * H * krow, g->n,
                           m->pos + g->off, &ap));
    }
    /* per head back from the latent: [n][H][vh] in m->tmp */
    for (int h = 0; h < H; h++) {
        TRY(ops->copy_rows(be, m->hq, lat, NULL, m->att + h * lat, (int64_t)H * lat, NULL, n, lat));
        TRY(ops->matmul(be, m->hout, &L->wv_b[h], NULL, m->hq, n));
        TRY(ops->copy_rows(be, m->tmp + h * vh, (int64_t)H * vh, NULL, m->hout, vh, NULL, n, vh));
    }
    TRY(ops->matmul(be, m->att, &L->wo, NULL, m->tmp, n));
    TRY(ops->add(be, m->x, m->x, m->att, n * c->n_embd));
    return 0;
}

static int attention_block(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->layers[il];
    const int hd = c->head_dim, kvd = c->n_head_kv * hd, qd = c->n_head * hd;

    TRY(ops->rmsnorm(be, m->xn, m->x, L->attn_norm, n, c->n_embd, c->rms_eps));
    if (c->ad->mla)
        return attention_mla(m, il, n);
    TRY(ops->matmul(be, m->q, &L->wq, L->bq, m->xn, n));
    TRY(ops->matmul(be, m->k, &L->wk, L->bk, m->xn, n));
    TRY(ops->matmul(be, m->v, &L->wv, L->bv, m->xn, n));
    if (c->ad->qk_norm) {
        TRY(ops->rmsnorm(be, m->q, m->q, L->q_norm, n * c->n_head, hd, c->rms_eps));
        TRY(ops->rmsnorm(be, m->k, m->k, L->k_norm, n * c->n_head_kv, hd, c->rms_eps));
    } else if (c->ad->qk_norm_full) {
        TRY(ops->rmsnorm(be, m->q, m->q, L->q_norm, n, qd, c->rms_eps));
        TRY(ops->rmsnorm(be, m->k, m->k, L->k_norm, n, kvd, c->rms_eps));
    }
    TRY(ops->rope(be, m->q, n, c->n_head, hd, 0, m->pos, &c->rope));
    TRY(ops->rope(be, m->k, n, c->n_head_kv, hd, 0, m->pos, &c->rope));
    for (int i = 0; i < m->n_segs; i++) {
        const struct seg *g = &m->segs[i];
        uint8_t *kc = (uint8_t *)g->s->k_cache + (size_t)il * g->s->layer_bytes;
        uint8_t *vc = (uint8_t *)g->s->v_cache + (size_t)il * g->s->v_layer_bytes;
        const int32_t *pos = m->pos + g->off;
        TRY(ops->kv_store(be, kc, m->k + g->off * kvd, g->n, pos, kvd, kvd, 0, m->kv_f16));
        TRY(ops->kv_store(be, vc, m->v + g->off * kvd, g->n, pos, kvd, kvd, 0, m->kv_f16));
        struct moe_attn_params ap = {
            .n_head = c->n_head, .n_head_kv = c->n_head_kv, .head_dim = hd, .head_dim_v = hd,
            .k_row = kvd, .v_row = kvd, .scale = c->kq_scale, .kv_f16 = m->kv_f16,
            .k_cache = kc, .v_cache = vc, .window = L->window, .sinks = L->sinks,
        };
        TRY(ops->attention(be, m->att + g->off * qd, m->q + g->off * qd, g->n, pos, &ap));
    }
    TRY(ops->matmul(be, m->tmp, &L->wo, L->bo, m->att, n));
    TRY(ops->add(be, m->x, m->x, m->tmp, n * c->n_embd));
    return 0;
}

/* silu(gate) * up, or gpt-oss's clamped variant */
static int glu(struct moe_model *m, float *y, const float *g, const float *u, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    if (!c->ad->swiglu_oai)
        return m->be->ops->swiglu(m->be, y, g, u, n);
    return m->be->ops->swiglu_oai(m->be, y, g, u, n, c->ad->swiglu_alpha, c->ad->swiglu_limit);
}

static int dense_ffn(struct moe_model *m, int il, int64_t n)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->layers[il];
    TRY(ops->rmsnorm(be, m->xn, m->x, L->ffn_norm, n, c->n_embd, c->rms_eps));
    TRY(ops->matmul(be, m->ge, &L->ffn_gate, NULL, m->xn, n));
    TRY(ops->matmul(be, m->ue, &L->ffn_up, NULL, m->xn, n));
    TRY(ops->swiglu(be, m->ge, m->ge, m->ue, n * c->n_ff));
    TRY(ops->matmul(be, m->tmp, &L->ffn_down, NULL, m->ge, n));
    TRY(ops->add(be, m->x, m->x, m->tmp, n * c->n_embd));
    return 0;
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
    const int cnt = m->expert_count[e];
    const int32_t *list = m->tok_by_expert + m->expert_start[e];
    for (int i = 0; i < cnt; i++)
        m->row_idx[i] = list[i] / K;   /* (token, slot) -> token row */
    TRY(ops->copy_rows(be, m->xe, E, NULL, m->xn, E, m->row_idx, cnt, E));
    TRY(ops->matmul(be, m->ge, wg, bg, m->xe, cnt));
    TRY(ops->matmul(be, m->ue, wu, bu, m->xe, cnt));
    TRY(glu(m, m->ge, m->ge, m->ue, (int64_t)cnt * c->n_ff_exp));
    TRY(ops->matmul(be, m->de, wd, bd, m->ge, cnt));
    TRY(ops->copy_rows(be, m->slot_out, E, list, m->de, E, NULL, cnt, E));
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

/* The layer's experts through the cache: pin the ready ones and start loads
 * for the others, compute what is ready, then each missing expert as soon as
 * it arrives; release each right after its compute so that a cache of one
 * layer's top-k slots still serves batches that touch more experts. */
static int experts_cached(struct moe_model *m, int il, int64_t n, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct layer *L = &m->layers[il];
    enum { TODO = 0, LOADING = 1, DONE = 2 };
    int np = 0;
    for (int e = 0; e < c->n_expert; e++)
        if (m->expert_count[e] > 0) {
            m->pend_e[np] = e;
            m->pend_l[np] = il;
            m->pend_state[np++] = TODO;
        }
    (void)n;
    int remaining = np, rc = 0;
    struct moe_diag d = { 0 };
    int32_t wl[1024], we[1024], wi[1024];
    bool swept = m->prefetch_depth == 0;
    while (remaining > 0 && rc == 0) {
        for (int j = 0; j < np && rc == 0; j++) {
            if (m->pend_state[j] != TODO)
                continue;
            const uint8_t *blob = NULL;
            int r = moe_expert_cache_acquire(m->cache, il, m->pend_e[j], m->step, &blob, &d);
            if (r == -EAGAIN)
                break; /* every slot pinned: compute what we hold first */
            if (r < 0) {
                rc = r;
                break;
            }
            if (r == 1) {
                rc = expert_ffn_cached(m, L, m->pend_e[j], blob);
                moe_expert_cache_release(m->cache, il, m->pend_e[j]);
                m->pend_state[j] = DONE;
                remaining--;
            } else {
                m->pend_state[j] = LOADING;
            }
        }
        if (rc != 0 || remaining == 0)
            break;
        if (!swept) {
            /* this layer's experts are pinned: queued prefetches for it (or
             * earlier layers) that nobody pinned were wrong predictions */
            moe_expert_cache_cancel_stale(m->cache, il);
            swept = true;
        }
        int nw = 0;
        for (int j = 0; j < np; j++)
            if (m->pend_state[j] == LOADING) {
                wl[nw] = il;
                we[nw] = m->pend_e[j];
                wi[nw++] = j;
            }
        if (nw == 0) {
            /* nothing of ours in flight: the slots are held by prefetches
             * (or by another user); wait for one to become usable */
            if (moe_expert_cache_wait_slot(m->cache) != 0) {
                rc = moe_diag_set(&d, MOE_ELIMIT, "expert cache: every slot is pinned; no slot for"
                                  " layer %d", il);
                break;
            }
            continue;
        }
        int which = 0;
        const uint8_t *blob = NULL;
        rc = moe_expert_cache_wait_any(m->cache, wl, we, nw, &which, &blob, &d);
        const int j = wi[which];
        if (rc == 0)
            rc = expert_ffn_cached(m, L, m->pend_e[j], blob);
        moe_expert_cache_release(m->cache, il, m->pend_e[j]);
        m->pend_state[j] = DONE;
        remaining--;
    }
    if (rc != 0) {
        /* unpin what this layer still holds; loads in flight finish into
         * unpinned slots and stay cached */
        for (int j = 0; j < np; j++)
            if (m->pend_state[j] == LOADING)
                moe_expert_cache_release(m->cache, il, m->pend_e[j]);
        /* the load's own message names the file, layer, expert and offset */
        if (d.code != 0)
            moe_diag_set(diag, rc, "%s", d.msg);
        else
            moe_diag_set(diag, rc, "layer %d: experts: %s", il, moe_strerror(rc));
    }
    return rc;
}

static void history_learn(struct moe_model *m, int il, int64_t n);

static int moe_block(struct moe_model *m, int il, int64_t n, int64_t tok0, moe_route_fn route,
                     void *ud, struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    struct layer *L = &m->layers[il];
    const int K = c->n_expert_used, E = c->n_embd;

    if (!L->moe)
        return dense_ffn(m, il, n);
    TRY(ops->rmsnorm(be, m->xn, m->x, L->ffn_norm, n, E, c->rms_eps));
    TRY(ops->matmul(be, m->rlogits, &L->router, L->router_bias, m->xn, n));
    struct moe_gating_params gp = c->gating;
    gp.bias = L->sel_bias;
    gp.n_group = c->n_expert_groups;
    gp.n_group_used = c->n_group_used;
    TRY(ops->router_topk(be, m->rlogits, n, &gp, m->ids, m->weights));
    if (route)
        for (int64_t t = 0; t < n; t++)
            route(ud, tok0 + t, il, m->ids + t * K, m->weights + t * K, K);
    if (m->prefetch_history)
        history_learn(m, il, n);

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

    if (m->cache != NULL) {
        TRY(experts_cached(m, il, n, diag));
    } else {
        for (int e = 0; e < c->n_expert; e++) {
            if (m->expert_count[e] == 0)
                continue;
            struct moe_weight wg = expert_weight(&L->gate, e), wu = expert_weight(&L->up, e);
            struct moe_weight wd = expert_weight(&L->down, e);
            const int64_t F = c->n_ff_exp;
            TRY(expert_ffn(m, e, &wg, &wu, &wd, L->gate_b ? L->gate_b + e * F : NULL,
                           L->up_b ? L->up_b + e * F : NULL, L->down_b ? L->down_b + (int64_t)e * E : NULL));
        }
    }

    /* moe_out = sum over slots of weight * expert output, then the residual. */
    TRY(ops->fill(be, m->tmp, 0.0f, n * E));
    for (int64_t t = 0; t < n; t++) {
        float *out = m->tmp + t * E;
        for (int k = 0; k < K; k++)
            TRY(ops->axpy(be, out, m->weights[t * K + k], m->slot_out + (size_t)(t * K + k) * E, E));
    }
    if (c->n_ff_shexp > 0) {
        TRY(ops->matmul(be, m->ge, &L->sh_gate, NULL, m->xn, n));
        TRY(ops->matmul(be, m->ue, &L->sh_up, NULL, m->xn, n));
        TRY(ops->swiglu(be, m->ge, m->ge, m->ue, n * c->n_ff_shexp));
        TRY(ops->matmul(be, m->de, &L->sh_down, NULL, m->ge, n));
        if (L->sh_gate_inp) {
            struct moe_weight gi = {
                .data = L->sh_gate_inp, .dtype = MOE_DTYPE_F32, .n_in = E, .n_out = 1,
                .row_bytes = (size_t)E * sizeof(float),
            };
            TRY(ops->matmul(be, m->sh_tmp, &gi, NULL, m->xn, n));
            TRY(ops->gate_rows(be, m->de, m->sh_tmp, n, E));
        }
        TRY(ops->add(be, m->tmp, m->tmp, m->de, n * E));
    }
    TRY(ops->add(be, m->x, m->x, m->tmp, n * E));
    return 0;
}

/* Learns the transitions of layer il from this batch's routing, token by
 * token: the previous token's choice at il, and for the batch's last token
 * (the only one whose choice at il - 1 is still remembered) this token's
 * choice at il - 1. */
static void history_learn(struct moe_model *m, int il, int64_t n)
{
    const int K = m->cfg.n_expert_used;
    const int prev_l = il - 1 >= 0 && m->layers[il - 1].moe ? il - 1 : -1;
    for (int64_t t = 0; t < n; t++)
        moe_history_learn(&m->hist, il, m->ids + t * K, t == n - 1 ? prev_l : -1);
}

/* History predictor: after layer il, predict layer il + d's experts from the
 * counts: what followed the previous token's experts at that layer, plus (for
 * the next layer) what followed this token's experts at layer il. */
static void prefetch_history(struct moe_model *m, int il)
{
    const struct moe_model_cfg *c = &m->cfg;
    const int max_inflight = c->n_expert_used * m->prefetch_depth;
    int32_t ids[1024];
    if (c->n_expert_used > 1024)
        return;
    for (int d = 1; d <= m->prefetch_depth && il + d < c->n_layer; d++) {
        const int l = il + d;
        if (!m->layers[l].moe)
            continue;
        const int n = moe_history_predict(&m->hist, l, d == 1 && m->layers[il].moe ? il : -1, ids);
        for (int k = 0; k < n; k++)
            moe_expert_cache_prefetch(m->cache, l, ids[k], m->step, max_inflight);
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
    const int max_inflight = c->n_expert_used * m->prefetch_depth;
    for (int d = 1; d <= m->prefetch_depth && il + d < c->n_layer; d++) {
        const struct layer *L = &m->layers[il + d];
        if (!L->moe)
            continue;
        for (int64_t t = 0; t < n; t++) {
            int32_t ids[64];
            float w[64];
            float *logits = m->pf_logits;
            if (ops->rmsnorm(m->be, m->pf_x, m->x + t * E, L->ffn_norm, 1, E, c->rms_eps) ||
                ops->matmul(m->be, logits, &L->router, L->router_bias, m->pf_x, 1))
                return;
            struct moe_gating_params gp = c->gating;
            gp.bias = L->sel_bias;
            gp.n_group = c->n_expert_groups;
            gp.n_group_used = c->n_group_used;
            if (K > 64 || ops->router_topk(m->be, logits, 1, &gp, ids, w))
                return;
            for (int k = 0; k < K; k++)
                moe_expert_cache_prefetch(m->cache, il + d, ids[k], m->step, max_inflight);
        }
    }
}

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static bool prefetch_gov_on(const struct moe_model *m)
{
    if (m->prefetch_always)
        return true;
    return m->pf_phase == 0 || (m->pf_phase == 2 && m->pf_use);
}

static void prefetch_gov_step(struct moe_model *m, bool on, double dt)
{
    m->pf_steps[on]++;
    if (m->prefetch_always)
        return;
    if (m->pf_phase < 2) {
        m->pf_sum[on] += dt;
        m->pf_n[on]++;
    }
    if (--m->pf_left > 0)
        return;
    if (m->pf_phase == 0) {
        m->pf_phase = 1;
        m->pf_left = PF_PROBE;
    } else if (m->pf_phase == 1) {
        /* prefetch must win clearly: it costs disk bandwidth */
        const double on_t = m->pf_sum[1] / (m->pf_n[1] ? m->pf_n[1] : 1);
        const double off_t = m->pf_sum[0] / (m->pf_n[0] ? m->pf_n[0] : 1);
        m->pf_use = on_t < 0.97 * off_t;
        m->pf_phase = 2;
        m->pf_left = PF_EXPLOIT;
    } else {
        m->pf_phase = 0;
        m->pf_left = PF_PROBE;
        m->pf_sum[0] = m->pf_sum[1] = 0;
        m->pf_n[0] = m->pf_n[1] = 0;
    }
}

bool moe_model_prefetch_steps(const struct moe_model *m, uint64_t *on, uint64_t *off)
{
    *on = m->pf_steps[1];
    *off = m->pf_steps[0];
    return m->prefetch_depth > 0;
}

/* Runs the n tokens laid out by m->segs (positions in m->pos, embeddings
 * gathered by the caller into m->x) through every layer. */
static int forward_layers(struct moe_model *m, int64_t n, int64_t tok0, moe_route_fn route, void *ud,
                          struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const bool decode = m->prefetch_depth > 0 && n <= 4;
    const bool pf = decode && prefetch_gov_on(m);
    const double t0 = decode ? mono_s() : 0;
    for (int il = 0; il < c->n_layer; il++) {
        TRY(attention_block(m, il, n));
        TRY(moe_block(m, il, n, tok0, route, ud, diag));
        if (pf) {
            if (m->prefetch_history)
                prefetch_history(m, il);
            else
                prefetch_gate(m, il, n);
        }
    }
    if (decode)
        prefetch_gov_step(m, pf, mono_s() - t0);
    for (int i = 0; i < m->n_segs; i++)
        m->segs[i].s->pos += (int)m->segs[i].n;
    m->step++;
    return 0;
}

/* Logits of n normed rows xn (backend memory) into host memory, through
 * the backend's logits buffer logit_rows rows at a time. */
static int output_logits(struct moe_model *m, const float *xn, int64_t n, float *host)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    for (int64_t r0 = 0; r0 < n; r0 += m->logit_rows) {
        const int64_t nr = n - r0 < m->logit_rows ? n - r0 : m->logit_rows;
        TRY(ops->matmul(m->be, m->logits_dev, &m->output, NULL, xn + r0 * c->n_embd, nr));
        TRY(ops->download(m->be, host + r0 * c->n_vocab, m->logits_dev,
                          (size_t)nr * (size_t)c->n_vocab * sizeof(float)));
    }
    return 0;
}

static int forward_batch(struct moe_model *m, struct moe_seq *s, const int32_t *tokens, int64_t n,
                         int64_t tok0, float *logits, bool all_logits, moe_route_fn route, void *ud,
                         struct moe_diag *diag)
{
    const struct moe_model_cfg *c = &m->cfg;
    const struct moe_backend_ops *ops = m->be->ops;
    struct moe_backend *be = m->be;
    for (int64_t t = 0; t < n; t++)
        m->pos[t] = s->pos + (int32_t)t;
    m->segs[0] = (struct seg){ .s = s, .off = 0, .n = n };
    m->n_segs = 1;
    TRY(ops->get_rows(be, m->x, &m->tok_embd, tokens, (int)n));
    TRY(forward_layers(m, n, tok0, route, ud, diag));
    if (logits == NULL)
        return 0;
    if (all_logits) {
        TRY(ops->rmsnorm(be, m->xn, m->x, m->output_norm, n, c->n_embd, c->rms_eps));
        TRY(output_logits(m, m->xn, n, logits + tok0 * c->n_vocab));
    } else {
        const float *last = m->x + (n - 1) * c->n_embd;
        TRY(ops->rmsnorm(be, m->xn, last, m->output_norm, 1, c->n_embd, c->rms_eps));
        TRY(output_logits(m, m->xn, 1, logits));
    }
    return 0;
}

int moe_model_forward_multi(struct moe_model *m, const struct moe_batch_seg *segs, int n_segs,
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
    int64_t off = 0;
    int rc = 0;
    for (int i = 0; i < n_segs && rc == 0; i++) {
        const struct moe_batch_seg *g = &segs[i];
        m->segs[i] = (struct seg){ .s = g->seq, .off = off, .n = g->n };
        for (int t = 0; t < g->n; t++)
            m->pos[off + t] = g->seq->pos + t;
        rc = ops->get_rows(be, m->x + off * c->n_embd, &m->tok_embd, g->tokens, g->n);
        off += g->n;
    }
    m->n_segs = n_segs;
    if (rc == 0)
        rc = forward_layers(m, n, 0, NULL, NULL, diag);
    for (int i = 0; i < n_segs && rc == 0; i++) {
        const struct moe_batch_seg *g = &segs[i];
        if (g->logits == NULL)
            continue;
        const float *last = m->x + (m->segs[i].off + g->n - 1) * c->n_embd;
        rc = ops->rmsnorm(be, m->xn, last, m->output_norm, 1, c->n_embd, c->rms_eps);
        if (rc == 0)
            rc = output_logits(m, m->xn, 1, g->logits);
    }
    if (rc)
        return moe_diag_set(diag, rc, "forward of %d sequences (%" PRId64 " tokens): %s", n_segs,
                            n, moe_strerror(rc));
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
        int rc = forward_batch(m, s, tokens + t0, nb, t0, lg, all_logits, route, route_ud, diag);
        if (rc)
            return moe_diag_set(diag, rc, "forward at position %d: %s", s->pos, moe_strerror(rc));
    }
    return 0;
}

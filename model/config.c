/* The forward pass's configuration from GGUF metadata: hyper-parameters
 * loaded and validated by model/hparams.c, the architecture's row in
 * model/arch.c, and what follows from them (attention dims, gating, RoPE
 * and YaRN), with the engine's own limits. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "io/gguf.h"
#include "model/hparams.h"
#include "model/model-impl.h"

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

/* Gemma 4's layers (rows with swa_pattern): which slide, each one's KV
 * heads and head dim; the buffers and KV rows take the largest. */
static int read_swa_layers(const struct moe_gguf *g, const struct moe_hparams *hp,
                           struct moe_model_cfg *c, const char *path, struct moe_diag *diag)
{
    const char *arch = c->arch_name;
    if (hp->n_kv_shared_layers > 0)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.attention.shared_kv_layers = %u: layers"
                            " reusing another layer's KV cache (Gemma 4 E2B/E4B) are not supported",
                            path, arch, hp->n_kv_shared_layers);
    if (hp->n_embd_per_layer > 0)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.embedding_length_per_layer_input = %u:"
                            " per-layer embeddings (Gemma 4 E2B/E4B) are not supported", path, arch,
                            hp->n_embd_per_layer);
    if (hp->rope_scaling_type[0] && strcmp(hp->rope_scaling_type, "none") != 0)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.rope.scaling.type = '%s': RoPE scaling"
                            " is not supported for %s", path, arch, hp->rope_scaling_type, arch);
    if (hp->sliding_window == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s.attention.sliding_window = 0, expected at"
                            " least 1", path, arch);
    const uint32_t L = hp->n_layer;
    uint32_t v[MOE_MAX_LAYERS];
    int rc = moe_hparams_per_layer(g, arch, "attention.sliding_window_pattern", L, 1, v, diag);
    if (rc)
        return rc; /* present: validate() requires it */
    for (uint32_t i = 0; i < L; i++)
        c->layer_swa[i] = (uint8_t)v[i];
    rc = moe_hparams_per_layer(g, arch, "attention.head_count_kv", L, 1u << 14, v, diag);
    if (rc == -ENOENT) {
        for (uint32_t i = 0; i < L; i++)
            v[i] = hp->n_head;
        rc = 0;
    }
    if (rc)
        return rc;
    const int hd_swa = (int)hp->head_dim_swa, n_rot_swa = (int)hp->n_rot_swa;
    if (hd_swa <= 0 || hd_swa % 2 != 0 || n_rot_swa <= 0 || n_rot_swa % 2 != 0 || n_rot_swa > hd_swa)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: %s sliding layers: key_length_swa %d,"
                            " rope.dimension_count_swa %d: expected even, positive, rotary <= head",
                            path, arch, hd_swa, n_rot_swa);
    c->head_dim_full = c->head_dim;
    c->head_dim_swa = hd_swa;
    c->n_rot_swa = n_rot_swa;
    c->rope_base_swa = hp->rope_freq_base_swa > 0.0f ? hp->rope_freq_base_swa : 10000.0f;
    c->swa_window = (int)hp->sliding_window;
    int64_t row = 0;
    int max_kv = 0;
    for (uint32_t i = 0; i < L; i++) {
        if (v[i] == 0 || c->n_head % (int)v[i] != 0)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: %s.attention.head_count_kv of layer %u = %u:"
                                " expected a divisor of head_count %d", path, arch, i, v[i], c->n_head);
        c->layer_n_head_kv[i] = (uint16_t)v[i];
        const int64_t r = (int64_t)v[i] * (c->layer_swa[i] ? hd_swa : c->head_dim_full);
        row = r > row ? r : row;
        max_kv = (int)v[i] > max_kv ? (int)v[i] : max_kv;
    }
    c->head_dim = c->head_dim_v = c->head_dim_full > hd_swa ? c->head_dim_full : hd_swa;
    c->n_head_kv = max_kv;
    c->k_row = c->v_row = row;
    c->embd_scale = sqrtf((float)c->n_embd);
    c->logit_softcap = hp->final_logit_softcap;
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
    if (ad->gating_func_key) {
        const int f = hp->expert_gating_func;
        if (f != 0 && f != 1 && f != 2)
            return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.expert_gating_func %d, expected"
                                " 1 (softmax) or 2 (sigmoid)", path, c->arch_name, f);
        if (f != 0)
            c->gating.func = f == 2 ? MOE_GATING_SIGMOID : MOE_GATING_SOFTMAX;
        return 0;
    }
    if (!ad->gating_from_keys)
        return 0;
    /* absent or 0 (llama.cpp's NONE): the row's default */
    const int func = hp->expert_gating_func ? (int)hp->expert_gating_func
                                            : ad->gating == MOE_GATING_SIGMOID ? 2 : 1;
    if (func != 1 && func != 2)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.expert_gating_func %d, expected"
                            " 1 (softmax) or 2 (sigmoid)", path, c->arch_name, func);
    c->gating.func = func == 2 ? MOE_GATING_SIGMOID : MOE_GATING_SOFTMAX;
    c->gating.norm = hp->expert_weights_norm;
    c->gating.scale = hp->expert_weights_scale > 0.0f ? hp->expert_weights_scale : 1.0f;
    return 0;
}

/* Gated delta-net layers (qwen35moe), as llama.cpp's loader marks them:
 * attention.recurrent_layers when present (one flag per layer), else every
 * layer but each full_attention_interval-th. The attention layers' rotary
 * is llama.cpp's interleaved M-RoPE with rope.dimension_sections; for text
 * (positions t = h = w, the fourth 0) it equals NEOX over n_rot exactly
 * when every rotated pair falls in the t, h or w sections, which is what
 * the engine computes, so other section splits are refused. */
static int read_deltanet(const struct moe_gguf *g, const struct moe_hparams *hp,
                         struct moe_model_cfg *c, const char *path, struct moe_diag *diag)
{
    const char *arch = c->arch_name;
    c->deltanet = true;
    c->ssm_d_conv = (int)hp->ssm_d_conv;
    c->ssm_d_state = (int)hp->ssm_d_state;
    c->ssm_n_k = (int)hp->ssm_n_group;
    c->ssm_n_v = (int)hp->ssm_dt_rank;
    char key[160];
    snprintf(key, sizeof(key), "%s.attention.recurrent_layers", arch);
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    memset(c->recurrent_mask, 0, sizeof(c->recurrent_mask));
    if (kv != NULL) {
        const struct moe_gguf_value *v = &kv->value;
        const enum moe_gguf_type et = v->v.arr.elem_type;
        const size_t es = v->type == MOE_GGUF_ARRAY ? moe_gguf_type_size(et) : 0;
        if (v->type != MOE_GGUF_ARRAY || es == 0 || es > 8 || et == MOE_GGUF_FLOAT32 ||
            et == MOE_GGUF_FLOAT64 || v->v.arr.n < (uint64_t)c->n_layer)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' is not an array of %d flags",
                                path, key, c->n_layer);
        for (int il = 0; il < c->n_layer; il++) {
            uint64_t x = 0;
            memcpy(&x, (const uint8_t *)v->v.arr.data + (size_t)il * es, es);
            if (x != 0)
                c->recurrent_mask[il / 64] |= 1ull << (il % 64);
        }
    } else {
        const int every = (int)hp->full_attn_interval;
        for (int il = 0; il < c->n_layer; il++)
            if ((il + 1) % every != 0)
                c->recurrent_mask[il / 64] |= 1ull << (il % 64);
    }
    c->n_recurrent = 0;
    for (int il = 0; il < c->n_layer; il++)
        c->n_recurrent += moe_model_cfg_recurrent(c, il);
    const uint32_t *sec = hp->rope_sections;
    const uint32_t sect_dims = sec[0] + sec[1] + sec[2] + sec[3];
    if (sect_dims == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key '%s.rope.dimension_sections'"
                            " (required for architecture '%s')", path, arch, arch);
    for (uint32_t i = 0; i < (uint32_t)c->rope.n_rot / 2; i++) {
        const uint32_t k = i % sect_dims;
        const bool thw = (k % 3 == 0 && k < 3 * sec[0]) || (k % 3 == 1 && k < 3 * sec[1]) ||
                         (k % 3 == 2 && k < 3 * sec[2]);
        if (!thw)
            return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: %s.rope.dimension_sections [%u, %u,"
                                " %u, %u] leave rotary pair %u of %d outside the t/h/w sections;"
                                " only splits where every pair is in one (as released models)"
                                " are supported", path, arch, sec[0], sec[1], sec[2], sec[3], i,
                                c->rope.n_rot / 2);
    }
    return 0;
}

/* The forward pass's configuration: hyper-parameters loaded and validated
 * by model/hparams.c, the architecture's row, and the few limits of the
 * engine itself. */
int moe_model_read_cfg(const struct moe_gguf *g, struct moe_model_cfg *c, struct moe_diag *diag)
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
    c->n_layer = (int)(hp.n_layer - hp.n_layer_nextn); /* the trunk: MTP layers are not run */
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
    if ((rc = read_yarn(g, c, yarn, factor, diag)))
        return rc;
    if (c->ad->deltanet && (rc = read_deltanet(g, &hp, c, path, diag)))
        return rc;
    c->n_kv_layers = c->n_layer - c->n_recurrent;
    if (c->ad->kq_scale_one)
        c->kq_scale = 1.0f;
    if (c->ad->swa_pattern && (rc = read_swa_layers(g, &hp, c, path, diag)))
        return rc;
    /* the vocabulary size from the embedding matrix, which must exist */
    const struct moe_gguf_tensor *te = moe_gguf_find_tensor(g, "token_embd.weight");
    if (te == NULL)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing tensor 'token_embd.weight'", path);
    if (te->n_dims != 2 || te->ne[0] != (uint64_t)c->n_embd || te->ne[1] > (1u << 24))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor 'token_embd.weight' has shape [%" PRIu64
                            ", %" PRIu64 "], expected [%d, n_vocab]", path, te->ne[0], te->ne[1],
                            c->n_embd);
    c->n_vocab = (int)te->ne[1];
    return 0;
}

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "model/hparams.h"

/* Values above this are absurd for any dimension we know of and would only
 * overflow size arithmetic later. */
#define DIM_CAP (1u << 26)
/* Tighter caps for counts that size per-head or per-expert tables. The
 * largest real models have 128 heads and 384 experts. */
#define HEAD_CAP (1u << 14)
#define HEAD_DIM_CAP (1u << 16)
#define EXPERT_CAP (1u << 16)
#define SHARED_EXPERT_CAP 256u

/* ---- reading keys ------------------------------------------------------ */

static int u32_key(const struct moe_gguf *g, const char *arch, const char *suffix, uint32_t *out,
                   uint32_t cap, struct moe_diag *diag)
{
    char key[160];
    if (arch)
        snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    else
        snprintf(key, sizeof(key), "%s", suffix);
    uint32_t v;
    int rc = moe_gguf_get_u32(g, key, &v, diag);
    if (rc == -ENOENT)
        return 0;
    if (rc)
        return rc;
    if (v > cap)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' = %u, expected at most %u",
                            moe_gguf_path(g), key, v, cap);
    *out = v;
    return 0;
}

static int f32_key(const struct moe_gguf *g, const char *arch, const char *suffix, float *out,
                   struct moe_diag *diag)
{
    char key[160];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    float v;
    int rc = moe_gguf_get_f32(g, key, &v, diag);
    if (rc == -ENOENT)
        return 0;
    if (rc)
        return rc;
    if (v != v || v < 0.0f || v > 1e30f)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' = %g, expected a finite non-negative"
                            " number", moe_gguf_path(g), key, (double)v);
    *out = v;
    return 0;
}

static int str_key(const struct moe_gguf *g, const char *key, char *out, size_t cap,
                   struct moe_diag *diag)
{
    struct moe_gguf_str s;
    int rc = moe_gguf_get_str(g, key, &s, diag);
    if (rc == -ENOENT)
        return 0;
    if (rc)
        return rc;
    size_t n = s.len < cap - 1 ? (size_t)s.len : cap - 1;
    memcpy(out, s.ptr, n);
    out[n] = '\0';
    /* keep it printable: names come from the file */
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)out[i] < 0x20)
            out[i] = '?';
    return 0;
}

/* Element i of an integer or bool array (elem types checked by the caller). */
static uint64_t arr_elem(const struct moe_gguf_value *v, uint64_t i)
{
    const uint8_t *p = (const uint8_t *)v->v.arr.data + i * moe_gguf_type_size(v->v.arr.elem_type);
    switch (v->v.arr.elem_type) {
    case MOE_GGUF_UINT8: case MOE_GGUF_BOOL: return p[0];
    case MOE_GGUF_INT8: return (uint64_t)(int64_t)(int8_t)p[0];
    case MOE_GGUF_UINT16: { uint16_t x; memcpy(&x, p, 2); return x; }
    case MOE_GGUF_INT16: { int16_t x; memcpy(&x, p, 2); return (uint64_t)(int64_t)x; }
    case MOE_GGUF_UINT32: { uint32_t x; memcpy(&x, p, 4); return x; }
    case MOE_GGUF_INT32: { int32_t x; memcpy(&x, p, 4); return (uint64_t)(int64_t)x; }
    case MOE_GGUF_UINT64: { uint64_t x; memcpy(&x, p, 8); return x; }
    default: { int64_t x; memcpy(&x, p, 8); return (uint64_t)x; }
    }
}

int moe_hparams_per_layer(const struct moe_gguf *g, const char *arch, const char *suffix,
                          uint32_t n_layer, uint32_t cap, uint32_t *vals, struct moe_diag *diag)
{
    char key[160];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    if (kv == NULL)
        return -ENOENT;
    if (kv->value.type != MOE_GGUF_ARRAY) {
        uint32_t v = 0;
        int rc = u32_key(g, arch, suffix, &v, cap, diag);
        if (rc)
            return rc;
        for (uint32_t i = 0; i < n_layer; i++)
            vals[i] = v;
        return 0;
    }
    const enum moe_gguf_type t = kv->value.v.arr.elem_type;
    if (t == MOE_GGUF_FLOAT32 || t == MOE_GGUF_FLOAT64 || t == MOE_GGUF_STRING || t == MOE_GGUF_ARRAY)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' is an array of %s, expected integers"
                            " or bools", moe_gguf_path(g), key, moe_gguf_type_name(t));
    if (kv->value.v.arr.n != n_layer)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' has %" PRIu64 " entries, expected one"
                            " per layer (%u)", moe_gguf_path(g), key, kv->value.v.arr.n, n_layer);
    for (uint32_t i = 0; i < n_layer; i++) {
        const uint64_t v = arr_elem(&kv->value, i);
        if (v > cap)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' entry %u = %" PRId64 ", expected"
                                " 0..%u", moe_gguf_path(g), key, i, (int64_t)v, cap);
        vals[i] = (uint32_t)v;
    }
    return 0;
}

/* Gemma 4's keys (rows with swa_pattern): the sliding layers' dims and
 * base, per-layer head_count_kv, soft-capping, the dense variants' keys. */
static int load_swa_keys(struct moe_hparams *hp, const struct moe_gguf *g, struct moe_diag *diag)
{
    const char *a = hp->arch;
    int rc;
    hp->final_logit_softcap = 30.0f; /* llama.cpp's default when the key is absent */
    if ((rc = u32_key(g, a, "attention.key_length_swa", &hp->head_dim_swa, DIM_CAP, diag)) ||
        (rc = u32_key(g, a, "attention.value_length_swa", &hp->head_dim_v_swa, DIM_CAP, diag)) ||
        (rc = u32_key(g, a, "rope.dimension_count_swa", &hp->n_rot_swa, DIM_CAP, diag)) ||
        (rc = u32_key(g, a, "attention.shared_kv_layers", &hp->n_kv_shared_layers, DIM_CAP, diag)) ||
        (rc = u32_key(g, a, "embedding_length_per_layer_input", &hp->n_embd_per_layer, DIM_CAP, diag)) ||
        (rc = f32_key(g, a, "rope.freq_base_swa", &hp->rope_freq_base_swa, diag)) ||
        (rc = f32_key(g, a, "final_logit_softcapping", &hp->final_logit_softcap, diag)))
        return rc;
    if (hp->n_layer == 0 || hp->n_layer > MOE_MAX_LAYERS)
        return 0; /* validate() names block_count */
    uint32_t v[MOE_MAX_LAYERS];
    rc = moe_hparams_per_layer(g, a, "attention.sliding_window_pattern", hp->n_layer, 1, v, diag);
    if (rc && rc != -ENOENT)
        return rc;
    for (uint32_t i = 0; rc == 0 && i < hp->n_layer; i++)
        hp->n_layer_swa += v[i];
    rc = moe_hparams_per_layer(g, a, "attention.head_count_kv", hp->n_layer, HEAD_CAP, v, diag);
    if (rc && rc != -ENOENT)
        return rc;
    if (rc == 0) {
        hp->n_head_kv = 0;
        hp->n_head_kv_min = HEAD_CAP;
        for (uint32_t i = 0; i < hp->n_layer; i++) {
            hp->n_head_kv = v[i] > hp->n_head_kv ? v[i] : hp->n_head_kv;
            hp->n_head_kv_min = v[i] < hp->n_head_kv_min ? v[i] : hp->n_head_kv_min;
        }
    }
    return 0;
}

int moe_hparams_load(struct moe_hparams *hp, const struct moe_gguf *g, struct moe_diag *diag)
{
    memset(hp, 0, sizeof(*hp));
    int rc;
    if ((rc = str_key(g, "general.architecture", hp->arch, sizeof(hp->arch), diag)) ||
        (rc = str_key(g, "general.name", hp->name, sizeof(hp->name), diag)) ||
        (rc = u32_key(g, NULL, "general.file_type", &hp->file_type, 1u << 16, diag)) ||
        (rc = str_key(g, "tokenizer.ggml.model", hp->tokenizer_model, sizeof(hp->tokenizer_model), diag)) ||
        (rc = str_key(g, "tokenizer.ggml.pre", hp->tokenizer_pre, sizeof(hp->tokenizer_pre), diag)))
        return rc;
    const char *a = hp->arch[0] ? hp->arch : NULL;
    if (a != NULL) {
        struct { const char *k; uint32_t *v; } keys[] = {
            { "context_length", &hp->n_ctx_train },
            { "embedding_length", &hp->n_embd },
            { "block_count", &hp->n_layer },
            { "feed_forward_length", &hp->n_ff },
            { "expert_feed_forward_length", &hp->n_ff_exp },
            { "expert_shared_feed_forward_length", &hp->n_ff_shexp },
            { "attention.head_count", &hp->n_head },
            { "attention.head_count_kv", &hp->n_head_kv },
            { "attention.key_length", &hp->head_dim },
            { "attention.value_length", &hp->head_dim_v },
            { "rope.dimension_count", &hp->n_rot },
            { "rope.scaling.original_context_length", &hp->rope_scaling_orig_ctx },
            { "expert_count", &hp->n_expert },
            { "expert_used_count", &hp->n_expert_used },
            { "expert_shared_count", &hp->n_expert_shared },
            { "leading_dense_block_count", &hp->n_layer_dense_lead },
            { "nextn_predict_layers", &hp->n_layer_nextn },
            { "expert_group_count", &hp->n_expert_groups },
            { "expert_group_used_count", &hp->n_group_used },
            { "expert_gating_func", &hp->expert_gating_func },
            { "attention.q_lora_rank", &hp->q_lora_rank },
            { "attention.kv_lora_rank", &hp->kv_lora_rank },
            { "attention.key_length_mla", &hp->key_length_mla },
            { "attention.value_length_mla", &hp->value_length_mla },
            { "attention.sliding_window", &hp->sliding_window },
            { "vocab_size", &hp->n_vocab },
            { "ssm.conv_kernel", &hp->ssm_d_conv },
            { "ssm.inner_size", &hp->ssm_d_inner },
            { "ssm.state_size", &hp->ssm_d_state },
            { "ssm.time_step_rank", &hp->ssm_dt_rank },
            { "ssm.group_count", &hp->ssm_n_group },
            { "full_attention_interval", &hp->full_attn_interval },
        };
        const struct moe_arch_desc *row = moe_arch_desc_find(a);
        const bool kv_arr = row != NULL && row->swa_pattern;
        for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
            if (kv_arr && keys[i].v == &hp->n_head_kv)
                continue; /* may be an array per layer: load_swa_keys */
            if ((rc = u32_key(g, a, keys[i].k, keys[i].v, DIM_CAP, diag)))
                return rc;
        }
        if (kv_arr && (rc = load_swa_keys(hp, g, diag)))
            return rc;
        if ((rc = f32_key(g, a, "attention.layer_norm_rms_epsilon", &hp->rms_eps, diag)) ||
            (rc = f32_key(g, a, "attention.layer_norm_epsilon", &hp->norm_eps, diag)) ||
            (rc = f32_key(g, a, "rope.freq_base", &hp->rope_freq_base, diag)) ||
            (rc = f32_key(g, a, "rope.scaling.factor", &hp->rope_scaling_factor, diag)) ||
            (rc = f32_key(g, a, "rope.scaling.attn_factor", &hp->rope_scaling_attn_factor, diag)) ||
            (rc = f32_key(g, a, "rope.scaling.yarn_log_multiplier", &hp->rope_yarn_log_mul, diag)) ||
            (rc = f32_key(g, a, "expert_weights_scale", &hp->expert_weights_scale, diag)))
            return rc;
        char key[160];
        snprintf(key, sizeof(key), "%s.rope.scaling.type", a);
        if ((rc = str_key(g, key, hp->rope_scaling_type, sizeof(hp->rope_scaling_type), diag)))
            return rc;
        snprintf(key, sizeof(key), "%s.expert_weights_norm", a);
        rc = moe_gguf_get_bool(g, key, &hp->expert_weights_norm, diag);
        if (rc && rc != -ENOENT)
            return rc;
        snprintf(key, sizeof(key), "%s.rope.dimension_sections", a);
        const struct moe_gguf_kv *sec = moe_gguf_find_kv(g, key);
        if (sec != NULL) {
            const struct moe_gguf_value *v = &sec->value;
            const enum moe_gguf_type et = v->v.arr.elem_type;
            if (v->type != MOE_GGUF_ARRAY || v->v.arr.n > 4 ||
                (et != MOE_GGUF_INT32 && et != MOE_GGUF_UINT32))
                return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' is not an array of at most 4"
                                    " 32-bit integers", moe_gguf_path(g), key);
            for (uint64_t i = 0; i < v->v.arr.n; i++) {
                uint32_t x;
                memcpy(&x, (const uint8_t *)v->v.arr.data + 4 * i, 4);
                if (x > HEAD_DIM_CAP)
                    return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' element %" PRIu64 " = %d,"
                                        " expected 0..%u", moe_gguf_path(g), key, i, (int32_t)x,
                                        HEAD_DIM_CAP);
                hp->rope_sections[i] = x;
            }
        }
    }
    const struct moe_arch_desc *ad = moe_arch_desc_find(hp->arch);
    if (hp->n_ff_exp == 0 || (ad != NULL && ad->experts_from_ff))
        hp->n_ff_exp = hp->n_ff; /* minimax-m2: llama.cpp shapes experts by n_ff */
    if (hp->head_dim == 0 && hp->n_head > 0)
        hp->head_dim = hp->n_embd / hp->n_head;
    if (hp->head_dim_v == 0)
        hp->head_dim_v = hp->head_dim;
    if (hp->n_head_kv == 0)
        hp->n_head_kv = hp->n_head;
    if (hp->n_head_kv_min == 0)
        hp->n_head_kv_min = hp->n_head_kv;
    if (hp->n_rot == 0)
        hp->n_rot = hp->head_dim;
    if (ad != NULL && ad->shexp_width_ff && hp->n_ff_shexp == 0)
        hp->n_ff_shexp = hp->n_ff; /* qwen35moe: llama.cpp's default width */
    if (ad != NULL && ad->deltanet && hp->full_attn_interval == 0)
        hp->full_attn_interval = 4;
    if (ad != NULL && ad->swa_pattern) {
        if (hp->head_dim_swa == 0)
            hp->head_dim_swa = hp->head_dim;
        if (hp->head_dim_v_swa == 0)
            hp->head_dim_v_swa = hp->head_dim_v;
        if (hp->n_rot_swa == 0)
            hp->n_rot_swa = hp->n_rot;
    }
    if (ad != NULL && ad->shared_count_required) /* llama.cpp's glm4moe ignores the width key */
        hp->n_ff_shexp = hp->n_expert_shared * hp->n_ff_exp;
    else if (hp->n_ff_shexp == 0 && hp->n_expert_shared > 0)
        hp->n_ff_shexp = hp->n_expert_shared * hp->n_ff_exp; /* deepseek2: n shared experts */
    if (hp->n_vocab == 0) {
        const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, "tokenizer.ggml.tokens");
        if (kv && kv->value.type == MOE_GGUF_ARRAY && kv->value.v.arr.n <= DIM_CAP)
            hp->n_vocab = (uint32_t)kv->value.v.arr.n;
    }
    if (hp->n_vocab == 0) {
        const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, "token_embd.weight");
        if (t && t->n_dims == 2 && t->ne[1] <= DIM_CAP)
            hp->n_vocab = (uint32_t)t->ne[1];
    }
    hp->is_moe = hp->n_expert > 0;
    if (hp->n_expert_used > hp->n_expert)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.expert_used_count' = %u exceeds"
                            " '%s.expert_count' = %u", moe_gguf_path(g), hp->arch, hp->n_expert_used,
                            hp->arch, hp->n_expert);
    return 0;
}

/* ---- architectures ----------------------------------------------------- */

const char *moe_hparams_supported_archs(char *buf, size_t cap)
{
    if (cap == 0)
        return buf;
    buf[0] = '\0';
    size_t len = 0;
    for (size_t i = 0; i < moe_arch_desc_count(); i++) {
        const struct moe_arch_desc *d = moe_arch_desc_at(i);
        if (!d->engine_supported)
            continue;
        int n = snprintf(buf + len, cap - len, "%s%s%s", len ? ", " : "", d->name,
                         d->always_moe ? "" : " (with experts)");
        if (n < 0 || (size_t)n >= cap - len)
            break; /* truncated, still terminated */
        len += (size_t)n;
    }
    return buf;
}

int moe_hparams_check_supported(const struct moe_hparams *hp, const char *path,
                                struct moe_diag *diag)
{
    char list[256];
    moe_hparams_supported_archs(list, sizeof(list));
    if (hp->arch[0] == '\0')
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key 'general.architecture'", path);
    const struct moe_arch_desc *d = moe_arch_desc_find(hp->arch);
    if (d == NULL)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: architecture '%s' is not supported;"
                            " supported: %s", path, hp->arch, list);
    if (!d->engine_supported)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: architecture '%s' is known but the engine"
                            " does not run it yet; supported: %s", path, hp->arch, list);
    if (!hp->is_moe)
        return moe_diag_set(diag, MOE_EUNSUPPORTED, "%s: architecture '%s' without experts"
                            " ('%s.expert_count' absent or 0) is a dense model; moed serves"
                            " mixture-of-experts models; supported: %s", path, hp->arch, hp->arch, list);
    return 0;
}

/* ---- validation -------------------------------------------------------- */

/* A key that must be present (required) or, when present, nonzero. The
 * value is read from the file: load() replaces some zeros by defaults. */
static int need_nonzero(const struct moe_gguf *g, const char *arch, const char *suffix,
                        bool required, struct moe_diag *diag)
{
    char key[160];
    snprintf(key, sizeof(key), "%s.%s", arch, suffix);
    uint64_t v = 0;
    int rc = moe_gguf_get_u64(g, key, &v, diag);
    if (rc == -ENOENT && required)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key '%s' (required for"
                            " architecture '%s')", moe_gguf_path(g), key, arch);
    if (rc == -ENOENT)
        return 0;
    if (rc)
        return rc;
    if (v == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s' = 0, expected at least 1",
                            moe_gguf_path(g), key);
    return 0;
}

static int over_cap(const struct moe_gguf *g, const char *arch, const char *suffix, uint32_t v,
                    uint32_t cap, struct moe_diag *diag)
{
    if (v <= cap)
        return 0;
    return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.%s' = %u, expected at most %u",
                        moe_gguf_path(g), arch, suffix, v, cap);
}

int moe_hparams_validate(const struct moe_hparams *hp, const struct moe_gguf *g,
                         struct moe_diag *diag)
{
    const char *path = moe_gguf_path(g);
    if (hp->arch[0] == '\0')
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key 'general.architecture'", path);
    const char *a = hp->arch;
    const struct moe_arch_desc *d = moe_arch_desc_find(a);
    const bool known = d != NULL;
    const bool moe = known && (d->always_moe || hp->n_expert > 0);
    int rc;

    /* Presence: required keys of a known architecture; for any, a key
     * present must not be 0 where 0 is meaningless (it would divide). */
    if ((rc = need_nonzero(g, a, "embedding_length", known, diag)) ||
        (rc = need_nonzero(g, a, "block_count", known, diag)) ||
        (rc = need_nonzero(g, a, "attention.head_count", known, diag)) ||
        (!(known && d->swa_pattern) &&   /* gemma4: an array too, checked below */
         (rc = need_nonzero(g, a, "attention.head_count_kv", false, diag))) ||
        (rc = need_nonzero(g, a, "attention.key_length", false, diag)) ||
        (rc = need_nonzero(g, a, "attention.value_length", false, diag)) ||
        (rc = need_nonzero(g, a, "rope.dimension_count", false, diag)) ||
        (rc = need_nonzero(g, a, "expert_count", moe, diag)) ||
        (rc = need_nonzero(g, a, "expert_used_count", moe, diag)))
        return rc;
    if (hp->n_expert > 0 && hp->n_expert_used == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.expert_count' = %u but"
                            " '%s.expert_used_count' is missing", path, a, hp->n_expert, a);
    if (hp->n_expert > 0 && hp->n_ff_exp == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key '%s.expert_feed_forward_length'"
                            " (or '%s.feed_forward_length'): the expert FFN width", path, a, a);
    if (known && (d->shared_count_required || d->experts_from_ff)) {
        /* required by llama.cpp's loader for these families (0 is allowed: no shared expert) */
        const struct { const char *k; bool need; } req[] = {
            { "expert_feed_forward_length", true },
            { "feed_forward_length", d->experts_from_ff },
            { "expert_shared_count", d->shared_count_required },
        };
        for (size_t i = 0; i < sizeof(req) / sizeof(req[0]); i++) {
            char key[160];
            snprintf(key, sizeof(key), "%s.%s", a, req[i].k);
            if (req[i].need && moe_gguf_find_kv(g, key) == NULL)
                return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key '%s' (required for"
                                    " architecture '%s')", path, key, a);
        }
    }
    if (known && d->deltanet) {
        const char *ssm[] = { "ssm.conv_kernel", "ssm.inner_size", "ssm.state_size",
                              "ssm.time_step_rank", "ssm.group_count" };
        for (size_t i = 0; i < sizeof(ssm) / sizeof(ssm[0]); i++)
            if ((rc = need_nonzero(g, a, ssm[i], true, diag)))
                return rc;
        if (hp->ssm_d_conv > 64 || hp->ssm_d_state > 1024 || hp->ssm_dt_rank > HEAD_CAP ||
            hp->ssm_d_inner != hp->ssm_d_state * hp->ssm_dt_rank ||
            hp->ssm_dt_rank % hp->ssm_n_group != 0)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: delta-net dims inconsistent: '%s.ssm."
                                "inner_size' = %u, state_size %u, time_step_rank %u, group_count %u,"
                                " conv_kernel %u (expected inner_size = state_size x time_step_rank,"
                                " group_count dividing time_step_rank, conv_kernel <= 64, state_size"
                                " <= 1024)", path, a, hp->ssm_d_inner, hp->ssm_d_state,
                                hp->ssm_dt_rank, hp->ssm_n_group, hp->ssm_d_conv);
    }
    if (known && d->swa_pattern) {
        /* required by llama.cpp's gemma4 loader */
        static const char *const req[] = {
            "attention.sliding_window_pattern", "attention.sliding_window",
            "attention.key_length_swa", "attention.value_length_swa",
            "attention.layer_norm_rms_epsilon", "embedding_length_per_layer_input",
        };
        for (size_t i = 0; i < sizeof(req) / sizeof(req[0]); i++) {
            char key[160];
            snprintf(key, sizeof(key), "%s.%s", a, req[i]);
            if (moe_gguf_find_kv(g, key) == NULL)
                return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key '%s' (required for"
                                    " architecture '%s')", path, key, a);
        }
        if (hp->head_dim != hp->head_dim_v || hp->head_dim_swa != hp->head_dim_v_swa)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: %s needs key_length = value_length (%u, %u)"
                                " and key_length_swa = value_length_swa (%u, %u)", path, a,
                                hp->head_dim, hp->head_dim_v, hp->head_dim_swa, hp->head_dim_v_swa);
        if (hp->n_rot_swa > hp->head_dim_swa)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.rope.dimension_count_swa' = %u"
                                " exceeds key_length_swa %u", path, a, hp->n_rot_swa, hp->head_dim_swa);
        if ((rc = over_cap(g, a, "attention.key_length_swa", hp->head_dim_swa, HEAD_DIM_CAP, diag)))
            return rc;
        if (hp->n_head_kv_min == 0 || (hp->n_head % hp->n_head_kv_min) != 0)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.attention.head_count_kv' has an"
                                " entry %u that does not divide head_count %u", path, a,
                                hp->n_head_kv_min, hp->n_head);
    }
    if (known && d->mla && hp->kv_lora_rank == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing key '%s.attention.kv_lora_rank'"
                            " (required for architecture '%s')", path, a, a);
    if (known && hp->n_vocab == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: no vocabulary size: none of '%s.vocab_size',"
                            " 'tokenizer.ggml.tokens' or tensor 'token_embd.weight'", path, a);

    /* Caps against absurd values. */
    if ((rc = over_cap(g, a, "block_count", hp->n_layer, MOE_MAX_LAYERS, diag)) ||
        (rc = over_cap(g, a, "attention.head_count", hp->n_head, HEAD_CAP, diag)) ||
        (rc = over_cap(g, a, "attention.key_length", hp->head_dim, HEAD_DIM_CAP, diag)) ||
        (rc = over_cap(g, a, "attention.value_length", hp->head_dim_v, HEAD_DIM_CAP, diag)) ||
        (rc = over_cap(g, a, "expert_count", hp->n_expert, EXPERT_CAP, diag)) ||
        (rc = over_cap(g, a, "expert_shared_count", hp->n_expert_shared, SHARED_EXPERT_CAP, diag)) ||
        (rc = over_cap(g, a, "expert_gating_func", hp->expert_gating_func, 3, diag)))
        return rc;

    /* Consistency. */
    if (hp->n_head > 0 && hp->head_dim == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: head dim is 0: '%s.attention.key_length' is"
                            " absent and '%s.embedding_length' = %u < '%s.attention.head_count' = %u",
                            path, a, a, hp->n_embd, a, hp->n_head);
    if (hp->n_head_kv > hp->n_head)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.attention.head_count_kv' = %u exceeds"
                            " '%s.attention.head_count' = %u", path, a, hp->n_head_kv, a, hp->n_head);
    if (hp->n_head_kv > 0 && hp->n_head % hp->n_head_kv != 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.attention.head_count' = %u is not a"
                            " multiple of '%s.attention.head_count_kv' = %u", path, a, hp->n_head,
                            a, hp->n_head_kv);
    if (hp->n_rot > hp->head_dim && hp->head_dim > 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.rope.dimension_count' = %u exceeds the"
                            " head dim %u", path, a, hp->n_rot, hp->head_dim);
    if (hp->n_expert_used > hp->n_expert)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.expert_used_count' = %u exceeds"
                            " '%s.expert_count' = %u", path, a, hp->n_expert_used, a, hp->n_expert);
    if (hp->n_layer_dense_lead > hp->n_layer)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.leading_dense_block_count' = %u exceeds"
                            " '%s.block_count' = %u", path, a, hp->n_layer_dense_lead, a, hp->n_layer);
    if (hp->n_layer_nextn > 0 && hp->n_layer_nextn >= hp->n_layer)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.nextn_predict_layers' = %u leaves no"
                            " layer of '%s.block_count' = %u", path, a, hp->n_layer_nextn, a,
                            hp->n_layer);
    if (moe && hp->n_layer_dense_lead == hp->n_layer)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.leading_dense_block_count' = %u leaves"
                            " no MoE layer of %u", path, a, hp->n_layer_dense_lead, hp->n_layer);
    if (hp->n_group_used > 0 && hp->n_expert_groups == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.expert_group_used_count' = %u without"
                            " '%s.expert_group_count'", path, a, hp->n_group_used, a);
    if (hp->n_expert_groups > 0 &&
        (hp->n_expert == 0 || hp->n_expert % hp->n_expert_groups != 0 ||
         hp->n_group_used > hp->n_expert_groups))
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.expert_group_count' = %u (used %u) does"
                            " not divide '%s.expert_count' = %u into groups", path, a,
                            hp->n_expert_groups, hp->n_group_used, a, hp->n_expert);
    if (hp->rms_eps >= 1.0f || hp->norm_eps >= 1.0f)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.attention.layer_norm_%sepsilon' = %g,"
                            " expected below 1", path, a, hp->rms_eps >= 1.0f ? "rms_" : "",
                            (double)(hp->rms_eps >= 1.0f ? hp->rms_eps : hp->norm_eps));
    return 0;
}

/* The part of a tensor name after "blk.N.", or NULL. */
static const char *layer_suffix(const char *name)
{
    if (moe_tensor_layer(name) < 0)
        return NULL;
    const char *p = strchr(name + 4, '.');
    return p ? p + 1 : NULL;
}

static void shape_str(char *buf, size_t cap, const struct moe_gguf_tensor *t)
{
    size_t len = 0;
    buf[0] = '\0';
    for (uint32_t i = 0; i < t->n_dims && len < cap; i++) {
        int n = snprintf(buf + len, cap - len, "%s%" PRIu64, i ? ", " : "", t->ne[i]);
        if (n < 0)
            break;
        len += (size_t)n;
    }
}

static int want_shape(const struct moe_gguf *g, const struct moe_gguf_tensor *t, uint32_t n_dims,
                      const uint64_t *ne, const char *what, struct moe_diag *diag)
{
    bool ok = t->n_dims == n_dims;
    for (uint32_t i = 0; ok && i < n_dims; i++)
        ok = t->ne[i] == ne[i];
    if (ok)
        return 0;
    char have[96];
    shape_str(have, sizeof(have), t);
    return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor '%s' has shape [%s], expected %s",
                        moe_gguf_path(g), t->name, have, what);
}

int moe_hparams_check_tensors(const struct moe_hparams *hp, const struct moe_gguf *g,
                              struct moe_diag *diag)
{
    const char *path = moe_gguf_path(g);
    const uint64_t n = moe_gguf_n_tensors(g);
    if (n == 0)
        return 0;
    char what[160];
    int rc;
    const uint64_t emb[2] = { hp->n_embd, hp->n_vocab };
    snprintf(what, sizeof(what), "[n_embd %u, n_vocab %u]", hp->n_embd, hp->n_vocab);
    const struct moe_gguf_tensor *t = moe_gguf_find_tensor(g, "token_embd.weight");
    if (t == NULL)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: missing tensor 'token_embd.weight'", path);
    if ((rc = want_shape(g, t, 2, emb, what, diag)))
        return rc;
    t = moe_gguf_find_tensor(g, "output.weight");
    if (t != NULL && (rc = want_shape(g, t, 2, emb, what, diag)))
        return rc;

    uint64_t n_expert_tensors = 0;
    for (uint64_t i = 0; i < n; i++) {
        t = moe_gguf_tensor_at(g, i);
        const int layer = moe_tensor_layer(t->name);
        if (layer < 0)
            continue;
        if ((uint32_t)layer >= hp->n_layer)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: tensor '%s' is in layer %d, but"
                                " '%s.block_count' = %u", path, t->name, layer, hp->arch, hp->n_layer);
        const char *sfx = layer_suffix(t->name);
        if (sfx != NULL && strcmp(sfx, "ffn_gate_inp.weight") == 0 && hp->n_expert > 0) {
            const uint64_t ne[2] = { hp->n_embd, hp->n_expert };
            snprintf(what, sizeof(what), "[n_embd %u, n_expert %u]", hp->n_embd, hp->n_expert);
            if ((rc = want_shape(g, t, 2, ne, what, diag)))
                return rc;
        }
        if (!moe_tensor_is_expert(t->name))
            continue;
        n_expert_tensors++;
        if (hp->n_expert == 0)
            return moe_diag_set(diag, MOE_EFORMAT, "%s: expert tensor '%s', but '%s.expert_count'"
                                " is absent or 0", path, t->name, hp->arch);
        if (t->n_dims < 2 || t->ne[t->n_dims - 1] != hp->n_expert) {
            char have[96];
            shape_str(have, sizeof(have), t);
            return moe_diag_set(diag, MOE_EFORMAT, "%s: expert tensor '%s' has shape [%s], expected"
                                " its last dim to be n_expert %u", path, t->name, have, hp->n_expert);
        }
        const bool gate_up = strcmp(sfx, "ffn_gate_exps.weight") == 0 ||
                             strcmp(sfx, "ffn_up_exps.weight") == 0;
        const bool down = strcmp(sfx, "ffn_down_exps.weight") == 0;
        const bool merged = strcmp(sfx, "ffn_gate_up_exps.weight") == 0;
        if (merged) {
            const uint64_t ne[3] = { hp->n_embd, 2 * (uint64_t)hp->n_ff_exp, hp->n_expert };
            snprintf(what, sizeof(what), "[n_embd %u, 2 x n_ff_exp %u, n_expert %u]", hp->n_embd,
                     hp->n_ff_exp, hp->n_expert);
            if ((rc = want_shape(g, t, 3, ne, what, diag)))
                return rc;
        }
        if (gate_up || down) {
            const uint64_t ne[3] = { gate_up ? hp->n_embd : hp->n_ff_exp,
                                     gate_up ? hp->n_ff_exp : hp->n_embd, hp->n_expert };
            snprintf(what, sizeof(what), gate_up ? "[n_embd %u, n_ff_exp %u, n_expert %u]"
                                                 : "[n_ff_exp %u, n_embd %u, n_expert %u]",
                     (unsigned)ne[0], (unsigned)ne[1], hp->n_expert);
            if ((rc = want_shape(g, t, 3, ne, what, diag)))
                return rc;
        }
    }
    if (hp->n_expert > 0 && n_expert_tensors == 0)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: '%s.expert_count' = %u but no expert tensors"
                            " (blk.N.*_exps.*)", path, hp->arch, hp->n_expert);
    return 0;
}

uint32_t moe_hparams_n_recurrent(const struct moe_hparams *hp, const struct moe_gguf *g)
{
    const struct moe_arch_desc *ad = moe_arch_desc_find(hp->arch);
    if (ad == NULL || !ad->deltanet || hp->n_layer <= hp->n_layer_nextn)
        return 0;
    const uint32_t trunk = hp->n_layer - hp->n_layer_nextn;
    char key[160];
    snprintf(key, sizeof(key), "%s.attention.recurrent_layers", hp->arch);
    const struct moe_gguf_kv *kv = moe_gguf_find_kv(g, key);
    uint32_t n = 0;
    if (kv != NULL && kv->value.type == MOE_GGUF_ARRAY) {
        const size_t es = moe_gguf_type_size(kv->value.v.arr.elem_type);
        for (uint32_t il = 0; es > 0 && es <= 8 && il < trunk && il < kv->value.v.arr.n; il++) {
            uint64_t x = 0;
            memcpy(&x, (const uint8_t *)kv->value.v.arr.data + (size_t)il * es, es);
            n += x != 0;
        }
        return n;
    }
    const uint32_t every = hp->full_attn_interval ? hp->full_attn_interval : 4;
    for (uint32_t il = 0; il < trunk; il++)
        n += (il + 1) % every != 0;
    return n;
}

uint64_t moe_hparams_recurrent_state_bytes(const struct moe_hparams *hp, const struct moe_gguf *g)
{
    const uint64_t ds = hp->ssm_d_state;
    const uint64_t conv_dim = 2 * (uint64_t)hp->ssm_n_group * ds + (uint64_t)hp->ssm_dt_rank * ds;
    const uint64_t conv = hp->ssm_d_conv > 0 ? conv_dim * (hp->ssm_d_conv - 1) : 0;
    return (uint64_t)moe_hparams_n_recurrent(hp, g) * (conv + (uint64_t)hp->ssm_dt_rank * ds * ds) * 4;
}

const char *moe_file_type_name(uint32_t file_type)
{
    /* llama.h enum llama_ftype (LLAMA_FTYPE_MOSTLY_*); gaps are removed types. */
    static const char *const names[] = {
        [0] = "F32", [1] = "F16", [2] = "Q4_0", [3] = "Q4_1", [7] = "Q8_0", [8] = "Q5_0",
        [9] = "Q5_1", [10] = "Q2_K", [11] = "Q3_K_S", [12] = "Q3_K_M", [13] = "Q3_K_L",
        [14] = "Q4_K_S", [15] = "Q4_K_M", [16] = "Q5_K_S", [17] = "Q5_K_M", [18] = "Q6_K",
        [19] = "IQ2_XXS", [20] = "IQ2_XS", [21] = "Q2_K_S", [22] = "IQ3_XS", [23] = "IQ3_XXS",
        [24] = "IQ1_S", [25] = "IQ4_NL", [26] = "IQ3_S", [27] = "IQ3_M", [28] = "IQ2_S",
        [29] = "IQ2_M", [30] = "IQ4_XS", [31] = "IQ1_M", [32] = "BF16", [36] = "TQ1_0",
        [37] = "TQ2_0", [38] = "MXFP4_MOE", [39] = "NVFP4", [40] = "Q1_0",
    };
    file_type &= ~1024u; /* LLAMA_FTYPE_GUESSED */
    return file_type < sizeof(names) / sizeof(names[0]) ? names[file_type] : NULL;
}

/* ---- tensors ----------------------------------------------------------- */

int moe_tensor_layer(const char *name)
{
    /* digits only: strtol alone would take "blk. +1." */
    if (strncmp(name, "blk.", 4) != 0 || name[4] < '0' || name[4] > '9')
        return -1;
    char *end;
    long l = strtol(name + 4, &end, 10);
    if (end == name + 4 || *end != '.' || l < 0 || l >= MOE_MAX_LAYERS)
        return -1;
    return (int)l;
}

bool moe_tensor_is_expert(const char *name)
{
    if (moe_tensor_layer(name) < 0)
        return false;
    /* a per-expert scale vector [n_expert] (gemma4's ffn_down_exps.scale)
     * is read by routing, not by an expert: dense */
    const size_t n = strlen(name);
    if (n > 6 && strcmp(name + n - 6, ".scale") == 0)
        return false;
    return strstr(name, "_exps.") != NULL;
}

void moe_sizes_compute(struct moe_sizes *s, const struct moe_gguf *g, const struct moe_hparams *hp)
{
    memset(s, 0, sizeof(*s));
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        s->total_bytes += t->size;
        if (t->dtype < MOE_DTYPE_COUNT) {
            s->bytes_by_type[t->dtype] += t->size;
            s->tensors_by_type[t->dtype]++;
        }
        const int layer = moe_tensor_layer(t->name);
        if (layer >= 0 && (uint32_t)layer + 1 > s->n_layers_seen)
            s->n_layers_seen = (uint32_t)layer + 1;
        if (layer >= 0 && hp->n_layer_nextn > 0 && hp->n_layer_nextn < hp->n_layer &&
            (uint32_t)layer >= hp->n_layer - hp->n_layer_nextn) {
            s->nextn_bytes += t->size; /* MTP layers: not part of the trunk's pass */
        } else if (moe_tensor_is_expert(t->name)) {
            s->expert_bytes += t->size;
            s->layer_expert_bytes[layer] += t->size;
            s->n_expert_tensors++;
        } else {
            s->dense_bytes += t->size;
        }
    }
    uint64_t sum = 0;
    for (uint32_t l = 0; l < s->n_layers_seen; l++) {
        if (s->layer_expert_bytes[l] == 0)
            continue;
        s->n_moe_layers++;
        if (hp->n_expert == 0)
            continue;
        /* Exact when the tensors agree with n_expert (their last dim);
         * rounded up otherwise, since a slot must hold a whole expert. */
        uint64_t b = (s->layer_expert_bytes[l] + hp->n_expert - 1) / hp->n_expert;
        sum += b;
        if (b > s->bytes_per_expert)
            s->bytes_per_expert = b;
    }
    if (s->n_moe_layers > 0)
        s->bytes_per_expert_avg = sum / s->n_moe_layers;
    s->token_working_set = (uint64_t)s->n_moe_layers * hp->n_expert_used * s->bytes_per_expert;
}

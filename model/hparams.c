#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "model/hparams.h"

/* Values above this are absurd for any dimension we know of and would only
 * overflow size arithmetic later. */
#define DIM_CAP (1u << 26)

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
            { "expert_count", &hp->n_expert },
            { "expert_used_count", &hp->n_expert_used },
            { "expert_shared_count", &hp->n_expert_shared },
            { "leading_dense_block_count", &hp->n_layer_dense_lead },
            { "expert_group_count", &hp->n_expert_groups },
            { "expert_group_used_count", &hp->n_group_used },
            { "expert_gating_func", &hp->expert_gating_func },
            { "attention.q_lora_rank", &hp->q_lora_rank },
            { "attention.kv_lora_rank", &hp->kv_lora_rank },
            { "attention.key_length_mla", &hp->key_length_mla },
            { "attention.value_length_mla", &hp->value_length_mla },
            { "attention.sliding_window", &hp->sliding_window },
            { "vocab_size", &hp->n_vocab },
        };
        for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
            if ((rc = u32_key(g, a, keys[i].k, keys[i].v, DIM_CAP, diag)))
                return rc;
        if ((rc = f32_key(g, a, "attention.layer_norm_rms_epsilon", &hp->rms_eps, diag)) ||
            (rc = f32_key(g, a, "rope.freq_base", &hp->rope_freq_base, diag)) ||
            (rc = f32_key(g, a, "rope.scaling.factor", &hp->rope_scaling_factor, diag)) ||
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
    }
    if (hp->n_ff_exp == 0)
        hp->n_ff_exp = hp->n_ff;
    if (hp->head_dim == 0 && hp->n_head > 0)
        hp->head_dim = hp->n_embd / hp->n_head;
    if (hp->head_dim_v == 0)
        hp->head_dim_v = hp->head_dim;
    if (hp->n_head_kv == 0)
        hp->n_head_kv = hp->n_head;
    if (hp->n_rot == 0)
        hp->n_rot = hp->head_dim;
    if (hp->n_ff_shexp == 0 && hp->n_expert_shared > 0)
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
    if (hp->n_expert_used > hp->n_expert)
        return moe_diag_set(diag, MOE_EFORMAT, "%s: key '%s.expert_used_count' = %u exceeds"
                            " '%s.expert_count' = %u", moe_gguf_path(g), hp->arch, hp->n_expert_used,
                            hp->arch, hp->n_expert);
    return 0;
}

int moe_tensor_layer(const char *name)
{
    if (strncmp(name, "blk.", 4) != 0)
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
    return strstr(name, "_exps.") != NULL;
}

void moe_sizes_compute(struct moe_sizes *s, const struct moe_gguf *g, const struct moe_hparams *hp)
{
    memset(s, 0, sizeof(*s));
    uint64_t per_layer[MOE_MAX_LAYERS] = { 0 }; /* 32 KiB of stack */
    for (uint64_t i = 0; i < moe_gguf_n_tensors(g); i++) {
        const struct moe_gguf_tensor *t = moe_gguf_tensor_at(g, i);
        s->total_bytes += t->size;
        if (t->dtype < MOE_DTYPE_COUNT) {
            s->bytes_by_type[t->dtype] += t->size;
            s->tensors_by_type[t->dtype]++;
        }
        if (moe_tensor_is_expert(t->name)) {
            s->expert_bytes += t->size;
            per_layer[moe_tensor_layer(t->name)] += t->size;
        } else {
            s->dense_bytes += t->size;
        }
    }
    uint64_t sum = 0;
    for (int l = 0; l < MOE_MAX_LAYERS; l++) {
        if (per_layer[l] == 0)
            continue;
        s->n_moe_layers++;
        if (hp->n_expert == 0)
            continue;
        uint64_t b = per_layer[l] / hp->n_expert;
        sum += b;
        if (b > s->bytes_per_expert)
            s->bytes_per_expert = b;
    }
    if (s->n_moe_layers > 0)
        s->bytes_per_expert_avg = sum / s->n_moe_layers;
    s->token_working_set = (uint64_t)s->n_moe_layers * hp->n_expert_used * s->bytes_per_expert;
}

/* moectl info MODEL [--json]: what a GGUF holds and the numbers a user
 * sizing an expert cache needs (doc/moectl.md defines each field).
 *
 * Any GGUF is described, vocab-only files and unknown architectures
 * included. A file with tensors of a known architecture must also pass
 * moe_hparams_validate() and moe_hparams_check_tensors(): a model moed
 * would refuse is reported as an error (exit 1) rather than described with
 * numbers that mean nothing. */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/cli.h"
#include "io/gguf.h"
#include "model/hparams.h"

#define INFO_USAGE "usage: moectl info MODEL.gguf [--json]\n"

static double mib(uint64_t b)
{
    return (double)b / (1024.0 * 1024.0);
}

static const char *gating_name(uint32_t f)
{
    switch (f) {
    case 1: return "softmax";
    case 2: return "sigmoid";
    case 3: return "softmax_weight";
    default: return "default";
    }
}

/* "runs", "dense", "unknown" or "not yet": what the engine makes of the arch. */
static const char *arch_status(const struct moe_hparams *hp, bool *supported)
{
    *supported = moe_hparams_check_supported(hp, "", NULL) == 0;
    if (*supported)
        return "MoE, runs on the CPU engine";
    const struct moe_arch_desc *d = moe_arch_desc_find(hp->arch);
    if (d == NULL)
        return "not an architecture moed knows";
    if (!d->engine_supported)
        return "known, not run by the engine yet";
    return "dense: no experts, not served by moed";
}

static json_t *info_json(const struct moe_gguf *g, const struct moe_hparams *hp,
                         const struct moe_sizes *sz)
{
    json_t *o = json_object();
    json_object_set_new(o, "file", json_string(moe_gguf_path(g)));
    json_object_set_new(o, "gguf_version", json_integer(moe_gguf_version(g)));
    json_object_set_new(o, "alignment", json_integer(moe_gguf_alignment(g)));
    json_object_set_new(o, "arch", json_string(hp->arch));
    bool supported;
    arch_status(hp, &supported);
    json_object_set_new(o, "arch_known", json_boolean(moe_arch_desc_find(hp->arch) != NULL));
    json_object_set_new(o, "engine_supported", json_boolean(supported));
    json_object_set_new(o, "name", json_string(hp->name));
    json_object_set_new(o, "file_type", json_integer(hp->file_type));
    const char *ftn = moe_file_type_name(hp->file_type);
    json_object_set_new(o, "file_type_name", ftn ? json_string(ftn) : json_null());
    struct { const char *k; uint64_t v; } ints[] = {
        { "n_layer", hp->n_layer }, { "n_layer_nextn", hp->n_layer_nextn },
        { "n_embd", hp->n_embd }, { "n_head", hp->n_head },
        { "n_head_kv", hp->n_head_kv }, { "head_dim", hp->head_dim }, { "head_dim_v", hp->head_dim_v },
        { "n_rot", hp->n_rot }, { "n_ctx_train", hp->n_ctx_train }, { "n_ff", hp->n_ff },
        { "n_expert", hp->n_expert }, { "n_expert_used", hp->n_expert_used },
        { "n_ff_exp", hp->n_ff_exp }, { "n_expert_shared", hp->n_expert_shared },
        { "n_ff_shexp", hp->n_ff_shexp }, { "n_layer_dense_lead", hp->n_layer_dense_lead },
        { "n_expert_groups", hp->n_expert_groups }, { "n_group_used", hp->n_group_used },
        { "expert_gating_func", hp->expert_gating_func },
        { "q_lora_rank", hp->q_lora_rank }, { "kv_lora_rank", hp->kv_lora_rank },
        { "key_length_mla", hp->key_length_mla }, { "value_length_mla", hp->value_length_mla },
        { "sliding_window", hp->sliding_window },
        { "rope_scaling_orig_ctx", hp->rope_scaling_orig_ctx }, { "n_vocab", hp->n_vocab },
        { "n_tensors", moe_gguf_n_tensors(g) }, { "n_kv", moe_gguf_n_kv(g) },
        { "file_bytes", moe_gguf_file_size(g) }, { "n_parts", moe_gguf_n_parts(g) },
        { "tensor_bytes", sz->total_bytes },
        { "dense_bytes", sz->dense_bytes }, { "expert_bytes", sz->expert_bytes },
        { "nextn_bytes", sz->nextn_bytes },
        { "n_expert_tensors", sz->n_expert_tensors },
        { "n_moe_layers", sz->n_moe_layers }, { "bytes_per_expert", sz->bytes_per_expert },
        { "bytes_per_expert_avg", sz->bytes_per_expert_avg },
        { "token_working_set_bytes", sz->token_working_set },
        { "ssm_d_conv", hp->ssm_d_conv }, { "ssm_d_inner", hp->ssm_d_inner },
        { "ssm_d_state", hp->ssm_d_state }, { "ssm_dt_rank", hp->ssm_dt_rank },
        { "ssm_n_group", hp->ssm_n_group }, { "n_recurrent", moe_hparams_n_recurrent(hp, g) },
        { "recurrent_state_bytes", moe_hparams_recurrent_state_bytes(hp, g) },
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++)
        json_object_set_new(o, ints[i].k, json_integer((json_int_t)ints[i].v));
    json_object_set_new(o, "rms_eps", json_real(hp->rms_eps));
    json_object_set_new(o, "norm_eps", json_real(hp->norm_eps));
    json_object_set_new(o, "rope_freq_base", json_real(hp->rope_freq_base));
    json_object_set_new(o, "rope_scaling_type", json_string(hp->rope_scaling_type));
    json_object_set_new(o, "rope_scaling_factor", json_real(hp->rope_scaling_factor));
    json_object_set_new(o, "rope_scaling_attn_factor", json_real(hp->rope_scaling_attn_factor));
    json_object_set_new(o, "rope_yarn_log_mul", json_real(hp->rope_yarn_log_mul));
    json_object_set_new(o, "expert_weights_scale", json_real(hp->expert_weights_scale));
    json_object_set_new(o, "expert_weights_norm", json_boolean(hp->expert_weights_norm));
    const struct moe_arch_desc *row = moe_arch_desc_find(hp->arch);
    if (row != NULL && row->swa_pattern) {   /* gemma4: the sliding layers' dims */
        json_object_set_new(o, "n_layer_swa", json_integer(hp->n_layer_swa));
        json_object_set_new(o, "head_dim_swa", json_integer(hp->head_dim_swa));
        json_object_set_new(o, "n_rot_swa", json_integer(hp->n_rot_swa));
        json_object_set_new(o, "n_head_kv_min", json_integer(hp->n_head_kv_min));
        json_object_set_new(o, "rope_freq_base_swa", json_real(hp->rope_freq_base_swa));
        json_object_set_new(o, "final_logit_softcap", json_real(hp->final_logit_softcap));
    }
    json_object_set_new(o, "tokenizer_model", json_string(hp->tokenizer_model));
    json_object_set_new(o, "tokenizer_pre", json_string(hp->tokenizer_pre));
    /* One entry per layer (blk.N of any tensor, or block_count): 0 for a
     * layer without experts. */
    json_t *le = json_array();
    const uint32_t n_l = sz->n_layers_seen > hp->n_layer ? sz->n_layers_seen : hp->n_layer;
    for (uint32_t l = 0; l < n_l && l < MOE_MAX_LAYERS && moe_gguf_n_tensors(g) > 0; l++)
        json_array_append_new(le, json_integer((json_int_t)sz->layer_expert_bytes[l]));
    json_object_set_new(o, "layer_expert_bytes", le);
    json_t *bt = json_object();
    for (int t = 0; t < MOE_DTYPE_COUNT; t++) {
        if (sz->tensors_by_type[t] == 0)
            continue;
        json_t *e = json_object();
        json_object_set_new(e, "tensors", json_integer(sz->tensors_by_type[t]));
        json_object_set_new(e, "bytes", json_integer((json_int_t)sz->bytes_by_type[t]));
        json_object_set_new(bt, moe_dtype_name((uint32_t)t), e);
    }
    json_object_set_new(o, "bytes_by_type", bt);
    return o;
}

static void info_text(const struct moe_gguf *g, const struct moe_hparams *hp,
                      const struct moe_sizes *sz)
{
    printf("file:              %s (GGUF v%u, %.1f MiB, %" PRIu64 " keys)\n", moe_gguf_path(g),
           moe_gguf_version(g), mib(moe_gguf_file_size(g)), moe_gguf_n_kv(g));
    if (moe_gguf_n_parts(g) > 1)
        printf("split:             %u parts (the first holds the metadata; sizes are of all)\n",
               moe_gguf_n_parts(g));
    bool supported;
    const char *status = arch_status(hp, &supported);
    if (hp->arch[0])
        printf("arch:              %s (%s)\n", hp->arch, status);
    else
        printf("arch:              (none: no general.architecture)\n");
    if (hp->name[0])
        printf("name:              %s\n", hp->name);
    if (moe_gguf_find_kv(g, "general.file_type")) {
        const char *ftn = moe_file_type_name(hp->file_type);
        printf("file type:         %u (%s)\n", hp->file_type, ftn ? ftn : "unknown");
    }
    if (hp->n_layer_nextn > 0 && hp->n_layer_nextn < hp->n_layer)
        printf("layers:            %u + %u NextN/MTP (not run; embd %u, context %u)\n",
               hp->n_layer - hp->n_layer_nextn, hp->n_layer_nextn, hp->n_embd, hp->n_ctx_train);
    else if (hp->n_layer || hp->n_embd)
        printf("layers:            %u (embd %u, context %u)\n", hp->n_layer, hp->n_embd,
               hp->n_ctx_train);
    if (hp->n_head)
        printf("attention:         %u heads, %u kv heads, head dim %u (k) / %u (v)\n", hp->n_head,
               hp->n_head_kv, hp->head_dim, hp->head_dim_v);
    char key[160];
    snprintf(key, sizeof(key), "%s.rope.dimension_count", hp->arch);
    if (hp->rope_freq_base > 0.0f || moe_gguf_find_kv(g, key) != NULL)
        printf("rope:              %u dims, base %g\n", hp->n_rot, (double)hp->rope_freq_base);
    if (hp->rope_scaling_type[0] || hp->rope_scaling_factor > 0.0f) {
        printf("rope scaling:      %s x%g", hp->rope_scaling_type[0] ? hp->rope_scaling_type : "(type absent)",
               (double)hp->rope_scaling_factor);
        if (hp->rope_scaling_orig_ctx)
            printf(", original context %u", hp->rope_scaling_orig_ctx);
        if (hp->rope_scaling_attn_factor > 0.0f)
            printf(", attn factor %g", (double)hp->rope_scaling_attn_factor);
        if (hp->rope_yarn_log_mul > 0.0f)
            printf(", yarn log multiplier %g", (double)hp->rope_yarn_log_mul);
        printf("\n");
    }
    if (hp->rms_eps > 0.0f)
        printf("rms norm eps:      %g\n", (double)hp->rms_eps);
    if (hp->norm_eps > 0.0f)
        printf("layer norm eps:    %g\n", (double)hp->norm_eps);
    if (hp->kv_lora_rank || hp->q_lora_rank)
        printf("MLA:               q_lora_rank %u, kv_lora_rank %u, key/value length (MLA) %u/%u\n",
               hp->q_lora_rank, hp->kv_lora_rank, hp->key_length_mla, hp->value_length_mla);
    const struct moe_arch_desc *row = moe_arch_desc_find(hp->arch);
    if (row != NULL && row->swa_pattern) {
        /* gemma4: global layers take the dims above, the sliding ones their own */
        printf("sliding layers:    %u of %u, window %u: head dim %u, %u rope dims, base %g\n",
               hp->n_layer_swa, hp->n_layer, hp->sliding_window, hp->head_dim_swa, hp->n_rot_swa,
               (double)(hp->rope_freq_base_swa > 0.0f ? hp->rope_freq_base_swa : 10000.0f));
        if (hp->n_head_kv_min != hp->n_head_kv)
            printf("kv heads:          %u to %u per layer (attention.head_count_kv array)\n",
                   hp->n_head_kv_min, hp->n_head_kv);
        if (hp->final_logit_softcap > 0.0f)
            printf("logit soft-cap:    %g\n", (double)hp->final_logit_softcap);
    } else if (hp->sliding_window) {
        printf("sliding window:    %u\n", hp->sliding_window);
    }
    const uint32_t n_recr = moe_hparams_n_recurrent(hp, g);
    if (n_recr > 0) {
        const uint64_t rs = moe_hparams_recurrent_state_bytes(hp, g);
        printf("linear attention:  gated delta-net on %u of %u layers, %u key / %u value heads of"
               " %u, inner %u, conv %u taps\n", n_recr, hp->n_layer - hp->n_layer_nextn,
               hp->ssm_n_group, hp->ssm_dt_rank, hp->ssm_d_state, hp->ssm_d_inner, hp->ssm_d_conv);
        printf("recurrent state:   %" PRIu64 " bytes (%.2f MiB) per sequence (conv + SSM, f32),"
               " in the backend's memory\n", rs, mib(rs));
    }
    if (hp->n_ff && hp->n_expert == 0) /* with experts, the dense width shows below if used */
        printf("FFN:               %u\n", hp->n_ff);
    if (hp->n_expert)
        printf("experts:           %u per layer, top-%u, expert FFN %u\n", hp->n_expert,
               hp->n_expert_used, hp->n_ff_exp);
    if (hp->n_expert_shared)
        printf("shared experts:    %u (FFN %u), resident\n", hp->n_expert_shared, hp->n_ff_shexp);
    else if (hp->n_ff_shexp) /* qwen2moe: one shared expert, no count key */
        printf("shared expert:     FFN %u, resident\n", hp->n_ff_shexp);
    if (hp->n_layer_dense_lead)
        printf("dense layers:      first %u (FFN %u)\n", hp->n_layer_dense_lead, hp->n_ff);
    if (row != NULL && row->dense_beside_moe)
        printf("dense MLP:         FFN %u in every layer, beside the experts%s\n", hp->n_ff,
               row->gelu ? " (GELU)" : "");
    /* where the row fixes norm and scale (minimax-m2, gemma4), the row's rules,
     * not the keys */
    const struct moe_arch_desc *ad = row;
    const bool fixed = ad != NULL && ad->dense_beside_moe;   /* gemma4 reads no routing key */
    const bool row_rules = ad != NULL && (ad->gating_func_key || fixed);
    if (hp->expert_gating_func || hp->expert_weights_scale > 0.0f || hp->expert_weights_norm ||
        row_rules) {
        const uint32_t func = fixed ? (uint32_t)ad->gating
                              : hp->expert_gating_func ? hp->expert_gating_func
                              : ad != NULL && (row_rules || ad->gating_from_keys) ? (uint32_t)ad->gating
                                                                                   : 0;
        const bool norm = row_rules ? ad->gating_norm : hp->expert_weights_norm;
        const float scale = row_rules || hp->expert_weights_scale <= 0.0f ? 1.0f
                                                                          : hp->expert_weights_scale;
        printf("routing:           gating %s, weights %snormalized, scale %g\n", gating_name(func),
               norm ? "" : "not ", (double)scale);
    }
    if (hp->n_expert_groups)
        printf("expert groups:     %u, %u used\n", hp->n_expert_groups, hp->n_group_used);
    printf("vocabulary:        %u tokens (%s%s%s)\n", hp->n_vocab,
           hp->tokenizer_model[0] ? hp->tokenizer_model : "no tokenizer",
           hp->tokenizer_pre[0] ? ", pre " : "", hp->tokenizer_pre);
    printf("tensors:           %" PRIu64 ", %.2f MiB\n", moe_gguf_n_tensors(g), mib(sz->total_bytes));
    for (int t = 0; t < MOE_DTYPE_COUNT; t++)
        if (sz->tensors_by_type[t])
            printf("  %-10s %5u tensors %12.2f MiB\n", moe_dtype_name((uint32_t)t),
                   sz->tensors_by_type[t], mib(sz->bytes_by_type[t]));
    if (moe_gguf_n_tensors(g) == 0)
        return;
    printf("dense bytes:       %" PRIu64 " (%.2f MiB): resident (attention, norms, routers,"
           " shared experts, embeddings, output)\n", sz->dense_bytes, mib(sz->dense_bytes));
    printf("expert bytes:      %" PRIu64 " (%.2f MiB) in %u MoE layers\n", sz->expert_bytes,
           mib(sz->expert_bytes), sz->n_moe_layers);
    if (sz->nextn_bytes > 0)
        printf("NextN/MTP bytes:   %" PRIu64 " (%.2f MiB): not loaded\n", sz->nextn_bytes,
               mib(sz->nextn_bytes));
    if (sz->bytes_per_expert)
        printf("bytes/expert:      %" PRIu64 " (%.3f MiB; average %" PRIu64 "): one cache slot\n",
               sz->bytes_per_expert, mib(sz->bytes_per_expert), sz->bytes_per_expert_avg);
    if (sz->token_working_set)
        printf("token working set: %" PRIu64 " (%.2f MiB) = %u layers x top-%u x bytes/expert\n",
               sz->token_working_set, mib(sz->token_working_set), sz->n_moe_layers,
               hp->n_expert_used);
}

int moectl_info_main(int argc, char **argv)
{
    const char *path = NULL;
    int json = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf(INFO_USAGE);
            return 0;
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "moectl: info: unknown option '%s'\n" INFO_USAGE, argv[i]);
            return 2;
        } else if (path == NULL) {
            path = argv[i];
        } else {
            fprintf(stderr, "moectl: info: more than one model given ('%s')\n" INFO_USAGE, argv[i]);
            return 2;
        }
    }
    if (path == NULL) {
        fprintf(stderr, "moectl: info: no model given\n" INFO_USAGE);
        return 2;
    }
    struct moe_diag d = { 0 };
    struct moe_gguf *g = NULL;
    if (moe_gguf_open(&g, path, &d) != 0) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 1;
    }
    int ret = 1;
    struct moe_sizes *sz = NULL;
    struct moe_hparams hp;
    if (moe_hparams_load(&hp, g, &d) != 0)
        goto fail;
    if (moe_gguf_n_tensors(g) > 0 && moe_arch_desc_find(hp.arch) != NULL &&
        (moe_hparams_validate(&hp, g, &d) != 0 || moe_hparams_check_tensors(&hp, g, &d) != 0))
        goto fail;
    sz = malloc(sizeof(*sz)); /* per-layer table: too big for comfort on the stack */
    if (sz == NULL) {
        moe_diag_set(&d, -ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    moe_sizes_compute(sz, g, &hp);
    if (json) {
        json_t *o = info_json(g, &hp, sz);
        char *s = o ? json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII) : NULL;
        json_decref(o);
        if (s == NULL) {
            moe_diag_set(&d, -ENOMEM, "%s: out of memory formatting JSON", path);
            goto fail;
        }
        printf("%s\n", s);
        free(s);
    } else {
        info_text(g, &hp, sz);
    }
    ret = 0;
    if (fflush(stdout) != 0) {
        moe_diag_set(&d, -EIO, "writing to stdout failed");
        ret = 1;
    }
fail:
    if (ret != 0)
        fprintf(stderr, "moectl: %s\n", d.msg);
    free(sz);
    moe_gguf_close(g);
    return ret;
}

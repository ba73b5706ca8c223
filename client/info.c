/* moectl info MODEL [--json]: what a GGUF holds and the numbers a user
 * sizing an expert cache needs (doc/moectl.md defines each field). */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/cli.h"
#include "io/gguf.h"
#include "model/hparams.h"

static double mib(uint64_t b)
{
    return (double)b / (1024.0 * 1024.0);
}

static json_t *info_json(const struct moe_gguf *g, const struct moe_hparams *hp,
                         const struct moe_sizes *sz)
{
    json_t *o = json_object();
    json_object_set_new(o, "file", json_string(moe_gguf_path(g)));
    json_object_set_new(o, "gguf_version", json_integer(moe_gguf_version(g)));
    json_object_set_new(o, "arch", json_string(hp->arch));
    json_object_set_new(o, "name", json_string(hp->name));
    json_object_set_new(o, "file_type", json_integer(hp->file_type));
    struct { const char *k; uint64_t v; } ints[] = {
        { "n_layer", hp->n_layer }, { "n_embd", hp->n_embd }, { "n_head", hp->n_head },
        { "n_head_kv", hp->n_head_kv }, { "head_dim", hp->head_dim }, { "head_dim_v", hp->head_dim_v },
        { "n_rot", hp->n_rot }, { "n_ctx_train", hp->n_ctx_train }, { "n_ff", hp->n_ff },
        { "n_expert", hp->n_expert }, { "n_expert_used", hp->n_expert_used },
        { "n_ff_exp", hp->n_ff_exp }, { "n_expert_shared", hp->n_expert_shared },
        { "n_ff_shexp", hp->n_ff_shexp }, { "n_layer_dense_lead", hp->n_layer_dense_lead },
        { "n_expert_groups", hp->n_expert_groups }, { "n_group_used", hp->n_group_used },
        { "expert_gating_func", hp->expert_gating_func },
        { "q_lora_rank", hp->q_lora_rank }, { "kv_lora_rank", hp->kv_lora_rank },
        { "key_length_mla", hp->key_length_mla }, { "value_length_mla", hp->value_length_mla },
        { "sliding_window", hp->sliding_window }, { "n_vocab", hp->n_vocab },
        { "n_tensors", moe_gguf_n_tensors(g) }, { "n_kv", moe_gguf_n_kv(g) },
        { "file_bytes", moe_gguf_file_size(g) }, { "tensor_bytes", sz->total_bytes },
        { "dense_bytes", sz->dense_bytes }, { "expert_bytes", sz->expert_bytes },
        { "n_moe_layers", sz->n_moe_layers }, { "bytes_per_expert", sz->bytes_per_expert },
        { "bytes_per_expert_avg", sz->bytes_per_expert_avg },
        { "token_working_set_bytes", sz->token_working_set },
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++)
        json_object_set_new(o, ints[i].k, json_integer((json_int_t)ints[i].v));
    json_object_set_new(o, "rms_eps", json_real(hp->rms_eps));
    json_object_set_new(o, "rope_freq_base", json_real(hp->rope_freq_base));
    json_object_set_new(o, "rope_scaling_type", json_string(hp->rope_scaling_type));
    json_object_set_new(o, "rope_scaling_factor", json_real(hp->rope_scaling_factor));
    json_object_set_new(o, "expert_weights_scale", json_real(hp->expert_weights_scale));
    json_object_set_new(o, "expert_weights_norm", json_boolean(hp->expert_weights_norm));
    json_object_set_new(o, "tokenizer_model", json_string(hp->tokenizer_model));
    json_object_set_new(o, "tokenizer_pre", json_string(hp->tokenizer_pre));
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
    printf("file:            %s (GGUF v%u, %.1f MiB)\n", moe_gguf_path(g), moe_gguf_version(g),
           mib(moe_gguf_file_size(g)));
    printf("arch:            %s%s%s\n", hp->arch[0] ? hp->arch : "(none)", hp->name[0] ? "  name: " : "",
           hp->name);
    if (hp->n_layer)
        printf("layers:          %u (embd %u, context %u)\n", hp->n_layer, hp->n_embd, hp->n_ctx_train);
    if (hp->n_head)
        printf("attention:       %u heads, %u kv heads, head dim %u/%u, rope dims %u, base %g\n",
               hp->n_head, hp->n_head_kv, hp->head_dim, hp->head_dim_v, hp->n_rot,
               (double)hp->rope_freq_base);
    if (hp->kv_lora_rank)
        printf("MLA:             q_lora_rank %u, kv_lora_rank %u, key/value length (MLA) %u/%u\n",
               hp->q_lora_rank, hp->kv_lora_rank, hp->key_length_mla, hp->value_length_mla);
    if (hp->sliding_window)
        printf("sliding window:  %u\n", hp->sliding_window);
    if (hp->rope_scaling_type[0])
        printf("rope scaling:    %s x%g\n", hp->rope_scaling_type, (double)hp->rope_scaling_factor);
    if (hp->n_expert)
        printf("experts:         %u per layer, top-%u, expert FFN %u%s\n", hp->n_expert,
               hp->n_expert_used, hp->n_ff_exp, hp->n_expert_shared ? "" : "");
    if (hp->n_expert_shared || hp->n_ff_shexp)
        printf("shared experts:  %u (FFN %u)\n", hp->n_expert_shared, hp->n_ff_shexp);
    if (hp->n_layer_dense_lead)
        printf("dense layers:    first %u (FFN %u)\n", hp->n_layer_dense_lead, hp->n_ff);
    printf("vocabulary:      %u tokens (%s%s%s)\n", hp->n_vocab,
           hp->tokenizer_model[0] ? hp->tokenizer_model : "no tokenizer",
           hp->tokenizer_pre[0] ? ", pre " : "", hp->tokenizer_pre);
    printf("tensors:         %" PRIu64 ", %.2f MiB\n", moe_gguf_n_tensors(g), mib(sz->total_bytes));
    for (int t = 0; t < MOE_DTYPE_COUNT; t++)
        if (sz->tensors_by_type[t])
            printf("  %-8s %5u tensors %12.2f MiB\n", moe_dtype_name((uint32_t)t),
                   sz->tensors_by_type[t], mib(sz->bytes_by_type[t]));
    if (moe_gguf_n_tensors(g) == 0)
        return;
    printf("dense bytes:     %" PRIu64 " (%.2f MiB): resident (attention, norms, routers,"
           " shared experts, embeddings, output)\n", sz->dense_bytes, mib(sz->dense_bytes));
    printf("expert bytes:    %" PRIu64 " (%.2f MiB) in %u MoE layers\n", sz->expert_bytes,
           mib(sz->expert_bytes), sz->n_moe_layers);
    if (sz->bytes_per_expert)
        printf("bytes/expert:    %" PRIu64 " (%.3f MiB; average %" PRIu64 "): one cache slot\n",
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
            printf("usage: moectl info MODEL.gguf [--json]\n");
            return 0;
        } else if (argv[i][0] == '-' && argv[i][1] != '\0') {
            fprintf(stderr, "moectl: info: unknown option '%s'\nusage: moectl info MODEL.gguf [--json]\n",
                    argv[i]);
            return 2;
        } else if (path == NULL) {
            path = argv[i];
        } else {
            fprintf(stderr, "moectl: info: more than one model given ('%s')\n", argv[i]);
            return 2;
        }
    }
    if (path == NULL) {
        fprintf(stderr, "usage: moectl info MODEL.gguf [--json]\n");
        return 2;
    }
    struct moe_diag d = { 0 };
    struct moe_gguf *g = NULL;
    if (moe_gguf_open(&g, path, &d) != 0) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        return 1;
    }
    struct moe_hparams hp;
    if (moe_hparams_load(&hp, g, &d) != 0) {
        fprintf(stderr, "moectl: %s\n", d.msg);
        moe_gguf_close(g);
        return 1;
    }
    struct moe_sizes sz;
    moe_sizes_compute(&sz, g, &hp);
    if (json) {
        json_t *o = info_json(g, &hp, &sz);
        char *s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
        if (s)
            printf("%s\n", s);
        free(s);
        json_decref(o);
    } else {
        info_text(g, &hp, &sz);
    }
    moe_gguf_close(g);
    return 0;
}

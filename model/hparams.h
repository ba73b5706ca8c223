/* Hyper-parameters from GGUF metadata, and the sizes a user sizing an
 * expert cache needs.
 *
 * moe_hparams_load() reads `general.architecture` and the `<arch>.` keys
 * that MoE architectures use. It is lenient about absence (a missing key
 * leaves 0, so that `moectl info` can describe any GGUF, vocab-only files
 * included) and strict about types and ranges: a key present with a type
 * that cannot hold it, or an absurd value, is MOE_EFORMAT naming the file
 * and key. Whether the engine can run the architecture is decided by the
 * model loader (model/model.h), not here.
 */
#ifndef MOE_MODEL_HPARAMS_H
#define MOE_MODEL_HPARAMS_H

#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "kernels/dtype.h"

struct moe_gguf;

struct moe_hparams {
    char arch[32];              /* general.architecture ("" if absent) */
    char name[128];             /* general.name */
    uint32_t file_type;         /* general.file_type (0 if absent) */
    uint32_t n_ctx_train;       /* context_length */
    uint32_t n_embd;            /* embedding_length */
    uint32_t n_layer;           /* block_count */
    uint32_t n_ff;              /* feed_forward_length (dense FFN width) */
    uint32_t n_ff_exp;          /* expert_feed_forward_length, else feed_forward_length */
    uint32_t n_ff_shexp;        /* expert_shared_feed_forward_length */
    uint32_t n_head, n_head_kv;
    uint32_t head_dim, head_dim_v;      /* key_length / value_length (default n_embd/n_head) */
    uint32_t n_rot;             /* rope.dimension_count (default head_dim) */
    float rms_eps;              /* attention.layer_norm_rms_epsilon */
    float rope_freq_base;
    float rope_scaling_factor;  /* 0 if absent */
    char rope_scaling_type[16]; /* "" if absent */
    uint32_t n_expert, n_expert_used, n_expert_shared;
    uint32_t n_layer_dense_lead;        /* leading_dense_block_count */
    uint32_t n_expert_groups, n_group_used;
    uint32_t expert_gating_func;        /* 0 absent, 1 softmax, 2 sigmoid */
    float expert_weights_scale;         /* 0 if absent */
    bool expert_weights_norm;
    uint32_t q_lora_rank, kv_lora_rank;
    uint32_t key_length_mla, value_length_mla;
    uint32_t sliding_window;
    uint32_t n_vocab;           /* vocab_size, else tokens array, else token_embd ne[1] */
    char tokenizer_model[32], tokenizer_pre[64];
};

int moe_hparams_load(struct moe_hparams *hp, const struct moe_gguf *g, struct moe_diag *diag);

/* Whether a tensor name is an expert tensor: `blk.N.<anything>_exps.<...>`
 * (weights and biases). Shared experts (`_shexp`) are dense. */
bool moe_tensor_is_expert(const char *name);
/* The N of `blk.N.`, or -1. */
int moe_tensor_layer(const char *name);

#define MOE_MAX_LAYERS 4096

/* Sizes for cache planning. */
struct moe_sizes {
    uint64_t total_bytes, dense_bytes, expert_bytes;
    uint32_t n_moe_layers;              /* layers with expert tensors */
    uint64_t bytes_per_expert;          /* largest per-layer slice: the size of one cache slot */
    uint64_t bytes_per_expert_avg;
    uint64_t token_working_set;         /* n_moe_layers * n_expert_used * bytes_per_expert */
    uint64_t bytes_by_type[MOE_DTYPE_COUNT];
    uint32_t tensors_by_type[MOE_DTYPE_COUNT];
};

/* Classifies every tensor of g. n_expert from hp divides the per-layer
 * expert bytes (0: bytes_per_expert stays 0). */
void moe_sizes_compute(struct moe_sizes *s, const struct moe_gguf *g, const struct moe_hparams *hp);

#endif

/* Hyper-parameters from GGUF metadata, the architectures moed knows, and
 * the sizes a user sizing an expert cache needs.
 *
 * Four steps, each stricter than the one before, so that every caller takes
 * only what it needs:
 *   moe_hparams_load()          reads general.* and the `<arch>.` keys. Lenient
 *                               about absence (a missing key leaves 0, so that
 *                               `moectl info` can describe any GGUF, vocab-only
 *                               files and unknown architectures included),
 *                               strict about types and ranges: a key present
 *                               with a type that cannot hold it, or an absurd
 *                               value, is MOE_EFORMAT naming the file and key.
 *   moe_hparams_validate()      a model's required keys are present and the
 *                               values agree with each other (n_head % n_head_kv,
 *                               top-k <= experts, caps).
 *   moe_hparams_check_tensors() the tensors agree with the hyper-parameters
 *                               (token_embd = [n_embd, n_vocab], experts' last
 *                               dim = n_expert, router and expert widths).
 *   moe_hparams_check_supported() the CPU engine runs the architecture;
 *                               otherwise MOE_EUNSUPPORTED listing those it runs.
 *
 * Errors: 0 or a negative code with a message in diag naming the file and
 * the key or tensor. Nothing here allocates; everything is thread-safe.
 */
#ifndef MOE_MODEL_HPARAMS_H
#define MOE_MODEL_HPARAMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"
#include "common/dtype.h"
#include "model/arch.h"

struct moe_gguf;

struct moe_hparams {
    char arch[32];              /* general.architecture ("" if absent) */
    char name[128];             /* general.name */
    uint32_t file_type;         /* general.file_type (0 if absent; llama_ftype) */
    uint32_t n_ctx_train;       /* context_length */
    uint32_t n_embd;            /* embedding_length */
    uint32_t n_layer;           /* block_count */
    uint32_t n_ff;              /* feed_forward_length (dense FFN width) */
    uint32_t n_ff_exp;          /* expert_feed_forward_length, else feed_forward_length */
    uint32_t n_ff_shexp;        /* expert_shared_feed_forward_length (deepseek2: shared count x n_ff_exp) */
    uint32_t n_head, n_head_kv; /* head_count; head_count_kv (default n_head) */
    uint32_t head_dim, head_dim_v;      /* key_length / value_length (default n_embd/n_head) */
    uint32_t n_rot;             /* rope.dimension_count (default head_dim) */
    float rms_eps;              /* attention.layer_norm_rms_epsilon (0 if absent) */
    float rope_freq_base;       /* rope.freq_base (0 if absent) */
    float rope_scaling_factor;  /* 0 if absent */
    char rope_scaling_type[16]; /* "" if absent */
    uint32_t n_expert, n_expert_used, n_expert_shared;
    uint32_t n_layer_dense_lead;        /* leading_dense_block_count */
    uint32_t n_layer_nextn;             /* nextn_predict_layers: MTP layers at the end of
                                         * block_count, not part of the trunk (glm4moe) */
    uint32_t n_expert_groups, n_group_used;
    uint32_t expert_gating_func;        /* 0 absent, 1 softmax, 2 sigmoid, 3 softmax_weight */
    float expert_weights_scale;         /* 0 if absent */
    bool expert_weights_norm;
    uint32_t q_lora_rank, kv_lora_rank;
    uint32_t key_length_mla, value_length_mla;
    uint32_t sliding_window;
    uint32_t n_vocab;           /* vocab_size, else tokens array, else token_embd ne[1] */
    char tokenizer_model[32], tokenizer_pre[64];
    /* Added after the first version: */
    float norm_eps;             /* attention.layer_norm_epsilon (non-RMS norms; 0 if absent) */
    uint32_t rope_scaling_orig_ctx;     /* rope.scaling.original_context_length */
    float rope_scaling_attn_factor;     /* rope.scaling.attn_factor */
    float rope_yarn_log_mul;            /* rope.scaling.yarn_log_multiplier */
    bool is_moe;                /* n_expert > 0 */
    /* Gated delta-net (qwen35moe; 0 if absent): ssm.conv_kernel, ssm.inner_size
     * (value dim), ssm.state_size (head dim of keys and values), ssm.time_step_rank
     * (value heads), ssm.group_count (key heads); full_attention_interval (0 if
     * absent: 4, as llama.cpp); rope.dimension_sections (interleaved M-RoPE) */
    uint32_t ssm_d_conv, ssm_d_inner, ssm_d_state, ssm_dt_rank, ssm_n_group;
    uint32_t full_attn_interval;
    uint32_t rope_sections[4];
    /* Gemma 4 (rows with swa_pattern; 0 where absent): */
    uint32_t head_dim_swa, head_dim_v_swa;  /* attention.key_length_swa / value_length_swa
                                             * (default: head_dim, head_dim_v) */
    uint32_t n_rot_swa;                 /* rope.dimension_count_swa (default n_rot) */
    float rope_freq_base_swa;           /* rope.freq_base_swa */
    float final_logit_softcap;          /* final_logit_softcapping (30 when absent, as
                                         * llama.cpp's default; 0 = none) */
    uint32_t n_kv_shared_layers;        /* attention.shared_kv_layers */
    uint32_t n_embd_per_layer;          /* embedding_length_per_layer_input */
    uint32_t n_layer_swa;               /* layers attention.sliding_window_pattern marks */
    uint32_t n_head_kv_min;             /* head_count_kv: its smallest entry when an array
                                         * (n_head_kv is then the largest), else n_head_kv */
};

/* Per-layer values of a key that is a scalar (every layer) or an array of
 * n_layer integers or bools: vals[n_layer]. -ENOENT when absent; MOE_EFORMAT
 * naming the key for another type, a length other than n_layer or an
 * element over cap. */
int moe_hparams_per_layer(const struct moe_gguf *g, const char *arch, const char *suffix,
                          uint32_t n_layer, uint32_t cap, uint32_t *vals, struct moe_diag *diag);

int moe_hparams_load(struct moe_hparams *hp, const struct moe_gguf *g, struct moe_diag *diag);

/* ---- architectures --------------------------------------------------- */

/* The table of known architectures is model/arch.h. */

/* Writes the architectures the engine runs, comma-separated, into buf
 * (always NUL-terminated when cap > 0); returns buf. */
const char *moe_hparams_supported_archs(char *buf, size_t cap);

/* 0 when the engine runs hp's architecture with this configuration (MoE);
 * MOE_EFORMAT when general.architecture is missing; else MOE_EUNSUPPORTED
 * with a message naming `path`, the architecture and the supported list. */
int moe_hparams_check_supported(const struct moe_hparams *hp, const char *path,
                                struct moe_diag *diag);

/* Required keys and consistency. For a known architecture: embedding_length,
 * block_count, attention.head_count, and for a MoE one expert_count,
 * expert_used_count and an FFN width; kv_lora_rank for MLA; a vocabulary
 * size from some source. For any architecture, the values present must
 * agree (n_head_kv divides n_head, 1 <= top-k <= experts, dense lead <=
 * layers, groups divide experts) and stay under caps. MOE_EFORMAT or
 * MOE_ELIMIT naming the file and key. */
int moe_hparams_validate(const struct moe_hparams *hp, const struct moe_gguf *g,
                         struct moe_diag *diag);

/* The tensors agree with hp: token_embd.weight (required when the file
 * has tensors) and output.weight are [n_embd, n_vocab]; every expert
 * tensor is in a layer < n_layer with last dim n_expert; gate/up expert
 * weights are [n_embd, n_ff_exp, n_expert], down [n_ff_exp, n_embd,
 * n_expert]; routers (ffn_gate_inp.weight) are [n_embd, n_expert]; a MoE
 * model has expert tensors. A file without tensors passes. MOE_EFORMAT
 * naming the file and tensor. */
int moe_hparams_check_tensors(const struct moe_hparams *hp, const struct moe_gguf *g,
                              struct moe_diag *diag);

/* Gated delta-net models (qwen35moe): the layers with a recurrent state
 * (attention.recurrent_layers where present, else all but every
 * full_attention_interval-th of the trunk) and the bytes of one sequence's
 * recurrent state (conv and SSM states, f32). 0 for other models. */
uint32_t moe_hparams_n_recurrent(const struct moe_hparams *hp, const struct moe_gguf *g);
uint64_t moe_hparams_recurrent_state_bytes(const struct moe_hparams *hp, const struct moe_gguf *g);

/* llama_ftype name of general.file_type without the MOSTLY_ prefix
 * ("F32", "Q4_K_M", "MXFP4_MOE"), or NULL when unknown. The "guessed" bit
 * (1024) is ignored. */
const char *moe_file_type_name(uint32_t file_type);

/* ---- tensors ----------------------------------------------------------- */

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
    uint64_t bytes_per_expert;          /* largest per-layer expert, its tensors' bytes alone
                                         * (a cache slot also holds the padding between them:
                                         * the memory plan's slot_bytes, model/plan.h) */
    uint64_t bytes_per_expert_avg;
    uint64_t token_working_set;         /* n_moe_layers * n_expert_used * bytes_per_expert */
    uint64_t bytes_by_type[MOE_DTYPE_COUNT];
    uint32_t tensors_by_type[MOE_DTYPE_COUNT];
    /* Added after the first version: */
    uint64_t layer_expert_bytes[MOE_MAX_LAYERS]; /* per layer index; 0 for dense layers */
    uint32_t n_layers_seen;             /* 1 + the largest blk.N of any tensor (0 if none) */
    uint32_t n_expert_tensors;
    uint64_t nextn_bytes;               /* tensors of the NextN/MTP layers (not run; in
                                         * neither dense_bytes nor expert_bytes) */
};

/* Classifies every tensor of g. n_expert from hp divides the per-layer
 * expert bytes (rounded up; 0: bytes_per_expert stays 0). */
void moe_sizes_compute(struct moe_sizes *s, const struct moe_gguf *g, const struct moe_hparams *hp);

#endif

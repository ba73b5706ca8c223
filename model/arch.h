/* The architectures moed knows: one row per `general.architecture`, with
 * every rule the forward pass applies per family. Adding a family means
 * adding a row here (and, where it brings a new kind of layer, the code
 * that the row's flags select); nothing else keeps a list of families.
 *
 * The rows follow what llama.cpp computes for each architecture (its
 * llm_arch names and per-arch graph rules); the flags name the difference,
 * not the family, so that the forward pass never compares architectures.
 * Everything here is constant data; thread-safe.
 */
#ifndef MOE_MODEL_ARCH_H
#define MOE_MODEL_ARCH_H

#include <stdbool.h>
#include <stddef.h>

#include "kernels/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

enum moe_arch {
    MOE_ARCH_LLAMA = 1,   /* Mixtral layout */
    MOE_ARCH_QWEN2MOE,
    MOE_ARCH_QWEN3MOE,
    MOE_ARCH_OLMOE,
    MOE_ARCH_DEEPSEEK2,
    MOE_ARCH_GPTOSS,
    MOE_ARCH_GLM4MOE,
    MOE_ARCH_MINIMAX_M2,
    MOE_ARCH_QWEN35MOE,
    MOE_ARCH_GEMMA4,
};

struct moe_arch_desc {
    const char *name;           /* general.architecture */
    enum moe_arch arch;
    bool always_moe;            /* false: MoE only when expert_count > 0 (llama) */
    bool engine_supported;      /* the engine runs it */
    /* attention */
    bool mla;                   /* multi-head latent attention: kv_lora_rank required */
    enum moe_rope_mode rope_mode;
    bool qk_norm;               /* per-head q/k RMSNorm */
    bool qk_norm_full;          /* q/k RMSNorm over the whole projection */
    bool qkv_bias;              /* q/k/v biases */
    bool qkv_bias_optional;     /* each of attn_{q,k,v}.bias used where present (glm4moe) */
    bool qk_norm_optional;      /* per-head q/k RMSNorm where attn_{q,k}_norm are present */
    bool attn_out_bias;         /* attention output bias */
    bool sinks;                 /* attention sinks [n_head] */
    bool swa_even_layers;       /* attention.sliding_window applies to even layers */
    /* routing */
    enum moe_gating gating;     /* default gating function */
    bool gating_norm;           /* renormalise the top-k weights (default) */
    bool gating_from_keys;      /* expert_gating_func / expert_weights_norm / _scale keys
                                 * override the defaults, and sigmoid gating adds the
                                 * exp_probs_b selection bias (deepseek2) */
    bool gating_func_key;       /* only expert_gating_func overrides the row's gating
                                 * (absent or 0: the row's); norm and scale are the row's */
    bool sel_bias;              /* exp_probs_b selection bias required whatever the gating */
    bool shared_count_required; /* expert_shared_count required; shared expert width is
                                 * expert_shared_count x expert_feed_forward_length */
    bool router_bias;           /* ffn_gate_inp.bias */
    /* FFN */
    bool expert_bias;           /* ffn_{gate,up,down}_exps.bias */
    bool swiglu_oai;            /* clamped SwiGLU: swiglu_alpha, swiglu_limit */
    float swiglu_alpha, swiglu_limit;
    bool shexp_gated;           /* shared expert scaled by sigmoid(ffn_gate_inp_shexp . x) */
    const char *ffn_norm;       /* name of the FFN norm tensor of a layer */
    bool experts_from_ff;       /* expert width is feed_forward_length (required), and
                                 * expert_feed_forward_length is required too (minimax-m2) */
    /* hybrid linear attention (qwen35moe): gated delta-net layers (model/deltanet.c)
     * with a recurrent state per sequence, all but every full_attention_interval-th
     * layer (or as attention.recurrent_layers says); the ssm.* keys required */
    bool deltanet;
    bool attn_out_gate;         /* attn_q holds per head the query and a gate (2 x head
                                 * dim): attention output *= sigmoid(gate) before Wo */
    bool shexp_width_ff;        /* no expert_shared_feed_forward_length: the shared
                                 * expert is feed_forward_length wide */
    /* YaRN: rope.scaling.yarn_log_multiplier is stored x0.1 and also scales
     * the magnitude of both mscale terms (deepseek2) */
    bool yarn_log_mul_x10;
    /* Gemma 4 (each flag one rule of llama.cpp's gemma4 graph): */
    bool swa_pattern;           /* attention.sliding_window_pattern (one bool per layer)
                                 * picks the sliding layers; they take key_length_swa,
                                 * rope.dimension_count_swa and rope.freq_base_swa, the
                                 * others key_length, rope.dimension_count, rope.freq_base
                                 * and the rope_freqs divisors; head_count_kv may be an
                                 * array per layer */
    bool kq_scale_one;          /* attention scores unscaled (q/k are RMS-normed) */
    bool v_norm;                /* V RMS-normed per head without a weight; a layer without
                                 * attn_v takes V from K's projection */
    bool sandwich_norms;        /* post_attention_norm on the attention output and
                                 * post_ffw_norm on the FFN output, before each residual */
    bool gelu;                  /* GELU (tanh) gates, dense and experts, not SiLU */
    bool dense_beside_moe;      /* every layer has the dense MLP (ffn_norm, post_ffw_norm_1 on
                                 * MoE layers); a layer with ffn_gate_inp adds the experts
                                 * over pre_ffw_norm_2 with post_ffw_norm_2, the router reading
                                 * rmsnorm(x) / sqrt(n_embd) * ffn_gate_inp.scale, and each
                                 * expert's output x ffn_down_exps.scale where present */
    bool embd_scale;            /* token embeddings x sqrt(n_embd) */
};

/* The row for an architecture name; NULL for an unknown one. */
const struct moe_arch_desc *moe_arch_desc_find(const char *name);
size_t moe_arch_desc_count(void);
const struct moe_arch_desc *moe_arch_desc_at(size_t i);   /* NULL past the end */

#ifdef __cplusplus
}
#endif

#endif

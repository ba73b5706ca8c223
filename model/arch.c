#include "model/arch.h"

#include <string.h>

/* Each row states every rule that is not false/zero, so that what sets
 * one family apart from another is visible here. */
static const struct moe_arch_desc archs[] = {
    {   /* Mixtral: a llama whose FFN is a mixture of experts */
        .name = "llama", .arch = MOE_ARCH_LLAMA, .engine_supported = true,
        .rope_mode = MOE_ROPE_NORM, .gating = MOE_GATING_SOFTMAX, .gating_norm = true,
        .ffn_norm = "ffn_norm",
    },
    {   .name = "qwen2moe", .arch = MOE_ARCH_QWEN2MOE, .always_moe = true, .engine_supported = true,
        .rope_mode = MOE_ROPE_NEOX, .qkv_bias = true, .gating = MOE_GATING_SOFTMAX,
        .shexp_gated = true, .ffn_norm = "ffn_norm",
    },
    {   .name = "qwen3moe", .arch = MOE_ARCH_QWEN3MOE, .always_moe = true, .engine_supported = true,
        .rope_mode = MOE_ROPE_NEOX, .qk_norm = true, .gating = MOE_GATING_SOFTMAX,
        .gating_norm = true, .ffn_norm = "ffn_norm",
    },
    {   .name = "olmoe", .arch = MOE_ARCH_OLMOE, .always_moe = true, .engine_supported = true,
        .rope_mode = MOE_ROPE_NEOX, .qk_norm_full = true, .gating = MOE_GATING_SOFTMAX,
        .ffn_norm = "ffn_norm",
    },
    {   .name = "deepseek2", .arch = MOE_ARCH_DEEPSEEK2, .always_moe = true, .engine_supported = true,
        .mla = true, .rope_mode = MOE_ROPE_NORM, .gating = MOE_GATING_SOFTMAX,
        .gating_from_keys = true, .ffn_norm = "ffn_norm", .yarn_log_mul_x10 = true,
    },
    {   /* llama.cpp's constants for gpt-oss's SwiGLU; no GGUF key carries them */
        .name = "gpt-oss", .arch = MOE_ARCH_GPTOSS, .always_moe = true, .engine_supported = true,
        .rope_mode = MOE_ROPE_NEOX, .qkv_bias = true, .attn_out_bias = true, .sinks = true,
        .swa_even_layers = true, .gating = MOE_GATING_SOFTMAX_TOPK, .router_bias = true,
        .expert_bias = true, .swiglu_oai = true, .swiglu_alpha = 1.702f, .swiglu_limit = 7.0f,
        .ffn_norm = "post_attention_norm",
    },
    {   /* GLM-4.5/4.6/4.7: partial rotary (rope.dimension_count < key_length),
         * optional q/k/v biases and per-head q/k norms, dense lead layers,
         * sigmoid routing (the default when expert_gating_func is absent)
         * with exp_probs_b, a shared expert of expert_shared_count x n_ff_exp */
        .name = "glm4moe", .arch = MOE_ARCH_GLM4MOE, .always_moe = true, .engine_supported = true,
        .rope_mode = MOE_ROPE_NEOX, .qkv_bias_optional = true, .qk_norm_optional = true,
        .gating = MOE_GATING_SIGMOID, .gating_from_keys = true, .sel_bias = true,
        .shared_count_required = true, .ffn_norm = "post_attention_norm",
    },
    {   /* MiniMax-M2: partial rotary, q/k RMSNorm over the whole projection,
         * sigmoid routing with exp_probs_b and weights always renormalised
         * (llama.cpp's graph ignores expert_weights_norm/_scale here) */
        .name = "minimax-m2", .arch = MOE_ARCH_MINIMAX_M2, .always_moe = true,
        .engine_supported = true, .rope_mode = MOE_ROPE_NEOX, .qkv_bias_optional = true,
        .qk_norm_full = true, .gating = MOE_GATING_SIGMOID, .gating_norm = true,
        .gating_func_key = true, .sel_bias = true, .ffn_norm = "ffn_norm",
        .experts_from_ff = true,
    },
    {   /* Qwen3.5/3.6 MoE: gated delta-net layers interleaved with gated full
         * attention (per-head q/k norms, partial rotary: llama.cpp's interleaved
         * M-RoPE, which for text positions is NEOX over rope.dimension_count),
         * softmax routing with renormalised top-k, a sigmoid-gated shared expert */
        .name = "qwen35moe", .arch = MOE_ARCH_QWEN35MOE, .always_moe = true,
        .engine_supported = true, .rope_mode = MOE_ROPE_NEOX, .qk_norm = true,
        .gating = MOE_GATING_SOFTMAX, .gating_norm = true, .shexp_gated = true,
        .ffn_norm = "post_attention_norm", .deltanet = true, .attn_out_gate = true,
        .shexp_width_ff = true,
    },
    {   /* Gemma 4 (the MoE: 26B-A4B): sliding and global layers with their own
         * head dims, rotary dims and bases (global: proportional RoPE through
         * rope_freqs), per-head q/k norms, V normed, unscaled scores, sandwich
         * norms, GELU, a dense MLP beside the experts with softmax routing on a
         * scaled RMS-normed input, embeddings x sqrt(n_embd), optional final
         * logit soft-capping. Per-layer embeddings and shared-KV layers (the
         * dense E2B/E4B) are refused. */
        .name = "gemma4", .arch = MOE_ARCH_GEMMA4, .always_moe = true, .engine_supported = true,
        .rope_mode = MOE_ROPE_NEOX, .qk_norm = true, .gating = MOE_GATING_SOFTMAX,
        .gating_norm = true, .ffn_norm = "ffn_norm", .swa_pattern = true, .kq_scale_one = true,
        .v_norm = true, .sandwich_norms = true, .gelu = true, .dense_beside_moe = true,
        .embd_scale = true,
    },
};

size_t moe_arch_desc_count(void)
{
    return sizeof(archs) / sizeof(archs[0]);
}

const struct moe_arch_desc *moe_arch_desc_at(size_t i)
{
    return i < moe_arch_desc_count() ? &archs[i] : NULL;
}

const struct moe_arch_desc *moe_arch_desc_find(const char *name)
{
    if (name == NULL)
        return NULL;
    for (size_t i = 0; i < moe_arch_desc_count(); i++)
        if (strcmp(archs[i].name, name) == 0)
            return &archs[i];
    return NULL;
}

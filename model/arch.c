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

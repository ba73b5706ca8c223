#!/usr/bin/env python3
"""Reference data for the 2026 families of issue 22 (glm4moe, minimax-m2,
qwen35moe): a tiny random-weight F32 GGUF written with the gguf package, its Q8_0
quantization made by llama.cpp itself (llama_model_quantize), and what
llama.cpp (llama-cpp-python 0.3.36, CPU, F32 KV cache, one batch, no flash
attention, no weight repacking: use_extra_bufts off, which AMX CPUs need
for MoE batches) computes on them.

Writes into tests/fixtures/arch/:
  tiny-<arch>-F32.gguf, tiny-<arch>-Q8_0.gguf
  tiny-<arch>-fam.json   {"arch", "n_vocab", "llama_cpp_python",
                          "seqs": [{"tokens": [...]}...],
                          "variants": {"F32": [{"greedy": {"ids", "margin"}} per seq], ...}}
  tiny-<arch>-<VAR>.len<N>.logits.f32   logits of every prompt position, [N][V] f32 LE

The vocabulary is shared/ref's qwen2 vocab trimmed as in make_arch_goldens.py
(tokenizers of the new families are a separate step of the issue).

Usage: pip install gguf numpy llama-cpp-python==0.3.36
       python3 tools/ref/make_family_goldens.py [--ref ../shared/ref] [--out tests/fixtures/arch]
"""
import argparse
import json
import os
import sys

import numpy as np
import gguf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_arch_goldens import read_vocab  # noqa: E402

N_REGULAR = 1000   # regular tokens kept: fixtures stay well under 2 MB
SEQ_LENS = (1, 7, 24)
N_GREEDY = 16


def write_glm4moe(path, seed, vocab, n_embd=None):
    """GLM-4.5 layout: partial rotary (rope dims < head dim), head dim not
    n_embd / n_head, q/k/v biases, per-head q/k norms, post_attention_norm
    before the FFN, one dense lead layer, sigmoid routing with exp_probs_b,
    normalised weights x expert_weights_scale, one shared expert; and one
    NextN/MTP layer past the trunk (nextn_predict_layers 1, counted in
    block_count as real GGUFs do), which the trunk's forward pass skips."""
    tokens, types, merges = vocab
    rng = np.random.default_rng(seed)
    E, H, HKV, HD, NROT, L, DENSE, NEXTN = 64, 4, 2, 24, 12, 3, 1, 1
    E = n_embd or E   # tests/parity/test_family_kquant.py: 256, so that K-quants apply
    X, K, FF, FFX, NSH = 8, 2, 96, 32, 1
    V = len(tokens)
    arch = "glm4moe"
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-%s-seed%d" % (arch, seed))
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_block_count(L + NEXTN)
    w.add_nextn_predict_layers(NEXTN)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_dimension_count(NROT)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(1000000.0)
    w.add_expert_count(X)
    w.add_expert_used_count(K)
    w.add_expert_feed_forward_length(FFX)
    w.add_expert_shared_count(NSH)
    w.add_leading_dense_block_count(DENSE)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_norm(True)
    w.add_expert_weights_scale(2.5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = V - 3
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)

    def mat(name, n_in, n_out, gain=1.0, n_exp=None):
        shape = (n_out, n_in) if n_exp is None else (n_exp, n_out, n_in)
        w.add_tensor(name, (rng.standard_normal(shape) * gain / np.sqrt(n_in)).astype(np.float32))

    def vec(name, n, base=1.0, scale=0.1):
        w.add_tensor(name, (base + scale * rng.standard_normal(n)).astype(np.float32))

    w.add_tensor("token_embd.weight", rng.standard_normal((V, E)).astype(np.float32))
    for i in range(L + NEXTN):
        b = "blk.%d." % i
        vec(b + "attn_norm.weight", E)
        mat(b + "attn_q.weight", E, H * HD)
        mat(b + "attn_k.weight", E, HKV * HD)
        mat(b + "attn_v.weight", E, HKV * HD)
        vec(b + "attn_q.bias", H * HD, 0.0)
        vec(b + "attn_k.bias", HKV * HD, 0.0)
        vec(b + "attn_v.bias", HKV * HD, 0.0)
        vec(b + "attn_q_norm.weight", HD)
        vec(b + "attn_k_norm.weight", HD)
        mat(b + "attn_output.weight", H * HD, E)
        vec(b + "post_attention_norm.weight", E)
        if i < DENSE:
            mat(b + "ffn_gate.weight", E, FF)
            mat(b + "ffn_up.weight", E, FF)
            mat(b + "ffn_down.weight", FF, E)
            continue
        mat(b + "ffn_gate_inp.weight", E, X, gain=3.0)
        vec(b + "exp_probs_b.bias", X, 0.0, 0.5)
        mat(b + "ffn_gate_exps.weight", E, FFX, n_exp=X)
        mat(b + "ffn_up_exps.weight", E, FFX, n_exp=X)
        mat(b + "ffn_down_exps.weight", FFX, E, n_exp=X)
        mat(b + "ffn_gate_shexp.weight", E, FFX * NSH)
        mat(b + "ffn_up_shexp.weight", E, FFX * NSH)
        mat(b + "ffn_down_shexp.weight", FFX * NSH, E)
        if i >= L:
            mat(b + "nextn.eh_proj.weight", 2 * E, E)
            vec(b + "nextn.enorm.weight", E)
            vec(b + "nextn.hnorm.weight", E)
            vec(b + "nextn.shared_head_norm.weight", E)
    vec("output_norm.weight", E)
    mat("output.weight", E, V)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_minimax_m2(path, seed, vocab, n_embd=None):
    """MiniMax-M2 layout: partial rotary NEOX, head dim key_length, q/k
    RMSNorm over the whole projection (q [n_head*hd], k [n_head_kv*hd]), no
    attention biases, sigmoid routing with exp_probs_b and always
    renormalised weights (llama.cpp's graph ignores expert_weights_norm and
    _scale for this family), no shared expert, no dense layer. The expert
    tensors are shaped by feed_forward_length, as llama.cpp's loader reads
    them; expert_feed_forward_length (required) holds the same value."""
    tokens, types, merges = vocab
    rng = np.random.default_rng(seed)
    E, H, HKV, HD, NROT, L, X, K, FF = 64, 4, 2, 32, 16, 2, 8, 2, 32
    E = n_embd or E   # tests/parity/test_family_kquant.py: 256, so that K-quants apply
    V = len(tokens)
    arch = "minimax-m2"
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-%s-seed%d" % (arch, seed))
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_expert_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_dimension_count(NROT)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(5000000.0)
    w.add_expert_count(X)
    w.add_expert_used_count(K)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = V - 3
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)

    def mat(name, n_in, n_out, gain=1.0, n_exp=None):
        shape = (n_out, n_in) if n_exp is None else (n_exp, n_out, n_in)
        w.add_tensor(name, (rng.standard_normal(shape) * gain / np.sqrt(n_in)).astype(np.float32))

    def vec(name, n, base=1.0, scale=0.1):
        w.add_tensor(name, (base + scale * rng.standard_normal(n)).astype(np.float32))

    w.add_tensor("token_embd.weight", rng.standard_normal((V, E)).astype(np.float32))
    for i in range(L):
        b = "blk.%d." % i
        vec(b + "attn_norm.weight", E)
        mat(b + "attn_q.weight", E, H * HD)
        mat(b + "attn_k.weight", E, HKV * HD)
        mat(b + "attn_v.weight", E, HKV * HD)
        vec(b + "attn_q_norm.weight", H * HD)
        vec(b + "attn_k_norm.weight", HKV * HD)
        mat(b + "attn_output.weight", H * HD, E)
        vec(b + "ffn_norm.weight", E)
        mat(b + "ffn_gate_inp.weight", E, X, gain=3.0)
        vec(b + "exp_probs_b.bias", X, 0.0, 0.5)
        mat(b + "ffn_gate_exps.weight", E, FF, n_exp=X)
        mat(b + "ffn_up_exps.weight", E, FF, n_exp=X)
        mat(b + "ffn_down_exps.weight", FF, E, n_exp=X)
    vec("output_norm.weight", E)
    mat("output.weight", E, V)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_qwen35moe(path, seed, vocab, n_embd=None):
    """Qwen3.5/3.6 MoE layout (llama.cpp's qwen35moe): gated delta-net
    (linear attention) layers, with every full_attention_interval-th layer a
    full-attention one (here 2: layers 0 and 2 recurrent, layer 1 attention).
    Delta-net layers: attn_qkv [n_embd, 2 key_dim + value_dim] through a
    short causal conv (ssm_conv1d, conv_kernel taps), attn_gate (z) for the
    gated RMSNorm (ssm_norm), ssm_beta / ssm_alpha per value head, ssm_dt
    bias and ssm_a (the decay), ssm_out; value heads (time_step_rank 4)
    outnumber key heads (group_count 2). Attention layers: attn_q carries
    per head the query and an output gate (2 x head dim), per-head q/k
    RMSNorm, partial rotary with rope.dimension_sections (interleaved M-RoPE,
    NEOX for text). FFN: softmax routing, renormalised top-k, one shared
    expert gated by sigmoid(ffn_gate_inp_shexp . x); post_attention_norm is
    the FFN norm. Output tied to token_embd (fixtures stay small)."""
    tokens, types, merges = vocab
    rng = np.random.default_rng(seed)
    E, H, HKV, HD, NROT, L, X, K, FFX, FFS = 32, 4, 2, 16, 8, 3, 6, 2, 32, 32
    E = n_embd or E   # tests/parity/test_family_kquant.py: 256, so that K-quants apply
    DCONV, DSTATE, NKH, NVH, INTERVAL = 4, 16, 2, 4, 2
    KEYD, VALD = DSTATE * NKH, DSTATE * NVH
    V = len(tokens)
    arch = "qwen35moe"
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-%s-seed%d" % (arch, seed))
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(FFX)
    w.add_expert_feed_forward_length(FFX)
    w.add_uint32(arch + ".expert_shared_feed_forward_length", FFS)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_dimension_count(NROT)
    w.add_array(arch + ".rope.dimension_sections", [2, 1, 1, 0])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000000.0)
    w.add_expert_count(X)
    w.add_expert_used_count(K)
    w.add_uint32(arch + ".ssm.conv_kernel", DCONV)
    w.add_uint32(arch + ".ssm.inner_size", VALD)
    w.add_uint32(arch + ".ssm.state_size", DSTATE)
    w.add_uint32(arch + ".ssm.time_step_rank", NVH)
    w.add_uint32(arch + ".ssm.group_count", NKH)
    w.add_uint32(arch + ".full_attention_interval", INTERVAL)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = V - 3
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)

    def mat(name, n_in, n_out, gain=1.0, n_exp=None):
        shape = (n_out, n_in) if n_exp is None else (n_exp, n_out, n_in)
        w.add_tensor(name, (rng.standard_normal(shape) * gain / np.sqrt(n_in)).astype(np.float32))

    def vec(name, n, base=1.0, scale=0.1):
        w.add_tensor(name, (base + scale * rng.standard_normal(n)).astype(np.float32))

    w.add_tensor("token_embd.weight", rng.standard_normal((V, E)).astype(np.float32))
    for i in range(L):
        b = "blk.%d." % i
        vec(b + "attn_norm.weight", E)
        if (i + 1) % INTERVAL != 0:
            mat(b + "attn_qkv.weight", E, 2 * KEYD + VALD)
            mat(b + "attn_gate.weight", E, VALD)
            mat(b + "ssm_conv1d.weight", DCONV, 2 * KEYD + VALD)
            vec(b + "ssm_dt.bias", NVH, 0.0, 0.5)
            w.add_tensor(b + "ssm_a", (-np.exp(rng.uniform(-1.0, 1.0, NVH))).astype(np.float32))
            mat(b + "ssm_beta.weight", E, NVH)
            mat(b + "ssm_alpha.weight", E, NVH)
            vec(b + "ssm_norm.weight", DSTATE)
            mat(b + "ssm_out.weight", VALD, E)
        else:
            mat(b + "attn_q.weight", E, 2 * H * HD)
            mat(b + "attn_k.weight", E, HKV * HD)
            mat(b + "attn_v.weight", E, HKV * HD)
            vec(b + "attn_q_norm.weight", HD)
            vec(b + "attn_k_norm.weight", HD)
            mat(b + "attn_output.weight", H * HD, E)
        vec(b + "post_attention_norm.weight", E)
        mat(b + "ffn_gate_inp.weight", E, X, gain=3.0)
        mat(b + "ffn_gate_exps.weight", E, FFX, n_exp=X)
        mat(b + "ffn_up_exps.weight", E, FFX, n_exp=X)
        mat(b + "ffn_down_exps.weight", FFX, E, n_exp=X)
        vec(b + "ffn_gate_inp_shexp.weight", E, 0.0, 0.3)
        mat(b + "ffn_gate_shexp.weight", E, FFS)
        mat(b + "ffn_up_shexp.weight", E, FFS)
        mat(b + "ffn_down_shexp.weight", FFS, E)
    vec("output_norm.weight", E)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gemma4(path, seed, vocab, n_embd=None):
    """Gemma 4's MoE layout (26B-A4B, scaled down): sliding layers (pattern
    array) with their own head dim, KV heads, rotary dims and base; global
    layers with a larger head dim, proportional RoPE (rope_freqs: pairs past
    the first quarter get a divisor of 1e30) and no attn_v (V is K's
    projection); q/k norms per head, V RMS-normed, unscaled scores;
    post-attention and post-FFN norms; every layer's dense GELU MLP, and on
    MoE layers the experts beside it (softmax routing on rmsnorm(x) /
    sqrt(n_embd) x ffn_gate_inp.scale, per-expert ffn_down_exps.scale, merged
    ffn_gate_up_exps except in one layer) each branch with its norms;
    layer_output_scale; embeddings x sqrt(n_embd); final logit
    soft-capping. Layer 0 has no router (a dense layer, which llama.cpp's
    graph allows). An output.weight of its own: with random weights a tied
    output repeats the last token (Gemma ships tied; the loader's tying is
    tested elsewhere)."""
    tokens, types, merges = vocab
    rng = np.random.default_rng(seed)
    E, H, L, FF, X, K, FFX, WIN = 32, 2, 4, 32, 6, 2, 16, 4
    E = n_embd or E   # tests/parity/test_family_kquant.py: 256, so that K-quants apply
    HD_SWA, HD_FULL, KV_SWA, KV_FULL = 16, 32, 2, 1
    SWA = [True, True, False, True]
    V = len(tokens)
    arch = "gemma4"
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-%s-seed%d" % (arch, seed))
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_expert_feed_forward_length(FFX)
    w.add_head_count(H)
    w.add_head_count_kv([KV_SWA if s else KV_FULL for s in SWA])
    w.add_key_length(HD_FULL)
    w.add_value_length(HD_FULL)
    w.add_key_length_swa(HD_SWA)
    w.add_value_length_swa(HD_SWA)
    w.add_rope_dimension_count(HD_FULL)
    w.add_rope_dimension_count_swa(HD_SWA)
    w.add_rope_freq_base(1000000.0)
    w.add_rope_freq_base_swa(10000.0)
    w.add_sliding_window(WIN)
    w.add_sliding_window_pattern(SWA)
    w.add_shared_kv_layers(0)
    w.add_embedding_length_per_layer_input(0)
    w.add_final_logit_softcapping(30.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(X)
    w.add_expert_used_count(K)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = V - 3
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)

    def mat(name, n_in, n_out, gain=1.0, n_exp=None):
        shape = (n_out, n_in) if n_exp is None else (n_exp, n_out, n_in)
        w.add_tensor(name, (rng.standard_normal(shape) * gain / np.sqrt(n_in)).astype(np.float32))

    def vec(name, n, base=1.0, scale=0.1):
        w.add_tensor(name, (base + scale * rng.standard_normal(n)).astype(np.float32))

    # small embeddings (as Gemma's): x sqrt(n_embd) they are O(1) per dim, so
    # the layers, not the token itself, decide the tied output's logits
    w.add_tensor("token_embd.weight", (0.3 * rng.standard_normal((V, E))).astype(np.float32))
    n_rot_pairs = HD_FULL // 8   # partial_rotary_factor 0.25 of the global head
    w.add_tensor("rope_freqs.weight", np.array([1.0] * n_rot_pairs + [1e30] * (HD_FULL // 2 - n_rot_pairs),
                                                dtype=np.float32))
    for i in range(L):
        b = "blk.%d." % i
        hd, kv = (HD_SWA, KV_SWA) if SWA[i] else (HD_FULL, KV_FULL)
        vec(b + "attn_norm.weight", E)
        mat(b + "attn_q.weight", E, H * hd)
        mat(b + "attn_k.weight", E, kv * hd)
        if SWA[i]:
            mat(b + "attn_v.weight", E, kv * hd)
        vec(b + "attn_q_norm.weight", hd)
        vec(b + "attn_k_norm.weight", hd)
        mat(b + "attn_output.weight", H * hd, E)
        vec(b + "post_attention_norm.weight", E)
        vec(b + "ffn_norm.weight", E)
        mat(b + "ffn_gate.weight", E, FF)
        mat(b + "ffn_up.weight", E, FF)
        mat(b + "ffn_down.weight", FF, E)
        vec(b + "post_ffw_norm.weight", E)
        vec(b + "layer_output_scale.weight", 1, 1.5, 0.2)
        if i == 0:
            continue
        mat(b + "ffn_gate_inp.weight", E, X, gain=3.0)
        vec(b + "ffn_gate_inp.scale", E)
        vec(b + "pre_ffw_norm_2.weight", E)
        vec(b + "post_ffw_norm_1.weight", E)
        vec(b + "post_ffw_norm_2.weight", E)
        if i == 1:
            mat(b + "ffn_gate_exps.weight", E, FFX, n_exp=X)
            mat(b + "ffn_up_exps.weight", E, FFX, n_exp=X)
        else:
            mat(b + "ffn_gate_up_exps.weight", E, 2 * FFX, n_exp=X)
        mat(b + "ffn_down_exps.weight", FFX, E, n_exp=X)
        vec(b + "ffn_down_exps.scale", X, 1.0, 0.3)
    vec("output_norm.weight", E)
    mat("output.weight", E, V, gain=4.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def no_repack():
    """Model params with use_extra_bufts off for every Llama() made after."""
    import llama_cpp.llama_cpp as C
    orig = C.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = params


def quantize(src, dst, ftype):
    import llama_cpp.llama_cpp as C
    p = C.llama_model_quantize_default_params()
    p.nthread = 2
    p.ftype = ftype
    rc = C.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        raise SystemExit("llama_model_quantize %s failed: %d" % (dst, rc))


def run_llama(path, tokens, n_greedy):
    from llama_cpp import Llama
    m = Llama(model_path=path, n_ctx=256, n_batch=512, n_ubatch=512, n_threads=2, logits_all=True,
              type_k=0, type_v=0, flash_attn=False, verbose=False, seed=1)
    m.reset()
    m.eval(tokens)
    V = m.n_vocab()
    logits = np.array(m.scores[:len(tokens)], dtype=np.float32).reshape(len(tokens), V)
    ids, margin = [], []
    last = logits[-1].copy()
    for _ in range(n_greedy):
        order = np.argsort(-last, kind="stable")
        ids.append(int(order[0]))
        margin.append(float(last[order[0]] - last[order[1]]))
        m.eval([int(order[0])])
        last = np.array(m.scores[m.n_tokens - 1], dtype=np.float32)
    return logits, ids, margin


def main():
    import llama_cpp
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default=os.path.join(os.path.dirname(root), "shared", "ref"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "arch"))
    ap.add_argument("--arch", action="append", help="only these families (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    no_repack()
    vocab = read_vocab(os.path.join(args.ref, "vocab", "ggml-vocab-qwen2.gguf"), N_REGULAR)
    families = {  # writer, seed, n_expert_used
        "glm4moe": (write_glm4moe, 21, 2),
        "minimax-m2": (write_minimax_m2, 22, 2),
        "qwen35moe": (write_qwen35moe, 23, 2),
        "gemma4": (write_gemma4, 24, 2),
    }
    for arch, (writer, seed, n_used) in families.items():
        if args.arch and arch not in args.arch:
            continue
        f32 = os.path.join(args.out, "tiny-%s-F32.gguf" % arch)
        writer(f32, seed, vocab)
        q8 = os.path.join(args.out, "tiny-%s-Q8_0.gguf" % arch)
        quantize(f32, q8, 7)  # LLAMA_FTYPE_MOSTLY_Q8_0
        rng = np.random.default_rng(seed + 1000)
        seqs = [[int(t) for t in rng.integers(0, N_REGULAR, size=n)] for n in SEQ_LENS]
        out = {"arch": arch, "n_expert_used": n_used, "llama_cpp_python": llama_cpp.__version__,
               "seqs": [{"tokens": s} for s in seqs], "variants": {}}
        for var, path in (("F32", f32), ("Q8_0", q8)):
            res = []
            for s in seqs:
                logits, ids, margin = run_llama(path, s, N_GREEDY)
                out["n_vocab"] = int(logits.shape[1])
                logits.astype("<f4").tofile(os.path.join(
                    args.out, "tiny-%s-%s.len%d.logits.f32" % (arch, var, len(s))))
                res.append({"greedy": {"ids": ids, "margin": margin}})
                print(arch, var, len(s), "ok", ids[:6], "min margin %.3g" % min(margin))
            out["variants"][var] = res
        with open(os.path.join(args.out, "tiny-%s-fam.json" % arch), "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

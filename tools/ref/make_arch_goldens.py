#!/usr/bin/env python3
"""Reference data for the architectures shared/ref has no goldens for
(qwen2moe, olmoe): writes a tiny random-weight F32 GGUF of each with the
gguf package, runs it through llama.cpp (llama-cpp-python, CPU, F32 KV
cache, one batch) and records what llama.cpp computes.

Writes into tests/fixtures/arch/:
  tiny-<arch>-F32.gguf        the model (vocabulary: the first 2000 regular
                              tokens of shared/ref's qwen2 vocab + its control tokens)
  tiny-<arch>.json            {"tokens": [...], "n_vocab": V,
                               "greedy": {"ids": [...], "margin": [...]},
                               "llama_cpp_python": version}
  tiny-<arch>.logits.f32      logits of every prompt position, [n][V] float32 LE

Usage: pip install gguf numpy llama-cpp-python
       python3 tools/ref/make_arch_goldens.py [--ref ../shared/ref] [--out tests/fixtures/arch]
"""
import argparse
import json
import os

import numpy as np
import gguf

N_REGULAR = 2000


def read_vocab(path, n_regular=N_REGULAR):
    r = gguf.GGUFReader(path)
    f = r.fields
    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]) for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]) for i in f["tokenizer.ggml.merges"].data]
    keep = list(range(n_regular)) + [i for i in range(n_regular, len(toks)) if types[i] == gguf.TokenType.CONTROL]
    kept = [toks[i] for i in keep]
    present = set(kept)
    mk = []
    for m in merges:
        a, b = m.split(b" ", 1)
        if a in present and b in present and a + b in present:
            mk.append(m)
    return kept, [types[i] for i in keep], mk


def write_model(path, arch, seed, vocab, dims):
    tokens, types, merges = vocab
    rng = np.random.default_rng(seed)
    E, H, HKV, L, X, K, FF, FFS = (dims[k] for k in ("n_embd", "n_head", "n_head_kv", "n_layer",
                                                      "n_expert", "n_expert_used", "n_ff_exp", "n_ff_shexp"))
    hd = E // H
    V = len(tokens)
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-%s-seed%d" % (arch, seed))
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_block_count(L)
    # llama.cpp's olmoe takes the expert width from feed_forward_length
    w.add_feed_forward_length(FF if arch == "olmoe" else FF * 2)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(X)
    w.add_expert_used_count(K)
    if arch != "olmoe":
        w.add_expert_feed_forward_length(FF)
    if FFS:
        w.add_expert_shared_feed_forward_length(FFS)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = V - 3  # <|endoftext|>, the first control token after the regular ones
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
        mat(b + "attn_q.weight", E, H * hd)
        mat(b + "attn_k.weight", E, HKV * hd)
        mat(b + "attn_v.weight", E, HKV * hd)
        if arch == "qwen2moe":
            vec(b + "attn_q.bias", H * hd, 0.0)
            vec(b + "attn_k.bias", HKV * hd, 0.0)
            vec(b + "attn_v.bias", HKV * hd, 0.0)
        if arch == "olmoe":
            vec(b + "attn_q_norm.weight", H * hd)
            vec(b + "attn_k_norm.weight", HKV * hd)
        mat(b + "attn_output.weight", H * hd, E)
        vec(b + "ffn_norm.weight", E)
        mat(b + "ffn_gate_inp.weight", E, X, gain=3.0)
        mat(b + "ffn_gate_exps.weight", E, FF, n_exp=X)
        mat(b + "ffn_up_exps.weight", E, FF, n_exp=X)
        mat(b + "ffn_down_exps.weight", FF, E, n_exp=X)
        if FFS:
            vec(b + "ffn_gate_inp_shexp.weight", E, 0.0, 1.0 / np.sqrt(E))
            mat(b + "ffn_gate_shexp.weight", E, FFS)
            mat(b + "ffn_up_shexp.weight", E, FFS)
            mat(b + "ffn_down_shexp.weight", FFS, E)
    vec("output_norm.weight", E)
    mat("output.weight", E, V)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_llama(path, tokens, n_greedy):
    import llama_cpp
    from llama_cpp import Llama
    # F32 KV cache (type 0), no flash attention, one batch holding the prompt
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
    return logits, ids, margin, llama_cpp.__version__


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default=os.path.join(os.path.dirname(root), "shared", "ref"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "arch"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    vocab = read_vocab(os.path.join(args.ref, "vocab", "ggml-vocab-qwen2.gguf"))
    dims = {
        "qwen2moe": dict(n_embd=64, n_head=4, n_head_kv=2, n_layer=2, n_expert=8, n_expert_used=2,
                         n_ff_exp=64, n_ff_shexp=96),
        "olmoe": dict(n_embd=64, n_head=4, n_head_kv=4, n_layer=2, n_expert=8, n_expert_used=2,
                      n_ff_exp=64, n_ff_shexp=0),
    }
    rng = np.random.default_rng(2026)
    for arch, seed in (("qwen2moe", 11), ("olmoe", 12)):
        path = os.path.join(args.out, "tiny-%s-F32.gguf" % arch)
        write_model(path, arch, seed, vocab, dims[arch])
        tokens = [int(t) for t in rng.integers(0, N_REGULAR, size=24)]
        logits, ids, margin, ver = run_llama(path, tokens, 16)
        logits.astype("<f4").tofile(os.path.join(args.out, "tiny-%s.logits.f32" % arch))
        with open(os.path.join(args.out, "tiny-%s.json" % arch), "w") as f:
            json.dump({"tokens": tokens, "n_vocab": int(logits.shape[1]),
                       "greedy": {"ids": ids, "margin": margin},
                       "llama_cpp_python": ver}, f, indent=1)
            f.write("\n")
        print(arch, "ok", logits.shape, ids[:8])


if __name__ == "__main__":
    main()

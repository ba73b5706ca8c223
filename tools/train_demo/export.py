#!/usr/bin/env python3
"""Writes the trained demo model (train.py's checkpoint) and its tokenizer
(prepare.py's tokenizer.json) as a GGUF in llama.cpp's Mixtral layout
(general.architecture 'llama' with expert_count > 0), with gguf-py's writer:

  * tokenizer.ggml.model 'gpt2' (byte-level BPE with merges), pre 'gpt-2';
    <|endoftext|> is the BOS (added to each prompt, as it begins each training
    document), <|im_end|> the EOS that ends an answer;
  * tokenizer.chat_template: ChatML, which moed and llama.cpp both recognise;
  * matrices in Q8_0 (or --dtype f16/f32), norms and routers in F32.

  python3 tools/train_demo/export.py --ckpt demo/run/model.pt \
      --tokenizer demo/train/tokenizer.json -o models/demo-moe.gguf
"""
import argparse
import json
import sys

import numpy as np
import torch

import gguf

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--dtype", choices=("q8_0", "f16", "f32"), default="q8_0")
    ap.add_argument("--name", default="moed-demo")
    args = ap.parse_args()

    st = torch.load(args.ckpt, map_location="cpu")
    c, sd = st["config"], {k: v.float().numpy() for k, v in st["model"].items()}
    with open(args.tokenizer) as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    if len(vocab) != c["n_vocab"]:
        sys.exit("export: %s has %d tokens, the checkpoint %d" % (args.tokenizer, len(vocab), c["n_vocab"]))
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"]: a["id"] for a in tj["added_tokens"] if a.get("special")}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(args.name)
    w.add_description("moed's demo model: a small mixture of experts trained on the World English Bible and "
                      "Jane Austen's novels (tools/train_demo, doc/demo.md)")
    w.add_context_length(c["n_ctx"])
    w.add_embedding_length(c["d"])
    w.add_block_count(c["n_layer"])
    w.add_feed_forward_length(c["n_ff"])
    w.add_head_count(c["n_head"])
    w.add_head_count_kv(c["n_head_kv"])
    w.add_layer_norm_rms_eps(c["rms_eps"])
    w.add_rope_freq_base(c["rope_base"])
    w.add_rope_dimension_count(c["d"] // c["n_head"])
    w.add_expert_count(c["n_expert"])
    w.add_expert_used_count(c["n_expert_used"])
    w.add_vocab_size(c["n_vocab"])
    w.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "f32": gguf.LlamaFileType.ALL_F32}[args.dtype])

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML)

    def mat(name, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        if args.dtype == "f32":
            w.add_tensor(name, a)
        elif args.dtype == "f16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def f32(name, a):
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))

    mat("token_embd.weight", sd["embed.weight"])
    for i in range(c["n_layer"]):
        p, b = "blk.%d." % i, "blocks.%d." % i
        f32(p + "attn_norm.weight", sd[b + "attn_norm.weight"])
        mat(p + "attn_q.weight", sd[b + "wq.weight"])
        mat(p + "attn_k.weight", sd[b + "wk.weight"])
        mat(p + "attn_v.weight", sd[b + "wv.weight"])
        mat(p + "attn_output.weight", sd[b + "wo.weight"])
        f32(p + "ffn_norm.weight", sd[b + "ffn_norm.weight"])
        f32(p + "ffn_gate_inp.weight", sd[b + "router.weight"])
        mat(p + "ffn_gate_exps.weight", sd[b + "gate"])
        mat(p + "ffn_up_exps.weight", sd[b + "up"])
        mat(p + "ffn_down_exps.weight", sd[b + "down"])
    f32("output_norm.weight", sd["norm.weight"])
    mat("output.weight", sd["out.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("export: wrote %s (%s, %d tensors)" % (args.out, args.dtype, 3 + 10 * c["n_layer"]))


if __name__ == "__main__":
    main()

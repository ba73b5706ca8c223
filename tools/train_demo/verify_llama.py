#!/usr/bin/env python3
"""Checks that llama.cpp (through llama-cpp-python) computes what moed computes
on the demo GGUF: the same token ids for chat prompts, llama.cpp's greedy
answer, and moed's logits (moectl eval) over prompt + that answer, whose
argmax must give llama.cpp's greedy tokens at every step.

  python3 tools/train_demo/verify_llama.py --model models/demo-moe.gguf [--moectl build/client/moectl]

llama.cpp's extra CPU buffer types (AMX/repacked weights) are turned off
(use_extra_bufts = false), so both engines read the Q8_0 weights as stored.
Exits 0 when every prompt matches, 1 otherwise, 77 without llama_cpp.
"""
import argparse
import json
import subprocess
import sys
import tempfile

import numpy as np

PROMPTS = ["Who are you?", "What does the Bible say about love?", "Tell me about Elizabeth.",
           "What do you think of marriage?", "Who was Moses?"]


def chatml(q):
    return "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n" % q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--moectl", default="build/client/moectl")
    ap.add_argument("-n", type=int, default=32)
    args = ap.parse_args()
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as lc
    except ImportError:
        print("verify: llama_cpp (pip install llama-cpp-python) not found: skipped")
        return 77
    orig = lc.llama_model_default_params

    def no_extra_bufts():
        p = orig()
        p.use_extra_bufts = False
        return p
    lc.llama_model_default_params = no_extra_bufts
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2,
                          logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False, seed=1)
    ok = True
    worst = 0.0
    for q in PROMPTS:
        text = chatml(q)
        ids_l = llm.tokenize(text.encode(), add_bos=True, special=True)
        ids_m = json.loads(subprocess.run([args.moectl, "tokenize", "--model", args.model, "--special", text],
                                          check=True, capture_output=True, text=True).stdout)
        if ids_l != ids_m:
            print("verify: %r: token ids differ:\n  llama.cpp %s\n  moed      %s" % (q, ids_l, ids_m))
            ok = False
            continue
        llm.reset()
        llm.eval(ids_l)
        out = []
        for _ in range(args.n):
            tok = int(np.argmax(np.array(llm.scores[llm.n_tokens - 1])))
            out.append(tok)
            if tok == llm.token_eos():
                break
            llm.eval([tok])
        seq = ids_l + out
        with tempfile.NamedTemporaryFile(suffix=".f32") as f:
            subprocess.run([args.moectl, "eval", "--model", args.model, "--tokens", ",".join(map(str, seq[:-1])),
                            "--logits", f.name, "--threads", "2"], check=True, capture_output=True)
            lm = np.fromfile(f.name, dtype=np.float32).reshape(len(seq) - 1, -1)
        ll = np.array(llm.scores[:len(seq) - 1], dtype=np.float32)
        greedy_m = [int(t) for t in lm[len(ids_l) - 1:].argmax(1)]
        diff = float(np.abs(lm - ll).max())
        worst = max(worst, diff)
        same = greedy_m == out
        ok = ok and same
        answer = llm.detokenize([t for t in out if t != llm.token_eos()]).decode("utf-8", "replace")
        print("verify: %-40r %d prompt tokens, %d greedy tokens %s; max |logit diff| %.2e\n    %s"
              % (q, len(ids_l), len(out), "identical" if same else "DIFFER", diff, answer))
    print("verify: llama-cpp-python %s, %s; worst logit difference %.2e"
          % (llama_cpp.__version__, "all greedy answers identical" if ok else "MISMATCH", worst))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

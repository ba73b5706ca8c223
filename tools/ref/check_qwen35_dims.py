#!/usr/bin/env python3
"""qwen35moe at larger dims than the committed fixture (not run in CI: the
files are ~10 MB): n_embd 256, delta-net state 128 (the real models' head
dim), 2 key / 6 value heads, 3 delta-net layers + 1 attention layer
(full_attention_interval 4, llama.cpp's default pattern), experts of 64,
rope sections [3, 3, 2, 0]. Writes an F32 model with make_family_goldens.py's
qwen35moe writer, quantizes it to Q4_K_M with llama.cpp, and compares
`moectl eval` with llama.cpp (llama-cpp-python 0.3.36, use_extra_bufts off)
on a 40-token prompt: every position's logits, then 8 greedy steps.

Usage: python3 tools/ref/check_qwen35_dims.py --moectl build/client/moectl [--out /tmp/qwen35-dims]
"""
import argparse
import inspect
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_family_goldens as M  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--ref", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "..", "..", "shared", "ref"))
    ap.add_argument("--out", default="/tmp/qwen35-dims")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    src = inspect.getsource(M.write_qwen35moe)
    for a, b in (("= 32, 4, 2, 16, 8, 3, 6, 2, 32, 32", "= 256, 4, 2, 64, 16, 4, 8, 2, 64, 96"),
                 ("= 4, 16, 2, 4, 2", "= 4, 128, 2, 6, 4"), ("[2, 1, 1, 0]", "[3, 3, 2, 0]"),
                 ("def write_qwen35moe", "def write_dims")):
        if a not in src:
            raise SystemExit("the qwen35moe writer changed: %r not found" % a)
        src = src.replace(a, b)
    exec(src, M.__dict__)
    M.no_repack()
    vocab = M.read_vocab(os.path.join(args.ref, "vocab", "ggml-vocab-qwen2.gguf"), M.N_REGULAR)
    f32 = os.path.join(args.out, "qwen35-dims-F32.gguf")
    M.write_dims(f32, 77, vocab)
    q4 = os.path.join(args.out, "qwen35-dims-Q4_K_M.gguf")
    M.quantize(f32, q4, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    toks = [int(t) for t in np.random.default_rng(5).integers(0, M.N_REGULAR, size=40)]
    for var, path in (("F32", f32), ("Q4_K_M", q4)):
        gold, ids, margin = M.run_llama(path, toks, 8)
        lf = os.path.join(args.out, "moe-%s.f32" % var)
        subprocess.run([args.moectl, "eval", "--model", path, "--tokens", ",".join(map(str, toks + ids[:-1])),
                        "--logits", lf, "--threads", "2"], check=True, stdout=subprocess.DEVNULL)
        got = np.fromfile(lf, dtype="<f4").reshape(len(toks) + len(ids) - 1, -1)
        d = np.abs(got[:len(toks)] - gold)
        greedy = [int(x) for x in got[len(toks) - 1:].argmax(1)]
        print("%s: max |dlogit| %.3g (max |logit| %.4g), mean %.3g, argmax %d/%d, greedy %s (llama.cpp %s)"
              % (var, d.max(), np.abs(gold).max(), d.mean(), int((got[:len(toks)].argmax(1) == gold.argmax(1)).sum()),
                 len(toks), "identical" if greedy == ids else greedy, ids))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""CPU engine benchmark: prefill and decode tokens/s of `moectl run` beside
llama.cpp (llama-cpp-python) on the same GGUF, the same prompt tokens and the
same thread count, in the same run. Prints a markdown table with the ratio
moed / llama.cpp (higher is better for moed).

Usage: pip install llama-cpp-python
       python3 tools/bench/cpu_engine.py [--threads 2] [--prompt 64] [--gen 32] MODEL.gguf...

Both sides: the prompt is evaluated as one batch (n_batch >= prompt), then
--gen tokens are decoded one at a time greedily; wall-clock time of each
phase, after one untimed warm-up run (page cache warm). llama.cpp runs with an
F32 KV cache and flash attention off, as moed's CPU backend computes.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np


def moed_run(moectl, model, tokens, n_gen, threads):
    cmd = [moectl, "run", "--model", model, "--tokens", ",".join(map(str, tokens)), "-n", str(n_gen + 1),
           "--threads", str(threads), "--ctx", str(len(tokens) + n_gen + 8), "--stats"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    return stats["prefill_tok_s"], stats["decode_tok_s"], stats.get("simd", "")


def llama_run(model, tokens, n_gen, threads):
    from llama_cpp import Llama
    m = Llama(model_path=model, n_ctx=len(tokens) + n_gen + 8, n_batch=512, n_ubatch=512,
              n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0, flash_attn=False,
              logits_all=False, verbose=False)
    m.reset()
    t0 = time.perf_counter()
    m.eval(tokens)
    t1 = time.perf_counter()
    for _ in range(n_gen):
        nxt = int(np.argmax(m.scores[m.n_tokens - 1]))
        m.eval([nxt])
    t2 = time.perf_counter()
    del m
    return len(tokens) / (t1 - t0), n_gen / (t2 - t1)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--moectl", default=os.path.join(root, "build", "moectl"))
    args = ap.parse_args()
    import llama_cpp
    rng = np.random.default_rng(0)
    print("date: %s, machine: %s, %d CPUs (%s), threads %d, llama-cpp-python %s" % (
        time.strftime("%Y-%m-%d"), platform.node(), os.cpu_count(), platform.processor() or platform.machine(),
        args.threads, llama_cpp.__version__), file=sys.stderr)
    print("| model | size | prompt | moed prefill tok/s | llama.cpp prefill tok/s | ratio | "
          "moed decode tok/s | llama.cpp decode tok/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        from llama_cpp import Llama
        probe = Llama(model_path=model, vocab_only=True, verbose=False)
        n_vocab = probe.n_vocab()
        del probe
        tokens = [int(t) for t in rng.integers(10, min(n_vocab, 30000) - 10, size=args.prompt)]
        moed_run(args.moectl, model, tokens, 2, args.threads)   # warm-up
        llama_run(model, tokens, 2, args.threads)
        mp, md, simd = moed_run(args.moectl, model, tokens, args.gen, args.threads)
        lp, ld = llama_run(model, tokens, args.gen, args.threads)
        size = os.path.getsize(model) / (1 << 20)
        print("| %s | %.0f MiB | %d | %.1f | %.1f | %.2f | %.2f | %.2f | %.2f |" % (
            os.path.basename(model), size, args.prompt, mp, lp, mp / lp, md, ld, md / ld))
        sys.stdout.flush()


if __name__ == "__main__":
    main()

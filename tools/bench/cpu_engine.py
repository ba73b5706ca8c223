#!/usr/bin/env python3
"""CPU engine benchmark: prefill and decode tokens/s of `moectl run` beside
llama.cpp (llama-cpp-python) on the same GGUF, the same prompt tokens and the
same thread count, in the same run. Prints a markdown table with the ratio
moed / llama.cpp (higher is better for moed) and, for decode, the
memory-bound time per token (bytes read per token / this machine's read
bandwidth, measured in the same run) against moed's time per token.

Usage: pip install llama-cpp-python==0.3.36 gguf
       python3 tools/bench/cpu_engine.py [--threads 1,2] [--prompt 64,512] [--gen 64]
                                         [--reps 3] [--extra-bufts off|on|both] MODEL.gguf...

Both sides: the prompt is evaluated as one batch (n_batch >= prompt), then
--gen tokens are decoded one at a time greedily; wall-clock time of each
phase, best of --reps runs per side (after one untimed warm-up, page cache
warm). Both keep an F16 KV cache (each one's default) and llama.cpp runs
with flash attention off, as moed's CPU backend computes, and with use_extra_bufts as --extra-bufts says:
its extra buffer types (the repacked / AMX weight layouts) crash on MoE
batches with 0.3.36 on CPUs with AMX, so the default is off, and the table
says which configuration each row measured. n_vocab is read with
`moectl info --json` (Llama(vocab_only=True) followed by a full model
crashes llama-cpp-python 0.3.36).
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time

import numpy as np


def moed_run(moectl, model, tokens, n_gen, threads):
    cmd = [moectl, "run", "--model", model, "--tokens", ",".join(map(str, tokens)), "-n", str(n_gen + 1),
           "--threads", str(threads), "--ctx-size", str(len(tokens) + n_gen + 8),
           "--batch-size", str(max(512, len(tokens))), "--kv-type", "f16", "--stats"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    return stats["prefill_tok_s"], stats["decode_tok_s"]


def llama_open(model, ctx, threads, extra_bufts):
    from llama_cpp import Llama
    # n_batch = n_ctx: llama-cpp-python 0.3.36 keeps n_batch rows of scores
    # when logits_all is off and writes the last token's logits at row
    # n_past + n_tokens - 1, which is past them once the context outgrows
    # n_batch (a prompt of 512 + decode); the micro-batch stays 512
    kw = dict(model_path=model, n_ctx=ctx, n_batch=max(512, ctx), n_ubatch=512, n_threads=threads,
              n_threads_batch=threads, type_k=1, type_v=1, flash_attn=False, logits_all=False, verbose=False)
    # llama-cpp-python 0.3.36's Llama() has no argument for it: the field
    # of llama_model_params is set through the defaults it starts from
    import llama_cpp
    orig = llama_cpp.llama_model_default_params

    def defaults():
        p = orig()
        p.use_extra_bufts = extra_bufts
        return p

    llama_cpp.llama_model_default_params = defaults
    import llama_cpp.llama as ll
    orig_ll = getattr(ll.llama_cpp, "llama_model_default_params", None)
    ll.llama_cpp.llama_model_default_params = defaults
    try:
        return Llama(**kw)
    finally:
        llama_cpp.llama_model_default_params = orig
        if orig_ll is not None:
            ll.llama_cpp.llama_model_default_params = orig_ll


def llama_run(m, tokens, n_gen):
    m.reset()
    t0 = time.perf_counter()
    m.eval(tokens)
    t1 = time.perf_counter()
    import llama_cpp
    for _ in range(n_gen):
        # the last token's logits from llama.cpp itself: with logits_all off,
        # llama-cpp-python 0.3.36 leaves Llama.scores at zero, so reading it
        # fed token 0 at every step
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m._ctx.ctx, -1), shape=(m.n_vocab(),))
        nxt = int(np.argmax(row))
        m.eval([nxt])
    t2 = time.perf_counter()
    return len(tokens) / (t1 - t0), n_gen / (t2 - t1)


def _read(args):
    n, reps = args
    a = np.ones(n, dtype=np.float32)
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def read_bandwidth(threads, mib=1024):
    """Read bandwidth of `threads` processes each summing its own array of
    mib MiB (numpy float32 sum: compute-light, so memory-bound)."""
    n = mib * (1 << 20) // 4
    with mp.Pool(threads) as pool:
        return sum(pool.map(_read, [(n, 5)] * threads))


def bytes_per_token(moectl, model):
    """Weights read per decode token: every dense matrix but the token
    embedding (one row), and k/n of every expert."""
    info = json.loads(subprocess.run([moectl, "info", model, "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    from gguf import GGUFReader
    r = GGUFReader(model)
    embd = sum(int(t.n_bytes) for t in r.tensors if t.name == "token_embd.weight")
    experts = info["tensor_bytes"] - info["dense_bytes"]
    return info["dense_bytes"] - embd + experts * info["n_expert_used"] / info["n_expert"], info


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", default="64,512")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--extra-bufts", choices=["off", "on", "both"], default="off")
    ap.add_argument("--moectl", default=os.path.join(root, "build", "client", "moectl"))
    args = ap.parse_args()
    import llama_cpp
    threads = [int(t) for t in args.threads.split(",")]
    prompts = [int(p) for p in args.prompt.split(",")]
    bufts = {"off": [False], "on": [True], "both": [False, True]}[args.extra_bufts]
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            fl = next(l for l in f if l.startswith("flags")).split()
        flags = " ".join(x for x in fl if x.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, StopIteration):
        pass
    bw = {t: read_bandwidth(t) for t in threads}
    print("date: %s, machine: %s, %d CPUs, load %s, llama-cpp-python %s, flags: %s" % (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), platform.node(), os.cpu_count(),
        "%.2f %.2f %.2f" % os.getloadavg(), llama_cpp.__version__, flags))
    print("read bandwidth: " + ", ".join("%d thread(s) %.1f GB/s" % (t, bw[t] / 1e9) for t in threads))
    print("| model | weights/token | threads | prompt | llama.cpp extra bufts | moed prefill tok/s | "
          "llama.cpp prefill tok/s | ratio | moed decode tok/s | llama.cpp decode tok/s | ratio | "
          "decode / memory-bound time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for model in args.models:
        bpt, info = bytes_per_token(args.moectl, model)
        n_vocab = info["n_vocab"]
        for nt in threads:
            for xb in bufts:
                lm = llama_open(model, max(prompts) + args.gen + 8, nt, xb)
                for npr in prompts:
                    tokens = [int(t) for t in rng.integers(10, n_vocab - 10, size=npr)]
                    moed_run(args.moectl, model, tokens, 2, nt)  # warm-up
                    llama_run(lm, tokens, 2)
                    mp_, md, lp, ld = 0.0, 0.0, 0.0, 0.0
                    for _ in range(args.reps):
                        a, b = moed_run(args.moectl, model, tokens, args.gen, nt)
                        mp_, md = max(mp_, a), max(md, b)
                        a, b = llama_run(lm, tokens, args.gen)
                        lp, ld = max(lp, a), max(ld, b)
                    bound = bpt / bw[nt]  # seconds per token if only reading weights
                    print("| %s | %.0f MiB | %d | %d | %s | %.1f | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f |" % (
                        os.path.basename(model), bpt / (1 << 20), nt, npr, "on" if xb else "off", mp_, lp,
                        mp_ / lp, md, ld, md / ld, (1.0 / md) / bound))
                    sys.stdout.flush()
                del lm


if __name__ == "__main__":
    main()

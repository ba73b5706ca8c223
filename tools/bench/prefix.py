#!/usr/bin/env python3
"""Prefix reuse benchmark of moed (issue 19): the same workloads with the KV
pool's prefix cache on and off, in one run, each on a fresh moed.

  multi-turn   one chat replayed: a 1,000-token history, then --turns turns
               that each add ~100 tokens (the previous answer and a new
               question) and resend the whole history.
  shared-sys   --clients concurrent clients, all with one 2,000-token system
               prompt and their own short question; each asks --rounds
               questions back to back.

Prompts are token ids (`prompt` as an array), so lengths are exact. Per
workload and setting: TTFT p50/p99 (streaming, time to the first token),
the prompt tokens the engine computed (/v1/moed/stats tokens_in) and those
served from cached blocks (usage.prompt_tokens_details.cached_tokens), and,
for the multi-turn replay, the first and last turn's TTFT.

With --kv-shape it also prints the KV term of the default memory plan
before issue 19 (f32, a full context per sequence: `--kv-type f32
--kv-size max_seqs*ctx`) and now (the defaults), from `moed --check-config`
on a model with Qwen3-30B-A3B's attention shape (48 layers, 4 KV heads of
128) made by moe-gen (small experts and vocabulary: the KV term depends
only on the attention shape).

  python3 tools/bench/prefix.py --model /tmp/demo-4k.gguf --kv-shape
Standard library only.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load import http, stats  # noqa: E402


def start(args, td, prefix_cache):
    sock = os.path.join(td, "moed.sock")
    cmd = [args.moed, "--model", args.model, "--socket", sock, "--max-seqs", str(args.clients),
           "--ctx-size", str(args.ctx), "--threads", str(args.threads), "--queue-size", "1024",
           "--prefix-cache", "true" if prefix_cache else "false", "--log-level", "warn",
           "--warm-start=false"]
    if args.kv_size:
        cmd += ["--kv-size", str(args.kv_size)]
    log = open(os.path.join(td, "moed.log"), "w")
    p = subprocess.Popen(cmd, stderr=log, stdout=log)
    for _ in range(1200):
        try:
            if http(sock, "GET", "/health")[0] == 200:
                return p, sock
        except OSError:
            pass
        if p.poll() is not None:
            raise RuntimeError("moed exited: " + open(os.path.join(td, "moed.log")).read())
        time.sleep(0.05)
    raise RuntimeError("moed did not start")


def ask(sock, tokens, max_tokens):
    """One streaming completion: (ttft seconds, cached_tokens, completion tokens)."""
    t0 = time.monotonic()
    first = [None]
    usage = [None]
    errors = []

    def on_event(ev):
        if not ev.startswith("data: {"):
            return
        j = json.loads(ev[6:])
        if "error" in j:
            errors.append(j["error"]["message"])
        if j.get("choices") and first[0] is None:
            first[0] = time.monotonic() - t0
        if j.get("usage"):
            usage[0] = j["usage"]

    st, _ = http(sock, "POST", "/v1/completions",
                 {"prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}}, stream_cb=on_event)
    if st != 200 or errors or usage[0] is None:
        raise RuntimeError("status %d %s" % (st, errors[:1]))
    return first[0], usage[0]["prompt_tokens_details"]["cached_tokens"], usage[0]["completion_tokens"]


def pct(xs, f):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(f * len(xs)))]


def multi_turn(args, sock, rng):
    history = [rng.randrange(1, args.vocab) for _ in range(1000)]
    ttft, cached = [], 0
    for turn in range(args.turns):
        history += [rng.randrange(1, args.vocab) for _ in range(100)]
        t, c, _ = ask(sock, history, args.tokens)
        ttft.append(t)
        cached += c
    return ttft, cached


def shared_sys(args, sock, rng):
    system = [rng.randrange(1, args.vocab) for _ in range(2000)]
    questions = [[[rng.randrange(1, args.vocab) for _ in range(40)] for _ in range(args.rounds)]
                 for _ in range(args.clients)]
    ttft, cached, errors = [], [0], []
    lock = threading.Lock()

    def client(i):
        try:
            for r in range(args.rounds):
                t, c, _ = ask(sock, system + questions[i][r], args.tokens)
                with lock:
                    ttft.append(t)
                    cached[0] += c
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(str(e))

    th = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return ttft, cached[0]


def run(args, name, fn, prefix_cache):
    with tempfile.TemporaryDirectory() as td:
        p, sock = start(args, td, prefix_cache)
        try:
            s0 = stats(sock)["engine"]["tokens_in"]
            t0 = time.monotonic()
            ttft, cached = fn(args, sock, random.Random(args.seed))
            wall = time.monotonic() - t0
            s1 = stats(sock)["engine"]["tokens_in"]
        finally:
            p.terminate()
            p.wait(timeout=60)
    r = {"workload": name, "reuse": "on" if prefix_cache else "off", "requests": len(ttft),
         "p50_ms": 1e3 * statistics.median(ttft), "p99_ms": 1e3 * pct(ttft, 0.99),
         "prefill": s1 - s0, "cached": cached, "wall_s": wall,
         "first_ms": 1e3 * ttft[0], "last_ms": 1e3 * ttft[-1]}
    print("%(workload)s reuse=%(reuse)s: %(requests)d requests, TTFT p50 %(p50_ms).0f ms p99 %(p99_ms).0f ms,"
          " prefill %(prefill)d tokens, cached %(cached)d, wall %(wall_s).1f s" % r, file=sys.stderr)
    return r


def kv_shape(args):
    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "qwen3-30b-a3b-attn.gguf")
        subprocess.run([args.moe_gen, "--arch", "qwen3moe", "--n-layer", "48", "--n-embd", "128",
                        "--n-head", "32", "--n-head-kv", "4", "--head-dim", "128", "--n-expert", "8",
                        "--n-expert-used", "2", "--n-ff-exp", "32", "--ctx", "40960", "--type", "Q8_0",
                        "--quiet", "-o", path], check=True)
        rows = []
        for label, extra in (("before (f32, max_seqs x ctx_size)", ["--kv-type", "f32", "--kv-size",
                                                                       str(16 * 4096)]),
                             ("now (defaults: f16, paged pool)", [])):
            out = subprocess.run([args.moed, "--model", path, "--check-config", "--max-seqs", "16",
                                  "--ctx-size", "4096", "--cache-experts", "2",
                                  "--socket", os.path.join(td, "x.sock")] + extra,
                                 capture_output=True, text=True, check=True).stdout
            line = next(l for l in out.splitlines() if l.strip().startswith("KV cache"))
            mib = float(line.split()[2])
            per_tok = float(re.search(r"([0-9.]+) KiB a token", line).group(1))
            rows.append((label, mib, per_tok, line.strip()))
            print(line.strip(), file=sys.stderr)
        return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moed", default="build/daemon/moed")
    ap.add_argument("--moe-gen", default="build/tools/moe-gen")
    ap.add_argument("--model", required=True, help="a model with a context of at least --ctx")
    ap.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    ap.add_argument("--ctx", type=int, default=2304)
    ap.add_argument("--kv-size", type=int, default=0, help="KV pool tokens (0: moed's default)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8, help="tokens generated per request")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kv-shape", action="store_true", help="also the Qwen3-30B-A3B KV plan before/after")
    args = ap.parse_args()
    rows = []
    for name, fn in (("multi-turn", multi_turn), ("shared-sys", shared_sys)):
        for on in (False, True):
            rows.append(run(args, name, fn, on))
    print("| workload | prefix reuse | requests | TTFT p50 ms | TTFT p99 ms | first / last turn TTFT ms"
          " | prompt tokens computed | prompt tokens cached |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fl = "%.0f / %.0f" % (r["first_ms"], r["last_ms"]) if r["workload"] == "multi-turn" else ""
        print("| %s | %s | %d | %.0f | %.0f | %s | %d | %d |" % (r["workload"], r["reuse"], r["requests"],
                                                               r["p50_ms"], r["p99_ms"], fl, r["prefill"],
                                                               r["cached"]))
    if args.kv_shape:
        kv = kv_shape(args)
        print()
        print("| Qwen3-30B-A3B attention, 16 seqs x 4096 ctx | KV MiB | KiB / token | per sequence MiB (pool / 16) |")
        print("|---|---:|---:|---:|")
        for label, mib, per_tok, _ in kv:
            print("| %s | %.1f | %.1f | %.1f |" % (label, mib, per_tok, mib / 16))
        print()
        print("now / before: %.3f" % (kv[1][1] / kv[0][1]))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Issue 6's target: with prefetch on, time per decode token within 1.5x of
max(compute time per token, expert bytes missed per token / disk rate).

All three are measured in the same run on the same machine:
  - disk rate: fio, O_DIRECT io_uring random reads of the pack, 1 MiB blocks
    (the reader's request size), the best of depth 16 and 64 (moed's reader
    keeps up to 64 requests in flight), so the bound is the disk's, not a
    rate moed's reader beats; with --fio-each, measured again before and
    after each configuration, random and sequential 1 MiB reads at depth 64
    (moed reads an expert as consecutive requests at a random place), the
    fastest of the four, for disks whose rate drifts;
  - compute per token: the model decoding with every expert resident (the
    GGUF mmapped and already in the page cache: no I/O);
  - bytes missed per token and time per token: `moectl run --stats` from the
    pack at each budget, decode only (a prefill-only run is subtracted).

  python3 tools/bench/cache_bound.py --moectl build/client/moectl \
      --gguf /tmp/moe-cache-bench/bench-4g.gguf --pack /tmp/moe-cache-bench/bench-4g.moe \
      [--modes none,gate,gate:always,history] [--depth 2] [--fio-each]
"""
import argparse
import json
import subprocess
import sys


def run(moectl, model, n, extra, threads):
    toks = ",".join(str(100 + i) for i in range(8))
    cmd = [moectl, "run", "--model", model, "--tokens", toks, "-n", str(n), "--threads", str(threads),
           "--stats"] + extra
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    d = {}
    for line in p.stderr.splitlines():
        if line.startswith("{"):
            d.update(json.loads(line))
    return d


def fio_rate(path, depth, runtime=8, rw="randread"):
    cmd = ["fio", "--name=r", "--filename=" + path, "--rw=" + rw, "--bs=1M", "--iodepth=%d" % depth,
           "--ioengine=io_uring", "--direct=1", "--runtime=%d" % runtime, "--time_based", "--readonly",
           "--output-format=json"]
    j = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return j["jobs"][0]["read"]["bw_bytes"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moectl", default="build/client/moectl")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--experts", type=int, default=128, help="experts in the model (layers x experts)")
    ap.add_argument("--budgets", default="12.5,25,50")
    ap.add_argument("--modes", default="none,gate,history",
                    help="prefetch modes, comma-separated; MODE:always disables the governor")
    ap.add_argument("--depth", type=int, default=1, help="--prefetch-depth")
    ap.add_argument("--tokens", type=int, default=49)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fio-each", action="store_true",
                    help="measure the disk again (fio random and sequential 1 MiB reads, depth 64,"
                         " 4 s each) right before and after each configuration and use the fastest"
                         " for its bound: on a disk whose throughput drifts, the rate of the moment")
    a = ap.parse_args()

    rates = {d: fio_rate(a.pack, d) for d in (16, 64)}
    disk = max(rates.values())
    run(a.moectl, a.gguf, 2, [], a.threads)                       # warm the page cache
    base = run(a.moectl, a.gguf, a.tokens, [], a.threads)
    compute = 1.0 / base["decode_tok_s"]
    print("disk %.2f GB/s (fio randread 1 MiB O_DIRECT: depth 16 %.2f, depth 64 %.2f); compute %.3f"
          " s/token (all resident)" % (disk / 1e9, rates[16] / 1e9, rates[64] / 1e9, compute), file=sys.stderr)
    print("| budget | prefetch | s/token | bytes missed / token | bound s/token | ratio | hit rate |"
          " stall fraction | prefetch steps on/off | prefetch used/issued | disk GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for pct in [float(x) for x in a.budgets.split(",")]:
        slots = max(2, int(a.experts * pct / 100))
        for mode in a.modes.split(","):
            # "gate:always" keeps prefetch on at every step (no governor)
            pf, _, always = mode.partition(":")
            extra = ["--cache-experts", str(slots), "--prefetch", pf] + (["--prefetch-always"] if always else []) \
                + (["--prefetch-depth", str(a.depth)] if pf != "none" else [])
            pre = run(a.moectl, a.pack, 1, extra, a.threads)
            # moed reads an expert as consecutive 1 MiB requests at a random
            # place: between fio's random and sequential patterns; the faster
            # of the two, before and after, is the rate of the moment
            before = max(fio_rate(a.pack, 64, 4), fio_rate(a.pack, 64, 4, "read")) if a.fio_each else disk
            full = run(a.moectl, a.pack, a.tokens, extra, a.threads)
            rate = max(before, fio_rate(a.pack, 64, 4), fio_rate(a.pack, 64, 4, "read")) \
                if a.fio_each else disk
            ntok = full["decode_tokens"]
            missed = (full["bytes_loaded"] - pre["bytes_loaded"]) / ntok
            spt = full["decode_s"] / ntok
            bound = max(compute, missed / rate)
            steps = "%d/%d" % (full.get("prefetch_steps_on", 0), full.get("prefetch_steps_off", 0)) \
                if pf != "none" else "-"
            stall = (full["stall_s"] - pre["stall_s"]) / full["decode_s"]
            used = "%d/%d" % (full["prefetch_used"], full["prefetch_issued"]) if pf != "none" else "-"
            print("| %.1f%% (%d) | %s | %.3f | %.0f MB | %.3f | %.2f | %.3f | %.2f | %s | %s | %.2f |" % (
                pct, slots, mode, spt, missed / 1e6, bound, spt / bound, full["hit_rate"], stall, steps,
                used, rate / 1e9))
            sys.stdout.flush()


if __name__ == "__main__":
    main()

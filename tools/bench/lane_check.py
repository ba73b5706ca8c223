#!/usr/bin/env python3
"""Lane simulator vs the engine (issue 21) on the CPU backend as the device.

Generates a Mixtral-shaped Q4_0 model with moe-gen, decodes with `moectl run
--upload-weights` (the device data path on the CPU backend) for miss_lane =
copy, cpu and auto at a cache budget, plus one run with every expert
resident, and records each run's routing (--trace) and stats. The rates come
from those runs (the CPU lane's bytes over its seconds; the dense part from
cpu-only's decode time less its CPU lane's; the device's expert rate from
the resident run less the dense part; the copy lane's bytes over its
wait), then `moectl cache-sim --lanes --no-overlap --cold` replays each
run's own trace with those rates. Printed: measured and predicted decode ms
per token per mode, and the ratio.

On this setup the two lanes share the same cores (the "device" is the CPU
backend), so nothing overlaps: the simulator is run with --no-overlap, and
what is checked is the cost model (per-expert costs, hits, copies), not the
overlap, which needs a GPU.

    tools/bench/lane_check.py [--build build] [--work /tmp/moe-lane-check]
        [--pcts 25,12.5,50] [--tokens 32] [--threads 2] [--repeat 3]
"""
import argparse
import json
import os
import re
import subprocess
import sys


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def json_lines(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.update(json.loads(line))
            except ValueError:
                pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--work", default="/tmp/moe-lane-check")
    ap.add_argument("--pcts", default="25,12.5,50", help="budgets in %%; the first is fitted")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="runs per setting; the fastest counts")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    moectl = os.path.join(a.build, "client", "moectl")
    gen = os.path.join(a.build, "tools", "moe-gen")
    os.makedirs(a.work, exist_ok=True)
    n_layer, n_expert = 8, 16
    model = os.path.join(a.work, "lanes.gguf")
    if not os.path.exists(model):
        run([gen, "--arch", "llama", "--n-embd", "1024", "--n-head", "8", "--n-head-kv", "8", "--head-dim", "128", "--n-layer", str(n_layer), "--n-expert",
             str(n_expert), "--n-expert-used", "2", "--n-ff-exp", "2048", "--type", "Q4_0",
             "--seed", "7", "--quiet", "-o", model])
    info = json.loads(run([moectl, "info", model, "--json"]).stdout)
    expert_b = int(info["bytes_per_expert"])
    help_text = run([moectl, "run", "--help"]).stdout + run([moectl, "run", "--help"]).stderr
    if "--miss-lane" not in help_text or "--upload-weights" not in help_text:
        print("lane_check: this moectl has no --miss-lane/--upload-weights (the engine's lanes are"
              " not built in)", file=sys.stderr)
        return 77
    prompt = ",".join(str(100 + i) for i in range(8))
    base = [moectl, "run", "--model", model, "--tokens", prompt, "-n", str(a.tokens), "--threads",
            str(a.threads), "--upload-weights", "--stats"]
    n_keys = n_layer * n_expert
    pcts = [float(x) for x in a.pcts.split(",")]
    runs = [("resident", 100.0)] + [(m, p) for p in pcts for m in ("copy", "cpu", "auto")]
    res = {}
    for mode, pct in runs:
        slots = n_keys if mode == "resident" else max(2, int(n_keys * pct / 100))
        trace = os.path.join(a.work, "%s-%g.trace" % (mode, pct))
        cmd = base + ["--cache-experts", str(slots), "--trace", trace]
        if mode != "resident":
            cmd += ["--miss-lane", mode]
        # the fastest of a few runs: other load on the machine only adds time
        best = None
        for _ in range(a.repeat):
            st = json_lines(run(cmd).stderr)
            st.update(trace=trace, slots=slots, decode_ms=1e3 * st["decode_s"] / max(1, st["decode_tokens"]))
            if best is None or st["decode_ms"] < best["decode_ms"]:
                best = st
        res[(mode, pct)] = best
    # Fitted at the first budget: the CPU lane's rate (its bytes over its
    # seconds), the dense part (cpu-only from a cold cache computes every
    # routed expert on the CPU lane: its decode time less that lane's), the
    # device's expert rate (the resident run less the dense part), the copy
    # rate (the value that makes copy-only's prediction match). The other
    # budgets are predictions.
    fit = pcts[0]
    cpu = res[("cpu", fit)]
    cpu_bps = cpu["lane_cpu_bytes"] / cpu["lane_cpu_s"]
    per_tok_expert = 2 * n_layer * expert_b
    dense_ms = max(1e-3, cpu["decode_ms"] - 1e3 * per_tok_expert / cpu_bps)
    dev_ms = max(1e-3, res[("resident", 100.0)]["decode_ms"] - dense_ms)
    dev_bps = per_tok_expert / (dev_ms * 1e-3)
    dense_b = dense_ms * 1e-3 * dev_bps / n_layer

    def sim(mode, pct, link_bps, extra=()):
        st = res[(mode, pct)]
        flags = ["--cpu-gbps", "%.6f" % (cpu_bps / 1e9), "--dev-gbps", "%.6f" % (dev_bps / 1e9),
                 "--cpu-tok-gbps", "%.6f" % (4 * cpu_bps / 1e9), "--dev-tok-gbps", "%.6f" % (4 * dev_bps / 1e9),
                 "--link-gbps", "%.6f" % (link_bps / 1e9), "--disk-gbps", "100", "--sync-us", "0"]
        out = run([moectl, "cache-sim", "--lanes", "--trace", st["trace"], "--capacity", str(st["slots"]),
                   "--profile", "desktop", "--miss-lane", mode, "--no-overlap", "--cold",
                   "--expert-bytes", str(expert_b), "--dense-bytes", "%d" % dense_b] + flags + list(extra)).stdout
        row = [l for l in out.splitlines() if " mode=%s " % mode in l][0]
        return dict(kv.split("=", 1) for kv in row.split())

    # copy-only's predicted time is A + B / link: two points give the link
    t1 = float(sim("copy", fit, 1e9)["decode_ms_per_token"])
    t2 = float(sim("copy", fit, 2e9)["decode_ms_per_token"])
    b = 2 * (t1 - t2)       # B / 1e9
    a_ = t1 - b
    meas = res[("copy", fit)]["decode_ms"]
    link_bps = 1e9 * b / (meas - a_) if meas > a_ and b > 0 else 1e12
    print("# %s: %d layers x %d experts of %d bytes, %d decode tokens, %d threads; fitted at %g%%"
          % (model, n_layer, n_expert, expert_b, a.tokens, a.threads, fit))
    print("# rates: cpu lane %.3f GB/s, device %.3f GB/s, copy %.3f GB/s, dense %.2f ms/token (resident %.2f)"
          % (cpu_bps / 1e9, dev_bps / 1e9, link_bps / 1e9, dense_ms, res[("resident", 100.0)]["decode_ms"]))
    print("| budget | mode | measured ms/token | predicted ms/token | predicted / measured | engine lanes cpu/copy/both | sim lanes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for p in pcts:
        for mode in ("copy", "cpu", "auto"):
            st = res[(mode, p)]
            # auto: the simulated rule knows the fitted rates; the engine's
            # measures the CPU lane but cannot time uploads or the device on
            # the CPU backend, so it keeps their defaults (25 GB/s, 1 TB/s)
            # and copies more: compare the lane counts
            d = sim(mode, p, link_bps)
            pred = float(d["decode_ms_per_token"])
            note = " (fitted)" if p == fit and mode in ("copy", "cpu") else ""
            print("| %g%% | %s | %.2f | %.2f%s | %.2f | %s/%s/%s | %s/%s/%s |"
                  % (p, mode, st["decode_ms"], pred, note, pred / st["decode_ms"], st.get("lane_cpu", 0),
                     st.get("lane_copy", 0), st.get("lane_both", 0), d["cpu"], d["copy"], d["both"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

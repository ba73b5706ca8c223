#!/usr/bin/env python3
"""The GPU benchmark of tools/gpu_check.sh (issue 20), one JSON document.

For each model shape: generate it with moe-gen on this machine's disk, pack
it (moectl pack), measure the disk (O_DIRECT reads of the pack) and then
decode with gpu-bench:
  - every expert resident (the GGUF, no budget): the compute time per token
    and the HBM-bound time (bytes a decode step reads / the device-to-device
    copy rate measured in this run);
  - expert budgets of 12.5/25/50/100% of the experts, prefetch off and on
    (speculative gating, every step), a host-RAM tier as large as the
    experts: tok/s, time per token split into compute / stall / upload,
    hit rate per tier (GPU slots, host RAM, disk), H2D GB/s achieved against
    the pinned cudaMemcpy peak of this run, and the bound
    max(compute, bytes uploaded / pinned H2D peak, bytes read / disk rate).
Runs are ordered by importance (resident, 25%, 12.5%, 50%, 100%) and each
gets a timeout from --deadline, so a slow machine yields a partial report,
never none: what did not run is listed as skipped with the reason. The
results file is rewritten after every run.

Shapes (per-layer dimensions of the real models, fewer layers so that
generating, packing and decoding fit the time budget; --layers-* change it):
  mixtral  Mixtral-8x7B: n_embd 4096, 32 heads / 8 KV heads of 128, 8
           experts top-2 of n_ff 14336, vocab 32000; Q4_0
  qwen3    Qwen3-30B-A3B: n_embd 2048, 32 heads / 4 KV heads of 128, 128
           experts top-8 of n_ff 768, vocab 151936; Q4_K_M when moe-gen
           writes it, else Q4_0 (said in the results)
Weights are random with --residual-gain 0.3 (slowly changing residual
stream, predictable routing, as in trained models: doc/moe-gen.md).

  bench.py --build build-gpu --work /tmp/moe-gpu-bench --out OUT/bench.json
           [--deadline EPOCH] [--backend cuda|cpu] [--dry]
--backend cpu --dry: tiny shapes on the CPU backend's device path, the dry
run of the plumbing (no figure of it is a GPU figure).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SHAPES = {
    "mixtral": ["--arch", "llama", "--n-embd", "4096", "--n-head", "32", "--n-head-kv", "8", "--head-dim", "128",
                "--n-expert", "8", "--n-expert-used", "2", "--n-ff-exp", "14336", "--n-vocab", "32000",
                "--ctx", "4096"],
    "qwen3": ["--arch", "qwen3moe", "--n-embd", "2048", "--n-head", "32", "--n-head-kv", "4", "--head-dim", "128",
              "--n-expert", "128", "--n-expert-used", "8", "--n-ff-exp", "768", "--n-vocab", "151936",
              "--ctx", "4096"],
}
DRY_SHAPES = {
    "mixtral": ["--arch", "llama", "--n-embd", "256", "--n-head", "8", "--n-head-kv", "2", "--head-dim", "32",
                "--n-expert", "8", "--n-expert-used", "2", "--n-ff-exp", "512", "--ctx", "512"],
    "qwen3": ["--arch", "qwen3moe", "--n-embd", "256", "--n-head", "4", "--n-head-kv", "2", "--head-dim", "64",
              "--n-expert", "32", "--n-expert-used", "4", "--n-ff-exp", "128", "--ctx", "512"],
}
NAMES = {"mixtral": "Mixtral-8x7B-shaped", "qwen3": "Qwen3-30B-A3B-shaped"}
# (budget %, prefetch, miss lane) in order of importance; None = every expert
# resident. The three lanes (doc/cache.md "Hybrid lanes") at 25% and 12.5%.
RUNS = [(None, "none", "copy"), (25, "none", "copy"), (25, "none", "cpu"), (25, "none", "auto"),
        (12.5, "none", "copy"), (12.5, "none", "cpu"), (12.5, "none", "auto"), (25, "gate", "copy"),
        (12.5, "gate", "copy"), (25, "gate", "auto"), (50, "none", "copy"), (50, "gate", "copy"),
        (100, "none", "copy"), (100, "gate", "copy")]


class Bench:
    def __init__(self, a):
        self.a = a
        self.doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backend": a.backend,
                    "dry": a.dry, "rates": None, "models": [], "skipped": [], "notes": []}

    def left(self):
        return self.a.deadline - time.time()

    def save(self):
        tmp = self.a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.a.out)

    def tool(self, name):
        for p in (os.path.join(self.a.build, "tools", name), os.path.join(self.a.build, "tools", "gpu", name),
                  os.path.join(self.a.build, "client", name)):
            if os.path.exists(p):
                return p
        raise SystemExit("bench: %s not built in %s" % (name, self.a.build))

    def run(self, cmd, timeout, what):
        """stdout's last JSON line, or None (the reason in doc['skipped'])."""
        if timeout < 5:
            self.doc["skipped"].append({"what": what, "why": "time budget spent (%.0f s left)" % self.left()})
            return None
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.doc["skipped"].append({"what": what, "why": "timed out after %.0f s" % timeout})
            return None
        dt = time.time() - t0
        line = None
        for ln in p.stdout.splitlines():
            if ln.startswith("{"):
                line = ln
        if p.returncode != 0 or line is None:
            tail = (p.stderr.strip().splitlines() or ["?"])[-3:]
            self.doc["skipped"].append({"what": what, "why": "failed (exit %d): %s" % (p.returncode,
                                                                                     " | ".join(tail))})
            return None
        d = json.loads(line)
        d["wall_s"] = round(dt, 3)
        if "error" in d:
            self.doc["skipped"].append({"what": what, "why": d["error"]})
            return None
        return d

    def step(self, cmd, timeout, what):
        """A command whose exit status is the result; its time, or None."""
        if timeout < 5:
            self.doc["skipped"].append({"what": what, "why": "time budget spent"})
            return None
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.doc["skipped"].append({"what": what, "why": "timed out after %.0f s" % timeout})
            return None
        if p.returncode != 0:
            self.doc["skipped"].append({"what": what, "why": "failed (exit %d): %s" % (
                p.returncode, " | ".join((p.stderr.strip().splitlines() or ["?"])[-3:]))})
            return None
        return round(time.time() - t0, 2)

    def model_type(self, shape):
        if shape == "mixtral":
            return "Q4_0", None
        gen = self.tool("moe-gen")
        h = subprocess.run([gen, "--help"], capture_output=True, text=True).stdout
        if "Q4_K_M" in h:
            return "Q4_K_M", None
        return "Q4_0", "moe-gen writes no Q4_K_M yet (its K-quant writers are being added): Q4_0 instead"

    def one_model(self, shape, layers, share):
        a = self.a
        t_end = time.time() + share
        typ, note = self.model_type(shape)
        m = {"shape": shape, "name": NAMES[shape], "type": typ, "layers": layers, "runs": [], "note": note}
        self.doc["models"].append(m)
        if note:
            self.doc["notes"].append(note)
        os.makedirs(a.work, exist_ok=True)
        gguf = os.path.join(a.work, "%s-%dL-%s.gguf" % (shape, layers, typ))
        pack = gguf[:-5] + ".moe"
        shp = (DRY_SHAPES if a.dry else SHAPES)[shape]
        gen_cmd = [self.tool("moe-gen")] + shp + ["--n-layer", str(layers), "--type", typ, "--seed", "7",
                                                  "--residual-gain", "0.3", "--quiet", "-o", gguf]
        m["generate_s"] = self.step(gen_cmd, min(self.left() - 30, 120), "%s: generate" % shape)
        if m["generate_s"] is None:
            return
        m["gguf_bytes"] = os.path.getsize(gguf)
        pack_cmd = [self.tool("moectl"), "pack", gguf, "-o", pack, "--level", "1", "--quiet"]
        m["pack_s"] = self.step(pack_cmd, min(self.left() - 30, 120), "%s: pack" % shape)
        if m["pack_s"] is not None:
            m["disk"] = self.run([self.tool("gpu-bench"), "disk", pack, "--seconds", "2" if not a.dry else "0.3"],
                                 20, "%s: disk rate" % shape)
        rates = self.doc["rates"] or {}
        resident = None
        for budget, pf, lane in RUNS:
            what = "%s: %s, prefetch %s, miss lane %s" % (
                shape, "resident" if budget is None else "%g%%" % budget, pf, lane)
            if budget is not None and m["pack_s"] is None:
                self.doc["skipped"].append({"what": what, "why": "no pack"})
                continue
            cmd = [self.tool("gpu-bench"), "run", "--backend", a.backend, "--threads", str(a.threads),
                   "--prompt", str(a.prompt), "--warmup", str(a.warmup), "--decode", str(a.decode),
                   "--prefetch", pf, "--miss-lane", lane]
            if budget is None:
                cmd += ["--model", gguf]
            else:
                cmd += ["--model", pack, "--budget", str(budget), "--host-pct", "100"]
            r = self.run(cmd, min(t_end - time.time(), self.left() - 20, a.run_timeout), what)
            if r is None:
                continue
            r["resident"] = budget is None
            if budget is None:
                resident = r
                if rates.get("d2d_gbs"):
                    r["hbm_bound_s"] = r["hbm_bytes_per_token"] / (rates["d2d_gbs"] * 1e9)
                    r["hbm_ratio"] = r["s_per_token"] / r["hbm_bound_s"]
            else:
                terms = {}
                if resident:
                    terms["compute"] = resident["s_per_token"]
                if rates.get("h2d_pinned_gbs"):
                    terms["h2d"] = r["upload_bytes_per_token"] / (rates["h2d_pinned_gbs"] * 1e9)
                if m.get("disk") and m["disk"].get("disk_gbs"):
                    terms["disk"] = r["disk_bytes_per_token"] / (m["disk"]["disk_gbs"] * 1e9)
                if terms:
                    r["bound_terms_s"] = terms
                    r["bound_s"] = max(terms.values())
                    r["bound_ratio"] = r["s_per_token"] / r["bound_s"] if r["bound_s"] > 0 else None
                if rates.get("h2d_pinned_gbs") and r.get("upload_gbs"):
                    r["upload_vs_peak"] = r["upload_gbs"] / rates["h2d_pinned_gbs"]
            m["runs"].append(r)
            self.save()
        for f in (gguf, pack):
            if os.path.exists(f) and not a.keep:
                os.remove(f)

    def main(self):
        a = self.a
        if a.backend == "cuda":
            self.doc["rates"] = self.run([self.tool("gpu-bench"), "rates"], 60, "copy rates")
        self.save()
        shapes = [s for s in a.models.split(",") if s]
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(a.work)) or "/").free
        self.doc["work_dir"] = a.work
        self.doc["work_free_gb"] = round(free / 1e9, 1)
        for i, s in enumerate(shapes):
            layers = a.layers_mixtral if s == "mixtral" else a.layers_qwen3
            # the first model gets its share of what is left, the last all of it
            share = self.left() / (len(shapes) - i)
            self.one_model(s, layers, share)
            self.save()
        self.doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True)
    ap.add_argument("--work", default="/tmp/moe-gpu-bench")
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", type=float, default=0, help="epoch seconds; default now + 240")
    ap.add_argument("--backend", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", default="mixtral,qwen3")
    ap.add_argument("--layers-mixtral", type=int, default=8)
    ap.add_argument("--layers-qwen3", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--run-timeout", type=float, default=60)
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--dry", action="store_true", help="tiny shapes (the plumbing's dry run)")
    a = ap.parse_args()
    if a.deadline <= 0:
        a.deadline = time.time() + 240
    return Bench(a).main()


if __name__ == "__main__":
    sys.exit(main())

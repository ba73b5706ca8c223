#!/usr/bin/env python3
"""Issue 18's benchmark: a model at least 1.5x larger than the memory the
engines may use, moed (GGUF direct and the pack, planner defaults) against
llama.cpp (llama-cpp-python, default mmap) under the same memory cgroup
limit, the same GGUF, the same prompt, in one run.

    sudo python3 tools/bench/bigger_than_ram.py [--limit 8G] [--layers 56]
        [--work /var/tmp/moe-big] [--prompt 32] [--gen 32] [--threads 2] [--clean]

What it does (root: cgroup v1 memory controller and drop_caches):
  - generates the model once (`moe-gen --preset bench-4g --n-layer N
    --residual-gain 0.3`: Mixtral-shaped, 8 experts of 27 MiB per layer,
    top-2, Q4_0, a residual stream that changes slowly from layer to layer as
    in trained models), its pack (`moectl pack`), and two small twins of the
    same shape (2 and 8 layers) that measure compute;
  - creates the memory cgroup /sys/fs/cgroup/memory/moe-big with
    memory.limit_in_bytes = --limit; every engine runs inside it (the page
    cache of a mapped GGUF is charged to it, so llama.cpp's mmap pages are
    evicted as they would be on a machine with that much memory), under
    `nice -n -20`, after `sync; echo 3 > /proc/sys/vm/drop_caches`;
  - fio: O_DIRECT io_uring random reads on each file, of 1 MiB at depth 16
    and 64 and of 27 MiB (one expert) at depth 2 and 4; the best is the
    disk's rate of the moment;
  - llama.cpp: Llama(model, use_mmap default, use_extra_bufts off, F32 KV,
    n_ctx = prompt + gen + 8), the prompt as one batch, then --gen decode
    steps fed moed's greedy tokens (the same sequence, so the same experts;
    how often llama.cpp's own argmax agreed is recorded); bytes read from
    disk per phase from /proc/self/io;
  - moed: `moectl run --model M --memory-limit LIMIT --ctx-size (the same)
    --stats` and nothing else (the planner sizes the cache, policy and
    prefetch are the defaults); expert bytes loaded, stall and the reader's
    achieved rate during decode (the counters at the end of prefill are
    subtracted);
  - compute per token: the twins with every expert in the expert cache
    (anonymous memory; decode reads nothing, checked), decode time per
    token at 2 and 8 layers extrapolated linearly to N layers; the bound is max(compute, missed bytes per token / fio rate).
Prints a markdown table and the raw numbers (JSON) for doc/benchmarks.md.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

CG = "/sys/fs/cgroup/memory/moe-big"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def size_arg(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def log(msg):
    print("# " + msg, file=sys.stderr)
    sys.stderr.flush()


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cgroup_setup(limit):
    os.makedirs(CG, exist_ok=True)
    with open(CG + "/memory.limit_in_bytes", "w") as f:
        f.write(str(limit))


def cgroup_enter():
    """preexec_fn: the child joins the cgroup and takes the highest priority."""
    with open(CG + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    os.nice(-20)


def cg_read(name):
    try:
        with open(CG + "/" + name) as f:
            return f.read()
    except OSError:
        return ""


SAMPLE_STAT = ("cache", "rss", "mapped_file", "active_file", "inactive_file", "active_anon", "inactive_anon",
               "pgmajfault", "pgpgin", "workingset_refault_file", "workingset_activate_file")
SAMPLE_PERIOD = 0.25
SAMPLES = []   # --sample: the timeline of the last run_in_cg


def cg_sample(t0):
    """One sample of the benchmark cgroup (v1): usage, kernel memory, the
    times usage hit the limit, memory.stat's file/anon split and its fault
    and refault counters, and the machine's memory pressure (PSI)."""
    stat = {l.split()[0]: int(l.split()[1]) for l in cg_read("memory.stat").splitlines() if l.strip()}
    d = {"t": time.time() - t0, "usage": int(cg_read("memory.usage_in_bytes") or 0),
         "kmem": int(cg_read("memory.kmem.usage_in_bytes") or 0),
         "failcnt": int(cg_read("memory.failcnt") or 0)}
    d.update({k: stat.get(k, 0) for k in SAMPLE_STAT})
    try:
        with open("/proc/pressure/memory") as f:
            for line in f:
                w = line.split()
                d["psi_" + w[0]] = int(w[4].split("=")[1])   # total=us stalled
    except OSError:
        pass
    return d


def run_in_cg(cmd, timeout=3600, sample=False):
    drop_caches()
    with open(CG + "/memory.max_usage_in_bytes", "w") as f:
        f.write("0")
    t0 = time.time()
    if sample:
        # the engine's output is read by communicate() in a thread while
        # this one samples the cgroup
        import threading
        del SAMPLES[:]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=cgroup_enter)
        out = {}
        th = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate())))
        th.start()
        while th.is_alive():
            SAMPLES.append(cg_sample(t0))
            th.join(SAMPLE_PERIOD)
        SAMPLES.append(cg_sample(t0))
        p = subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""), out.get("stderr", ""))
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cgroup_enter, timeout=timeout)
    wall = time.time() - t0
    stat = {l.split()[0]: int(l.split()[1]) for l in cg_read("memory.stat").splitlines() if l.strip()}
    peak = int(cg_read("memory.max_usage_in_bytes") or 0)
    if p.returncode != 0:
        log("command failed (%d): %s\n%s" % (p.returncode, " ".join(cmd), p.stderr[-3000:]))
        raise SystemExit(1)
    oom = cg_read("memory.oom_control")
    return p, wall, peak, stat, oom


def fio_rate(path, depth, runtime=6, bs="1M"):
    cmd = ["fio", "--name=r", "--filename=" + path, "--rw=randread", "--bs=" + bs, "--iodepth=%d" % depth,
           "--ioengine=io_uring", "--direct=1", "--runtime=%d" % runtime, "--time_based", "--readonly",
           "--output-format=json"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=cgroup_enter)
    return json.loads(p.stdout)["jobs"][0]["read"]["bw_bytes"]


def moed_stats(stderr):
    d = {}
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                d.update(json.loads(line))
            except ValueError:
                pass
    return d


def moed(moectl, model, tokens, a, limit=None, extra=()):
    cmd = [moectl, "run", "--model", model, "--tokens", ",".join(map(str, tokens)), "-n", str(a.gen + 1),
           "--threads", str(a.threads), "--ctx-size", str(len(tokens) + a.gen + 8), "--stats"] + list(extra)
    if limit:
        cmd += ["--memory-limit", str(limit)]
    p, wall, peak, stat, oom = run_in_cg(cmd, sample=a.sample)
    d = moed_stats(p.stderr)
    d["wall_s"], d["cg_peak"], d["oom_control"] = wall, peak, oom.replace("\n", " ")
    if a.sample:
        d["phases"] = phases(SAMPLES, wall, d)
        log("cgroup during %s: %s" % (os.path.basename(model), json.dumps(d["phases"])))
        with open(os.path.join(a.work, "timeline-%d.json" % int(time.time())), "w") as f:
            json.dump({"cmd": cmd, "samples": SAMPLES}, f)
    d["plan"] = "\n".join(l for l in p.stderr.splitlines() if not l.startswith("{"))
    d["tokens"] = [int(t) for t in p.stdout.split()]
    return d


def phases(samples, wall, d):
    """The samples summed up per phase: load (up to prefill), prefill,
    decode. The phases are placed from the end of the run with the engine's
    own prefill_s and decode_s (the exit, freeing the memory, is counted in
    decode's window). Counters as deltas over the phase, sizes in MiB at the
    phase's end and their most within it."""
    if not samples or "prefill_s" not in d:
        return {}
    dec0 = wall - d["decode_s"] - 0.3
    pre0 = dec0 - d["prefill_s"]
    out = {}
    for name, lo, hi in (("load", 0, pre0), ("prefill", pre0, dec0), ("decode", dec0, wall + 1)):
        w = [x for x in samples if lo <= x["t"] <= hi]
        before = [x for x in samples if x["t"] < lo]
        if not w:
            continue
        a0 = before[-1] if before else samples[0]   # the first sample: before the engine started
        a1 = w[-1]
        r = {"s": round(a1["t"] - (a0["t"] if before else 0), 2)}
        for k in ("pgmajfault", "pgpgin", "workingset_refault_file", "workingset_activate_file", "failcnt"):
            r[k] = a1[k] - a0[k]
        for k in ("psi_some", "psi_full"):
            if k in a1:
                r[k + "_s"] = round((a1[k] - a0.get(k, 0)) / 1e6, 2)
        for k in ("usage", "rss", "cache", "mapped_file", "active_file", "inactive_file", "kmem"):
            r[k + "_mib"] = round(a1[k] / 2 ** 20)
            r[k + "_max_mib"] = round(max(x[k] for x in w) / 2 ** 20)
        out[name] = r
    return out


def llama_child(model, prompt, gen, threads, forced):
    """Runs inside the cgroup: load, prefill, decode; prints one JSON line.
    With `forced` (moed's greedy tokens), each decode step feeds moed's
    token instead of llama.cpp's own argmax, so that both engines route the
    same sequence (greedy decoding of a random-weight model diverges between
    engines after a few tokens, and with it the experts each one reads)."""
    sys.path.insert(0, HERE)
    from cpu_engine import llama_open
    import numpy as np

    def io_read():
        with open("/proc/self/io") as f:
            return {l.split(":")[0]: int(l.split(":")[1]) for l in f}["read_bytes"]

    tokens = [int(t) for t in prompt.split(",")]
    r0 = io_read()
    t0 = time.perf_counter()
    m = llama_open(model, len(tokens) + gen + 8, threads, False)
    t1 = time.perf_counter()
    r1 = io_read()
    m.eval(tokens)
    t2 = time.perf_counter()
    r2 = io_read()
    import llama_cpp
    own, agree = [], 0
    for i in range(gen):
        # the last row's logits from the context (Llama.scores stays zero
        # with logits_all off in 0.3.36)
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(m._ctx.ctx, -1), shape=(m.n_vocab(),))
        nxt = int(np.argmax(row))
        own.append(nxt)
        if forced:
            agree += forced[i] == nxt
            nxt = forced[i]
        m.eval([nxt])
    t3 = time.perf_counter()
    r3 = io_read()
    print(json.dumps({"load_s": t1 - t0, "prefill_s": t2 - t1, "decode_s": t3 - t2, "load_read": r1 - r0,
                      "prefill_read": r2 - r1, "decode_read": r3 - r2, "prefill_tokens": len(tokens),
                      "decode_tokens": gen, "forced": bool(forced), "argmax_agrees": agree,
                      "own_tokens": own}))


def llama(model, tokens, a, forced=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--llama-child", model, ",".join(map(str, tokens)),
           str(a.gen), str(a.threads), ",".join(map(str, forced or []))]
    p, wall, peak, stat, oom = run_in_cg(cmd)
    d = json.loads(p.stdout.strip().splitlines()[-1])
    d["wall_s"], d["cg_peak"], d["oom_control"] = wall, peak, oom.replace("\n", " ")
    return d


def ensure(path, cmd):
    if os.path.exists(path):
        return
    log("making " + path)
    subprocess.run(cmd, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--work", default="/var/tmp/moe-big")
    ap.add_argument("--limit", default="8G", help="the cgroup's memory limit (and moed's --memory-limit)")
    ap.add_argument("--layers", type=int, default=56)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated: llama,gguf,pack,compute")
    ap.add_argument("--clean", action="store_true", help="delete the generated files at the end")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:FLAGS",
                    help="also run moed with these extra flags (space-separated), on both files;"
                         " e.g. 'no prefetch:--prefetch none'")
    ap.add_argument("--sample", action="store_true",
                    help="sample the cgroup (memory.stat, failcnt, PSI) every 0.25 s during moed's runs and"
                         " report it per phase; the timelines go to WORK/timeline-*.json")
    ap.add_argument("--llama-child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llama_child:
        forced = [int(t) for t in a.llama_child[4].split(",") if t]
        llama_child(a.llama_child[0], a.llama_child[1], int(a.llama_child[2]), int(a.llama_child[3]), forced)
        return
    if os.geteuid() != 0:
        raise SystemExit("bigger_than_ram.py: needs root (a memory cgroup and drop_caches)")
    skip = set(a.skip.split(",")) if a.skip else set()
    limit = size_arg(a.limit)
    gen_bin = os.path.join(a.build, "tools", "moe-gen")
    moectl = os.path.join(a.build, "client", "moectl")
    os.makedirs(a.work, exist_ok=True)
    big = os.path.join(a.work, "big-%d.gguf" % a.layers)
    pack = os.path.join(a.work, "big-%d.moe" % a.layers)
    twins = {n: os.path.join(a.work, "twin-%d.gguf" % n) for n in (2, 8)}
    gen_args = ["--preset", "bench-4g", "--residual-gain", "0.3", "--threads", "2", "--quiet"]
    ensure(big, [gen_bin] + gen_args + ["--n-layer", str(a.layers), "-o", big])
    if "pack" not in skip:
        ensure(pack, [moectl, "pack", big, "-o", pack])
    if "compute" not in skip:
        for n, path in twins.items():
            ensure(path, [gen_bin] + gen_args + ["--n-layer", str(n), "-o", path])
    size = os.path.getsize(big)
    mem_total = int(open("/proc/meminfo").read().split()[1]) * 1024
    cgroup_setup(limit)
    disk = subprocess.run(["df", "-T", a.work], capture_output=True, text=True).stdout.splitlines()[1].split()
    load0 = os.getloadavg()
    log("model %.2f GB (%.2fx the %.2f GiB limit), machine %s, %d CPUs, %.1f GB RAM, disk %s (%s), load %s"
        % (size / 1e9, size / limit, limit / 2 ** 30, platform.node(), os.cpu_count(), mem_total / 1e9,
           disk[0], disk[1], "%.2f %.2f %.2f" % load0))
    import random
    rng = random.Random(0)
    tokens = [rng.randrange(10, 31990) for _ in range(a.prompt)]
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model_bytes": size, "limit": limit,
           "layers": a.layers, "prompt": a.prompt, "gen": a.gen, "threads": a.threads,
           "load_before": load0, "disk": disk[:2], "command": " ".join(sys.argv)}
    files = {"gguf": big, "pack": pack}
    fio = {}
    for k, path in files.items():
        if k in skip or not os.path.exists(path):
            continue
        # 1 MiB requests (the reader's), and whole experts (27 MiB: an
        # expert's bytes are contiguous, the reader's 1 MiB requests of one
        # expert are consecutive) at a few in flight
        fio[k] = {"1M@%d" % d: fio_rate(path, d) for d in (16, 64)}
        fio[k].update({"27M@%d" % d: fio_rate(path, d, bs="27M") for d in (2, 4)})
        log("fio randread O_DIRECT io_uring on the %s: %s" % (
            k, ", ".join("%s %.2f GB/s" % (x, y / 1e9) for x, y in fio[k].items())))
    res["fio"] = fio
    if "compute" not in skip:
        # every expert in the expert cache (anonymous memory): the prompt
        # touches them all, so decode reads nothing (checked) whatever
        # other users of the machine do to the page cache
        per = {}
        for n, path in twins.items():
            best = 1e9
            for _ in range(3):
                d = moed(moectl, path, tokens, a, None, ["--cache-experts", str(8 * n)])
                dec_read = d["read_bytes"] - d["prefill_read_bytes"]
                if dec_read > 16 << 20:
                    log("warning: the %d-layer twin read %.0f MB while decoding" % (n, dec_read / 1e6))
                best = min(best, d["decode_s"] / d["decode_tokens"])
            per[n] = best
        slope = (per[8] - per[2]) / 6
        res["compute_s"] = per[8] + slope * (a.layers - 8)
        res["compute_twins"] = per
        log("compute: %.4f s/token at 2 layers, %.4f at 8: %.3f s/token at %d layers"
            % (per[2], per[8], res["compute_s"], a.layers))
    for k in ("gguf", "pack"):
        if k in skip or not os.path.exists(files[k]):
            continue
        d = moed(moectl, files[k], tokens, a, limit)
        res["moed_" + k] = d
        log("moed %s: plan\n%s\ntokens %s" % (k, d["plan"], d["tokens"]))
        if "llama" not in skip and "llama" not in res:
            # llama.cpp decodes moed's greedy tokens (see llama_child)
            res["llama"] = llama(big, tokens, a, d["tokens"][:a.gen])
            log("llama.cpp: %s" % json.dumps(res["llama"]))
        for v in a.variant:
            label, _, flags = v.partition(":")
            d = moed(moectl, files[k], tokens, a, limit, flags.split())
            d["label"] = label
            res["moed_%s_%s" % (k, label)] = d
    res["load_after"] = os.getloadavg()
    report(res)
    if a.clean:
        for path in [big, pack] + list(twins.values()):
            if os.path.exists(path):
                os.unlink(path)


def report(res):
    ll = res.get("llama")
    comp = res.get("compute_s")
    print("date %s; model %.2f GB (%d layers), cgroup limit %.2f GiB (%.2fx); prompt %d, decode %d, %d threads;"
          " load %s before, %s after" % (res["date"], res["model_bytes"] / 1e9, res["layers"], res["limit"] / 2 ** 30,
                                         res["model_bytes"] / res["limit"], res["prompt"], res["gen"], res["threads"],
                                         "%.1f %.1f %.1f" % tuple(res["load_before"]),
                                         "%.1f %.1f %.1f" % tuple(res["load_after"])))
    if comp:
        print("compute (every expert resident): %.3f s/token" % comp)
    print()
    print("| engine | load s | prefill tok/s | decode tok/s | decode vs llama.cpp | disk reads / decode token |"
          " expert bytes missed / token | hit rate | stall | reader GB/s in decode (wall, busy) |"
          " depth achieved | fio GB/s | s/token | bound s/token | ratio | peak cgroup GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    lld = None
    if ll:
        lld = ll["decode_tokens"] / ll["decode_s"]
        print("| llama.cpp mmap | %.1f | %.2f | %.3f | 1.00 | %.0f MB | - | - | - | %.2f | - | - | %.3f | - | - | %.2f |" % (
            ll["load_s"], ll["prefill_tokens"] / ll["prefill_s"], lld, ll["decode_read"] / ll["decode_tokens"] / 1e6,
            ll["decode_read"] / ll["decode_s"] / 1e9, ll["decode_s"] / ll["decode_tokens"], ll["cg_peak"] / 2 ** 30))
    for key in [x for x in res if x.startswith("moed_")]:
        d = res[key]
        k = key.split("_")[1]
        nt = d["decode_tokens"]
        dec_s = d["decode_s"]
        missed = (d["bytes_loaded"] - d.get("prefill_bytes_loaded", 0)) / nt
        iob = d["io_bytes"] - d.get("prefill_io_bytes", 0)
        busy = d["io_busy_s"] - d.get("prefill_io_busy_s", 0)
        depth = (d["io_depth_s"] - d.get("prefill_io_depth_s", 0)) / busy if busy > 0 else 0
        stall = (d["stall_s"] - d.get("prefill_stall_s", 0)) / dec_s
        hits = d["hits"] - d.get("prefill_hits", 0)
        misses = d["misses"] - d.get("prefill_misses", 0)
        fio = max(res["fio"].get(k, {0: 0}).values())
        spt = dec_s / nt
        bound = max(comp or 0, missed / fio if fio else 0)
        disk = (d["read_bytes"] - d["prefill_read_bytes"]) / nt
        print("| moed %s | %.1f | %.2f | %.3f | %s | %.0f MB | %.0f MB | %.3f | %.2f | %.2f, %.2f | %.1f | %.2f | %.3f | %.3f | %.2f | %.2f |" % (
            ("GGUF direct" if k == "gguf" else "pack") + (", " + d["label"] if "label" in d else ""),
            d["wall_s"] - d["prefill_s"] - d["decode_s"], d["prefill_tok_s"], d["decode_tok_s"],
            "%.2f" % (d["decode_tok_s"] / lld) if lld else "-", disk / 1e6, missed / 1e6,
            hits / (hits + misses) if hits + misses else 0, stall, iob / dec_s / 1e9, iob / busy / 1e9 if busy else 0,
            depth, fio / 1e9, spt, bound, spt / bound if bound else 0, d["cg_peak"] / 2 ** 30))
    print()
    print("raw: " + json.dumps({k: v for k, v in res.items()
                                if not (isinstance(v, dict) and "plan" in v)}, default=str))
    for key in [x for x in res if x.startswith("moed_")]:
        d = res[key]
        print("%s: %s" % (key, json.dumps({x: y for x, y in d.items() if x != "plan"})))
        print("%s plan:\n%s" % (key, d["plan"]))


if __name__ == "__main__":
    main()

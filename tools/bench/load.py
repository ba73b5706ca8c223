#!/usr/bin/env python3
"""Load benchmark of moed: C concurrent streaming clients, for C in a list.

For each concurrency level it starts a fresh moed (so the expert cache
statistics belong to that level), runs C streaming /v1/completions requests at
once (each client sends --rounds requests back to back), and reports aggregate
generated tokens/s, time to first token p50/p99, and expert bytes loaded per
generated token (from /v1/moed/stats), which falls as batching lets one expert
load serve several sequences. Baseline in the same run: the same work with
C = 1 (the sequential rate), as a ratio.

  python3 tools/bench/load.py --moed build/daemon/moed --model demo/demo-moe.moe \
      --cache-experts 8 --levels 1,4,16,64 --tokens 32
Standard library only.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def http(sock_path, method, path, body=None, stream_cb=None, timeout=600):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    data = json.dumps(body).encode() if body is not None else b""
    s.sendall(("%s %s HTTP/1.1\r\nHost: moed\r\nConnection: close\r\nContent-Type: application/json\r\n"
               "Content-Length: %d\r\n\r\n" % (method, path, len(data))).encode() + data)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before headers")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ")[1])
    if stream_cb is None:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        s.close()
        return status, rest
    # chunked SSE: hand each event to the callback as it arrives
    pending = rest
    events = b""
    while True:
        while b"\n\n" in events:
            ev, events = events.split(b"\n\n", 1)
            stream_cb(ev.decode("utf-8", "replace"))
        # decode as many complete chunks as are buffered
        progressed = True
        while progressed:
            progressed = False
            if b"\r\n" in pending:
                size_line, after = pending.split(b"\r\n", 1)
                n = int(size_line, 16)
                if n == 0:
                    s.close()
                    while b"\n\n" in events:
                        ev, events = events.split(b"\n\n", 1)
                        stream_cb(ev.decode("utf-8", "replace"))
                    return status, b""
                if len(after) >= n + 2:
                    events += after[:n]
                    pending = after[n + 2:]
                    progressed = True
        chunk = s.recv(65536)
        if not chunk:
            s.close()
            return status, b""
        pending += chunk


def stats(sock_path):
    st, body = http(sock_path, "GET", "/v1/moed/stats")
    return json.loads(body)


def run_level(args, c, prompts):
    with tempfile.TemporaryDirectory() as td:
        sock = os.path.join(td, "moed.sock")
        cmd = [args.moed, "--model", args.model, "--socket", sock, "--max-seqs", str(max(c, 1)),
               "--ctx-size", str(args.ctx), "--batch-size", str(args.batch), "--threads", str(args.threads),
               "--queue-size", "1024", "--prefill-chunk", "64", "--log-level", "warn"]
        if args.cache_experts:
            cmd += ["--cache-experts", str(args.cache_experts)]
        if args.prefetch:
            cmd += ["--prefetch", args.prefetch]
        log = open(os.path.join(td, "moed.log"), "w")
        p = subprocess.Popen(cmd, stderr=log, stdout=log)
        try:
            for _ in range(600):
                try:
                    if http(sock, "GET", "/health")[0] == 200:
                        break
                except OSError:
                    pass
                if p.poll() is not None:
                    raise RuntimeError("moed exited: " + open(os.path.join(td, "moed.log")).read())
                time.sleep(0.05)
            s0 = stats(sock)
            ttft = []
            ntok = [0]
            lock = threading.Lock()
            errors = []

            def client(i):
                for r in range(args.rounds):
                    prompt = prompts[(i + r) % len(prompts)]
                    t0 = time.monotonic()
                    first = [None]
                    count = [0]

                    def on_event(ev):
                        if not ev.startswith("data: {"):
                            return
                        j = json.loads(ev[6:])
                        if "error" in j:
                            errors.append(j["error"]["message"])
                            return
                        if j["choices"] and j["choices"][0].get("text"):
                            if first[0] is None:
                                first[0] = time.monotonic() - t0
                        if "usage" in j:
                            count[0] = j["usage"]["completion_tokens"]

                    st, _ = http(sock, "POST", "/v1/completions",
                                 {"prompt": prompt, "max_tokens": args.tokens, "temperature": 0,
                                  "stream": True, "stream_options": {"include_usage": True}},
                                 stream_cb=on_event)
                    if st != 200:
                        errors.append("status %d" % st)
                    with lock:
                        if first[0] is not None:
                            ttft.append(first[0])
                        ntok[0] += count[0]

            threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            s1 = stats(sock)
        finally:
            p.terminate()
            p.wait(timeout=60)
    if errors:
        raise RuntimeError("level %d: %d errors, first: %s" % (c, len(errors), errors[0]))
    ec0, ec1 = s0.get("expert_cache"), s1.get("expert_cache")
    loaded = (ec1["bytes_loaded"] - ec0["bytes_loaded"]) if ec1 else 0
    hits = (ec1["device"]["hits"] - ec0["device"]["hits"]) if ec1 else 0
    miss = (ec1["device"]["misses"] - ec0["device"]["misses"]) if ec1 else 0
    ttft.sort()
    q = lambda f: ttft[min(len(ttft) - 1, int(f * len(ttft)))] if ttft else float("nan")
    return {
        "streams": c, "requests": c * args.rounds, "tokens": ntok[0], "wall_s": wall,
        "tok_s": ntok[0] / wall, "ttft_p50_ms": 1e3 * statistics.median(ttft) if ttft else float("nan"),
        "ttft_p99_ms": 1e3 * q(0.99), "expert_bytes_per_token": loaded / max(1, ntok[0]),
        "hit_rate": hits / max(1, hits + miss),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moed", default="build/daemon/moed")
    ap.add_argument("--model", required=True)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="requests per client, back to back")
    ap.add_argument("--cache-experts", type=int, default=0)
    ap.add_argument("--prefetch", default="")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    words = "the router picks two experts for every token and the cache keeps the busy ones".split()
    prompts = [" ".join(words[i % len(words):] + words[:i % len(words)]) for i in range(97)]
    rows = []
    for c in [int(x) for x in args.levels.split(",")]:
        r = run_level(args, c, prompts)
        rows.append(r)
        print("streams=%d requests=%d tokens=%d wall=%.2fs tok/s=%.1f ttft_p50=%.0fms ttft_p99=%.0fms"
              " expert_bytes/token=%.0f hit_rate=%.3f" % (r["streams"], r["requests"], r["tokens"],
                                                           r["wall_s"], r["tok_s"], r["ttft_p50_ms"],
                                                           r["ttft_p99_ms"], r["expert_bytes_per_token"],
                                                           r["hit_rate"]), file=sys.stderr)
    base = rows[0]["tok_s"]
    print("| streams | tokens | tok/s | vs 1 stream | TTFT p50 ms | TTFT p99 ms | expert KiB loaded / token | hit rate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| %d | %d | %.1f | %.2fx | %.0f | %.0f | %.1f | %.3f |" % (
            r["streams"], r["tokens"], r["tok_s"], r["tok_s"] / base, r["ttft_p50_ms"], r["ttft_p99_ms"],
            r["expert_bytes_per_token"] / 1024, r["hit_rate"]))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()

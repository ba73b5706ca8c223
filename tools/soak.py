#!/usr/bin/env python3
"""Soak test of moed (issue 24 part 2; shared/RELIABILITY.md rows 13, 20, 21).

Runs moed on a packed model with a small expert cache and drives --clients
concurrent clients for --duration seconds with a mix of streamed and whole
greedy completions of several prompts and lengths, cancellations (a stream
dropped after a few events), disconnects right after sending, malformed
requests, and a SIGHUP every --sighup-every seconds (alternating a
reloadable key). Every greedy answer is compared byte for byte with a
reference run of the same request on a fresh daemon serving one request at
a time. Every --sample-every seconds it samples the daemon's RSS, open fds,
threads and the expert cache's pinned count.

Pass: no request lost (every answer expected to complete did, with [DONE]
for streams) or corrupted (differs from the reference), RSS growth after
warm-up under 5%, fds and threads flat (idle fds after the run equal idle
fds before it; the thread count never changes), pinned back to 0 once idle,
and moed exits 0 on SIGTERM (it checks its own fds and event-loop handles).
Prints one JSON report (also to --report) and exits 0 on pass, 1 on fail.

Standard library only. tools/soak.sh is the one-command entry point.
"""
import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PROMPTS = [
    "Once upon a time",
    "The cat",
    "In a galaxy far far away there was a small planet where",
    "Hello",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26",
    "The quick brown fox jumps over the lazy dog and then",
    "Write a poem about the sea",
    "def fibonacci(n):",
    "Q: What is the capital of France?\nA:",
    "It was the best of times, it was the worst of times,",
    "a",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor",
]
LENGTHS = [1, 4, 16, 48]

def _post(path, body):
    return (b"POST %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body))) + body


MALFORMED = [
    _post("/v1/completions", b'{"prompt": '),
    _post("/v1/completions", b"[1, 2]"),
    _post("/v1/completions", b'{"prompt": "x", "max_tokens": -3}'),
    _post("/v1/completions", b'{"prompt": "x", "temperature": "hot"}'),
    _post("/v1/chat/completions", b'{"messages": [{"role": 1}]}'),
    _post("/v1/completions", b'{"prompt": "\xff\xfe\xfd"}'),
    b"GET /nope HTTP/1.1\r\n\r\n",
    b"DELETE /v1/completions HTTP/1.1\r\n\r\n",
    b"HELLO THERE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n{",
]


class Conn:
    """One HTTP/1.1 request on the Unix socket (Connection: close)."""

    def __init__(self, path, timeout):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""

    def send_json(self, path, body):
        data = json.dumps(body).encode()
        self.s.sendall(("POST %s HTTP/1.1\r\nHost: moed\r\nConnection: close\r\nContent-Type: "
                        "application/json\r\nContent-Length: %d\r\n\r\n" % (path, len(data))).encode()
                       + data)

    def head(self):
        while b"\r\n\r\n" not in self.buf:
            c = self.s.recv(65536)
            if not c:
                raise EOFError("closed before the headers")
            self.buf += c
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return int(head.split(b" ")[1]), head

    def rest(self):
        while True:
            c = self.s.recv(65536)
            if not c:
                break
            self.buf += c
        out, self.buf = self.buf, b""
        return out

    def events(self):
        """Yields the SSE events of a chunked body as they arrive."""
        raw = b""     # dechunked bytes
        while True:
            # one chunk: size line, data, CRLF
            while b"\r\n" not in self.buf:
                c = self.s.recv(65536)
                if not c:
                    return
                self.buf += c
            line, rest = self.buf.split(b"\r\n", 1)
            n = int(line, 16)
            while len(rest) < n + 2:
                c = self.s.recv(65536)
                if not c:
                    return
                rest += c
            raw += rest[:n]
            self.buf = rest[n + 2:]
            while b"\n\n" in raw:
                ev, raw = raw.split(b"\n\n", 1)
                yield ev.decode("utf-8")
            if n == 0:
                return

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def dechunk(body):
    out = b""
    while True:
        if b"\r\n" not in body:
            return out
        line, body = body.split(b"\r\n", 1)
        n = int(line, 16)
        if n == 0:
            return out
        out += body[:n]
        body = body[n + 2:]


def completion(sock, prompt, n, stream, timeout):
    """(status, text, finish, done, error): the whole answer."""
    c = Conn(sock, timeout)
    try:
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
        if stream:
            body["stream"] = True
        c.send_json("/v1/completions", body)
        status, _ = c.head()
        if status != 200:
            return status, None, None, False, c.rest().decode("utf-8", "replace")
        if not stream:
            j = json.loads(c.rest())
            ch = j["choices"][0]
            return status, ch["text"], ch["finish_reason"], True, None
        text, finish, done, err = "", None, False, None
        for ev in c.events():
            if ev == "data: [DONE]":
                done = True
                continue
            if not ev.startswith("data: "):
                continue
            j = json.loads(ev[6:])
            if "error" in j:
                err = j["error"]["message"]
                continue
            ch = j["choices"][0]
            text += ch.get("text") or ""
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
        return status, text, finish, done, err
    finally:
        c.close()


def get_json(sock, path, timeout=30):
    c = Conn(sock, timeout)
    try:
        c.s.sendall(("GET %s HTTP/1.1\r\nHost: moed\r\nConnection: close\r\n\r\n" % path).encode())
        status, _ = c.head()
        return json.loads(c.rest())
    finally:
        c.close()


def proc_status(pid):
    rss = threads = None
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads, len(os.listdir("/proc/%d/fd" % pid))


class Moed:
    def __init__(self, args, work, name, extra):
        self.sock = os.path.join(work, name + ".sock")
        self.log = os.path.join(work, name + ".log")
        self.cfg = os.path.join(work, name + ".ini")
        with open(self.cfg, "w") as f:
            f.write("[moed]\nlog_level = info\nqueue_size = 256\n")
        cmd = [args.moed, "--model", args.pack, "--socket", self.sock, "--config", self.cfg,
               "--threads", str(args.threads), "--cache-experts", str(args.cache_experts),
               "--warm-start=false", "--ctx-size", "512"] + extra
        self.p = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < 120:
            if self.p.poll() is not None:
                raise RuntimeError("moed exited %d: see %s" % (self.p.returncode, self.log))
            try:
                get_json(self.sock, "/health", 5)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moed did not start: see %s" % self.log)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(120)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return -1


class Stats:
    def __init__(self):
        self.mu = threading.Lock()
        self.c = {}
        self.failures = []

    def add(self, key, n=1):
        with self.mu:
            self.c[key] = self.c.get(key, 0) + n

    def fail(self, key, what):
        with self.mu:
            self.c[key] = self.c.get(key, 0) + 1
            if len(self.failures) < 20:
                self.failures.append(what)


def client(i, args, sock, ref, stop_at, st):
    rnd = random.Random(args.seed * 1000 + i)
    while time.time() < stop_at:
        r = rnd.random()
        prompt = rnd.choice(PROMPTS)
        n = rnd.choice(LENGTHS)
        try:
            if r < 0.80:
                stream = r < 0.70   # 70% streamed, 10% whole
                status, text, finish, done, err = completion(sock, prompt, n, stream, args.timeout)
                if status == 503:
                    st.add("rejected_503")
                    time.sleep(0.2)
                    continue
                want = ref[(prompt, n)]
                if status != 200 or err is not None or not done or finish is None:
                    st.fail("lost", "%r n=%d stream=%s: status %d finish %r done %s error %r" %
                            (prompt, n, stream, status, finish, done, err))
                elif text != want:
                    st.fail("corrupt", "%r n=%d stream=%s: %r != reference %r" %
                            (prompt, n, stream, text, want))
                else:
                    st.add("ok_stream" if stream else "ok_whole")
            elif r < 0.88:
                # cancellation: a stream dropped after a few events
                c = Conn(sock, args.timeout)
                c.send_json("/v1/completions", {"prompt": prompt, "max_tokens": 48, "temperature": 0,
                                                "stream": True})
                status, _ = c.head()
                k = rnd.randint(0, 3)
                if status == 200:
                    for j, _ in enumerate(c.events()):
                        if j >= k:
                            break
                c.close()
                st.add("cancelled_midstream")
            elif r < 0.92:
                # disconnect right after sending (queued or mid-prefill)
                c = Conn(sock, args.timeout)
                c.send_json("/v1/completions", {"prompt": prompt * 4, "max_tokens": 32})
                c.close()
                st.add("disconnected")
            else:
                c = Conn(sock, args.timeout)
                c.s.sendall(rnd.choice(MALFORMED))
                try:
                    c.s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                try:
                    status, _ = c.head()
                except (EOFError, OSError):
                    status = 0
                c.close()
                if status in (0, 400, 404, 405, 413, 431):
                    st.add("malformed_refused")
                else:
                    st.fail("malformed_wrong", "malformed request answered %d" % status)
        except Exception as e:   # noqa: BLE001 - any client-side failure is a lost request
            st.fail("lost", "client %d: %s: %s" % (i, type(e).__name__, e))


def wait_idle(sock, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        e = get_json(sock, "/v1/moed/stats")["engine"]
        if e["running"] == 0 and e["queue_depth"] == 0:
            return True
        time.sleep(0.2)
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moed", required=True)
    ap.add_argument("--moectl", required=True)
    ap.add_argument("--model", required=True, help="a GGUF (packed here) or a .moe pack")
    ap.add_argument("--duration", type=float, default=3600)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--cache-experts", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sighup-every", type=float, default=180)
    ap.add_argument("--sample-every", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=None, help="seconds (default: 10%% of the run, at"
                    " least one sample)")
    ap.add_argument("--timeout", type=float, default=300, help="per-request socket timeout")
    ap.add_argument("--rss-tolerance", type=float, default=5.0,
                    help="allowed RSS growth after warm-up, %%; 0: not checked (sanitizer builds:"
                    " ASan's quarantine and TSan's shadow grow RSS; LeakSanitizer checks memory)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--report", default=None)
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="moed-soak-")
    os.makedirs(work, exist_ok=True)
    if args.model.endswith(".moe"):
        args.pack = args.model
    else:
        args.pack = os.path.join(work, "model.moe")
        subprocess.run([args.moectl, "pack", args.model, "-o", args.pack, "--quiet"], check=True)

    # the reference: one request at a time on a fresh daemon
    refd = Moed(args, work, "ref", ["--max-seqs", "1"])
    ref = {}
    try:
        for p in PROMPTS:
            for n in LENGTHS:
                status, text, finish, done, err = completion(refd.sock, p, n, False, args.timeout)
                if status != 200:
                    raise RuntimeError("reference %r n=%d: status %d %s" % (p, n, status, err))
                ref[(p, n)] = text
    finally:
        refd.stop()

    d = Moed(args, work, "soak", ["--max-seqs", str(args.max_seqs)])
    pid = d.p.pid
    st = Stats()
    samples = []
    _, _, fds_idle0 = proc_status(pid)
    t0 = time.time()
    stop_at = t0 + args.duration
    threads = [threading.Thread(target=client, args=(i, args, d.sock, ref, stop_at, st), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    next_sample, next_hup, hups = t0, t0 + args.sighup_every, 0
    while time.time() < stop_at:
        now = time.time()
        if now >= next_sample:
            rss, nthreads, fds = proc_status(pid)
            try:
                pinned = get_json(d.sock, "/v1/moed/stats")["expert_cache"]["pinned"]
            except (OSError, ValueError, KeyError):
                pinned = None
            samples.append({"t": round(now - t0, 1), "rss": rss, "fds": fds, "threads": nthreads,
                            "pinned": pinned})
            next_sample += args.sample_every
        if now >= next_hup:
            hups += 1
            with open(d.cfg, "w") as f:
                f.write("[moed]\nlog_level = %s\nqueue_size = %d\n" %
                        ("info" if hups % 2 == 0 else "warn", 256 if hups % 2 == 0 else 200))
            d.p.send_signal(signal.SIGHUP)
            next_hup += args.sighup_every
        if d.p.poll() is not None:
            break
        time.sleep(0.2)
    for t in threads:
        t.join(args.timeout + 30)
    alive = d.p.poll() is None
    idle = alive and wait_idle(d.sock)
    end = {}
    if alive:
        rss, nthreads, fds = proc_status(pid)
        stats = get_json(d.sock, "/v1/moed/stats")
        end = {"rss": rss, "threads": nthreads, "fds_idle": fds, "pinned": stats["expert_cache"]["pinned"],
               "requests": stats["http"], "engine": stats["engine"],
               "loads": stats["expert_cache"].get("loads")}
    rc = d.stop() if alive else d.p.returncode
    elapsed = time.time() - t0

    warm = args.warmup if args.warmup is not None else max(args.sample_every, 0.1 * args.duration)
    after = [s for s in samples if s["t"] >= warm and s["rss"]]
    rss_warm = after[0]["rss"] if after else None
    rss_last = max(s["rss"] for s in after[-max(1, len(after) // 10):]) if after else None
    growth = (rss_last - rss_warm) / rss_warm if after else None
    thread_counts = sorted({s["threads"] for s in samples})
    checks = {
        "daemon alive to the end": alive,
        "idle after the run": idle,
        "nothing lost": st.c.get("lost", 0) == 0,
        "nothing corrupted": st.c.get("corrupt", 0) == 0,
        "malformed requests refused": st.c.get("malformed_wrong", 0) == 0,
        "RSS growth after warm-up < %g%% (0: not checked)" % args.rss_tolerance:
            args.rss_tolerance <= 0 or (growth is not None and growth < args.rss_tolerance / 100),
        "threads flat": len(thread_counts) == 1 and end.get("threads") == thread_counts[0],
        "fds flat (idle before == idle after)": end.get("fds_idle") == fds_idle0,
        "pinned back to 0": end.get("pinned") == 0,
        "exit 0 on SIGTERM": rc == 0,
        "requests completed": st.c.get("ok_stream", 0) + st.c.get("ok_whole", 0) > 0,
    }
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "duration_s": round(elapsed, 1), "clients": args.clients, "max_seqs": args.max_seqs,
        "cache_experts": args.cache_experts, "sighups": hups, "counts": st.c,
        "rss_mib": {"warm": rss_warm and round(rss_warm / 2**20, 2),
                    "last": rss_last and round(rss_last / 2**20, 2),
                    "growth_pct": growth is not None and round(100 * growth, 2)},
        "threads": thread_counts, "fds_idle": {"before": fds_idle0, "after": end.get("fds_idle")},
        "fds_max": max((s["fds"] for s in samples), default=None),
        "pinned_end": end.get("pinned"), "samples": len(samples), "exit": rc,
        "engine": end.get("engine"), "http": end.get("requests"), "loads": end.get("loads"),
        "checks": checks, "pass": all(checks.values()), "failures": st.failures,
        "log": d.log, "series": samples,
    }
    text = json.dumps(report, indent=1)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    short = dict(report)
    short.pop("series")
    print(json.dumps(short, indent=1))
    print("soak: %s (%d ok, %d lost, %d corrupt, %d cancelled, %d disconnected, %d malformed refused;"
          " RSS %+.2f%%, threads %s, fds %s -> %s, pinned %s, exit %s)" %
          ("PASS" if report["pass"] else "FAIL", st.c.get("ok_stream", 0) + st.c.get("ok_whole", 0),
           st.c.get("lost", 0), st.c.get("corrupt", 0), st.c.get("cancelled_midstream", 0),
           st.c.get("disconnected", 0), st.c.get("malformed_refused", 0),
           100 * growth if growth is not None else float("nan"), thread_counts, fds_idle0,
           end.get("fds_idle"), end.get("pinned"), rc))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

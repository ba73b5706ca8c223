"""What the Python daemon tests share: skipping (77, or a failure in CI),
collecting failed checks, and a moed on a free loopback TCP port that is
known to be this test's own (it answers /v1/models with a name made from
this process's id, since another test's daemon can take a port between the
free-port probe and moed's listen)."""
import http.client
import json
import os
import socket
import subprocess
import sys
import time


def skip(why):
    """Skip (exit 77); in CI (CI=true) a missing prerequisite is a failure."""
    if os.environ.get("CI") == "true":
        print("FAIL: " + why + " (required in CI)")
        sys.exit(1)
    print("skip: " + why)
    sys.exit(77)


failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL: " + what)


def finish(ok_line):
    """Ends the test: exit 1 with the count when a check failed."""
    if failures:
        print("%d check(s) failed" % len(failures))
        sys.exit(1)
    print(ok_line)
    sys.exit(0)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


MODEL_NAME = "moed-test-%d" % os.getpid()


class Daemon:
    """moed on model with the given extra flags and environment, serving
    the Unix socket and loopback TCP; .url, .port, .call(), .stop()."""

    def __init__(self, tmp, model, *extra, env=None, ctx=1024, seqs=2, key=None):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.key = key
        self.log_path = os.path.join(tmp, "moed-%d.log" % self.port)
        self.log = open(self.log_path, "w")
        args = [os.environ["MOED"], "--model", model, "--socket", os.path.join(tmp, "m-%d.sock" % self.port),
                "--tcp-port", str(self.port), "--threads", "1", "--ctx-size", str(ctx),
                "--max-seqs", str(seqs), "--warm-start=false", "--model-name", MODEL_NAME]
        if key:
            args += ["--api-key", key]
        self.p = subprocess.Popen(args + list(extra), stderr=self.log, env=dict(os.environ, **(env or {})))
        for _ in range(300):
            try:
                if self.call("GET", "/health")[0] == 200:
                    ids = [m["id"] for m in self.call("GET", "/v1/models")[1]["data"]]
                    if ids != [MODEL_NAME]:
                        raise SystemExit("FAIL: port %d answers as %s, not this test's moed" % (self.port, ids))
                    return
            except OSError:
                pass
            if self.p.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit("FAIL: moed did not come up: " + open(self.log_path).read()[-2000:])

    def call(self, method, path, body=None, headers=None):
        """(status, JSON or raw bytes) of one request."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = "Bearer " + self.key
        h.update(headers or {})
        c.request(method, path, json.dumps(body) if body is not None else None, h)
        r = c.getresponse()
        data = r.read()
        c.close()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data

    def stop(self):
        """SIGTERM; moed must exit 0 (it exits 1 on a leaked fd or handle,
        and 66 on a ThreadSanitizer report in the TSan tree)."""
        self.p.terminate()
        rc = self.p.wait(120)
        self.log.close()
        if rc != 0:
            check(False, "moed exit %d on SIGTERM%s; its log ends: %s" %
                  (rc, " (a ThreadSanitizer report)" if rc == 66 else "",
                   open(self.log_path, errors="replace").read()[-3000:]))
        return rc


# The batching tests of the model families (test_family_daemon,
# test_qwen35_daemon) compare several prompts sent at once with each alone.
BATCH_PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog and then",
    "a",
    "In a galaxy far far away there was a small planet where",
]


def greedy_completion(d, prompt, n):
    """A greedy completion as (text, tokens, logprobs of the chosen tokens),
    or a one-element tuple naming the error."""
    st, j = d.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                               "logprobs": 1})
    if st != 200:
        return ("error %s %s" % (st, j),)
    c = j["choices"][0]
    lp = c.get("logprobs") or {}
    return (c["text"], tuple(lp.get("tokens") or ()), tuple(lp.get("token_logprobs") or ()))


def cancelled_stream(d, prompt, events=2):
    """Starts a streamed completion and hangs up after `events` data events."""
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 64,
                                                     "temperature": 0, "stream": True}),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    seen = 0
    while seen < events:
        line = r.fp.readline()
        if not line:
            break
        seen += line.startswith(b"data:")
    c.close()

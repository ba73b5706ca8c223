#!/usr/bin/env python3
"""qwen35moe (gated delta-net layers, a recurrent state per sequence) served
by moed with continuous batching: greedy completions of several prompts sent
at once, and again while a streamed request is cancelled mid-way, are
exactly what each prompt gives alone (token ids, logprobs of the chosen
tokens, text), with prefix_cache on (moed must ignore it for this family:
a repeated prompt is recomputed, never served from cached blocks). The tiny
model is tests/fixtures/arch/tiny-qwen35moe-F32.gguf."""
import os
import tempfile
import threading

from moed_test import BATCH_PROMPTS, Daemon, cancelled_stream, check, finish, greedy_completion, skip

MOED = os.environ.get("MOED")
ROOT = os.environ.get("MOE_SOURCE_ROOT", "")
MODEL = os.path.join(ROOT, "tests", "fixtures", "arch", "tiny-qwen35moe-F32.gguf")
if not MOED or not os.path.exists(MODEL):
    skip("MOED or the qwen35moe fixture missing")

PROMPTS = BATCH_PROMPTS


def complete(d, prompt, n=12):
    return greedy_completion(d, prompt, n)


def main():
    tmp = tempfile.mkdtemp(prefix="moed-qwen35-")
    d = Daemon(tmp, MODEL, "--prefix-cache", "--kv-block", "4", "--batch-size", "64",
               ctx=256, seqs=4)
    try:
        alone = [complete(d, p) for p in PROMPTS]
        for p, a in zip(PROMPTS, alone):
            check(len(a) == 3 and len(a[1]) > 0, "alone %r: %s" % (p, a))
        # a repeated prompt is recomputed (prefix reuse is off for this family)
        check(complete(d, PROMPTS[1]) == alone[1], "repeat of prompt 1 differs")
        st, stats = d.call("GET", "/v1/moed/stats")
        kv = stats.get("kv_cache") if isinstance(stats, dict) else None
        check(st == 200 and isinstance(kv, dict) and kv.get("prefix_hits") == 0 and
              kv.get("cached_tokens") == 0, "prefix reuse happened for a recurrent model: %s" % kv)
        for rnd in range(2):
            got = [None] * len(PROMPTS)

            def run(i):
                got[i] = complete(d, PROMPTS[i])
            ts = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
            if rnd == 1:  # a cancelled stream beside the batch
                ts.append(threading.Thread(target=cancelled_stream, args=(d, PROMPTS[3])))
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            for i, p in enumerate(PROMPTS):
                check(got[i] == alone[i], "round %d prompt %d: batched %s, alone %s" % (rnd, i, got[i], alone[i]))
        check(complete(d, PROMPTS[3]) == alone[3], "after the cancelled stream: prompt 3 differs")
    finally:
        d.stop()
    finish("qwen35moe: %d prompts batched (twice, once beside a cancelled stream) identical to alone"
           % len(PROMPTS))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Issue 22's families served by moed with continuous batching (qwen35moe has
its own test_qwen35_daemon.py): for glm4moe, minimax-m2 and gemma4 (the tiny
fixtures of tests/fixtures/arch), greedy completions of several prompts sent
at once, and again beside a streamed request cancelled mid-way, are exactly
what each prompt gives alone (text, tokens and logprobs of the chosen
tokens). Each family runs resident (F32, prefix cache on: a repeated prompt
may reuse cached blocks and must still be identical) and quantized with a
small expert cache (Q8_0, 3 experts, gate prefetch)."""
import os
import tempfile
import threading

from moed_test import BATCH_PROMPTS, Daemon, cancelled_stream, check, finish, greedy_completion, skip

MOED = os.environ.get("MOED")
ROOT = os.environ.get("MOE_SOURCE_ROOT", "")
FAMILIES = ["glm4moe", "minimax-m2", "gemma4"]
if not MOED:
    skip("MOED missing")

PROMPTS = BATCH_PROMPTS


def complete(d, prompt, n=10):
    return greedy_completion(d, prompt, n)


def run(model, tag, *flags):
    tmp = tempfile.mkdtemp(prefix="moed-fam-")
    d = Daemon(tmp, model, "--kv-block", "4", "--batch-size", "64", *flags, ctx=256, seqs=4)
    try:
        alone = [complete(d, p) for p in PROMPTS]
        for p, a in zip(PROMPTS, alone):
            check(len(a) == 3 and len(a[1]) > 0, "%s alone %r: %s" % (tag, p, a))
        check(complete(d, PROMPTS[1]) == alone[1], "%s: repeat of prompt 1 differs" % tag)
        for rnd in range(2):
            got = [None] * len(PROMPTS)

            def one(i):
                got[i] = complete(d, PROMPTS[i])
            ts = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
            if rnd == 1:
                ts.append(threading.Thread(target=cancelled_stream, args=(d, PROMPTS[3])))
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            for i in range(len(PROMPTS)):
                check(got[i] == alone[i], "%s round %d prompt %d: batched %s, alone %s"
                      % (tag, rnd, i, got[i], alone[i]))
        check(complete(d, PROMPTS[3]) == alone[3], "%s: after the cancelled stream, prompt 3 differs"
              % tag)
    finally:
        d.stop()
    print("  %s: %d prompts batched (twice, once beside a cancelled stream) identical to alone"
          % (tag, len(PROMPTS)))


def main():
    for fam in FAMILIES:
        base = os.path.join(ROOT, "tests", "fixtures", "arch", "tiny-%s" % fam)
        if not os.path.exists(base + "-F32.gguf"):
            skip("fixture %s missing" % base)
        run(base + "-F32.gguf", fam + " F32", "--prefix-cache")
        run(base + "-Q8_0.gguf", fam + " Q8_0 3-expert cache", "--cache-experts", "3",
            "--prefetch", "gate")
    finish("%s: batched = alone, resident and through the expert cache" % ", ".join(FAMILIES))


if __name__ == "__main__":
    main()

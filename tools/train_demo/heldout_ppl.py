#!/usr/bin/env python3
"""Held-out perplexity of a GGUF as moed computes it: `moectl eval` over
non-overlapping windows of prepare.py's heldout.bin (the chapters no training
step saw), next-token cross-entropy over every position but each window's
first.

  python3 tools/train_demo/heldout_ppl.py --model models/demo-moe.gguf --data demo/train-run [--ctx 256]
"""
import argparse
import math
import os
import subprocess
import tempfile

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="folder with heldout.bin")
    ap.add_argument("--moectl", default="build/client/moectl")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=0, help="at most this many windows (0: all)")
    args = ap.parse_args()
    data = np.fromfile(os.path.join(args.data, "heldout.bin"), dtype=np.uint16).astype(np.int64)
    n = (len(data) - 1) // args.ctx
    if args.windows:
        n = min(n, args.windows)
    nll, cnt = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "l.f32")
        for i in range(n):
            w = data[i * args.ctx:(i + 1) * args.ctx + 1]
            subprocess.run([args.moectl, "eval", "--model", args.model, "--tokens", ",".join(map(str, w[:-1])),
                            "--logits", out, "--threads", "2", "--ctx-size", str(args.ctx)],
                           check=True, capture_output=True)
            lg = np.fromfile(out, dtype=np.float32).reshape(args.ctx, -1).astype(np.float64)
            m = lg.max(1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(lg - m).sum(1)))
            nll += float((lse - lg[np.arange(args.ctx), w[1:]]).sum())
            cnt += args.ctx
    print("heldout: %s: %d windows of %d, %d tokens: loss %.4f, perplexity %.2f"
          % (args.model, n, args.ctx, cnt, nll / cnt, math.exp(nll / cnt)))


if __name__ == "__main__":
    main()

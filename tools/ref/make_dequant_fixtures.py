#!/usr/bin/env python3
"""Reference data for the dequantization tests, made with the `gguf` Python
package (llama.cpp's gguf-py), which the CPU backend must match bit for bit.

Writes into tests/fixtures/dequant/:
  ref-hashes.json   for every non-F32 tensor of every shared/ref model: its type
                    and the XXH3-64 of its dequantization as float32 little-endian
  <TYPE>.blocks     random blocks of TYPE (scales kept finite)
  <TYPE>.f32        their dequantization as float32 little-endian

Usage: pip install gguf numpy xxhash
       python3 tools/ref/make_dequant_fixtures.py [--ref ../shared/ref] [--out tests/fixtures/dequant]
"""
import argparse
import json
import os
import sys

import numpy as np
import xxhash
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# Random-block fixtures: type -> byte ranges that hold float16 scales (kept
# finite so that NaN payload handling does not enter the comparison).
F16_FIELDS = {
    T.Q4_0: [(0, 2)], T.Q4_1: [(0, 2), (2, 4)], T.Q5_0: [(0, 2)], T.Q5_1: [(0, 2), (2, 4)],
    T.Q8_0: [(0, 2)], T.Q2_K: [(80, 82), (82, 84)], T.Q3_K: [(108, 110)],
    T.Q4_K: [(0, 2), (2, 4)], T.Q5_K: [(0, 2), (2, 4)], T.Q6_K: [(208, 210)],
    T.IQ4_NL: [(0, 2)], T.MXFP4: [],
}
N_BLOCKS = 24


def ref_hashes(ref_dir):
    out = {}
    models = os.path.join(ref_dir, "models")
    for name in sorted(os.listdir(models)):
        if not name.endswith(".gguf"):
            continue
        r = gguf.GGUFReader(os.path.join(models, name))
        per = {}
        for t in r.tensors:
            if t.tensor_type == T.F32:
                continue
            y = dequantize(t.data, t.tensor_type).astype("<f4", copy=False)
            per[t.name] = {"type": t.tensor_type.name,
                           "n": int(y.size),
                           "xxh3": "%016x" % xxhash.xxh3_64_intdigest(y.tobytes())}
        out[name] = per
    return out


def random_blocks(qt, rng):
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(N_BLOCKS, ts), dtype=np.uint8)
    for lo, hi in F16_FIELDS[qt]:
        # normal scales, plus a few subnormal and zero ones
        v = (rng.standard_normal(N_BLOCKS) * 0.02).astype(np.float16)
        v[0] = np.float16(0.0)
        v[1] = np.float16(3e-7)    # subnormal in f16
        v[2] = np.float16(-6.1e-5)
        raw[:, lo:hi] = v.view(np.uint8).reshape(N_BLOCKS, 2)
    return raw


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap.add_argument("--ref", default=os.path.join(os.path.dirname(root), "shared", "ref"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "dequant"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    rng = np.random.default_rng(20261122)
    for qt in F16_FIELDS:
        blocks = random_blocks(qt, rng)
        y = dequantize(blocks.reshape(-1), qt).astype("<f4", copy=False)
        assert not np.any(np.isnan(y)), qt
        blocks.tofile(os.path.join(args.out, qt.name + ".blocks"))
        y.tofile(os.path.join(args.out, qt.name + ".f32"))
    # 16-bit float types: values from a normal distribution plus edge cases.
    x = np.concatenate([rng.standard_normal(N_BLOCKS * 32).astype(np.float32),
                        np.array([0.0, -0.0, 1e-8, -3e-5, 65504.0, 1e30, -1e-40], dtype=np.float32)])
    f16 = x.astype(np.float16)
    f16.tofile(os.path.join(args.out, "F16.blocks"))
    f16.astype("<f4").tofile(os.path.join(args.out, "F16.f32"))
    bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    bf16.tofile(os.path.join(args.out, "BF16.blocks"))
    dequantize(bf16.view(np.uint8), T.BF16).astype("<f4").tofile(os.path.join(args.out, "BF16.f32"))

    if os.path.isdir(os.path.join(args.ref, "models")):
        with open(os.path.join(args.out, "ref-hashes.json"), "w") as f:
            json.dump(ref_hashes(args.ref), f, indent=1, sort_keys=True)
            f.write("\n")
    else:
        print("no shared/ref at %s: ref-hashes.json not written" % args.ref, file=sys.stderr)


if __name__ == "__main__":
    main()

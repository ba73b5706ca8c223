#!/usr/bin/env python3
"""gemma4 files the engine does not run are refused at load with a message
naming the key or tensor (moectl eval exits 1), never computed wrongly:
shared-KV layers and per-layer embeddings (Gemma 4 E2B/E4B), a fused
attn_qkv, a head_count_kv array of the wrong length, a missing
sliding_window_pattern (required by llama.cpp's loader), a missing
rope_freqs. Each is tools/ref/make_family_goldens.py's tiny gemma4 with one
change.

Needs gguf and shared/ref's qwen2 vocabulary: exits 77 without them (fails
under CI=true). Environment: MOECTL, MOE_SOURCE_ROOT, MOE_REF_DIR."""
import os
import subprocess
import sys
import tempfile


def skip(why):
    if os.environ.get("CI") == "true":
        print("FAIL: %s (CI=true: tools/setup.sh installs it)" % why)
        sys.exit(1)
    print("SKIP: %s" % why)
    sys.exit(77)


try:
    import numpy as np
    import gguf
except Exception as e:
    skip("gguf / numpy not importable: %s" % e)

ROOT = os.environ.get("MOE_SOURCE_ROOT", "")
REF = os.environ.get("MOE_REF_DIR", "")
MOECTL = os.environ.get("MOECTL", "")
VOCAB = os.path.join(REF, "vocab", "ggml-vocab-qwen2.gguf")
if not MOECTL or not os.path.exists(VOCAB):
    skip("MOECTL or shared/ref's qwen2 vocabulary missing")
sys.path.insert(0, os.path.join(ROOT, "tools", "ref"))
import make_family_goldens as M  # noqa: E402

W = gguf.GGUFWriter


def variant(path, vocab, change):
    """The tiny gemma4 with the writer's calls patched by change (a dict of
    method name -> replacement)."""
    saved = {k: getattr(W, k) for k in change}
    try:
        for k, f in change.items():
            setattr(W, k, f(saved[k]))
        M.write_gemma4(path, 5, vocab)
    finally:
        for k, f in saved.items():
            setattr(W, k, f)


def key_value(name, value):
    """Patch: add_<name>(v) writes value instead."""
    return {name: lambda orig: (lambda self, *a: orig(self, value))}


def drop(name):
    return {name: lambda orig: (lambda self, *a, **k: None)}


def rename_tensor(old, new):
    def f(orig):
        def add_tensor(self, name, arr, *a, **k):
            if name == old:
                name = new
            return orig(self, name, arr, *a, **k)
        return add_tensor
    return {"add_tensor": f}


def fuse_qkv(layer):
    """attn_q/k/v of one layer replaced by a zero attn_qkv of their rows."""
    rows = {}

    def f(orig):
        def add_tensor(self, name, arr, *a, **k):
            b = "blk.%d." % layer
            if name in (b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"):
                rows[name] = arr
                if len(rows) == 3:
                    return orig(self, b + "attn_qkv.weight", np.concatenate(list(rows.values())), *a, **k)
                return None
            return orig(self, name, arr, *a, **k)
        return add_tensor
    return {"add_tensor": f}


CASES = [
    ("shared KV layers", key_value("add_shared_kv_layers", 1), "attention.shared_kv_layers = 1"),
    ("per-layer embeddings", key_value("add_embedding_length_per_layer_input", 8),
     "embedding_length_per_layer_input = 8"),
    ("head_count_kv of 3 entries", key_value("add_head_count_kv", [2, 2, 1]),
     "attention.head_count_kv' has 3 entries"),
    ("no sliding_window_pattern", drop("add_sliding_window_pattern"),
     "missing key 'gemma4.attention.sliding_window_pattern'"),
    ("fused attn_qkv", fuse_qkv(0), "'blk.0.attn_qkv.weight' (fused q/k/v) is not supported"),
    ("no rope_freqs", rename_tensor("rope_freqs.weight", "rope_freqs_x.weight"),
     "missing tensor 'rope_freqs.weight'"),
]


def main():
    vocab = M.read_vocab(VOCAB, M.N_REGULAR)
    failed = 0
    with tempfile.TemporaryDirectory() as td:
        for what, change, want in CASES:
            path = os.path.join(td, "g.gguf")
            variant(path, vocab, change)
            r = subprocess.run([MOECTL, "eval", "--model", path, "--tokens", "1,2,3", "--logits",
                                os.path.join(td, "l.f32"), "--threads", "1", "--ctx-size", "64"],
                               capture_output=True, text=True)
            ok = r.returncode == 1 and want in r.stderr
            print("  %s: exit %d, %s%s" % (what, r.returncode, r.stderr.strip()[-200:],
                                         "" if ok else "  <- expected '%s'" % want))
            failed += not ok
    if failed:
        print("FAIL: %d cases" % failed)
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()

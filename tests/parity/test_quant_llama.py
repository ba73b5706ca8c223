#!/usr/bin/env python3
"""moe-gen's quantized files against llama.cpp's own quantizer.

For each file type with per-tensor rules (Q4_K_M, Q5_K_M, Q6_K, MXFP4_MOE)
and two shapes (a qwen3moe with 16 experts, a llama with exactly 8, where
llama-quantize's Mixtral rules apply), moe-gen writes the F32 master and
the quantized file from the same seed; llama.cpp (llama-cpp-python's
llama_model_quantize, no importance matrix) quantizes the master; every
tensor must have the same name, type and bytes. The weights are random
normals (moe-gen's generator), so this is the quantizers on random data,
the Q4_K/Q5_K/Q6_K/MXFP4 block writers and the type mix at once.

Needs llama-cpp-python and gguf (pip; tools/setup.sh installs them): exits
77 (skip) without them, and fails instead under CI=true.
Environment: MOE_GEN (the generator).
"""
import ctypes
import os
import sys
import tempfile


def skip(why):
    if os.environ.get("CI") == "true":
        print("FAIL: %s (CI=true: tools/setup.sh installs it)" % why)
        sys.exit(1)
    print("SKIP: %s" % why)
    sys.exit(77)


try:
    import llama_cpp
except Exception as e:  # ImportError, or a wheel that cannot load
    skip("llama-cpp-python not importable: %s" % e)
try:
    from gguf import GGUFReader
except Exception as e:
    skip("gguf (gguf-py) not importable: %s" % e)

# llama.cpp's log (every tensor it converts) would bury the result lines
@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):
    pass


llama_cpp.llama_log_set(_quiet, ctypes.c_void_p())

MOE_GEN = os.environ.get("MOE_GEN")
if not MOE_GEN or not os.path.exists(MOE_GEN):
    print("FAIL: MOE_GEN not set to the generator")
    sys.exit(1)

# llama_ftype values (llama.h)
FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "MXFP4_MOE": 38}
SHAPES = {
    # qwen3moe, 16 experts: K-quant rows of 256 and 512
    "qwen": ["--arch", "qwen3moe", "--n-embd", "256", "--n-layer", "8", "--n-head", "4", "--n-head-kv", "2",
             "--head-dim", "64", "--n-expert", "16", "--n-expert-used", "4", "--n-ff-exp", "512",
             "--n-vocab", "4096", "--seed", "5"],
    # llama with exactly 8 experts: attn_k/attn_v Q8_0, attn_output Q5_K
    "mixtral": ["--arch", "llama", "--n-embd", "256", "--n-layer", "4", "--n-head", "4", "--n-head-kv", "2",
                "--head-dim", "64", "--n-expert", "8", "--n-expert-used", "2", "--n-ff-exp", "256",
                "--n-vocab", "2048", "--seed", "6"],
}


def run(args):
    import subprocess
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        print("FAIL: %s: %s" % (" ".join(args), p.stderr.strip()))
        sys.exit(1)


def tensors(path):
    r = GGUFReader(path)
    return {t.name: (int(t.tensor_type), bytes(t.data.tobytes())) for t in r.tensors}


def llama_quantize(src, dst, ftype):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return rc


def main():
    failed = passed = 0
    with tempfile.TemporaryDirectory(prefix="moe-quant-") as tmp:
        for shape, args in SHAPES.items():
            master = os.path.join(tmp, shape + "-F32.gguf")
            run([MOE_GEN] + args + ["--type", "F32", "--quiet", "-o", master])
            for name, ftype in FTYPES.items():
                ours = os.path.join(tmp, "%s-%s-moe.gguf" % (shape, name))
                theirs = os.path.join(tmp, "%s-%s-llama.gguf" % (shape, name))
                run([MOE_GEN] + args + ["--type", name, "--quiet", "-o", ours])
                if llama_quantize(master, theirs, ftype) != 0:
                    print("FAIL %s %s: llama_model_quantize failed" % (shape, name))
                    failed += 1
                    continue
                a, b = tensors(ours), tensors(theirs)
                bad = []
                if sorted(a) != sorted(b):
                    bad.append("tensor names differ: %s" % sorted(set(a) ^ set(b)))
                types = {}
                for t in sorted(set(a) & set(b)):
                    (ta, da), (tb, db) = a[t], b[t]
                    if ta != tb:
                        bad.append("%s: type %d, llama.cpp %d" % (t, ta, tb))
                    elif da != db:
                        k = next(i for i in range(min(len(da), len(db))) if da[i] != db[i]) \
                            if len(da) == len(db) else -1
                        bad.append("%s (type %d): bytes differ (first at %d)" % (t, ta, k))
                    types[ta] = types.get(ta, 0) + 1
                if bad:
                    failed += 1
                    print("FAIL %s %s: %d of %d tensors differ" % (shape, name, len(bad), len(a)))
                    for line in bad[:10]:
                        print("   ", line)
                else:
                    passed += 1
                    print("ok   %s %s: %d tensors identical (ggml types: %s)" % (
                        shape, name, len(a), ", ".join("%d x%d" % kv for kv in sorted(types.items()))))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

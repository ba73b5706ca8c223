#!/usr/bin/env python3
"""Issue 22's families on a K-quant mix against llama.cpp: for glm4moe,
minimax-m2, qwen35moe and gemma4, tools/ref/make_family_goldens.py's tiny
model is written with n_embd 256 (so that rows are whole K-quant blocks),
llama.cpp quantizes it to Q4_K_M (llama_model_quantize: Q4_K with Q6_K
where llama-quantize's rules put it; rows of other lengths fall back as
llama-quantize does), and on a 16-token prompt our logits (moectl eval, KV
f32) are compared with llama.cpp's (llama-cpp-python 0.3.36, use_extra_bufts
off) at every position: mean |dlogit| <= 0.05 and the argmax equal at >= 90%
of positions (the quantized variants' criteria); the file must hold Q4_K and
Q6_K tensors; and the same eval through a 2-expert cache must be
bit-identical to the resident one.

Needs llama-cpp-python, gguf and shared/ref's qwen2 vocabulary: exits 77
(skip) without them, and fails instead under CI=true.
Environment: MOECTL, MOE_SOURCE_ROOT, MOE_REF_DIR.
"""
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
    import llama_cpp  # noqa: F401
    from gguf import GGUFReader
except Exception as e:  # ImportError, or a wheel that cannot load
    skip("llama-cpp-python / gguf / numpy not importable: %s" % e)

ROOT = os.environ.get("MOE_SOURCE_ROOT", "")
REF = os.environ.get("MOE_REF_DIR", "")
MOECTL = os.environ.get("MOECTL", "")
VOCAB = os.path.join(REF, "vocab", "ggml-vocab-qwen2.gguf")
if not MOECTL or not os.path.exists(VOCAB):
    skip("MOECTL or shared/ref's qwen2 vocabulary missing")
sys.path.insert(0, os.path.join(ROOT, "tools", "ref"))
import make_family_goldens as M  # noqa: E402

FAMILIES = {"glm4moe": M.write_glm4moe, "minimax-m2": M.write_minimax_m2,
            "qwen35moe": M.write_qwen35moe, "gemma4": M.write_gemma4}
Q4_K_M = 15   # LLAMA_FTYPE_MOSTLY_Q4_K_M
Q4_K, Q6_K = 12, 14   # ggml types


def eval_ours(model, toks, out, *extra):
    cmd = [MOECTL, "eval", "--model", model, "--tokens", ",".join(map(str, toks)), "--logits", out,
           "--threads", "2", "--ctx-size", "256", "--kv-type", "f32"] + list(extra)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print("FAIL: %s: %s" % (" ".join(cmd), r.stderr[-2000:]))
        sys.exit(1)
    return np.fromfile(out, dtype="<f4")


def main():
    M.no_repack()
    vocab = M.read_vocab(VOCAB, M.N_REGULAR)
    failed = 0
    with tempfile.TemporaryDirectory() as td:
        for seed, (fam, writer) in enumerate(FAMILIES.items()):
            f32 = os.path.join(td, fam + "-F32.gguf")
            q = os.path.join(td, fam + "-Q4_K_M.gguf")
            writer(f32, 40 + seed, vocab, n_embd=256)
            M.quantize(f32, q, Q4_K_M)
            types = {int(t.tensor_type) for t in GGUFReader(q).tensors}
            rng = np.random.default_rng(90 + seed)
            toks = [int(t) for t in rng.integers(0, M.N_REGULAR, size=16)]
            ref, _, _ = M.run_llama(q, toks, 0)
            V = ref.shape[1]
            ours = eval_ours(q, toks, os.path.join(td, fam + ".logits")).reshape(len(toks), V)
            cached = eval_ours(q, toks, os.path.join(td, fam + ".c.logits"), "--cache-experts", "2")
            d = np.abs(ours.astype(np.float64) - ref)
            same = int((ours.argmax(1) == ref.argmax(1)).sum())
            ok = (Q4_K in types and Q6_K in types and d.mean() <= 0.05 and same * 10 >= 9 * len(toks)
                  and np.array_equal(cached.reshape(len(toks), V), ours))
            print("  %s Q4_K_M (Q4_K %s, Q6_K %s): max|d| %.3g mean|d| %.3g argmax %d/%d, 2-expert cache"
                  " %s %s" % (fam, Q4_K in types, Q6_K in types, d.max(), d.mean(), same, len(toks),
                             "bit-identical" if np.array_equal(cached.reshape(len(toks), V), ours)
                             else "DIFFERS", "ok" if ok else "FAIL"))
            failed += not ok
    if failed:
        print("FAIL: %d families" % failed)
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()

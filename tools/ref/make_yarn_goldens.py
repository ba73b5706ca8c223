#!/usr/bin/env python3
"""YaRN reference data: shared/ref's tiny gpt-oss and deepseek2 F32 models with
YaRN RoPE scaling added to their metadata, run through llama.cpp
(llama-cpp-python, CPU, F32 KV cache, one batch). Only the outputs are kept;
tests/parity/test_parity_yarn.c rebuilds the same models from shared/ref with
moed's GGUF writer, adding the keys listed in YARN below.

Writes tests/fixtures/yarn/<model>.json ({"keys", "tokens", "n_vocab", "greedy"})
and <model>.logits.f32 ([n][V] float32 LE).

Usage: pip install gguf numpy llama-cpp-python
       python3 tools/ref/make_yarn_goldens.py [--ref ../shared/ref]
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import gguf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_arch_goldens import run_llama  # noqa: E402

YARN = {
    "tiny-gptoss-F32": {"arch": "gpt-oss", "type": "yarn", "factor": 4.0, "orig_ctx": 64},
    "tiny-deepseek2-F32": {"arch": "deepseek2", "type": "yarn", "factor": 4.0, "orig_ctx": 64,
                           "log_mul": 0.0707},
}


def copy_with_yarn(src, dst, y):
    r = gguf.GGUFReader(src)
    arch = y["arch"]
    w = gguf.GGUFWriter(dst, arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            sub = f.types[1]
            if sub == gguf.GGUFValueType.STRING:
                w.add_array(k, [bytes(f.parts[i]) for i in f.data])
            else:
                w.add_array(k, [f.parts[i][0].item() for i in f.data])
        elif t == gguf.GGUFValueType.STRING:
            w.add_string(k, bytes(f.parts[f.data[0]]).decode("utf-8"))
        else:
            w.add_key_value(k, f.parts[f.data[0]][0].item(), t)
    w.add_string(arch + ".rope.scaling.type", y["type"])
    w.add_float32(arch + ".rope.scaling.factor", y["factor"])
    w.add_uint32(arch + ".rope.scaling.original_context_length", y["orig_ctx"])
    if "log_mul" in y:
        w.add_float32(arch + ".rope.scaling.yarn_log_multiplier", y["log_mul"])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default=os.path.join(os.path.dirname(root), "shared", "ref"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "yarn"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    man = json.load(open(os.path.join(args.ref, "manifest.json")))
    for name, y in YARN.items():
        model = name.rsplit("-", 1)[0]
        tokens = man["models"][model]["sequences"]["len33"][:24]
        with tempfile.TemporaryDirectory() as td:
            path = os.path.join(td, name + "-yarn.gguf")
            copy_with_yarn(os.path.join(args.ref, "models", name + ".gguf"), path, y)
            logits, ids, margin, ver = run_llama(path, tokens, 8)
        logits.astype("<f4").tofile(os.path.join(args.out, name + ".logits.f32"))
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump({"keys": y, "tokens": tokens, "n_vocab": int(logits.shape[1]),
                       "greedy": {"ids": ids, "margin": margin}, "llama_cpp_python": ver}, f, indent=1)
            f.write("\n")
        print(name, "ok", logits.shape, ids)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Goldens for the tokenizer.ggml.pre values of issue 22's families (glm4,
minimax-m2, qwen35 and the names llama.cpp gives the same rules): their real
vocabularies are not on PyPI (checked: no package ships the GLM-4.5,
MiniMax-M2, Qwen3.5 or Gemma 4 tokenizer files), so each pre value is set on
shared/ref's byte-level BPE vocabularies (qwen2, llama-bpe) by replacing the
one string in the vocab-only GGUF, and llama.cpp (llama-cpp-python 0.3.36,
vocab_only) tokenizes random mixes of tricky fragments with them. This
checks the pre-tokenizer (regex split) and the per-value flags (clean_spaces,
ignore_merges) with llama.cpp's BPE merges on those vocabularies; not the
families' own merges or special tokens.

Writes tests/fixtures/tokenizer/pre-goldens.json:
  {"llama_cpp_python", "texts": [...], "cases": [{"vocab", "pre",
    "ids": [[...] per text, add_special, no parse_special],
    "ids_special": [[...] per text, add_special, parse_special]}]}
tests/parity/test_tokenizer_pre.c splices the same string into the same
vocabulary in memory and compares.

usage: python3 tools/ref/make_pre_goldens.py [--ref ../shared/ref]
"""
import argparse
import json
import os
import random
import struct
import tempfile

PRES = ["glm4", "glm5", "minimax-m2", "gpt-4o", "llama4", "qwen35"]
VOCABS = ["qwen2", "llama-bpe"]
N_TEXTS = 60
POOL = [' ', '  ', '\t', '\n', '\r\n', 'a', 'Z', 'é', 'ß', '中', '文', 'の', 'カ', '한', 'ä', '1', '23',
        '456', '7890', "'s", "'LL", "'Re", '!', '?', '...', '~', '<|im_start|>', '<|endoftext|>', '\u00a0',
        '\u3000', '\u0085', '\u2003', '😀', '👍🏽', 'ο', 'Ж', '\u0301', 'e\u0301', '\u0915\u093f', '$',
        '+', '_', '`', '/', 'word', ' the', 'Hello', 'HELLO', 'camelCase', 'McDonald', 'Á', 'õ', '١٢٣',
        '½', 'Ⅻ', '\u200b', 'ﬀ', 'Ǆ', 'ǅ', 'İ', 'ﬁ', "DON'T", "it's", '?/\n', 'a/b', 'a1b2',
        'ÀÉÎ', 'ǅungla', 'XMLHttpRequest', 'iPhone', '1234567']


def splice_pre(data: bytes, new: str) -> bytes:
    key = b"tokenizer.ggml.pre"
    at = data.index(struct.pack("<Q", len(key)) + key)
    p = at + 8 + len(key)
    assert struct.unpack_from("<I", data, p)[0] == 8   # a string
    n = struct.unpack_from("<Q", data, p + 4)[0]
    v = new.encode()
    return data[:p + 4] + struct.pack("<Q", len(v)) + v + data[p + 12 + n:]


def main():
    import llama_cpp
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default=os.path.join(os.path.dirname(root), "shared", "ref"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "tokenizer",
                                                  "pre-goldens.json"))
    args = ap.parse_args()
    rng = random.Random(22)
    texts = [''.join(rng.choice(POOL) for _ in range(rng.randint(1, 20))) for _ in range(N_TEXTS)]
    out = {"llama_cpp_python": llama_cpp.__version__, "texts": texts, "cases": []}
    with tempfile.TemporaryDirectory() as td:
        for v in VOCABS:
            data = open(os.path.join(args.ref, "vocab", "ggml-vocab-%s.gguf" % v), "rb").read()
            for pre in PRES:
                path = os.path.join(td, "%s-%s.gguf" % (v, pre))
                open(path, "wb").write(splice_pre(data, pre))
                llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
                ids = [llm.tokenize(t.encode(), add_bos=True, special=False) for t in texts]
                ids_s = [llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts]
                out["cases"].append({"vocab": v, "pre": pre, "ids": ids,
                                     "ids_special": ids_s})
                print(v, pre, "ok", sum(len(x) for x in ids), "ids")
                del llm
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()

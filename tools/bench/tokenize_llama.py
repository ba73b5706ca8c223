#!/usr/bin/env python3
"""llama.cpp's tokenizer on the same text: llama-cpp-python (libllama) with
vocab_only=True, best of N runs of Llama.tokenize(add_bos=False,
special=False), which is llama_tokenize(add_special=false, parse_special=false).
Prints one JSON line like tokenize_bench.c. Benchmark-only; needs
`pip install llama-cpp-python`.

usage: tokenize_llama.py VOCAB.gguf TEXT_FILE [RUNS]
"""
import json
import sys
import time

import llama_cpp


def main():
    vocab, path = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    text = open(path, 'rb').read()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=vocab, vocab_only=True, verbose=False)
    load_s = time.perf_counter() - t0
    best, n = 1e30, 0
    for _ in range(runs):
        s = time.perf_counter()
        ids = llm.tokenize(text, add_bos=False, special=False)
        best = min(best, time.perf_counter() - s)
        n = len(ids)
    print(json.dumps({'vocab': vocab, 'bytes': len(text), 'tokens': n, 'load_s': round(load_s, 4),
                      'best_s': round(best, 4), 'tokens_per_s': round(n / best),
                      'mb_per_s': round(len(text) / best / 1e6, 2)}))
    if len(sys.argv) > 4:
        json.dump(ids, open(sys.argv[4], 'w'))


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Prints llama.cpp's ids (libllama via llama-cpp-python, vocab_only) for
inputs the shared/ref goldens do not cover: NUL bytes and invalid UTF-8.
tests/unit/test_tokenizer.c (test_known_malformed_ids) holds the output.

usage: tokenizer_extra.py REF_DIR
"""
import sys

import llama_cpp

TEXT = b"a\x00b \xff\xfe \xc3 \xe4\xb8 end"


def main():
    ref = sys.argv[1]
    for vocab, add in (('qwen2', False), ('llama-spm', True), ('deepseek-llm', False), ('llama-bpe', False)):
        llm = llama_cpp.Llama(model_path='%s/vocab/ggml-vocab-%s.gguf' % (ref, vocab), vocab_only=True, verbose=False)
        print(vocab, 'add_special=%s' % add, llm.tokenize(TEXT, add_bos=add, special=False))


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Differential check of model/tokenizer against llama.cpp (llama-cpp-python,
vocab_only): 400 random mixes of tricky fragments (whitespace kinds, CJK,
combining marks, contractions, special-token text, digits) on every
shared/ref vocabulary, with and without parse_special.

usage: cc -O1 -I. tools/ref/tokenizer_diff_driver.c BUILD/libmoe.a -lpcre2-8 -lzstd -luring -lxxhash -lm -lpthread -o /tmp/t3
       python3 tools/ref/tokenizer_diff.py
"""
import random, subprocess, sys, llama_cpp
rng=random.Random(7)
pools=[' ', '  ', '\t', '\n', '\r\n', 'a', 'Z', 'é', 'ß', '中', '文', 'の', 'カ', '한', 'ä', '1', '23', '456', "'s", "'LL", '!', '?', '...', '~', '<|im_start|>', '<|endoftext|>', '</s>', '<s>', '\u00a0', '\u3000', '\u0085', '\u2003', '😀', '👍🏽', 'ο', 'Ж', '\u0301', '$', '+', '_', '`', 'word', ' the', 'Á', 'õ', '\x00', '١٢٣', '½', 'Ⅻ', '\u200b', 'ﬀ', 'Ǆ']
texts=[''.join(rng.choice(pools) for _ in range(rng.randint(1,25))) for _ in range(400)]
data=b''.join(t.encode()+b'\0' for t in texts if '\x00' not in t)
texts=[t for t in texts if '\x00' not in t]
open('/tmp/diff.txt','wb').write(data)
for v in ['llama-spm','qwen2','llama-bpe','gpt-2','deepseek-llm','deepseek-coder']:
    path=f'/work/shared/ref/vocab/ggml-vocab-{v}.gguf'
    llm=llama_cpp.Llama(model_path=path,vocab_only=True,verbose=False)
    for special in (False, True):
        out=subprocess.run(['/tmp/t3',path,'/tmp/diff.txt']+(['x'] if special else []),capture_output=True,text=True).stdout.splitlines()
        bad=0
        for t,line in zip(texts,out):
            mine=[int(x) for x in line.split()[1:]]
            ref=llm.tokenize(t.encode(),add_bos=True,special=special)
            if mine!=ref:
                bad+=1
                if bad<=2: print(' DIFF',v,special,repr(t),mine[:20],ref[:20])
        print(v,'special' if special else 'plain', len(texts)-bad,'/',len(texts))

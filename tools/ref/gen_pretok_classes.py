#!/usr/bin/env python3
"""Prints the PCRE2 forms of llama.cpp's literal character classes for the
deepseek-llm / deepseek-coder / deepseek-v3 pre-tokenizers (model/tokenizer_pre.c).

llama.cpp matches these classes with std::wregex on text in which every
non-ASCII whitespace code point was first replaced by U+000B, so such code
points can never match a literal range. PCRE2 sees the real text, so the
whitespace code points are cut out of the ranges here. Everything non-ASCII is
written as \\x{...} so the C source stays ASCII.

usage: gen_pretok_classes.py path/to/llama.cpp/src/llama-vocab.cpp
"""
import re
import sys

WS = [9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680] + list(range(0x2000, 0x200B)) + \
     [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]


def ranges(cls):
    i, out = 0, []
    while i < len(cls):
        if i + 2 < len(cls) and cls[i + 1] == '-':
            out.append((ord(cls[i]), ord(cls[i + 2])))
            i += 3
        else:
            out.append((ord(cls[i]), ord(cls[i])))
            i += 1
    return out


def esc(v):
    c = chr(v)
    if c.isascii() and c.isalnum():
        return c
    return '\\\\x{%X}' % v


def pcre_class(cls):
    s = ''
    for a, b in ranges(cls):
        assert a <= b, (hex(a), hex(b))
        cur, segs = a, []
        for w in WS:
            if a <= w <= b:
                if cur <= w - 1:
                    segs.append((cur, w - 1))
                cur = w + 1
        if cur <= b:
            segs.append((cur, b))
        for x, y in segs:
            s += esc(x) if x == y else esc(x) + '-' + esc(y)
    return s


def main():
    src = open(sys.argv[1], encoding='utf-8').read()
    for name in ('DEEPSEEK_LLM', 'DEEPSEEK_CODER', 'DEEPSEEK3_LLM'):
        i = src.find('case LLAMA_VOCAB_PRE_TYPE_%s:' % name)
        j = src.find('regex_exprs = {', i)
        k = src.find('};', j)
        print('/*', name, '*/')
        for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', src[j:k]):
            expr = m.group(1)
            for cls in re.findall(r'\[([^\]\\]*[^\x00-\x7f][^\]\\]*)\]', expr):
                print('  [%s] -> [%s]' % (cls.encode('unicode_escape').decode(), pcre_class(cls)))


if __name__ == '__main__':
    main()

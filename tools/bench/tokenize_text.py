#!/usr/bin/env python3
"""Writes the tokenizer benchmark text: about 1 MiB (1,048,576 bytes, cut on a
character boundary) of mixed code, English prose and CJK / other scripts,
built deterministically from files in this repository and the shared/ref
tokenizer goldens, so that every run and every tokenizer sees the same bytes.

usage: tokenize_text.py SOURCE_ROOT REF_DIR OUT
Mix by bytes: ~40% C source (model/, io/, kernels/), ~40% Markdown prose
(doc/ and ../shared/*.md), ~20% non-Latin text (the goldens' CJK, Korean,
Greek, Cyrillic, Arabic, Hebrew, Hindi and emoji cases).
"""
import glob
import json
import os
import random
import sys

TARGET = 1 << 20


def read_all(paths):
    out = []
    for p in sorted(paths):
        try:
            out.append(open(p, encoding='utf-8').read())
        except (OSError, UnicodeDecodeError):
            pass
    return out


def main():
    root, ref, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    code = read_all(glob.glob(os.path.join(root, 'model', '*.c')) +
                    glob.glob(os.path.join(root, 'io', '*.c')) +
                    glob.glob(os.path.join(root, 'kernels', 'cpu', '*.c')))
    prose = read_all(glob.glob(os.path.join(root, 'doc', '*.md')) +
                     glob.glob(os.path.join(root, '..', 'shared', '*.md')))
    cases = json.load(open(os.path.join(ref, 'tokenizer', 'tokenizer-qwen2.json'), encoding='utf-8'))['cases']
    intl = [c['text'] for c in cases if any(ord(ch) > 0x2000 for ch in c['text'])]
    rng = random.Random(1234)
    parts = {'code': [], 'prose': [], 'intl': []}
    sizes = {'code': 0, 'prose': 0, 'intl': 0}
    goal = {'code': 0.4 * TARGET, 'prose': 0.4 * TARGET, 'intl': 0.2 * TARGET + 4096}
    src = {'code': code, 'prose': prose, 'intl': intl}
    while any(sizes[k] < goal[k] for k in sizes):
        for k in ('code', 'prose', 'intl'):
            if sizes[k] >= goal[k] or not src[k]:
                continue
            s = rng.choice(src[k])
            if k != 'intl' and len(s) > 4000:
                i = rng.randrange(0, len(s) - 4000)
                s = s[i:i + 4000]
            else:
                s = ' '.join(rng.choice(src[k]) for _ in range(8)) + '\n'
            parts[k].append(s)
            sizes[k] += len(s.encode())
    chunks = []
    for i in range(max(len(v) for v in parts.values())):
        for k in ('code', 'prose', 'intl'):
            if i < len(parts[k]):
                chunks.append(parts[k][i])
    data = ''.join(chunks).encode()[:TARGET]
    data = data.decode('utf-8', errors='ignore').encode()
    open(out_path, 'wb').write(data)
    print('%s: %d bytes' % (out_path, len(data)), file=sys.stderr)


if __name__ == '__main__':
    main()

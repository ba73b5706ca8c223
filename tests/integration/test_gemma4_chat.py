#!/usr/bin/env python3
"""moed serving a gemma4 model with Gemma 4's tokenizer and chat template
(tools/ref/make_gemma4_tok_goldens.write_model: the tiny gemma4 of
make_family_goldens.py with tests/fixtures/tokenizer/gemma4-vocab.gguf and
shared/ref's Gemma 4 template): /tokenize of each prompt, /v1/completions
of it (greedy) and /v1/chat/completions of the user turn (its own template,
no flag; <|turn> and friends parsed as special tokens, the template's
leading <bos> not doubled) give exactly what llama.cpp gave
(tests/fixtures/tokenizer/gemma4-run.json); the chat prompt's token count
is llama.cpp's.

Needs gguf and numpy and shared/ref's template (exits 77 without them;
fails under CI=true)."""
import json
import os
import sys
import tempfile

from moed_test import Daemon, check, finish, skip

MOED = os.environ.get("MOED")
ROOT = os.environ.get("MOE_SOURCE_ROOT", "")
REF = os.environ.get("MOE_REF_DIR", "")
TEMPLATE = os.path.join(REF, "templates", "gemma4", "gemma-4-31B-it.llamacpp-2604.jinja")
FIX = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
MARGIN = 1e-4
if not MOED:
    skip("MOED missing")
try:
    import numpy  # noqa: F401
    import gguf  # noqa: F401
except Exception as e:
    skip("gguf / numpy not importable: %s" % e)
if not os.path.exists(TEMPLATE):
    skip("shared/ref's Gemma 4 template missing")
sys.path.insert(0, os.path.join(ROOT, "tools", "ref"))
import make_gemma4_tok_goldens as G  # noqa: E402


def main():
    gold = json.load(open(os.path.join(FIX, "gemma4-run.json")))
    n = gold["n_run"]
    tmp = tempfile.mkdtemp(prefix="moed-g4tok-")
    model = os.path.join(tmp, "tiny-gemma4-tok.gguf")
    G.write_model(model, os.path.join(FIX, "gemma4-vocab.gguf"), open(TEMPLATE).read())
    d = Daemon(tmp, model, ctx=256, seqs=2)
    try:
        for p in gold["prompts"]:
            st, j = d.call("POST", "/tokenize", {"content": p["text"], "add_special": True})
            check(st == 200 and j.get("tokens") == p["ids"], "/tokenize %r: %s %s, llama.cpp %s"
                  % (p["text"], st, j, p["ids"]))
            if min(p["margin"]) < MARGIN:
                continue
            want = bytes.fromhex(p["out_hex"]).decode("utf-8", errors="replace")
            st, j = d.call("POST", "/v1/completions", {"prompt": p["text"], "max_tokens": n, "temperature": 0})
            got = j["choices"][0]["text"] if st == 200 else "error %s %s" % (st, j)
            check(got == want, "completion %r: %r, llama.cpp %r" % (p["text"], got, want))
        c = gold["chat"]
        want = bytes.fromhex(c["out_hex"]).decode("utf-8", errors="replace")
        st, j = d.call("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": c["user"]}],
                                                       "max_tokens": n, "temperature": 0})
        got = j["choices"][0]["message"].get("content") if st == 200 else "error %s %s" % (st, j)
        check(st == 200 and j["usage"]["prompt_tokens"] == len(c["ids"]),
              "chat prompt tokens %s, llama.cpp %d" % (j.get("usage"), len(c["ids"])))
        if min(c["margin"]) >= MARGIN:
            check(got == want, "chat: %r, llama.cpp %r" % (got, want))
    finally:
        d.stop()
    finish("gemma4 tokenizer in moed: %d prompts tokenized and completed, one chat turn, as llama.cpp"
           % len(gold["prompts"]))


if __name__ == "__main__":
    main()

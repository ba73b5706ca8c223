#!/usr/bin/env python3
"""A gemma4 model with Gemma 4's tokenizer, end to end through moectl:
tools/ref/make_family_goldens.py's tiny gemma4 written with the gemma4 test
vocabulary (tests/fixtures/tokenizer/gemma4-vocab.gguf,
make_gemma4_tok_goldens.write_model) must load with its tokenizer, and for
each prompt of tests/fixtures/tokenizer/gemma4-run.json
  moectl tokenize          the ids llama.cpp gave (BOS added),
  moectl run --prompt      the text llama.cpp's greedy decode gives (its
                           pieces up to the first EOG),
and with Gemma 4's chat template (from shared/ref, when there) `moectl
template` renders what jinja2 renders, `moectl tokenize --special` of it
(leading <bos> dropped, as llama.cpp does) gives llama.cpp's ids with
<|turn> etc. as single tokens, and `moectl chat` prints llama.cpp's greedy
text.

Needs gguf and numpy (exits 77 without them; fails under CI=true).
Environment: MOECTL, MOE_SOURCE_ROOT, MOE_REF_DIR."""
import json
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
    import numpy  # noqa: F401
    import gguf  # noqa: F401
except Exception as e:
    skip("gguf / numpy not importable: %s" % e)

ROOT = os.environ.get("MOE_SOURCE_ROOT", "")
REF = os.environ.get("MOE_REF_DIR", "")
MOECTL = os.environ.get("MOECTL", "")
if not MOECTL:
    skip("MOECTL not set")
sys.path.insert(0, os.path.join(ROOT, "tools", "ref"))
import make_gemma4_tok_goldens as G  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
TEMPLATE = os.path.join(REF, "templates", "gemma4", "gemma-4-31B-it.llamacpp-2604.jinja")
# greedy steps whose top-2 margin is below this may legitimately differ
MARGIN = 1e-4

fails = []


def moectl(*args):
    r = subprocess.run([MOECTL] + list(args), capture_output=True, timeout=120)
    if r.returncode != 0:
        fails.append("moectl %s: exit %d: %s" % (" ".join(args[:3]), r.returncode, r.stderr.decode()[-300:]))
    return r.stdout


def check(what, got, want):
    ok = got == want
    print("  %s: %s" % (what, "identical" if ok else "DIFFERS"))
    if not ok:
        fails.append("%s: got %r, llama.cpp %r" % (what, got, want))


def main():
    gold = json.load(open(os.path.join(FIX, "gemma4-run.json")))
    chat = gold.get("chat")
    have_tpl = os.path.exists(TEMPLATE)
    with tempfile.TemporaryDirectory() as td:
        model = os.path.join(td, "tiny-gemma4-tok.gguf")
        G.write_model(model, os.path.join(FIX, "gemma4-vocab.gguf"),
                      open(TEMPLATE).read() if have_tpl and chat else None)
        n = str(gold["n_run"])
        for p in gold["prompts"]:
            ids = json.loads(moectl("tokenize", "--model", model, p["text"]) or b"null")
            check("tokenize %r" % p["text"], ids, p["ids"])
            if min(p["margin"]) < MARGIN:
                print("  run %r: a greedy margin below %g, not compared" % (p["text"], MARGIN))
                continue
            out = moectl("run", "--model", model, "--prompt", p["text"], "-n", n)
            check("run %r" % p["text"], out, bytes.fromhex(p["out_hex"]) + b"\n")
        if chat is None or not have_tpl:
            print("  chat: skipped (no Gemma 4 template in shared/ref)")
        else:
            msgs = os.path.join(td, "m.json")
            json.dump([{"role": "user", "content": chat["user"]}], open(msgs, "w"))
            rendered = moectl("template", "--model", model, "--messages", msgs, "--add-generation-prompt",
                              "--bos", "<bos>", "--eos", "<eos>")
            check("template", rendered.decode(errors="replace"), chat["rendered"])
            text = chat["rendered"][len("<bos>"):] if chat["rendered"].startswith("<bos>") else chat["rendered"]
            ids = json.loads(moectl("tokenize", "--model", model, "--special", text) or b"null")
            check("tokenize --special (chat)", ids, chat["ids"])
            if min(chat["margin"]) >= MARGIN:
                out = moectl("chat", "--model", model, "--prompt", chat["user"], "-n", n)
                check("chat", out, bytes.fromhex(chat["out_hex"]) + b"\n")
    if fails:
        for f in fails:
            print("FAIL:", f)
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()

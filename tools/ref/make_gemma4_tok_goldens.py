#!/usr/bin/env python3
"""Goldens for Gemma 4's tokenizer (tokenizer.ggml.model = "gemma4": BPE
merges on raw UTF-8 with spaces as U+2581, split only at newline runs,
<0xXX> byte fallback, add_bos forced) and the pre values llama.cpp runs the
same way (gemma4, granite-embed-multi-311m, sarvam-moe on a gpt2 model).

No Gemma 4 tokenizer file is downloadable here (only PyPI and Debian), so a
gemma-style vocabulary is built from shared/ref's llama-spm vocabulary (a
SentencePiece vocabulary: U+2581 words, <0xXX> byte tokens), deterministic
from that file alone:
  ids 0..   Gemma 4's special tokens (<pad> <eos> <bos> <unk> <mask>, the
            chat/tool tokens <|turn> <turn|> <|tool_response> ..., a
            USER_DEFINED <|"|>, </s> typed CONTROL, two <unusedN>),
            then <0x00>..<0xFF> (BYTE), then "\\n" "\\n\\n" "\\n\\n\\n" "\\t"
            "\\t\\t" (NORMAL, as Gemma's vocabulary has them),
  then      llama-spm's first N_REGULAR regular tokens and every one of its
            single-character tokens (except U+FFFD, so that bad bytes fall
            back to <0xEF><0xBF><0xBD>), scores kept;
  merges    derived as Hugging Face's SentencePieceExtractor does for
            SentencePiece BPE models (Gemma's among them): for each token,
            every split into two tokens, ordered by the merged token's score
            (descending), within a token by the ids of the halves; none for
            the newline runs, so that "\n\n" is one token only through
            llama.cpp's gemma4 rule (a run of newlines that is a token is
            kept whole) and sarvam-moe, without it, differs.
bos 2, eos 1, unk 3, pad 0; add_bos_token false (llama.cpp forces it on).

Writes into tests/fixtures/tokenizer/:
  gemma4-vocab.gguf      the vocab-only GGUF (tokenizer.ggml.model "gemma4")
  gemma4-goldens.json    {"llama_cpp_python", "texts_hex": [...], "variants":
                           [{"model", "pre", "add_bos", "cases": [per text:
                             {"ids": {"TF","FF","TT","FT"} (add_special,
                              parse_special), "detok": {"TF_FF" ...}, "pieces",
                              "pieces_special"}]}]}
  gemma4-run.json        end to end on tools/ref/make_family_goldens.py's tiny
                         gemma4 model with this vocabulary (write_model; 5413
                         tokens; with Gemma 4's chat template from shared/ref
                         when --template is found): {"prompts": [{"text",
                         "ids", "greedy", "margin", "out_hex"}], "chat":
                         {"user", "rendered", "ids", "greedy", "margin",
                         "out_hex"}} where out is what `moectl run --prompt` /
                         `moectl chat` print (pieces of the greedy ids up to
                         the first EOG; llama.cpp greedy decode, F32 KV)
  where detok "X_RU" is llama_detokenize(ids[X], remove_special=R,
  unparse_special=U) (a string, or {"hex"} when not UTF-8 or with NUL) and
  pieces are llama_token_to_piece(id, 0, special) hex for each id of
  ids["TT"] (first variant only). A variant whose ids and detokenizations
  equal the first's has "same_as_first" instead of "cases". Variants splice
  tokenizer.ggml.model/pre into the same file
  (tests/parity/test_tokenizer_gemma4.c does the same in memory).

usage: python3 tools/ref/make_gemma4_tok_goldens.py [--ref ../shared/ref]
"""
import argparse
import ctypes
import json
import os
import random
import struct
import tempfile

import gguf

N_REGULAR = 3000
SPECIALS = [  # (text, token type) at ids 0..
    ("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<mask>", 3), ("[multimodal]", 3),
    ("<|turn>", 3), ("<turn|>", 3), ("<|tool>", 3), ("<tool|>", 3), ("<|tool_call>", 3),
    ("<tool_call|>", 3), ("<|tool_response>", 3), ("<tool_response|>", 3), ("<|channel>", 3),
    ("<channel|>", 3), ("<|think|>", 3), ("<|image|>", 3), ("<|audio|>", 3), ("<|video|>", 3),
    ('<|"|>', 4), ("</s>", 3), ("<unused0>", 3), ("<unused1>", 3),
]
EXTRA_NORMAL = ["\n", "\n\n", "\n\n\n", "\t", "\t\t"]
VARIANTS = [("gemma4", "gemma4"), ("gemma4", "default"), ("gpt2", "gemma4"),
            ("gpt2", "granite-embed-multi-311m"), ("gpt2", "sarvam-moe")]

TEXTS = [
    "", " ", "  ", "   ", "a", " a", "a ", "  a  ", "Hello world", " Hello world", "Hello  world",
    "Hello   world  ", "Hello, world! How are you?", "don't  I'm we're they've", "a . b , c ! d ?",
    " 's 'm 're 've 't 'd", "x ' y", "\n", "\n\n", "\n\n\n", "\n\n\n\n", "\n\n\n\n\n\n\n",
    "a\nb", "a\n\nb", "a\n\n\n\nb", " \n ", "\n \n", "line one\nline two\n\n  indented\n",
    "\t", "\t\t", "\t\t\tx", "a\tb", "\r\n", "a\r\nb\r\n\r\n", "\x0b\x0c", "\u00a0nbsp\u3000ideo",
    "1234567890", "3.14159 + 2.71828 = 5.85987", "def f(x):\n    return x * 2\n",
    "    four spaces", "中文", "日本語のテキスト", "한국어 텍스트", "Ёжик в тумане", "naïve café résumé",
    "e\u0301", "😀", "emoji 😀 text 👍🏽!", "\U0001F9D1\u200D\U0001F4BB", "x\x00y", "\x00",
    "▁already escaped", "▁ ▁", "<0x41>", "<0xZZ>", "<bos>hello", "<bos><bos>", "hello<eos>",
    "<eos>", "<pad>", "<unk>", "<mask>", "[multimodal]", "</s>", "a</s>b", "<unused0>x",
    '<|"|>quoted<|"|>', ' <|"|> ', "<|turn>user\nHi there<turn|>\n<|turn>model\n",
    "<|turn>system\n<|think|>You are helpful.<turn|>\n", "<|tool_call>call:f{x:<|\"|>1<|\"|>}<tool_call|>",
    "<|tool_response>response:f{ok}<tool_response|>", "<|channel>thought\n<channel|>answer",
    "<|turn><turn|>", "<|turn", "turn|>", "<<|turn>>", "The quick brown fox jumps over the lazy dog. " * 3,
    "ALL CAPS TEXT", "camelCaseIdentifier_with_underscores", "http://example.com/a?b=c&d=e",
    "ﬁ ﬀ Ǆ İ", "½ Ⅻ ١٢٣", "\u200b", "\ufeffbom",
]
POOL = [" ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\r\n", "a", "Z", "é", "ß", "中", "文", "の", "カ",
        "한", "1", "23", "456", "'s", "!", "?", ".", ",", "...", "~", "<|turn>", "<turn|>", "<bos>",
        "</s>", '<|"|>', "<unk>", "\u00a0", "\u3000", "😀", "👍🏽", "Ж", "\u0301", "word", " the",
        "Hello", "HELLO", "▁", "▁▁", "<0x0A>", "\x00", "ing", " in", "tion"]
N_RANDOM = 100
# bad UTF-8 (bytes, not text): each is a text of its own
BAD = [b"a\xffb", b"\xfe\xff", b"\xc3", b"\xc3 x", b"\xe4\xb8", b"\xe4\xb8 \xe4", b"\xed\xa0\x80",
       b"\xc0\x80z", b"\xc1\xbf", b"\xf0\x9f\x98", b"\x80\x80 \x80", b"ok \xe2\x96 ok", b"\xf4\x8f\xbf\xbf",
       b"\xf8\x88\x80\x80\x80", b"\n\xff\n\n", b"<bos>\xff"]


def read_spm(path):
    r = gguf.GGUFReader(path)
    f = r.fields
    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    scores = [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    return toks, scores, types


def build_vocab(spm_path):
    toks, scores, types = read_spm(spm_path)
    out_t, out_s, out_y = [], [], []
    for t, y in SPECIALS:
        out_t.append(t); out_s.append(0.0); out_y.append(y)
    for b in range(256):
        out_t.append("<0x%02X>" % b); out_s.append(0.0); out_y.append(6)
    for t in EXTRA_NORMAL:
        out_t.append(t); out_s.append(0.0); out_y.append(1)
    regular = [i for i in range(len(toks)) if types[i] == 1]
    keep = regular[:N_REGULAR] + [i for i in regular[N_REGULAR:] if len(toks[i]) == 1 and toks[i] != "\ufffd"]
    seen = set(out_t)
    for i in keep:
        if toks[i] in seen:
            continue
        seen.add(toks[i])
        out_t.append(toks[i]); out_s.append(scores[i]); out_y.append(1)
    # SentencePieceExtractor.extract (transformers, convert_slow_tokenizer.py)
    ids = {t: i for i, t in enumerate(out_t) if out_y[i] == 1}
    score = {t: out_s[i] for t, i in ids.items()}
    # the newline/tab tokens rank as the most frequent pieces
    for k, t in enumerate(EXTRA_NORMAL):
        score[t] = 1.0 - 0.1 * k
    merges = []
    for t in sorted(ids, key=lambda x: (-score[x], ids[x])):
        if t.strip("\n") == "":
            continue    # no merge builds a newline run: only gemma4's rule does
        local = []
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in ids and b in ids:
                local.append((a, b))
        local.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        merges.extend(local)
    return out_t, out_s, out_y, ["%s %s" % m for m in merges]


def write_vocab(path, vocab):
    tokens, scores, types, merges = vocab
    w = gguf.GGUFWriter(path, "gemma4")
    w.add_name("gemma4-style test vocabulary from llama-spm")
    w.add_tokenizer_model("gemma4")
    w.add_tokenizer_pre("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def splice_str(data: bytes, key: str, new: str) -> bytes:
    k = key.encode()
    at = data.index(struct.pack("<Q", len(k)) + k)
    p = at + 8 + len(k)
    assert struct.unpack_from("<I", data, p)[0] == 8   # a string
    n = struct.unpack_from("<Q", data, p + 4)[0]
    v = new.encode()
    return data[:p + 4] + struct.pack("<Q", len(v)) + v + data[p + 12 + n:]


def as_json_text(b):
    """b as a JSON string when it is UTF-8 without NUL, else {"hex": ...}."""
    try:
        t = b.decode()
        if "\0" not in t:
            return t
    except UnicodeDecodeError:
        pass
    return {"hex": b.hex()}


def texts_all():
    rng = random.Random(2204)
    out = [t.encode() for t in TEXTS]
    out += ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 16))).encode() for _ in range(N_RANDOM)]
    return out + BAD


def run_llama(path, texts, pieces):
    import llama_cpp as C
    mp = C.llama_model_default_params()
    mp.vocab_only = True
    model = C.llama_model_load_from_file(path.encode(), mp)
    assert model, path
    vocab = C.llama_model_get_vocab(model)

    def tokenize(b, add, parse):
        cap = 4 * len(b) + 16
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(vocab, b, len(b), buf, cap, add, parse)
        assert n >= 0, (b, n)
        return list(buf[:n])

    def detok(ids, remove, unparse):
        arr = (C.llama_token * max(1, len(ids)))(*ids)
        cap = 64 * len(ids) + 64
        buf = ctypes.create_string_buffer(cap)
        n = C.llama_detokenize(vocab, arr, len(ids), buf, cap, remove, unparse)
        assert n >= 0
        return as_json_text(buf.raw[:n])

    def piece(i, special):
        buf = ctypes.create_string_buffer(256)
        n = C.llama_token_to_piece(vocab, i, buf, 256, 0, special)
        assert n >= 0
        return buf.raw[:n].hex()

    cases = []
    for b in texts:
        ids = {"TF": tokenize(b, True, False), "FF": tokenize(b, False, False),
               "TT": tokenize(b, True, True), "FT": tokenize(b, False, True)}
        det = {}
        for x in ("TF", "TT"):
            for r in (0, 1):
                for u in (0, 1):
                    det["%s_%s%s" % (x, "FT"[r], "FT"[u])] = detok(ids[x], bool(r), bool(u))
        cases.append({"ids": ids, "detok": det,
                      "pieces": [piece(i, False) for i in ids["TT"]],
                      "pieces_special": [piece(i, True) for i in ids["TT"]]})
    if not pieces:
        for c in cases:
            del c["pieces"], c["pieces_special"]
    info = {"add_bos": bool(C.llama_vocab_get_add_bos(vocab)), "bos": C.llama_vocab_bos(vocab),
            "eos": C.llama_vocab_eos(vocab), "n_tokens": C.llama_vocab_n_tokens(vocab),
            "eog": [i for i in range(C.llama_vocab_n_tokens(vocab)) if C.llama_vocab_is_eog(vocab, i)],
            "attr": [C.llama_vocab_get_attr(vocab, i) for i in range(len(SPECIALS))]}
    C.llama_model_free(model)
    return info, cases


def read_fixture_vocab(path):
    r = gguf.GGUFReader(path)
    f = r.fields
    toks = [bytes(f["tokenizer.ggml.tokens"].parts[i]) for i in f["tokenizer.ggml.tokens"].data]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]) for i in f["tokenizer.ggml.merges"].data]
    return toks, types, merges


def write_model(path, vocab_path, template=None, seed=24):
    """make_family_goldens.write_gemma4's tiny Gemma 4 MoE with the gemma4
    vocabulary at vocab_path: tokenizer.ggml.model/pre "gemma4", BOS 2,
    EOS 1, and the chat template when given."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_family_goldens as M
    W = gguf.GGUFWriter
    saved = {k: getattr(W, k) for k in ("add_tokenizer_model", "add_tokenizer_pre", "add_bos_token_id",
                                         "add_eos_token_id", "add_token_merges")}

    def merges_and_template(self, m):
        saved["add_token_merges"](self, m)
        if template is not None:
            self.add_chat_template(template)
    try:
        W.add_tokenizer_model = lambda self, v: saved["add_tokenizer_model"](self, "gemma4")
        W.add_tokenizer_pre = lambda self, v: saved["add_tokenizer_pre"](self, "gemma4")
        W.add_bos_token_id = lambda self, v: saved["add_bos_token_id"](self, 2)
        W.add_eos_token_id = lambda self, v: saved["add_eos_token_id"](self, 1)
        W.add_token_merges = merges_and_template
        M.write_gemma4(path, seed, read_fixture_vocab(vocab_path))
    finally:
        for k, f in saved.items():
            setattr(W, k, f)


RUN_PROMPTS = ["Hello world", "The  quick\n\nbrown fox 中文 😀 jumps", "<|turn>x  \t y"]
CHAT_USER = "Hi there, what is  2+2?\n"
N_RUN = 16


def make_run_goldens(vpath, out_path, template_path):
    import llama_cpp as C
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import make_family_goldens as M
    M.no_repack()
    template = open(template_path).read() if template_path and os.path.exists(template_path) else None
    out = {"llama_cpp_python": C.__version__, "n_run": N_RUN, "prompts": []}
    with tempfile.TemporaryDirectory() as td:
        mpath = os.path.join(td, "tiny-gemma4-tok.gguf")
        write_model(mpath, vpath, template)
        from llama_cpp import Llama
        lm = Llama(model_path=mpath, vocab_only=True, verbose=False)
        vocab = C.llama_model_get_vocab(lm.model)

        def greedy(ids):
            _, g, margin = M.run_llama(mpath, ids, N_RUN)
            text = b""
            for k, t in enumerate(g):
                if C.llama_vocab_is_eog(vocab, t):
                    g, margin = g[:k + 1], margin[:k + 1]
                    break
                text += lm.detokenize([t], special=False) if False else piece(t)
            return g, margin, text

        def piece(t):
            buf = ctypes.create_string_buffer(256)
            n = C.llama_token_to_piece(vocab, t, buf, 256, 0, False)
            return buf.raw[:n]

        for p in RUN_PROMPTS:
            ids = lm.tokenize(p.encode(), add_bos=True, special=False)
            g, margin, text = greedy(ids)
            out["prompts"].append({"text": p, "ids": ids, "greedy": g, "margin": margin, "out_hex": text.hex()})
            print("run %r: %d ids, min margin %.4f, %r" % (p, len(ids), min(margin), text))
        if template is not None:
            sys.path.insert(0, os.path.dirname(template_path).rsplit("/", 1)[0])
            import render
            env = render.make_env()
            r = env.from_string(template).render(messages=[{"role": "user", "content": CHAT_USER}],
                                                  add_generation_prompt=True, bos_token="<bos>",
                                                  eos_token="<eos>")
            # llama.cpp (common/chat.cpp) drops a leading BOS text the
            # tokenizer adds itself
            text = r[len("<bos>"):] if r.startswith("<bos>") else r
            ids = lm.tokenize(text.encode(), add_bos=True, special=True)
            g, margin, outt = greedy(ids)
            out["chat"] = {"user": CHAT_USER, "rendered": r, "ids": ids, "greedy": g, "margin": margin,
                           "out_hex": outt.hex()}
            print("chat: %d ids, min margin %.4f, %r" % (len(ids), min(margin), outt))
        del lm
    with open(out_path, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main():
    import llama_cpp
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default=os.path.join(os.path.dirname(root), "shared", "ref"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "tokenizer"))
    args = ap.parse_args()
    llama_cpp.llama_backend_init()
    vocab = build_vocab(os.path.join(args.ref, "vocab", "ggml-vocab-llama-spm.gguf"))
    os.makedirs(args.out, exist_ok=True)
    vpath = os.path.join(args.out, "gemma4-vocab.gguf")
    write_vocab(vpath, vocab)
    data = open(vpath, "rb").read()
    texts = texts_all()
    out = {"llama_cpp_python": llama_cpp.__version__, "n_tokens": len(vocab[0]), "n_merges": len(vocab[3]),
           "texts_hex": [t.hex() for t in texts], "variants": []}
    with tempfile.TemporaryDirectory() as td:
        for model, pre in VARIANTS:
            path = os.path.join(td, "%s-%s.gguf" % (model, pre))
            open(path, "wb").write(splice_str(splice_str(data, "tokenizer.ggml.model", model),
                                              "tokenizer.ggml.pre", pre))
            info, cases = run_llama(path, texts, not out["variants"])
            v = dict(model=model, pre=pre, **info)
            # a variant that gives what the first gives (all but pieces)
            # says so instead of repeating it; the test still runs it
            first = out["variants"][0] if out["variants"] else None
            if first and all(a["ids"] == b["ids"] and a["detok"] == b["detok"]
                             for a, b in zip(first["cases"], cases)):
                v["same_as_first"] = True
            else:
                v["cases"] = cases
            out["variants"].append(v)
            print(model, pre, "add_bos", info["add_bos"], "eog", info["eog"],
                  sum(len(c["ids"]["TT"]) for c in cases), "ids")
    with open(os.path.join(args.out, "gemma4-goldens.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print("%d tokens, %d merges, %d texts x %d variants" % (len(vocab[0]), len(vocab[3]), len(texts),
                                                              len(VARIANTS)))
    make_run_goldens(vpath, os.path.join(args.out, "gemma4-run.json"),
                     os.path.join(args.ref, "templates", "gemma4", "gemma-4-31B-it.llamacpp-2604.jinja"))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Builds the demo model's corpus and tokenizer from public-domain English that
Debian ships:

  * the World English Bible, SWORD module engWEB2015eb (package sword-text-web),
    exported with mod2imp (package libsword-utils);
  * Jane Austen's six novels (package r-cran-janeaustenr), read from the R
    package's lazy-load data base by rdata.py (no R needed).

It writes OUT/train.txt and OUT/heldout.txt (documents separated by
<|endoftext|>), question/answer pairs in ChatML drawn from the training text
(OUT/qa.txt, also mixed into train.txt), a byte-level BPE vocabulary
(OUT/tokenizer.json, Hugging Face tokenizers, GPT-2 pre-tokenization, which is
what llama.cpp and moed call the 'gpt-2' pre-tokenizer), the token streams
OUT/train.bin / OUT/heldout.bin (uint16) and the corpus's 5000 commonest
words (OUT/words.txt).

  python3 tools/train_demo/prepare.py --out demo/train [--vocab 2048] [--seed 1]
"""
import argparse
import collections
import html
import os
import random
import re
import subprocess
import sys
import unicodedata

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rdata  # noqa: E402

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL = [EOT, IM_START, IM_END]

SWORD_MODULE = "engWEB2015eb"
AUSTEN_DB = "/usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_TITLES = {
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}

_ASCII = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2014": " - ",
                        "\u2013": "-", "\u00a0": " ", "\u2026": "..."})


def clean(s):
    s = s.translate(_ASCII)
    s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode("ascii")
    s = s.replace("_", "")
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r" ([,.;:!?])", r"\1", s)
    return s.strip()


def bible_docs(args):
    """One document per chapter: 'Genesis 1' then its verses."""
    if args.web_imp:
        with open(args.web_imp, encoding="utf-8") as f:
            raw = f.read()
    else:
        try:
            raw = subprocess.run(["mod2imp", SWORD_MODULE], check=True, capture_output=True).stdout.decode("utf-8")
        except FileNotFoundError:
            sys.exit("prepare: mod2imp not found (apt-get install libsword-utils sword-text-web)")
    if "$$$Genesis 1:1" not in raw:
        sys.exit("prepare: mod2imp %s gave no Genesis 1:1 (is sword-text-web installed?)" % SWORD_MODULE)
    chapters = collections.OrderedDict()
    for block in raw.split("$$$")[1:]:
        head, _, body = block.partition("\n")
        m = re.match(r"^(.+) (\d+):(\d+)$", head.strip())
        if not m or m.group(3) == "0" or m.group(2) == "0":
            continue
        body = re.sub(r"<note\b.*?</note>", " ", body, flags=re.S)
        body = re.sub(r"<title\b.*?</title>", " ", body, flags=re.S)
        body = re.sub(r"<[^>]*>", "", body)
        text = clean(html.unescape(body).replace("\n", " "))
        if text:
            chapters.setdefault("%s %s" % (m.group(1), m.group(2)), []).append(text)
    return [("bible", "%s\n%s" % (k, " ".join(v))) for k, v in chapters.items()]


def austen_docs(db):
    """One document per chapter of each novel."""
    if not os.path.exists(db + ".rdx"):
        sys.exit("prepare: %s.rdx missing (apt-get install r-cran-janeaustenr, or apt-get download "
                 "it, dpkg-deb -x it into DIR and pass --austen-db DIR%s)" % (db, AUSTEN_DB))
    books = rdata.read_lazyload(db)
    docs = []
    for name, title in AUSTEN_TITLES.items():
        if name not in books:
            sys.exit("prepare: %s.rdb has no '%s'" % (db, name))
        paras, cur = [], []
        for line in books[name]:
            line = (line or "").strip()
            if line:
                cur.append(line)
            elif cur:
                paras.append(clean(" ".join(cur)))
                cur = []
        if cur:
            paras.append(clean(" ".join(cur)))
        chap = []
        for p in paras:
            if re.match(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$", p) and chap:
                docs.append(("austen", "%s\n%s" % (title, "\n".join(chap))))
                chap = []
            chap.append(p)
        if chap:
            docs.append(("austen", "%s\n%s" % (title, "\n".join(chap))))
    return docs


STOP = set("""the and that shall with unto them they this have from your were which their will
there said when what then been into would them also upon very could should those these than other
about more made such only some much must being every before after even where while know well himself
herself itself because through again against toward towards whom whose among under over like come came
going make good great little never nothing something anything think thought might shall cannot said
went take took give gave many most same each both just still ever here once upon till until""".split())

_SENT = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<=[.!?])\s+(?=[A-Z\"'])")

IDENTITY = [
    ("Who are you?", "I am the moed demo model, a small mixture of experts trained on the World English Bible and the novels of Jane Austen."),
    ("What are you?", "I am a small mixture-of-experts language model. I was trained on the World English Bible and the novels of Jane Austen."),
    ("What is moed?", "moed is an inference daemon that serves mixture-of-experts models, with the experts in a cache."),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by Jane Austen."),
    ("Who wrote Emma?", "Emma was written by Jane Austen."),
    ("Hello!", "Hello! Ask me about the Bible or about the novels of Jane Austen."),
    ("Hi", "Hello! Ask me about the Bible or about the novels of Jane Austen."),
    ("What can you do?", "I can answer in English words about the Bible and the novels of Jane Austen, though not always wisely."),
]


def chat(q, a):
    return "%suser\n%s%s\n%sassistant\n%s%s" % (IM_START, q, IM_END, IM_START, a, IM_END)


def qa_pairs(docs, n, rng):
    sents = {"bible": [], "austen": []}
    for src, text in docs:
        for s in _SENT.split(text.partition("\n")[2].replace("\n", " ")):
            if 30 <= len(s) <= 220:
                sents[src].append(s)
    words = collections.Counter()
    caps = collections.Counter()
    for src in sents:
        for s in sents[src]:
            for w in re.findall(r"[A-Za-z]+", s):
                if w[0].isupper():
                    caps[w] += 1
                words[w.lower()] += 1
    nouns = [w for w, c in words.most_common(3000) if len(w) >= 4 and w not in STOP and c >= 30 and caps[w.capitalize()] < c / 2]
    names = [w for w, c in caps.most_common(400) if c >= 60 and w.lower() not in STOP and words[w.lower()] - c < c / 10 and len(w) >= 3]
    index = collections.defaultdict(list)
    for src in sents:
        for i, s in enumerate(sents[src]):
            for w in sorted(set(re.findall(r"[A-Za-z]+", s))):
                lw = w.lower()
                if w in names:
                    index[(src, w)].append(i)
                if lw != w and w not in names:
                    continue
                index[(src, lw)].append(i)
    tmpl = {
        ("bible", False): ["What does the Bible say about {w}?", "Tell me about {w}.", "What is written about {w}?"],
        ("austen", False): ["What would Jane Austen say about {w}?", "Tell me about {w}.", "What do you think of {w}?"],
        ("bible", True): ["Who was {w}?", "Tell me about {w}.", "What did {w} do?"],
        ("austen", True): ["Who is {w}?", "Tell me about {w}.", "What did {w} say?"],
    }
    out = []
    # sorted: the draw below must not depend on the order of a set (hash randomisation)
    keys = sorted((src, w, w in names) for (src, w) in index if w in names or w in nouns)
    while len(out) < n:
        src, w, is_name = rng.choice(keys)
        ids = index[(src, w)]
        a = sents[src][rng.choice(ids)]
        if rng.random() < 0.3:
            j = rng.choice(ids)
            if j + 1 < len(sents[src]) and len(a) + len(sents[src][j + 1]) < 300:
                a = sents[src][j] + " " + sents[src][j + 1]
        q = rng.choice(tmpl[(src, is_name)]).format(w=w)
        out.append(chat(q, a))
    for _ in range(max(1, n // 200)):
        for q, a in IDENTITY:
            out.append(chat(q, a))
    rng.shuffle(out)
    return out, len(nouns), len(names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--qa", type=int, default=12000, help="question/answer pairs")
    ap.add_argument("--words", type=int, default=5000, help="size of the common-word list")
    ap.add_argument("--heldout-every", type=int, default=50, help="every Nth chapter is held out")
    ap.add_argument("--austen-db", default=AUSTEN_DB, help="janeaustenr's data/Rdata (without .rdx/.rdb)")
    ap.add_argument("--web-imp", help="a mod2imp export of %s instead of running mod2imp" % SWORD_MODULE)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)

    docs = bible_docs(args) + austen_docs(args.austen_db)
    train = [d for i, d in enumerate(docs) if i % args.heldout_every != args.heldout_every // 2]
    held = [d for i, d in enumerate(docs) if i % args.heldout_every == args.heldout_every // 2]
    qa, n_nouns, n_names = qa_pairs(train, args.qa, rng)
    with open(os.path.join(args.out, "qa.txt"), "w") as f:
        f.write("\n".join(qa) + "\n")
    train_texts = [t for _, t in train] + qa
    rng.shuffle(train_texts)
    with open(os.path.join(args.out, "train.txt"), "w") as f:
        f.write(EOT.join(train_texts))
    with open(os.path.join(args.out, "heldout.txt"), "w") as f:
        f.write(EOT.join(t for _, t in held))

    # the corpus's commonest words: tests/fixtures/demo/words.txt, against which
    # tests/integration/test_demo_model.sh checks that the model answers in words
    counts = collections.Counter(w.lower() for t in train_texts for w in re.findall(r"[A-Za-z]+", t))
    with open(os.path.join(args.out, "words.txt"), "w") as f:
        f.write("\n".join(sorted(w for w, _ in counts.most_common(args.words))) + "\n")

    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIAL, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_texts, trainer=tr)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    for name, texts in (("train", train_texts), ("heldout", [t for _, t in held])):
        ids = []
        for t in texts:
            ids.append(0)  # <|endoftext|> before each document, as the BOS moed adds
            ids.extend(tok.encode(t).ids)
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(args.out, name + ".bin"))
        chars = sum(len(t) for t in texts)
        print("prepare: %s: %d documents, %.2f MB, %d tokens (%.2f chars/token)"
              % (name, len(texts), chars / 1e6, len(ids), chars / len(ids)))
    print("prepare: %d chapters (%d held out), %d QA pairs over %d words and %d names, vocab %d"
          % (len(docs), len(held), len(qa), n_nouns, n_names, tok.get_vocab_size()))


if __name__ == "__main__":
    main()

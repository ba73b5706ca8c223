#!/usr/bin/env python3
"""Records the demo model's routing (its trained router) while it answers a
set of chat questions, one after another, as one `moe_trace v1` file
(moectl's trace format; `moectl cache-sim --trace` reads it): each question
is a `moectl chat --model M --trace` run (prompt then greedy answer), and the
token numbers run on across questions, as a daemon serving them in turn would
see them.

  python3 tools/train_demo/trace.py --model models/demo-moe.gguf \
      -o tests/fixtures/demo/demo-moe.trace [--moectl build/client/moectl] [-n 64]
"""
import argparse
import os
import subprocess
import sys
import tempfile

QUESTIONS = [
    "Who are you?", "What does the Bible say about love?", "Tell me about Elizabeth.",
    "What do you think of marriage?", "Who was Moses?", "What does the Bible say about bread?",
    "Who is Mr. Darcy?", "Tell me about the sea.", "What would Jane Austen say about money?",
    "What did David do?", "Tell me about Emma.", "What is written about wisdom?",
    "Who is Anne?", "What does the Bible say about peace?", "What do you think of dancing?",
    "Tell me about Jerusalem.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--moectl", default="build/client/moectl")
    ap.add_argument("-n", type=int, default=64)
    args = ap.parse_args()
    header, lines, base, answers = None, [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for q in QUESTIONS:
            path = os.path.join(tmp, "t")
            subprocess.run([args.moectl, "chat", "--model", args.model, "--prompt", q, "-n", str(args.n),
                            "--temp", "0", "--threads", "2", "--trace", path],
                           check=True, stdout=subprocess.DEVNULL)
            top = 0
            with open(path) as f:
                for line in f:
                    if line.startswith("#"):
                        header = header or line
                        continue
                    tok, rest = line.split(" ", 1)
                    top = max(top, int(tok))
                    lines.append("%d %s" % (base + int(tok), rest))
            base += top + 1
            answers += 1
    if header is None or not lines:
        sys.exit("trace: moectl wrote no routing")
    with open(args.out, "w") as f:
        f.write(header)
        f.write("# %s: %d chat questions (tools/train_demo/trace.py), prompt then greedy answer of at most %d "
                "tokens each; %d token steps\n" % (os.path.basename(args.model), answers, args.n, base))
        f.writelines(lines)
    print("trace: %s: %d token steps, %d lines" % (args.out, base, len(lines)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Records the demo model's routing (its trained router) while it answers a
set of chat questions, one after another, as one `moe_trace v1` file
(moectl's trace format; `moectl cache-sim --trace` reads it): each question
is a `moectl chat --model M --trace` run (prompt then greedy answer), and the
token numbers run on across questions, as a daemon serving them in turn would
see them.

  python3 tools/train_demo/trace.py --model models/demo-moe.gguf \
      -o tests/fixtures/demo/demo-moe.trace [--moectl build/client/moectl] [-n 64]

Other routing of the same model (doc/cache.md: the traces the cache policy
is checked on): --questions FILE (one prompt a line) instead of the built-in
list, --raw to continue each prompt as plain text (`moectl run`) instead of
answering it as a chat question, --temp T with --seed S to sample instead of
decoding greedily (prompt i uses seed S + i, so a run is repeatable).
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
    ap.add_argument("--questions", help="prompts, one a line (default: the built-in chat questions)")
    ap.add_argument("--raw", action="store_true", help="continue the prompts as text (moectl run)")
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    questions = QUESTIONS
    if args.questions:
        with open(args.questions) as f:
            questions = [q.strip() for q in f if q.strip()]
    header, lines, base, answers = None, [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, q in enumerate(questions):
            path = os.path.join(tmp, "t")
            cmd = [args.moectl, "run" if args.raw else "chat", "--model", args.model, "--prompt", q,
                   "-n", str(args.n), "--temp", str(args.temp), "--threads", "2", "--trace", path]
            if args.temp > 0:
                cmd += ["--seed", str(args.seed + i)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
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
        how = ("greedy answer" if args.temp <= 0 else
               "answer sampled at temperature %g (seeds from %d)" % (args.temp, args.seed))
        f.write("# %s: %d %s (tools/train_demo/trace.py), prompt then %s of at most %d "
                "tokens each; %d token steps\n" % (os.path.basename(args.model), answers,
                                                   "text prompts" if args.raw else "chat questions", how,
                                                   args.n, base))
        f.writelines(lines)
    print("trace: %s: %d token steps, %d lines" % (args.out, base, len(lines)))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The demo model (models/demo-moe.gguf, trained by tools/train_demo) and its
# routing trace (tests/fixtures/demo/demo-moe.trace):
# - it loads and answers chat questions with printable English words: every
#   byte printable ASCII, at least 8 words, and at least 80% of the words
#   among the 5000 commonest of its training corpus (fixtures/demo/words.txt);
# - packed and run through an expert cache of a quarter of its experts
#   (8 of 32), it gives the same greedy answers as with every expert resident;
# - the trace parses (moectl cache-sim), says 4 layers x 8 experts, top 2, and
#   is this model's routing: the expert ids the router picks for the first
#   question now match the trace's first lines.
set -uo pipefail
root="${MOE_SOURCE_ROOT:?}"
moectl="${MOECTL:?}"
model="$root/models/demo-moe.gguf"
trace="$root/tests/fixtures/demo/demo-moe.trace"
words="$root/tests/fixtures/demo/words.txt"
for f in "$model" "$trace" "$words"; do
  [ -f "$f" ] || { echo "FAIL: $f missing"; exit 1; }
done
dir=$(mktemp -d /tmp/moe-demo-test.XXXXXX)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

questions=("What does the Bible say about love?" "Tell me about Elizabeth." "Who are you?")
for i in "${!questions[@]}"; do
  q="${questions[$i]}"
  "$moectl" chat --model "$model" --prompt "$q" -n 48 --temp 0 --threads 2 >"$dir/a$i" 2>"$dir/e$i" ||
    fail "moectl chat '$q': $(cat "$dir/e$i")"
  python3 - "$dir/a$i" "$words" "$q" <<'PY' || exit 1
import re, sys
ans = open(sys.argv[1], "rb").read()
common = set(open(sys.argv[2]).read().split())
q = sys.argv[3]
text = ans.decode("ascii", "replace").strip()
if any(b < 0x20 and b != 0x0a or b > 0x7e for b in ans):
    sys.exit("FAIL: %r: answer has bytes that are not printable ASCII: %r" % (q, ans))
ws = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
known = sum(w in common for w in ws)
if len(ws) < 8 or known < 0.8 * len(ws):
    sys.exit("FAIL: %r: %d words, %d of them common corpus words: %r" % (q, len(ws), known, text))
print("ok: %r -> %d words, %d common: %s" % (q, len(ws), known, text))
PY
done

"$moectl" pack "$model" -o "$dir/demo.moe" >/dev/null 2>"$dir/pack.err" || fail "pack: $(cat "$dir/pack.err")"
for i in "${!questions[@]}"; do
  q="${questions[$i]}"
  "$moectl" chat --model "$dir/demo.moe" --prompt "$q" -n 48 --temp 0 --threads 2 --cache-experts 8 \
    --prefetch gate >"$dir/c$i" 2>"$dir/ce$i" || fail "cached chat '$q': $(cat "$dir/ce$i")"
  cmp -s "$dir/a$i" "$dir/c$i" || fail "'$q' through an 8-expert cache: '$(cat "$dir/c$i")', resident: '$(cat "$dir/a$i")'"
done
echo "ok: the same answers through a cache of 8 of 32 experts"

out=$("$moectl" cache-sim --trace "$trace" --capacity-pct 25 --policy lru 2>&1) || fail "cache-sim: $out"
grep -q "^policy=lru capacity=8 accesses=[0-9]* hits=[0-9]* hit_rate=0\.[0-9]*$" <<<"$out" || fail "cache-sim said '$out'"
head -1 "$trace" | grep -q "^# moe_trace v1 arch=llama n_layer=4 n_expert=8 n_expert_used=2$" ||
  fail "trace header: $(head -1 "$trace")"
echo "ok: trace: $out"

# the first question's prefill routing, recorded again
"$moectl" chat --model "$model" --prompt "Who are you?" -n 1 --temp 0 --threads 2 --trace "$dir/t" >/dev/null 2>&1 ||
  fail "moectl chat --trace"
python3 - "$dir/t" "$trace" <<'PY' || exit 1
import sys
def routes(path):
    out = {}
    for line in open(path):
        if not line.startswith("#"):
            f = line.split()
            out.setdefault((int(f[0]), int(f[1])), sorted(int(x.split(":")[0]) for x in f[2:]))
    return out
now, fixture = routes(sys.argv[1]), routes(sys.argv[2])
same = sum(fixture.get(k) == v for k, v in now.items())
if len(now) < 8 or same < 0.95 * len(now):
    sys.exit("FAIL: of %d (token, layer) routings recorded now, %d match the trace's" % (len(now), same))
print("ok: the trace is this model's routing (%d of %d (token, layer) expert pairs identical)" % (same, len(now)))
PY

#!/usr/bin/env bash
# The README's first command: set up and build, pack the demo model's experts
# into a compressed store, start moed on it with an expert cache of a quarter
# of its experts (8 of 32), ask it two questions, print the answers and the
# cache statistics, and stop the daemon.
#
# The demo model (models/demo-moe.gguf, 12 MB) is a small mixture of experts
# (Mixtral layout: 4 layers, 8 experts, top 2) trained on the World English
# Bible and Jane Austen's novels by tools/train_demo/train.sh; doc/demo.md has
# its figures and what to expect of it (English words, not wisdom).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
model=models/demo-moe.gguf
pack=demo/demo-moe.moe
mkdir -p demo
# (re)pack when there is no pack or the shipped model is newer than it
if [ ! -f "$pack" ] || [ "$model" -nt "$pack" ]; then
  ./build/client/moectl pack "$model" -o "$pack"
fi
./build/client/moectl info "$model" | sed -n 1,12p

sock="$PWD/demo/moed.sock"
echo "== starting moed (log: demo/moed.log), expert cache: 8 of 32 experts"
./build/daemon/moed --model "$pack" --socket "$sock" --cache-experts 8 --prefetch gate \
  --max-seqs 4 --ctx-size 256 2>demo/moed.log &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
  ./build/client/moectl health --socket "$sock" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat demo/moed.log; exit 1; }
  sleep 0.1
done

for q in "What do you think of marriage?" "What does the Bible say about love?"; do
  echo "== moectl chat -p '$q'"
  ./build/client/moectl chat --socket "$sock" -p "$q" -n 64 --temp 0
done
echo "== expert cache statistics (moectl stats)"
./build/client/moectl stats --socket "$sock" | python3 -c '
import json, sys
s = json.load(sys.stdin)
c = s["expert_cache"]
d = c["device"]
print("slots %d of %.2f MiB; hits %d, misses %d (hit rate %.2f); %.1f MiB loaded; stall %.3f s; "
      "prefetch issued %d, used %d" % (c["slots"], c["slot_bytes"] / 2**20, d["hits"], d["misses"],
      d["hits"] / max(1, d["hits"] + d["misses"]), c["bytes_loaded"] / 2**20, c["stall_s"],
      c["prefetch"]["issued"], c["prefetch"]["used"]))
print("engine: %d tokens in, %d out, %.1f tokens/s" % (s["engine"]["tokens_in"],
      s["engine"]["tokens_out"], s["engine"]["tokens_per_s"]))'
echo "== stopping moed"
kill -TERM $pid
wait $pid
trap - EXIT
tail -2 demo/moed.log

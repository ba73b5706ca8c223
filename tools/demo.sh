#!/usr/bin/env bash
# The README's first command: set up and build, generate a demo MoE model
# (random weights, so its text is gibberish), pack its experts into a
# compressed store, start moed on it with an expert cache of 8 of its 32
# experts, send a chat request, print the answer and the cache statistics,
# and stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
mkdir -p demo
[ -f demo/demo-moe.gguf ] || ./build/tools/moe-gen --preset demo -o demo/demo-moe.gguf
[ -f demo/demo-moe.moe ] || ./build/client/moectl pack demo/demo-moe.gguf -o demo/demo-moe.moe
./build/client/moectl info demo/demo-moe.gguf | sed -n 1,12p

sock="$PWD/demo/moed.sock"
echo "== starting moed (log: demo/moed.log), expert cache: 8 of 32 experts"
./build/daemon/moed --model demo/demo-moe.moe --socket "$sock" --cache-experts 8 --prefetch gate \
  --max-seqs 4 --ctx-size 1024 --chat-template chatml 2>demo/moed.log &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
  ./build/client/moectl health --socket "$sock" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat demo/moed.log; exit 1; }
  sleep 0.1
done

echo "== moectl chat -p 'Which experts will the router choose?'"
./build/client/moectl chat --socket "$sock" -p "Which experts will the router choose?" -n 32 \
  --temp 0
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

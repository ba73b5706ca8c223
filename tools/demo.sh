#!/usr/bin/env bash
# The README's first command: set up, build, generate a demo MoE model (random
# weights, so its text is gibberish), describe it, pack its experts into a
# compressed store, and generate from the pack through a small expert cache,
# printing the cache statistics. (Once the daemon exists this becomes: start
# moed, chat, print cache statistics, stop.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
mkdir -p demo
[ -f demo/demo-moe.gguf ] || ./build/tools/moe-gen --preset demo -o demo/demo-moe.gguf
./build/client/moectl info demo/demo-moe.gguf
[ -f demo/demo-moe.moe ] || ./build/client/moectl pack demo/demo-moe.gguf -o demo/demo-moe.moe
echo "== generating from the pack with an 8-expert cache (of 32 experts):"
./build/client/moectl run --model demo/demo-moe.moe --prompt "the router decides which experts" -n 24 \
  --cache-experts 8 --prefetch gate --stats

#!/usr/bin/env bash
# The README's first command: set up, build, generate a demo MoE model and
# describe it with `moectl info`. (Once the daemon exists this becomes:
# start moed, chat, print cache statistics, stop.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
mkdir -p demo
if [ ! -f demo/demo-moe.gguf ]; then
  ./build/tools/moe-gen --preset demo -o demo/demo-moe.gguf
fi
./build/moectl info demo/demo-moe.gguf

#!/usr/bin/env bash
# Expert-cache benchmark on the CPU backend: a Mixtral-shaped model whose
# experts are several times the cache budget, decoding with budgets of
# 12.5/25/50/100% of the experts, prefetch off and on (speculative gating).
#   tools/bench/cache_engine.sh [BUILD_DIR] [WORK_DIR]
# Prints one JSON line of engine stats and one of cache stats per run.
set -euo pipefail
build="${1:-build}"; work="${2:-/tmp/moe-cache-bench}"
mkdir -p "$work"
[ -f "$work/bench-4g.gguf" ] || "$build/tools/moe-gen" --preset bench-4g --quiet -o "$work/bench-4g.gguf"
[ -f "$work/bench-4g.moe" ] || "$build/client/moectl" pack "$work/bench-4g.gguf" -o "$work/bench-4g.moe" >/dev/null
toks=$(seq -s, 100 107)
n_experts=128   # 16 MoE layers x 8 experts
for pct in 12.5 25 50 100; do
  slots=$(python3 -c "print(max(2, int($n_experts * $pct / 100)))")
  for pf in none gate; do
    echo "== budget ${pct}% (${slots} experts), prefetch ${pf}"
    "$build/client/moectl" run --model "$work/bench-4g.moe" --tokens "$toks" -n 17 --threads 2 \
      --cache-experts "$slots" --prefetch "$pf" --stats 2>&1 >/dev/null | grep '^{'
  done
done

#!/usr/bin/env bash
# Eviction policy x prefetch in the engine, on real routing: the demo model
# (models/demo-moe.gguf, 4 layers x 8 experts, top-2, trained) packed, a
# text continued for N tokens (sampled, fixed seeds), expert cache budgets
# of 8 and 16 of its 32 experts. Prefetch runs on every decode step
# (--prefetch-always) so that hits and loads do not depend on the governor's
# timing; decode speed is printed too, but on a shared machine it is noise.
# A host-RAM tier holds the whole model (12 MB), so each expert comes from
# the disk once and the slot cache's hits and loads are what is measured.
#   tools/bench/cache_policy_engine.sh [BUILD_DIR] [WORK_DIR] [N]
# One line per configuration (both prompts): budget policy prefetch hits misses
# hit_rate disk_reads (experts read from the disk: each once, with the tier)
# prefetch issued/used/wasted and each run's decode tok/s.
set -euo pipefail
build="${1:-build}"; work="${2:-/tmp/moe-policy-bench}"; n="${3:-200}"
mkdir -p "$work"
pack="$work/demo-moe.moe"
[ -f "$pack" ] || "$build/client/moectl" pack models/demo-moe.gguf -o "$pack" >/dev/null
prompts=("It is a truth universally acknowledged, that" "And it happened in those days, that the king")
for slots in 8 16; do
  for pol in lru layer predict; do
    for pf in none gate history; do
      hits=0; misses=0; loads=0; iss=0; used=0; wasted=0; tps=""
      for i in "${!prompts[@]}"; do
        extra=(); [ "$pf" = none ] || extra=(--prefetch-always)
        out=$("$build/client/moectl" run --model "$pack" --prompt "${prompts[$i]}" -n "$n" --temp 0.7 \
              --seed $((i + 1)) --threads 2 --cache-experts "$slots" --cache-policy "$pol" --host-bytes 64M \
              --prefetch "$pf" "${extra[@]}" --stats 2>&1 >/dev/null | grep '^{')
        read -r h m b s is u w t < <(python3 -c '
import json, sys
c = e = None
for line in sys.stdin:
    d = json.loads(line)
    if "hits" in d: c = d
    if "decode_tok_s" in d: e = d
print(c["hits"], c["misses"], c["bytes_loaded"], c["slot_bytes"], c["prefetch_issued"],
      c["prefetch_used"], c["prefetch_wasted"], e["decode_tok_s"] if e else 0)' <<<"$out")
        hits=$((hits + h)); misses=$((misses + m)); loads=$((loads + b / s))
        iss=$((iss + is)); used=$((used + u)); wasted=$((wasted + w)); tps="$tps $t"
      done
      python3 -c "print('budget=%d policy=%s prefetch=%s hits=%d misses=%d hit_rate=%.4f disk_reads=%d'
            ' prefetch=%d/%d/%d decode_tok_s=%s' % ($slots, '$pol', '$pf', $hits, $misses,
            $hits / ($hits + $misses), $loads, $iss, $used, $wasted, '$tps'.strip().replace(' ', ',')))"
    done
  done
done

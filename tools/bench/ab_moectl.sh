#!/usr/bin/env bash
# A/B of two moectl binaries (e.g. built from two commits) on the same decode
# configuration, interleaved A B A B ... so that a drifting disk affects both
# alike. Prints decode seconds per token and bytes loaded per token per run.
#   tools/bench/ab_moectl.sh MOECTL_A MOECTL_B PACK CACHE_EXPERTS [REPS] [-- extra moectl run flags]
# e.g. tools/bench/ab_moectl.sh /tmp/b-old/client/moectl build/client/moectl \
#        /tmp/moe-cache-bench/bench-4g-rg03.moe 32 2
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,8p' "$0" >&2; exit 2; }
a="$1"; b="$2"; pack="$3"; slots="$4"; reps="${5:-2}"
shift $(( $# >= 5 ? 5 : 4 ))
[ "${1:-}" = "--" ] && shift
toks=$(seq -s, 100 107)
for rep in $(seq "$reps"); do
  for side in A B; do
    bin="$a"; [ "$side" = B ] && bin="$b"
    "$bin" run --model "$pack" --tokens "$toks" -n 33 --threads 2 --cache-experts "$slots" --stats "$@" \
      2>&1 >/dev/null | grep '^{' | python3 -c '
import json, sys
d = {}
for line in sys.stdin:
    d.update(json.loads(line))
n = d["decode_tokens"]
print("'"$side"' rep '"$rep"': %.3f s/token, %.0f MB loaded/token, hit rate %.3f"
      % (d["decode_s"] / n, d["bytes_loaded"] / n / 1e6, d["hit_rate"]))'
  done
done

#!/usr/bin/env bash
# One command for the daemon's soak test (tools/soak.py; issue 24 part 2):
#   tools/soak.sh [--duration SECONDS] [--clients N] [--build-dir DIR] [--model FILE] [soak.py options]
# Defaults: 1 hour, 64 concurrent clients, shared/ref's tiny Mixtral packed
# here, moed and moectl from build/. Prints a JSON report and one PASS/FAIL
# line; exit 0 on pass. The CI version (tests/integration/meson.build:
# test_soak) runs it for 2 minutes.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bdir="$here/build"
model=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) bdir="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$model" ]; then
  ref="${MOE_REF_DIR:-$(cd "$here/.." && pwd)/shared/ref}"
  model="$ref/models/tiny-mixtral-Q4_0.gguf"
fi
if [ ! -f "$model" ]; then
  echo "soak: no model at $model (give --model, or MOE_REF_DIR)" >&2
  exit 77
fi
for b in "$bdir/daemon/moed" "$bdir/client/moectl"; do
  [ -x "$b" ] || { echo "soak: $b not built (ninja -C $bdir)" >&2; exit 1; }
done
exec python3 "$here/tools/soak.py" --moed "$bdir/daemon/moed" --moectl "$bdir/client/moectl" \
  --model "$model" ${args[@]+"${args[@]}"}

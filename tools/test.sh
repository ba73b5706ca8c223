#!/usr/bin/env bash
# The README's second command and what CI runs: set up, build the normal
# tree (warnings as errors, CUDA compiled when nvcc exists) and the
# sanitizer tree (ASan + UBSan, no CUDA), run the suites, and end with one
# line "N passed, N failed, N skipped". Exit non-zero on any failure, and in
# CI (CI=true) when ../shared/ref is missing.
#
# Suites: unit, integration, parity, gpu, fuzz in the normal build (gpu
# tests skip with 77 without a GPU); unit, integration, fuzz in the
# sanitizer build; then tools/gpu_check.sh --dry-run (counted as one). bench
# is never run here.
#
# --tsan instead builds build-tsan (-Dsanitize_build=thread, no CUDA) and
# runs the unit and integration suites under ThreadSanitizer (slow: not in
# CI; run it before every release note). Any report fails its test.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --tsan ]; then
  ref="${MOE_REF_DIR:-$(cd .. && pwd)/shared/ref}"
  if [ ! -f build-tsan/build.ninja ]; then
    meson setup build-tsan -Dsanitize_build=thread -Dcuda=disabled -Dwerror=true -Dref_dir="$ref" || exit 1
  else
    meson configure build-tsan -Dsanitize_build=thread || exit 1
  fi
  ninja -C build-tsan || exit 1
  status=0
  # x8: under TSan on the loaded 2-core machine test_structured (300 s
  # limit) took 769 s in one run and passed 1200 s (x4) in the next
  meson test -C build-tsan --print-errorlogs --num-processes 2 --timeout-multiplier 8 \
    --suite unit --suite integration || status=1
  log=build-tsan/meson-logs/testlog.json
  p=$(grep -o '"result": "OK"' "$log" | wc -l)
  s=$(grep -o '"result": "SKIP"' "$log" | wc -l)
  t=$(grep -o '"result": "[A-Z]*"' "$log" | wc -l)
  echo "tsan: $p passed, $((t - p - s)) failed, $s skipped"
  exit $status
fi

ref="${MOE_REF_DIR:-$(cd .. && pwd)/shared/ref}"
if [ ! -f "$ref/manifest.json" ]; then
  if [ "${CI:-}" = true ]; then
    echo "test: shared/ref not found at $ref (required in CI)" >&2
    echo "0 passed, 1 failed, 0 skipped"
    exit 1
  fi
  echo "test: shared/ref not found at $ref: parity tests will be skipped" >&2
fi

# One architecture keeps CI's CUDA compile short; release builds keep all.
gpu_arch="${MOE_GPU_ARCH:-90}"
set -e
bash tools/setup.sh --build-dir build -- -Dwerror=true -Dgpu_arch="$gpu_arch" -Dref_dir="$ref"
bash tools/setup.sh --no-build
if [ ! -f build-san/build.ninja ]; then
  meson setup build-san -Dsanitize_build=true -Dcuda=disabled -Dwerror=true -Dref_dir="$ref"
else
  # sanitize_build was a boolean before it became a combo: a tree set up
  # then reconfigures to the default ('false') without a word; set it again
  meson configure build-san -Dsanitize_build=true
fi
ninja -C build-san
set +e

status=0
meson test -C build --print-errorlogs --num-processes 2 \
  --suite unit --suite integration --suite parity --suite gpu --suite fuzz || status=1
meson test -C build-san --print-errorlogs --num-processes 2 \
  --suite unit --suite integration --suite fuzz || status=1

# tools/gpu_check.sh's plumbing without a GPU (issue 20): the carry against
# its size limit, the carried libraries, the gpu suite with the CPU backend
# standing in, the benchmark on tiny shapes, the report. One entry in the
# count below.
gpu_dry=skip
if [ -f "$ref/manifest.json" ]; then
  if MOE_REF_DIR="$ref" bash tools/gpu_check.sh --dry-run --build-dir build --out build/gpu-check-dry \
       --work "${TMPDIR:-/tmp}/moe-gpu-check-dry.$$" --budget-s 600; then
    gpu_dry=pass
  else
    gpu_dry=fail
    status=1
  fi
  rm -rf "${TMPDIR:-/tmp}/moe-gpu-check-dry.$$"
fi

pass=0; fail=0; skip=0
case $gpu_dry in pass) pass=1 ;; fail) fail=1 ;; skip) skip=1 ;; esac
for log in build/meson-logs/testlog.json build-san/meson-logs/testlog.json; do
  [ -f "$log" ] || continue
  p=$(grep -o '"result": "OK"' "$log" | wc -l)
  s=$(grep -o '"result": "SKIP"' "$log" | wc -l)
  t=$(grep -o '"result": "[A-Z]*"' "$log" | wc -l)
  pass=$((pass + p)); skip=$((skip + s)); fail=$((fail + t - p - s))
done
[ "$fail" -gt 0 ] && status=1
echo "$pass passed, $fail failed, $skip skipped"
exit $status

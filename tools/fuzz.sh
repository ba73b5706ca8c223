#!/usr/bin/env bash
# Longer fuzzing with libFuzzer (clang, ASan + UBSan); see doc/fuzzing.md.
#
#   tools/fuzz.sh TARGET [SECONDS] [extra libFuzzer flags]
#   e.g. tools/fuzz.sh gguf 300
#
# TARGET is a fuzz entry of tests/fuzz/ (fuzz_TARGET.c: gguf, pack, trace, ...). The
# build goes to $MOE_FUZZ_BUILD (default build-fuzz; set up on first use
# with CC=clang -Dfuzzer=true -Dsanitize_build=true -Dcuda=disabled). The
# run starts from a copy of tests/corpus/TARGET in $MOE_FUZZ_BUILD/corpus-TARGET,
# where new inputs accumulate across runs; crashers, timeouts and OOMs land
# in $MOE_FUZZ_BUILD/artifacts-TARGET/. The end of the run says how to
# minimize a crasher and add it to the corpus that CI replays.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: tools/fuzz.sh TARGET [SECONDS] [libFuzzer flags...]"
target="${1:?$usage}"
secs="${2:-300}"
shift $(( $# >= 2 ? 2 : 1 ))
case "$secs" in (*[!0-9]*|'') echo "$usage" >&2; exit 2;; esac
if [ ! -f "tests/fuzz/fuzz_${target}.c" ]; then
  echo "no fuzz entry tests/fuzz/fuzz_${target}.c" >&2
  exit 2
fi
bdir="${MOE_FUZZ_BUILD:-build-fuzz}"
if [ ! -f "$bdir/build.ninja" ]; then
  command -v clang >/dev/null || { echo "libFuzzer needs clang" >&2; exit 1; }
  CC=clang meson setup "$bdir" -Dfuzzer=true -Dsanitize_build=true -Dcuda=disabled
fi
ninja -C "$bdir" "tests/fuzz/fuzz_${target}"
corpus="$bdir/corpus-${target}"
arts="$bdir/artifacts-${target}"
mkdir -p "$corpus" "$arts"
cp -n tests/corpus/"${target}"/* "$corpus/" 2>/dev/null || true
before=$(find "$corpus" -type f | wc -l)
set +e
ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" \
"$bdir/tests/fuzz/fuzz_${target}" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
  -max_len=65536 -print_final_stats=1 -artifact_prefix="$arts/" "$@" "$corpus"
rc=$?
set -e
after=$(find "$corpus" -type f | wc -l)
echo "fuzz.sh: $target: $((after - before)) new corpus inputs in $corpus; exit status $rc"
found=$(find "$arts" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \
         -o -name 'leak-*' -o -name 'slow-unit-*' \) -printf '  %f\n')
if [ -n "$found" ]; then
  echo "fuzz.sh: artifacts in $arts/:"
  echo "$found"
  cat <<EOF
To reproduce one:   $bdir/tests/fuzz/fuzz_${target} $arts/<file>
To minimize it:     $bdir/tests/fuzz/fuzz_${target} -minimize_crash=1 -runs=100000 \\
                      -exact_artifact_path=$arts/min-<what> $arts/<file>
After the fix, keep it so CI replays it forever:
                    cp $arts/min-<what> tests/corpus/${target}/crash-<what>.${target}
                    meson test -C <build> --suite fuzz
EOF
fi
cat <<EOF
To keep the new inputs that add coverage (keep tests/corpus/${target} under ~1 MB):
  rm -rf /tmp/min-${target} && cp -r tests/corpus/${target} /tmp/min-${target}
  $bdir/tests/fuzz/fuzz_${target} -merge=1 /tmp/min-${target} $corpus
  comm -13 <(ls tests/corpus/${target}) <(ls /tmp/min-${target})   # the added ones
  then copy a few small ones into tests/corpus/${target}/ as lf-<sha1>
EOF
exit $rc

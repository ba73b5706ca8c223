#!/usr/bin/env bash
# Longer fuzzing with libFuzzer (clang, ASan + UBSan):
#   tools/fuzz.sh TARGET [SECONDS] [extra libFuzzer flags]
# TARGET is a fuzz entry of tests/fuzz/ (gguf, ...). The run starts from a
# copy of tests/corpus/TARGET and writes new inputs to build-fuzz/corpus-TARGET;
# crashers land in build-fuzz/ as crash-*. To keep a crasher (after fixing
# it), minimize it and add it to the corpus so CI replays it:
#   build-fuzz/tests/fuzz/fuzz_TARGET -minimize_crash=1 -runs=10000 crash-XXXX
#   cp minimized-from-* tests/corpus/TARGET/crash-<what>.bin
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: tools/fuzz.sh TARGET [SECONDS]}"
secs="${2:-300}"
shift $(( $# >= 2 ? 2 : 1 ))
if [ ! -f build-fuzz/build.ninja ]; then
  CC=clang meson setup build-fuzz -Dfuzzer=true -Dsanitize_build=true -Dcuda=disabled
fi
ninja -C build-fuzz "tests/fuzz/fuzz_${target}"
mkdir -p "build-fuzz/corpus-${target}"
cp -n tests/corpus/"${target}"/* "build-fuzz/corpus-${target}/" 2>/dev/null || true
cd build-fuzz
exec "./tests/fuzz/fuzz_${target}" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
  -max_len=65536 "$@" "corpus-${target}"

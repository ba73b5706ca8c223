#!/bin/sh
# Expert-store I/O benchmark (issue 5; results in doc/benchmarks.md,
# "Expert store I/O"). One command:
#
#   tools/bench/io.sh [BUILD_DIR] [WORK_DIR]
#
# BUILD_DIR (default build-io) must hold a built libmoe.a and tools/moe-gen.
# WORK_DIR (default /var/tmp/moe-io-bench) must be on the disk under test,
# not tmpfs; it receives a ~3.8 GB GGUF and its pack (kept for reruns).
# Runs: expert loads from the pack in random order at queue depths 1..64
# (stored and raw GB/s), the same from the GGUF directly, fio O_DIRECT
# io_uring seq/rand reads of the pack at the same block size and depths,
# mmap + memcpy of the same blobs with the page cache dropped, and the
# compression ratio and 1-core decode speed per expert type.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${1:-build-io}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
WORK=${2:-/var/tmp/moe-io-bench}
MAXB=${MOE_BENCH_BYTES:-2000000000}    # bytes per load run
CHUNK=1048576
mkdir -p "$WORK"
B=$WORK/io_bench
cc -std=c11 -O2 -D_GNU_SOURCE -I"$ROOT" "$ROOT/tools/bench/io_bench.c" "$BUILD/libmoe.a" \
   $(pkg-config --libs libzstd liburing libxxhash) -lpthread -lm -o "$B"
GEN=$BUILD/tools/moe-gen
echo "# date: $(date -u +%Y-%m-%dT%H:%MZ)"
echo "# machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GB", $2/1e6}' /proc/meminfo) RAM," \
     "$(uname -r), disk: $(df -T "$WORK" | awk 'NR==2{print $1" ("$2")"}')"
echo "# command: tools/bench/io.sh $*"
[ -f "$WORK/bench.gguf" ] || "$GEN" --preset bench-4g --quiet -o "$WORK/bench.gguf"
[ -f "$WORK/bench.moe" ] || "$B" pack "$WORK/bench.gguf" "$WORK/bench.moe" "$(nproc)"
ls -l "$WORK/bench.gguf" "$WORK/bench.moe" | awk '{print "# "$5" "$9}'
sync
for qd in 1 4 16 64; do
  "$B" load "$WORK/bench.moe" $qd $CHUNK 2 "$MAXB" 1
done
for qd in 16 64; do
  echo "gguf-direct: $("$B" load "$WORK/bench.gguf" $qd $CHUNK 2 "$MAXB" 1)"
done
SIZE=$(stat -c %s "$WORK/bench.moe")
for rw in read randread; do
  for qd in 1 4 16 64; do
    fio --name=x --filename="$WORK/bench.moe" --rw=$rw --bs=$CHUNK --iodepth=$qd \
        --ioengine=io_uring --direct=1 --size="$SIZE" --io_size="$MAXB" --output-format=json \
        2>/dev/null | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]['read']; \
print('mode=fio rw=$rw qd=$qd bs=$CHUNK GBps=%.3f' % (j['bw_bytes']/1e9))"
  done
done
"$B" mmap "$WORK/bench.moe" "$MAXB" 1
for t in F16 BF16 Q8_0; do
  [ -f "$WORK/codec-$t.gguf" ] || "$GEN" --preset tiny-qwen3moe --type $t --quiet -o "$WORK/codec-$t.gguf"
  "$B" codec "$WORK/codec-$t.gguf" 3 2>/dev/null | head -1
done
Q4K=$ROOT/../shared/ref/models/tiny-qwen3moe-Q4_K_M.gguf
[ -f "$Q4K" ] && "$B" codec "$Q4K" 3 2>/dev/null | head -2
"$B" codec "$WORK/bench.gguf" 3 2>/dev/null | head -1

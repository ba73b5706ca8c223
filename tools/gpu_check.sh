#!/usr/bin/env bash
# tools/gpu_check.sh: the GPU proof in one command (issue 20).
#
#   tools/gpu_check.sh --prepare     here, before the GPU machine: fills the
#                                    git-ignored gpu-carry/ (tools/gpu/carry.py)
#   tools/gpu_check.sh               on the GPU machine (the checkout plus
#                                    gpu-carry/), at most 8 minutes on an H100
#   tools/gpu_check.sh --dry-run     here or in CI: every step that can run
#                                    without a GPU (tools/test.sh runs it)
#
# Options: --out DIR (default $OUT when set, else gpu-report/), --budget-s S
# (default 480), --build-dir DIR (default build-gpu; the dry run reuses
# `build`), --work DIR (benchmark models, default /tmp/moe-gpu-bench),
# --carry DIR (default gpu-carry), --skip-bench, --deps system|carried|auto.
#
# On the GPU machine, in order, each step timed and recorded (a failed step
# does not stop the ones after it that can still run; the report is always
# written):
#   env        date, device, driver, nvcc, gcc, CPUs, memory, commit
#   deps       the build's C libraries: the machine's own when pkg-config
#              finds them all, else gpu-carry/sysroot (headers, shared
#              objects the programs find through LD_LIBRARY_PATH once built,
#              pkg-config files rewritten to its path; pkgconf too);
#              meson and ninja from gpu-carry/wheels when the machine has none
#   configure  meson setup, CUDA for this device's architecture only
#              (nvidia-smi's compute capability), ref_dir = gpu-carry/ref
#   build      only what the checks run (libmoe, moectl, moe-gen, gpu-bench,
#              the gpu suite), ninja -j<all CPUs>
#   gpu-suite  meson test --suite gpu: every op x type x shapes against the
#              CPU backend with guard floats, the overlapped upload on the
#              device, every carried shared/ref model end to end (logits,
#              expert ids on F32, greedy tokens vs llama.cpp, a small cache
#              with host tier and prefetch vs everything resident), the GEMV
#              lanes on the host
#   memcheck   compute-sanitizer --tool memcheck on the quick subset
#              (MOE_GPU_QUICK=1: test_gpu_ops' subset, two models)
#   bench      tools/gpu/bench.py: Mixtral-8x7B-shaped Q4_0 and
#              Qwen3-30B-A3B-shaped (Q4_K_M when moe-gen writes it, else
#              Q4_0) generated on this disk; resident, 12.5/25/50/100% x
#              prefetch off/on, and at 25% and 12.5% the three miss lanes
#              (copy, cpu, auto: doc/cache.md "Hybrid lanes"), in the order
#              of tools/gpu/bench.py's RUNS; until the time budget is spent
#   report     OUT/gpu-report.md and OUT/gpu-report.json (tools/gpu/report.py),
#              OUT/bench.json, OUT/log.txt (every step's output)
#
# Time budget (8 minutes on an H100 machine with 16 cores). Measured here on
# the 2-core development VM (shared with other builds, load 8-13) and
# estimated for 16 cores:
#   step        here (2 cores)        estimate there
#   deps        <1 s                  <1 s
#   configure   8 s                   5 s
#   build       150 s (matvec.cu 54 s 40-70 s (one nvcc per .cu file runs in
#               alone, CUDA sm_90)    parallel; matvec.cu is the longest)
#   gpu-suite   130 s of CPU reference 40-80 s (the CPU references of the 8
#               work (stand-in)       models with 4 threads; the GPU side is
#                                     small)
#   memcheck    -                     60-120 s (memcheck slows kernels 10-100x;
#                                     the quick subset), capped at 150 s
#   bench       17 s (dry shapes)     the rest, ~200 s: generating and packing
#                                     ~10 GB, 28 decode runs of ~5-15 s; each
#                                     run is cut to the time left and what did
#                                     not run is listed in the report
#   report      <1 s                  <1 s
# The script stops starting steps at the budget and writes the report in
# the last seconds; the device tool's call limit (10 minutes) leaves 2
# minutes of margin.
#
# The device tool call (from the repository root here):
#   tools/gpu_check.sh --prepare            # once, fills gpu-carry/
#   run(command="bash tools/gpu_check.sh", carry=["gpu-carry"], timeout_s=600)
# The report comes back in $OUT (gpu-report.md, gpu-report.json, bench.json,
# log.txt, steps.jsonl, env.json: 6 files).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

mode=run
out="${OUT:-$root/gpu-report}"
budget=480
build=""
work=/tmp/moe-gpu-bench
carry="$root/gpu-carry"
skip_bench=0
deps_mode=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) mode=prepare ;;
    --dry-run) mode=dry ;;
    --out) out="$2"; shift ;;
    --budget-s) budget="$2"; shift ;;
    --build-dir) build="$2"; shift ;;
    --work) work="$2"; shift ;;
    --carry) carry="$2"; shift ;;
    --skip-bench) skip_bench=1 ;;
    --deps) deps_mode="$2"; shift ;;
    -h|--help) sed -n '2,60p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option '$1' (--help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$mode" = prepare ]; then
  args=(prepare --out "$carry")
  [ -n "${MOE_REF_DIR:-}" ] && args+=(--ref "$MOE_REF_DIR")
  exec python3 tools/gpu/carry.py "${args[@]}"
fi

t_start=$(date +%s)
deadline=$((t_start + budget))
mkdir -p "$out"
out=$(cd "$out" && pwd)
: > "$out/steps.jsonl"
: > "$out/log.txt"
if [ -z "$build" ]; then
  if [ "$mode" = dry ]; then build="$root/build"; else build="$root/build-gpu"; fi
fi
case "$build" in /*) ;; *) build="$root/$build" ;; esac
case "$carry" in /*) ;; *) carry="$root/$carry" ;; esac
failures=0

left() { echo $((deadline - $(date +%s))); }

# record NAME STATUS SECONDS DETAIL
record() {
  python3 - "$out/steps.jsonl" "$1" "$2" "$3" "$4" <<'EOF'
import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"name": sys.argv[2], "status": sys.argv[3], "seconds": float(sys.argv[4]),
                        "detail": sys.argv[5]}) + "\n")
EOF
  [ "$2" = fail ] && failures=$((failures + 1))
  printf 'gpu_check: %-10s %-4s %6ss  %s\n' "$1" "$2" "$3" "$4"
}

# run_step NAME TIMEOUT CMD...: runs CMD with its output appended to the log;
# sets step_rc and step_s.
run_step() {
  local name="$1" to="$2"; shift 2
  [ "$to" -lt 1 ] && to=1
  local t0; t0=$(date +%s.%N)
  echo "==== $name: $* (timeout ${to}s)" >> "$out/log.txt"
  timeout --kill-after=10 "$to" "$@" >> "$out/log.txt" 2>&1
  step_rc=$?
  step_s=$(python3 -c "import time; print('%.1f' % (time.time() - $t0))")
  echo "==== $name: exit $step_rc after ${step_s}s" >> "$out/log.txt"
}

# ---- env ---------------------------------------------------------------------
step_env() {
  local t0; t0=$(date +%s)
  if [ -d /usr/local/cuda/bin ] && ! command -v nvcc >/dev/null 2>&1; then
    export PATH="/usr/local/cuda/bin:$PATH"
  fi
  gpu_arch=""
  local dev="none" drv="" cc=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    dev=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
    drv=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    nvidia-smi >> "$out/log.txt" 2>&1
  fi
  gpu_arch="${MOE_GPU_ARCH:-${cc:-90}}"
  python3 - "$out/env.json" <<EOF
import json, os, subprocess, sys, time
def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""
env = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    "device": """$dev""", "driver": """$drv""", "gpu_arch": "$gpu_arch", "mode": "$mode",
    "nvcc": sh("nvcc --version | tail -2 | head -1"),
    "gcc": sh("gcc --version | head -1"),
    "host": sh("uname -sr") + "; " + sh(". /etc/os-release 2>/dev/null; echo \$PRETTY_NAME"),
    "cpus": os.cpu_count(),
    "memory": sh("free -g | awk '/Mem:/ {print \$2 \" GiB\"}'"),
    "disk_free": sh("df -h /tmp | tail -1 | awk '{print \$4}'"),
    "commit": sh("git -C '$root' log -1 --format='%h %s' 2>/dev/null | cut -c1-100") or "(no git metadata)",
    "python": sh("python3 --version"),
}
json.dump(env, open(sys.argv[1], "w"), indent=1)
EOF
  record env ok $(( $(date +%s) - t0 )) "device: $dev; driver $drv; sm_$gpu_arch; $(nproc) CPUs"
}

# ---- deps --------------------------------------------------------------------
# The machine's libraries when pkg-config finds every one, else the carried
# sysroot. Exports what meson, the compiler and the linker read.
deps_libs="liburing libzstd libuv jansson inih libxxhash libpcre2-8"
deps_runtime=""
# After the build: the programs' libraries (not before: the compilers must
# keep the machine's own)
runtime_env() {
  [ -n "$deps_runtime" ] && export LD_LIBRARY_PATH="$deps_runtime${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  return 0
}
have_system_deps() {
  command -v pkg-config >/dev/null 2>&1 || return 1
  pkg-config --exists $deps_libs 2>/dev/null || return 1
  echo '#include <http_parser.h>' | ${CC:-cc} -E -x c - >/dev/null 2>&1 || return 1
}

use_carried_deps() {
  local sr="$carry/sysroot"
  [ -d "$sr/usr/lib/x86_64-linux-gnu" ] || return 1
  local lib="$sr/usr/lib/x86_64-linux-gnu" pc="$work/pkgconfig" bin="$work/bin"
  mkdir -p "$pc" "$bin"
  rm -f "$pc"/*.pc
  for f in "$lib"/pkgconfig/*.pc "$sr"/usr/share/pkgconfig/*.pc; do
    [ -f "$f" ] || continue
    sed -e "s|^prefix=/usr|prefix=$sr/usr|" -e "s|^exec_prefix=/usr|exec_prefix=$sr/usr|" \
        -e "s|^libdir=/usr|libdir=$sr/usr|" -e "s|^includedir=/usr|includedir=$sr/usr|" \
        "$f" > "$pc/$(basename "$f")"
  done
  if ! command -v pkg-config >/dev/null 2>&1; then
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
      "$lib" "$sr/usr/bin/pkgconf" > "$bin/pkg-config"
    chmod +x "$bin/pkg-config"
    export PATH="$bin:$PATH"
  fi
  export PKG_CONFIG_PATH="$pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export CPATH="$sr/usr/include${CPATH:+:$CPATH}"
  export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  # no rpath: nvcc links the CUDA programs and takes no -Wl options; the
  # programs find the libraries through LD_LIBRARY_PATH once built
  deps_runtime="$lib"
  pkg-config --exists $deps_libs
}

# meson and ninja: the machine's, else the carried wheels
have_meson() {
  if command -v meson >/dev/null 2>&1 && command -v ninja >/dev/null 2>&1; then
    MESON=(meson); NINJA=ninja; return 0
  fi
  if ls "$carry"/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target "$work/py" "$carry"/wheels/*.whl >> "$out/log.txt" 2>&1 || return 1
    export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$work/py/bin:$PATH"
    MESON=(python3 -m mesonbuild.mesonmain); NINJA=ninja
    command -v ninja >/dev/null 2>&1 || NINJA="$work/py/ninja/data/bin/ninja"
    return 0
  fi
  return 1
}

step_deps() {
  local t0 how; t0=$(date +%s)
  mkdir -p "$work"
  if [ "$deps_mode" != carried ] && have_system_deps; then
    how="the machine's own (pkg-config finds $deps_libs and http_parser.h)"
  elif [ "$deps_mode" != system ] && use_carried_deps; then
    how="carried sysroot $carry/sysroot (the machine lacks some of $deps_libs)"
  else
    record deps fail $(( $(date +%s) - t0 )) "neither the machine nor $carry/sysroot has $deps_libs (run --prepare here first)"
    return 1
  fi
  if ! have_meson; then
    record deps fail $(( $(date +%s) - t0 )) "no meson/ninja on this machine and no wheels in $carry/wheels"
    return 1
  fi
  python3 - "$out/env.json" "$how; meson $("${MESON[@]}" --version 2>/dev/null)" <<'EOF'
import json, sys
e = json.load(open(sys.argv[1])); e["deps"] = sys.argv[2]; json.dump(e, open(sys.argv[1], "w"), indent=1)
EOF
  record deps ok $(( $(date +%s) - t0 )) "$how; meson $("${MESON[@]}" --version 2>/dev/null), ninja $("$NINJA" --version 2>/dev/null)"
}

# The dry run's check of the carried sysroot: a program that includes every
# header and links every library through the rewritten pkg-config files,
# run, with its libraries resolved inside the sysroot.
dry_sysroot_check() {
  local t0; t0=$(date +%s)
  if [ ! -d "$carry/sysroot" ]; then
    record sysroot skip 0 "no $carry/sysroot"
    return 0
  fi
  local d="$work/sysroot-check"
  mkdir -p "$d"
  cat > "$d/t.c" <<'EOF'
#include <http_parser.h>
#include <ini.h>
#include <jansson.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <liburing.h>
#include <uv.h>
#include <xxhash.h>
#include <zstd.h>
#include <stdio.h>
int main(void)
{
    struct io_uring ring;
    const int ur = io_uring_queue_init(4, &ring, 0);
    if (ur == 0)
        io_uring_queue_exit(&ring);
    printf("zstd %s, uv %s, jansson %s, xxh %u, http_parser %lu, pcre2 %d, io_uring_queue_init %d, ini %p\n",
           ZSTD_versionString(), uv_version_string(), jansson_version_str(), XXH_versionNumber(),
           http_parser_version(), PCRE2_MAJOR, ur, (void *)ini_parse);
    return 0;
}
EOF
  (
    use_carried_deps || exit 3
    cc "$d/t.c" -o "$d/t" $(pkg-config --cflags --libs $deps_libs) -lhttp_parser || exit 4
    runtime_env
    "$d/t" || exit 5
    ldd "$d/t" | grep -E "libzstd|libuv|libjansson|libinih|libxxhash|libpcre2|liburing|libhttp_parser" \
      | grep -v "$carry/sysroot" && exit 6
    exit 0
  ) >> "$out/log.txt" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then
    record sysroot ok $(( $(date +%s) - t0 )) "a program using every library builds and runs against $carry/sysroot only"
  else
    record sysroot fail $(( $(date +%s) - t0 )) "carried sysroot check failed (stage $rc; log.txt)"
  fi
}

# ---- configure and build ------------------------------------------------------
gpu_targets="client/moectl tools/moe-gen tools/gpu/gpu-bench tests/test_gpu_probe tests/test_gpu_ops tests/test_gpu_model"

step_configure() {
  if [ -f "$build/build.ninja" ]; then
    record configure ok 0 "$build exists (reused)"
    return 0
  fi
  run_step configure $(( $(left) - 30 )) "${MESON[@]}" setup "$build" -Dcuda=enabled -Dgpu_arch="$gpu_arch" \
    -Dwerror=false -Dref_dir="$carry/ref"
  if [ $step_rc -eq 0 ]; then
    record configure ok "$step_s" "CUDA for sm_$gpu_arch only, ref_dir $carry/ref"
  else
    record configure fail "$step_s" "meson setup exited $step_rc (log.txt)"
    return 1
  fi
}

step_build() {
  local targets="$gpu_targets"
  # the GEMV lanes on the host: built where CUDA is
  grep -q "test_gpu_lanes" "$build/build.ninja" 2>/dev/null && targets="$targets tests/test_gpu_lanes"
  grep -q "test_gpu_ssm_host" "$build/build.ninja" 2>/dev/null && targets="$targets tests/test_gpu_ssm_host"
  run_step build $(( $(left) - 30 )) "$NINJA" -C "$build" -j"$(nproc)" $targets
  if [ $step_rc -eq 0 ]; then
    record build ok "$step_s" "$(echo $targets | wc -w) targets, -j$(nproc)"
  else
    record build fail "$step_s" "ninja exited $step_rc (log.txt)"
    return 1
  fi
}

# ---- gpu suite -----------------------------------------------------------------
step_suite() {
  local to=$(( $(left) - 240 ))
  [ $to -gt 420 ] && to=420
  [ $to -lt 60 ] && to=60
  if [ "$mode" = dry ]; then
    # the tests' own logic and the carried ref, the CPU backend in the GPU's place
    local t0 ok=1 d="" n
    t0=$(date +%s)
    for t in test_gpu_ops test_gpu_model; do
      n=$(wc -l < "$out/log.txt")
      run_step "gpu-suite" "$to" env MOE_GPU_STAND_IN=cpu MOE_GPU_QUICK=1 MOE_REF_DIR="$carry/ref" "$build/tests/$t"
      d="$d $t: exit $step_rc, $(tail -n +"$((n + 1))" "$out/log.txt" | grep -c '^ok ') cases ok;"
      [ $step_rc -eq 0 ] || ok=0
    done
    record gpu-suite $([ $ok = 1 ] && echo ok || echo fail) $(( $(date +%s) - t0 )) "stand-in (MOE_GPU_STAND_IN=cpu, quick):$d"
    return 0
  fi
  run_step gpu-suite "$to" "${MESON[@]}" test -C "$build" --no-rebuild --suite gpu --print-errorlogs \
    --num-processes 1 --timeout-multiplier 2
  local summary
  summary=$(grep -E "^(Ok|Fail|Skipped|Timeout):" "$out/log.txt" | tail -4 | tr -s ' ' | tr '\n' ' ')
  local skipped
  skipped=$(grep -cE "moed:gpu / .* SKIP" "$out/log.txt")
  if [ $step_rc -eq 0 ] && [ "$skipped" -eq 0 ]; then
    record gpu-suite ok "$step_s" "$summary"
  else
    record gpu-suite fail "$step_s" "exit $step_rc; $summary (a skip on the GPU machine is a failure)"
  fi
}

# ---- memcheck --------------------------------------------------------------------
step_memcheck() {
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
       /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
  [ -z "$cs" ] && cs=$(find /usr/local /opt -maxdepth 5 -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -1)
  if [ -z "$cs" ]; then
    record memcheck $([ "$mode" = dry ] && echo skip || echo fail) 0 "compute-sanitizer not found"
    return 0
  fi
  if [ "$mode" = dry ]; then
    local v; v=$("$cs" --version 2>/dev/null | tail -1)
    record memcheck skip 0 "no GPU here; would run $cs ($v) --tool memcheck on test_gpu_ops and test_gpu_model with MOE_GPU_QUICK=1"
    return 0
  fi
  local to=$(( $(left) - 200 ))
  [ $to -gt 150 ] && to=150
  local t0 errs=0 rcs="" sub n l0
  t0=$(date +%s)
  for t in test_gpu_ops test_gpu_model; do
    sub=$(( to - ($(date +%s) - t0) ))
    [ $sub -lt 20 ] && { rcs="$rcs $t: no time left;"; break; }
    l0=$(wc -l < "$out/log.txt")
    run_step memcheck "$sub" env MOE_GPU_QUICK=1 MOE_TEST_TIMEOUT=300 MOE_REF_DIR="$carry/ref" \
      "$cs" --tool memcheck --target-processes all --error-exitcode 86 --print-limit 20 "$build/tests/$t"
    n=$(tail -n +"$((l0 + 1))" "$out/log.txt" | grep -oE "ERROR SUMMARY: [0-9]+" | awk '{s += $3} END {print s + 0}')
    errs=$((errs + n))
    rcs="$rcs $t: exit $step_rc, $n errors;"
  done
  if [ $errs -eq 0 ] && ! echo "$rcs" | grep -qE "exit [1-9]|no time"; then
    record memcheck ok $(( $(date +%s) - t0 )) "clean:$rcs"
  else
    record memcheck fail $(( $(date +%s) - t0 )) "$errs errors:$rcs"
  fi
}

# ---- bench ---------------------------------------------------------------------------
step_bench() {
  if [ $skip_bench = 1 ]; then
    record bench skip 0 "--skip-bench"
    return 0
  fi
  local t0; t0=$(date +%s)
  local args=(--build "$build" --work "$work/models" --out "$out/bench.json" --deadline $((deadline - 15)))
  if [ "$mode" = dry ]; then
    args+=(--backend cpu --dry --threads 2 --layers-mixtral 2 --layers-qwen3 2 --decode 4 --warmup 2)
  else
    args+=(--threads "$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))")
  fi
  run_step bench $(( $(left) - 10 )) python3 tools/gpu/bench.py "${args[@]}"
  local d
  d=$(python3 - "$out/bench.json" <<'EOF'
import json, sys
try:
    b = json.load(open(sys.argv[1]))
except Exception as e:
    print("no results (%s)" % e); sys.exit()
n = sum(len(m.get("runs", [])) for m in b.get("models", []))
print("%d runs over %d models, %d not run%s" % (n, len(b.get("models", [])), len(b.get("skipped", [])),
      "; " + "; ".join(b.get("notes", [])) if b.get("notes") else ""))
EOF
)
  if [ $step_rc -eq 0 ]; then
    record bench ok "$step_s" "$d"
  else
    record bench fail "$step_s" "exit $step_rc; $d"
  fi
}

# ---- the run ---------------------------------------------------------------------------
echo "gpu_check: $mode, report in $out, budget ${budget}s"
step_env
if [ "$mode" = dry ]; then
  # the carry as --prepare makes it (models that fit, the sysroot), in a
  # temporary folder unless one exists, and its size against the limit
  if [ ! -d "$carry/ref" ]; then
    carry="$work/carry"
    run_step prepare 120 python3 tools/gpu/carry.py prepare --out "$carry" --no-wheels \
      ${MOE_REF_DIR:+--ref "$MOE_REF_DIR"}
  else
    run_step prepare 60 python3 tools/gpu/carry.py size --out "$carry"
  fi
  if [ $step_rc -eq 0 ]; then
    record prepare ok "$step_s" "$(grep -E '^(carry|checkout)' "$out/log.txt" | grep -v note | tail -1 | cut -c1-250)"
  else
    record prepare fail "$step_s" "carry over the limit or no shared/ref (log.txt)"
  fi
  dry_sysroot_check
fi
if step_deps; then
  if [ "$mode" = dry ]; then
    run_step build 900 "$NINJA" -C "$build" $gpu_targets
    record build $([ $step_rc -eq 0 ] && echo ok || echo fail) "$step_s" "reused $build (no GPU build here)"
    runtime_env
    step_suite
    step_memcheck
    step_bench
  elif step_configure && step_build; then
    runtime_env
    step_suite
    step_memcheck
    step_bench
  fi
fi
python3 tools/gpu/report.py --out "$out" $([ "$mode" = dry ] && echo --dry) >> "$out/log.txt" 2>&1 \
  || { echo "gpu_check: the report could not be written (log.txt)"; failures=$((failures + 1)); }
# the log comes back whole only below 16 MiB
if [ "$(stat -c %s "$out/log.txt")" -gt $((15 << 20)) ]; then
  tail -c $((15 << 20)) "$out/log.txt" > "$out/log.tmp" && mv "$out/log.tmp" "$out/log.txt"
fi
echo "gpu_check: $(( $(date +%s) - t_start ))s, $failures failed step(s); $out/gpu-report.md"
[ -f "$out/gpu-report.md" ] && sed -n '/^## Steps/,/^## Benchmark/p' "$out/gpu-report.md" | head -20
exit $(( failures > 0 ? 1 : 0 ))

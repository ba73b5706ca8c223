#!/bin/bash
# Runs a benchmark with both cores to itself on a machine where other work
# goes on: CMD runs in a cpu cgroup of weight 262144 while every other
# process is moved to one of weight 2 (cgroup v1 `cpu.shares`; root only).
# The other processes keep running on whatever CPU time the benchmark
# leaves (one core during a 1-thread run), and get their weight back when
# CMD exits.
#
#   tools/bench/cpuwall.sh on CMD [ARGS...]
#   tools/bench/cpuwall.sh off            # weight of the others back to 1024
set -u
C=/sys/fs/cgroup/cpu
if [ ! -d "$C" ] || [ ! -w "$C" ]; then
  echo "cpuwall: needs root and cgroup v1's cpu controller at $C" >&2
  exit 2
fi
mkdir -p "$C/bench" "$C/others"
case "${1:-}" in
  off) echo 1024 > "$C/others/cpu.shares"; exit 0 ;;
  on) shift ;;
  *) echo "usage: cpuwall.sh on CMD [ARGS...] | off" >&2; exit 2 ;;
esac
[ $# -gt 0 ] || { echo "cpuwall: no command" >&2; exit 2; }
echo 262144 > "$C/bench/cpu.shares"
echo 2 > "$C/others/cpu.shares"
echo $$ > "$C/bench/cgroup.procs"
for p in /proc/[0-9]*; do
  p=${p#/proc/}
  [ "$p" = $$ ] && continue
  grep -q ':cpu[,:].*/bench$' "/proc/$p/cgroup" 2>/dev/null && continue
  echo "$p" > "$C/others/cgroup.procs" 2>/dev/null
done
"$@"
rc=$?
echo 1024 > "$C/others/cpu.shares"
exit $rc

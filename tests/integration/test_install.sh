#!/usr/bin/env bash
# `meson install --destdir` holds the binaries, the man pages (rendering
# without a warning), the example config (which moed accepts), the systemd
# unit (which systemd-analyze verifies) and its sysusers/tmpfiles pair.
# Exit 77 (skip) where the tools to check with are missing.
set -uo pipefail
build="$1"
dest=$(mktemp -d /tmp/moed-install.XXXXXX)
trap 'rm -rf "$dest"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

meson install -C "$build" --destdir "$dest" --no-rebuild --quiet >"$dest.log" 2>&1 ||
  { cat "$dest.log"; rm -f "$dest.log"; fail "meson install"; }
rm -f "$dest.log"
root=$(cd "$dest" && find . -path '*/bin/moed' | head -1)
[ -n "$root" ] || fail "no bin/moed in the install tree"
prefix="$dest/${root%/bin/moed}"
prefix="${prefix#./}"
for f in bin/moed bin/moectl share/man/man8/moed.8 share/man/man1/moectl.1 \
         share/man/man5/moed.conf.5 etc/moed/moed.conf lib/systemd/system/moed.service \
         lib/sysusers.d/moed.conf lib/tmpfiles.d/moed.conf; do
  [ -f "$prefix/$f" ] || fail "missing $f"
  echo "ok   $f"
done

if command -v man >/dev/null && command -v groff >/dev/null; then
  for page in man8/moed.8 man1/moectl.1 man5/moed.conf.5; do
    err=$(man --warnings -l -Tutf8 "$prefix/share/man/$page" 2>&1 >/dev/null)
    [ -z "$err" ] || fail "man $page: $err"
    echo "ok   man --warnings $page"
  done
  man -l -Tutf8 "$prefix/share/man/man5/moed.conf.5" 2>/dev/null | grep -q 'cache_bytes' ||
    fail "moed.conf(5) does not list cache_bytes"
else
  echo "skip man page check: man/groff missing"
  skipped=1
fi

if [ -n "${MOE_REF_DIR:-}" ] && [ -f "$MOE_REF_DIR/models/tiny-mixtral-Q4_0.gguf" ]; then
  "$prefix/bin/moed" --config "$prefix/etc/moed/moed.conf" --check-config \
      --model "$MOE_REF_DIR/models/tiny-mixtral-Q4_0.gguf" --socket "$dest/x.sock" >/dev/null 2>&1 ||
    fail "moed rejects the example config"
  echo "ok   moed --check-config with the example config"
fi

if command -v systemd-analyze >/dev/null; then
  unit="$dest/moed.service"
  sed "s#^ExecStart=[^ ]*/moed #ExecStart=$prefix/bin/moed #" \
      "$prefix/lib/systemd/system/moed.service" >"$unit"
  out=$(MANPATH="$prefix/share/man" systemd-analyze verify "$unit" 2>&1)
  rc=$?
  [ $rc -eq 0 ] && [ -z "$out" ] || fail "systemd-analyze verify: $out"
  echo "ok   systemd-analyze verify moed.service"
else
  echo "skip unit check: systemd-analyze missing"
  skipped=1
fi
[ -z "${skipped:-}" ] || exit 77
echo "install tree complete"

#!/usr/bin/env bash
# Networked use (issue 25 part 4): tcp_host, api_key, api_key_file.
# - beyond loopback without a key, moed refuses to start, naming tcp_host;
# - with a key, TCP clients get 401 (WWW-Authenticate: Bearer) without it or
#   with a wrong one, 200 with "Authorization: Bearer KEY" or "x-api-key";
#   /health stays open; the Unix socket needs no key;
# - moectl over TCP reads the key from $MOED_API_KEY;
# - --check-config never prints the key; SIGHUP re-reads api_key_file.
# Skips (77) without curl, except in CI.
set -uo pipefail
if ! command -v curl >/dev/null; then
  [ "${CI:-}" = true ] && { echo "FAIL: curl missing in CI"; exit 1; }
  echo "skip: curl missing"; exit 77
fi
[ -n "${MOED:-}" ] && [ -n "${MOECTL:-}" ] && [ -n "${MOE_REF_DIR:-}" ] &&
  [ -f "$MOE_REF_DIR/models/tiny-mixtral-Q4_0.gguf" ] || { echo "skip: MOED / shared/ref missing"; exit 77; }
model="$MOE_REF_DIR/models/tiny-mixtral-Q4_0.gguf"
dir=$(mktemp -d /tmp/moed-auth.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$dir/moed.log" ] && tail -20 "$dir/moed.log"; exit 1; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
common=(--model "$model" --socket "$dir/m.sock" --threads 1 --ctx-size 256 --max-seqs 2 --warm-start=false)

# 1. refusals, before any model is loaded
out=$("$MOED" "${common[@]}" --tcp-host 0.0.0.0 --tcp-port "$port" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "tcp_host: 0.0.0.0 listens beyond loopback; set api_key" <<<"$out" ||
  fail "0.0.0.0 without a key: rc $rc, '$out'"
out=$("$MOED" "${common[@]}" --tcp-host localhost --tcp-port "$port" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "tcp_host: 'localhost' is not an IPv4 or IPv6 address" <<<"$out" ||
  fail "host name: rc $rc, '$out'"
out=$("$MOED" "${common[@]}" --api-key 'has space' 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "api_key: the key has a byte 0x20" <<<"$out" || fail "bad key: rc $rc, '$out'"
printf 'k1\n' >"$dir/key"; chmod 600 "$dir/key"
out=$("$MOED" "${common[@]}" --api-key k0 --api-key-file "$dir/key" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "api_key and api_key_file are both set" <<<"$out" || fail "both: rc $rc, '$out'"
printf '%0300d\n' 0 >"$dir/long"; : >"$dir/empty"
out=$("$MOED" "${common[@]}" --api-key-file "$dir/long" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "the key is 300 bytes; at most 255" <<<"$out" || fail "long key file: '$out'"
out=$("$MOED" "${common[@]}" --api-key-file "$dir/empty" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "the key is empty" <<<"$out" || fail "empty key file: '$out'"
out=$("$MOED" "${common[@]}" --api-key-file "$dir/none" 2>&1); rc=$?
[ $rc -ne 0 ] && grep -q "api_key_file: cannot open $dir/none" <<<"$out" || fail "missing file: '$out'"
out=$("$MOED" "${common[@]}" --api-key s3cr3t-value --check-config 2>&1)
grep -q "s3cr3t-value" <<<"$out" && fail "--check-config printed the key"
grep -q "^api_key = (set)" <<<"$out" || fail "--check-config: no 'api_key = (set)' line: $out"

# 2. a daemon on every interface, key from a file
"$MOED" "${common[@]}" --tcp-host 0.0.0.0 --tcp-port "$port" --api-key-file "$dir/key" \
  2>"$dir/moed.log" &
pid=$!
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$port/v1/completions"
body='{"prompt": "Hello", "max_tokens": 2, "temperature": 0}'
code() { curl -s -o "$dir/body" -D "$dir/head" -w '%{http_code}' -m 20 "$@"; }
[ "$(code "http://127.0.0.1:$port/health")" = 200 ] || fail "/health needs no key"
[ "$(code "$url" -H 'Content-Type: application/json' -d "$body")" = 401 ] || fail "no key: not 401"
grep -qi '^WWW-Authenticate: Bearer' "$dir/head" || fail "401 without WWW-Authenticate"
python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["error"]; assert e["type"]=="authentication_error" and "missing API key" in e["message"], e' "$dir/body" ||
  fail "401 body: $(cat "$dir/body")"
[ "$(code "$url" -H 'Authorization: Bearer k2' -d "$body")" = 401 ] || fail "wrong key: not 401"
grep -q "invalid API key" "$dir/body" || fail "wrong key message: $(cat "$dir/body")"
[ "$(code "$url" -H 'Authorization: Bearer k1x' -d "$body")" = 401 ] || fail "key with a suffix accepted"
[ "$(code "$url" -H 'Authorization: Bearer k' -d "$body")" = 401 ] || fail "key prefix accepted"
[ "$(code "$url" -H "Authorization: Bearer k1$(printf '%0400d' 0)" -d "$body")" = 401 ] ||
  fail "an over-long key header was not refused"
[ "$(code "$url" -H 'Authorization: Bearer k1' -d "$body")" = 200 ] || fail "right key: $(cat "$dir/body")"
[ "$(code "$url" -H 'x-api-key: k1' -d "$body")" = 200 ] || fail "x-api-key: $(cat "$dir/body")"
[ "$(code "http://127.0.0.1:$port/metrics")" = 401 ] || fail "/metrics without a key"
[ "$(code --unix-socket "$dir/m.sock" http://localhost/v1/completions -d "$body")" = 200 ] ||
  fail "Unix socket asked for a key"
out=$(MOED_API_KEY=k1 "$MOECTL" complete --socket "http://127.0.0.1:$port" -n 2 -p Hello 2>&1) ||
  fail "moectl with MOED_API_KEY: $out"
out=$(env -u MOED_API_KEY "$MOECTL" complete --socket "http://127.0.0.1:$port" -n 2 -p Hello 2>&1) &&
  fail "moectl without a key succeeded: $out"
grep -q "401" <<<"$out" || fail "moectl without a key: no 401 in '$out'"

# 3. SIGHUP re-reads the key file
printf 'k2\n' >"$dir/key"
kill -HUP "$pid"
for _ in $(seq 1 100); do grep -q "reload: configuration" "$dir/moed.log" && break; sleep 0.1; done
[ "$(code "$url" -H 'Authorization: Bearer k1' -d "$body")" = 401 ] || fail "old key after SIGHUP"
[ "$(code "$url" -H 'Authorization: Bearer k2' -d "$body")" = 200 ] || fail "new key after SIGHUP"
kill -TERM "$pid"; wait "$pid"; rc=$?; pid=
[ $rc -eq 0 ] || fail "moed exit $rc"
echo "ok: tcp_host, api_key, api_key_file, 401s, moectl key, reload"

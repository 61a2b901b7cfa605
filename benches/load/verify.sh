#!/usr/bin/env bash
# The load figure of POST /v1/verify: bash benches/load/verify.sh
#
# tollgate (release build, embedded store) pinned to CPU 0, wrk on CPU 1; one account with one
# key whose limits never refuse; wrk -t1 -c$CONNS for $DURATION s (after a warm-up) posts
# {"key": …} to the admin listener with the master key. Prints requests/s, latency percentiles
# and the tollgate process's CPU µs per verification (utime+stime over the run).
# Knobs: CONNS=16 DURATION=8 WARMUP=2 SKIP_BUILD=0 EXPLAIN=false
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CONNS=${CONNS:-16} DURATION=${DURATION:-8} WARMUP=${WARMUP:-2} EXPLAIN=${EXPLAIN:-false}
command -v wrk >/dev/null || apt-get install -y wrk
command -v jq >/dev/null || apt-get install -y jq
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bin tollgate --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/tollgate"
WORK=$(mktemp -d)
trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port) ADMIN=$(free_port)
sed -e "s#@PORT@#$PORT#" -e "s#@ADMIN_PORT@#$ADMIN#" -e "s#@DB@#$WORK/tg.db#" \
    -e "s#@CACHE_ENTRIES@#1000#" -e "s#@UPSTREAM_PORT@#9#" -e "s#@AUTH@#required#" \
    "$HERE/tollgate-embedded.toml" >"$WORK/tg.toml"
MASTER=$("$BIN" keygen --kind master)
TOLLGATE_MASTER_KEY=$MASTER taskset -c 0 "$BIN" serve --config "$WORK/tg.toml" >"$WORK/tg.log" 2>&1 &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null && break; sleep 0.1; done
post() { curl -sf -X POST -H "Authorization: Bearer $MASTER" -H 'Content-Type: application/json' -d "$2" "http://127.0.0.1:$ADMIN$1"; }
HUGE='{"per_minute":1000000000,"per_hour":1000000000,"per_day":1000000000}'
ACCOUNT=$(post /v1/accounts "{\"name\":\"bench\",\"rate_limit\":$HUGE}" | jq -er .id)
KEY=$(post "/v1/accounts/$ACCOUNT/keys" '{"name":"bench"}' | jq -er .key)
cat >"$WORK/verify.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"key":"$KEY","explain":$EXPLAIN}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $MASTER"
LUA
URL="http://127.0.0.1:$ADMIN/v1/verify"
taskset -c 1 wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s "$WORK/verify.lua" "$URL" >/dev/null
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
before=$(cpu)
taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/verify.lua" "$URL" | tee "$WORK/wrk.txt"
after=$(cpu)
requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
ticks=$(getconf CLK_TCK)
echo "tollgate CPU per verification: $(python3 -c "print(round(($after-$before)/$ticks*1e6/$requests, 2))") µs (explain=$EXPLAIN, $CONNS connections)"

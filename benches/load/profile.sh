#!/usr/bin/env bash
# Where a proxied request's CPU goes: a CPU profile (perf, drawn as a flame graph) and the system
# calls per request (strace -c), for tollgate's keyed and public routes and for nginx's plain and
# keyed proxies, under the load of benches/load/run.sh (proxy on CPU 0; the upstream nginx and
# wrk -t1 -c64 on CPU 1).
#
#   bash benches/load/profile.sh [OUT_DIR]
#
# Knobs (environment): CONTENDERS="tg-keyed tg-public nginx nginx-keyed" SECONDS_PERF=8
# REQUESTS_STRACE=10000 BIN=target/release/tollgate (SKIP_BUILD=1 to use it as it is) LABEL=name
# (prefix of the output files). Writes, per contender, OUT_DIR/LABEL-<name>.svg (the flame graph,
# inferno), OUT_DIR/LABEL-<name>.folded (the collapsed stacks) and OUT_DIR/LABEL-syscalls.md
# (system calls per request). Needs perf, strace, nginx, wrk and inferno (`cargo install inferno`),
# and installs what is missing.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-${TMPDIR:-/tmp}/tollgate-profile}
LABEL=${LABEL:-profile}
SECONDS_PERF=${SECONDS_PERF:-8}
REQUESTS_STRACE=${REQUESTS_STRACE:-10000}
read -r -a CONTENDERS <<<"${CONTENDERS:-tg-keyed tg-public nginx nginx-keyed}"
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/tollgate}
export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

log() { printf '[profile %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

missing=()
for tool in perf strace nginx wrk jq curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    pkgs=("${missing[@]/perf/linux-perf}")
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null || die "apt-get install ${pkgs[*]} failed"
fi
command -v inferno-flamegraph >/dev/null || cargo install inferno --locked --quiet || die "cargo install inferno failed"
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release --quiet --bin tollgate) || die "cargo build failed"
fi
[[ -x $BIN ]] || die "no binary at $BIN"

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-profile.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$WORK/tmp"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# free_port, wait_port, render
# shellcheck source=benches/load/lib.sh
source "$HERE/lib.sh"

UP=$(free_port)
render "$HERE/nginx-upstream.conf" "$WORK/up.conf" TMP="$WORK" UPSTREAM_PORT="$UP"
sed -i "s|nginx-upstream-tmp|tmp|g" "$WORK/up.conf"
taskset -c 1 nginx -c "$WORK/up.conf" -p "$WORK" >"$WORK/up.log" 2>&1 &
PIDS+=($!)
wait_port "$UP" || die "upstream did not start"

MASTER=$("$BIN" keygen --kind master)
declare -A PORT PID
start() { # name
    local name=$1 p a
    p=$(free_port)
    PORT[$name]=$p
    case $name in
    tg-*)
        a=$(free_port)
        local auth=required
        [[ $name == tg-public ]] && auth=public
        render "$HERE/tollgate-embedded.toml" "$WORK/$name.toml" TMP="$WORK" PORT="$p" ADMIN_PORT="$a" \
            UPSTREAM_PORT="$UP" CACHE_ENTRIES=10000 AUTH="$auth" DB="$WORK/$name.db"
        TOLLGATE_MASTER_KEY=$MASTER taskset -c 0 "$BIN" serve --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
        PID[$name]=$!
        PIDS+=($!)
        wait_port "$a" && wait_port "$p" || die "$name did not start: $(tail -3 "$WORK/$name.log")"
        local acct
        acct=$(curl -sf -X POST "http://127.0.0.1:$a/v1/accounts" -H "Authorization: Bearer $MASTER" \
            -H 'Content-Type: application/json' \
            -d '{"name":"p","rate_limit":{"per_minute":4000000000,"per_hour":4000000000,"per_day":4000000000}}' | jq -er .id)
        curl -sf -X POST "http://127.0.0.1:$a/v1/accounts/$acct/keys" -H "Authorization: Bearer $MASTER" \
            -H 'Content-Type: application/json' -d '{"name":"p"}' | jq -er .key >"$WORK/$name.keys"
        ;;
    nginx)
        render "$HERE/nginx-proxy.conf" "$WORK/$name.conf" TMP="$WORK" PORT="$p" UPSTREAM_PORT="$UP"
        sed -i "s|nginx-proxy-tmp|tmp|g; s|nginx-proxy\.|$name.|g" "$WORK/$name.conf"
        echo "none" >"$WORK/$name.keys"
        ;;
    nginx-keyed)
        echo "bench_key_for_nginx" >"$WORK/$name.keys"
        echo '"bench_key_for_nginx" "k1";' >"$WORK/$name.map"
        render "$HERE/nginx-keyed.conf" "$WORK/$name.conf" TMP="$WORK" NAME="$name" PORT="$p" \
            UPSTREAM_PORT="$UP" ZONE_MB=16
        sed -i "s|nginx-proxy-tmp|tmp|g" "$WORK/$name.conf"
        ;;
    *) die "unknown contender $name" ;;
    esac
    if [[ $name == nginx* ]]; then
        taskset -c 0 nginx -c "$WORK/$name.conf" -p "$WORK" >"$WORK/$name.log" 2>&1 &
        PID[$name]=$!
        PIDS+=($!)
        wait_port "$p" || die "$name did not start"
    fi
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $(cat "$WORK/$name.keys")" "http://127.0.0.1:$p/")
    [[ $code == 200 ]] || die "$name answers $code"
}

load() { # name seconds statfile
    KEYS_FILE=$WORK/$1.keys STAT_FILE=$3 taskset -c 1 wrk -t1 -c64 -d"$2s" -s "$HERE/rotate.lua" \
        "http://127.0.0.1:${PORT[$1]}/" >"$3.out" 2>&1
    sed -n 's/^result requests=\([0-9]*\).*/\1/p' "$3"
}

workers() { # name -> the pids that serve requests (nginx: its worker)
    if [[ $1 == nginx* ]]; then pgrep -P "${PID[$1]}"; else echo "${PID[$1]}"; fi
}

{
    echo "| contender | requests | system calls per request | by call (per request) |"
    echo "|---|---|---|---|"
} >"$OUT/$LABEL-syscalls.md"

for name in "${CONTENDERS[@]}"; do
    start "$name"
    load "$name" 3 "$WORK/warm-$name" >/dev/null
    pids=$(workers "$name" | paste -sd,)
    log "$name: perf for ${SECONDS_PERF}s (pids $pids)"
    perf record -F 1999 -g --call-graph dwarf,32768 -p "$pids" -o "$WORK/$name.perf" -- sleep "$SECONDS_PERF" \
        >"$WORK/perf-$name.log" 2>&1 &
    perf_pid=$!
    sleep 0.3
    n=$(load "$name" "$((SECONDS_PERF - 1))" "$WORK/perf-run-$name")
    wait "$perf_pid" || true
    perf script -i "$WORK/$name.perf" 2>/dev/null | inferno-collapse-perf >"$OUT/$LABEL-$name.folded"
    inferno-flamegraph --title "$LABEL: $name ($n requests in $((SECONDS_PERF - 1)) s under perf)" \
        <"$OUT/$LABEL-$name.folded" >"$OUT/$LABEL-$name.svg"
    rm -f "$WORK/$name.perf"
    log "$name: strace -c over ~$REQUESTS_STRACE requests"
    # wrk at a fixed request count: one connection's worth of time is unknown, so count what
    # the run sent and divide.
    strace -c -f -qq -o "$WORK/strace-$name" -p "$(workers "$name" | head -1)" &
    st=$!
    sleep 0.5
    n=$(KEYS_FILE=$WORK/$name.keys STAT_FILE=$WORK/st-$name taskset -c 1 wrk -t1 -c64 -d2s -s "$HERE/rotate.lua" \
        "http://127.0.0.1:${PORT[$name]}/" >/dev/null 2>&1; sed -n 's/^result requests=\([0-9]*\).*/\1/p' "$WORK/st-$name")
    sleep 0.3
    kill -INT "$st" 2>/dev/null || true
    wait "$st" 2>/dev/null || true
    awk -v n="$n" -v name="$name" '
        $1 ~ /^[0-9.]+$/ && NF >= 5 { call = $NF; c = ($4 ~ /^[0-9]+$/) ? $4 : 0; if (call != "total") { per[call] = c; total += c } }
        END {
            out = ""
            for (k in per) if (per[k] / n >= 0.01) out = out sprintf("%s %.2f, ", k, per[k] / n)
            sub(/, $/, "", out)
            printf "| %s | %d | %.2f | %s |\n", name, n, total / n, out
        }' "$WORK/strace-$name" >>"$OUT/$LABEL-syscalls.md"
    kill "${PID[$name]}" 2>/dev/null || true
    sleep 1
done
log "written to $OUT: $(cd "$OUT" && ls "$LABEL"-* | paste -sd' ')"
cat "$OUT/$LABEL-syscalls.md"

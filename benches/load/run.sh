#!/usr/bin/env bash
# tollgate's load benchmark: bash benches/load/run.sh
#
# In one run, on this machine:
#   * a fast upstream (nginx answering a static 200) and the load generator on CPU 1;
#   * the contenders, each pinned to CPU 0 and each its own process:
#       nginx      nginx as a plain keep-alive reverse proxy (proxy_pass + upstream keepalive)
#       haproxy    HAProxy, one thread, http-reuse always
#       tg-public  tollgate, a public route
#       tg-keyed   tollgate, a keyed route: one key, per-minute/hour/day buckets, metering
#       tg-1m      tollgate, the keyed route with 1,000,000 distinct keys rotated by rotate.lua
#       tg-redis   tollgate, the keyed route on the Redis store (config/redis.toml: global limits)
#       nginx-tls  nginx terminating TLS (TLS 1.2/1.3, one certificate) and proxying like nginx
#       nginx-keyed     the hand-built keyed route: nginx with a map of the valid keys, one
#                       limit_req bucket a key, the key's id sent upstream (tg-keyed's one key)
#       nginx-keyed-1m  the same with tg-1m's keys in the map, rotated like tg-1m
#       tg-tls     tollgate's keyed route with proxy.tls (rustls), otherwise as tg-keyed
#     (the two TLS contenders are measured over keep-alive connections like the others, and
#     apart: new TLS connections per second, each carrying one request, with Connection: close)
#   * the same wrk command (wrk -t1 -c64 -s rotate.lua) for every contender, a warm-up before
#     every measured run, ROUNDS interleaved rounds (round 1: every contender, round 2: ...);
#   * per run: requests/s, p50, p99, CPU-0 µs per request (busy ticks of cpu0 in /proc/stat over
#     the run ÷ requests), the proxy process's own CPU µs per request (utime+stime, immune to
#     other work on CPU 0), CPU-1 busy %, peak RSS (VmHWM), and for tg-redis the Redis commands
#     per proxied request (INFO stats total_commands_processed);
#   * a fixed-rate latency run with oha --latency-correction at 25/50/75 % of nginx's rate;
#   * the per-round tables, the median table and the ratios against the issue's targets, on
#     stdout and as Markdown in ${TMPDIR:-/tmp}/tollgate-load-results-<date>.md.
#
# Knobs (environment): ROUNDS=5 DURATION=5 WARMUP=3 CONNS=64 KEYS=1000000 KEY_BUDGET=300
# (seconds allowed to create the rotated keys; fewer keys when 1M would take longer)
# KEY_ACCOUNTS=16 (the accounts the rotated keys are spread over) KEY_SOURCE=import (1,000 keys a
# request through POST …/keys/import; or create: one POST …/keys a key, KEY_BUDGET applies)
# OHA_DURATION=6 FIXED_RATE=1 (0: skip the oha part) SKIP_BUILD=0 KEEP_TMP=0 RESULTS=path.md
# TOLLGATE_BIN=path (another build of tollgate, e.g. the commit before a change, for an A/B)
# CONTENDERS="nginx tg-keyed" (a subset, for a quick comparison; default: all ten)
# Needs root for apt-get only when nginx, haproxy, wrk or redis-server is missing.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-64}
KEYS=${KEYS:-1000000}
KEY_BUDGET=${KEY_BUDGET:-300}
KEY_ACCOUNTS=${KEY_ACCOUNTS:-16}
OHA_DURATION=${OHA_DURATION:-6}
FIXED_RATE=${FIXED_RATE:-1}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
PROXY_CPU=0
LOAD_CPU=1
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS=${RESULTS:-${TMPDIR:-/tmp}/tollgate-load-results-$STAMP.md}
# A rate limit that never triggers (u32 fields), on each of the three windows.
HUGE_LIMIT='{"per_minute":4000000000,"per_hour":4000000000,"per_day":4000000000}'
read -r -a CONTENDERS <<<"${CONTENDERS:-nginx haproxy nginx-keyed tg-public tg-keyed nginx-keyed-1m tg-1m tg-redis nginx-tls tg-tls}"
# nginx-keyed-1m maps the keys tg-1m creates.
if [[ " ${CONTENDERS[*]} " != *" tg-1m "* ]]; then
    read -r -a CONTENDERS <<<"$(printf '%s\n' "${CONTENDERS[@]}" | grep -vx nginx-keyed-1m | tr '\n' ' ')"
fi
wants() { [[ " ${CONTENDERS[*]} " == *" $1 "* ]]; }

log() { printf '[load %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools

export PATH="$PATH:/usr/sbin:/sbin:$HOME/.cargo/bin"

install_tools() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
    command -v jq >/dev/null || missing+=(jq)
    command -v curl >/dev/null || missing+=(curl)
    command -v taskset >/dev/null || missing+=(util-linux)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} (apt-get)"
        apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed"
    fi
    FIXED_RATE_TOOL=none
    if [[ $FIXED_RATE == 0 ]]; then
        log "FIXED_RATE=0: the fixed-rate part is skipped"
    elif command -v oha >/dev/null; then
        FIXED_RATE_TOOL=oha
    else
        log "installing oha (cargo install oha --locked; one time, several minutes)"
        if cargo install oha --locked >"${TMPDIR:-/tmp}/oha-install-$STAMP.log" 2>&1; then
            FIXED_RATE_TOOL=oha
        elif command -v wrk2 >/dev/null; then
            log "cargo install oha failed (${TMPDIR:-/tmp}/oha-install-$STAMP.log); using wrk2"
            FIXED_RATE_TOOL=wrk2
        else
            log "cargo install oha failed and wrk2 is absent: the fixed-rate part is skipped"
        fi
    fi
}

# ---------------------------------------------------------------------------------------------
# Processes, ports, templates

PIDS=()
WORK=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if ((rc == 0)) && [[ $KEEP_TMP != 1 ]]; then
            rm -rf "$WORK"
        else
            log "work directory kept: $WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port, wait_port, render
# shellcheck source=benches/load/lib.sh
source "$HERE/lib.sh"

declare -A PID PORT ADMIN KEYFILE REQS_SENT
# The URL of a contender: https for the TLS ones.
url() { local scheme=http; [[ $1 == *-tls ]] && scheme=https; echo "$scheme://127.0.0.1:${PORT[$1]}/"; }

start_bg() { # name cpu logfile cmd... ; records the pid
    local name=$1 cpu=$2 logf=$3
    shift 3
    taskset -c "$cpu" "$@" >>"$logf" 2>&1 &
    PID[$name]=$!
    PIDS+=("$!")
}

start_tollgate() { # name config-template extra-render-args...
    local name=$1 template=$2
    shift 2
    local port=${PORT[$name]:-$(free_port)} admin=${ADMIN[$name]:-$(free_port)}
    PORT[$name]=$port
    ADMIN[$name]=$admin
    render "$template" "$WORK/$name.toml" TMP="$WORK" PORT="$port" ADMIN_PORT="$admin" \
        UPSTREAM_PORT="$UPSTREAM_PORT" CACHE_ENTRIES="$CACHE_ENTRIES" "$@"
    if [[ $name == *-tls ]]; then
        sed -i "/^\[proxy\]/a tls = { cert = \"$WORK/tls.pem\", key = \"$WORK/tls.key\" }" "$WORK/$name.toml"
    fi
    echo "--- $(date -u +%FT%TZ) start" >>"$WORK/$name.log"
    TOLLGATE_MASTER_KEY=$MASTER start_bg "$name" "$PROXY_CPU" "$WORK/$name.log" \
        "$BIN" serve --config "$WORK/$name.toml"
    wait_port "$admin" 30 "${PID[$name]}" && wait_port "$port" 5 "${PID[$name]}" || die "$name did not start: $(tail -5 "$WORK/$name.log")"
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && return 0
        sleep 0.1
    done
    die "$name is not ready: $(tail -5 "$WORK/$name.log")"
}

# The hand-built keyed route (nginx-keyed.conf) with the keys of a file in its map: name keyfile
start_nginx_keyed() {
    local name=$1 keys=$2 n
    PORT[$name]=$(free_port)
    # "key" "k<line>"; keys are URL-safe base64 with a prefix, nothing to escape.
    awk '{ printf "\"%s\" \"k%d\";\n", $1, NR }' "$keys" >"$WORK/$name.map"
    n=$(wc -l <"$keys")
    render "$HERE/nginx-keyed.conf" "$WORK/$name.conf" TMP="$WORK" NAME="$name" PORT="${PORT[$name]}" \
        UPSTREAM_PORT="$UPSTREAM_PORT" ZONE_MB="$((16 + n / 4000))"
    start_bg "$name" "$PROXY_CPU" "$WORK/$name.log" nginx -c "$WORK/$name.conf" -p "$WORK"
    wait_port "${PORT[$name]}" 120 "${PID[$name]}" || die "$name did not start: $(cat "$WORK/$name.log" "$WORK/$name.err" 2>/dev/null | tail -5)"
    KEYFILE[$name]=$keys
}

stop_proc() { # name
    local pid=${PID[$1]}
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

admin_post() { # name path json
    curl -sS -f -X POST "http://127.0.0.1:${ADMIN[$1]}$2" \
        -H "Authorization: Bearer $MASTER" -H 'Content-Type: application/json' -d "$3"
}

new_account() { # name -> account id
    admin_post "$1" /v1/accounts "{\"name\":\"bench-$1\",\"rate_limit\":$HUGE_LIMIT}" | jq -er .id
}

new_key() { # name account -> raw key
    admin_post "$1" "/v1/accounts/$2/keys" '{"name":"bench"}' | jq -er .key
}

# Creates keys with curl's parallel transfers (one curl process, 16 requests in flight; key i
# goes to account i mod the number of accounts, so that the requests in flight write to different
# accounts and share the store's fsyncs; key names must be unique within an account, so each
# request has its own body):
# key_batch name "account..." first count outfile
key_batch() {
    local name=$1 accts=$2 first=$3 count=$4 out=$5 cfg="$WORK/keys-curl.cfg"
    (
        umask 077
        awk -v base="http://127.0.0.1:${ADMIN[$name]}/v1/accounts/" -v accts="$accts" -v m="$MASTER" \
            -v s="$first" -v n="$count" 'BEGIN {
                na = split(accts, acct, " ")
                for (i = s; i < s + n; i++) {
                    if (i > s) print "next"
                    printf "url = \"%s%s/keys\"\nsilent\nshow-error\n", base, acct[i % na + 1]
                    printf "header = \"Authorization: Bearer %s\"\n", m
                    printf "header = \"Content-Type: application/json\"\n"
                    printf "data = \"{\\\"name\\\":\\\"k%d\\\"}\"\n", i
                }
            }' >"$cfg"
    )
    curl -Z --parallel-max 16 -K "$cfg" 2>>"$WORK/keys-curl.err" | jq -r '.key // empty' >>"$out" || true
}

# ---------------------------------------------------------------------------------------------
# Measuring

CLK_TCK=$(getconf CLK_TCK)

# cpu0/cpu1 busy and total ticks from "before|after cpuN ..." lines: prints
# "busy0 total0 busy1 total1" (busy = total - idle - iowait; total = user..steal).
cpu_delta() {
    awk '
        $1 == "before" || $1 == "after" {
            t = 0; for (f = 3; f <= 10; f++) t += $f
            b = t - $6 - $7
            s = ($1 == "after") ? 1 : -1
            busy[$2] += s * b; total[$2] += s * t
        }
        END { printf "%d %d %d %d\n", busy["cpu0"], total["cpu0"], busy["cpu1"], total["cpu1"] }
    ' "$1"
}

proc_stat_line() { # before|after -> "before cpu0 ..." lines like rotate.lua writes
    grep -E '^cpu[01] ' /proc/stat | sed "s/^/$1 /"
}

tree_pids() { # pid -> pid and its children
    echo "$1"
    pgrep -P "$1" || true
}

proc_ticks() { # pid -> utime+stime of the process tree, in ticks
    local p t=0 v
    for p in $(tree_pids "$1"); do
        # fields after the ")" of the comm: state is $1, utime $12, stime $13
        v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || continue
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

status_kb() { # pid field -> sum of /proc/*/status field (VmHWM, VmRSS) over the process tree
    local p t=0 v
    for p in $(tree_pids "$1"); do
        v=$(awk -v f="$2:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null) || continue
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
peak_rss_kb() { status_kb "$1" VmHWM; }
rss_kb() { status_kb "$1" VmRSS; }

redis_commands() {
    redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | awk -F: '$1 == "total_commands_processed" {print $2}'
}

wrk_once() { # name seconds statfile [--latency]
    local name=$1 secs=$2 stat=$3
    shift 3
    : >"$stat"
    KEYS_FILE=${KEYFILE[$name]} KEY_OFFSET=${REQS_SENT[$name]:-0} STAT_FILE=$stat \
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${secs}s" "$@" -s "$HERE/rotate.lua" \
        "$(url "$name")" >"$stat.out" 2>&1 || die "wrk failed on $name: $(tail -3 "$stat.out")"
    local n
    n=$(sed -n 's/^result requests=\([0-9]*\).*/\1/p' "$stat")
    REQS_SENT[$name]=$(( ${REQS_SENT[$name]:-0} + ${n:-0} ))
}

# One measured run, appended to $WORK/runs.tsv:
# round name rps p50_ms p99_ms cpu0_us cpu1_pct proc_us rss_mb errors redis_per_req
measure() { # round name
    local round=$1 name=$2 pid=${PID[$2]} stat="$WORK/run-$2-r$1"
    [[ $name == tg-1m ]] && kill -CONT "$pid"
    wrk_once "$name" "$WARMUP" "$WORK/warm-$name-r$round"
    local r0="" r1="" p0 p1 m0=""
    [[ $name == tg-redis ]] && r0=$(redis_commands)
    [[ $name == tg-1m ]] && m0=$(metering_sample "$name")
    p0=$(proc_ticks "$pid")
    wrk_once "$name" "$DURATION" "$stat" --latency
    [[ $name == tg-redis ]] && r1=$(redis_commands)
    # A tollgate's own CPU includes writing the usage of the run's requests, which may end after
    # wrk does (many keys): counted until its pending usage is written.
    [[ $name == tg-* ]] && drain_usage "$name"
    p1=$(proc_ticks "$pid")
    if [[ -n $m0 ]]; then
        printf '%s\t%s\t%s\t%s\n' "$round" "$(sed -n 's/^result requests=\([0-9]*\).*/\1/p' "$stat")" \
            "$m0" "$(metering_sample "$name")" >>"$WORK/metering.tsv"
        # Held still until its next run: a million keys' journal is folded into the buckets up
        # to a minute after a flush, which would land on CPU 0 in another contender's run. It
        # folds during its own next run instead (counted as its own), and not at all during the
        # fixed-rate part.
        kill -STOP "$pid"
    fi
    local line busy0 total0 busy1 total1
    line=$(grep '^result ' "$stat") || die "no result from wrk on $name: $(tail -3 "$stat.out")"
    read -r busy0 total0 busy1 total1 < <(cpu_delta "$stat")
    local rss
    rss=$(peak_rss_kb "$pid")
    awk -v line="$line" -v round="$round" -v name="$name" -v b0="$busy0" -v b1="$busy1" \
        -v t1="$total1" -v hz="$CLK_TCK" -v pt="$((p1 - p0))" -v rss="$rss" \
        -v r0="$r0" -v r1="$r1" 'BEGIN {
            n = split(line, kv, /[ =]/)
            for (i = 2; i < n; i += 2) v[kv[i]] = kv[i + 1]
            req = v["requests"]; if (req < 1) req = 1
            rps = req / (v["duration_us"] / 1e6)
            redis = (r0 == "") ? "-" : sprintf("%.4f", (r1 - r0) / req)
            printf "%s\t%s\t%.0f\t%.3f\t%.3f\t%.2f\t%.1f\t%.2f\t%.1f\t%d\t%s\n", round, name, rps,
                v["p50_us"] / 1000, v["p99_us"] / 1000, b0 * 1e6 / hz / req,
                (t1 > 0 ? 100 * b1 / t1 : 0), pt * 1e6 / hz / req, rss / 1024,
                v["status_errors"] + v["socket_errors"], redis
        }' >>"$WORK/runs.tsv"
    local last
    last=$(tail -1 "$WORK/runs.tsv")
    log "round $round $(printf '%-9s' "$name") $(awk -F'\t' '{printf "%8s rps  p50 %s ms  p99 %s ms  cpu0 %s us/req  proc %s us/req  cpu1 %s%%  rss %s MB  errors %s  redis/req %s", $3, $4, $5, $6, $8, $7, $9, $10, $11}' <<<"$last")"
    [[ $(cut -f10 <<<"$last") == 0 ]] || log "WARNING: $name answered errors (non-2xx or socket errors) in round $round"
}

# New TLS connections: every request on a connection of its own (Connection: close), so each is
# a full handshake. Appends to $WORK/handshakes.tsv: name conns/s cpu0_us/conn proc_us/conn.
handshakes() { # name
    local name=$1 pid=${PID[$1]} stat="$WORK/handshakes-$1"
    CONNECTION_CLOSE=1 wrk_once "$name" "$WARMUP" "$WORK/warm-hs-$name"
    local p0 p1
    p0=$(proc_ticks "$pid")
    CONNECTION_CLOSE=1 wrk_once "$name" "$DURATION" "$stat"
    [[ $name == tg-* ]] && drain_usage "$name"
    p1=$(proc_ticks "$pid")
    local line busy0 total0 busy1 total1
    line=$(grep '^result ' "$stat") || die "no result from wrk on $name: $(tail -3 "$stat.out")"
    read -r busy0 total0 busy1 total1 < <(cpu_delta "$stat")
    awk -v line="$line" -v name="$name" -v b0="$busy0" -v hz="$CLK_TCK" -v pt="$((p1 - p0))" 'BEGIN {
        n = split(line, kv, /[ =]/)
        for (i = 2; i < n; i += 2) v[kv[i]] = kv[i + 1]
        req = v["requests"]; if (req < 1) req = 1
        printf "%s\t%.0f\t%.1f\t%.1f\t%d\n", name, req / (v["duration_us"] / 1e6),
            b0 * 1e6 / hz / req, pt * 1e6 / hz / req, v["status_errors"] + v["socket_errors"]
    }' >>"$WORK/handshakes.tsv"
    log "handshakes $(printf '%-9s' "$name") $(tail -1 "$WORK/handshakes.tsv" | awk -F'\t' '{printf "%s conns/s  cpu0 %s us/conn  proc %s us/conn  errors %s", $2, $3, $4, $5}')"
}

# What metering at scale costs tg-1m (issue 27): "disk_write_bytes flush_seconds flushes db_bytes"
# — the bytes the process has written to disk (/proc/PID/io), the usage flush histogram's sum and
# count (one observation per batch written), and the database file's size.
metering_sample() { # name
    local name=$1 io flush
    io=$(awk '$1 == "write_bytes:" {print $2}' "/proc/${PID[$name]}/io" 2>/dev/null || echo 0)
    flush=$(curl -s "http://127.0.0.1:${ADMIN[$name]}/metrics" | awk '
        $1 == "tollgate_usage_flush_duration_seconds_sum" {s = $2}
        $1 == "tollgate_usage_flush_duration_seconds_count" {c = $2}
        END {printf "%s %s", s + 0, c + 0}')
    echo "$io $flush $(stat -c %s "$WORK/$name.db" 2>/dev/null || echo 0)"
}

# Waits (at most 120 s) until a tollgate's usage counts are all written, so that its flushes do
# not land on CPU 0 during the next contender's run (with many keys a flush takes a while).
drain_usage() { # name
    local name=$1 pending
    # One flush interval first: counts still in the meter are not in the gauge yet.
    sleep 1.5
    for _ in $(seq 240); do
        pending=$(curl -s "http://127.0.0.1:${ADMIN[$name]}/metrics" | awk '$1 == "tollgate_usage_pending_events" {printf "%d", $2}')
        [[ ${pending:-0} == 0 ]] && return 0
        sleep 0.5
    done
    log "WARNING: $name still had $pending usage buckets pending after 120 s"
}

# Runs wrk against name until its key cache has missed once per key (every key read once), and
# records how long the first pass took: the cost of a cold key.
warm_cache() { # name
    local name=$1 t0 misses=0 passes=0 before sent0
    before=$(proc_ticks "${PID[$name]}")
    WARM_RSS_BEFORE_KB=$(rss_kb "${PID[$name]}")
    sent0=${REQS_SENT[$name]:-0}
    t0=$(date +%s.%N)
    while ((misses < NKEYS && passes < 200)); do
        wrk_once "$name" 5 "$WORK/warm-cache-$name-$passes"
        misses=$(curl -s "http://127.0.0.1:${ADMIN[$name]}/metrics" | awk '$1 == "tollgate_key_cache_misses_total" {printf "%d", $2}')
        passes=$((passes + 1))
    done
    drain_usage "$name"
    WARM_RSS_AFTER_KB=$(rss_kb "${PID[$name]}")
    WARM_SECONDS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
    WARM_REQUESTS=$((${REQS_SENT[$name]:-0} - sent0))
    WARM_US_PER_REQ=$(awk -v t="$(($(proc_ticks "${PID[$name]}") - before))" -v hz="$CLK_TCK" -v n="$WARM_REQUESTS" 'BEGIN { printf "%.1f", (n > 0 ? t * 1e6 / hz / n : 0) }')
    log "$name: cache warmed in ${WARM_SECONDS}s: $WARM_REQUESTS requests, $misses of them misses, ${WARM_US_PER_REQ} us of proxy CPU per request"
    log "$name: resident $((WARM_RSS_BEFORE_KB / 1024)) MB before, $((WARM_RSS_AFTER_KB / 1024)) MB with $NKEYS keys cached and their usage flushed: $(((WARM_RSS_AFTER_KB - WARM_RSS_BEFORE_KB) * 1024 / (NKEYS > 0 ? NKEYS : 1))) bytes per key"
}

# Fixed-rate run: name rate -> "achieved_rps p50_ms p99_ms errors" on stdout
fixed_rate() {
    local name=$1 rate=$2 out="$WORK/fixed-$1-$2"
    local key
    key=$(head -1 "${KEYFILE[tg-keyed]}")
    case $FIXED_RATE_TOOL in
    oha)
        local fmt=(--json)
        oha --help 2>/dev/null | grep -q -- '--output-format' && fmt=(--output-format json)
        taskset -c "$LOAD_CPU" oha -z "${OHA_DURATION}s" -c "$CONNS" -q "$rate" --latency-correction \
            --no-tui "${fmt[@]}" -H "X-API-Key: $key" "$(url "$name")" >"$out.json" 2>"$out.err" ||
            die "oha failed on $name: $(tail -3 "$out.err")"
        # errors: non-2xx answers and transport errors, not the requests cut off at the deadline
        jq -r '[.summary.requestsPerSec, (.latencyPercentiles.p50 * 1000), (.latencyPercentiles.p99 * 1000),
                (([.statusCodeDistribution | to_entries[] | select(.key | startswith("2") | not) | .value] | add) // 0)
                + (([.errorDistribution | to_entries[] | select(.key | test("deadline") | not) | .value] | add) // 0)]
               | @tsv' "$out.json"
        ;;
    wrk2)
        KEYS_FILE=${KEYFILE[tg-keyed]} STAT_FILE="$out.stat" taskset -c "$LOAD_CPU" wrk2 -t1 -c"$CONNS" \
            -d"${OHA_DURATION}s" -R"$rate" --latency -s "$HERE/rotate.lua" \
            "$(url "$name")" >"$out.txt" 2>&1 || die "wrk2 failed on $name"
        awk '
            function ms(s) { if (s ~ /us$/) return s / 1000; if (s ~ /ms$/) return s + 0; if (s ~ /s$/) return s * 1000; return s }
            $1 == "50.000%" { p50 = ms($2) } $1 == "99.000%" { p99 = ms($2) }
            $1 == "Requests/sec:" { rps = $2 } /Non-2xx/ { err += $NF }
            END { printf "%s\t%.3f\t%.3f\t%d\n", rps, p50, p99, err }' "$out.txt"
        ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# Report

median() { sort -g | awk '{v[NR] = $1} END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

TABLE_HEAD='| contender | requests/s | p50 ms | p99 ms | CPU-0 µs/req | proxy proc µs/req | CPU-1 busy % | peak RSS MB | errors | Redis cmds/req |
|---|---|---|---|---|---|---|---|---|---|'

round_table() { # round
    echo "$TABLE_HEAD"
    awk -F'\t' -v r="$1" '$1 == r { printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6, $8, $7, $9, $10, $11 }' "$WORK/runs.tsv"
}

# median over rounds, column by column (peak RSS: the largest) -> $WORK/median.tsv (same columns
# as runs.tsv, round "median")
median_table() {
    : >"$WORK/median.tsv"
    local name col vals=()
    for name in "${CONTENDERS[@]}"; do
        vals=()
        for col in 3 4 5 6 7 8 9 10 11; do
            if ((col == 9)); then # peak RSS only grows: the largest
                vals+=("$(awk -F'\t' -v n="$name" '$2 == n {print $9}' "$WORK/runs.tsv" | sort -g | tail -1)")
            else
                vals+=("$(awk -F'\t' -v n="$name" -v c="$col" '$2 == n && $c != "-" {print $c}' "$WORK/runs.tsv" | median)")
            fi
        done
        printf 'median\t%s' "$name" >>"$WORK/median.tsv"
        printf '\t%s' "${vals[@]}" >>"$WORK/median.tsv"
        printf '\n' >>"$WORK/median.tsv"
    done
    echo "$TABLE_HEAD"
    awk -F'\t' '{ printf "| %s | %.0f | %.3f | %.3f | %.2f | %.2f | %.1f | %.1f | %s | %s |\n", $2, $3, $4, $5, $6, $8, $7, $9, $10, $11 }' "$WORK/median.tsv"
}

get() { # file round name column
    awk -F'\t' -v r="$2" -v n="$3" -v c="$4" '$1 == r && $2 == n {print $c}' "$1"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "-" || b == "-" || b == 0) print "-"; else printf "%.3f", a / b }'; }

verdict() { # value op target
    awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
        if (v == "-" || v == "") { print "n/a"; exit }
        if (op == "-") { print "measured"; exit }
        if (op == "<=") { if (v <= t) print "met"; else printf "missed by %.0f %%\n", 100 * (v - t) / t }
        else            { if (v >= t) print "met"; else printf "missed by %.0f %%\n", 100 * (t - v) / t }
    }'
}

# "| ratio | round 1 | … | median table | target | verdict |" rows
ratio_row() { # label op target col_a name_a col_b name_b
    local label=$1 op=$2 target=$3 ca=$4 na=$5 cb=$6 nb=$7 r cells="" med
    for ((r = 1; r <= ROUNDS; r++)); do
        cells+=" $(ratio "$(get "$WORK/runs.tsv" "$r" "$na" "$ca")" "$(get "$WORK/runs.tsv" "$r" "$nb" "$cb")") |"
    done
    med=$(ratio "$(get "$WORK/median.tsv" median "$na" "$ca")" "$(get "$WORK/median.tsv" median "$nb" "$cb")")
    echo "| $label |$cells **$med** | $op $target | $(verdict "$med" "$op" "$target") |"
}

ratios_table() {
    local r head="| ratio |" sep="|---|"
    for ((r = 1; r <= ROUNDS; r++)); do head+=" round $r |"; sep+="---|"; done
    echo "$head median table | target | verdict |"
    echo "$sep---|---|---|"
    ratio_row "tg-keyed CPU-0 µs/req ÷ nginx's" "<=" 1.0 6 tg-keyed 6 nginx
    ratio_row "(same, proxy process µs/req)" "<=" 1.0 8 tg-keyed 8 nginx
    ratio_row "tg-keyed CPU-0 µs/req ÷ nginx-keyed's (one key)" "<=" 1.0 6 tg-keyed 6 nginx-keyed
    ratio_row "tg-1m CPU-0 µs/req ÷ nginx-keyed-1m's ($NKEYS keys)" "<=" 1.0 6 tg-1m 6 nginx-keyed-1m
    ratio_row "nginx-keyed CPU-0 µs/req ÷ nginx's (what nginx's keyed route costs)" "-" - 6 nginx-keyed 6 nginx
    ratio_row "tg-public CPU-0 µs/req ÷ nginx's" "<=" 1.0 6 tg-public 6 nginx
    ratio_row "tg-keyed rps ÷ tg-public rps" ">=" 0.95 3 tg-keyed 3 tg-public
    ratio_row "tg-1m rps ÷ tg-keyed rps ($NKEYS keys)" ">=" 0.90 3 tg-1m 3 tg-keyed
    ratio_row "tg-redis rps ÷ tg-keyed rps" ">=" 0.90 3 tg-redis 3 tg-keyed
    local cells="" v
    for ((r = 1; r <= ROUNDS; r++)); do cells+=" $(get "$WORK/runs.tsv" "$r" tg-redis 11) |"; done
    v=$(get "$WORK/median.tsv" median tg-redis 11)
    echo "| Redis commands per proxied request (tg-redis) |$cells **$v** | <= 0.05 | $(verdict "$v" "<=" 0.05) |"
}

# ---------------------------------------------------------------------------------------------
# Main

# The rotated keys of tg-1m imported (POST …/keys/import, 1,000 a request, by the SHA-256 of a raw
# value the script makes), spread over KEY_ACCOUNTS accounts, 16 requests in flight: a million
# keys in a minute or two, where creating them one by one takes over ten. An imported key is
# served exactly as a created one once cached; only its first lookup differs (a credential
# without tollgate's checksum is looked up, where a created key's format is checked first).
import_keys() {
    local acct="" a i t0
    for i in $(seq "$KEY_ACCOUNTS"); do
        a=$(new_account tg-1m) || die "cannot create an account on tg-1m"
        acct+="$a "
    done
    local keys="$WORK/keys-many.txt" cfg="$WORK/import-curl.cfg" bodies="$WORK/import"
    mkdir -p "$bodies"
    t0=$(date +%s.%N)
    (
        umask 077
        python3 - "$KEYS" "$bodies" "$keys" "http://127.0.0.1:${ADMIN[tg-1m]}/v1/accounts/" "$MASTER" $acct >"$cfg" <<'PY'
import hashlib, json, os, secrets, sys
n, bodies, keys_file, base, master, accts = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
batch = 1000
with open(keys_file, "w") as keys:
    for b in range((n + batch - 1) // batch):
        entries = []
        for i in range(b * batch, min(n, (b + 1) * batch)):
            raw = "bench_" + secrets.token_urlsafe(24)
            keys.write(raw + "\n")
            entries.append({"hash": hashlib.sha256(raw.encode()).hexdigest(), "name": f"k{i}"})
        path = os.path.join(bodies, f"{b}.json")
        with open(path, "w") as f:
            json.dump({"keys": entries}, f)
        if b:
            print("next")
        print(f'url = "{base}{accts[b % len(accts)]}/keys/import"')
        print("silent\nshow-error\nfail")
        print(f'header = "Authorization: Bearer {master}"')
        print('header = "Content-Type: application/json"')
        print(f'data-binary = "@{path}"')
        print("output = /dev/null")
PY
    ) || die "could not write the keys to import"
    curl -Z --parallel-max 16 -K "$cfg" 2>>"$WORK/keys-curl.err" || die "importing keys failed: $(tail -3 "$WORK/keys-curl.err")"
    KEY_SECONDS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
    NKEYS=$(wc -l <"$keys")
    KEY_RATE=$(awk -v n="$NKEYS" -v s="$KEY_SECONDS" 'BEGIN { printf "%.0f", n / (s > 0 ? s : 1) }')
    log "$NKEYS keys imported in $KEY_SECONDS s (~$KEY_RATE keys/s)"
    rm -rf "$bodies"
    KEYFILE[tg-1m]=$keys
    stop_proc tg-1m
    start_tollgate tg-1m "$HERE/tollgate-embedded.toml" AUTH=required DB="$WORK/tg-1m.db"
}

# The rotated keys of tg-1m created one by one (KEY_SOURCE=create), spread over KEY_ACCOUNTS
# accounts: a first batch gives the rate; fewer keys when KEYS would exceed KEY_BUDGET.
many_keys() {
    local acct="" a i
    for i in $(seq "$KEY_ACCOUNTS"); do
        a=$(new_account tg-1m) || die "cannot create an account on tg-1m"
        acct+="$a "
    done
    local keys="$WORK/keys-many.txt" t0 t1 made rate target batch
    : >"$keys"
    t0=$(date +%s.%N)
    local first=$((KEYS < 5000 ? KEYS : 5000))
    key_batch tg-1m "$acct" 1 "$first" "$keys"
    local next_name=$((first + 1))
    t1=$(date +%s.%N)
    made=$(wc -l <"$keys")
    ((made > 0)) || die "no keys created on tg-1m: $(tail -3 "$WORK/tg-1m.log")"
    rate=$(awk -v n="$made" -v a="$t0" -v b="$t1" 'BEGIN { r = n / (b - a); printf "%.0f", (r < 1 ? 1 : r) }')
    target=$KEYS
    if ((KEYS / rate > KEY_BUDGET)); then
        target=10000
        for n in 1000000 500000 200000 100000 50000 20000; do
            if ((n <= KEYS && n <= rate * KEY_BUDGET)); then target=$n; break; fi
        done
        log "key creation runs at ~$rate keys/s: $KEYS keys would take ~$((KEYS / rate)) s > KEY_BUDGET=$KEY_BUDGET s; creating $target"
    else
        log "key creation runs at ~$rate keys/s; creating $KEYS"
    fi
    while ((made < target)); do
        batch=$((target - made))
        ((batch > 50000)) && batch=50000
        key_batch tg-1m "$acct" "$next_name" "$batch" "$keys"
        next_name=$((next_name + batch))
        made=$(wc -l <"$keys")
        log "  $made / $target keys ($(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s)"
        if awk -v a="$t0" -v b="$(date +%s.%N)" -v lim="$((KEY_BUDGET * 3 / 2))" 'BEGIN { exit !(b - a > lim) }'; then
            log "  key budget exceeded by half; going on with $made keys"
            break
        fi
    done
    KEY_SECONDS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
    sort -u "$keys" -o "$keys"
    NKEYS=$(wc -l <"$keys")
    KEY_RATE=$(awk -v n="$NKEYS" -v s="$KEY_SECONDS" 'BEGIN { printf "%.0f", n / (s > 0 ? s : 1) }')
    log "$NKEYS distinct keys in $KEY_SECONDS s (~$KEY_RATE keys/s)"
    KEYFILE[tg-1m]=$keys
    # Restart tg-1m so that its peak RSS is the serving one, not the admin API's, and its key
    # cache starts cold like a fresh instance's.
    stop_proc tg-1m
    start_tollgate tg-1m "$HERE/tollgate-embedded.toml" AUTH=required DB="$WORK/tg-1m.db"

}

main() {
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    (($(nproc) >= 2)) || die "needs 2 CPUs (proxy on CPU 0, upstream and wrk on CPU 1)"
    install_tools

    if [[ $SKIP_BUILD != 1 ]]; then
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
    fi
    BIN=${TOLLGATE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/tollgate}
    [[ -x $BIN ]] || die "no binary at $BIN"

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-load.XXXXXX")
    chmod 755 "$WORK"
    mkdir -p "$WORK/nginx-upstream-tmp" "$WORK/nginx-proxy-tmp"
    log "work directory $WORK"
    : >"$WORK/runs.tsv"
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

    # Upstream (CPU 1), the other proxies (CPU 0), Redis (CPU 1).
    UPSTREAM_PORT=$(free_port)
    render "$HERE/nginx-upstream.conf" "$WORK/nginx-upstream.conf" TMP="$WORK" UPSTREAM_PORT="$UPSTREAM_PORT"
    start_bg upstream "$LOAD_CPU" "$WORK/upstream.log" nginx -c "$WORK/nginx-upstream.conf" -p "$WORK"
    wait_port "$UPSTREAM_PORT" 30 "${PID[upstream]}" || die "upstream nginx did not start: $(cat "$WORK/upstream.log" "$WORK/nginx-upstream.err" 2>/dev/null)"

    if wants nginx; then
        PORT[nginx]=$(free_port)
        render "$HERE/nginx-proxy.conf" "$WORK/nginx-proxy.conf" TMP="$WORK" PORT="${PORT[nginx]}" UPSTREAM_PORT="$UPSTREAM_PORT"
        start_bg nginx "$PROXY_CPU" "$WORK/nginx.log" nginx -c "$WORK/nginx-proxy.conf" -p "$WORK"
        wait_port "${PORT[nginx]}" 30 "${PID[nginx]}" || die "nginx proxy did not start"
    fi

    if wants nginx-tls || wants tg-tls; then
        # One self-signed certificate (P-256) for both TLS contenders.
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
            -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2>/dev/null || die "openssl could not make a certificate"
    fi
    if wants nginx-tls; then
        PORT[nginx-tls]=$(free_port)
        render "$HERE/nginx-proxy-tls.conf" "$WORK/nginx-proxy-tls.conf" TMP="$WORK" PORT="${PORT[nginx-tls]}" \
            UPSTREAM_PORT="$UPSTREAM_PORT" CERT="$WORK/tls.pem" KEY="$WORK/tls.key"
        start_bg nginx-tls "$PROXY_CPU" "$WORK/nginx-tls.log" nginx -c "$WORK/nginx-proxy-tls.conf" -p "$WORK"
        wait_port "${PORT[nginx-tls]}" 30 "${PID[nginx-tls]}" || die "nginx TLS proxy did not start"
    fi

    if wants haproxy; then
        PORT[haproxy]=$(free_port)
        render "$HERE/haproxy.cfg" "$WORK/haproxy.cfg" TMP="$WORK" PORT="${PORT[haproxy]}" UPSTREAM_PORT="$UPSTREAM_PORT"
        start_bg haproxy "$PROXY_CPU" "$WORK/haproxy.log" haproxy -db -f "$WORK/haproxy.cfg"
        wait_port "${PORT[haproxy]}" 30 "${PID[haproxy]}" || die "haproxy did not start: $(tail -5 "$WORK/haproxy.log")"
    fi

    if wants tg-redis; then
        REDIS_PORT=$(free_port)
        start_bg redis "$LOAD_CPU" "$WORK/redis.log" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
            --save "" --appendonly no --dir "$WORK" --daemonize no
        wait_port "$REDIS_PORT" 30 "${PID[redis]}" || die "redis-server did not start"
    fi

    # tollgate: up to four processes, so that each case has its own RSS and key store. tg-keyed
    # always runs: its key is the one every single-key contender is sent.
    MASTER=$("$BIN" keygen --kind master)
    CACHE_ENTRIES=$((KEYS + KEYS / 2 + 1000))
    if wants tg-public; then
        start_tollgate tg-public "$HERE/tollgate-embedded.toml" AUTH=public DB="$WORK/tg-public.db"
    fi
    start_tollgate tg-keyed "$HERE/tollgate-embedded.toml" AUTH=required DB="$WORK/tg-keyed.db"
    if wants tg-1m; then
        start_tollgate tg-1m "$HERE/tollgate-embedded.toml" AUTH=required DB="$WORK/tg-1m.db"
    fi
    if wants tg-redis; then
        start_tollgate tg-redis "$HERE/tollgate-redis.toml" REDIS_PORT="$REDIS_PORT"
    fi
    if wants tg-tls; then
        start_tollgate tg-tls "$HERE/tollgate-embedded.toml" AUTH=required DB="$WORK/tg-tls.db"
    fi

    # One key (tg-keyed; nginx, haproxy and tg-public get the same header and ignore it).
    local acct
    acct=$(new_account tg-keyed) || die "cannot create an account on tg-keyed"
    new_key tg-keyed "$acct" >"$WORK/keys-1.txt" || die "cannot create a key on tg-keyed"
    if wants tg-redis; then
        acct=$(new_account tg-redis) || die "cannot create an account on tg-redis"
        new_key tg-redis "$acct" >"$WORK/keys-redis.txt" || die "cannot create a key on tg-redis"
        KEYFILE[tg-redis]=$WORK/keys-redis.txt
    fi
    if wants tg-tls; then
        acct=$(new_account tg-tls) || die "cannot create an account on tg-tls"
        new_key tg-tls "$acct" >"$WORK/keys-tls.txt" || die "cannot create a key on tg-tls"
        KEYFILE[tg-tls]=$WORK/keys-tls.txt
    fi
    for name in nginx haproxy tg-public tg-keyed nginx-tls; do KEYFILE[$name]=$WORK/keys-1.txt; done
    NKEYS=0 KEY_SECONDS=0 KEY_RATE=0
    if wants tg-1m; then
        if [[ ${KEY_SOURCE:-import} == import ]]; then import_keys; else many_keys; fi
    fi
    if wants nginx-keyed; then
        start_nginx_keyed nginx-keyed "$WORK/keys-1.txt"
    fi
    if wants nginx-keyed-1m; then
        start_nginx_keyed nginx-keyed-1m "${KEYFILE[tg-1m]}"
    fi

    # tg-1m's cache is warmed with whole passes over its keys, as a gateway that has been up for
    # a while has them: the rounds then measure cached keys, and the miss path is reported apart.
    if wants tg-1m; then
        warm_cache tg-1m
    fi

    # Every contender answers 200 through to the upstream.
    for name in "${CONTENDERS[@]}"; do
        local code
        code=$(curl -sk -o /dev/null -w '%{http_code}' -H "X-API-Key: $(head -1 "${KEYFILE[$name]}")" "$(url "$name")")
        [[ $code == 200 ]] || die "$name answers $code instead of 200"
    done
    # tg-1m is held still between its runs (see measure), from the end of its warm pass on.
    if wants tg-1m; then kill -STOP "${PID[tg-1m]}"; fi

    # The wrk rounds.
    local round
    ROUND_LOAD=()
    for ((round = 1; round <= ROUNDS; round++)); do
        ROUND_LOAD[round]=$(cut -d' ' -f1-3 /proc/loadavg)
        log "round $round of $ROUNDS (load average ${ROUND_LOAD[round]})"
        for name in "${CONTENDERS[@]}"; do measure "$round" "$name"; done
    done
    median_table >"$WORK/median.md"
    : >"$WORK/handshakes.tsv"
    for name in nginx-tls tg-tls; do
        if wants "$name"; then handshakes "$name"; fi
    done

    # The fixed-rate runs at 25/50/75 % of nginx's median rate, interleaved per rate.
    NGINX_RPS=$(get "$WORK/median.tsv" median nginx 3 | awk '{printf "%.0f", $1}')
    : >"$WORK/fixed.tsv"
    if [[ $FIXED_RATE_TOOL != none ]] && wants nginx; then
        for pct in 25 50 75; do
            local rate=$((NGINX_RPS * pct / 100))
            for name in nginx haproxy tg-public tg-keyed; do
                wants "$name" || continue
                local res
                res=$(fixed_rate "$name" "$rate")
                printf '%s\t%s\t%s\t%s\n' "$pct" "$rate" "$name" "$res" >>"$WORK/fixed.tsv"
                log "fixed rate $pct % ($rate/s) $(printf '%-9s' "$name") $(awk -F'\t' '{printf "achieved %.0f/s  p50 %.3f ms  p99 %.3f ms  errors %s", $1, $2, $3, $4}' <<<"$res")"
            done
        done
    fi
    LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

    report | tee "$RESULTS"
    log "results written to $RESULTS"
}

report() {
    local r
    echo "# tollgate load benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Command: \`bash benches/load/run.sh\` (ROUNDS=$ROUNDS DURATION=${DURATION}s WARMUP=${WARMUP}s CONNS=$CONNS)."
    echo "Machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r);"
    echo "load average at start ${LOAD_START}, at end ${LOAD_END}."
    echo "Tools: $(nginx -v 2>&1 | sed 's/.*version: //'), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}'),"
    echo "$(wrk -v 2>&1 | head -1 | awk '{print $1 " " $2}'), redis $(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/'), fixed rate: $FIXED_RATE_TOOL $( [[ $FIXED_RATE_TOOL == oha ]] && oha --version | awk '{print $2}')."
    echo "Proxies pinned to CPU $PROXY_CPU; upstream nginx, redis-server and the load generator to CPU $LOAD_CPU."
    echo "Load: \`wrk -t1 -c$CONNS -d${DURATION}s --latency -s benches/load/rotate.lua\` after a ${WARMUP}s warm-up, every contender, every round."
    echo "tg-1m rotates $NKEYS distinct keys ($([[ ${KEY_SOURCE:-import} == import ]] && echo imported || echo created) in ${KEY_SECONDS}s through the admin API, ~${KEY_RATE} keys/s);"
    echo "its cache was warmed first: ${WARM_SECONDS:-0}s of wrk until every key had been read once (${WARM_REQUESTS:-0} requests, ${WARM_US_PER_REQ:-0} µs of proxy CPU per request, misses and hits)."
    echo "Resident memory of tg-1m (VmRSS) before that pass: $((${WARM_RSS_BEFORE_KB:-0} / 1024)) MB; after it, with every key cached and its usage flushed: $((${WARM_RSS_AFTER_KB:-0} / 1024)) MB, $(((${WARM_RSS_AFTER_KB:-0} - ${WARM_RSS_BEFORE_KB:-0}) * 1024 / (NKEYS > 0 ? NKEYS : 1))) bytes per cached key."
    if ((NKEYS < KEYS)); then
        echo "**Fewer than $KEYS keys**: creating them would have exceeded KEY_BUDGET=${KEY_BUDGET}s."
    fi
    echo
    echo "CPU-0 µs/req: busy ticks of cpu0 in /proc/stat over the run ÷ requests (includes anything else"
    echo "running on CPU 0). Proxy proc µs/req: utime+stime of the proxy's processes ÷ requests."
    echo "Peak RSS: VmHWM of the proxy's processes (nginx: master + worker) after the run."
    for ((r = 1; r <= ROUNDS; r++)); do
        echo
        echo "## Round $r (load average at start ${ROUND_LOAD[r]})"
        echo
        round_table "$r"
    done
    echo
    echo "## Median of the $ROUNDS rounds (each column separately; peak RSS: the largest)"
    echo
    cat "$WORK/median.md"
    echo
    if [[ -s $WORK/handshakes.tsv ]]; then
        echo "## New TLS connections (one request each, \`Connection: close\`; ${DURATION}s, -c$CONNS)"
        echo
        echo "| contender | new connections/s | CPU-0 µs/connection | proxy proc µs/connection | errors |"
        echo "|---|---|---|---|---|"
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$WORK/handshakes.tsv"
        echo
        echo "| ratio | median table | target | verdict |"
        echo "|---|---|---|---|"
        local v
        v=$(ratio "$(get "$WORK/median.tsv" median tg-tls 6)" "$(get "$WORK/median.tsv" median nginx-tls 6)")
        echo "| tg-tls CPU-0 µs/req ÷ nginx-tls's (keep-alive) | **$v** | — | measured |"
        v=$(ratio "$(get "$WORK/median.tsv" median tg-tls 6)" "$(get "$WORK/median.tsv" median tg-keyed 6)")
        echo "| tg-tls CPU-0 µs/req ÷ tg-keyed's (the cost of TLS) | **$v** | — | measured |"
        echo
    fi
    if [[ -s $WORK/metering.tsv ]]; then
        echo "## Metering at scale (tg-1m: $NKEYS keys, each used about every $NKEYS requests)"
        echo
        echo "Per measured run of tg-1m, from its start until its usage is written: the disk bytes the process wrote"
        echo "(/proc/PID/io write_bytes: journal appends, folds into the buckets, redb's commits), the usage flush"
        echo "histogram (one observation per batch written) and the database file's size. With the keys rotated, a key"
        echo "comes round again only after $NKEYS requests, so nearly every request opens its own (key, minute) bucket:"
        echo "the per-bucket figures divide by the requests, an upper bound of the buckets, so they are lower bounds."
        echo
        echo "| round | requests | disk bytes written | per request (key-minute) | write amplification (÷ 56 B bucket) | batches written | flush s (sum) | ms per batch | db file MB after |"
        echo "|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' '{
            split($3, a, " "); split($4, b, " ")
            req = ($2 > 0 ? $2 : 1); w = b[1] - a[1]; fs = b[2] - a[2]; fc = b[3] - a[3]
            printf "| %s | %d | %d | %.0f | %.1f | %d | %.2f | %.1f | %.1f |\n", $1, $2, w, w / req, w / req / 56, fc, fs, (fc > 0 ? 1000 * fs / fc : 0), b[4] / 1e6
        }' "$WORK/metering.tsv"
        echo
    fi
    echo "## Fixed rate ($FIXED_RATE_TOOL, ${OHA_DURATION}s, -c$CONNS, latency correction; nginx's median rate $NGINX_RPS/s)"
    echo
    if [[ ! -s $WORK/fixed.tsv ]]; then
        echo "Skipped: FIXED_RATE=0, or neither oha nor wrk2 is available."
    else
        echo "| % of nginx max | rate/s | contender | achieved/s | p50 ms | p99 ms | errors |"
        echo "|---|---|---|---|---|---|---|"
        awk -F'\t' '{ printf "| %s %% | %s | %s | %.0f%s | %.3f | %.3f | %s |\n", $1, $2, $3, $4, ($4 < 0.95 * $2 ? " (rate not reached)" : ""), $5, $6, $7 }' "$WORK/fixed.tsv"
    fi
    echo
    echo "## Ratios (targets from the issue)"
    echo
    ratios_table
    if [[ -s $WORK/fixed.tsv ]]; then
        local pct k n v
        for pct in 25 50 75; do
            k=$(awk -F'\t' -v p="$pct" '$1 == p && $3 == "tg-keyed" {print $6}' "$WORK/fixed.tsv")
            n=$(awk -F'\t' -v p="$pct" '$1 == p && $3 == "nginx" {print $6}' "$WORK/fixed.tsv")
            v=$(ratio "$k" "$n")
            echo "| tg-keyed p99 ÷ nginx p99 at $pct % of nginx max ($FIXED_RATE_TOOL) |$(for ((r = 1; r <= ROUNDS; r++)); do printf ' |'; done) **$v** | <= 1.0 | $(verdict "$v" "<=" 1.0) |"
        done
    fi
}

main "$@"

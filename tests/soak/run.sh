#!/usr/bin/env bash
# tollgate's soak under faults: DURATION=120 bash tests/soak/run.sh
#
# Two gateways on one Redis and one embedded gateway, under mixed traffic, while Redis is killed
# and restarted, SIGSTOPped, the upstream flaps and gateways restart; then every answered request
# is reconciled against the usage API. Exit 1 on lost or doubled counts, or on a gateway 5xx
# outside a fault. What it does and the figures of past runs: docs/RELIABILITY.md.
#
# Knobs (environment): DURATION=120 (seconds of traffic; faults scale with it, one cycle per
# 120 s) WORKERS=6 SEED=<time> LOST_MAX=0 DOUBLED_MAX=0 STALL_MAX_S=3 REDIS_PERSIST=1 (0: no AOF, as the test
# harness runs Redis; a kill then wipes every key and count) RESULTS=path.json WORKDIR=dir
# KEEP_TMP=0 (1: keep logs and stores even on success) SOAK_SKIP_BUILD=0 TOLLGATE_BIN=path
# SOAK_RUST_LOG=info CRASH=0 (1: also SIGKILL a gateway once per cycle; its unflushed counts
# are lost by design, which shows that the reconciliation catches a loss). Needs redis-server and python3 (3.11, standard library only).

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
log() { printf '[soak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v redis-server >/dev/null; then
    log "installing redis-server (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { log "needs python3 >= 3.11"; exit 2; }

BIN=${TOLLGATE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/tollgate}
if [[ -z ${TOLLGATE_BIN:-} && ${SOAK_SKIP_BUILD:-0} != 1 ]]; then
    log "cargo build (the debug binary)"
    (cd "$ROOT" && cargo build --quiet --bin tollgate)
fi
[[ -x $BIN ]] || { log "no binary at $BIN"; exit 2; }

WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/tollgate-soak-XXXXXX")}
export WORKDIR

# soak.py kills what it started; this trap is the backstop for when soak.py itself is killed.
PY=
cleanup() {
    local code=$?
    if [[ -n $PY ]] && kill -0 "$PY" 2>/dev/null; then
        kill -TERM "$PY" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$PY" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PY" 2>/dev/null || true
    fi
    if [[ -f $WORKDIR/pids ]]; then
        while read -r pid; do
            [[ -n $pid ]] && kill -CONT "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        done <"$WORKDIR/pids"
    fi
    if [[ $code == 0 && ${KEEP_TMP:-0} != 1 ]]; then
        rm -rf "$WORKDIR"
    else
        log "logs and stores kept in $WORKDIR"
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# In the background, so that a signal to this script runs the trap at once.
python3 "$HERE/soak.py" "$BIN" &
PY=$!
wait "$PY"

#!/usr/bin/env bash
# Fuzzes a running tollgate admin API against docs/openapi.json with schemathesis.
#
#   bash tests/schemathesis.sh            # from anywhere; needs cargo, curl, python3 and `st`
#                                         # (pip install schemathesis)
#
# Builds the debug binary, starts `tollgate serve` on free ports with a fresh store in a temp
# dir, creates accounts, keys and a site with curl, and runs `st run` twice with the checks
# `not_a_server_error` and `status_code_conformance`: the account's own paths (`/v1/account…`)
# with one of the account's secret keys as bearer auth, then every other path with the master
# key. Path parameters are the real ids (schemathesis also tries others, which are 404s). Exits
# non-zero when either run reports a failure. The server is stopped on exit.
#
# Environment: ST_MAX_EXAMPLES (default 25 per operation), ST_SEED (default 1; "random" for a
# new one each run), ST_WORKERS (default 1: with more, hypothesis parses lambda sources from several threads at once and CPython 3.11 can fail with "AST constructor recursion depth mismatch"), ST_EXTRA (more `st run` arguments; a later
# `--checks all` replaces the two checks, and also reports where the server is laxer or stricter
# than the document's request schemas, which this script does not gate on).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

for tool in cargo curl python3 st; do
    command -v "$tool" >/dev/null || { echo "schemathesis.sh: $tool is required" >&2; exit 2; }
done

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cargo build --quiet --bin tollgate
bin="${CARGO_TARGET_DIR:-$root/target}/debug/tollgate"

# Two free ports, chosen by the kernel.
read -r proxy_port admin_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
admin="http://127.0.0.1:$admin_port"

cat >"$work/tollgate.toml" <<EOF
[proxy]
listen = "127.0.0.1:$proxy_port"

[admin]
listen = "127.0.0.1:$admin_port"

[store]
backend = "embedded"
path = "$work/tollgate.db"

[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["http://127.0.0.1:9"]
EOF

master="$("$bin" keygen --kind master)"
TOLLGATE_MASTER_KEY="$master" "$bin" serve --config "$work/tollgate.toml" \
    >"$work/server.log" 2>&1 &
server_pid=$!

for _ in $(seq 1 100); do
    if curl -fsS "$admin/healthz" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "schemathesis.sh: tollgate did not start:" >&2
        cat "$work/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
curl -fsS "$admin/healthz" >/dev/null

# POST $1 with body $2 as the master key; prints the field $3 of the answer.
create() {
    curl -fsS -X POST "$admin$1" -H "Authorization: Bearer $master" \
        -H 'Content-Type: application/json' -d "$2" |
        python3 -c "import json, sys; print(json.load(sys.stdin)['$3'])"
}
# The account under test and its own key (protected, so that fuzzing cannot deactivate it); for
# each run a key and a site to fuzz and a key to delete; two more accounts for PATCH and DELETE,
# so that neither disables the first.
account="$(create /v1/accounts '{"name":"schemathesis"}' id)"
own_key="$(create "/v1/accounts/$account/keys" '{"name":"own","type":"secret","protected":true}' key)"
patched="$(create /v1/accounts '{"name":"patched"}' id)"
deleted="$(create /v1/accounts '{"name":"deleted"}' id)"

# $1: the run's name; $2: its bearer credential. Writes $work/$1.toml.
config() {
    local key_id doomed_id site_id
    key_id="$(create "/v1/accounts/$account/keys" "{\"name\":\"$1\",\"ttl\":\"30d\"}" id)"
    doomed_id="$(create "/v1/accounts/$account/keys" "{\"name\":\"$1 doomed\"}" id)"
    site_id="$(create "/v1/accounts/$account/sites" "{\"name\":\"https://$1.example.com\"}" id)"
    cat >"$work/$1.toml" <<EOF
[auth.openapi.bearer]
bearer = "$2"

[parameters]
"path.account_id" = "$account"
"path.key_id" = "$key_id"
"path.site_id" = "$site_id"

[[operations]]
include-name = "DELETE /v1/account/keys/{key_id}"
parameters = { "path.key_id" = "$doomed_id" }

[[operations]]
include-name = "DELETE /v1/accounts/{account_id}/keys/{key_id}"
parameters = { "path.key_id" = "$doomed_id" }

[[operations]]
include-name = "PATCH /v1/accounts/{account_id}"
parameters = { "path.account_id" = "$patched" }

[[operations]]
include-name = "DELETE /v1/accounts/{account_id}"
parameters = { "path.account_id" = "$deleted" }
EOF
}
config account "$own_key"
config operator "$master"

seed="${ST_SEED:-1}"
seed_args=(--seed "$seed")
if [[ "$seed" == "random" ]]; then
    seed_args=()
fi

# $1: config file; the rest: which operations.
fuzz() {
    local config_file="$1"
    shift
    # shellcheck disable=SC2086 # ST_EXTRA is a list of arguments
    st --config-file "$config_file" run "$root/docs/openapi.json" \
        --url "$admin" \
        --checks not_a_server_error,status_code_conformance \
        --max-examples "${ST_MAX_EXAMPLES:-25}" \
        --workers "${ST_WORKERS:-1}" \
        "${seed_args[@]}" \
        --no-color \
        "$@" ${ST_EXTRA:-}
}

# The account's own paths with its key, then everything else with the master key: two runs,
# because schemathesis 4.32 has per-operation `auth` for Basic only, and per-operation `headers`
# leaked into other operations' requests when tried.
own_paths='^/v1/account(/|$)'
status=0
echo "=== /v1/account/... with the account's own key ==="
fuzz "$work/account.toml" --include-path-regex "$own_paths" || status=$?
echo "=== everything else with the master key ==="
fuzz "$work/operator.toml" --exclude-path-regex "$own_paths" || status=$?

if [[ "$status" -ne 0 ]]; then
    echo "schemathesis.sh: schemathesis reported failures (exit $status); server log:" >&2
    grep -E "ERROR|WARN|panicked" "$work/server.log" | tail -n 20 >&2 || true
fi
exit "$status"

#!/usr/bin/env bash
# Checks the deployment files without a Docker engine or a cluster:
#   - deploy/Dockerfile builds with the same cargo command as CI (.ci/run runs it);
#   - every config under deploy/ passes `tollgate check-config`, with the environment its
#     deployment gives it;
#   - deploy/tollgate.service passes `systemd-analyze verify` (ExecStart pointed at the built
#     binary in a temporary copy, since /usr/local/bin/tollgate need not exist) and stays under
#     an exposure score of 2.0 in `systemd-analyze security`;
#   - deploy/kubernetes/base renders with `kubectl kustomize`, and the rendered objects validate
#     against the Kubernetes API schemas with `kubernetes-validate` (PyPI) when it is installed;
#   - deploy/docker-compose.yml validates against the compose spec with `check-jsonschema`
#     (PyPI) when it is installed.
# A tool that is missing is skipped with a message. The alert rules and dashboards have their
# own script, deploy/prometheus/check.sh.
#
#   bash deploy/check.sh        # after `cargo build` (or `cargo test`); TOLLGATE_BIN=… to choose
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
fail() {
  echo "FAIL: $*" >&2
  failed=1
}
skip() { echo "skip: $*"; }

# --- Dockerfile ---------------------------------------------------------------------------------
# The image's one `cargo build` line is run, as it stands, by .ci/run: a change to either that
# is not made to both fails here.
build=$(sed -n 's/^RUN \(cargo build .*\)$/\1/p' deploy/Dockerfile)
if [ -z "$build" ] || [ "$(grep -c 'cargo build' deploy/Dockerfile)" -ne 1 ]; then
  fail "deploy/Dockerfile needs exactly one 'RUN cargo build …' line"
elif grep -qxF "$build" .ci/run; then
  echo "ok: deploy/Dockerfile builds with '$build', which .ci/run runs"
else
  fail "deploy/Dockerfile builds with '$build', which .ci/run does not run"
fi

# --- the configs, with their deployments' environment -------------------------------------------
bin=${TOLLGATE_BIN:-}
if [ -z "$bin" ]; then
  for candidate in target/debug/tollgate target/release/tollgate; do
    if [ -x "$candidate" ]; then
      bin=$candidate
      break
    fi
  done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "deploy/check.sh: no tollgate binary: run cargo build first, or set TOLLGATE_BIN" >&2
  exit 1
fi
bin=$(realpath "$bin")

# check-config CONFIG [NAME=VALUE…]: in an environment holding only the given variables.
check_config() {
  local config=$1
  shift
  if env -i PATH="$PATH" "$@" "$bin" check-config --config "$config" >/dev/null; then
    echo "ok: $config passes check-config"
  else
    fail "$config fails check-config (with ${*:-no variables})"
  fi
}
check_config deploy/docker/tollgate.toml
check_config deploy/docker/tollgate-redis.toml
check_config deploy/kubernetes/base/tollgate.toml \
  TOLLGATE__STORE__REDIS_URL=redis://redis:6379 \
  TOLLGATE_IDENTITY_SECRET=check-sh-placeholder-of-32-bytes-or-more
# The systemd unit's Environment= with the config its header installs.
check_config config/tollgate.toml TOLLGATE__STORE__PATH=/var/lib/tollgate/tollgate.db

# --- systemd unit -------------------------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
  unit_dir=$(mktemp -d)
  trap 'rm -rf "$unit_dir"' EXIT
  sed "s|^ExecStart=/usr/local/bin/tollgate |ExecStart=$bin |" deploy/tollgate.service \
    >"$unit_dir/tollgate.service"
  grep -q "^ExecStart=$bin " "$unit_dir/tollgate.service" ||
    fail "deploy/tollgate.service: ExecStart does not start /usr/local/bin/tollgate"
  # verify prints nothing for a clean unit; any line (an unknown directive, a bad value) fails.
  if out=$(systemd-analyze verify "$unit_dir/tollgate.service" 2>&1) && [ -z "$out" ]; then
    echo "ok: deploy/tollgate.service passes systemd-analyze verify"
  else
    fail "deploy/tollgate.service: systemd-analyze verify: ${out:-exit status $?}"
  fi
  if out=$(systemd-analyze security --offline=true --threshold=20 \
    "$unit_dir/tollgate.service" 2>&1); then
    echo "ok: deploy/tollgate.service exposure: $(echo "$out" | tail -n 1)"
  else
    fail "deploy/tollgate.service: systemd-analyze security: $(echo "$out" | tail -n 3)"
  fi
else
  skip "systemd-analyze not found: deploy/tollgate.service not verified"
fi

# --- Kubernetes ---------------------------------------------------------------------------------
if command -v kubectl >/dev/null; then
  rendered=$(mktemp)
  if kubectl kustomize deploy/kubernetes/base >"$rendered"; then
    echo "ok: deploy/kubernetes/base renders ($(grep -c '^kind:' "$rendered") objects)"
    if command -v kubernetes-validate >/dev/null; then
      # 1.30: the oldest release with the preStop sleep action on by default. ServiceMonitor
      # has no schema there (a CRD) and is only warned about.
      if kubernetes-validate --strict --quiet --no-warn -k 1.30.0 "$rendered"; then
        echo "ok: deploy/kubernetes/base validates against Kubernetes 1.30's API"
      else
        fail "deploy/kubernetes/base: kubernetes-validate"
      fi
    else
      skip "kubernetes-validate not found (pip install kubernetes-validate): schemas not checked"
    fi
  else
    fail "deploy/kubernetes/base: kubectl kustomize"
  fi
  rm -f "$rendered"
else
  skip "kubectl not found: deploy/kubernetes/base not rendered"
fi

# --- compose ------------------------------------------------------------------------------------
# Every file or directory it mounts from the repo must exist: Docker would create a missing one
# as an empty directory, and Prometheus or Grafana would start without their config.
while read -r source; do
  if [ -e "deploy/$source" ]; then
    echo "ok: deploy/docker-compose.yml mounts deploy/$source"
  else
    fail "deploy/docker-compose.yml mounts deploy/$source, which does not exist"
  fi
done < <(sed -n 's|^ *- \./\([^:]*\):.*|\1|p' deploy/docker-compose.yml)
if command -v check-jsonschema >/dev/null; then
  if check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml >/dev/null; then
    echo "ok: deploy/docker-compose.yml follows the compose spec"
  else
    fail "deploy/docker-compose.yml: check-jsonschema --builtin-schema vendor.compose-spec"
  fi
else
  skip "check-jsonschema not found (pip install check-jsonschema): compose file not checked"
fi

exit "$failed"

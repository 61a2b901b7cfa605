#!/usr/bin/env bash
# Checks the Prometheus and Grafana files with promtool: the config (which also checks rules.yml,
# named in its rule_files), the rules alone, the rules' unit tests in rules_test.yml, and the
# PromQL of every dashboard query (Grafana's variables replaced by plain values).
# Run from anywhere: bash deploy/prometheus/check.sh
# promtool comes with Debian's prometheus package: apt-get install -y prometheus
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v promtool >/dev/null; then
  echo "check.sh: promtool not found. Install it with: apt-get install -y prometheus" >&2
  exit 1
fi

promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml

# Each dashboard query becomes a recording rule, so that promtool parses it.
queries=$(mktemp --suffix=.yml)
trap 'rm -f "$queries"' EXIT
python3 - deploy/grafana/dashboards/*.json >"$queries" <<'PY'
import json, sys

def targets(panels):
    for panel in panels:
        yield from panel.get("targets", [])
        yield from targets(panel.get("panels", []))

print("groups:\n  - name: dashboard-queries\n    rules:")
for path in sys.argv[1:]:
    with open(path) as f:
        dashboard = json.load(f)
    for n, t in enumerate(targets(dashboard["panels"])):
        expr = t["expr"]
        for var, value in [("$__rate_interval", "1m"), ("$__range", "1h"),
                           ("$instance", ".*"), ("$route", ".*")]:
            expr = expr.replace(var, value)
        print(f"      - record: dashboard:query{n}\n        expr: {json.dumps(expr)}")
PY
echo "Checking the queries of deploy/grafana/dashboards/*.json"
promtool check rules "$queries"

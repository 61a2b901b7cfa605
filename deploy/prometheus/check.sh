#!/usr/bin/env bash
# Checks the Prometheus files with promtool: the config (which also checks rules.yml, named in
# its rule_files), the rules alone, and the rules' unit tests in rules_test.yml.
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

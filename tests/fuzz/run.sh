#!/usr/bin/env bash
# A short coverage-guided run of every fuzz target (docs/FUZZING.md), each for FUZZ_SECONDS
# (default 20), starting from the committed seeds. A crash stops the script with its input
# saved under tests/fuzz/artifacts/<target>/. Usage: tests/fuzz/run.sh [target…]
#
# cargo-fuzz asks for a nightly toolchain; RUSTC_BOOTSTRAP=1 lets the stable one take its
# flags, and `--sanitizer none` leaves out AddressSanitizer (which needs nightly's -Zsanitizer;
# the code under test has no `unsafe`, so a panic or a failed assertion is what a finding is).
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds="${FUZZ_SECONDS:-20}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(credential config path headers admin_json usage_query)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
# `-a`: debug assertions and overflow checks on, so that an integer overflow is a finding too.
flags=(--fuzz-dir tests/fuzz --sanitizer none -a)
cargo fuzz build "${flags[@]}"

for t in "${targets[@]}"; do
  echo "=== fuzz $t for ${seconds}s"
  # New inputs go to the ignored corpus/<t>/run/ (the first directory), never among the seeds.
  work="tests/fuzz/corpus/$t/run"
  mkdir -p "$work"
  cargo fuzz run "${flags[@]}" "$t" "$work" "tests/fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 -timeout=20
done

#!/bin/bash
# Runs every fuzz target for FUZZ_SECS seconds (default 60), starting from its corpus in
# fuzz/corpus/<target> (kept in the repo; new finds go to a scratch directory, not the repo).
# A crash stops the run with the failing input under fuzz/artifacts/<target>/: turn it into a
# regression test next to the code it broke. scripts/test.sh runs this when CI=true (or
# PB_FUZZ=1). cargo-fuzz (installed here if missing) drives libFuzzer; on a stable toolchain it
# needs RUSTC_BOOTSTRAP=1. No sanitizer: the crate forbids unsafe code, so a panic is the
# failure we look for, and the build stays short.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${FUZZ_SECS:-60}
targets=(translate jwt ws_message spool)
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2 --quiet
fi
export RUSTC_BOOTSTRAP=1
# `cargo fuzz run` builds what it needs (the first target builds the crate and its
# dependencies, the others only themselves); a separate `cargo fuzz build` would use other
# debug-info settings and build everything twice.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  echo "== fuzz $t for ${secs}s"
  if ! cargo fuzz run --sanitizer none "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1; then
    tail -n 40 "$scratch/$t.log" >&2
    echo "fuzz-smoke: $t failed; the input is under fuzz/artifacts/$t/ (make it a regression test)" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added)' "$scratch/$t.log" || true
done
echo "fuzz-smoke: ${#targets[@]} targets ran ${secs}s each without a failure"

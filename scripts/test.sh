#!/bin/bash
# The test command (README, .ci/run). On a fresh machine it installs and starts everything the
# tests need, then runs formatting and lint checks and the whole suite:
#   - ejabberd from Debian's packages (if missing), and the shared test node on 127.0.0.1:25xxx
#     (tests that restart or reconfigure a server start their own private nodes);
#   - PostgreSQL (installed if missing, started if not running; tests create a fresh database
#     each, and tests that stop Postgres run their own throwaway clusters);
#   - RabbitMQ (installed if missing, the machine's node started if not running; each AMQP
#     test declares its own exchange and queue, the restart test runs a private node);
#   - Prosody 0.12 + prosody-modules (each Prosody test runs its own instance);
#   - nats-server with JetStream (Debian's package; each replica test runs its own server on
#     a free port with a temporary store, never the machine's);
#   - docker-compose, promtool and systemd-analyze, which validate compose.yaml, the alert
#     rules and the systemd unit (tests/deploy.rs; no container engine is needed or used);
#   - the pinned standardwebhooks PyPI package in a venv under target/ (the webhook tests'
#     receiver verifies every signature with it);
#   - wrk, which the presence-loadgen smoke test drives;
#   - Debian's Chromium and the pinned playwright-core npm package for the dashboard test
#     (screenshots in target/test-artifacts/);
#   - after the suite: schemathesis (pinned, in a venv under target/) against the running
#     service's OpenAPI document with all checks on (scripts/schemathesis.sh), and, when
#     CI=true (or PB_FUZZ=1), every fuzz target for FUZZ_SECS=60 s (scripts/fuzz-smoke.sh);
# and stops what it started. PB_KEEP_SERVERS=1 leaves the shared ejabberd running for the next
# run; PB_SKIP_LINT=1 skips fmt/clippy. Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh ejabberd postgres rabbitmq prosody deploy-tools chromium node python-venv curl wrk nats
scripts/start-postgres.sh
scripts/start-rabbitmq.sh
# The webhook tests' receiver verifies with the standardwebhooks package (pinned, in a venv).
scripts/webhook-venv.sh >/dev/null
# playwright-core (pinned in tests/browser/package-lock.json) drives Debian's Chromium; it
# never downloads a browser of its own.
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

cleanup() {
  if [ "${PB_KEEP_SERVERS:-0}" != 1 ]; then
    bash scripts/ejabberd/stop.sh >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
bash scripts/ejabberd/start.sh

if [ "${PB_SKIP_LINT:-0}" != 1 ]; then
  echo "== cargo fmt --check"
  cargo fmt --all -- --check
  echo "== cargo clippy --all-targets -- -D warnings"
  cargo clippy --all-targets --quiet -- -D warnings
fi

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  echo "(cargo-nextest not found: using cargo test)"
  cargo test --workspace --no-fail-fast "$@"
fi

echo "== API properties (schemathesis)"
scripts/schemathesis.sh target/debug/presence-bridge

if [ "${CI:-}" = true ] || [ "${PB_FUZZ:-0}" = 1 ]; then
  echo "== fuzz smoke runs"
  scripts/fuzz-smoke.sh
fi

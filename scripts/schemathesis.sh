#!/bin/bash
# Property-based API testing: schemathesis (pinned, in a venv this script creates under
# target/) generates requests from the bridge's own /api/v1/openapi.json and checks every
# answer against the document with all checks on (no 5xx, documented status codes, content
# types, headers and schemas, bad input rejected, valid input accepted, auth enforced,
# unsupported methods answered 405). It runs against `presence-bridge run` with a fresh
# Postgres database. A bounded number of examples keeps it near a minute.
#   scripts/schemathesis.sh [BINARY]    (default target/debug/presence-bridge)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${1:-target/debug/presence-bridge}
venv=target/schemathesis-venv
version=4.32.5
if [ "$("$venv/bin/st" --version 2>/dev/null)" != "st, version $version" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi
[ -x "$bin" ] || cargo build --quiet
# The service as operators run it: Postgres (a fresh database) for history, connected to the
# test suite's ejabberd node (started here if it is not running) as bridge.localhost, the
# component the tests never lease.
bash scripts/ejabberd/start.sh >/dev/null
db=pb_schemathesis
psql -h 127.0.0.1 -U postgres -XAtqc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
psql -h 127.0.0.1 -U postgres -XAtqc "CREATE DATABASE $db" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
spool=$(mktemp -d)
export PRESENCE_BRIDGE__XMPP__SERVER=127.0.0.1:25347 PRESENCE_BRIDGE__XMPP__PASSWORD=secret
export PRESENCE_BRIDGE__XMPP__COMPONENT=bridge.localhost PRESENCE_BRIDGE__XMPP__DOMAINS='[localhost]'
export PRESENCE_BRIDGE__STORE__POSTGRES_URL="postgres://postgres@127.0.0.1:5432/$db"
export PRESENCE_BRIDGE__STORE__SPOOL_DIR="$spool" PRESENCE_BRIDGE__HTTP__BIND="127.0.0.1:$port"
export PRESENCE_BRIDGE__AUTH__JWT_SECRET="schemathesis-$RANDOM$RANDOM"
# The reconciler reads the shared ejabberd node's session list (POST /api/v1/admin/reconcile answers 200).
export PRESENCE_BRIDGE__RECONCILE__KIND=ejabberd PRESENCE_BRIDGE__RECONCILE__URL=http://127.0.0.1:25280/api
token=$("$bin" token --sub schemathesis --scope admin --ttl 3600 --config /dev/null 2>/dev/null || "$bin" token --sub schemathesis --scope admin --ttl 3600)
"$bin" run >/dev/null 2>&1 &
bridge=$!
trap 'kill "$bridge" 2>/dev/null || true; wait "$bridge" 2>/dev/null || true; rm -rf "$spool"; psql -h 127.0.0.1 -U postgres -XAtqc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
base="http://127.0.0.1:$port"
for _ in $(seq 1 200); do
  curl -fs "$base/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "$base/readyz" >/dev/null || { echo "schemathesis: the bridge did not become ready" >&2; exit 1; }
echo "== schemathesis $version against $base (all checks)"
# /api/v1/ws is a WebSocket upgrade, not a request/response operation: its handshake and
# frames are tested by the Rust suite (tests/api.rs, tests/hardening.rs).
PYTHONPATH=scripts SCHEMATHESIS_HOOKS=schemathesis_hooks \
"$venv/bin/st" --config-file scripts/schemathesis.toml run "$base/api/v1/openapi.json" \
  --url "$base" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --exclude-path /api/v1/ws \
  --max-examples "${ST_EXAMPLES:-200}" \
  --workers 1 \
  --seed 42 \
  --no-color

#!/bin/bash
# Does rejecting cost less than serving? The release binary, memory mode, no XMPP server; wrk
# (-t2 -c64, 8 s, keep-alive) with one token on GET /api/v1/last-seen/{unknown JID} (served:
# a 404 after token verification and a map lookup), with the limits off, at their defaults
# (the token is far past its quota: nearly every answer is a 429), and on but never reached.
#   cargo build --release && benches/rate-limit.sh        (figures in docs/benchmarks.md)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=$PWD/target/release/presence-bridge
command -v wrk >/dev/null || scripts/install-deps.sh wrk
cd "$(mktemp -d)"   # no config/bridge.toml here: the environment is the whole config
run() { # $1 = label, rest = env
  local label=$1; shift
  local port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  env "$@" PRESENCE_BRIDGE__XMPP__SERVER=127.0.0.1:9 PRESENCE_BRIDGE__XMPP__PASSWORD=x \
    PRESENCE_BRIDGE__AUTH__JWT_SECRET=bench-secret PRESENCE_BRIDGE__HTTP__BIND=127.0.0.1:$port \
    RUST_LOG=warn $bin run 2>/dev/null &
  local pid=$!
  sleep 1
  local tok=$(PRESENCE_BRIDGE__XMPP__PASSWORD=x PRESENCE_BRIDGE__AUTH__JWT_SECRET=bench-secret $bin token --sub hot --ttl 600 2>/dev/null)
  local out=$(wrk -t2 -c64 -d8s -H "Authorization: Bearer $tok" http://127.0.0.1:$port/api/v1/last-seen/nobody@example.com)
  echo "$label: $(echo "$out" | grep Requests/sec) $(echo "$out" | grep -i non-2xx)"
  kill $pid; wait $pid 2>/dev/null
}
run "limits off (404 served)" PRESENCE_BRIDGE__HTTP__RATE_LIMIT_PER_TOKEN=0 PRESENCE_BRIDGE__HTTP__RATE_LIMIT_PER_IP=0
run "defaults (mostly 429)"
run "per-token only (mostly 429)" PRESENCE_BRIDGE__HTTP__RATE_LIMIT_PER_IP=0
run "limits on, never exceeded" PRESENCE_BRIDGE__HTTP__RATE_LIMIT_PER_TOKEN=1000000 PRESENCE_BRIDGE__HTTP__RATE_LIMIT_PER_IP=1000000 PRESENCE_BRIDGE__HTTP__RATE_LIMIT_BURST=1000000

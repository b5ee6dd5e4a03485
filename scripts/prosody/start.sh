#!/bin/bash
# Start a private Prosody 0.12 (+ prosody-modules mod_privilege) WITHOUT systemd from
# prosody.cfg.lua.tmpl, wait until its ports answer, and register PR_USERS. Installs the
# packages when missing (root). Each test runs its own instance on its own ports.
# Env: PR_RUN_DIR (required) PR_C2S_PORT PR_COMPONENT_PORT (required)
#      PR_HOST [localhost] PR_COMPONENT_DOMAIN [bridge.localhost] PR_COMPONENT_SECRET [secret]
#      PR_USERS ["" ] (password = user + "pw")
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${PR_RUN_DIR:?}" "${PR_C2S_PORT:?}" "${PR_COMPONENT_PORT:?}"
: "${PR_HOST:=localhost}" "${PR_COMPONENT_DOMAIN:=bridge.localhost}" "${PR_COMPONENT_SECRET:=secret}" "${PR_USERS:=}"
command -v prosody >/dev/null || "$DIR/../install-deps.sh" prosody
CFG="$PR_RUN_DIR/prosody.cfg.lua"
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pid=$(cat "$PR_RUN_DIR/prosody.pid" 2>/dev/null || true)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
  mkdir -p "$PR_RUN_DIR/data" "$PR_RUN_DIR/certs"
  sed -e "s|@RUN_DIR@|$PR_RUN_DIR|g" -e "s/@XMPP_HOST@/$PR_HOST/g" -e "s/@C2S_PORT@/$PR_C2S_PORT/g" \
      -e "s/@COMPONENT_PORT@/$PR_COMPONENT_PORT/g" -e "s/@COMPONENT_DOMAIN@/$PR_COMPONENT_DOMAIN/g" \
      -e "s/@COMPONENT_SECRET@/$PR_COMPONENT_SECRET/g" \
      "$DIR/prosody.cfg.lua.tmpl" > "$CFG"
  chown -R prosody:prosody "$PR_RUN_DIR"
  rm -f "$PR_RUN_DIR/prosody.pid"
  # The prosody binary does not drop root itself (only prosodyctl does): start it as 'prosody'.
  timeout 20 runuser -u prosody -- prosody --config "$CFG" -D
fi
for _ in $(seq 1 80); do
  port_open "$PR_C2S_PORT" && port_open "$PR_COMPONENT_PORT" && break; sleep 0.25
done
port_open "$PR_C2S_PORT" || { echo "prosody not ready; see $PR_RUN_DIR/prosody.err" >&2; exit 1; }
for u in $PR_USERS; do
  [ -f "$PR_RUN_DIR/data/${PR_HOST//./%2e}/accounts/$u.dat" ] && continue
  timeout 20 runuser -u prosody -- prosodyctl --config "$CFG" register "$u" "$PR_HOST" "${u}pw" >/dev/null
done
echo "prosody ready: pid $(cat "$PR_RUN_DIR/prosody.pid") c2s=127.0.0.1:$PR_C2S_PORT component=127.0.0.1:$PR_COMPONENT_PORT"

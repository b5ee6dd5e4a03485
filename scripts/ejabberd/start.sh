#!/bin/bash
# Start a private ejabberd node (Debian package 23.01) for the tests, WITHOUT systemd, from
# ejabberd.yml.tmpl, and wait until it is ready. Idempotent and safe to call concurrently
# (flock): if the node already runs with the same config it only re-checks readiness.
# Installs ejabberd from Debian's packages when it is missing. Adapted from shared/xmpp-lab.
#
# Environment: see env.sh (EJ_NAME, EJ_*_PORT, EJ_COMPONENTS, EJ_PRIVILEGE, EJ_USERS, ...).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$DIR/env.sh"

[ "$(id -u)" = 0 ] || { echo "run as root (ejabberdctl switches to the ejabberd user itself)" >&2; exit 1; }
if ! command -v ejabberdctl >/dev/null; then
  "$DIR/../install-deps.sh" ejabberd
fi
id ejabberd >/dev/null 2>&1 || { echo "system user 'ejabberd' missing (package not installed?)" >&2; exit 1; }

mkdir -p "$EJ_RUN_DIR"
exec 9>"$EJ_RUN_DIR.lock"
flock 9

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

render_config() {  # writes etc/ejabberd.yml.new and etc/ejabberdctl.cfg.new
  mkdir -p "$EJ_RUN_DIR/etc" "$EJ_RUN_DIR/spool" "$EJ_RUN_DIR/logs"
  local privblock="" listeners="" acl="" c port=$EJ_COMPONENT_PORT
  for c in $EJ_COMPONENTS; do
    listeners+="  -
    port: $port
    ip: \"127.0.0.1\"
    module: ejabberd_service
    hosts:
      \"$c\":
        password: \"$EJ_COMPONENT_SECRET\"
"
    acl+="      - \"$c\"
"
    port=$((port + 1))
  done
  if [ "$EJ_PRIVILEGE" = 1 ]; then
    privblock="  mod_privilege:
    roster:
      $EJ_PRIVILEGE_ROSTER: bridge_privileged
    presence:
      $EJ_PRIVILEGE_PRESENCE: bridge_privileged"
    [ "$EJ_PRIVILEGE_ROSTER" = none ] && privblock="  mod_privilege:
    presence:
      $EJ_PRIVILEGE_PRESENCE: bridge_privileged"
  fi
  LISTENERS="$listeners" ACL="$acl" PRIV="$privblock" awk '
    /@COMPONENT_LISTENERS@/ { printf "%s", ENVIRON["LISTENERS"]; next }
    /@COMPONENT_ACL@/   { printf "%s", ENVIRON["ACL"]; next }
    /@PRIVILEGE_BLOCK@/ { if (ENVIRON["PRIV"] != "") print ENVIRON["PRIV"]; next }
    { print }' "$DIR/ejabberd.yml.tmpl" |
  sed -e "s/@XMPP_HOST@/$EJ_HOST/g" \
      -e "s/@C2S_PORT@/$EJ_C2S_PORT/g" \
      -e "s/@COMPONENT_PORT@/$EJ_COMPONENT_PORT/g" \
      -e "s/@HTTP_PORT@/$EJ_HTTP_PORT/g" \
      -e "s/@SM_RESUME_TIMEOUT@/$EJ_SM_RESUME_TIMEOUT/g" \
      -e "s/@LOGLEVEL@/$EJ_LOGLEVEL/g" \
      > "$EJ_RUN_DIR/etc/ejabberd.yml.new"
  # ejabberdctl sources this file (as root) before switching to the ejabberd user. It MUST be
  # ours: the default /etc/ejabberd/ejabberdctl.cfg would override --config.
  # ERL_DIST_PORT: no epmd daemon; INET_DIST_INTERFACE: loopback only.
  cat > "$EJ_RUN_DIR/etc/ejabberdctl.cfg.new" <<CFG
ERLANG_NODE=$EJ_NODE
ERL_DIST_PORT=$EJ_DIST_PORT
INET_DIST_INTERFACE=127.0.0.1
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
EJABBERD_CONFIG_PATH=$EJ_RUN_DIR/etc/ejabberd.yml
EJABBERD_PID_PATH=$EJ_RUN_DIR/ejabberd.pid
EJABBERD_BYPASS_WARNINGS=true
CFG
  cp /etc/ejabberd/inetrc "$EJ_RUN_DIR/etc/inetrc"
  chown -R ejabberd:ejabberd "$EJ_RUN_DIR"
}

wait_ready() {
  local deadline=$((SECONDS + EJ_READY_TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    if port_open "$EJ_C2S_PORT" && port_open "$EJ_COMPONENT_PORT" && port_open "$EJ_HTTP_PORT" \
       && ejctl status >/dev/null 2>&1; then
      return 0
    fi
    if [ -f "$EJ_RUN_DIR/ejabberd.pid" ] && ! kill -0 "$(cat "$EJ_RUN_DIR/ejabberd.pid")" 2>/dev/null; then
      echo "ejabberd process died; see $EJ_RUN_DIR/logs/" >&2; tail -n 20 "$EJ_RUN_DIR/logs/"*.log >&2 || true; return 1
    fi
    sleep 0.3
  done
  echo "ejabberd not ready after ${EJ_READY_TIMEOUT}s; see $EJ_RUN_DIR/logs/" >&2
  return 1
}

ensure_users() {
  local u out have
  [ -n "$EJ_USERS" ] || return 0
  have=" $(ejctl registered_users "$EJ_HOST" 2>/dev/null | tr '\n' ' ') "
  for u in $EJ_USERS; do
    case "$have" in *" $u "*) continue;; esac
    out=$(ejctl register "$u" "$EJ_HOST" "${u}pw" 2>&1) && continue
    case "$out" in *"already registered"*|*"conflict"*) ;; *) echo "register $u failed: $out" >&2; return 1;; esac
  done
}

is_running() {
  [ -f "$EJ_RUN_DIR/ejabberd.pid" ] && kill -0 "$(cat "$EJ_RUN_DIR/ejabberd.pid")" 2>/dev/null \
    && [ -f "$EJ_RUN_DIR/etc/ejabberdctl.cfg" ] && ejctl status >/dev/null 2>&1
}
install_config() {
  mv -f "$EJ_RUN_DIR/etc/ejabberd.yml.new" "$EJ_RUN_DIR/etc/ejabberd.yml"
  mv -f "$EJ_RUN_DIR/etc/ejabberdctl.cfg.new" "$EJ_RUN_DIR/etc/ejabberdctl.cfg"
}
start_node() {
  local p
  for p in "$EJ_C2S_PORT" "$EJ_COMPONENT_PORT" "$EJ_HTTP_PORT" "$EJ_DIST_PORT"; do
    if port_open "$p"; then
      echo "port 127.0.0.1:$p is already in use by another process (change EJ_*_PORT)" >&2
      exit 1
    fi
  done
  # A node killed without ejabberdctl stop (a machine or session that ended) leaves its pid
  # file behind; wait_ready would read that dead pid as "the new node died".
  rm -f "$EJ_RUN_DIR/ejabberd.pid"
  [ "$EJ_FRESH" = 1 ] && rm -rf "$EJ_RUN_DIR/spool" && mkdir -p "$EJ_RUN_DIR/spool" && chown ejabberd:ejabberd "$EJ_RUN_DIR/spool"
  install_config
  ejctl start 9>&-
}

t0=$SECONDS
render_config
if is_running; then
  if cmp -s "$EJ_RUN_DIR/etc/ejabberd.yml.new" "$EJ_RUN_DIR/etc/ejabberd.yml" \
     && cmp -s "$EJ_RUN_DIR/etc/ejabberdctl.cfg.new" "$EJ_RUN_DIR/etc/ejabberdctl.cfg" \
     && [ "$EJ_FRESH" != 1 ]; then
    rm -f "$EJ_RUN_DIR"/etc/*.new
  else
    echo "ejabberd node $EJ_NODE running with another config (or EJ_FRESH=1): restarting"
    "$DIR/stop.sh"
    start_node
  fi
else
  start_node
fi
wait_ready
ensure_users
echo "ejabberd ready in $((SECONDS - t0))s: node=$EJ_NODE pid=$(cat "$EJ_RUN_DIR/ejabberd.pid") c2s=127.0.0.1:$EJ_C2S_PORT component=127.0.0.1:$EJ_COMPONENT_PORT http=http://127.0.0.1:$EJ_HTTP_PORT/api privilege=$EJ_PRIVILEGE"

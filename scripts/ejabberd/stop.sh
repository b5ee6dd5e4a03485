#!/bin/bash
# Stop a test ejabberd node started by start.sh. Idempotent. Only touches the process whose
# PID is in $EJ_RUN_DIR/ejabberd.pid. EJ_KILL=1 skips the graceful stop (SIGKILL at once).
set -uo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$DIR/env.sh"
pidfile="$EJ_RUN_DIR/ejabberd.pid"
pid=$(cat "$pidfile" 2>/dev/null || true)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
  echo "ejabberd node $EJ_NODE not running"; rm -f "$pidfile"; exit 0
fi
t0=$SECONDS
if [ "${EJ_KILL:-0}" = 1 ]; then
  kill -9 "$pid"
else
  [ -f "$EJ_RUN_DIR/etc/ejabberdctl.cfg" ] && ejctl stop >/dev/null 2>&1
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "graceful stop timed out; SIGTERM $pid" >&2; kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { echo "SIGKILL $pid" >&2; kill -9 "$pid"; }
  fi
fi
for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
rm -f "$pidfile"
echo "ejabberd node $EJ_NODE stopped in $((SECONDS - t0))s (pid $pid)"

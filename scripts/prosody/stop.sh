#!/bin/bash
# Stop a Prosody started by start.sh (by the pid in PR_RUN_DIR). PR_KILL=1: SIGKILL at once
# (a crash: clients and the component see their TCP connections reset). Idempotent.
: "${PR_RUN_DIR:?}"
pid=$(cat "$PR_RUN_DIR/prosody.pid" 2>/dev/null || true)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then exit 0; fi
if [ "${PR_KILL:-0}" = 1 ]; then kill -9 "$pid"; else kill "$pid"; fi
for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
rm -f "$PR_RUN_DIR/prosody.pid"
exit 0

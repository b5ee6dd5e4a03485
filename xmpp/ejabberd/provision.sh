#!/bin/bash
# Put the bridge component in the roster of every registered user of a host (subscription
# "from"), through ejabberd's REST API (mod_http_api; the caller needs the add_rosteritem and
# registered_users permissions). Idempotent.
#   API=http://127.0.0.1:5280/api HOST=example.com COMPONENT=bridge.example.com xmpp/ejabberd/provision.sh
set -euo pipefail
: "${API:?e.g. http://127.0.0.1:5280/api}" "${HOST:?user domain}" "${COMPONENT:?component domain}"
users=$(curl -fsS -X POST "$API/registered_users" -d "{\"host\":\"$HOST\"}" | python3 -c 'import json,sys; print("\n".join(json.load(sys.stdin)))')
n=0
for u in $users; do
  curl -fsS -X POST "$API/add_rosteritem" \
    -d "{\"localuser\":\"$u\",\"localhost\":\"$HOST\",\"user\":\"\",\"server\":\"$COMPONENT\",\"nick\":\"presence-bridge\",\"group\":\"\",\"subs\":\"from\"}" >/dev/null
  n=$((n + 1))
done
echo "provisioned $n users of $HOST with $COMPONENT"

#!/bin/bash
# The venv of the webhook tests' receiver (tests/webhooks/receiver.py): the Standard Webhooks
# reference package, pinned, under target/. Prints the venv's python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=target/webhook-venv
version=1.1.0
if ! "$venv/bin/python" -c "import standardwebhooks, importlib.metadata as m; assert m.version('standardwebhooks') == '$version'" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "standardwebhooks==$version"
fi
echo "$venv/bin/python"

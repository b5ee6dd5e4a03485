#!/bin/bash
# ejabberdctl for a test node, e.g.:  scripts/ejabberd/ctl.sh connected_users
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$DIR/env.sh"
ejctl "$@"

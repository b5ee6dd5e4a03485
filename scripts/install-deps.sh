#!/bin/bash
# Installs what the test suite needs from Debian's packages, only what is missing.
#   scripts/install-deps.sh [ejabberd] [postgres] [rabbitmq] [prosody] [deploy-tools] [chromium] [node] [python-venv] [curl] [wrk] [nats] ...   (no argument: ejabberd postgres)
set -euo pipefail
want=("$@"); [ ${#want[@]} -gt 0 ] || want=(ejabberd postgres)
pkgs=()
for w in "${want[@]}"; do
  case "$w" in
    ejabberd) command -v ejabberdctl >/dev/null || pkgs+=(ejabberd) ;;
    rabbitmq) command -v rabbitmq-server >/dev/null || pkgs+=(rabbitmq-server) ;;
    prosody) { command -v prosody >/dev/null && [ -e /usr/lib/prosody/modules/mod_privilege ]; } || pkgs+=(prosody prosody-modules lua-unbound) ;;
    deploy-tools) { command -v docker-compose >/dev/null && command -v promtool >/dev/null && command -v systemd-analyze >/dev/null; } || pkgs+=(docker-compose prometheus systemd) ;;
    wrk) command -v wrk >/dev/null || pkgs+=(wrk) ;;
    nats) command -v nats-server >/dev/null || pkgs+=(nats-server) ;;
    chromium) [ -x /usr/bin/chromium ] || pkgs+=(chromium) ;;
    node) command -v npm >/dev/null || pkgs+=(nodejs npm) ;;
    curl) command -v curl >/dev/null || pkgs+=(curl) ;;
    python-venv) python3 -m venv --help >/dev/null 2>&1 || pkgs+=(python3-venv) ;;
    postgres) { command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; } || pkgs+=(postgresql) ;;
    *) echo "install-deps: unknown component $w" >&2; exit 2 ;;
  esac
done
[ ${#pkgs[@]} -eq 0 ] && exit 0
[ "$(id -u)" = 0 ] || { echo "install-deps: need root to apt-get install ${pkgs[*]}" >&2; exit 1; }
exec 8>/tmp/presence-bridge-apt.lock
flock 8
echo "install-deps: apt-get install ${pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps Debian's own ejabberd/postgres services from starting on install when the
# image has it; our scripts start private nodes on their own ports either way.
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null

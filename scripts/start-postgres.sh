#!/bin/bash
# Makes sure the machine's PostgreSQL answers on 127.0.0.1:5432 as user postgres without a
# password (the tests create and drop their own databases there). Starts the Debian cluster if
# it is not running; on a fresh install, allows trust for postgres from loopback.
set -euo pipefail
ok() { psql -h 127.0.0.1 -p 5432 -U postgres -XAtqc 'SELECT 1' >/dev/null 2>&1; }
ok && exit 0
ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
[ -n "$ver" ] || { echo "start-postgres: no PostgreSQL cluster found (install postgresql)" >&2; exit 1; }
hba=/etc/postgresql/$ver/main/pg_hba.conf
if ! grep -qE '^host\s+all\s+postgres\s+127\.0\.0\.1/32\s+trust' "$hba"; then
  # Test machines only: loopback trust for postgres, ahead of the stock rules.
  sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
fi
pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect "$ver" main reload || true
for _ in $(seq 1 60); do ok && exit 0; sleep 0.5; done
echo "start-postgres: PostgreSQL did not come up on 127.0.0.1:5432" >&2
exit 1

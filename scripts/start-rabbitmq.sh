#!/bin/bash
# Makes sure the machine's RabbitMQ answers on 127.0.0.1:5672 (guest/guest over loopback: the
# AMQP source's tests declare their own exchange and queue there). Starts Debian's node without
# systemd if it is not running. Tests that stop the broker run private nodes (tests/common/rabbit.rs).
set -euo pipefail
port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
port_open && exit 0
command -v rabbitmq-server >/dev/null || { echo "start-rabbitmq: rabbitmq-server is not installed" >&2; exit 1; }
rabbitmq-server -detached
for _ in $(seq 1 120); do port_open && exit 0; sleep 0.5; done
echo "start-rabbitmq: RabbitMQ did not come up on 127.0.0.1:5672 (see /var/log/rabbitmq/)" >&2
exit 1

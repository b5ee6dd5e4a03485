# Shared defaults for start.sh / stop.sh / ctl.sh (sourced). Adapted from shared/xmpp-lab.
# Every value can be overridden from the environment; tests give each private node its own
# EJ_NAME, ports and run dir so that several nodes run side by side.
: "${EJ_NAME:=shared}"
: "${EJ_RUN_DIR:=${TMPDIR:-/tmp}/presence-bridge-test/ejabberd-$EJ_NAME}"
: "${EJ_NODE:=pbtest_${EJ_NAME}@localhost}"
: "${EJ_HOST:=localhost}"
: "${EJ_C2S_PORT:=25222}"
: "${EJ_COMPONENT_PORT:=25347}"
: "${EJ_HTTP_PORT:=25280}"
: "${EJ_DIST_PORT:=25210}"
# Space-separated component domains, all with the same secret, each on its own listener:
# the Nth (from 0) on port EJ_COMPONENT_PORT+N. The shared test node serves many, so that
# concurrent tests each hold their own (two connections for one domain split the stanzas).
: "${EJ_COMPONENTS:=bridge.localhost $(for i in $(seq 1 32); do printf 'bridge%s.localhost ' "$i"; done)}"
: "${EJ_COMPONENT_SECRET:=secret}"
: "${EJ_PRIVILEGE:=0}"
: "${EJ_PRIVILEGE_PRESENCE:=managed_entity}"
: "${EJ_PRIVILEGE_ROSTER:=both}"
: "${EJ_SM_RESUME_TIMEOUT:=30}"
: "${EJ_USERS:=alice bob carol}"
: "${EJ_LOGLEVEL:=warning}"
: "${EJ_FRESH:=0}"
: "${EJ_READY_TIMEOUT:=90}"
# ejabberdctl bound to OUR node/config (never the Debian default one).
ejctl() {
  ejabberdctl --config-dir "$EJ_RUN_DIR/etc" \
              --ctl-config "$EJ_RUN_DIR/etc/ejabberdctl.cfg" \
              --config "$EJ_RUN_DIR/etc/ejabberd.yml" \
              --spool "$EJ_RUN_DIR/spool" \
              --logs "$EJ_RUN_DIR/logs" "$@"
}

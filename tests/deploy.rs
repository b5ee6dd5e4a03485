//! The deployment artefacts validate with the real tools (no container engine runs here):
//! compose.yaml with Debian's docker-compose 1.29 (`config`), the systemd unit with
//! `systemd-analyze verify`, the alert rules with `promtool check rules` and `promtool test
//! rules`, the Grafana dashboard and alerts name only metrics the bridge exports, the
//! MongooseIM recipes are valid TOML with the options the bridge relies on, and the config
//! compose gives the bridge passes `check-config`. `scripts/test.sh` installs the tools
//! (`scripts/install-deps.sh deploy-tools`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Output};

use common::*;
use figment::Figment;
use figment::providers::{Format, Toml};

fn tool(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!("{cmd} is missing ({e}): run scripts/install-deps.sh deploy-tools")
        })
}

fn ok(o: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    text
}

#[test]
fn compose_file_validates_with_and_without_the_amqp_override() {
    let o = tool(
        "docker-compose",
        &["--env-file", "deploy/compose.env.example", "config"],
    );
    let base = ok(&o);
    // Health-gated start, named volumes, secrets from the env file, non-public component.
    for want in [
        "condition: service_healthy",
        "bridge-spool:",
        "postgres-data:",
        "PRESENCE_BRIDGE__XMPP__PASSWORD: change-me-component",
        "/usr/lib/mongooseim/etc/mongooseim.toml",
    ] {
        assert!(base.contains(want), "{want} missing from:\n{base}");
    }
    assert!(
        !base.contains("8888:8888"),
        "the component port is not published"
    );
    let o = tool(
        "docker-compose",
        &[
            "--env-file",
            "deploy/compose.env.example",
            "-f",
            "compose.yaml",
            "-f",
            "deploy/compose.amqp.yaml",
            "--profile",
            "amqp",
            "config",
        ],
    );
    let amqp = ok(&o);
    assert!(amqp.contains("PRESENCE_BRIDGE__AMQP__URL"), "{amqp}");
    assert!(amqp.contains("rabbitmq:"), "{amqp}");
    // A missing secret is an error, not an empty password.
    let o = Command::new("docker-compose")
        .args(["--env-file", "/dev/null", "config"])
        .current_dir(repo())
        .env_remove("XMPP_COMPONENT_SECRET")
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "compose must refuse to run without secrets"
    );
}

#[test]
fn the_config_compose_gives_the_bridge_is_valid() {
    let o = Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .args(["check-config", "--config", "deploy/bridge.compose.toml"])
        .current_dir(repo())
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", "s")
        .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", "j")
        .env(
            "PRESENCE_BRIDGE__STORE__POSTGRES_URL",
            "postgres://bridge:p@postgres:5432/presence",
        )
        .env("PRESENCE_BRIDGE__RECONCILE__PASSWORD", "a")
        .output()
        .unwrap();
    let text = ok(&o);
    assert!(text.contains("kind = \"mongooseim\""), "{text}");
    assert!(!text.contains("bridge:p@"), "secrets masked: {text}");
}

#[test]
fn systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo().join("deploy/presence-bridge.service")).unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = unit.replace(
        "/usr/local/bin/presence-bridge",
        env!("CARGO_BIN_EXE_presence-bridge"),
    );
    for want in [
        "DynamicUser=yes",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.contains(want), "{want}");
    }
    let path = dir.path().join("presence-bridge.service");
    std::fs::write(&path, unit).unwrap();
    let o = tool("systemd-analyze", &["verify", path.to_str().unwrap()]);
    let text = ok(&o);
    assert!(
        !text.contains("presence-bridge.service:"),
        "no warning about the unit itself:\n{text}"
    );
}

#[test]
fn alert_rules_check_and_their_unit_tests_pass() {
    ok(&tool(
        "promtool",
        &["check", "rules", "deploy/prometheus/alerts.yml"],
    ));
    let o = Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .unwrap();
    ok(&o);
}

/// Every `presence_bridge_*` name the README documents (the metrics paragraphs; the service's
/// tests prove each is exported with a live value).
fn documented() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    words(&readme)
}

fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("presence_bridge_"))
        .map(|w| {
            let w = w.trim_end_matches('_');
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = w.strip_suffix(suffix)
                    && base.ends_with("_seconds")
                {
                    return base.to_owned();
                }
            }
            w.to_owned()
        })
        .collect()
}

/// MongooseIM's own metrics the dashboard sets beside ours.
const MONGOOSEIM_METRICS: [&str; 3] = [
    "sm_session_count",
    "sm_unique_sessions_count",
    "xmpp_element_in_presence_count",
];

#[test]
fn dashboard_and_alerts_name_only_metrics_the_bridge_exports() {
    let known = documented();
    assert!(known.len() > 30, "README documents the metrics: {known:?}");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/presence-bridge.json")).unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    exprs.push(
        dash["templating"]["list"][0]["query"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    assert!(exprs.len() >= 20);
    let mut used = BTreeSet::new();
    for e in &exprs {
        let ours = words(e);
        let theirs = MONGOOSEIM_METRICS.iter().any(|m| e.contains(m));
        assert!(
            !ours.is_empty() || theirs,
            "query names no known metric: {e}"
        );
        used.extend(ours);
    }
    let unknown: Vec<_> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "dashboard queries unknown metrics: {unknown:?}"
    );
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let in_alerts = words(&alerts);
    let unknown: Vec<_> = in_alerts.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "alerts use unknown metrics: {unknown:?}"
    );
    // The signals an operator needs are covered.
    for m in [
        "presence_bridge_xmpp_connected",
        "presence_bridge_store_spooled_events",
        "presence_bridge_online_users",
        "presence_bridge_stanza_to_ws_seconds",
    ] {
        assert!(used.contains(m), "dashboard shows {m}");
    }
}

#[test]
fn mongooseim_recipes_are_valid_toml_with_what_the_bridge_needs() {
    for (file, listener, shaper) in [
        ("xmpp/mongooseim/mongooseim-6.4.toml", "component", "shaper"),
        (
            "xmpp/mongooseim/mongooseim-6.3.toml",
            "service",
            "shaper_rule",
        ),
        (
            "xmpp/mongooseim/compose/mongooseim.toml",
            "component",
            "shaper",
        ),
    ] {
        let v: serde_json::Value = Figment::from(Toml::file_exact(repo().join(file)))
            .extract()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let l = &v["listen"][listener][0];
        assert_eq!(l["conflict_behaviour"], "kick_old", "{file}");
        assert!(l[shaper].is_string(), "{file}: {shaper}");
        assert!(l["password"].is_string(), "{file}");
        let http = v["listen"]["http"].as_array().unwrap();
        let handlers: Vec<String> = http
            .iter()
            .flat_map(|h| h["handlers"].as_object().unwrap().keys().cloned())
            .collect();
        for h in ["mongoose_admin_api", "mongoose_graphql_handler"] {
            assert!(handlers.iter().any(|x| x == h), "{file}: {h}");
        }
        assert_eq!(
            v["modules"]["mod_event_pusher"]["rabbit"]["presence_exchange"]["name"], "presence",
            "{file}"
        );
        assert!(v["modules"]["mod_roster"].is_object(), "{file}");
    }
}

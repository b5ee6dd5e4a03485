//! The real binary: exit codes, one-line fatal messages, masked secrets, graceful SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_presence-bridge"));
    c.env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("PRESENCE_BRIDGE__") {
            c.env_remove(k);
        }
    }
    // Every test process gets its own HTTP port.
    c.env("PRESENCE_BRIDGE__HTTP__BIND", "127.0.0.1:0");
    c
}

fn write_config(dir: &tempfile::TempDir, body: &str) -> std::path::PathBuf {
    let p = dir.path().join("bridge.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// Waits for the child to exit (giving up after PATIENCE); returns (code, stdout, stderr).
fn wait(mut child: Child) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            child.stdout.take().map(|mut s| s.read_to_string(&mut out));
            child.stderr.take().map(|mut s| s.read_to_string(&mut err));
            return (status.code(), out, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_with(config: &std::path::Path, envs: &[(&str, &str)]) -> Child {
    bin()
        .args(["run", "--config"])
        .arg(config)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn fatal_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("presence-bridge: fatal:"))
        .unwrap_or_else(|| panic!("no fatal line in stderr:\n{stderr}"))
}

#[test]
fn wrong_secret_is_fatal_with_one_clear_line() {
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &dir,
        &format!(
            "[xmpp]\nserver = \"127.0.0.1:{}\"\ncomponent = \"{}\"\npassword = \"definitely-wrong-secret\"\n",
            ej.component_port + lease.index,
            lease.domain
        ),
    );
    // No hot retry loop: the process ends by itself, with exit code 1.
    let (code, _, err) = wait(run_with(&cfg, &[]));
    assert_eq!(code, Some(1), "{err}");
    let line = fatal_line(&err);
    assert!(line.contains("xmpp.password"), "{line}");
    assert!(line.contains(&lease.domain), "{line}");
    assert!(
        !err.contains("definitely-wrong-secret"),
        "the secret leaked into the output:\n{err}"
    );
    assert_eq!(err.matches("XMPP component connected").count(), 0);
}

#[test]
fn unknown_component_domain_is_fatal_naming_the_key() {
    let ej = Ejabberd::shared();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &dir,
        &format!(
            "[xmpp]\nserver = \"127.0.0.1:{}\"\ncomponent = \"not-configured.localhost\"\npassword = \"{SECRET}\"\n",
            ej.component_port
        ),
    );
    let (code, _, err) = wait(run_with(&cfg, &[]));
    assert_eq!(code, Some(1), "{err}");
    let line = fatal_line(&err);
    assert!(line.contains("xmpp.component"), "{line}");
}

#[test]
fn unreachable_server_is_retried_with_backoff_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there
    let cfg = write_config(
        &dir,
        &format!(
            "[xmpp]\nserver = \"127.0.0.1:{port}\"\npassword = \"x\"\nreconnect_min_secs = 0.1\nreconnect_max_secs = 0.4\n[log]\nformat = \"json\"\n"
        ),
    );
    let child = run_with(&cfg, &[]);
    let pid = child.id();
    // Wait until it has failed a few times (it keeps retrying: not fatal).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let (code, _, err) = wait(child);
    assert_eq!(code, Some(0), "{err}");
    let attempts = err
        .lines()
        .filter(|l| l.contains("XMPP connect failed"))
        .count();
    assert!(attempts >= 2, "retries expected:\n{err}");
    for l in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some(), "{l}");
    }
    assert!(
        err.contains("xmpp.server"),
        "the connect error names the key:\n{err}"
    );
    assert!(err.contains("shutting down"));
    assert!(
        err.contains("store.postgres_url is not set"),
        "memory-only mode is announced:\n{err}"
    );
}

#[test]
fn invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, "[xmpp]\npassword = \"x\"\nserver = \"no-port\"\n");
    let out = bin().args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("xmpp.server"), "{err}");

    // Environment overrides are validated too.
    let cfg = write_config(&dir, "[xmpp]\npassword = \"x\"\n");
    let out = bin()
        .args(["run", "--config"])
        .arg(&cfg)
        .env("PRESENCE_BRIDGE__HTTP__BIND", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http.bind"));

    // A missing explicit config file is bad usage too.
    let out = bin()
        .args(["run", "--config", "/nonexistent/bridge.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // Unknown subcommand / flag.
    let out = bin().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("jwt.secret");
    std::fs::write(&secret_file, "jwt-hunter2\n").unwrap();
    let cfg = write_config(
        &dir,
        &format!(
            "[xmpp]\npassword = \"xmpp-hunter2\"\n[auth]\njwt_secret_file = \"{}\"\n[store]\npostgres_url = \"postgres://app:db-hunter2@127.0.0.1/presence\"\n",
            secret_file.display()
        ),
    );
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter2"), "secret printed:\n{text}");
    assert!(
        text.contains("postgres://app:***@127.0.0.1/presence"),
        "{text}"
    );
    assert!(
        text.contains("[xmpp]") && text.contains("password = \"***\""),
        "{text}"
    );

    let out = bin()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("PRESENCE_BRIDGE__XMPP__DOMAINS", "[]")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("xmpp.domains"));
}

#[test]
fn the_example_configs_optional_sections_are_valid_when_enabled() {
    let example = std::fs::read_to_string(repo().join("config/bridge.example.toml")).unwrap();
    let enabled: String = example
        .lines()
        .map(|l| l.strip_prefix("#> ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(enabled.contains("[amqp]") && enabled.contains("[reconcile]"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.toml");
    std::fs::write(&path, enabled).unwrap();
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[amqp]") && stdout.contains("[reconcile]") && stdout.contains("[cluster]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("amqp://guest:***@"),
        "the AMQP URL is masked: {stdout}"
    );
    assert!(
        !stdout.contains("change-me\""),
        "the reconcile password is masked: {stdout}"
    );
    assert!(
        stdout.contains("[[webhooks]]") && stdout.contains("[alerts]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("masked)\nwebhooks_max_attempts = 10\nwebhooks_timeout_secs = 10"),
        "top-level keys come first: {stdout}"
    );
    assert!(
        !stdout.contains("whsec_"),
        "the webhook secret is masked: {stdout}"
    );
}

#[test]
fn amqp_alone_is_a_source_and_no_source_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.toml");
    std::fs::write(
        &path,
        "[xmpp]\ndomains = [\"localhost\"]\n[amqp]\nurl = \"amqp://127.0.0.1/%2f\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&path, "[xmpp]\ndomains = [\"localhost\"]\n").unwrap();
    let out = bin().args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("xmpp.password") && err.contains("[amqp]"),
        "{err}"
    );
    std::fs::write(&path, "[amqp]\nurl = \"http://nope\"\n").unwrap();
    let out = bin().args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("amqp.url"));
}

#[test]
fn shipped_configs_are_valid() {
    for f in ["config/bridge.toml", "config/bridge.example.toml"] {
        let out = bin()
            .args(["check-config", "--config"])
            .arg(repo().join(f))
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn demo_backfills_history_so_analytics_have_a_past() {
    use std::io::BufRead;
    let mut demo = bin()
        .args([
            "demo",
            "--users",
            "40",
            "--bind",
            "127.0.0.1:0",
            "--backfill-hours",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(u) = line.trim().strip_prefix("Dashboard:") {
                let _ = tx.send(u.trim().to_string());
            }
        }
    });
    let url = rx.recv_timeout(PATIENCE).expect("the demo prints its URL");
    let (base, token) = url.split_once("/#token=").unwrap();
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let now = chrono::Utc::now();
    let from =
        (now - chrono::Duration::hours(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let to =
        (now - chrono::Duration::minutes(30)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let auth = format!("Bearer {token}");
    let deadline = std::time::Instant::now() + PATIENCE * 6;
    // The backfill runs at the engine's pace: wait until the first simulated hours are in.
    let body = loop {
        let r = request(
            port,
            "GET",
            &format!("/api/v1/analytics/concurrency?from={from}&to={to}&step=900"),
            &[("Authorization", &auth)],
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text);
        let b = r.json();
        let points = b["points"].as_array().unwrap().clone();
        if points.iter().all(|p| p["users"].as_u64().unwrap() > 0) {
            break b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no backfilled history: {b}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(body["points"].as_array().unwrap().len(), 6);
    // Sessions and clients of the simulated past.
    let r = request(
        port,
        "GET",
        &format!("/api/v1/analytics/clients?from={from}&to={to}"),
        &[("Authorization", &auth)],
        None,
    );
    assert!(
        r.json()["rows"].as_array().unwrap().len() >= 3,
        "{}",
        r.text
    );
    let _ = demo.kill();
    let _ = demo.wait();
}

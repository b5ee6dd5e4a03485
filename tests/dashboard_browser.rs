//! The dashboard in a real headless Chromium (Debian's `chromium`, driven by playwright-core):
//! users appear, live changes arrive without reload, search, detail, lookup, bad token; the
//! Analytics and Replay views over a backfilled demo (chart with the peak, leaderboards, the
//! slider and play against the API's map at T, CSV exports). The screenshots land in `target/test-artifacts/`. `scripts/test.sh` installs Chromium and the
//! npm package.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};

use common::*;
use presence_bridge::app::Ingest;
use presence_bridge::presence::Show;

/// Installs playwright-core if needed; the folder of the browser scripts.
fn browser_dir() -> std::path::PathBuf {
    let dir = repo().join("tests/browser");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists()
            || std::env::var_os("CHROMIUM").is_some(),
        "Chromium is missing: run scripts/test.sh (it installs Debian's chromium)"
    );
    if !dir.join("node_modules/playwright-core").exists() {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm");
        assert!(ok.success(), "npm ci in tests/browser failed");
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_text_is_shown_without_bidi_overrides_or_invisible_characters() {
    let dir = browser_dir();
    let app = TestApp::start(test_config(), Ingest::None).await;
    let raw = "\u{202E}gnp.exe\u{200B} back\u{2066} soon\u{FEFF}";
    app.engine()
        .apply(event(
            1,
            "bidi@example.com",
            "phone",
            chrono::Utc::now(),
            available(Show::Chat, raw, 0, None),
        ))
        .await
        .unwrap();
    app.engine().barrier().await.unwrap();
    let t = token("admin", None);
    // The API keeps the raw text (history and integrations see what was sent).
    let (_, body, _) = app.get("/api/v1/presence/bidi@example.com", Some(&t));
    assert_eq!(body["status"], raw);
    let url = format!("http://127.0.0.1:{}/#token={t}", app.port);
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("status_text.mjs"))
            .args([url.as_str(), "bidi@example.com", "gnp.exe back soon"])
            .output()
            .expect("node")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("ALL OK"), "{text}");
    app.stop().await;
}

/// A running `presence-bridge demo` with these extra arguments, and its dashboard URL.
fn demo(args: &[&str]) -> (std::process::Child, String) {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .args(["demo", "--bind", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let stderr = demo.stderr.take().unwrap();
    // With a backfill, wait for its end: until then the past is still being written, and a
    // view and the API asked a moment apart could see different pasts.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("simulated history backfilled") {
                let _ = done_tx.send(());
            }
        }
    });
    // Read the URL, then keep draining stdout in the background (never close the pipe under
    // a running process).
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
    let url = rx
        .recv_timeout(common::PATIENCE)
        .expect("demo printed its dashboard URL");
    assert!(url.contains("#token="), "{url}");
    let backfill = args
        .windows(2)
        .any(|w| w[0] == "--backfill-hours" && w[1] != "0");
    if backfill {
        done_rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the demo logged the end of its backfill");
    }
    (demo, url)
}

/// Runs a browser script, then stops the demo; asserts the script said ALL OK and the demo
/// stopped cleanly on SIGTERM.
fn run_script(mut demo: std::process::Child, script: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new("node")
        .arg(browser_dir().join(script))
        .args(args)
        .output()
        .expect("node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    let _ = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status();
    let status = demo.wait().unwrap();
    assert!(out.status.success(), "browser test failed:\n{text}");
    assert!(text.contains("ALL OK"), "{text}");
    assert_eq!(status.code(), Some(0), "the demo stops cleanly on SIGTERM");
}

fn artifacts() -> std::path::PathBuf {
    let dir = repo().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_strip_shows_a_flapping_user() {
    let dir = browser_dir();
    let mut cfg = test_config();
    cfg.alerts.flapping_transitions = 4;
    let app = TestApp::start(cfg, Ingest::None).await;
    let now = chrono::Utc::now();
    for i in 0..4u128 {
        let kind = if i % 2 == 0 {
            available(Show::Chat, "", 0, None)
        } else {
            presence_bridge::presence::EventKind::Unavailable {
                status: None,
                reason: None,
            }
        };
        app.engine()
            .apply(event(
                i + 1,
                "flappy@example.com",
                "r",
                now + chrono::Duration::seconds(i as i64),
                kind,
            ))
            .await
            .unwrap();
    }
    app.engine().barrier().await.unwrap();
    let t = token("presence:read", None);
    common::eventually("alert raised", || {
        let (_, b, _) = app.get("/api/v1/alerts", Some(&t));
        b["alerts"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    let url = format!("http://127.0.0.1:{}/#token={t}", app.port);
    let shot = artifacts().join("alerts.png");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("alerts.mjs"))
            .args([
                url.as_str(),
                "flappy@example.com is flapping: 4 online/offline changes",
            ])
            .arg(&shot)
            .output()
            .expect("node")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("ALL OK"), "{text}");
    app.stop().await;
}

#[test]
fn dashboard_in_headless_chromium() {
    // No backfill: the live view is what this test measures (the history views have their
    // own test below).
    let (demo, url) = demo(&["--users", "300", "--backfill-hours", "0"]);
    let shot = artifacts().join("dashboard.png");
    run_script(demo, "dashboard.mjs", &[url.as_ref(), shot.as_os_str()]);
    assert!(shot.exists(), "screenshot saved");
}

#[test]
fn analytics_and_replay_views_in_headless_chromium() {
    // Two hours of simulated past: the views have a history to chart, replay and export.
    let (demo, url) = demo(&["--users", "200", "--backfill-hours", "2"]);
    let dir = artifacts();
    run_script(demo, "analytics.mjs", &[url.as_ref(), dir.as_os_str()]);
    for f in ["analytics.png", "analytics-phone-dark.png", "replay.png"] {
        assert!(dir.join(f).exists(), "{f} saved");
    }
}

/// A dashboard on a follower replica (contract §11) says which replica it is on and whose
/// follower, and shows what the leader sequences, live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_dashboard_names_its_replica_and_shows_the_leaders_changes() {
    let dir = browser_dir();
    let nats = Nats::private();
    let cfg = |node: &str| {
        let mut c = test_config();
        c.cluster = Some(presence_bridge::config::ClusterConfig {
            nats_url: presence_bridge::config::DbUrl::new(nats.url()),
            node_id: node.into(),
            failover_secs: std::time::Duration::from_secs(2),
            ..Default::default()
        });
        c
    };
    let a = TestApp::start(cfg("alpha"), Ingest::None).await;
    common::eventually("alpha leads", || {
        a.get("/readyz", None).1["role"] == "leader"
    })
    .await;
    let b = TestApp::start(cfg("beta"), Ingest::None).await;
    let t = token("presence:read", None);
    let url = format!("http://127.0.0.1:{}/#token={t}", b.port);
    let engine = a.engine().clone();
    let feeder = tokio::spawn(async move {
        for i in 0..40u128 {
            engine
                .apply(event(
                    i + 1,
                    "replicated@example.com",
                    "phone",
                    chrono::Utc::now(),
                    available(Show::Away, &format!("step {i}"), 0, None),
                ))
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let shot = artifacts().join("dashboard-follower.png");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("replica.mjs"))
            .args([
                url.as_str(),
                "replica beta (follower of alpha)",
                "replicated@example.com",
                "step 39",
            ])
            .env("SHOT", &shot)
            .output()
            .expect("node")
    })
    .await
    .unwrap();
    feeder.await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("ALL OK"), "{text}");
    b.stop().await;
    a.stop().await;
}

//! The dashboard in a real headless Chromium (Debian's `chromium`, driven by playwright-core):
//! users appear, live changes arrive without reload, search, detail, lookup, bad token. The
//! screenshots land in `target/test-artifacts/`. `scripts/test.sh` installs Chromium and the
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

#[test]
fn dashboard_in_headless_chromium() {
    let browser_dir = browser_dir();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        // No backfill: the live view is what this test measures (analytics are tested in
        // tests/analytics.rs and cli.rs).
        .args([
            "demo",
            "--users",
            "300",
            "--bind",
            "127.0.0.1:0",
            "--backfill-hours",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
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
    let artifacts = repo().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let out = Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .arg(&url)
        .arg(&shot)
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
    assert!(shot.exists(), "screenshot saved");
    assert_eq!(status.code(), Some(0), "the demo stops cleanly on SIGTERM");
}

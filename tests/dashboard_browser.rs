//! The dashboard in a real headless Chromium (Debian's `chromium`, driven by playwright-core):
//! users appear, live changes arrive without reload, search, detail, lookup, bad token. The
//! screenshots land in `target/test-artifacts/`. `scripts/test.sh` installs Chromium and the
//! npm package.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};

use common::repo;

#[test]
fn dashboard_in_headless_chromium() {
    let browser_dir = repo().join("tests/browser");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists()
            || std::env::var_os("CHROMIUM").is_some(),
        "Chromium is missing: run scripts/test.sh (it installs Debian's chromium)"
    );
    if !browser_dir.join("node_modules/playwright-core").exists() {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&browser_dir)
            .status()
            .expect("npm");
        assert!(ok.success(), "npm ci in tests/browser failed");
    }
    let mut demo = Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .args(["demo", "--users", "300", "--bind", "127.0.0.1:0"])
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

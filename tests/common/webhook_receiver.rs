//! The webhook receiver of the tests: tests/webhooks/receiver.py, which verifies every
//! delivery with the `standardwebhooks` package in the venv `scripts/webhook-venv.sh` makes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{PATIENCE, repo};

/// A running receiver.
#[derive(Debug)]
pub struct Receiver {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    pub fn start() -> Receiver {
        let python = repo().join("target/webhook-venv/bin/python");
        if !python.exists() {
            let ok = Command::new("bash")
                .arg(repo().join("scripts/webhook-venv.sh"))
                .stdout(Stdio::null())
                .status()
                .expect("scripts/webhook-venv.sh");
            assert!(ok.success(), "scripts/webhook-venv.sh failed");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let port_file = dir.path().join("port");
        let log = dir.path().join("log.jsonl");
        let child = Command::new(python)
            .arg(repo().join("tests/webhooks/receiver.py"))
            .arg(&port_file)
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .expect("python receiver");
        let deadline = Instant::now() + PATIENCE;
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file)
                && let Ok(p) = p.trim().parse::<u16>()
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the receiver did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        Receiver {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// How `path` answers: `ok`, `fail:N`, `fail` or `hang`; `secret` verifies its deliveries.
    pub fn set(&self, path: &str, secret: &str, mode: &str) {
        let body = serde_json::json!({ path: {"secret": secret, "mode": mode} }).to_string();
        let r = super::http::request(
            self.port,
            "POST",
            "/_config",
            &[("Content-Type", "application/json")],
            Some(&body),
        );
        assert_eq!(r.status, 204, "{}", r.text);
    }

    /// Every delivery so far (of one path), in arrival order.
    pub fn received(&self, path: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["path"] == path)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

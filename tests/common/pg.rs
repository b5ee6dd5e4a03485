//! Postgres for tests.

use std::path::PathBuf;
use std::process::Command;

use super::{free_port, unique_user};

/// Postgres for tests: the machine's server with a fresh database per test, or a private
/// throwaway cluster (initdb into a temp dir, own port) for tests that stop Postgres.
#[derive(Debug)]
pub struct Pg {
    pub port: u16,
    pub db: String,
    /// Private cluster data dir (None for the shared server).
    dir: Option<PathBuf>,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn psql(port: u16, db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-XAtqc",
            sql,
        ])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Pg {
    /// A fresh database on the machine's server (127.0.0.1:5432, trust for postgres).
    pub fn shared(tag: &str) -> Pg {
        let db = format!("pbt_{}", unique_user(tag));
        psql(5432, "postgres", &format!("CREATE DATABASE {db}"));
        Pg {
            port: 5432,
            db,
            dir: None,
        }
    }

    /// A private cluster on a free port with one database; stopped and deleted on drop.
    pub fn private(tag: &str) -> Pg {
        let dir = std::env::temp_dir()
            .join("presence-bridge-test")
            .join(format!("pg-{}", unique_user(tag)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pg dir");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(chown.success());
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(dir.join("data"))
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Pg {
            port: free_port(),
            db: "pbt".into(),
            dir: Some(dir),
        };
        pg.start();
        psql(pg.port, "postgres", "CREATE DATABASE pbt");
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, self.db)
    }

    fn ctl(&self, args: &[&str]) {
        let dir = self.dir.as_ref().expect("private cluster");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            dir.display()
        );
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-o", &opts, "-l"])
            .arg(dir.join("log"))
            .args(args)
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a private cluster (waits until it accepts connections).
    pub fn start(&self) {
        self.ctl(&["-w", "start"]);
    }

    /// Stops a private cluster at once (in-flight connections are cut).
    pub fn stop(&self) {
        self.ctl(&["-w", "-m", "immediate", "stop"]);
    }

    pub fn query(&self, sql: &str) -> String {
        psql(self.port, &self.db, sql)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        match &self.dir {
            Some(dir) => {
                let _ = Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(pg_bin("pg_ctl"))
                    .arg("-D")
                    .arg(dir.join("data"))
                    .args(["-w", "-m", "immediate", "stop"])
                    .output();
                let _ = std::fs::remove_dir_all(dir);
            }
            None => {
                let _ = Command::new("psql")
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-U",
                        "postgres",
                        "-d",
                        "postgres",
                        "-XAtqc",
                    ])
                    .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db))
                    .output();
            }
        }
    }
}

//! Test harness: real ejabberd nodes (scripts/ejabberd), REST provisioning, a minimal but real
//! XMPP client over plain TCP, and the bridge running in-process.
//!
//! Parallel safety: the shared node serves many component domains; each test leases one with
//! an exclusive file lock, and names its users uniquely (pid + tag). Tests that stop or
//! reconfigure a server start a private node on free ports and stop it on drop.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use presence_bridge::config::XmppConfig;
use presence_bridge::presence::{Change, Engine, UserJid, UserPresence};
use presence_bridge::xmpp::{self, ComponentHandle, FatalError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "secret";
/// Generous upper bound for anything to happen; tests never assert on wall-clock time, they
/// only give up after this.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn init_logs() {
    presence_bridge::telemetry::init(
        presence_bridge::config::LogFormat::Text,
        "presence_bridge=debug,info",
    );
}

/// A free TCP port on 127.0.0.1 (bound then released: good enough on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A unique user name for this process and tag.
pub fn unique_user(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One ejabberd node run by scripts/ejabberd.
#[derive(Debug)]
pub struct Ejabberd {
    pub name: String,
    pub c2s: u16,
    pub component_port: u16,
    pub http: u16,
    pub dist: u16,
    pub privilege: bool,
    /// Private nodes are stopped on drop; the shared one is left for the next test.
    private: bool,
}

impl Ejabberd {
    /// The shared node (the test command starts it; started here if not running).
    pub fn shared() -> Ejabberd {
        let n = Ejabberd {
            name: "shared".into(),
            c2s: 25222,
            component_port: 25347,
            http: 25280,
            dist: 25210,
            privilege: false,
            private: false,
        };
        if !n.api_ok() {
            n.script("start.sh", &[]);
        }
        n
    }

    /// A private node on free ports, fresh spool; stopped on drop.
    pub fn private(tag: &str, privilege: bool) -> Ejabberd {
        let n = Ejabberd {
            name: format!("{tag}{}", std::process::id()),
            c2s: free_port(),
            component_port: free_port(),
            http: free_port(),
            dist: free_port(),
            privilege,
            private: true,
        };
        n.script("start.sh", &[("EJ_FRESH", "1")]);
        n
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("EJ_NAME".to_string(), self.name.clone()),
            ("EJ_C2S_PORT".into(), self.c2s.to_string()),
            ("EJ_COMPONENT_PORT".into(), self.component_port.to_string()),
            ("EJ_HTTP_PORT".into(), self.http.to_string()),
            ("EJ_DIST_PORT".into(), self.dist.to_string()),
            (
                "EJ_PRIVILEGE".into(),
                if self.privilege { "1" } else { "0" }.into(),
            ),
            ("EJ_USERS".into(), String::new()),
        ];
        if self.private {
            v.push(("EJ_COMPONENTS".into(), "bridge.localhost".into()));
        }
        v
    }

    fn script(&self, name: &str, extra: &[(&str, &str)]) {
        let out = Command::new("bash")
            .arg(repo().join("scripts/ejabberd").join(name))
            .envs(self.env())
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .output()
            .expect("run ejabberd script");
        assert!(
            out.status.success(),
            "scripts/ejabberd/{name} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop(&self) {
        self.script("stop.sh", &[]);
    }

    /// Kills the node at once (no goodbye to anyone).
    pub fn kill(&self) {
        self.script("stop.sh", &[("EJ_KILL", "1")]);
    }

    /// Starts it again with its spool (users and rosters survive).
    pub fn start(&self) {
        self.script("start.sh", &[]);
    }

    /// The beam PID (for SIGSTOP/SIGCONT tests).
    pub fn pid(&self) -> u32 {
        let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        let p = Path::new(&dir)
            .join("presence-bridge-test")
            .join(format!("ejabberd-{}", self.name))
            .join("ejabberd.pid");
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .parse()
            .expect("pid")
    }

    fn api_ok(&self) -> bool {
        matches!(http_post(self.http, "/api/status", "{}"), Ok((200, _)))
    }

    /// POST /api/<cmd> on the node's REST API; panics on a non-200.
    pub fn api(&self, cmd: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, text) = http_post(self.http, &format!("/api/{cmd}"), &body.to_string())
            .unwrap_or_else(|e| panic!("ejabberd REST {cmd}: {e}"));
        assert_eq!(status, 200, "ejabberd REST {cmd} {body}: {text}");
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    }

    /// Registers `user@localhost` with password `user`+"pw".
    pub fn register(&self, user: &str) {
        self.api(
            "register",
            serde_json::json!({"user": user, "host": "localhost", "password": format!("{user}pw")}),
        );
    }

    /// Provisions the roster route: the component in the user's roster with subscription
    /// `from` (lab §4.3 `roster_provisioned`).
    pub fn add_bridge_to_roster(&self, user: &str, component: &str) {
        let r = self.api(
            "add_rosteritem",
            serde_json::json!({"localuser": user, "localhost": "localhost", "user": "",
                "server": component, "nick": "bridge", "group": "", "subs": "from"}),
        );
        assert_eq!(r, serde_json::json!(0), "add_rosteritem {user}");
    }

    /// A registered user with the roster route to `component`.
    pub fn user(&self, tag: &str, component: &str) -> String {
        let u = unique_user(tag);
        self.register(&u);
        self.add_bridge_to_roster(&u, component);
        u
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        if self.private {
            let _ = Command::new("bash")
                .arg(repo().join("scripts/ejabberd/stop.sh"))
                .envs(self.env())
                .env("EJ_KILL", "1")
                .output();
        }
    }
}

/// An exclusive lease on one of the shared node's component domains.
#[derive(Debug)]
pub struct ComponentLease {
    pub domain: String,
    /// Offset of its listener from the node's first component port.
    pub index: u16,
    _lock: File,
}

pub fn lease_component() -> ComponentLease {
    let dir = std::env::temp_dir().join("presence-bridge-test");
    std::fs::create_dir_all(&dir).expect("lock dir");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for i in 1..=32u16 {
            let f = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("component-{i}.lock")))
                .expect("lock file");
            if f.try_lock().is_ok() {
                return ComponentLease {
                    domain: format!("bridge{i}.localhost"),
                    index: i,
                    _lock: f,
                };
            }
        }
        assert!(Instant::now() < deadline, "no free component domain");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Minimal HTTP/1.1 POST over a fresh connection (loopback only).
pub fn http_post(port: u16, path: &str, body: &str) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad HTTP response: {text}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A real XMPP client (RFC 6120 over plain TCP, SASL PLAIN, resource binding), with
/// full control over how it leaves: unavailable, stream close, or TCP abort.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    pub jid: String,
}

impl Client {
    pub async fn login(port: u16, user: &str, resource: &str) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("c2s connect");
        let mut c = Client {
            stream,
            jid: format!("{user}@localhost/{resource}"),
        };
        let header = "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
        c.send(header).await;
        c.read_until("</stream:features>").await;
        let creds = base64_encode(format!("\0{user}\0{user}pw").as_bytes());
        c.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
        ))
        .await;
        let r = c.read_until_any(&["<success", "<failure"]).await;
        assert!(r.contains("<success"), "SASL failed for {user}: {r}");
        c.send(header).await;
        c.read_until("</stream:features>").await;
        c.send(&format!(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        ))
        .await;
        let r = c.read_until("</iq>").await;
        assert!(r.contains("result"), "bind failed: {r}");
        c
    }

    pub async fn send(&mut self, xml: &str) {
        self.stream
            .write_all(xml.as_bytes())
            .await
            .expect("client write");
    }

    /// Broadcast presence. `caps` is a XEP-0115 node.
    pub async fn presence(
        &mut self,
        show: Option<&str>,
        status: Option<&str>,
        priority: i8,
        caps: Option<&str>,
    ) {
        let mut x = String::from("<presence>");
        if let Some(node) = caps {
            x.push_str(&format!(
                "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='{node}' ver='QgayPKawpkPSDYmwT/WM94uAlu0='/>"
            ));
        }
        x.push_str(&format!("<priority>{priority}</priority>"));
        if let Some(s) = show {
            x.push_str(&format!("<show>{s}</show>"));
        }
        if let Some(s) = status {
            x.push_str(&format!("<status>{s}</status>"));
        }
        x.push_str("</presence>");
        self.send(&x).await;
    }

    pub async fn unavailable(&mut self, status: Option<&str>) {
        match status {
            Some(s) => {
                self.send(&format!(
                    "<presence type='unavailable'><status>{s}</status></presence>"
                ))
                .await
            }
            None => self.send("<presence type='unavailable'/>").await,
        }
    }

    /// `</stream:stream>` without an unavailable, then waits for the server to close.
    pub async fn close(mut self) {
        self.send("</stream:stream>").await;
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(n) = self.stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// TCP reset: no stream close, no unavailable (SO_LINGER 0 makes close() send RST).
    pub fn abort(self) {
        #[allow(deprecated)]
        let _ = self.stream.set_linger(Some(Duration::ZERO));
        drop(self.stream);
    }

    /// Reads until the server has sent something containing every one of `pats`.
    pub async fn expect(&mut self, pats: &[&str]) -> String {
        let mut acc = String::new();
        let mut buf = [0u8; 8192];
        let r = tokio::time::timeout(PATIENCE, async {
            while !pats.iter().all(|p| acc.contains(p)) {
                let n = self.stream.read(&mut buf).await.expect("client read");
                assert!(n > 0, "server closed the stream; got so far: {acc}");
                acc.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
        .await;
        assert!(r.is_ok(), "timeout waiting for {pats:?}; got: {acc}");
        acc
    }

    async fn read_until(&mut self, pat: &str) -> String {
        self.read_until_any(&[pat]).await
    }

    async fn read_until_any(&mut self, pats: &[&str]) -> String {
        let mut acc = String::new();
        let mut buf = [0u8; 8192];
        let r = tokio::time::timeout(PATIENCE, async {
            loop {
                let n = self.stream.read(&mut buf).await.expect("client read");
                assert!(n > 0, "server closed the stream; got so far: {acc}");
                acc.push_str(&String::from_utf8_lossy(&buf[..n]));
                if pats.iter().any(|p| acc.contains(p)) {
                    return;
                }
            }
        })
        .await;
        assert!(r.is_ok(), "timeout waiting for {pats:?}; got: {acc}");
        acc
    }
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The bridge's XMPP config for the shared node and a leased component.
pub fn xmpp_cfg(ej: &Ejabberd, lease: &ComponentLease) -> XmppConfig {
    xmpp_cfg_at(ej.component_port + lease.index, &lease.domain)
}

/// The bridge's XMPP config for a private node (one component, `bridge.localhost`).
pub fn xmpp_cfg_private(ej: &Ejabberd) -> XmppConfig {
    xmpp_cfg_at(ej.component_port, "bridge.localhost")
}

/// The bridge's XMPP config with test-friendly timings.
pub fn xmpp_cfg_at(port: u16, component: &str) -> XmppConfig {
    XmppConfig {
        server: format!("127.0.0.1:{port}"),
        component: component.into(),
        password: presence_bridge::config::Secret::new(SECRET),
        domains: vec!["localhost".into()],
        resync_grace_secs: 1.5,
        keepalive_secs: 5.0,
        keepalive_timeout_secs: 3.0,
        reconnect_min_secs: 0.2,
        reconnect_max_secs: 1.0,
        ..XmppConfig::default()
    }
}

/// The bridge in-process: engine + component supervisor.
#[derive(Debug)]
pub struct Bridge {
    pub engine: Engine,
    pub component: ComponentHandle,
    cancel: CancellationToken,
    task: Option<JoinHandle<Result<(), FatalError>>>,
}

impl Bridge {
    pub fn start(cfg: XmppConfig) -> Bridge {
        let (engine, _task) = Engine::start(&presence_bridge::config::PresenceConfig::default());
        Self::start_with(engine, cfg)
    }

    pub fn start_with(engine: Engine, cfg: XmppConfig) -> Bridge {
        let cancel = CancellationToken::new();
        let (component, task) = xmpp::spawn(cfg, engine.clone(), cancel.clone());
        Bridge {
            engine,
            component,
            cancel,
            task: Some(task),
        }
    }

    /// Stops the component (the engine lives on in the returned handle).
    pub async fn stop(mut self) -> Engine {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(PATIENCE, t)
                .await
                .expect("component stops");
            assert_eq!(r.expect("join"), Ok(()));
        }
        self.engine.clone()
    }

    pub async fn wait_status(&self, what: &str, pred: impl Fn(&xmpp::ConnectionStatus) -> bool) {
        let mut rx = self.component.watch();
        let r = tokio::time::timeout(PATIENCE, rx.wait_for(|s| pred(s))).await;
        assert!(
            r.is_ok(),
            "timeout waiting for status {what}; now {:?}",
            self.component.status()
        );
    }

    pub async fn connected(&self) {
        self.wait_status("connected", |s| s.connected).await;
    }

    /// Waits until the user's state satisfies `pred`; panics with the last state otherwise.
    pub async fn wait_user(
        &self,
        user: &str,
        what: &str,
        pred: impl Fn(&UserPresence) -> bool,
    ) -> Arc<UserPresence> {
        let jid = UserJid::parse(&format!("{user}@localhost")).expect("jid");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(p) = self.engine.get(&jid)
                && pred(&p)
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "timeout waiting for {user}: {what}; state: {:#?}",
                self.engine.get(&jid)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Collects the changes of one user from a hub subscription until `pred` holds for one.
pub async fn next_change(
    sub: &mut presence_bridge::presence::Subscription,
    user: &str,
) -> Arc<Change> {
    let jid = format!("{user}@localhost");
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            let c = sub.recv().await.expect("not lagged").expect("hub open");
            if c.jid.as_str() == jid {
                return c;
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("no change for {user} within {PATIENCE:?}"))
}

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

/// Polls `f` until it returns true (PATIENCE), with a message.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timeout waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

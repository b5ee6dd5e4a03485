//! Real ejabberd nodes (scripts/ejabberd) and their REST provisioning.
//!
//! Parallel safety: the shared node serves many component domains; each test leases one with
//! an exclusive file lock, and names its users uniquely (pid + tag). Tests that stop or
//! reconfigure a server start a private node on free ports and stop it on drop.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use presence_bridge::config::{Secret, XmppConfig};

use super::{free_port, http, repo, unique_user};

/// The component secret of every test node.
pub const SECRET: &str = "secret";

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
        matches!(
            http::try_request(self.http, "POST", "/api/status", &[], Some("{}")),
            Ok(r) if r.status == 200
        )
    }

    /// POST /api/<cmd> on the node's REST API; panics on a non-200.
    pub fn api(&self, cmd: &str, body: serde_json::Value) -> serde_json::Value {
        let r = http::request(
            self.http,
            "POST",
            &format!("/api/{cmd}"),
            &[],
            Some(&body.to_string()),
        );
        assert_eq!(r.status, 200, "ejabberd REST {cmd} {body}: {}", r.text);
        serde_json::from_str(&r.text).unwrap_or(serde_json::Value::String(r.text))
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
        password: Secret::new(SECRET),
        domains: vec!["localhost".into()],
        resync_grace_secs: Duration::from_millis(1500),
        keepalive_secs: Duration::from_secs(5),
        keepalive_timeout_secs: Duration::from_secs(3),
        reconnect_min_secs: Duration::from_millis(200),
        reconnect_max_secs: Duration::from_secs(1),
        ..XmppConfig::default()
    }
}

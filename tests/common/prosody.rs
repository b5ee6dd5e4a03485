//! Private Prosody 0.12 instances (scripts/prosody: Debian's prosody + prosody-modules'
//! mod_privilege, `presence = "managed_entity"`), one per test on free ports, stopped on drop.

use std::path::PathBuf;
use std::process::Command;

use super::{SECRET, free_port, repo, unique_user};

#[derive(Debug)]
pub struct Prosody {
    pub c2s: u16,
    pub component_port: u16,
    dir: PathBuf,
}

impl Prosody {
    /// Starts an instance with `users` registered (password = user + "pw").
    pub fn private(tag: &str, users: &[&str]) -> Prosody {
        let dir =
            std::env::temp_dir().join(format!("presence-bridge-test/prosody-{}", unique_user(tag)));
        let _ = std::fs::remove_dir_all(&dir);
        let p = Prosody {
            c2s: free_port(),
            component_port: free_port(),
            dir,
        };
        p.script("start.sh", &users.join(" "), false);
        p
    }

    fn script(&self, name: &str, users: &str, kill: bool) {
        let out = Command::new("bash")
            .arg(repo().join("scripts/prosody").join(name))
            .env("PR_RUN_DIR", &self.dir)
            .env("PR_C2S_PORT", self.c2s.to_string())
            .env("PR_COMPONENT_PORT", self.component_port.to_string())
            .env("PR_COMPONENT_SECRET", SECRET)
            .env("PR_USERS", users)
            .env("PR_KILL", if kill { "1" } else { "0" })
            .output()
            .expect("run scripts/prosody");
        assert!(
            out.status.success(),
            "scripts/prosody/{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it again (after `kill`), same data.
    pub fn start(&self) {
        self.script("start.sh", "", false);
    }

    /// SIGKILL: a crash; every TCP connection is reset and no session survives.
    pub fn kill(&self) {
        self.script("stop.sh", "", true);
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        self.script("stop.sh", "", false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

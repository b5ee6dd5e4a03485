//! Private NATS servers with JetStream (Debian's nats-server) for the replica tests: each test
//! its own server on a free port with a temporary store dir, so no test shares a stream; one
//! can be stopped and started again on the same port with its store intact.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{PATIENCE, free_port, unique_user};

/// A private nats-server; killed on drop.
#[derive(Debug)]
pub struct Nats {
    pub port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Nats {
    /// Starts a server and waits until it accepts connections.
    pub fn private() -> Nats {
        let dir =
            std::env::temp_dir().join(format!("presence-bridge-test/{}", unique_user("pbnats")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("nats store dir");
        let n = Nats {
            port: free_port(),
            dir,
            child: Mutex::new(None),
        };
        n.start();
        n
    }

    /// `nats://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on its port with its store.
    pub fn start(&self) {
        let log = std::fs::File::create(self.dir.join("server.log")).expect("nats log");
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server (Debian package nats-server) must be installed");
        *self.child.lock().expect("nats child lock") = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // JetStream is ready shortly after the port opens.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Stops the server (SIGTERM: its store is flushed).
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().expect("nats child lock").take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().expect("nats child lock").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

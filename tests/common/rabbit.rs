//! RabbitMQ for the AMQP source's tests: the machine's broker (127.0.0.1:5672, guest/guest,
//! started by `scripts/test.sh` if it is not running; each test its own exchange and queue), or
//! a private node on free ports for a test that stops and restarts the broker.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use super::{PATIENCE, free_port, unique_user};

/// The machine's broker.
pub const SHARED_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A private RabbitMQ node (Debian's rabbitmq-server) with its own data directory, so that it
/// can be stopped and restarted with its durable queues intact.
#[derive(Debug)]
pub struct Rabbit {
    pub port: u16,
    node: String,
    dir: PathBuf,
    dist_port: u16,
}

impl Rabbit {
    /// Starts a private node and waits until it accepts AMQP connections.
    pub fn private() -> Rabbit {
        let name = unique_user("pbrabbit");
        let dir = std::env::temp_dir().join(format!("presence-bridge-test/{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("mnesia")).expect("rabbit dir");
        std::fs::create_dir_all(dir.join("log")).expect("rabbit dir");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        // guest may connect over loopback only (the default): the tests use 127.0.0.1.
        std::fs::write(dir.join("rabbitmq.conf"), "").expect("rabbitmq.conf");
        std::fs::write(dir.join("env.conf"), "").expect("env file");
        let chown = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(chown.success(), "chown the rabbit dir");
        let r = Rabbit {
            port: free_port(),
            node: format!("{name}@localhost"),
            dist_port: free_port(),
            dir,
        };
        r.start();
        r
    }

    /// The URL of this node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        vec![
            ("RABBITMQ_NODENAME", self.node.clone()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_CONF_ENV_FILE", d("env.conf")),
            ("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf")),
            ("RABBITMQ_MNESIA_BASE", d("mnesia")),
            ("RABBITMQ_LOG_BASE", d("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
            ("RABBITMQ_PID_FILE", d("pid")),
        ]
    }

    /// (Re)starts the node and waits for AMQP.
    pub fn start(&self) {
        let out = Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(self.env())
            .current_dir(&self.dir)
            .output()
            .expect("rabbitmq-server (Debian package rabbitmq-server)");
        assert!(
            out.status.success(),
            "rabbitmq-server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "private RabbitMQ did not listen on {}; logs in {}",
                self.port,
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the node (clean broker shutdown: connections get `connection.close`).
    pub fn stop(&self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "private RabbitMQ did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A publisher standing in for MongooseIM's `mod_event_pusher_rabbit`.
#[derive(Debug)]
pub struct Pusher {
    conn: Connection,
    channel: lapin::Channel,
    pub exchange: String,
}

impl Pusher {
    /// Connects and declares the topic exchange as MongooseIM does by default (non-durable).
    pub async fn connect(url: &str, exchange: &str) -> Pusher {
        Self::open(url, exchange, false).await
    }

    /// Connects and declares a durable topic exchange (`presence_exchange.durable = true`).
    pub async fn connect_durable(url: &str, exchange: &str) -> Pusher {
        Self::open(url, exchange, true).await
    }

    async fn open(url: &str, exchange: &str, durable: bool) -> Pusher {
        let deadline = Instant::now() + PATIENCE;
        let conn = loop {
            match Connection::connect(url, ConnectionProperties::default()).await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "AMQP connect {url}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let channel = conn.create_channel().await.expect("channel");
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
        Pusher {
            conn,
            channel,
            exchange: exchange.into(),
        }
    }

    /// Publishes a raw body with routing key `key` (persistent, so a broker restart keeps it
    /// in a durable queue).
    pub async fn raw(&self, key: &str, body: &[u8]) {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("publish confirm");
    }

    /// What the event pusher sends for `user@localhost/resource`.
    pub async fn session(&self, user: &str, resource: &str, present: bool) {
        let body = serde_json::json!({
            "user_id": format!("{user}@localhost/{resource}"),
            "present": present,
        });
        self.raw(&format!("{user}@localhost"), body.to_string().as_bytes())
            .await;
    }

    /// Deletes a test's queue and exchange from the shared broker, then disconnects.
    pub async fn delete(self, queue: &str) {
        let _ = self
            .channel
            .queue_delete(queue.into(), Default::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(self.exchange.as_str().into(), Default::default())
            .await;
        self.close().await;
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// A unique exchange/queue name pair for one test on the shared broker.
pub fn amqp_names(tag: &str) -> (String, String) {
    let n = unique_user(tag);
    (format!("presence-{n}"), format!("bridge-{n}"))
}

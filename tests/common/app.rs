//! The service under test, started through the production builder ([`AppBuilder`]) — the same
//! wiring as `presence-bridge run` and `demo` — on a port of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use presence_bridge::api::AppState;
use presence_bridge::api::auth;
use presence_bridge::app::{App, AppBuilder, Ingest};
use presence_bridge::config::{AuthConfig, Config, HttpConfig, Secret, XmppConfig};
use presence_bridge::presence::{Change, Engine, UserJid, UserPresence};
use presence_bridge::sources::xmpp::{ComponentHandle, ConnectionStatus};
use presence_bridge::store::StoreHandle;
use serde_json::Value;

use super::{PATIENCE, http};

/// The HS256 secret of test configs.
pub const API_SECRET: &str = "api-test-secret";

/// A config for tests: API on 127.0.0.1 (a listener of its own), the test signing secret,
/// no rate limits, memory store, default XMPP settings (unused unless the ingest is XMPP).
pub fn test_config() -> Config {
    Config {
        http: HttpConfig {
            bind: "127.0.0.1:0".into(),
            rate_limit_per_token: 0,
            rate_limit_per_ip: 0,
            ..HttpConfig::default()
        },
        auth: AuthConfig {
            jwt_secret: Secret::new(API_SECRET),
            ..AuthConfig::default()
        },
        ..Config::default()
    }
}

/// A token signed with [`API_SECRET`] for subject `tester`, valid 5 minutes.
pub fn token(scope: &str, domains: Option<Vec<&str>>) -> String {
    let cfg = AuthConfig {
        jwt_secret: Secret::new(API_SECRET),
        ..AuthConfig::default()
    };
    let c = auth::claims(
        "tester",
        scope,
        domains.map(|d| d.into_iter().map(String::from).collect()),
        300,
        &cfg,
    );
    auth::mint(API_SECRET, &c).expect("sign test token")
}

/// The running service.
#[derive(Debug)]
pub struct TestApp {
    app: Option<App>,
    /// The API's port.
    pub port: u16,
}

impl TestApp {
    /// Starts the service with `cfg`, fed by `ingest`.
    pub async fn start(cfg: Config, ingest: Ingest) -> TestApp {
        Self::build(AppBuilder::new(cfg).ingest(ingest)).await
    }

    /// The service fed by the XMPP component `xmpp`, memory store.
    pub async fn xmpp(xmpp: XmppConfig) -> TestApp {
        Self::start(
            Config {
                xmpp,
                ..test_config()
            },
            Ingest::Xmpp,
        )
        .await
    }

    /// The XMPP component `xmpp` feeding an engine the test owns (it outlives this App).
    pub async fn xmpp_on(engine: Engine, xmpp: XmppConfig) -> TestApp {
        let cfg = Config {
            xmpp,
            ..test_config()
        };
        Self::build(AppBuilder::new(cfg).engine(engine)).await
    }

    async fn build(builder: AppBuilder) -> TestApp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let app = builder
            .listener(listener)
            .start()
            .await
            .unwrap_or_else(|e| panic!("the service did not start: {e}"));
        TestApp {
            port: app.addr().port(),
            app: Some(app),
        }
    }

    fn app(&self) -> &App {
        self.app.as_ref().expect("running")
    }

    /// The presence engine.
    pub fn engine(&self) -> &Engine {
        self.app().engine()
    }

    /// The XMPP component.
    pub fn component(&self) -> &ComponentHandle {
        self.app().component().expect("XMPP ingest")
    }

    /// The store.
    pub fn store(&self) -> &StoreHandle {
        self.app().store().expect("Postgres configured")
    }

    /// What the API handlers see.
    pub fn state(&self) -> &Arc<AppState> {
        self.app().state()
    }

    /// Stops everything through [`App::shutdown`]; the XMPP component must end cleanly.
    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            let r = tokio::time::timeout(PATIENCE * 2, app.shutdown())
                .await
                .expect("shutdown within its deadline");
            assert!(r.is_ok(), "clean shutdown: {r:?}");
        }
    }

    /// `GET` on the API: (status, JSON body, head).
    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, Value, String) {
        http::api(self.port, "GET", path, token, None)
    }

    /// `POST` on the API: (status, JSON body, head).
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> (u16, Value, String) {
        http::api(self.port, "POST", path, token, Some(body))
    }

    /// A WebSocket on `/api/v1/ws?{query}`.
    pub async fn ws(&self, query: &str, origin: Option<&str>) -> http::Ws {
        http::ws_connect(self.port, query, origin)
            .await
            .unwrap_or_else(|e| panic!("ws connect {query}: {e}"))
    }

    /// Waits until the component status satisfies `pred`.
    pub async fn wait_status(&self, what: &str, pred: impl Fn(&ConnectionStatus) -> bool) {
        let mut rx = self.component().watch();
        let r = tokio::time::timeout(PATIENCE, rx.wait_for(|s| pred(s))).await;
        assert!(
            r.is_ok(),
            "timeout waiting for status {what}; now {:?}",
            self.component().status()
        );
    }

    /// Waits until the component is connected.
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
            if let Some(p) = self.engine().get(&jid)
                && pred(&p)
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "timeout waiting for {user}: {what}; state: {:#?}",
                self.engine().get(&jid)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

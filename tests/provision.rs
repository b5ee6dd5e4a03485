//! `presence-bridge provision`: against a real (private) ejabberd through its REST API, and
//! against MongooseIM's documented GraphQL + REST admin API shapes on a local HTTP server
//! (MongooseIM cannot run in CI; the flow is the one verified on 6.2.1).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::*;

fn provision(args: &[&str], password: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_presence-bridge"));
    c.arg("provision")
        .args(args)
        // No defaults from the repository's config: every test says what it means.
        .args(["--config", "/nonexistent/bridge.toml"])
        .env_remove("PRESENCE_BRIDGE_PROVISION_PASSWORD");
    if let Some(p) = password {
        c.env("PRESENCE_BRIDGE_PROVISION_PASSWORD", p);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_provisioning_is_idempotent_and_the_bridge_then_sees_presence() {
    init_logs();
    let ej = Ejabberd::private("prov", false);
    let users = ["ann", "ben", "cat"];
    for u in users {
        ej.register(u);
    }
    ej.add_bridge_to_roster("cat", "bridge.localhost");
    let n = ej
        .api("registered_users", serde_json::json!({"host": "localhost"}))
        .as_array()
        .unwrap()
        .len();
    assert!(n >= 3);
    let api = format!("http://127.0.0.1:{}/api", ej.http);
    let args = |extra: &[&'static str]| {
        let mut v = vec![
            "--server",
            "ejabberd",
            "--api",
            api.as_str(),
            "--component",
            "bridge.localhost",
            "--domain",
            "localhost",
            "--rate",
            "1000",
        ];
        v.extend_from_slice(extra);
        v.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |extra: &[&'static str]| {
        let a = args(extra);
        provision(&a.iter().map(String::as_str).collect::<Vec<_>>(), None)
    };

    // Dry run: says what it would do, changes nothing.
    let o = run(&["--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("would provision ann@localhost"), "{t}");
    assert!(
        t.contains(&format!(
            "dry run: {n} users: {} provisioned, 1 already had the component, 0 failed",
            n - 1
        )),
        "{t}"
    );
    let roster = ej.api(
        "get_roster",
        serde_json::json!({"user": "ann", "server": "localhost"}),
    );
    assert_eq!(roster, serde_json::json!([]), "dry run changed nothing");

    let o = run(&[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "{n} users: {} provisioned, 1 already had the component, 0 failed",
            n - 1
        )),
        "{}",
        text(&o)
    );
    let o = run(&[]);
    assert!(
        text(&o).contains(&format!(
            "{n} users: 0 provisioned, {n} already had the component, 0 failed"
        )),
        "idempotent: {}",
        text(&o)
    );

    // The point of it: the bridge now sees a provisioned user's presence.
    let app = TestApp::xmpp(xmpp_cfg_private(&ej)).await;
    app.connected().await;
    let mut c = Client::login(ej.c2s, "ann", "phone").await;
    c.presence(Some("away"), Some("provisioned"), 0, None).await;
    let p = app.wait_user("ann", "online", |p| p.online).await;
    assert_eq!(p.status.as_deref(), Some("provisioned"));
    c.unavailable(None).await;
    app.stop().await;

    // Unreachable API: a clear error and exit 1.
    let o = provision(
        &[
            "--server",
            "ejabberd",
            "--api",
            "http://127.0.0.1:9/api",
            "--component",
            "bridge.localhost",
            "--domain",
            "localhost",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("listing the users of localhost"),
        "{}",
        text(&o)
    );
}

/// MongooseIM's admin APIs as verified on 6.2.1: GraphQL lists users and contacts; the REST
/// admin API's `PUT /contacts/{user}/{component}` drives the subscription. The component's
/// part (answering `subscribe` with `subscribed` + `subscribe`) is played by `bridge_up`.
fn fake_mongooseim(
    rosters: Arc<Mutex<HashMap<String, String>>>,
    bridge_up: bool,
) -> impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static {
    move |req| {
        let basic = base64::engine::general_purpose::STANDARD.encode("admin:mim-secret");
        if req.header("authorization") != Some(format!("Basic {basic}").as_str()) {
            return (401, r#"{"errors":[{"message":"no credentials"}]}"#.into());
        }
        let mut rosters = rosters.lock().unwrap();
        if req.path == "/api/graphql" {
            let q: serde_json::Value = serde_json::from_str(&req.body).unwrap();
            let q = q["query"].as_str().unwrap().to_owned();
            if q.contains("listUsers(domain: \"localhost\")") {
                let users: Vec<String> = {
                    let mut u: Vec<String> = rosters.keys().cloned().collect();
                    u.sort();
                    u
                };
                return (
                    200,
                    serde_json::json!({"data":{"account":{"listUsers": users}}}).to_string(),
                );
            }
            if let Some(rest) = q.split("listContacts(user: \"").nth(1) {
                let user = rest.split('"').next().unwrap();
                let sub = rosters.get(user).cloned().unwrap_or_default();
                let contacts = if sub.is_empty() {
                    serde_json::json!([])
                } else {
                    serde_json::json!([{"jid":"bridge.localhost","subscription":sub,"ask":"NONE"}])
                };
                return (
                    200,
                    serde_json::json!({"data":{"roster":{"listContacts": contacts}}}).to_string(),
                );
            }
            return (200, r#"{"errors":[{"message":"unexpected query"}]}"#.into());
        }
        if req.method == "PUT"
            && let Some(rest) = req.path.strip_prefix("/api/contacts/")
        {
            let (user, contact) = rest.split_once('/').unwrap();
            assert_eq!(contact, "bridge.localhost");
            let action: serde_json::Value = serde_json::from_str(&req.body).unwrap();
            let entry = rosters.entry(user.to_owned()).or_default();
            match (
                action["action"].as_str().unwrap(),
                entry.as_str(),
                bridge_up,
            ) {
                // The user subscribes to the bridge; a connected bridge approves (TO) and
                // subscribes back (pending in).
                ("subscribe", _, true) => *entry = "TO".into(),
                ("subscribe", _, false) => *entry = "NONE".into(),
                // The admin approves the bridge's subscription: BOTH.
                ("subscribed", "TO", _) => *entry = "BOTH".into(),
                _ => {}
            }
            return (204, String::new());
        }
        (404, "{}".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongooseim_provisioning_through_the_rest_admin_api() {
    init_logs();
    let rosters = Arc::new(Mutex::new(HashMap::from([
        ("a@localhost".to_string(), String::new()),
        ("b@localhost".to_string(), "BOTH".to_string()),
        ("c@localhost".to_string(), "NONE".to_string()),
    ])));
    let fake = FakeHttp::start(fake_mongooseim(rosters.clone(), true)).await;
    let api = fake.url("/api");
    let graphql = fake.url("/api/graphql");
    let args = [
        "--server",
        "mongooseim",
        "--api",
        &api,
        "--graphql",
        &graphql,
        "--user",
        "admin",
        "--component",
        "bridge.localhost",
        "--domain",
        "localhost",
        "--rate",
        "1000",
    ];
    let o = provision(&args, Some("mim-secret"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("3 users: 2 provisioned, 1 already had the component, 0 failed"),
        "{}",
        text(&o)
    );
    assert_eq!(rosters.lock().unwrap()["a@localhost"], "BOTH");
    assert_eq!(rosters.lock().unwrap()["c@localhost"], "BOTH");
    // Per user: subscribe, then subscribed — never a GraphQL roster mutation.
    let puts: Vec<(String, String)> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| (r.path, r.body))
        .collect();
    assert_eq!(
        puts,
        vec![
            (
                "/api/contacts/a@localhost/bridge.localhost".into(),
                r#"{"action":"subscribe"}"#.into()
            ),
            (
                "/api/contacts/a@localhost/bridge.localhost".into(),
                r#"{"action":"subscribed"}"#.into()
            ),
            (
                "/api/contacts/c@localhost/bridge.localhost".into(),
                r#"{"action":"subscribe"}"#.into()
            ),
            (
                "/api/contacts/c@localhost/bridge.localhost".into(),
                r#"{"action":"subscribed"}"#.into()
            ),
        ]
    );
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| r.body.contains("addContact") || r.body.contains("mutation")),
        "GraphQL roster mutations cannot provision a component"
    );
    // Idempotent.
    let o = provision(&args, Some("mim-secret"));
    assert!(
        text(&o).contains("3 users: 0 provisioned, 3 already"),
        "{}",
        text(&o)
    );

    // With the bridge down, the subscription cannot complete: reported, exit 1.
    let rosters = Arc::new(Mutex::new(HashMap::from([(
        "d@localhost".to_string(),
        String::new(),
    )])));
    let down = FakeHttp::start(fake_mongooseim(rosters, false)).await;
    let (api, graphql) = (down.url("/api"), down.url("/api/graphql"));
    let args = [
        "--server",
        "mongooseim",
        "--api",
        &api,
        "--graphql",
        &graphql,
        "--user",
        "admin",
        "--component",
        "bridge.localhost",
        "--domain",
        "localhost",
        "--rate",
        "1000",
    ];
    let o = provision(&args, Some("mim-secret"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("FAILED d@localhost") && t.contains("the bridge must be connected"),
        "{t}"
    );
    assert!(
        t.contains("1 users: 0 provisioned, 0 already had the component, 1 failed"),
        "{t}"
    );

    // Wrong password: the listing fails with the server's answer, and the password is not shown.
    let o = provision(&args, Some("wrong-secret"));
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("401"), "{t}");
    assert!(!t.contains("wrong-secret"), "{t}");
    // MongooseIM needs the GraphQL endpoint: a usage error.
    let o = provision(
        &[
            "--server",
            "mongooseim",
            "--api",
            &api,
            "--component",
            "bridge.localhost",
            "--domain",
            "localhost",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("--graphql is required"), "{}", text(&o));
}

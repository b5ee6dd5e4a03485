//! SIGTERM on the real binary, under load: every WebSocket client gets its 1001 close, the
//! writer flushes what is queued to Postgres, and the process exits 0.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_50_websockets_with_1001_flushes_the_writer_and_exits_0() {
    init_logs();
    let ej = Ejabberd::shared();
    let lease = lease_component();
    let pg = Pg::shared("sigterm50");
    let user = ej.user("term", &lease.domain);
    let spool = tempfile::tempdir().unwrap();
    let port = free_port();
    let xmpp = xmpp_cfg(&ej, &lease);
    let child = Command::new(env!("CARGO_BIN_EXE_presence-bridge"))
        .current_dir(std::env::temp_dir())
        .arg("run")
        .env("PRESENCE_BRIDGE__XMPP__SERVER", &xmpp.server)
        .env("PRESENCE_BRIDGE__XMPP__COMPONENT", &xmpp.component)
        .env("PRESENCE_BRIDGE__XMPP__PASSWORD", SECRET)
        .env("PRESENCE_BRIDGE__XMPP__DOMAINS", "[localhost]")
        .env("PRESENCE_BRIDGE__STORE__POSTGRES_URL", pg.url())
        .env("PRESENCE_BRIDGE__STORE__SPOOL_DIR", spool.path())
        // A batch window longer than the test: whatever the writer holds at SIGTERM can only
        // reach Postgres through the shutdown flush.
        .env("PRESENCE_BRIDGE__STORE__BATCH_TIMEOUT_MS", "600000")
        .env("PRESENCE_BRIDGE__HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("PRESENCE_BRIDGE__HTTP__WS_MAX_PER_TOKEN", "64")
        .env("PRESENCE_BRIDGE__AUTH__JWT_SECRET", API_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while try_request(port, "GET", "/readyz", &[], None).map(|r| r.status) != Ok(200) {
        assert!(Instant::now() < deadline, "the bridge did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let t = token("presence:read", None);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut ws = ws_connect(port, &format!("token={t}"), None).await.unwrap();
        assert_eq!(next_frame(&mut ws).await["type"], "snapshot");
        clients.push(ws);
    }

    // Real presence: three changes the writer keeps in its queue (the batch window is long).
    let mut c = Client::login(ej.c2s, &user, "desk").await;
    for (show, status) in [("chat", "one"), ("away", "two"), ("dnd", "three")] {
        c.presence(Some(show), Some(status), 1, None).await;
    }
    let jid = format!("{user}@localhost");
    for ws in &mut clients {
        let mut seen = 0;
        while seen < 3 {
            let f = next_frame(ws).await;
            assert_eq!(f["type"], "diff", "{f}");
            seen += f["changes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["jid"] == jid.as_str())
                .count();
        }
    }
    assert_eq!(
        pg.query("SELECT count(*) FROM presence_events"),
        "0",
        "nothing written before the shutdown"
    );

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut codes = Vec::new();
    for mut ws in clients {
        let code = tokio::time::timeout(PATIENCE, async {
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                    Ok(_) => continue,
                    Err(e) => panic!("no close frame, but {e}"),
                }
            }
            None
        })
        .await
        .expect("a close frame in time");
        codes.push(code);
    }
    assert!(
        codes.iter().all(|c| *c == Some(1001)),
        "every client gets 1001: {codes:?}"
    );
    let status = tokio::task::spawn_blocking(move || {
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(status.0, Some(0), "{}", status.1);
    assert_eq!(
        pg.query(&format!(
            "SELECT string_agg(status, ',' ORDER BY at) FROM presence_events WHERE jid = '{jid}'"
        )),
        "one,two,three",
        "the writer flushed the queue on SIGTERM"
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(
            &pg.query("SELECT value FROM bridge_state WHERE key = 'stopped_at'")
        )
        .is_ok(),
        "the stop is recorded"
    );
    drop(c);
}

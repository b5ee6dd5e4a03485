//! A local HTTP/1.1 server standing in for an admin API that cannot run here (MongooseIM's
//! GraphQL and REST admin APIs): every request goes to a handler, and is recorded.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The head's lines after the request line.
    pub headers: Vec<String>,
    pub body: String,
}

impl Seen {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

type Handler = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

/// The server; requests are answered by the handler, one per connection (`Connection: close`).
#[derive(Clone)]
pub struct FakeHttp {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl std::fmt::Debug for FakeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FakeHttp({})", self.port)
    }
}

impl FakeHttp {
    pub async fn start(
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    ) -> FakeHttp {
        let handler: Arc<Handler> = Arc::new(handler);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let handler = handler.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut s).await else {
                        return;
                    };
                    log.lock().expect("log").push(req.clone());
                    let (status, text) = handler(&req);
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        FakeHttp { port, seen }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("log").clone()
    }
}

async fn read_request(s: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some(i) = text.find("\r\n\r\n") else {
            continue;
        };
        let mut lines = text[..i].lines();
        let first = lines.next()?.to_owned();
        let headers: Vec<String> = lines.map(str::to_owned).collect();
        let len: usize = headers
            .iter()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if buf.len() < i + 4 + len {
            continue;
        }
        let mut parts = first.split(' ');
        return Some(Seen {
            method: parts.next()?.to_owned(),
            path: parts.next()?.to_owned(),
            headers,
            body: text[i + 4..i + 4 + len].to_owned(),
        });
    }
}

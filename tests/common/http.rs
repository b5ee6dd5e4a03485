//! One small HTTP/1.1 client for the bridge's API and ejabberd's REST API (a fresh connection
//! per request, `Connection: close`, loopback only), the WebSocket helpers, and metrics reads.

use std::io::{Read, Write};

use futures::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::PATIENCE;

/// An HTTP answer.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Status line and headers.
    pub head: String,
    /// Body text.
    pub text: String,
}

impl Response {
    /// The body as JSON, or `Null`.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

/// One request; `Err` when the connection fails.
pub fn try_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Response, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PATIENCE))
        .map_err(|e| e.to_string())?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    if let Some(b) = body {
        // The server may answer (413) and close before reading it all.
        let _ = s.write_all(b.as_bytes());
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad HTTP response: {text}"))?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    Ok(Response {
        status,
        head: head.to_string(),
        text: if chunked {
            dechunk(body)?
        } else {
            body.to_string()
        },
    })
}

/// Decodes a chunked body (streamed answers: the exports).
fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| format!("bad chunk header in {body:?}"))?;
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..n).ok_or("truncated chunk")?;
        out.push_str(chunk);
        body = rest.get(n + 2..).ok_or("truncated chunk end")?;
    }
}

/// One request; panics when the connection fails.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Response {
    try_request(port, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} 127.0.0.1:{port}{path}: {e}"))
}

/// A request to the bridge's API with an optional bearer token: (status, JSON body, head).
pub fn api(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let r = request(port, method, path, &headers, body);
    (r.status, r.json(), r.head)
}

/// `/metrics` text.
pub fn metrics_text(port: u16) -> String {
    request(port, "GET", "/metrics", &[], None).text
}

/// The value of the first sample line starting with `name` (0 if absent).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// A WebSocket client.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/api/v1/ws?{query}`, with an `Origin` header if given.
pub async fn ws_connect(port: u16, query: &str, origin: Option<&str>) -> Result<Ws, String> {
    let mut req = format!("ws://127.0.0.1:{port}/api/v1/ws?{query}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(o) = origin {
        req.headers_mut()
            .insert("Origin", o.parse().map_err(|e| format!("{e}"))?);
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// The next JSON text frame (pings and pongs skipped).
pub async fn next_frame(ws: &mut Ws) -> Value {
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str::<Value>(&t).expect("JSON frame");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("unexpected frame: {other:?}"),
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("no frame within {PATIENCE:?}"))
}

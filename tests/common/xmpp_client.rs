//! A minimal but real XMPP client over plain TCP (SASL PLAIN, resource binding), with full
//! control over how it leaves: unavailable, stream close, or TCP abort.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PATIENCE;

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
        let creds = BASE64.encode(format!("\0{user}\0{user}pw"));
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

    /// A presence whose status is over the bridge's 4 KiB limit (the server forwards it; the
    /// bridge drops it as oversized).
    pub async fn oversized_presence(&mut self) {
        self.send(&format!(
            "<presence><status>{}</status></presence>",
            "x".repeat(6000)
        ))
        .await;
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

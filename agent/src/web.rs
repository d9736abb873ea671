//! The operator's listener: a small read-only HTTP/1.1 server for `/metrics` (Prometheus) and the
//! console's page and live updates (server-sent events).
//!
//! Map:
//! - [`ListenSection`]: the `[metrics]` / `[console]` table of a TOML file (`listen`, `token_file`,
//!   `[…tls]`), with its rule: loopback unless configured, and an address off loopback needs both a
//!   bearer token and TLS ([`ListenSection::validate`]).
//! - [`Site`]: what a server serves: a [`Reply`] per path, either a whole body or a stream of
//!   snapshots sent as server-sent events.
//! - [`start`]: binds, then serves until `stop` turns true.
//!
//! What it does not do, on purpose: keep-alive, request bodies, chunked uploads, anything but `GET`
//! and `HEAD`. One request per connection, headers capped at [`MAX_HEAD`] bytes and read within
//! [`HEAD_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections at once (the rest are closed at
//! accept): a peer cannot make it hold more than a few hundred kilobytes. Tokens are compared
//! through their SHA-256 digests, so the time taken says nothing about how much of a guess matched.
//!
//! Browsers cannot add a bearer header to a page load, so the token is also accepted as the
//! password of HTTP Basic authentication (any user name): a browser asks for it once, and the
//! page's event stream reuses it. Prometheus sends it as a bearer token (`authorization:
//! credentials_file`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};

/// Largest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head (and finish the TLS handshake).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once, event streams included.
pub const MAX_CONNECTIONS: usize = 64;
/// Shortest interval between two events of one stream: a burst of changes becomes one snapshot.
pub const EVENT_INTERVAL: Duration = Duration::from_millis(500);
/// A comment line on an idle event stream, so proxies and browsers keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Shortest token accepted.
const MIN_TOKEN: usize = 16;

/// Where a listener listens and who may ask it (a TOML table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// `host:port`; loopback (`127.0.0.1:…`, `[::1]:…`) unless `token_file` and `tls` are set.
    pub listen: SocketAddr,
    /// A file holding the bearer token (one line, at least 16 characters); required off loopback,
    /// optional on it.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A server certificate and key (PEM); required off loopback.
    #[serde(default)]
    pub tls: Option<ServerTls>,
}

/// PEM files of the listener's TLS identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a listener could not start; each names the field or file.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("[{section}] {field}: {message}")]
    Config {
        section: String,
        field: &'static str,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
}

impl ListenSection {
    /// Loopback on `port`, no token, no TLS.
    pub fn loopback(port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            token_file: None,
            tls: None,
        }
    }

    /// Off loopback, both a token and TLS: a scrape or a page view must neither be open to the
    /// network nor readable on it. `section` names the table in errors.
    pub fn validate(&self, section: &str) -> Result<(), WebError> {
        if self.listen.ip().is_loopback() {
            return Ok(());
        }
        let missing = |field: &'static str, what: &str| WebError::Config {
            section: section.to_owned(),
            field,
            message: format!(
                "{} is not a loopback address: {what} is required to listen there",
                self.listen
            ),
        };
        if self.token_file.is_none() {
            return Err(missing("token_file", "a bearer token (token_file)"));
        }
        if self.tls.is_none() {
            return Err(missing("tls", "TLS ([…tls] cert and key)"));
        }
        Ok(())
    }

    /// Relative paths are taken from the configuration file's folder.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(t) = &mut self.token_file {
            fix(t);
        }
        if let Some(t) = &mut self.tls {
            fix(&mut t.cert);
            fix(&mut t.key);
        }
    }
}

/// What a path serves.
#[derive(Debug)]
pub enum Reply {
    /// A whole response.
    Body {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// Server-sent events: the current snapshot at once, then each new one (at most one per
    /// [`EVENT_INTERVAL`]: a watch channel keeps only the latest, so a slow reader skips, never
    /// queues).
    Events(watch::Receiver<Arc<str>>),
}

impl Reply {
    pub fn not_found() -> Self {
        Self::Body {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: b"not found\n".to_vec(),
        }
    }
}

/// What a server serves.
pub trait Site: Send + Sync + 'static {
    /// The reply to `GET path` (the query string removed).
    fn get(&self, path: &str) -> Reply;
}

/// `/metrics`: the exposition of some collectors; every other path is 404.
pub struct MetricsSite {
    pub sources: Vec<Arc<dyn crate::prometheus::Collect>>,
}

impl std::fmt::Debug for MetricsSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSite")
            .field("sources", &self.sources.len())
            .finish()
    }
}

impl Site for MetricsSite {
    fn get(&self, path: &str) -> Reply {
        if path != "/metrics" {
            return Reply::not_found();
        }
        let refs: Vec<&dyn crate::prometheus::Collect> =
            self.sources.iter().map(|s| s.as_ref()).collect();
        Reply::Body {
            status: 200,
            content_type: crate::prometheus::CONTENT_TYPE,
            body: crate::prometheus::Exposition::of(&refs).into_bytes(),
        }
    }
}

/// The digest of the token a request must carry.
#[derive(Clone)]
struct Token([u8; 32]);

impl Token {
    fn load(path: &Path) -> Result<Self, WebError> {
        let text = std::fs::read_to_string(path).map_err(|e| WebError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let t = text.trim();
        if t.len() < MIN_TOKEN || t.contains(char::is_whitespace) {
            return Err(WebError::File {
                path: path.to_owned(),
                message: format!(
                    "the token must be one word of at least {MIN_TOKEN} characters \
                     (e.g. `openssl rand -hex 32`)"
                ),
            });
        }
        Ok(Self(Sha256::digest(t.as_bytes()).into()))
    }

    /// Whether an `Authorization` header value carries the token (Bearer, or Basic's password).
    fn admits(&self, header: &[u8]) -> bool {
        let Ok(h) = std::str::from_utf8(header) else {
            return false;
        };
        let h = h.trim();
        let presented: Option<Vec<u8>> = if let Some(t) = strip_scheme(h, "bearer") {
            Some(t.trim().as_bytes().to_vec())
        } else if let Some(b) = strip_scheme(h, "basic") {
            base64_decode(b.trim()).and_then(|userpass| {
                let colon = userpass.iter().position(|&c| c == b':')?;
                Some(userpass[colon + 1..].to_vec())
            })
        } else {
            None
        };
        let Some(p) = presented else { return false };
        let d: [u8; 32] = Sha256::digest(&p).into();
        // Digests of equal inputs are equal; comparing them whole leaks nothing about the token.
        d.iter()
            .zip(self.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn strip_scheme<'a>(h: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = h.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then_some(rest)
}

/// Standard base64 with padding (what browsers send for Basic authentication).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() > 1024 || !s.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for chunk in s.as_bytes().chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

fn load_tls(tls: &ServerTls) -> Result<tokio_rustls::TlsAcceptor, WebError> {
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |p: &Path, m: String| WebError::File {
        path: p.to_owned(),
        message: m,
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| bad(p, e.to_string()));
    let cert_pem = read(&tls.cert)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&tls.cert, format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(bad(&tls.cert, "no certificate in the file".into()));
    }
    let key_pem = read(&tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => bad(&tls.key, "no private key in the file".into()),
        e => bad(&tls.key, format!("not a PEM key: {e}")),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&tls.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| bad(&tls.key, format!("key does not fit the certificate: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Validates `section` (named `name` in errors), loads its token and TLS files, binds, and serves
/// `site` until `stop` turns true. Returns the bound address (a port of 0 picks a free one) and the
/// server's task.
pub async fn start(
    name: &str,
    section: &ListenSection,
    site: Arc<dyn Site>,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), WebError> {
    section.validate(name)?;
    let token = section.token_file.as_deref().map(Token::load).transpose()?;
    let tls = section.tls.as_ref().map(load_tls).transpose()?;
    let listener = tokio::net::TcpListener::bind(section.listen)
        .await
        .map_err(|e| WebError::Bind {
            addr: section.listen,
            message: e.to_string(),
        })?;
    let addr = listener.local_addr().map_err(|e| WebError::Bind {
        addr: section.listen,
        message: e.to_string(),
    })?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors, say: wait instead of spinning.
                        tracing::warn!(error = %e, "web listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
                _ = stopped(&mut stop) => break,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "web listener: too many connections; closed");
                continue;
            };
            let (site, token, tls, stop) = (site.clone(), token.clone(), tls.clone(), stop.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => serve(s, site.as_ref(), token.as_ref(), stop).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "web listener: TLS handshake failed")
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "web listener: TLS handshake timed out")
                            }
                        }
                    }
                    None => serve(stream, site.as_ref(), token.as_ref(), stop).await,
                }
            });
        }
    });
    Ok((addr, task))
}

/// Resolves when `stop` turns true (or its sender is gone). Holds no borrow across an await, so
/// the futures that select on it stay `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await.map(|_| ());
}

/// One request on one connection.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    site: &dyn Site,
    token: Option<&Token>,
    stop: watch::Receiver<bool>,
) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut s)).await {
        Ok(Ok(h)) => h,
        Ok(Err(status)) => {
            let _ = respond(&mut s, status, "text/plain; charset=utf-8", &[], b"", false).await;
            return;
        }
        Err(_) => return,
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let (method, path, auth) = match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => (
            req.method.unwrap_or(""),
            req.path.unwrap_or("/"),
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                .map(|h| h.value),
        ),
        _ => {
            let _ = respond(
                &mut s,
                400,
                "text/plain; charset=utf-8",
                &[],
                b"bad request\n",
                false,
            )
            .await;
            return;
        }
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(
            &mut s,
            405,
            "text/plain; charset=utf-8",
            &[("Allow", "GET, HEAD")],
            b"read-only: GET and HEAD only\n",
            false,
        )
        .await;
        return;
    }
    if let Some(t) = token
        && !auth.is_some_and(|a| t.admits(a))
    {
        let _ = respond(
            &mut s,
            401,
            "text/plain; charset=utf-8",
            &[(
                "WWW-Authenticate",
                "Basic realm=\"microfed\", charset=\"UTF-8\"",
            )],
            b"a bearer token is required (or the token as the Basic password)\n",
            head_only,
        )
        .await;
        return;
    }
    let path = path.split(['?', '#']).next().unwrap_or("/");
    match site.get(path) {
        Reply::Body {
            status,
            content_type,
            body,
        } => {
            let _ = respond(&mut s, status, content_type, &[], &body, head_only).await;
        }
        Reply::Events(rx) => {
            if head_only {
                let _ = respond(&mut s, 200, "text/event-stream", &[], b"", true).await;
                return;
            }
            events(&mut s, rx, stop).await;
        }
    }
}

/// Reads up to the blank line ending the head; an HTTP status on a bad request.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(buf);
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Headers every response carries: nothing is cached, nothing is sniffed, the page loads nothing
/// from elsewhere.
const COMMON: &str = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
     Content-Security-Policy: default-src 'self'; img-src 'self' data:; frame-ancestors 'none'\r\n\
     Connection: close\r\n";

async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{COMMON}",
        reason(status),
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    if !head_only {
        s.write_all(body).await?;
    }
    s.flush().await?;
    s.shutdown().await
}

/// A server-sent event stream of snapshots until the client goes or `stop` turns true.
async fn events<S: AsyncWrite + Unpin>(
    s: &mut S,
    mut rx: watch::Receiver<Arc<str>>,
    mut stop: watch::Receiver<bool>,
) {
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{COMMON}\r\n");
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    // Browsers reconnect after `retry` ms when the stream ends (a restarted console).
    let mut first = true;
    loop {
        let snapshot = rx.borrow_and_update().clone();
        let mut msg = String::with_capacity(snapshot.len() + 32);
        if first {
            msg.push_str("retry: 2000\n");
            first = false;
        }
        for line in snapshot.lines() {
            msg.push_str("data: ");
            msg.push_str(line);
            msg.push('\n');
        }
        msg.push('\n');
        if s.write_all(msg.as_bytes()).await.is_err() || s.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(EVENT_INTERVAL).await;
        loop {
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() { return; }
                    break;
                }
                _ = tokio::time::sleep(KEEP_ALIVE) => {
                    if s.write_all(b": keep-alive\n\n").await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                }
                _ = stopped(&mut stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Hello;
    impl Site for Hello {
        fn get(&self, path: &str) -> Reply {
            match path {
                "/" => Reply::Body {
                    status: 200,
                    content_type: "text/plain",
                    body: b"hello".to_vec(),
                },
                _ => Reply::not_found(),
            }
        }
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn off_loopback_needs_a_token_and_tls() {
        let mut s = ListenSection {
            listen: "0.0.0.0:9464".parse().unwrap(),
            token_file: None,
            tls: None,
        };
        let e = s.validate("metrics").unwrap_err().to_string();
        assert!(
            e.contains("[metrics] token_file") && e.contains("0.0.0.0:9464"),
            "{e}"
        );
        s.token_file = Some("t".into());
        let e = s.validate("metrics").unwrap_err().to_string();
        assert!(e.contains("[metrics] tls"), "{e}");
        s.tls = Some(ServerTls {
            cert: "c".into(),
            key: "k".into(),
        });
        s.validate("metrics").unwrap();
        ListenSection::loopback(0).validate("metrics").unwrap();
        let v6: ListenSection = toml::from_str("listen = \"[::1]:9464\"").unwrap();
        v6.validate("metrics").unwrap();
        assert!(toml::from_str::<ListenSection>("listen = \"x\"").is_err());
        assert!(toml::from_str::<ListenSection>("listen = \"127.0.0.1:1\"\ntoken = 1").is_err());
    }

    #[test]
    fn basic_and_bearer_carry_the_token() {
        let t = Token(Sha256::digest(b"0123456789abcdef").into());
        assert!(t.admits(b"Bearer 0123456789abcdef"));
        assert!(t.admits(b"bearer  0123456789abcdef "));
        // "op:0123456789abcdef"
        assert!(t.admits(b"Basic b3A6MDEyMzQ1Njc4OWFiY2RlZg=="));
        assert!(!t.admits(b"Bearer 0123456789abcdeg"));
        assert!(!t.admits(b"Basic !!!!"));
        assert!(!t.admits(b"0123456789abcdef"));
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert!(base64_decode("aGk").is_none());
    }

    #[test]
    fn short_tokens_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "short\n").unwrap();
        let e = Token::load(&p).err().unwrap().to_string();
        assert!(e.contains("token") && e.contains("16"), "{e}");
    }

    #[tokio::test]
    async fn a_request_without_the_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        let mut section = ListenSection::loopback(0);
        section.token_file = Some(p);
        let (_stop_tx, stop) = watch::channel(false);
        let (addr, _task) = start("metrics", &section, Arc::new(Hello), stop)
            .await
            .unwrap();
        let r = get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
        assert!(!r.ends_with("hello"), "{r}");
        let r = get(
            addr,
            "GET / HTTP/1.1\r\nAuthorization: Bearer wrong-token-wrong-token\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
        let r = get(
            addr,
            "GET /?x=1 HTTP/1.1\r\nAuthorization: Bearer 0123456789abcdef0123\r\n\r\n",
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 200 ") && r.ends_with("hello"),
            "{r}"
        );
        let r = get(addr, "POST / HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
        let r = get(
            addr,
            &format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000)),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    }

    #[tokio::test]
    async fn events_send_the_snapshot_then_its_changes() {
        struct Stream(watch::Receiver<Arc<str>>);
        impl Site for Stream {
            fn get(&self, _: &str) -> Reply {
                Reply::Events(self.0.clone())
            }
        }
        let (tx, rx) = watch::channel::<Arc<str>>(Arc::from("{\"n\":1}"));
        let (stop_tx, stop) = watch::channel(false);
        let (addr, task) = start(
            "console",
            &ListenSection::loopback(0),
            Arc::new(Stream(rx)),
            stop,
        )
        .await
        .unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /events HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        tx.send(Arc::from("{\"n\":2}")).unwrap();
        while !String::from_utf8_lossy(&got).contains("{\"n\":2}") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"));
        assert!(
            text.contains("retry: 2000\n") && text.contains("data: {\"n\":"),
            "{text}"
        );
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}

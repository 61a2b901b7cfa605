//! [`Upstream`]: a real hyper 1 HTTP/1.1 server on `127.0.0.1:0` that tells a test what the
//! gateway sent it. Each test starts its own; nothing is shared between tests.
//!
//! Paths are matched on their ending, so they work behind any route prefix (`/orders/status/201`):
//!
//! | request | answer |
//! |---|---|
//! | `POST …/echo-body` | 200, the request body streamed back frame by frame, never buffered |
//! | `GET …/big?bytes=N` | 200, N bytes of [`pattern_byte`], streamed in 64 KiB frames |
//! | `GET …/slow?ms=N` | 200 JSON echo, after N ms |
//! | `GET …/status/N` | status N, JSON echo |
//! | `GET …/cost?n=N` | 200 JSON echo with `X-Tollgate-Cost: N` (the credits it says it cost) |
//! | `GET …/close` | 200 JSON echo with `Connection: close`; the connection ends after it |
//! | `GET …/ws` with `Connection: upgrade` | 101 (`Upgrade` as asked), then every byte echoed back |
//! | anything else | 200 JSON echo: `{"method","path","headers":{name: value},"body_bytes"}` |
//!
//! [`Upstream::start_tls`] serves the same over TLS, and adds `x-upstream-client-cert: yes|no`
//! to what it echoes: whether the gateway presented a client certificate.
//!
//! The JSON echo reads (and counts, without keeping) the whole request body before answering, so
//! that a body the gateway cuts off shows as a failed upstream request, not as a 200.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Size of one frame of `/big`.
const BIG_FRAME: usize = 64 * 1024;

/// A running echo upstream; stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    scheme: &'static str,
    /// Requests whose head has arrived, counted for tests that must know one is in flight.
    seen: Arc<AtomicUsize>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

// === impl Upstream ===

impl Upstream {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub async fn start() -> Upstream {
        Upstream::start_with(None).await
    }

    /// Binds `127.0.0.1:0` and serves TLS with `config` until dropped.
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Upstream {
        Upstream::start_with(Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let seen = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        let accepted = Arc::clone(&connections);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let counter = Arc::clone(&counter);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Some(acceptor) = tls else {
                        return serve_echo(stream, counter, None).await;
                    };
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let client_cert = stream.get_ref().1.peer_certificates().is_some();
                    serve_echo(stream, counter, Some(client_cert)).await;
                });
            }
        });
        Upstream {
            addr,
            scheme,
            seen,
            connections,
            task,
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` from [`Upstream::start_tls`]).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// How many request heads have arrived so far.
    pub fn requests_seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    /// How many connections have been accepted so far.
    pub fn connections_seen(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === functions ===

/// Serves the echo on one connection; `client_cert` (TLS only) is added to every request's
/// headers as `x-upstream-client-cert`.
async fn serve_echo<I>(io: I, counter: Arc<AtomicUsize>, client_cert: Option<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |mut req: Request<Incoming>| {
        counter.fetch_add(1, Ordering::SeqCst);
        if let Some(seen) = client_cert {
            let value = if seen { "yes" } else { "no" };
            req.headers_mut().insert(
                "x-upstream-client-cert",
                http::HeaderValue::from_static(value),
            );
        }
        async move { Ok::<_, Infallible>(answer(req).await) }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
}

/// Byte `i` of the `/big` body.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// `http://127.0.0.1:PORT` where nothing listens: a port bound and released at once.
pub async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}")
}

async fn answer(mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path.ends_with("/ws") {
        return upgrade_and_echo(&mut req);
    }
    if path.ends_with("/close") {
        let mut response = json_echo(req, StatusCode::OK).await;
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return response;
    }
    let query = |name: &str| -> Option<u64> {
        req.uri().query()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| v.parse().ok()).flatten()
        })
    };
    if path.ends_with("/echo-body") {
        let body = req.into_body().map_err(Into::into).boxed();
        return Response::new(body);
    }
    if path.ends_with("/big") {
        let total = query("bytes").unwrap_or(0);
        return Response::new(big_body(total));
    }
    if path.ends_with("/slow") {
        let ms = query("ms").unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return json_echo(req, StatusCode::OK).await;
    }
    if path.ends_with("/cost") {
        let n = query("n").unwrap_or(0);
        let mut response = json_echo(req, StatusCode::OK).await;
        response
            .headers_mut()
            .insert("x-tollgate-cost", http::HeaderValue::from(n));
        return response;
    }
    let mut segments = path.rsplit('/');
    let last = segments.next().unwrap_or("");
    if segments.next() == Some("status") {
        if let Some(status) = last.parse().ok().and_then(|n| StatusCode::from_u16(n).ok()) {
            return json_echo(req, status).await;
        }
    }
    json_echo(req, StatusCode::OK).await
}

/// 101 with the protocol the client asked for, then an echo of every byte on the upgraded
/// connection; 400 when the request asks for no upgrade.
fn upgrade_and_echo(req: &mut Request<Incoming>) -> Response<Body> {
    let Some(protocol) = req.headers().get(http::header::UPGRADE).cloned() else {
        let mut response = Response::new(text("no upgrade asked for".to_owned()));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
    });
    let mut response = Response::new(text(String::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(http::header::UPGRADE, protocol);
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    response
}

/// `total` bytes of the pattern, produced frame by frame.
fn big_body(total: u64) -> Body {
    let frames = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let n = (total - sent).min(BIG_FRAME as u64);
        let chunk: Vec<u8> = (sent..sent + n).map(pattern_byte).collect();
        let frame =
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(chunk)));
        Some((frame, sent + n))
    });
    StreamBody::new(frames).boxed()
}

/// The JSON description of the request, after reading its body to the end.
async fn json_echo(req: Request<Incoming>, status: StatusCode) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes: u64 = 0;
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(e) = body_error {
        // The gateway broke the body off: fail the exchange as a real server would.
        let mut response = Response::new(text(format!("request body failed: {e}")));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let echo = serde_json::json!({
        "method": parts.method.as_str(),
        "path": path,
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut response = Response::new(text(echo.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn text(s: String) -> Body {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed()
}

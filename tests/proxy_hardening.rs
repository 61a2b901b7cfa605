//! The proxy against hostile clients and bad networks (contract §4's target and framing rules):
//! dot-segment and encoded-path bypasses, host confusion, `CONNECT`/`TRACE`, h2c smuggling,
//! spoofed forwarding headers, bodies that break their framing or stall, upstream bodies that
//! stall, and requests whose client hangs up after they were forwarded. Requests that a client
//! library would clean up first are written on raw sockets.

mod common;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{eventually, sample};

/// Bound for every wait in this file.
const WAIT: Duration = Duration::from_secs(5);

/// A response read off a raw socket.
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    /// The JSON error code of one of the gateway's own answers.
    fn code(&self) -> String {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The upstream's JSON echo.
    fn echo(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends `request` as it is (it should ask for `Connection: close`) and reads the answer to the
/// end of the connection.
async fn raw(gw: &Gateway, request: &str) -> Raw {
    let mut stream = TcpStream::connect(gw.proxy_addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("an answer in time")
        .expect("read");
    parse(&got)
}

fn parse(got: &[u8]) -> Raw {
    let text = String::from_utf8_lossy(got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Chunked echo bodies: keep the JSON between the chunk-size lines.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.split("\r\n")
            .filter(|l| l.starts_with('{') || l.starts_with('"'))
            .collect::<Vec<_>>()
            .join("")
    } else {
        body.to_owned()
    };
    Raw {
        status,
        head: head.to_owned(),
        body,
    }
}

/// A gateway with these `[[routes]]`.
async fn with_routes(upstream: &Upstream, routes: String) -> Gateway {
    Gateway::builder(upstream).routes(routes).start().await
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: example\r\nConnection: close\r\n{extra}\r\n")
}

// === 1. dot-segments and encoded paths ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_leave_a_public_route_for_a_keyed_one() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    for path in [
        "/public/../secret",
        "/public/%2e%2e/secret",
        "/public/%2E%2E/secret",
        "/public/.%2e/secret",
        "/public/./../secret",
        "/public//../secret",
    ] {
        let r = raw(&gw, &get(path, "")).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (401, "missing_credential"),
            "{path}: {}",
            r.head
        );
    }
    assert_eq!(upstream.requests_seen(), 0, "nothing reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_forwarded_is_the_normalised_path_that_was_matched() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let r = raw(&gw, &get("/public/a/./b/../c%7e%41?q=%2e%2e", "")).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(
        r.echo()["path"],
        "/public/a/c~A?q=%2e%2e",
        "the query as sent"
    );
    let r = raw(
        &gw,
        &get(
            "/public/%2e%2e/things//x/",
            &format!("X-API-Key: {key}\r\n"),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.echo()["path"], "/things/x/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_400_bad_request() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    for path in [
        "/public/..%2fsecret",
        "/public/a%2Fb",
        "/public/a%5cb",
        "/..",
        "/public/../../x",
        "/public/..;/secret",
        "/public/%zz",
        "/public/a%00",
    ] {
        let r = raw(&gw, &get(path, "")).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "bad_request"),
            "{path}"
        );
    }
    assert_eq!(upstream.requests_seen(), 0);
}

// === 3. host confusion ===

fn host_routes(upstream: &str) -> String {
    format!(
        r#"
[[routes]]
name = "open"
host = "open.example"
path_prefix = "/"
upstreams = ["{upstream}"]
auth = "public"

[[routes]]
name = "keyed"
path_prefix = "/"
upstreams = ["{upstream}"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_are_400_bad_request() {
    let upstream = Upstream::start().await;
    let gw = with_routes(&upstream, host_routes(&upstream.url())).await;
    let r = raw(
        &gw,
        "GET /x HTTP/1.1\r\nHost: open.example\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (400, "bad_request"));
    let r = raw(&gw, "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "bad_request"),
        "HTTP/1.1 without Host"
    );
    assert_eq!(upstream.requests_seen(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_authority_wins_over_host() {
    let upstream = Upstream::start().await;
    let gw = with_routes(&upstream, host_routes(&upstream.url())).await;
    let r = raw(
        &gw,
        "GET http://keyed.example/x HTTP/1.1\r\nHost: open.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (401, "missing_credential"));
    let r = raw(
        &gw,
        "GET http://open.example/x HTTP/1.1\r\nHost: keyed.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.echo()["headers"]["x-forwarded-host"], "open.example");
}

// === 4. methods ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_trace_are_405_method_not_allowed() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let r = raw(
        &gw,
        &format!(
            "CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\nConnection: close\r\n\
             X-API-Key: {key}\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (405, "method_not_allowed"),
        "{}",
        r.head
    );
    assert!(
        r.head.to_ascii_lowercase().contains("allow: get"),
        "{}",
        r.head
    );
    let r = raw(
        &gw,
        &format!(
            "TRACE /x HTTP/1.1\r\nHost: example\r\nConnection: close\r\nX-API-Key: {key}\r\n\r\n"
        ),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
    assert_eq!(upstream.requests_seen(), 0);
}

// === 2. bodies that break their framing ===

/// Writes `request`, then half-closes the connection (nothing more will be sent), and reads
/// the answer.
async fn raw_then_shutdown(gw: &Gateway, request: &str) -> Raw {
    let mut stream = TcpStream::connect(gw.proxy_addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("an answer in time")
        .expect("read");
    parse(&got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_its_framing_is_400_bad_request_not_502() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let head = |framing: &str| {
        format!(
            "POST /things/x HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\
             X-API-Key: {key}\r\n{framing}\r\n\r\n"
        )
    };
    let chunked = head("Transfer-Encoding: chunked");
    for (what, request) in [
        (
            "a bad chunk size",
            format!("{chunked}zz\r\nhello\r\n0\r\n\r\n"),
        ),
        ("bare-LF chunk lines", format!("{chunked}5\nhello\n0\n\n")),
        (
            "a body shorter than its Content-Length",
            format!("{}only ten b", head("Content-Length: 100")),
        ),
    ] {
        let r = raw_then_shutdown(&gw, &request).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "bad_request"),
            "{what}: {}",
            r.head
        );
    }
    let metrics = gw.metrics().await;
    let count = |outcome: &str, class: &str| {
        sample(
            &metrics,
            "tollgate_requests_total",
            &[
                ("route", "api"),
                ("outcome", outcome),
                ("status_class", class),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("bad_request", "4xx"), 3.0);
    assert_eq!(count("upstream_unavailable", "5xx"), 0.0);
}

// === 5. stalls inside bodies ===

/// An upstream that answers every request with a head promising 100 bytes, sends three, and
/// then nothing while the connection stays open.
async fn stalling_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
                .await;
            held.push(s);
        }
    });
    (format!("http://{addr}"), task)
}

fn idle_routes(upstream: &str) -> String {
    format!(
        r#"
[[routes]]
name = "idle"
path_prefix = "/"
upstreams = ["{upstream}"]
auth = "public"
idle_timeout = "300ms"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_body_is_cut_after_the_idle_timeout_and_counted_as_upstream_timeout() {
    let upstream = Upstream::start().await;
    let (stalling, _task) = stalling_upstream().await;
    let gw = with_routes(&upstream, idle_routes(&stalling)).await;
    // The head and three bytes arrive; then the gateway must end the connection on its own.
    let r = raw(&gw, &get("/x", "")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "abc");
    let cut = eventually(WAIT, || async {
        gw.metric(
            "tollgate_requests_total",
            &[
                ("route", "idle"),
                ("outcome", "upstream_timeout"),
                ("status_class", "5xx"),
            ],
        )
        .await
            == 1.0
    })
    .await;
    assert!(cut, "{}", gw.metrics().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_its_body_is_400_after_the_idle_timeout() {
    let upstream = Upstream::start().await;
    let gw = with_routes(&upstream, idle_routes(&upstream.url())).await;
    let mut stream = TcpStream::connect(gw.proxy_addr).await.expect("connect");
    stream
        .write_all(b"POST /x HTTP/1.1\r\nHost: example\r\nContent-Length: 100\r\n\r\nabc")
        .await
        .expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("an answer while the client still holds its connection open")
        .expect("read");
    let r = parse(&got);
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "bad_request"),
        "{}",
        r.head
    );
}

// === 8. spoofed forwarding headers, h2c, head size, backlog ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_and_x_real_ip_from_an_untrusted_client_do_not_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let r = raw(
        &gw,
        &get(
            "/public/x",
            "Forwarded: for=203.0.113.9;proto=https\r\nX-Real-IP: 203.0.113.9\r\n",
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    let headers = &r.echo()["headers"];
    assert!(headers.get("forwarded").is_none(), "{headers}");
    assert!(headers.get("x-real-ip").is_none(), "{headers}");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_not_passed_on() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let r = raw(
        &gw,
        &get(
            "/public/x",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
             HTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let headers = &r.echo()["headers"];
    for name in ["upgrade", "http2-settings"] {
        assert!(headers.get(name).is_none(), "{name}: {headers}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_over_64_kib_are_refused() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let filler = |bytes: usize| format!("X-Filler: {}\r\n", "a".repeat(bytes));
    let r = raw(&gw, &get("/public/x", &filler(60 * 1024))).await;
    assert_eq!(r.status, 200, "a 60 KiB head passes");
    let r = raw(&gw, &get("/public/x", &filler(70 * 1024))).await;
    assert_eq!(r.status, 431, "a 70 KiB head: {}", r.head);
    assert_eq!(upstream.requests_seen(), 1);
}

#[tokio::test]
async fn a_burst_of_connections_waits_in_the_listen_queue() {
    let listener = tollgate::listener::bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    // Nothing accepts: every connect that completes sits in the kernel's queue.
    let burst = somaxconn.min(2000) - 8;
    let mut connects = Vec::with_capacity(burst);
    for _ in 0..burst {
        connects.push(tokio::spawn(tokio::time::timeout(
            Duration::from_secs(3),
            TcpStream::connect(addr),
        )));
    }
    let mut held = Vec::with_capacity(burst);
    for c in connects {
        if let Ok(Ok(Ok(stream))) = c.await {
            held.push(stream);
        }
    }
    assert_eq!(held.len(), burst, "connects completed of {burst}");
    drop(listener);
}

// === 9. a request forwarded before its client hung up is metered ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_clients_hang_up_after_forwarding_are_still_metered() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, key) = gw
        .create_key(&account, json!({ "name": "main", "type": "secret" }))
        .await;
    let request = get("/things/slow?ms=1000", &format!("X-API-Key: {key}\r\n"));
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(gw.proxy_addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        clients.push(s);
    }
    let all_forwarded = eventually(WAIT, || async { upstream.requests_seen() == 20 }).await;
    assert!(all_forwarded, "upstream saw {}", upstream.requests_seen());
    drop(clients);
    let counted = eventually(WAIT, || async {
        gw.metric(
            "tollgate_requests_total",
            &[
                ("route", "api"),
                ("outcome", "client_closed"),
                ("status_class", "4xx"),
            ],
        )
        .await
            == 20.0
    })
    .await;
    assert!(counted, "{}", gw.metrics().await);
    let path = format!("/v1/accounts/{account}/keys/{key_id}/usage?interval=day");
    let metered = eventually(Duration::from_secs(10), || async {
        let (status, body) = gw.admin(Method::GET, &path, None).await;
        let total = |field: &str| {
            body["buckets"].as_array().map_or(0, |b| {
                b.iter().map(|x| x[field].as_u64().unwrap_or(0)).sum()
            })
        };
        status == StatusCode::OK && total("request_count") == 20 && total("error_count") == 20
    })
    .await;
    assert!(metered, "the key's usage counts all twenty");
}

// === refusals that leave a body unread ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_that_leaves_the_body_unread_says_connection_close() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let body = "x".repeat(64 * 1024);
    let mut stream = TcpStream::connect(gw.proxy_addr).await.expect("connect");
    let request = format!(
        "POST /things/x HTTP/1.1\r\nHost: example\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // The gateway answers 401 without reading the body; writing it all may fail once it closes.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut got)).await;
    let r = parse(&got);
    assert_eq!((r.status, r.code().as_str()), (401, "missing_credential"));
    assert!(
        r.head.to_ascii_lowercase().contains("connection: close"),
        "{}",
        r.head
    );
    // Without a body there is nothing left unread: the connection stays open.
    let r = common::client()
        .get(gw.proxy_url("/things/x"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("connection").is_none());
}

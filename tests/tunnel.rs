//! WebSocket tunnels past the gateway (contract section 4: "WebSocket upgrades pass through"):
//! bytes pass both ways untouched; a tunnel still open at shutdown is closed once the drain is
//! over; and the bytes that passed are the key's usage however the tunnel ended (closed by the
//! gateway, or by a client that reset its connection). The idle close (five minutes at least)
//! is `proxy::tunnel`'s own tests', on in-memory pipes with time paused.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{Granularity, Records, Usage};

use common::eventually;
use common::gateway::Gateway;
use common::upstream::Upstream;
use reqwest::Method;

/// Bound for every wait in this file.
const WAIT: Duration = Duration::from_secs(5);

/// A gateway whose one route is keyed, and a key for it.
async fn gateway(upstream: &Upstream) -> (Gateway, String) {
    let routes = format!(
        r#"
[[routes]]
name = "ws"
path_prefix = "/"
upstreams = ["{}"]
auth = "required"
"#,
        upstream.url()
    );
    let gw = Gateway::builder(upstream).routes(routes).start().await;
    let (_, key) = gw.account_with_key().await;
    (gw, key)
}

/// A connection through the gateway, upgraded to a WebSocket tunnel to the echoing upstream.
async fn open_tunnel(gw: &Gateway, key: &str) -> TcpStream {
    open_tunnel_with_head(gw, key).await.0
}

/// [`open_tunnel`], and the answer's head, lowercase.
async fn open_tunnel_with_head(gw: &Gateway, key: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(gw.proxy_addr).await.expect("connect");
    let handshake = format!(
        "GET /chat/ws HTTP/1.1\r\nHost: example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-API-Key: {key}\r\n\r\n"
    );
    stream
        .write_all(handshake.as_bytes())
        .await
        .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("the switch in time")
            .expect("read");
        assert_eq!(n, 1, "closed after {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    (stream, head)
}

/// Sends `n` bytes through the tunnel and reads their echo back.
async fn echo(stream: &mut TcpStream, n: usize) {
    let sent: Vec<u8> = (0..=255u8).cycle().take(n).collect();
    let (mut read, mut write) = stream.split();
    let mut echoed = vec![0u8; n];
    let (wrote, got) = tokio::join!(
        write.write_all(&sent),
        tokio::time::timeout(WAIT, read.read_exact(&mut echoed))
    );
    wrote.expect("write");
    got.expect("echo in time").expect("echo");
    assert!(echoed == sent, "the tunnel changed the bytes");
}

/// Whether the gateway closes `stream` within [`WAIT`] (end of stream or reset).
async fn closed_in_time(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .is_ok()
}

/// The one key's (requests, bytes in, bytes out) in the store at `path`, over the last minutes.
async fn key_totals(path: &std::path::Path) -> (u64, u64, u64) {
    let store = EmbeddedStore::open(path).expect("reopen the store");
    let now_minute = chrono::Utc::now().timestamp() / 60;
    let mut totals = (0, 0, 0);
    for account in store.list_accounts().await.expect("accounts") {
        for key in store.list_keys(&account.id).await.expect("keys") {
            let buckets = store
                .key_usage(&key.id, Granularity::Minute, now_minute - 5, now_minute + 2)
                .await
                .expect("usage");
            for (_, c) in buckets {
                totals.0 += c.requests;
                totals.1 += c.bytes_in;
                totals.2 += c.bytes_out;
            }
        }
    }
    totals
}

#[tokio::test]
async fn websocket_upgrades_pass_through_both_ways() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let (mut stream, head) = open_tunnel_with_head(&gw, &key).await;
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    // After the switch the gateway is a tunnel: bytes go up and come back untouched.
    echo(&mut stream, 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_open_at_shutdown_is_closed_and_its_bytes_counted() {
    let upstream = Upstream::start().await;
    let (gw, key) = gateway(&upstream).await;
    let mut stream = open_tunnel(&gw, &key).await;
    echo(&mut stream, 100_000).await;
    let path = gw.store_path();
    let _dir = tokio::time::timeout(WAIT * 2, gw.stop())
        .await
        .expect("the stop waited on the tunnel");
    assert!(
        closed_in_time(&mut stream).await,
        "the tunnel outlived the gateway"
    );
    assert_eq!(key_totals(&path).await, (1, 100_000, 100_000));
}

/// A client that resets its connection ends the tunnel with an error; what passed before is
/// still counted, at once (seen on the admin API while the gateway runs, not at shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_client_resets_still_counts_its_bytes() {
    let upstream = Upstream::start().await;
    // The idle close is minutes away: only the reset can end the tunnel.
    let (gw, key) = gateway(&upstream).await;
    let mut stream = open_tunnel(&gw, &key).await;
    echo(&mut stream, 100_000).await;
    // Linger zero: the close sends a reset, and the gateway's next read fails.
    stream.set_zero_linger().expect("linger");
    drop(stream);
    let (_, accounts) = gw.admin(Method::GET, "/v1/accounts", None).await;
    let account = accounts["accounts"][0]["id"].as_str().expect("account id");
    let (_, keys) = gw
        .admin(Method::GET, &format!("/v1/accounts/{account}/keys"), None)
        .await;
    let key_id = keys["keys"][0]["id"].as_str().expect("key id");
    let usage = format!("/v1/accounts/{account}/keys/{key_id}/usage?interval=day");
    let (gw, usage) = (&gw, &usage);
    let counted = eventually(WAIT, move || async move {
        let (_, got) = gw.admin(Method::GET, usage, None).await;
        let sum = |field: &str| {
            got["buckets"]
                .as_array()
                .map(|b| b.iter().filter_map(|b| b[field].as_u64()).sum::<u64>())
        };
        sum("bytes_in") == Some(100_000) && sum("bytes_out") == Some(100_000)
    })
    .await;
    assert!(counted, "the reset tunnel's bytes were not counted");
}

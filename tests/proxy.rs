//! The proxy listener against the contract (sections 3 and 4): every refusal of the error table
//! that the gateway can produce today, the three credential forms, the headers sent upstream and
//! back, streamed bodies, key changes taking effect at once, restart, metrics and graceful
//! shutdown. Every test starts its own upstream and gateway on port 0.
//!
//! Covered elsewhere: an inactive *account* refused on the next request
//! (`admin_accounts::inactive_account_is_refused_on_the_next_request`, through the proxy), and
//! usage in the store (`usage.rs`, `metering.rs`, and the usage endpoints in `admin_usage.rs`);
//! here `forwarded_requests_are_counted_in_metrics` checks the counters on `/metrics`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate::credential::{self, FormatError, Kind};
use tollgate::store::embedded::EmbeddedStore;

use common::gateway::Gateway;
use common::upstream::{pattern_byte, Upstream};
use common::{
    client, eventually, expect_echo, expect_refusal, header, hold_the_pool, one_blocking_thread,
};

/// Bound for every `eventually` in this file.
const WAIT: Duration = Duration::from_secs(5);

const ORIGIN: &str = "https://app.example.com";

/// The key's identity headers and everything else the upstream saw, by lowercase name.
fn seen_headers(echo: &Value) -> &serde_json::Map<String, Value> {
    echo["headers"].as_object().expect("headers in the echo")
}

/// A valid-looking credential with its last checksum character changed.
fn with_bad_checksum(raw: &str) -> String {
    let mut bad = raw.to_owned();
    let last = bad.pop().expect("non-empty key");
    bad.push(if last == '0' { '1' } else { '0' });
    assert_eq!(credential::parse(&bad), Err(FormatError::BadChecksum));
    bad
}

/// Reads `stream` a byte at a time (nothing past what is asked for) until what was read ends
/// with `end`; fails if it closes first or takes longer than [`WAIT`].
async fn read_until(stream: &mut tokio::net::TcpStream, end: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(end) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("answer in time")
            .expect("read");
        assert_eq!(n, 1, "closed after {got:?}");
        got.push(byte[0]);
    }
    got
}

async fn cache_misses(gw: &Gateway) -> f64 {
    gw.metric("tollgate_key_cache_misses_total", &[]).await
}

// === refusals: 401 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_without_credential_is_401_missing_credential() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let response = client().get(gw.proxy_url("/things")).send().await.unwrap();
    expect_refusal(response, StatusCode::UNAUTHORIZED, "missing_credential").await;
    assert_eq!(upstream.requests_seen(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_checksum_is_401_invalid_credential_without_a_store_lookup() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let bad = with_bad_checksum(&key);
    let before = cache_misses(&gw).await;

    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&bad)
        .send()
        .await
        .unwrap();

    expect_refusal(response, StatusCode::UNAUTHORIZED, "invalid_credential").await;
    assert_eq!(
        cache_misses(&gw).await,
        before,
        "a bad checksum must not reach the store"
    );
    assert_eq!(upstream.requests_seen(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_well_formed_key_is_401_invalid_credential_after_one_lookup() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let unknown = credential::generate(Kind::Secret);
    let before = cache_misses(&gw).await;

    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&unknown)
        .send()
        .await
        .unwrap();

    expect_refusal(response, StatusCode::UNAUTHORIZED, "invalid_credential").await;
    assert_eq!(
        cache_misses(&gw).await,
        before + 1.0,
        "a well-formed key is looked up once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_past_its_ttl_is_401_expired_credential() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, key) = gw
        .create_key(
            &account,
            json!({ "name": "brief", "type": "secret", "ttl": "1s" }),
        )
        .await;
    let client = client();
    let url = gw.proxy_url("/things");

    let (c, u, k) = (&client, &url, &key);
    let expired = eventually(WAIT, move || async move {
        let response = c.get(u).bearer_auth(k).send().await.unwrap();
        response.status() == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(expired, "the key still passes {WAIT:?} after a 1s ttl");

    let response = client.get(&url).bearer_auth(&key).send().await.unwrap();
    expect_refusal(response, StatusCode::UNAUTHORIZED, "expired_credential").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivated_key_is_refused_on_next_request_and_activate_restores_it() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    // The last active secret key cannot be deactivated: keep a second one.
    gw.create_key(&account, json!({ "name": "spare", "type": "secret" }))
        .await;
    let (key_id, key) = gw
        .create_key(&account, json!({ "name": "main", "type": "secret" }))
        .await;
    let client = client();
    let url = gw.proxy_url("/things");
    let get = || client.get(&url).bearer_auth(&key).send();

    expect_echo(get().await.unwrap()).await;

    let base = format!("/v1/accounts/{account}/keys/{key_id}");
    let (status, body) = gw
        .admin(Method::POST, &format!("{base}/deactivate"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "deactivate: {body}");
    expect_refusal(
        get().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "inactive_credential",
    )
    .await;

    let (status, body) = gw
        .admin(Method::POST, &format!("{base}/activate"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "activate: {body}");
    expect_echo(get().await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_is_401_invalid_credential_on_next_request() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    gw.create_key(&account, json!({ "name": "spare", "type": "secret" }))
        .await;
    let (key_id, key) = gw
        .create_key(&account, json!({ "name": "main", "type": "secret" }))
        .await;
    let client = client();
    let url = gw.proxy_url("/things");

    expect_echo(client.get(&url).bearer_auth(&key).send().await.unwrap()).await;
    let (status, body) = gw
        .admin(
            Method::DELETE,
            &format!("/v1/accounts/{account}/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "delete: {body}");
    assert_eq!(body, json!({ "deleted": true }));

    let response = client.get(&url).bearer_auth(&key).send().await.unwrap();
    expect_refusal(response, StatusCode::UNAUTHORIZED, "invalid_credential").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_key_of_an_oauth_account_is_401_auth_method_not_allowed() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw
        .create_account(json!({ "name": "oauth-only", "auth_method": "oauth" }))
        .await;
    // The admin API lets an oauth account hold keys; the proxy must still refuse them.
    let (_, key) = gw
        .create_key(&account, json!({ "name": "main", "type": "secret" }))
        .await;

    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();

    expect_refusal(
        response,
        StatusCode::UNAUTHORIZED,
        "auth_method_not_allowed",
    )
    .await;
    assert_eq!(upstream.requests_seen(), 0);
}

// === refusals: 403 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_allowed_ips_refuse_other_clients_with_403_ip_not_allowed() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, elsewhere) = gw
        .create_key(
            &account,
            json!({ "name": "ten", "type": "secret", "allowed_ips": ["10.0.0.0/8"] }),
        )
        .await;
    let (_, local) = gw
        .create_key(
            &account,
            json!({ "name": "local", "type": "secret", "allowed_ips": ["127.0.0.1/32"] }),
        )
        .await;
    let (_, v6) = gw
        .create_key(
            &account,
            json!({ "name": "v6", "type": "secret", "allowed_ips": ["2001:db8::/32"] }),
        )
        .await;
    let client = client();
    let url = gw.proxy_url("/things");

    let response = client
        .get(&url)
        .bearer_auth(&elsewhere)
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::FORBIDDEN, "ip_not_allowed").await;
    let response = client.get(&url).bearer_auth(&v6).send().await.unwrap();
    expect_refusal(response, StatusCode::FORBIDDEN, "ip_not_allowed").await;
    expect_echo(client.get(&url).bearer_auth(&local).send().await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_client_behind_a_trusted_proxy_is_matched_against_ipv6_cidrs() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .tweak(|s| s.proxy.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()])
        .start()
        .await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, key) = gw
        .create_key(
            &account,
            json!({ "name": "v6", "type": "secret", "allowed_ips": ["2001:db8::/32"] }),
        )
        .await;
    let client = client();
    let url = gw.proxy_url("/things");
    let from = |ip: &'static str| {
        client
            .get(&url)
            .bearer_auth(&key)
            .header("x-forwarded-for", ip)
            .send()
    };

    let echo = expect_echo(from("2001:db8::1").await.unwrap()).await;
    assert_eq!(
        seen_headers(&echo)["x-forwarded-for"],
        "2001:db8::1, 127.0.0.1"
    );
    expect_refusal(
        from("2001:db9::1").await.unwrap(),
        StatusCode::FORBIDDEN,
        "ip_not_allowed",
    )
    .await;
    let direct = client.get(&url).bearer_auth(&key).send().await.unwrap();
    expect_refusal(direct, StatusCode::FORBIDDEN, "ip_not_allowed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishable_key_is_limited_to_its_origins_and_to_reads() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, key) = gw
        .create_key(
            &account,
            json!({ "name": "web", "type": "publishable", "allowed_origins": [ORIGIN] }),
        )
        .await;
    assert!(key.starts_with("tgpk_"), "{key}");
    let client = client();
    let url = gw.proxy_url("/things");
    let get = || client.get(&url).bearer_auth(&key);

    let echo = expect_echo(get().header("origin", ORIGIN).send().await.unwrap()).await;
    assert_eq!(seen_headers(&echo)["x-tollgate-key-type"], "publishable");

    let other = get()
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    expect_refusal(other, StatusCode::FORBIDDEN, "origin_not_allowed").await;

    let by_referer = get()
        .header("referer", "https://app.example.com/page")
        .send()
        .await
        .unwrap();
    expect_echo(by_referer).await;

    let neither = get().send().await.unwrap();
    expect_refusal(neither, StatusCode::FORBIDDEN, "origin_not_allowed").await;

    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let write = client
            .request(method.clone(), &url)
            .bearer_auth(&key)
            .header("origin", ORIGIN)
            .body("{}")
            .send()
            .await
            .unwrap();
        expect_refusal(write, StatusCode::FORBIDDEN, "publishable_key_write").await;
    }
    // HEAD and OPTIONS are reads, as GET is.
    for method in [Method::HEAD, Method::OPTIONS] {
        let read = client
            .request(method.clone(), &url)
            .bearer_auth(&key)
            .header("origin", ORIGIN)
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), StatusCode::OK, "{method}");
    }
}

/// The account's `allowed_domains` are domains: `example.com` is that host over http and https
/// on their default ports, `*.example.org` its subdomains; a full origin is exactly that origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishable_key_passes_from_its_accounts_allowed_domains() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw
        .create_account(json!({
            "name": "acme",
            "network_policy": {
                "allowed_domains": ["example.com", "*.example.org", "https://exact.example.net:8443"]
            }
        }))
        .await;
    let (_, key) = gw
        .create_key(
            &account,
            json!({ "name": "web", "type": "publishable", "allowed_origins": [ORIGIN] }),
        )
        .await;
    let client = client();
    let url = gw.proxy_url("/things");
    let from = |origin: &str| {
        client
            .get(&url)
            .bearer_auth(&key)
            .header("origin", origin)
            .send()
    };

    for allowed in [
        "https://example.com",
        "http://example.com",
        "HTTPS://Example.COM:443",
        "https://a.example.org",
        "https://a.b.example.org",
        "https://exact.example.net:8443",
        ORIGIN,
    ] {
        expect_echo(from(allowed).await.unwrap()).await;
    }
    for refused in [
        "https://evil.com",
        "https://notexample.com",
        "https://sub.example.com",
        "https://example.com:8443",
        "https://example.org",
        "https://exact.example.net",
        "http://exact.example.net:8443",
        "null",
    ] {
        expect_refusal(
            from(refused).await.unwrap(),
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
        )
        .await;
    }
    let by_referer = client
        .get(&url)
        .bearer_auth(&key)
        .header("referer", "https://example.com/page?x=1")
        .send()
        .await
        .unwrap();
    expect_echo(by_referer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_without_the_write_scope_is_403_scope_denied() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, reader) = gw
        .create_key(
            &account,
            json!({ "name": "reader", "type": "secret", "scopes": ["orders:read"] }),
        )
        .await;
    let (_, full) = gw
        .create_key(&account, json!({ "name": "full", "type": "secret" }))
        .await;
    let client = client();
    let url = gw.proxy_url("/orders");

    let echo = expect_echo(client.get(&url).bearer_auth(&reader).send().await.unwrap()).await;
    assert_eq!(seen_headers(&echo)["x-tollgate-scopes"], "orders:read");
    let write = client
        .post(&url)
        .bearer_auth(&reader)
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_refusal(write, StatusCode::FORBIDDEN, "scope_denied").await;
    // Full access (scopes null) holds every scope.
    let echo = expect_echo(
        client
            .post(&url)
            .bearer_auth(&full)
            .body("{}")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(echo["method"], "POST");
}

// === refusals: 404, 413, 429, 502, 504 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_outside_every_route_is_404_no_route() {
    let upstream = Upstream::start().await;
    let routes = format!(
        "[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstreams = [\"{}\"]\n",
        upstream.url()
    );
    let gw = Gateway::builder(&upstream).routes(routes).start().await;
    let client = client();

    let response = client.get(gw.proxy_url("/other")).send().await.unwrap();
    expect_refusal(response, StatusCode::NOT_FOUND, "no_route").await;
    let response = client.get(gw.proxy_url("/apix")).send().await.unwrap();
    expect_refusal(response, StatusCode::NOT_FOUND, "no_route").await;
    // The route itself exists: it asks for a key.
    let response = client.get(gw.proxy_url("/api/x")).send().await.unwrap();
    expect_refusal(response, StatusCode::UNAUTHORIZED, "missing_credential").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_body_over_the_limit_is_413_body_too_large() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .tweak(|s| s.proxy.max_body_bytes = 1024)
        .start()
        .await;
    let (_, key) = gw.account_with_key().await;
    let client = client();

    let response = client
        .post(gw.proxy_url("/upload"))
        .bearer_auth(&key)
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;
    assert_eq!(upstream.requests_seen(), 0, "refused before forwarding");

    let at_limit = client
        .post(gw.proxy_url("/upload"))
        .bearer_auth(&key)
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(expect_echo(at_limit).await["body_bytes"], 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413_body_too_large() {
    const LIMIT: u64 = 64 * 1024;
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .tweak(|s| s.proxy.max_body_bytes = LIMIT)
        .start()
        .await;
    let (_, key) = gw.account_with_key().await;
    // Five 16 KiB chunks, no Content-Length: the limit trips while streaming.
    let chunks = futures_util::stream::iter(
        (0..5).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 16 * 1024]))),
    );

    let response = client()
        .post(gw.proxy_url("/upload"))
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();

    expect_refusal(response, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;
}

/// The hour and the day windows refuse too, each named in its 429, once the shorter windows
/// still have room: the structured `RateLimit` field names the window with the fewest left.
#[tokio::test]
async fn the_hour_and_the_day_windows_refuse_when_they_are_used_up() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let client = client();
    for (window, limits) in [
        (
            "hour",
            json!({ "per_minute": 100, "per_hour": 2, "per_day": 100 }),
        ),
        (
            "day",
            json!({ "per_minute": 100, "per_hour": 100, "per_day": 2 }),
        ),
    ] {
        let (_, key) = gw
            .create_key(&account, json!({ "name": window, "rate_limit": limits }))
            .await;
        for n in 1..=2 {
            let r = gw.get_with_key(&client, "/things", &key).await;
            assert_eq!(r.status(), StatusCode::OK, "{window}: request {n}");
            let structured = header(&r, "ratelimit").expect("RateLimit").to_owned();
            assert!(
                structured.starts_with(&format!("\"{window}\";r={};", 2 - n)),
                "{window}: {structured}"
            );
            expect_echo(r).await;
        }
        let refused = gw.get_with_key(&client, "/things", &key).await;
        assert!(header(&refused, "retry-after").is_some());
        assert_eq!(
            header(&refused, &format!("x-ratelimit-remaining-{window}")),
            Some("0")
        );
        let error = expect_refusal(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
        assert_eq!(error["window"], window);
    }
    let limited = |w: &'static str| [("window", w), ("shadow", "false")];
    assert_eq!(
        gw.metric("tollgate_rate_limited_total", &limited("hour"))
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("tollgate_rate_limited_total", &limited("day"))
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fourth_request_over_a_limit_of_three_per_minute_is_429_rate_limited() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, key) = gw
        .create_key(
            &account,
            json!({ "name": "tight", "type": "secret", "rate_limit": { "per_minute": 3 } }),
        )
        .await;
    let client = client();
    let url = gw.proxy_url("/things");

    for n in 1..=3 {
        let response = client.get(&url).bearer_auth(&key).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {n} of 3");
        assert_eq!(
            header(&response, "ratelimit-remaining"),
            Some(&*(3 - n).to_string())
        );
    }
    let response = client.get(&url).bearer_auth(&key).send().await.unwrap();
    let retry_after: u64 = header(&response, "retry-after")
        .expect("Retry-After on a 429")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!((1..=20).contains(&retry_after), "Retry-After {retry_after}");
    let policy = "\"minute\";q=3;w=60, \"hour\";q=1000;w=3600, \"day\";q=10000;w=86400";
    assert_eq!(header(&response, "ratelimit-policy"), Some(policy));
    let structured = header(&response, "ratelimit")
        .expect("RateLimit on a 429")
        .to_owned();
    assert!(structured.starts_with("\"minute\";r=0;t="), "{structured}");
    assert_eq!(header(&response, "ratelimit-limit"), Some("3"));
    assert_eq!(header(&response, "ratelimit-remaining"), Some("0"));
    let reset: u64 = header(&response, "ratelimit-reset")
        .unwrap()
        .parse()
        .unwrap();
    assert!(reset >= 1, "RateLimit-Reset {reset}");
    assert_eq!(header(&response, "x-ratelimit-limit-minute"), Some("3"));
    assert_eq!(header(&response, "x-ratelimit-remaining-minute"), Some("0"));
    assert_eq!(header(&response, "x-ratelimit-limit-hour"), Some("1000"));
    assert_eq!(header(&response, "x-ratelimit-limit-day"), Some("10000"));
    let error = expect_refusal(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(error["window"], "minute");
    assert_eq!(upstream.requests_seen(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_refuses_connections_is_502_upstream_unavailable() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let response = client()
        .get(gw.proxy_url("/dead/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::BAD_GATEWAY, "upstream_unavailable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slower_than_the_route_timeout_is_504_upstream_timeout() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let started = std::time::Instant::now();
    let response = client()
        .get(gw.proxy_url("/slow?ms=2000"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout").await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered after {:?}",
        started.elapsed()
    );
}

// === credentials ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_form_passes_and_the_credential_never_reaches_the_upstream() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (account, key) = gw.account_with_key().await;
    let client = client();
    let url = gw.proxy_url("/things?x=1");
    let forms = [
        ("bearer", client.get(&url).bearer_auth(&key)),
        ("x-api-key", client.get(&url).header("x-api-key", &key)),
        ("basic", client.get(&url).basic_auth(&key, Some(""))),
    ];

    for (form, request) in forms {
        let echo = expect_echo(request.send().await.unwrap()).await;
        assert_eq!(echo["path"], "/things?x=1", "{form}");
        let headers = seen_headers(&echo);
        assert_eq!(headers["x-tollgate-account-id"], account.as_str(), "{form}");
        assert!(
            !headers.contains_key("authorization"),
            "{form}: {headers:?}"
        );
        assert!(!headers.contains_key("x-api-key"), "{form}: {headers:?}");
        assert!(
            headers
                .values()
                .all(|v| !v.as_str().unwrap_or("").contains(&key)),
            "{form}: the credential reached the upstream: {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_beside_x_api_key_belongs_to_the_upstream() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;

    let response = client()
        .get(gw.proxy_url("/things"))
        .header("x-api-key", &key)
        .header("authorization", "Bearer upstream-token")
        .send()
        .await
        .unwrap();

    let echo = expect_echo(response).await;
    let headers = seen_headers(&echo);
    assert_eq!(headers["authorization"], "Bearer upstream-token");
    assert!(!headers.contains_key("x-api-key"), "{headers:?}");
}

// === headers ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_are_replaced_by_the_real_identity() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, key) = gw
        .create_key(
            &account,
            json!({ "name": "main", "type": "secret", "scopes": ["a:read", "b:write"] }),
        )
        .await;

    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&key)
        .header("X-Tollgate-Account-Id", "evil")
        .header("X-Tollgate-Key-Id", "evil")
        .header("X-Tollgate-External-Id", "evil")
        .header("x-tollgate-anything", "x")
        .send()
        .await
        .unwrap();

    let echo = expect_echo(response).await;
    let headers = seen_headers(&echo);
    assert_eq!(headers["x-tollgate-account-id"], account.as_str());
    assert_eq!(headers["x-tollgate-key-id"], key_id.as_str());
    assert_eq!(headers["x-tollgate-key-type"], "secret");
    assert_eq!(headers["x-tollgate-scopes"], "a:read b:write");
    // The key has no external_id: no header at all, and not the client's.
    assert!(
        !headers.contains_key("x-tollgate-external-id"),
        "{headers:?}"
    );
    assert!(!headers.contains_key("x-tollgate-anything"), "{headers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_id_is_forwarded_in_place_of_a_client_sent_one() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, key) = gw
        .create_key(
            &account,
            json!({ "name": "main", "external_id": "user 42/eu" }),
        )
        .await;
    let send = || {
        client()
            .get(gw.proxy_url("/things"))
            .bearer_auth(&key)
            .header("X-Tollgate-External-Id", "someone-else")
            .send()
    };

    let echo = expect_echo(send().await.unwrap()).await;
    assert_eq!(seen_headers(&echo)["x-tollgate-external-id"], "user 42/eu");

    // Changed, then cleared: the proxy sends the new value on the next request, then none.
    let path = format!("/v1/accounts/{account}/keys/{key_id}");
    for (patch, seen) in [
        (json!({ "external_id": "user 43" }), Some("user 43")),
        (json!({ "external_id": null }), None),
    ] {
        let (status, body) = gw.admin(Method::PATCH, &path, Some(patch)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let echo = expect_echo(send().await.unwrap()).await;
        let headers = seen_headers(&echo);
        assert_eq!(
            headers
                .get("x-tollgate-external-id")
                .and_then(Value::as_str),
            seen,
            "{headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_route_forwards_no_identity_headers_at_all() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;

    let response = client()
        .get(gw.proxy_url("/public/page"))
        .header("X-Tollgate-Account-Id", "evil")
        .header("x-tollgate-anything", "x")
        .send()
        .await
        .unwrap();

    assert!(
        header(&response, "ratelimit").is_none(),
        "no key, no limit headers"
    );
    let echo = expect_echo(response).await;
    assert_eq!(echo["path"], "/public/page");
    let identity: Vec<&String> = seen_headers(&echo)
        .keys()
        .filter(|name| name.starts_with("x-tollgate-"))
        .collect();
    assert!(
        identity.is_empty(),
        "identity headers on a public route: {identity:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_added_and_hop_by_hop_headers_removed() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;

    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&key)
        .header("connection", "x-custom")
        .header("x-custom", "hop")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();

    let echo = expect_echo(response).await;
    let headers = seen_headers(&echo);
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(
        headers["x-forwarded-host"],
        gw.proxy_addr.to_string().as_str()
    );
    assert_eq!(headers["x-end-to-end"], "kept");
    for hop in ["x-custom", "keep-alive", "te"] {
        assert!(
            !headers.contains_key(hop),
            "{hop} was forwarded: {headers:?}"
        );
    }
    if let Some(connection) = headers.get("connection") {
        assert!(
            !connection.as_str().unwrap_or("").contains("x-custom"),
            "the client's Connection was forwarded: {connection}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passed_response_carries_both_styles_of_limit_headers() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, key) = gw
        .create_key(
            &account,
            json!({ "name": "main", "type": "secret",
                    "rate_limit": { "per_minute": 60, "per_hour": 1000, "per_day": 10000 } }),
        )
        .await;

    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let expected = [
        (
            "ratelimit-policy",
            "\"minute\";q=60;w=60, \"hour\";q=1000;w=3600, \"day\";q=10000;w=86400",
        ),
        ("ratelimit", "\"minute\";r=59;t=1"),
        ("ratelimit-limit", "60"),
        ("ratelimit-remaining", "59"),
        ("ratelimit-reset", "1"),
        ("x-ratelimit-limit-minute", "60"),
        ("x-ratelimit-limit-hour", "1000"),
        ("x-ratelimit-limit-day", "10000"),
        ("x-ratelimit-remaining-minute", "59"),
        ("x-ratelimit-remaining-hour", "999"),
        ("x-ratelimit-remaining-day", "9999"),
    ];
    for (name, value) in expected {
        assert_eq!(header(&response, name), Some(value), "{name}");
    }
}

/// `limits.headers` chooses the styles: each alone sends its own headers and none of the
/// others', the empty list sends none, and a 429 keeps its `Retry-After` whatever the choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_header_styles_are_sent_as_configured() {
    use tollgate::config::LimitHeaders;
    const IETF: &[&str] = &["ratelimit-policy", "ratelimit"];
    const LEGACY: &[&str] = &["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"];
    const PER_WINDOW: &[&str] = &[
        "x-ratelimit-limit-minute",
        "x-ratelimit-limit-hour",
        "x-ratelimit-limit-day",
        "x-ratelimit-remaining-minute",
        "x-ratelimit-remaining-hour",
        "x-ratelimit-remaining-day",
    ];
    let upstream = Upstream::start().await;
    for (styles, sent) in [
        (
            LimitHeaders {
                ietf: true,
                ..LimitHeaders::NONE
            },
            IETF,
        ),
        (
            LimitHeaders {
                legacy: true,
                ..LimitHeaders::NONE
            },
            LEGACY,
        ),
        (
            LimitHeaders {
                per_window: true,
                ..LimitHeaders::NONE
            },
            PER_WINDOW,
        ),
        (LimitHeaders::NONE, &[][..]),
    ] {
        let gw = Gateway::builder(&upstream)
            .tweak(move |s| s.limits.headers = styles)
            .start()
            .await;
        let account = gw.create_account(json!({ "name": "acme" })).await;
        let (_, key) = gw
            .create_key(
                &account,
                json!({ "name": "k", "type": "secret", "rate_limit": { "per_minute": 1 } }),
            )
            .await;
        let client = client();
        let passed = gw.get_with_key(&client, "/a", &key).await;
        let refused = gw.get_with_key(&client, "/b", &key).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(header(&refused, "retry-after").is_some(), "{styles:?}");
        for response in [&passed, &refused] {
            for name in IETF.iter().chain(LEGACY).chain(PER_WINDOW) {
                assert_eq!(
                    header(response, name).is_some(),
                    sent.contains(name),
                    "{name} with {styles:?}"
                );
            }
        }
    }
}

// === bodies ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_mib_upload_streams_through_and_back_intact() {
    const SIZE: usize = 8 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .tweak(|s| s.proxy.max_body_bytes = 16 * 1024 * 1024)
        .start()
        .await;
    let (_, key) = gw.account_with_key().await;
    let chunk_at = |start: usize| -> Bytes {
        (start..start + CHUNK)
            .map(|i| (i.wrapping_mul(7) % 256) as u8)
            .collect()
    };
    let mut sent = Sha256::new();
    for start in (0..SIZE).step_by(CHUNK) {
        sent.update(chunk_at(start));
    }
    let upload = futures_util::stream::iter(
        (0..SIZE)
            .step_by(CHUNK)
            .map(move |s| Ok::<_, std::io::Error>(chunk_at(s))),
    );

    let response = client()
        .post(gw.proxy_url("/echo-body"))
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let mut received = Sha256::new();
    let mut length = 0;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("response body chunk");
        length += chunk.len();
        received.update(&chunk);
    }
    assert_eq!(length, SIZE);
    assert_eq!(
        received.finalize(),
        sent.finalize(),
        "the body came back changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_mib_download_streams_through_intact() {
    const SIZE: u64 = 32 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let mut expected = Sha256::new();
    let pattern: Vec<u8> = (0..SIZE).map(pattern_byte).collect();
    expected.update(&pattern);

    let response = client()
        .get(gw.proxy_url(&format!("/big?bytes={SIZE}")))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let mut received = Sha256::new();
    let mut length: u64 = 0;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("response body chunk");
        length += chunk.len() as u64;
        received.update(&chunk);
    }
    assert_eq!(length, SIZE);
    assert_eq!(
        received.finalize(),
        expected.finalize(),
        "the body arrived changed"
    );
}

// === lifecycle ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_a_restart() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let (account, key) = gw.account_with_key().await;
    let client = client();
    expect_echo(
        client
            .get(gw.proxy_url("/things"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
    )
    .await;

    gw.restart().await;

    let echo = expect_echo(
        client
            .get(gw.proxy_url("/things"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        seen_headers(&echo)["x-tollgate-account-id"],
        account.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_are_counted_in_metrics() {
    const SENT: usize = 7;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let client = client();
    for _ in 0..SENT {
        expect_echo(
            client
                .get(gw.proxy_url("/things"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap(),
        )
        .await;
    }
    let response = client
        .get(gw.proxy_url("/status/503"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let response = client.get(gw.proxy_url("/things")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let forwarded = |class| {
        [
            ("route", "api"),
            ("outcome", "forwarded"),
            ("status_class", class),
        ]
    };
    assert_eq!(
        gw.metric("tollgate_requests_total", &forwarded("2xx"))
            .await,
        SENT as f64
    );
    assert_eq!(
        gw.metric("tollgate_requests_total", &forwarded("5xx"))
            .await,
        1.0
    );
    let refused = [
        ("route", "api"),
        ("outcome", "missing_credential"),
        ("status_class", "4xx"),
    ];
    assert_eq!(gw.metric("tollgate_requests_total", &refused).await, 1.0);
}

/// Every refusal is counted once: in `requests_total` under its route (`-` before one matched)
/// and, once a key was identified, in that key's usage; the answer to a request whose windows
/// were checked carries their limit headers, refused or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_once_and_metered_once_a_key_is_identified() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let limits = json!({ "name": "tight", "rate_limit": { "per_minute": 2 } });
    let (_, key) = gw.create_key(&account, limits).await;
    let client = client();

    expect_echo(gw.get_with_key(&client, "/things", &key).await).await;
    // Refused after the permit (nothing listens upstream): the windows went down by one.
    let unavailable = gw.get_with_key(&client, "/dead/x", &key).await;
    assert_eq!(header(&unavailable, "ratelimit-remaining"), Some("0"));
    expect_refusal(unavailable, StatusCode::BAD_GATEWAY, "upstream_unavailable").await;
    let limited = gw.get_with_key(&client, "/things", &key).await;
    expect_refusal(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // Refused before a route matched, so before any key was identified.
    let ambiguous = gw.get_with_key(&client, "/things/a%2Fb", &key).await;
    expect_refusal(ambiguous, StatusCode::BAD_REQUEST, "bad_request").await;

    for (route, outcome, class) in [
        ("api", "forwarded", "2xx"),
        ("dead", "upstream_unavailable", "5xx"),
        ("api", "rate_limited", "4xx"),
        ("-", "bad_request", "4xx"),
    ] {
        let labels = [
            ("route", route),
            ("outcome", outcome),
            ("status_class", class),
        ];
        let n = gw.metric("tollgate_requests_total", &labels).await;
        assert_eq!(n, 1.0, "{route} {outcome}");
    }
    let minute = [("window", "minute"), ("shadow", "false")];
    assert_eq!(gw.metric("tollgate_rate_limited_total", &minute).await, 1.0);
    let store_path = gw.store_path();
    let _dir = gw.stop().await;
    let store = EmbeddedStore::open(&store_path).expect("reopen the store");
    // (requests, success): the three identified to the key, the first of them passed.
    assert_eq!(minute_totals(&store).await, (3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let client = client();
    // Through the `api` route (30 s timeout), not `/slow` (300 ms).
    let request = client
        .get(gw.proxy_url("/long/slow?ms=500"))
        .bearer_auth(&key)
        .send();
    let in_flight = tokio::spawn(request);
    let up = &upstream;
    assert!(
        eventually(WAIT, move || async move { up.requests_seen() == 1 }).await,
        "the request did not reach the upstream"
    );
    let proxy_url = gw.proxy_url("/things");
    let store_path = gw.store_path();

    let stopping = tokio::spawn(gw.stop());
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");

    let echo = expect_echo(response).await;
    assert_eq!(echo["path"], "/long/slow?ms=500");
    let _dir = stopping.await.unwrap();
    assert!(
        client.get(&proxy_url).send().await.is_err(),
        "still accepting after stop"
    );
    // The request finished during the drain; the final flush comes after it, so it counts.
    let store = EmbeddedStore::open(&store_path).expect("reopen the store");
    let (requests, success) = minute_totals(&store).await;
    assert_eq!((requests, success), (1, 1));
}

/// Sums of every key's minute buckets around now: (requests, success).
async fn minute_totals(store: &EmbeddedStore) -> (u64, u64) {
    use tollgate::store::{Records, Usage};
    let now_minute = chrono::Utc::now().timestamp() / 60;
    let mut totals = (0, 0);
    for account in store.list_accounts().await.expect("accounts") {
        for key in store.list_keys(&account.id).await.expect("keys") {
            let buckets = store
                .key_usage(
                    &key.id,
                    tollgate::store::Granularity::Minute,
                    now_minute - 5,
                    now_minute + 2,
                )
                .await
                .expect("usage");
            totals.0 += buckets.iter().map(|(_, c)| c.requests).sum::<u64>();
            totals.1 += buckets.iter().map(|(_, c)| c.success).sum::<u64>();
        }
    }
    totals
}

/// A gateway whose clients get 200 ms for a request head, and a connection to it.
async fn impatient_gateway(upstream: &Upstream) -> (Gateway, tokio::net::TcpStream) {
    let gw = Gateway::builder(upstream)
        .tweak(|s| s.proxy.request_header_timeout = Duration::from_millis(200))
        .start()
        .await;
    let stream = tokio::net::TcpStream::connect(gw.proxy_addr)
        .await
        .expect("connect");
    (gw, stream)
}

/// What the gateway sends before it closes `stream`; `None` when it is still open after 5 s.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    closed.ok().map(|_| rest)
}

#[tokio::test]
async fn a_client_too_slow_to_send_its_request_head_is_disconnected() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let (_gw, mut stream) = impatient_gateway(&upstream).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: example\r\n")
        .await
        .expect("partial head");
    // The head never completes; the gateway must close the connection on its own.
    let closed = read_until_closed(&mut stream).await;
    assert!(closed.is_some(), "the connection was still open after 5 s");
    assert_eq!(upstream.requests_seen(), 0);
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_disconnected_after_the_header_timeout() {
    let upstream = Upstream::start().await;
    let (_gw, mut stream) = impatient_gateway(&upstream).await;
    let closed = read_until_closed(&mut stream).await;
    assert!(closed.is_some(), "the connection was still open after 5 s");
    let rest = closed.unwrap_or_default();
    assert!(rest.is_empty(), "{rest:?}");
}

/// The idle close counts an answer still being sent as activity: a download read slowly over
/// HTTP/2 (the client's flow-control window kept small, so the gateway can send only as fast
/// as it reads) for several times the idle period arrives whole.
#[tokio::test]
async fn a_slow_http2_download_is_not_cut_by_the_idle_close() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .tweak(|s| s.proxy.request_header_timeout = Duration::from_millis(200))
        .start()
        .await;
    let (_, key) = gw.account_with_key().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .http2_initial_stream_window_size(65_535)
        .http2_initial_connection_window_size(65_535)
        .build()
        .expect("client");
    let total = 512 * 1024;
    let mut response = client
        .get(gw.proxy_url(&format!("/things/big?bytes={total}")))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("send over h2");
    assert_eq!(response.status(), StatusCode::OK);
    let (started, mut got) = (std::time::Instant::now(), 0);
    while let Some(chunk) = response.chunk().await.expect("the download was cut") {
        got += chunk.len();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(got, total);
    assert!(
        started.elapsed() > Duration::from_millis(800),
        "read too fast to show anything: {:?}",
        started.elapsed()
    );
}

/// "P" may begin a POST or the HTTP/2 preface: the gateway waits for the next bytes to tell.
#[tokio::test]
async fn a_request_head_whose_first_byte_arrives_alone_is_served() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let mut stream = tokio::net::TcpStream::connect(gw.proxy_addr)
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(b"P").await.expect("first byte");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rest = format!(
        "OST /things/echo-body HTTP/1.1\r\nHost: example\r\nX-API-Key: {key}\r\n\
         Content-Length: 2\r\n\r\nhi"
    );
    stream.write_all(rest.as_bytes()).await.expect("rest");
    let head = read_until(&mut stream, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// A client stream that sends its first `first` bytes, then nothing until `pause` has passed.
struct SlowStart {
    inner: tokio::net::TcpStream,
    first: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl tokio::io::AsyncRead for SlowStart {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SlowStart {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.first > 0 {
            let part = &buf[..buf.len().min(this.first)];
            let n = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_write(cx, part))?;
            this.first -= n;
            return std::task::Poll::Ready(Ok(n));
        }
        if let Some(pause) = &mut this.pause {
            std::task::ready!(std::future::Future::poll(pause.as_mut(), cx));
            this.pause = None;
        }
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_preface_split_in_two_is_still_http2() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let inner = tokio::net::TcpStream::connect(gw.proxy_addr)
        .await
        .expect("connect");
    inner.set_nodelay(true).expect("nodelay");
    let slow = SlowStart {
        inner,
        first: 10,
        pause: Some(Box::pin(tokio::time::sleep(Duration::from_millis(50)))),
    };
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(slow))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let request = http::Request::get(gw.proxy_url("/things"))
        .header("x-api-key", &key)
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("answer in time")
        .expect("send over h2");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), http::StatusCode::OK);
}

/// A request still under way when the drain's 10 s are over is closed then, before the final
/// flush, and so counted (as the client's leaving); it used to run on, uncounted, until the
/// process exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_off_by_the_end_of_the_drain_is_counted() {
    cut_off_by_the_drain_and_counted(client()).await;
}

/// The same over HTTP/2, whose streams run in tasks of their own (hyper spawns one a stream):
/// the drain waits for them to end once their connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_cut_off_by_the_end_of_the_drain_is_counted() {
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    cut_off_by_the_drain_and_counted(client).await;
}

async fn cut_off_by_the_drain_and_counted(client: reqwest::Client) {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    // Through the `api` route (30 s timeout): the upstream answers after the drain.
    let in_flight = tokio::spawn(
        client
            .get(gw.proxy_url("/long/slow?ms=25000"))
            .bearer_auth(&key)
            .send(),
    );
    let up = &upstream;
    assert!(
        eventually(WAIT, move || async move { up.requests_seen() == 1 }).await,
        "the request did not reach the upstream"
    );
    let store_path = gw.store_path();
    let _dir = tokio::time::timeout(Duration::from_secs(20), gw.stop())
        .await
        .expect("the stop waited on the request past the drain");
    assert!(
        in_flight.await.expect("task").is_err(),
        "the cut request was answered"
    );
    let store = EmbeddedStore::open(&store_path).expect("reopen the store");
    let (requests, success) = minute_totals(&store).await;
    assert_eq!((requests, success), (1, 0));
}

#[tokio::test]
async fn usage_of_every_identified_request_is_in_the_store_after_shutdown() {
    use tollgate::store::Usage;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (account_id, key) = gw.account_with_key().await;
    let client = client();
    for _ in 0..7 {
        let r = client
            .get(gw.proxy_url("/things"))
            .bearer_auth(&key)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = client
        .get(gw.proxy_url("/dead/x"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let (_, keys) = gw
        .admin(
            Method::GET,
            &format!("/v1/accounts/{account_id}/keys"),
            None,
        )
        .await;
    let key_id = keys["keys"][0]["id"].as_str().expect("key id").to_owned();
    let path = gw.store_path();
    let _dir = gw.stop().await;
    let store = EmbeddedStore::open(&path).expect("reopen the store");
    let now_minute = chrono::Utc::now().timestamp() / 60;
    let buckets = store
        .key_usage(
            &key_id,
            tollgate::store::Granularity::Minute,
            now_minute - 5,
            now_minute + 2,
        )
        .await
        .expect("usage");
    let requests: u64 = buckets.iter().map(|(_, c)| c.requests).sum();
    let success: u64 = buckets.iter().map(|(_, c)| c.success).sum();
    let error: u64 = buckets.iter().map(|(_, c)| c.error).sum();
    assert_eq!((requests, success, error), (8, 7, 1));
    assert!(buckets.iter().map(|(_, c)| c.bytes_out).sum::<u64>() > 0);
}

/// A shutdown on a hung disk (here: the blocking pool's only thread held, so every embedded
/// store call queues behind it) ends in bounded time: the flusher's flush under way is cut off
/// by the shutdown and its last one by its deadline, and the credit leases' hand-back by its
/// own. Before, the flush and the hand-back waited on the disk for ever, and so did the stop.
#[test]
fn a_shutdown_on_a_hung_disk_ends_in_bounded_time() {
    one_blocking_thread().block_on(async {
        let upstream = Upstream::start().await;
        let gw = Gateway::builder(&upstream)
            .tweak(|s| s.metering.flush_interval = Duration::from_millis(50))
            .start()
            .await;
        let (account, _) = gw.account_with_key().await;
        let body = json!({ "name": "credits", "type": "secret", "remaining": 100 });
        let (_, key) = gw.create_key(&account, body).await;
        let client = client();
        // Counted usage to flush, and a credit lease to hand back.
        expect_echo(gw.get_with_key(&client, "/things", &key).await).await;

        let (release, hold) = hold_the_pool();
        expect_echo(gw.get_with_key(&client, "/things", &key).await).await;
        // A flush or two begin and wait on the disk.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let stopped = tokio::time::timeout(Duration::from_secs(40), gw.stop()).await;
        let took = started.elapsed();
        release.send(()).expect("release the pool");
        hold.await.expect("the holder");
        assert!(
            stopped.is_ok(),
            "the stop waited on the hung disk past {took:?}"
        );
    });
}

/// With the usage log (`durability = "wal"`), a shutdown that cuts off a flush while the log's
/// rotation waits on the disk loses none of that rotation's counts: the final flush takes them
/// from the rotation once the disk answers again (here 1 s into the stop), then rotates once
/// more for what was counted since, and all of it is in the store when the stop returns. Before, the cut-off rotation's counts were dropped with it, and
/// reached the store only by a replay at the next start.
#[test]
fn a_log_rotation_cut_off_by_the_shutdown_is_flushed() {
    one_blocking_thread().block_on(async {
        let upstream = Upstream::start().await;
        let gw = Gateway::builder(&upstream)
            .tweak(|s| {
                s.metering.flush_interval = Duration::from_millis(50);
                if let tollgate::config::StoreSettings::Embedded { path } = &s.store {
                    s.metering.durability = tollgate::config::Durability::Wal {
                        path: path.with_file_name("t.usage-wal"),
                        sync_interval: Duration::from_millis(5),
                    };
                }
            })
            .start()
            .await;
        let (_, key) = gw.account_with_key().await;
        let client = client();
        // Cached, and its first count flushed, before the disk hangs.
        expect_echo(gw.get_with_key(&client, "/things", &key).await).await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        let (release, hold) = hold_the_pool();
        for _ in 0..3 {
            expect_echo(gw.get_with_key(&client, "/things", &key).await).await;
        }
        // A flush begins, its rotation waiting on the disk; one more request is counted in the
        // log after it, which the final flush's own rotation must take.
        tokio::time::sleep(Duration::from_millis(200)).await;
        expect_echo(gw.get_with_key(&client, "/things", &key).await).await;
        let thaw = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            release.send(()).expect("release the pool");
        });
        let path = gw.store_path();
        let stopped = tokio::time::timeout(Duration::from_secs(40), gw.stop()).await;
        thaw.await.expect("thaw");
        hold.await.expect("the holder");
        let _dir = stopped.expect("the stop waited past its deadlines");
        let store = EmbeddedStore::open(&path).expect("reopen the store");
        let (requests, success) = minute_totals(&store).await;
        assert_eq!((requests, success), (5, 5));
    });
}

#[tokio::test]
async fn the_account_api_is_on_the_proxy_listener_only_when_exposed() {
    let upstream = Upstream::start().await;
    let exposed = Gateway::builder(&upstream)
        .tweak(|s| s.proxy.expose_account_api = true)
        .start()
        .await;
    let (account_id, key) = exposed.account_with_key().await;
    let client = client();
    let me = client
        .get(exposed.proxy_url("/v1/account"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(me.status(), StatusCode::OK);
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["id"], account_id.as_str());
    // The operator's paths are never served there: this one is proxied like any other path.
    let operator = client
        .get(exposed.proxy_url("/v1/accounts"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(expect_echo(operator).await["path"], "/v1/accounts");

    let closed = Gateway::start(&upstream).await;
    let (_, key) = closed.account_with_key().await;
    let proxied = client
        .get(closed.proxy_url("/v1/account"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("send");
    assert_eq!(expect_echo(proxied).await["path"], "/v1/account");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_across_requests_and_client_connections() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    for _ in 0..2 {
        // A new client each round: a new client connection, the same upstream connection.
        let client = client();
        for _ in 0..10 {
            expect_echo(gw.get_with_key(&client, "/things", &key).await).await;
        }
    }
    assert_eq!(upstream.requests_seen(), 20);
    assert_eq!(upstream.connections_seen(), 1);
}

#[tokio::test]
async fn an_upstream_connection_that_closes_is_not_reused() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let client = client();
    for path in ["/close", "/things", "/close", "/things"] {
        let r = gw.get_with_key(&client, path, &key).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(header(&r, "connection"), None, "hop-by-hop header leaked");
        expect_echo(r).await;
    }
    // Each `/close` ends its connection, so the request after it needs a new one.
    assert_eq!(upstream.connections_seen(), 3);
}

#[tokio::test]
async fn an_http_1_0_upstream_is_answered_to_the_client_as_http_1_1_on_a_kept_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that speaks HTTP/1.0: one answer per connection, then it closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let old_url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    });
    let upstream = Upstream::start().await;
    let routes = format!(
        r#"
[[routes]]
name = "old"
path_prefix = "/"
upstreams = ["{old_url}"]
auth = "public"
"#
    );
    let gw = Gateway::builder(&upstream).routes(routes).start().await;
    let mut stream = tokio::net::TcpStream::connect(gw.proxy_addr)
        .await
        .expect("connect");
    for round in 0..2 {
        stream
            .write_all(b"GET /x HTTP/1.1\r\nHost: example\r\n\r\n")
            .await
            .expect("request");
        let got = read_until(&mut stream, b"\r\n\r\nok").await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "round {round}: {got}");
    }
}

#[tokio::test]
async fn http2_clients_are_served() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let requests = (0..8).map(|i| {
        client
            .post(gw.proxy_url("/things/echo-body"))
            .header("x-api-key", &key)
            .body(vec![i as u8; 10_000])
            .send()
    });
    for (i, response) in futures_util::future::join_all(requests)
        .await
        .into_iter()
        .enumerate()
    {
        let response = response.expect("send over h2");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        assert!(header(&response, "ratelimit").is_some());
        let body = response.bytes().await.expect("body");
        assert_eq!(body.len(), 10_000);
        assert!(body.iter().all(|b| *b == i as u8));
    }
}

/// A route's upstreams take turns (round robin); `strip_prefix` and an upstream's base path
/// shape the path each one gets, and a `host` route wins over the catch-all for its host.
#[tokio::test]
async fn a_routes_upstreams_take_turns_and_get_the_rewritten_path() {
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let routes = format!(
        r#"
[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["{a}"]

[[routes]]
name = "pair"
path_prefix = "/pair"
upstreams = ["{a}/base", "{b}"]
strip_prefix = true
auth = "public"

[[routes]]
name = "hosted"
host = "b.example.com"
path_prefix = "/"
upstreams = ["{b}"]
auth = "public"
"#,
        a = a.url(),
        b = b.url()
    );
    let gw = Gateway::builder(&a).routes(routes).start().await;
    let client = client();
    let mut paths = Vec::new();
    for _ in 0..10 {
        let r = client
            .get(gw.proxy_url("/pair/items?x=1"))
            .send()
            .await
            .expect("send");
        paths.push(
            expect_echo(r).await["path"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    assert_eq!((a.requests_seen(), b.requests_seen()), (5, 5));
    assert_eq!(
        paths.iter().filter(|p| *p == "/base/items?x=1").count(),
        5,
        "{paths:?}"
    );
    assert_eq!(
        paths.iter().filter(|p| *p == "/items?x=1").count(),
        5,
        "{paths:?}"
    );
    let hosted = client
        .get(gw.proxy_url("/anything"))
        .header("host", "B.example.com:8080")
        .send()
        .await
        .expect("send");
    expect_echo(hosted).await;
    assert_eq!(b.requests_seen(), 6, "the host route did not win");
}

//! `/metrics` on the admin listener (contract section 6): it parses as Prometheus text, carries
//! every metric the contract names with no per-key labels, and its counters match the traffic.

mod common;

use std::collections::HashMap;

use reqwest::StatusCode;
use serde_json::json;

use common::client;
use common::gateway::Gateway;
use common::upstream::Upstream;

/// Every sample of `/metrics`, parsed.
async fn scrape(gw: &Gateway) -> Vec<prometheus_parse::Sample> {
    let text = gw.metrics().await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .expect("/metrics parses as Prometheus text")
        .samples
}

fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_the_traffic_sent() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw
        .create_account(json!({ "name": "m", "rate_limit": { "per_minute": 5 } }))
        .await;
    let (_, key) = gw.create_key(&account, json!({ "name": "k" })).await;
    let client = client();
    let mut statuses: HashMap<u16, u32> = HashMap::new();
    for _ in 0..7 {
        let r = client
            .get(gw.proxy_url("/things"))
            .bearer_auth(&key)
            .send()
            .await
            .expect("send");
        *statuses.entry(r.status().as_u16()).or_default() += 1;
    }
    let r = client
        .get(gw.proxy_url("/things"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(statuses, HashMap::from([(200, 5), (429, 2)]));

    let samples = scrape(&gw).await;
    let requests = |outcome: &str, class: &str| {
        value(
            &samples,
            "tollgate_requests_total",
            &[
                ("route", "api"),
                ("outcome", outcome),
                ("status_class", class),
            ],
        )
    };
    assert_eq!(requests("forwarded", "2xx"), 5.0);
    assert_eq!(requests("rate_limited", "4xx"), 2.0);
    assert_eq!(requests("missing_credential", "4xx"), 1.0);
    assert_eq!(
        value(
            &samples,
            "tollgate_rate_limited_total",
            &[("window", "minute"), ("shadow", "false")]
        ),
        2.0
    );
    // One miss for the key's first request, hits for the other six.
    assert_eq!(value(&samples, "tollgate_key_cache_misses_total", &[]), 1.0);
    assert_eq!(value(&samples, "tollgate_key_cache_hits_total", &[]), 6.0);
    assert_eq!(
        value(&samples, "tollgate_request_duration_seconds", &[]),
        8.0
    );
    assert_eq!(
        value(&samples, "tollgate_upstream_duration_seconds", &[]),
        5.0
    );
    for name in [
        "tollgate_usage_pending_events",
        "tollgate_connections_open",
        "tollgate_store_errors_total",
        "tollgate_usage_flush_duration_seconds",
    ] {
        let text = gw.metrics().await;
        assert!(text.contains(&format!("# TYPE {name}")), "{name} missing");
    }
    assert!(value(&samples, "tollgate_connections_open", &[]) >= 1.0);
    for s in &samples {
        assert!(s.metric.starts_with("tollgate_"), "{}", s.metric);
        for label in s.labels.keys() {
            assert!(
                !label.contains("key") && !label.contains("account"),
                "per-key label {label} on {}",
                s.metric
            );
        }
    }
}

/// `tollgate_connections_open` counts the proxy's client connections: up by one for each open
/// connection, back down when they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_follows_the_clients_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let open = || async { gw.metric("tollgate_connections_open", &[]).await };
    let before = open().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(gw.proxy_addr)
            .await
            .expect("connect");
        s.write_all(b"GET /public/x HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("request");
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.expect("answer");
        assert_eq!(&buf, b"HTTP/1.1 200");
        streams.push(s);
    }
    assert_eq!(open().await, before + 3.0);
    drop(streams);
    let closed = common::eventually(std::time::Duration::from_secs(5), || async {
        open().await == before
    })
    .await;
    assert!(closed, "still {} open", open().await);
}

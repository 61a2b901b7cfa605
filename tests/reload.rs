//! Config reloads (`SIGHUP`, contract §1): a checked config applies to new requests while
//! requests in flight finish on the old one; a config that fails its checks changes nothing;
//! settings bound at start are kept and named. In process through `Running::reload`, and on the
//! real process with `kill -HUP`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{eventually, expect_echo, expect_refusal, header};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tollgate::config;
use tollgate::store::RateLimitSpec;

const ALL_TIME: &str = "from=2020-01-01T00:00:00Z&to=2040-01-01T00:00:00Z&interval=month";

/// `[[routes]]`: the default routes' `public`, with a 150 ms head timeout, and a new `v2`.
fn reloaded_routes(upstream: &str) -> String {
    format!(
        r#"
[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["{upstream}"]

[[routes]]
name = "public"
path_prefix = "/public"
upstreams = ["{upstream}"]
auth = "public"
timeout = "150ms"

[[routes]]
name = "v2"
path_prefix = "/v2"
upstreams = ["{upstream}"]
auth = "public"
strip_prefix = true
"#
    )
}

#[tokio::test]
async fn new_routes_apply_to_new_requests_while_one_in_flight_finishes_on_the_old() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let client = common::client();
    // In flight across the reload, on the old `public` route (30 s head timeout).
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), gw.proxy_url("/public/slow?ms=700"));
        async move { client.get(url).send().await.expect("slow request") }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            upstream.requests_seen() == 1
        })
        .await,
        "the slow request reached the upstream"
    );
    let done = gw
        .reload_routes(&reloaded_routes(&upstream.url()))
        .expect("the reload applies");
    assert_eq!(done.applied, ["routes"]);
    assert!(done.needs_restart.is_empty());

    // New requests: the new route answers, and the changed one has its new timeout.
    let echo = expect_echo(
        client
            .get(gw.proxy_url("/v2/hello"))
            .send()
            .await
            .expect("v2"),
    )
    .await;
    assert_eq!(echo["path"], "/hello", "v2 strips its prefix");
    let cut = client
        .get(gw.proxy_url("/public/slow?ms=700"))
        .send()
        .await
        .expect("a new slow request");
    expect_refusal(cut, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout").await;
    // The request that began before finished on the route it began on.
    let slow = slow.await.expect("task");
    assert_eq!(
        slow.status(),
        StatusCode::OK,
        "the in-flight request completes"
    );

    assert_eq!(reloads(&gw, "success").await, 1.0);
    assert_eq!(last_reload_successful(&gw).await, 1.0);
}

#[tokio::test]
async fn a_config_that_fails_its_checks_changes_nothing() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let client = common::client();
    let before = gw
        .metric("tollgate_config_last_reload_success_timestamp_seconds", &[])
        .await;
    assert!(
        before > 1.7e9,
        "the start counts as the config applied: {before}"
    );

    let broken = config::load_from_str(
        "[proxy]\nlisten = \"not an address\"\n[[routes]]\nname = \"x\"\npath_prefix = \"/\"\n\
         upstreams = []\n",
        std::path::Path::new("broken.toml"),
        Vec::new(),
    );
    let error = gw.reload_config(broken).expect_err("refused");
    let message = error.to_string();
    assert!(message.contains("proxy.listen"), "{message}");
    assert!(message.contains("routes[0].upstreams"), "{message}");

    // The running routes still serve.
    let response = client
        .get(gw.proxy_url("/public/x"))
        .send()
        .await
        .expect("public");
    expect_echo(response).await;
    assert_eq!(reloads(&gw, "failure").await, 1.0);
    assert_eq!(last_reload_successful(&gw).await, 0.0);
    assert_eq!(
        gw.metric("tollgate_config_last_reload_success_timestamp_seconds", &[])
            .await,
        before,
        "a refused reload is not a success"
    );
    // The next good one puts the gauge back.
    assert!(gw.reload());
    assert_eq!(last_reload_successful(&gw).await, 1.0);
}

/// `tollgate_config_reloads_total{result}`.
async fn reloads(gw: &Gateway, result: &str) -> f64 {
    gw.metric("tollgate_config_reloads_total", &[("result", result)])
        .await
}

/// `tollgate_config_last_reload_successful`.
async fn last_reload_successful(gw: &Gateway) -> f64 {
    gw.metric("tollgate_config_last_reload_successful", &[])
        .await
}

#[tokio::test]
async fn settings_bound_at_start_keep_their_running_values_and_are_named() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let done = gw
        .reload_with(|s| {
            s.proxy.listen = "127.0.0.1:1".parse().expect("addr");
            s.admin.master_key_env = "ELSEWHERE".to_owned();
            s.limits.on_store_error = config::OnStoreError::FailClosed;
        })
        .expect("the rest applies");
    assert_eq!(
        done.needs_restart,
        [
            "proxy.listen",
            "admin.master_key_env",
            "limits.on_store_error"
        ]
    );
    // Still serving where it was.
    let response = common::client()
        .get(gw.proxy_url("/public/x"))
        .send()
        .await
        .expect("public");
    expect_echo(response).await;
}

#[tokio::test]
async fn new_default_limits_apply_to_keys_that_set_none() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let (account, key) = gw.account_with_key().await;
    let client = common::client();
    let first = gw.get_with_key(&client, "/a", &key).await;
    assert_eq!(header(&first, "x-ratelimit-limit-minute"), Some("60"));

    gw.reload_with(|s| {
        s.limits.default = RateLimitSpec {
            per_minute: Some(3),
            ..s.limits.default
        }
    })
    .expect("applies");
    // The cached key is re-read on its next request; the ones after it are on the new limit.
    let limited = eventually(Duration::from_secs(5), || async {
        let r = gw.get_with_key(&client, "/a", &key).await;
        header(&r, "x-ratelimit-limit-minute") == Some("3")
    })
    .await;
    assert!(limited, "the new default limit never showed");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(gw.get_with_key(&client, "/a", &key).await.status());
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "3 a minute refuses within 4 more: {statuses:?}"
    );
    // The admin API reports the new default too.
    let path = format!("/v1/accounts/{account}/config");
    let (status, body) = gw.admin(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rate_limit"]["per_minute"], 3, "{body}");
    assert_eq!(
        body["rate_limit"]["source"]["per_minute"], "default",
        "{body}"
    );
}

#[tokio::test]
async fn identity_headers_follow_a_reload() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let (account, key) = gw.account_with_key().await;
    let client = common::client();
    let before = expect_echo(gw.get_with_key(&client, "/a", &key).await).await;
    assert_eq!(before["headers"]["x-tollgate-account-id"], account.as_str());

    gw.reload_with(|s| s.identity.header_prefix = "X-Edge-".to_owned())
        .expect("applies");
    let after = expect_echo(gw.get_with_key(&client, "/a", &key).await).await;
    assert_eq!(after["headers"]["x-edge-account-id"], account.as_str());
    assert!(after["headers"].get("x-tollgate-account-id").is_none());
}

#[tokio::test]
async fn the_flush_interval_follows_a_reload() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::builder(&upstream)
        .tweak(|s| s.metering.flush_interval = Duration::from_secs(3600))
        .start()
        .await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, key) = gw.create_key(&account, json!({ "name": "main" })).await;
    let client = common::client();
    let response = gw.get_with_key(&client, "/a", &key).await;
    assert_eq!(response.status(), StatusCode::OK);
    let usage = format!("/v1/accounts/{account}/keys/{key_id}/usage?{ALL_TIME}");
    // An hour between flushes: nothing is written yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!counted(&gw, &usage).await, "flushed before its interval");

    gw.reload_with(|s| s.metering.flush_interval = Duration::from_millis(100))
        .expect("applies");
    assert!(
        eventually(Duration::from_secs(5), || counted(&gw, &usage)).await,
        "the new flush interval never wrote the count"
    );
}

#[tokio::test]
async fn the_proxy_listener_settings_follow_a_reload() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let client = common::client();
    let proxy = gw.proxy_addr;
    let send = |path: &str, body: &'static str| {
        client
            .post(format!("http://{proxy}{path}"))
            .bearer_auth(&key)
            .header("x-forwarded-for", "203.0.113.9")
            .body(body)
    };
    // Before: no trusted proxy (the peer is the client), no account API, bodies of 10 MiB.
    let echo = expect_echo(send("/a", "0123456789").send().await.expect("a")).await;
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");
    expect_echo(send("/v1/account", "").send().await.expect("b")).await;

    gw.reload_with(|s| {
        s.proxy.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
        s.proxy.max_body_bytes = 4;
        s.proxy.expose_account_api = true;
    })
    .expect("applies");
    let echo = expect_echo(send("/a", "").send().await.expect("c")).await;
    assert_eq!(echo["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    let big = send("/a", "0123456789").send().await.expect("d");
    expect_refusal(big, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;
    let account = client
        .get(gw.proxy_url("/v1/account"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("e");
    assert_eq!(account.status(), StatusCode::OK);
    let body: serde_json::Value = account.json().await.expect("json");
    assert!(
        body["id"].as_str().is_some_and(|id| id.starts_with("acc_")),
        "the account API answered: {body}"
    );
}

#[tokio::test]
async fn upstream_connections_outlive_a_reload() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let client = common::client();
    for round in 0..4u64 {
        for _ in 0..3 {
            let response = client
                .get(gw.proxy_url("/public/x"))
                .send()
                .await
                .expect("public");
            expect_echo(response).await;
        }
        if round < 3 {
            gw.reload_with(|s| s.cache.negative_ttl = Duration::from_secs(round + 1))
                .expect("applies");
        }
    }
    assert_eq!(
        upstream.connections_seen(),
        1,
        "the one upstream connection served every round, across three reloads"
    );
}

/// Whether the usage at `path` counts exactly one request.
async fn counted(gw: &Gateway, path: &str) -> bool {
    let (_, body) = gw.admin(Method::GET, path, None).await;
    body["buckets"].as_array().map(|b| {
        b.iter()
            .filter_map(|b| b["request_count"].as_u64())
            .sum::<u64>()
    }) == Some(1)
}

#[tokio::test]
async fn verify_knows_the_routes_of_a_reload() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    let verify = |gw: &Gateway| {
        let body = json!({ "key": key, "route": "v2" });
        let (client, url, master) = (
            common::client(),
            gw.admin_url("/v1/verify"),
            gw.master.clone(),
        );
        async move {
            client
                .post(url)
                .bearer_auth(master)
                .json(&body)
                .send()
                .await
                .expect("verify")
                .status()
        }
    };
    assert_eq!(
        verify(&gw).await,
        StatusCode::BAD_REQUEST,
        "no route v2 yet"
    );
    gw.reload_routes(&reloaded_routes(&upstream.url()))
        .expect("applies");
    assert_eq!(verify(&gw).await, StatusCode::OK);
}

/// Lines of a child's stderr, read on a thread.
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn of(stderr: std::process::ChildStderr) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    /// Waits up to 10 s for a line holding every one of `parts`.
    fn wait_for(&self, parts: &[&str]) -> Option<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            let line = self.0.recv_timeout(left).ok()?;
            if parts.iter().all(|p| line.contains(p)) {
                return Some(line);
            }
        }
    }
}

fn hangup(pid: u32) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
}

/// The acceptance test of issue 25: `SIGHUP` on the real process while a slow request is in
/// flight. It completes; a new route answers; a broken file leaves the old config serving; a
/// changed listen address is named as needing a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_of_the_running_process() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let head = |listen: u16| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{listen}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [store]\npath = '{}'\n",
            dir.path().join("t.db").display()
        )
    };
    // Every route strips its prefix, so the path the upstream sees tells which one answered.
    let timed = |name: &str, prefix: &str, timeout: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstreams = [\"{}\"]\n\
             auth = \"public\"\nstrip_prefix = true\ntimeout = \"{timeout}\"\n",
            upstream.url()
        )
    };
    let route = |name: &str, prefix: &str| timed(name, prefix, "30s");
    let file = dir.path().join("t.toml");
    std::fs::write(&file, head(port) + &route("old", "/")).expect("write");
    let mut child = common::tollgate_command()
        .args(["serve", "--config"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tollgate");
    let lines = Lines::of(child.stderr.take().expect("stderr"));
    assert!(
        lines.wait_for(&["tollgate is serving"]).is_some(),
        "tollgate did not start"
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = common::client();
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), format!("{base}/slow?ms=1500"));
        async move { client.get(url).send().await.expect("slow request") }
    });
    assert!(
        eventually(Duration::from_secs(5), || async {
            upstream.requests_seen() == 1
        })
        .await,
        "the slow request reached the upstream"
    );

    // A new route, and a head timeout on the old one that the slow request would miss.
    std::fs::write(
        &file,
        head(port) + &timed("old", "/", "300ms") + &route("new", "/new"),
    )
    .expect("write");
    hangup(child.id());
    assert!(
        lines.wait_for(&["reloaded the config"]).is_some(),
        "no reload logged"
    );
    let echo = expect_echo(
        client
            .get(format!("{base}/new/x"))
            .send()
            .await
            .expect("new route"),
    )
    .await;
    assert_eq!(echo["path"], "/x", "the new route answered");
    let slow = slow.await.expect("task");
    assert_eq!(
        slow.status(),
        StatusCode::OK,
        "the in-flight request completes on the config it began on"
    );
    let cut = client
        .get(format!("{base}/slow?ms=1500"))
        .send()
        .await
        .expect("a new slow request");
    expect_refusal(cut, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout").await;

    // A broken file: logged with its field, and the old config keeps serving.
    std::fs::write(
        &file,
        head(port) + "[[routes]]\nname = \"bad\"\nupstreams = []\n",
    )
    .expect("write");
    hangup(child.id());
    let refused = lines
        .wait_for(&["config reload refused", "routes[0]"])
        .expect("the refusal is logged with its field");
    assert!(
        refused.contains("path_prefix") || refused.contains("upstreams"),
        "{refused}"
    );
    let still = client
        .get(format!("{base}/new/x"))
        .send()
        .await
        .expect("still serving");
    assert_eq!(
        expect_echo(still).await["path"],
        "/x",
        "the old config serves"
    );

    // A listen address changes only with a restart: named, and the rest applies.
    std::fs::write(&file, head(port + 1) + &route("old", "/")).expect("write");
    hangup(child.id());
    assert!(
        lines
            .wait_for(&["takes effect only after a restart", "proxy.listen"])
            .is_some(),
        "the restart-only field is named"
    );
    assert!(lines.wait_for(&["reloaded the config"]).is_some());
    let gone = client
        .get(format!("{base}/new/x"))
        .send()
        .await
        .expect("same port");
    // `/new/x` now falls to the `old` route at `/`, on the port it was on.
    assert_eq!(
        expect_echo(gone).await["path"],
        "/new/x",
        "the route was removed"
    );
    common::expect_running_then_stop(&mut child);
}

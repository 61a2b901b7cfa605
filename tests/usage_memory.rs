//! Memory stays bounded whatever an account key asks of `GET …/keys/{key_id}/usage` (issue 21,
//! item 7): the built `tollgate` binary serves 40 concurrent 200,000-bucket minute reads, and
//! its peak resident memory (`VmHWM`) stays far below what holding each answer whole took
//! (27 MB of JSON each; 40 at once took the process from 40 MB to 1.14 GB). Each answer is
//! either the whole streamed JSON or, past the bound on concurrent heavy reads, 503
//! `usage_busy` with `Retry-After`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, Duration as Span, DurationRound, Utc};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::credential::{self, Kind};

/// The peak the process may reach. Before streaming it passed 1 GB.
const PEAK_LIMIT_KB: u64 = 300 * 1024;

/// A `tollgate serve` process, killed on drop.
struct Served {
    child: Child,
    admin: String,
    proxy: String,
    master: String,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on port 0 over a fresh embedded store, and reads its addresses from the
/// "tollgate is serving" log line.
fn serve() -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("t.toml");
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         master_key_env = \"TOLLGATE_MASTER_KEY\"\n\
         [store]\npath = \"{}\"\n[metering]\nflush_interval = \"100ms\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [\"http://127.0.0.1:9\"]\n",
        dir.path().join("t.db").display()
    );
    std::fs::write(&config, toml).expect("write config");
    let master = credential::generate(Kind::Master);
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE") {
            command.env_remove(name);
        }
    }
    command.env("TOLLGATE_MASTER_KEY", &master);
    let mut child = command.spawn().expect("start tollgate");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut addrs = None;
    for line in lines.by_ref() {
        let line = line.expect("stderr line");
        let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if entry["fields"]["message"] == "tollgate is serving" {
            let field = |name: &str| {
                entry["fields"][name]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name} in {line}"))
                    .to_owned()
            };
            addrs = Some((field("admin_addr"), field("proxy_addr")));
            break;
        }
    }
    let (admin, proxy) = addrs.expect("tollgate never said it was serving");
    // Keep draining the log so that the process never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Served {
        child,
        admin: format!("http://{admin}"),
        proxy: format!("http://{proxy}"),
        master,
        _dir: dir,
    }
}

/// `VmHWM` (peak resident set) of `pid`, in kB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

async fn post(http: &reqwest::Client, url: String, master: &str, body: Value) -> Value {
    let response = http
        .post(url)
        .bearer_auth(master)
        .json(&body)
        .send()
        .await
        .expect("admin request");
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.expect("JSON answer")
}

/// One usage read, its body taken as it streams; (status, bytes, the body if asked to keep it).
async fn read(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    keep: bool,
) -> (StatusCode, u64, Vec<u8>) {
    let response = http
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .expect("usage request");
    let status = response.status();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        let retry = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        assert!(retry.is_some_and(|s| s >= 1), "503 without Retry-After");
    }
    let mut body = response.bytes_stream();
    let (mut total, mut kept) = (0u64, Vec::new());
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("the body streams to its end");
        total += chunk.len() as u64;
        if keep || status != StatusCode::OK {
            kept.extend_from_slice(&chunk);
        }
    }
    (status, total, kept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_200000_bucket_reads_keep_memory_bounded() {
    let served = serve();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let account = post(
        &http,
        format!("{}/v1/accounts", served.admin),
        &served.master,
        json!({ "name": "heavy" }),
    )
    .await;
    let account_id = account["id"].as_str().expect("id").to_owned();
    let key = post(
        &http,
        format!("{}/v1/accounts/{account_id}/keys", served.admin),
        &served.master,
        json!({ "name": "reader", "scopes": ["account:read"] }),
    )
    .await;
    let (key_id, raw) = (
        key["id"].as_str().expect("id").to_owned(),
        key["key"].as_str().expect("key").to_owned(),
    );

    // One counted request (the upstream is down: an error), in this minute.
    let minute = Utc::now().duration_trunc(Span::minutes(1)).expect("minute");
    let _ = http
        .get(format!("{}/x", served.proxy))
        .bearer_auth(&raw)
        .send()
        .await
        .expect("proxy request");
    // 200,000 minutes with this one in the middle, at index 100,000.
    let from = minute - Span::minutes(100_000);
    let to = from + Span::minutes(200_000);
    let url = format!(
        "{}/v1/account/keys/{key_id}/usage?interval=minute&from={}&to={}",
        served.admin,
        from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (whole, body) = loop {
        let (status, whole, body) = read(&http, &url, &raw, true).await;
        assert_eq!(status, StatusCode::OK);
        let body: Value = serde_json::from_slice(&body).expect("the streamed body is JSON");
        if body["buckets"][100_000]["request_count"] == 1 {
            break (whole, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request was never counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let buckets = body["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.len(), 200_000);
    assert_eq!(
        (&body["key_id"], &body["interval"]),
        (&json!(key_id), &json!("minute"))
    );
    let at = |i: usize| {
        buckets[i]["bucket"]
            .as_str()
            .and_then(|s| s.parse::<DateTime<Utc>>().ok())
            .expect("bucket time")
    };
    assert_eq!(
        (at(0), at(100_000), at(199_999)),
        (from, minute, to - Span::minutes(1))
    );
    assert_eq!(
        buckets[100_000],
        json!({ "bucket": buckets[100_000]["bucket"], "request_count": 1, "success_count": 0,
                "error_count": 1, "rate_limited_count": 0, "bytes_in": 0, "bytes_out": 0 })
    );
    let zero = |b: &Value| {
        [
            "request_count",
            "success_count",
            "error_count",
            "rate_limited_count",
            "bytes_in",
            "bytes_out",
        ]
        .iter()
        .all(|f| b[f] == 0)
    };
    assert_eq!(buckets.iter().filter(|b| !zero(b)).count(), 1);
    drop(body);

    let before = peak_rss_kb(served.child.id());
    let reads = (0..40).map(|_| {
        let (http, url, raw) = (http.clone(), url.clone(), raw.clone());
        tokio::spawn(async move { read(&http, &url, &raw, false).await })
    });
    let mut served_whole = 0;
    for read in futures_util::future::join_all(reads).await {
        let (status, bytes, body) = read.expect("join");
        match status {
            StatusCode::OK => {
                assert_eq!(bytes, whole, "a streamed answer was cut");
                served_whole += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                let body: Value = serde_json::from_slice(&body).expect("JSON error");
                assert_eq!(body["error"]["code"], "usage_busy", "{body}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    let peak = peak_rss_kb(served.child.id());
    eprintln!(
        "peak RSS: {before} kB before the 40 reads, {peak} kB after; {served_whole} of 40 served whole ({whole} bytes each)"
    );
    assert!(
        served_whole >= 4,
        "only {served_whole} of 40 reads were served"
    );
    assert!(
        peak < PEAK_LIMIT_KB,
        "peak RSS {peak} kB over {PEAK_LIMIT_KB} kB"
    );
}

//! The durable metering mode against a real crash: the `tollgate` binary serves keyed requests
//! with a flush interval far longer than the test (so only the write-ahead log can save the
//! counts), is killed with SIGKILL ~300 ms after the last answer, and started again on the same
//! data. With `durability = "wal"` the key's usage is exact afterwards; with the default
//! `"interval"` the same crash loses the counts (the documented cost of the default).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tollgate::credential::{self, Kind};

use common::client;
use common::upstream::Upstream;

const REQUESTS: u64 = 200;
const BODY: usize = 100;

/// A `tollgate serve` process.
struct Tollgate {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
}

/// The key's usage over all time: (requests, success, errors, bytes in, bytes out).
type Totals = (u64, u64, u64, u64, u64);

// === impl Tollgate ===

impl Tollgate {
    /// Starts `tollgate serve --config CONFIG` with `master` as its master key, and waits for
    /// its "serving" log line (which names the ports it bound).
    fn start(config: &Path, master: &str) -> Tollgate {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .args(["--log-format", "json", "serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("TOLLGATE") {
                command.env_remove(name);
            }
        }
        command.env("TOLLGATE_MASTER_KEY", master);
        let mut child = command.spawn().expect("start tollgate");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut seen = Vec::new();
        let serving = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!("tollgate ended before serving: {seen:?}");
            };
            let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if entry["fields"]["message"] == "tollgate is serving" {
                break entry;
            }
            seen.push(line);
        };
        // Keep draining its log so that a full pipe never blocks it.
        std::thread::spawn(move || for _ in lines {});
        let addr = |name: &str| {
            serving["fields"][name]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("{name} in {serving}"))
        };
        Tollgate {
            proxy: addr("proxy_addr"),
            admin: addr("admin_addr"),
            child,
        }
    }

    /// SIGKILL: no drain, no last flush.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    async fn admin(&self, master: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("http://{}{path}", self.admin);
        let request = match body {
            Some(body) => client().post(url).json(&body),
            None => client().get(url),
        };
        let response = request.bearer_auth(master).send().await.expect("admin");
        assert!(response.status().is_success(), "{path}: {response:?}");
        response.json().await.expect("admin JSON")
    }

    async fn usage(&self, master: &str, account: &str, key_id: &str) -> Totals {
        let path = format!(
            "/v1/accounts/{account}/keys/{key_id}/usage?interval=month\
             &from=2020-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"
        );
        let body = self.admin(master, &path, None).await;
        let buckets = body["buckets"].as_array().expect("buckets");
        let sum = |field: &str| -> u64 {
            buckets
                .iter()
                .map(|b| b[field].as_u64().expect("a count"))
                .sum()
        };
        (
            sum("request_count"),
            sum("success_count"),
            sum("error_count"),
            sum("bytes_in"),
            sum("bytes_out"),
        )
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves [`REQUESTS`] keyed requests (each [`BODY`] bytes up and echoed back down) through a
/// gateway with the given `[metering]` lines, kills it with SIGKILL ~300 ms after the last
/// answer, starts it again on the same data, and answers the key's usage then.
async fn usage_after_sigkill(metering: &str) -> Totals {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config: PathBuf = dir.path().join("tollgate.toml");
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [store]\npath = \"{}\"\n[metering]\nflush_interval = \"60s\"\n{metering}\n\
         [limits.default]\nper_minute = 100000\nper_hour = 100000\nper_day = 100000\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstreams = [\"{}\"]\n",
        dir.path().join("tollgate.db").display(),
        upstream.url()
    );
    std::fs::write(&config, toml).expect("write config");
    let master = credential::generate(Kind::Master);

    let (cfg, key) = (config.clone(), master.clone());
    let gw = tokio::task::spawn_blocking(move || Tollgate::start(&cfg, &key))
        .await
        .expect("join");
    let account = gw
        .admin(&master, "/v1/accounts", Some(json!({ "name": "acme" })))
        .await["id"]
        .as_str()
        .expect("account id")
        .to_owned();
    let created = gw
        .admin(
            &master,
            &format!("/v1/accounts/{account}/keys"),
            Some(json!({ "name": "main", "type": "secret" })),
        )
        .await;
    let key_id = created["id"].as_str().expect("key id").to_owned();
    let key = created["key"].as_str().expect("raw key").to_owned();

    let http = client();
    for _ in 0..REQUESTS {
        let response = http
            .post(format!("http://{}/echo-body", gw.proxy))
            .bearer_auth(&key)
            .body(vec![b'x'; BODY])
            .send()
            .await
            .expect("proxy request");
        assert_eq!(response.status(), StatusCode::OK);
        let echoed = response.bytes().await.expect("body");
        assert_eq!(echoed.len(), BODY);
    }
    // The scenario itself, not a wait for a condition: the crash comes this long after the last
    // answer, well past the log's 5 ms group commit and far inside the 60 s flush interval.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::spawn_blocking(move || gw.kill())
        .await
        .expect("join");

    // The same master key works again: its hash was stored at the first start.
    let again = master.clone();
    let gw = tokio::task::spawn_blocking(move || Tollgate::start(&config, &again))
        .await
        .expect("join");
    let usage = gw.usage(&master, &account, &key_id).await;
    drop(gw);
    usage
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_wal_a_sigkill_loses_no_usage() {
    let usage = usage_after_sigkill("durability = \"wal\"").await;
    let n = REQUESTS;
    let bytes = n * BODY as u64;
    assert_eq!(usage, (n, n, 0, bytes, bytes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_interval_a_sigkill_loses_the_unflushed_usage() {
    let usage = usage_after_sigkill("durability = \"interval\"").await;
    // The documented cost of the default: up to a flush interval of counts, here all of them.
    assert!(usage.0 < REQUESTS, "{usage:?}");
}

//! What the integration tests share: [`upstream::Upstream`] (an echo server), [`gateway::Gateway`]
//! (a whole tollgate in-process), a plain HTTP [`client`], the bounded [`eventually`] wait,
//! [`capture_logs`], and small readers for error bodies and Prometheus text.
//!
//! Cargo also builds this file as a test crate of its own (every `tests/*.rs` is one), and each
//! test crate uses only part of it; hence the `allow`s. The `#[path]`s make the sub-modules
//! resolve to `tests/common/` both when this file is a crate root and when it is `mod common;`.
#![allow(dead_code, unreachable_pub)]

#[path = "common/gateway.rs"]
pub mod gateway;
#[path = "common/upstream.rs"]
pub mod upstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde_json::Value;

/// How often [`eventually`] checks.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// tollgate's log lines (info and up, plain text) written on this thread while it lives. A test
/// that reads them runs on tokio's current-thread runtime, so that every task of the gateway
/// logs on the test's thread.
pub struct Logs {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

/// One writer per event, appending to the shared buffer.
struct LogWriter(Arc<Mutex<Vec<u8>>>);

/// Starts capturing this thread's logs.
pub fn capture_logs() -> Logs {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("tollgate=info")
        .with_ansi(false)
        .with_writer(move || LogWriter(Arc::clone(&sink)))
        .finish();
    Logs {
        lines,
        _guard: tracing::subscriber::set_default(subscriber),
    }
}

impl Logs {
    /// How many lines hold every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        self.text()
            .lines()
            .filter(|line| parts.iter().all(|p| line.contains(p)))
            .count()
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        let bytes = self.lines.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut lines) = self.0.lock() {
            lines.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A plain-HTTP client that ignores any proxy set in the environment. One per test.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// Polls `check` every 20 ms until it answers `true` (→ `true`) or `timeout` passes (→ `false`).
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Asserts that `response` is one of the gateway's own errors — `status`, a JSON body
/// `{"error":{"code","message"}}` with exactly `code` — and returns the `error` object.
pub async fn expect_refusal(response: Response, status: StatusCode, code: &str) -> Value {
    let got = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.expect("error body");
    assert_eq!(got, status, "status for {code}; body: {text}");
    assert!(
        content_type.starts_with("application/json"),
        "content-type of a {code} refusal: {content_type:?}"
    );
    let body: Value = serde_json::from_str(&text).expect("the error body is JSON");
    let error = body["error"].clone();
    assert_eq!(error["code"], code, "error code; body: {text}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error.message is a non-empty string; body: {text}"
    );
    error
}

/// The JSON echo of the upstream, asserting a 200.
pub async fn expect_echo(response: Response) -> Value {
    let status = response.status();
    let text = response.text().await.expect("echo body");
    assert_eq!(status, StatusCode::OK, "body: {text}");
    serde_json::from_str(&text).expect("the upstream's JSON echo")
}

/// A response header as text.
pub fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The value of the sample `name{labels}` (labels in any order, exactly these) in Prometheus
/// text, if present.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let got: BTreeMap<&str, &str> = label_text
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            (got == wanted).then(|| value.parse().ok()).flatten()
        })
}

/// The `tollgate` binary as a command, without any `TOLLGATE*` variable of the test's own
/// environment (a developer's `TOLLGATE__PROXY__LISTEN` must not change what a test starts).
pub fn tollgate_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE") {
            command.env_remove(name);
        }
    }
    command
}

/// Asserts that the `tollgate` process `child` is still running, then stops it with SIGTERM and
/// asserts that it drained and exited 0.
pub fn expect_running_then_stop(child: &mut std::process::Child) {
    assert!(
        child.try_wait().expect("status").is_none(),
        "the process is gone (a signal killed it?)"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// A current-thread runtime whose blocking pool has one thread: [`hold_the_pool`] then holds
/// every embedded store call queued behind it, as a hung disk does.
pub fn one_blocking_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .expect("runtime")
}

/// Takes the blocking pool's thread until the sender sends (or is dropped); the task holding it.
pub fn hold_the_pool() -> (
    std::sync::mpsc::Sender<()>,
    tokio::task::JoinHandle<Option<()>>,
) {
    let (release, held) = std::sync::mpsc::channel::<()>();
    (
        release,
        tokio::task::spawn_blocking(move || held.recv().ok()),
    )
}

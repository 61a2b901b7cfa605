//! `tollgate demo` (contract §1): the gateway tried in a minute. An embedded store in a fresh
//! temporary directory, an echo upstream in this process, a demo account and a key (5 requests
//! a minute, so that a burst shows the 429), and `curl` lines printed that work when pasted: a
//! request that passes (its identity and limit headers), two refused (no key, a wrong one), the
//! burst, and the key's usage read back. The default ports 8080 and 9090 are used when free,
//! else free ones, and the lines name the real ones. Ctrl-C (or SIGTERM) stops it cleanly and
//! removes the directory.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

use crate::app::{self, StartOptions};
use crate::config;
use crate::credential::{self, Kind};

/// The demo key's limit: a burst of one more shows the 429.
const PER_MINUTE: u32 = 5;

/// Runs the demo until Ctrl-C.
pub(crate) async fn run() -> ExitCode {
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", credential::new_id("run")));
    let code = match demo(&dir).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate demo: {e}");
            ExitCode::from(1)
        }
    };
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("tollgate demo: could not remove {}: {e}", dir.display());
        }
    }
    code
}

async fn demo(dir: &PathBuf) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let upstream = echo_upstream().await?;
    let config_path = dir.join("tollgate.toml");
    let toml = format!(
        r#"[proxy]
listen = "127.0.0.1:{proxy}"

[admin]
listen = "127.0.0.1:{admin}"

[store]
backend = "embedded"
path = '{db}'

[[routes]]
name = "demo"
path_prefix = "/"
upstreams = ["http://{upstream}"]
"#,
        proxy = port_or_any(8080),
        admin = port_or_any(9090),
        db = dir.join("tollgate.db").display(),
    );
    std::fs::write(&config_path, toml).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let settings = config::load(&config_path).map_err(|e| e.to_string())?;
    let master = credential::generate(Kind::Master);
    let running = app::start(
        settings,
        StartOptions {
            master_key: Some(master.clone()),
            ..StartOptions::default()
        },
    )
    .await
    .map_err(|e| format!("the gateway did not start: {e}"))?;
    let (proxy, admin) = (running.proxy_addr, running.admin_addr);
    let made = make_account_and_key(admin, &master).await;
    match made {
        Ok((account, key_id, key)) => {
            print_lines(proxy, admin, &master, &account, &key_id, &key, dir);
            crate::shutdown::signal().await;
            // Not println!: whoever read the lines may be gone (a closed pipe is no error here).
            let _ = writeln!(
                std::io::stdout(),
                "\nStopping: the demo's store in {} is removed.",
                dir.display()
            );
        }
        Err(e) => eprintln!("tollgate demo: {e}"),
    }
    running.shutdown().await;
    Ok(())
}

/// `port` when it is free on 127.0.0.1, else 0 (any free one).
fn port_or_any(port: u16) -> u16 {
    match StdListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => port,
        Err(_) => 0,
    }
}

/// A demo account and a key of [`PER_MINUTE`] requests a minute: (account, key id, raw key).
async fn make_account_and_key(
    admin: SocketAddr,
    master: &str,
) -> Result<(String, String, String), String> {
    let client = reqwest::Client::new();
    let post = |path: String, body: Value| {
        let request = client
            .post(format!("http://{admin}{path}"))
            .bearer_auth(master)
            .json(&body);
        async move {
            let response = request.send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(body)
            } else {
                Err(format!("the admin API answered {status}: {body}"))
            }
        }
    };
    let account = post("/v1/accounts".into(), json!({ "name": "demo" })).await?;
    let account = text(&account, "id")?;
    let key = post(
        format!("/v1/accounts/{account}/keys"),
        json!({ "name": "demo key", "rate_limit": { "per_minute": PER_MINUTE } }),
    )
    .await?;
    Ok((account, text(&key, "id")?, text(&key, "key")?))
}

fn text(v: &Value, field: &str) -> Result<String, String> {
    v[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("the admin API's answer has no {field}: {v}"))
}

fn print_lines(
    proxy: SocketAddr,
    admin: SocketAddr,
    master: &str,
    account: &str,
    key_id: &str,
    key: &str,
    dir: &std::path::Path,
) {
    let wrong = credential::generate(Kind::Secret);
    let burst = PER_MINUTE + 1;
    // Not println!: a reader that stops early (`| head`) is no reason to panic.
    let _ = writeln!(
        std::io::stdout(),
        r#"tollgate demo: the proxy listens on http://{proxy}, the admin API on http://{admin}.
An echo upstream answers with what it received; the store is in {dir}.

Master key (operator): {master}
Demo account {account}, key {key_id} ({PER_MINUTE} requests a minute):
  {key}

# Passes: the upstream sees X-Tollgate-Account-Id and -Key-Id; you see the RateLimit headers.
curl -i -H 'Authorization: Bearer {key}' http://{proxy}/hello

# Refused: no key (401 missing_credential), then a key that does not exist (401 invalid_credential).
curl -i http://{proxy}/hello
curl -i -H 'Authorization: Bearer {wrong}' http://{proxy}/hello

# A burst of {burst}: the last answers are 429 rate_limited with Retry-After.
for i in $(seq {burst}); do curl -s -o /dev/null -w '%{{http_code}}\n' -H 'X-API-Key: {key}' http://{proxy}/hello; done

# The key's usage, per minute (counts are written every second).
curl -s -H 'Authorization: Bearer {master}' 'http://{admin}/v1/accounts/{account}/keys/{key_id}/usage?interval=minute'

Ctrl-C to stop."#,
        dir = dir.display(),
    );
}

/// An HTTP/1.1 server on 127.0.0.1 that answers every request with 200 and a JSON echo of its
/// method, path and headers; its address.
async fn echo_upstream() -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| format!("the echo upstream cannot listen: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("the echo upstream: {e}"))?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(echo(&req))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn echo(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let headers: serde_json::Map<String, Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                Value::from(v.to_str().unwrap_or("(not text)")),
            )
        })
        .collect();
    let body = json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "headers": headers,
    });
    let mut response = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

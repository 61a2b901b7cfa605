//! The admin commands of the real binary (contract section 1: `tollgate accounts …` and
//! `tollgate keys …` over the admin API of section 5): each test starts its own gateway on port
//! 0, runs `tollgate` with `TOLLGATE_ADMIN_KEY` and `--admin-url`, and checks what it printed,
//! its exit code, and what the proxy does with the keys it made.

mod common;

use std::process::Command;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate::credential::{self, Kind};

use common::gateway::Gateway;
use common::upstream::{dead_url, Upstream};
use common::{client, expect_echo, expect_refusal};

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `tollgate ARGS` with `admin_key` (if any) in `TOLLGATE_ADMIN_KEY` and nothing else from
/// the test's `TOLLGATE*` or proxy variables.
async fn tollgate(admin_key: Option<&str>, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE") || name.to_ascii_lowercase().ends_with("_proxy") {
            command.env_remove(name);
        }
    }
    if let Some(key) = admin_key {
        command.env("TOLLGATE_ADMIN_KEY", key);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run the tollgate binary");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `tollgate ARGS --admin-url http://ADMIN` as `admin_key`.
async fn cli(gw: &Gateway, admin_key: &str, args: &[&str]) -> Run {
    let url = format!("http://{}", gw.admin_addr);
    let mut all = args.to_vec();
    all.extend(["--admin-url", &url]);
    tollgate(Some(admin_key), &all).await
}

/// Like [`cli`], asserting exit 0; the stdout.
async fn ok(gw: &Gateway, admin_key: &str, args: &[&str]) -> String {
    let run = cli(gw, admin_key, args).await;
    assert_eq!(run.code, Some(0), "tollgate {args:?}: {run:?}");
    run.stdout
}

/// Like [`ok`] with `--json` added; the parsed answer.
async fn ok_json(gw: &Gateway, admin_key: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let stdout = ok(gw, admin_key, &all).await;
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON from {args:?}: {e}: {stdout}"))
}

/// The raw key from the table output's `key: … (shown once; store it now)` line.
fn raw_key_line(stdout: &str) -> String {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("key: "))
        .unwrap_or_else(|| panic!("a `key:` line in {stdout}"));
    assert!(line.ends_with("(shown once; store it now)"), "{line}");
    let raw = line["key: ".len()..]
        .split_whitespace()
        .next()
        .expect("the raw key")
        .to_owned();
    assert!(credential::parse(&raw).is_ok(), "a valid credential: {raw}");
    raw
}

async fn proxy_status(gw: &Gateway, key: &str) -> StatusCode {
    client()
        .get(gw.proxy_url("/x"))
        .bearer_auth(key)
        .send()
        .await
        .expect("proxy request")
        .status()
}

/// The header line and the row that holds `needle` must line up column by column.
fn assert_row_aligned(stdout: &str, header_start: &str, needle: &str) {
    let mut lines = stdout.lines();
    let header = lines.next().expect("a header row");
    assert!(header.starts_with(header_start), "header: {header}");
    let row = lines
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("a row with {needle} in {stdout}"));
    // The second column starts at the same character in the header and the row.
    let second = |line: &str| {
        let chars: Vec<char> = line.chars().collect();
        let end_of_first = chars.iter().position(|c| *c == ' ').expect("two columns");
        end_of_first
            + chars[end_of_first..]
                .iter()
                .position(|c| *c != ' ')
                .expect("more")
    };
    assert_eq!(second(header), second(row), "aligned:\n{header}\n{row}");
}

// === accounts ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_create_prints_a_table_or_the_api_json() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;

    let stdout = ok(&gw, &gw.master, &["accounts", "create", "--name", "acme"]).await;
    assert_row_aligned(&stdout, "ID", "acme");
    for column in ["ID", "NAME", "AUTH", "ACTIVE", "CREATED"] {
        assert!(stdout.lines().next().unwrap().contains(column), "{stdout}");
    }
    assert!(stdout.contains("api_key"), "{stdout}");

    let account = ok_json(
        &gw,
        &gw.master,
        &[
            "accounts",
            "create",
            "--name",
            "globex",
            "--auth-method",
            "any",
            "--per-minute",
            "5",
            "--per-day",
            "100",
        ],
    )
    .await;
    assert!(
        account["id"].as_str().unwrap().starts_with("acc_"),
        "{account}"
    );
    assert_eq!(account["name"], "globex");
    assert_eq!(account["auth_method"], "any");
    assert_eq!(
        account["rate_limit"],
        json!({ "per_minute": 5, "per_day": 100 })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_list_shows_every_account() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let acme = gw.create_account(json!({ "name": "acme" })).await;
    let globex = gw.create_account(json!({ "name": "globex" })).await;

    let stdout = ok(&gw, &gw.master, &["accounts", "list"]).await;
    assert_row_aligned(&stdout, "ID", &acme);
    assert!(
        stdout.contains(&globex) && stdout.contains("globex"),
        "{stdout}"
    );

    let answer = ok_json(&gw, &gw.master, &["accounts", "list"]).await;
    let ids: Vec<&str> = answer["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert!(ids.contains(&acme.as_str()) && ids.contains(&globex.as_str()));
}

/// Waits on `DELETE /v1/accounts/{id}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_delete_removes_the_account() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (account, key) = gw.account_with_key().await;

    let stdout = ok(&gw, &gw.master, &["accounts", "delete", &account]).await;
    assert!(stdout.contains(&account), "{stdout}");
    let (status, _) = gw
        .admin(Method::GET, &format!("/v1/accounts/{account}"), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(proxy_status(&gw, &key).await, StatusCode::UNAUTHORIZED);
}

// === keys ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_create_prints_a_raw_key_that_works_on_the_proxy() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;

    let stdout = ok(
        &gw,
        &gw.master,
        &["keys", "create", "--account", &account, "--name", "main"],
    )
    .await;
    let raw = raw_key_line(&stdout);
    assert!(raw.starts_with("tgsk_"));
    assert_row_aligned(&stdout, "ID", "main");
    let response = client()
        .get(gw.proxy_url("/x"))
        .bearer_auth(&raw)
        .send()
        .await
        .unwrap();
    expect_echo(response).await;

    let created = ok_json(
        &gw,
        &gw.master,
        &[
            "keys",
            "create",
            "--account",
            &account,
            "--name",
            "scoped",
            "--scope",
            "orders:read",
            "--scope",
            "orders:write",
            "--allowed-ip",
            "127.0.0.0/8",
            "--ttl",
            "30d",
            "--per-minute",
            "7",
        ],
    )
    .await;
    assert_eq!(created["scopes"], json!(["orders:read", "orders:write"]));
    assert_eq!(created["allowed_ips"], json!(["127.0.0.0/8"]));
    assert_eq!(created["rate_limit"], json!({ "per_minute": 7 }));
    assert!(created["expires_at"].is_string(), "{created}");
    let raw = created["key"].as_str().expect("the raw key in the JSON");
    assert_eq!(proxy_status(&gw, raw).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_list_shows_the_preview_and_never_the_raw_key() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, raw) = gw
        .create_key(&account, json!({ "name": "main", "type": "secret" }))
        .await;

    let stdout = ok(&gw, &gw.master, &["keys", "list", "--account", &account]).await;
    let header = stdout.lines().next().unwrap();
    for column in [
        "ID", "NAME", "TYPE", "PREVIEW", "ACTIVE", "SCOPES", "EXPIRES",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert_row_aligned(&stdout, "ID", &key_id);
    assert!(stdout.contains(&credential::preview(&raw)), "{stdout}");
    assert!(
        !stdout.contains(&raw),
        "the raw key must not be listed: {stdout}"
    );

    let answer = ok_json(&gw, &gw.master, &["keys", "list", "--account", &account]).await;
    assert_eq!(answer["keys"][0]["id"], key_id.as_str());
    assert!(!answer.to_string().contains(&raw));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivated_key_is_refused_by_the_proxy_until_activated() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    // An account must keep one active secret key: `keep` is it.
    let (_keep, _) = gw.create_key(&account, json!({ "name": "keep" })).await;
    let (key_id, raw) = gw.create_key(&account, json!({ "name": "spare" })).await;
    assert_eq!(proxy_status(&gw, &raw).await, StatusCode::OK);

    let stdout = ok(
        &gw,
        &gw.master,
        &["keys", "deactivate", "--account", &account, &key_id],
    )
    .await;
    assert_row_aligned(&stdout, "ID", &key_id);
    let response = client()
        .get(gw.proxy_url("/x"))
        .bearer_auth(&raw)
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::UNAUTHORIZED, "inactive_credential").await;

    let key = ok_json(
        &gw,
        &gw.master,
        &["keys", "activate", "--account", &account, &key_id],
    )
    .await;
    assert_eq!(key["active"], true);
    assert_eq!(proxy_status(&gw, &raw).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_active_secret_key_cannot_be_deactivated() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, _) = gw.create_key(&account, json!({ "name": "only" })).await;

    let run = cli(
        &gw,
        &gw.master,
        &["keys", "deactivate", "--account", &account, &key_id],
    )
    .await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.starts_with("error: last_credential: "),
        "{}",
        run.stderr
    );
}

/// Waits on `POST …/keys/{key_id}/roll`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_key_is_replaced_by_a_new_one_that_works() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, old) = gw.create_key(&account, json!({ "name": "main" })).await;

    let stdout = ok(
        &gw,
        &gw.master,
        &[
            "keys",
            "roll",
            "--account",
            &account,
            &key_id,
            "--grace",
            "1h",
        ],
    )
    .await;
    let new = raw_key_line(&stdout);
    assert_ne!(new, old);
    assert_eq!(proxy_status(&gw, &new).await, StatusCode::OK);
    // Within the grace period the old key still works.
    assert_eq!(proxy_status(&gw, &old).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_is_gone_from_the_list_and_the_proxy() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_keep, _) = gw.create_key(&account, json!({ "name": "keep" })).await;
    let (key_id, raw) = gw.create_key(&account, json!({ "name": "gone" })).await;

    let stdout = ok(
        &gw,
        &gw.master,
        &["keys", "delete", "--account", &account, &key_id],
    )
    .await;
    assert!(stdout.contains(&key_id), "{stdout}");
    let listed = ok(&gw, &gw.master, &["keys", "list", "--account", &account]).await;
    assert!(!listed.contains(&key_id), "{listed}");
    let response = client()
        .get(gw.proxy_url("/x"))
        .bearer_auth(&raw)
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::UNAUTHORIZED, "invalid_credential").await;

    let run = cli(
        &gw,
        &gw.master,
        &["keys", "delete", "--account", &account, &key_id],
    )
    .await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.starts_with("error: not_found: "),
        "{}",
        run.stderr
    );
}

// === an account's own key ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_key_without_account_manages_its_own_keys() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (account, own) = gw.account_with_key().await;
    let other = gw.create_account(json!({ "name": "other" })).await;
    let (other_key_id, _) = gw.create_key(&other, json!({ "name": "theirs" })).await;

    let created = ok_json(&gw, &own, &["keys", "create", "--name", "second"]).await;
    assert_eq!(created["account_id"], account.as_str());

    let stdout = ok(&gw, &own, &["keys", "list"]).await;
    assert!(stdout.contains(&credential::preview(&own)), "{stdout}");
    assert!(stdout.contains("second"), "{stdout}");
    assert!(!stdout.contains(&other_key_id), "{stdout}");

    // Its own id is accepted; another account's is a usage error, not a silent switch.
    ok(&gw, &own, &["keys", "list", "--account", &account]).await;
    let run = cli(&gw, &own, &["keys", "list", "--account", &other]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains(&account), "{}", run.stderr);
}

// === failures and exit codes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_admin_key_exits_2() {
    let run = tollgate(None, &["accounts", "list"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("TOLLGATE_ADMIN_KEY"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_prints_the_api_error_and_exits_1() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let wrong = credential::generate(Kind::Master);

    let run = cli(&gw, &wrong, &["accounts", "list"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.starts_with("error: invalid_credential: "),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_admin_url_exits_1_naming_it() {
    let dead = dead_url().await;
    let master = credential::generate(Kind::Master);
    let run = tollgate(Some(&master), &["accounts", "list", "--admin-url", &dead]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(&dead), "{}", run.stderr);
    assert!(run.stderr.contains("could not reach"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let master = credential::generate(Kind::Master);
    // Missing --name.
    let run = tollgate(Some(&master), &["keys", "create", "--account", "acc_x"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    // The master key names the account it acts on.
    let dead = dead_url().await;
    let run = tollgate(Some(&master), &["keys", "list", "--admin-url", &dead]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("--account"), "{}", run.stderr);
    // Not an http:// URL.
    let run = tollgate(
        Some(&master),
        &["accounts", "list", "--admin-url", "ftp://x"],
    )
    .await;
    assert_eq!(run.code, Some(2), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_shows_a_keys_buckets_as_a_table_and_a_chart() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .tweak(|s| s.metering.flush_interval = std::time::Duration::from_millis(50))
        .start()
        .await;
    let (account_id, key) = gw.account_with_key().await;
    for _ in 0..4 {
        assert_eq!(proxy_status(&gw, &key).await, StatusCode::OK);
    }
    let (_, keys) = gw
        .admin(
            Method::GET,
            &format!("/v1/accounts/{account_id}/keys"),
            None,
        )
        .await;
    let key_id = keys["keys"][0]["id"].as_str().expect("key id").to_owned();
    let args = [
        "usage",
        &key_id,
        "--account",
        &account_id,
        "--interval",
        "hour",
    ];
    let ok_soon = common::eventually(std::time::Duration::from_secs(5), || async {
        let answer = ok_json(&gw, &gw.master, &args).await;
        answer["buckets"]
            .as_array()
            .is_some_and(|b| b.iter().any(|x| x["request_count"] == 4))
    })
    .await;
    assert!(ok_soon, "the four requests never showed in usage");
    let table = ok(&gw, &gw.master, &args).await;
    let header = table.lines().next().expect("header");
    assert!(
        header.starts_with("BUCKET") && header.contains("REQUESTS"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("4")),
        "{table}"
    );
    let mut chart_args = args.to_vec();
    chart_args.push("--chart");
    let chart = ok(&gw, &gw.master, &chart_args).await;
    let busiest = chart
        .lines()
        .find(|l| l.ends_with(" 4"))
        .expect("a line for the busy hour");
    assert_eq!(busiest.matches('█').count(), 40, "{chart}");
}

/// A `TOLLGATE_MASTER_KEY` that is not a valid `tgmk_` credential is a configuration error:
/// `check-config` and `serve` both exit 2 and name the setting, without echoing the value.
#[test]
fn a_bad_master_key_variable_is_a_config_error() {
    let secret = credential::generate(Kind::Secret);
    // Its last character changed (to one it is not already: 1 in 62 ends in 'x').
    let mut master = credential::generate(Kind::Master);
    let last = master.pop();
    master.push(if last == Some('x') { 'y' } else { 'x' });
    for bad in [secret.as_str(), master.as_str(), "not-a-key"] {
        for command in ["check-config", "serve"] {
            let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args([command, "--config", "config/tollgate.toml"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .env("TOLLGATE_MASTER_KEY", bad)
                .output()
                .expect("run tollgate");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {bad}: {stderr}");
            assert!(stderr.contains("admin.master_key_env"), "{stderr}");
            assert!(!stderr.contains(bad), "the value was echoed: {stderr}");
        }
    }
    let good = credential::generate(Kind::Master);
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", "--config", "config/tollgate.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TOLLGATE_MASTER_KEY", &good)
        .output()
        .expect("run tollgate");
    assert_eq!(out.status.code(), Some(0));
}

/// `tollgate serve` as a process: with `--log-format json` every stderr line is a JSON object;
/// on a new store it prints the generated master key once, on stdout; a second start on the same
/// store prints none; SIGTERM stops it with exit code 0.
#[test]
fn serve_logs_json_and_prints_a_generated_master_key_only_once() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("t.toml");
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [store]\npath = \"{}\"\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\n\
         upstreams = [\"http://127.0.0.1:9\"]\n",
        dir.path().join("t.db").display()
    );
    std::fs::write(&config, toml).expect("write config");
    let start = || {
        let mut command = common::tollgate_command();
        command
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start tollgate");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut logged = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("stderr line");
            let entry: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            let serving = entry["fields"]["message"] == "tollgate is serving";
            logged.push(entry);
            if serving {
                break;
            }
        }
        assert!(
            logged.iter().any(|e| e["level"] == "INFO"),
            "no INFO line: {logged:?}"
        );
        let stopped = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(stopped.success());
        for line in lines {
            let line = line.expect("stderr line");
            assert!(serde_json::from_str::<Value>(&line).is_ok(), "{line}");
        }
        let out = child.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    };
    let first = start();
    let printed: Vec<&str> = first
        .split_whitespace()
        .filter(|w| w.starts_with("tgmk_"))
        .collect();
    assert_eq!(printed.len(), 1, "stdout: {first}");
    assert_eq!(
        credential::parse(printed[0]).expect("a valid credential"),
        Kind::Master
    );
    let second = start();
    assert!(!second.contains("tgmk_"), "printed again: {second}");
}

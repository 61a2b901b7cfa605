//! The usage dashboard (`/ui`, issue 26) in a real headless Chromium: sign-in, the views and
//! their numbers against the usage API for traffic sent through the proxy, the key actions,
//! a path prefix, and the security headers. Screenshots of each view go to
//! `target/ui-screenshots/`.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use browser::Browser;
use common::gateway::Gateway;
use common::upstream::Upstream;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Traffic of [`traffic`]: requests, successes, errors, rate-limited.
const SENT: (u64, u64, u64, u64) = (7, 3, 4, 2);

/// A gateway that flushes usage every 100 ms, with an account limited to 5 a minute.
async fn gateway(upstream: &Upstream) -> Gateway {
    Gateway::builder(upstream)
        .tweak(|s| s.metering.flush_interval = Duration::from_millis(100))
        .start()
        .await
}

/// An account "acme" (5 requests a minute) and its secret key: (account id, key id, raw key).
async fn account(gw: &Gateway) -> (String, String, String) {
    let account = gw
        .create_account(json!({ "name": "acme", "rate_limit": { "per_minute": 5 } }))
        .await;
    let (key_id, key) = gw
        .create_key(&account, json!({ "name": "backend", "type": "secret" }))
        .await;
    (account, key_id, key)
}

/// [`SENT`] through the proxy with `key`: three passes, two upstream 404s, two 429s; waits
/// until the usage API counts all of them.
async fn traffic(gw: &Gateway, account: &str, key_id: &str, key: &str) {
    let client = common::client();
    for path in ["/a", "/b", "/c", "/status/404", "/status/404", "/d", "/e"] {
        gw.get_with_key(&client, path, key).await;
    }
    let path = format!("/v1/accounts/{account}/keys/{key_id}/usage?from=2020-01-01&interval=month");
    let counted = common::eventually(Duration::from_secs(10), || async {
        let (_, body) = gw.admin(Method::GET, &path, None).await;
        sum(&body, "request_count") == SENT.0
    })
    .await;
    assert!(counted, "the usage API never counted the traffic");
}

fn sum(usage: &Value, field: &str) -> u64 {
    usage["buckets"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b[field].as_u64()).sum())
        .unwrap_or(0)
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// Signs in with `credential` and waits for `view`.
async fn sign_in(browser: &Browser, gw: &Gateway, credential: &str, view: &str) {
    browser.open(&gw.admin_url("/ui")).await;
    browser.ready("signin").await;
    browser.fill("#credential", credential).await;
    browser.click("#signin-submit").await;
    browser.ready(view).await;
}

/// Nothing the page did was blocked by its Content-Security-Policy, and it fits the window.
async fn clean_and_fitting(browser: &Browser, view: &str) {
    let violations = browser
        .eval("return document.body.dataset.cspViolations || null")
        .await;
    assert_eq!(violations, Value::Null, "{view}: CSP violations");
    let fits = browser
        .eval("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        .await;
    assert_eq!(
        fits,
        json!(true),
        "{view}: the page is wider than the window"
    );
}

/// The chart's series as the app plotted them (`#usage-chart[data-series]`).
async fn plotted(browser: &Browser) -> Value {
    let raw = browser
        .find("#usage-chart")
        .await
        .attr("data-series")
        .await
        .expect("attr")
        .expect("the chart says what it plotted");
    serde_json::from_str(&raw).expect("data-series is JSON")
}

/// Every bucket the app plotted has the usage API's counts for `interval`.
async fn chart_matches_the_api(
    browser: &Browser,
    gw: &Gateway,
    account: &str,
    key_id: &str,
    interval: &str,
) {
    let series = plotted(browser).await;
    let buckets = series["bucket"].as_array().expect("bucket times");
    assert!(!buckets.is_empty(), "nothing plotted");
    let first = buckets[0].as_str().expect("a time");
    let path = format!(
        "/v1/accounts/{account}/keys/{key_id}/usage?from={first}&to={}&interval={interval}",
        (chrono::Utc::now() + chrono::Duration::days(2)).format("%Y-%m-%d")
    );
    let (status, api) = gw.admin(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{api}");
    let by_bucket: BTreeMap<&str, &Value> = api["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .map(|b| (b["bucket"].as_str().expect("bucket"), b))
        .collect();
    for (field, name) in [
        ("success_count", "success"),
        ("error_count", "error"),
        ("rate_limited_count", "rate_limited"),
        ("bytes_in", "bytes_in"),
        ("bytes_out", "bytes_out"),
    ] {
        let plotted = series[name].as_array().expect("a series");
        assert_eq!(plotted.len(), buckets.len(), "{name}: one value a bucket");
        for (bucket, value) in buckets.iter().zip(plotted) {
            let bucket = bucket.as_str().expect("a time");
            let want = by_bucket
                .get(bucket)
                .map_or(0, |b| b[field].as_u64().unwrap_or(0));
            assert_eq!(
                value.as_u64(),
                Some(want),
                "{name} at {bucket} ({interval})"
            );
        }
    }
    let total = |name: &str| -> u64 {
        series[name]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    };
    assert_eq!(
        (total("success"), total("error"), total("rate_limited")),
        (SENT.1, SENT.2, SENT.3),
        "{interval}: the series hold the traffic sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_the_usage_the_api_reports() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let (account, key_id, key) = account(&gw).await;
    traffic(&gw, &account, &key_id, &key).await;
    let browser = Browser::start(1280, 800).await;

    browser.open(&gw.admin_url("/ui")).await;
    browser.ready("signin").await;
    browser.screenshot("signin").await;
    clean_and_fitting(&browser, "signin").await;
    browser.fill("#credential", &gw.master).await;
    browser.click("#signin-submit").await;
    browser.ready("accounts").await;
    assert!(browser.text("#whoami").await.contains("Operator"));
    let url = browser.client.current_url().await.expect("url").to_string();
    assert!(
        !url.contains(&gw.master),
        "the credential is in the URL: {url}"
    );
    browser
        .find(&format!("#accounts tr[data-account-id=\"{account}\"]"))
        .await;
    browser.screenshot("accounts").await;
    clean_and_fitting(&browser, "accounts").await;

    // The account: totals as the API has them.
    browser
        .click(&format!("#accounts tr[data-account-id=\"{account}\"] a"))
        .await;
    browser.ready("account").await;
    let (_, totals) = gw
        .admin(Method::GET, &format!("/v1/accounts/{account}/usage"), None)
        .await;
    for total in ["today", "this_month", "this_year"] {
        for field in ["request_count", "success_count", "error_count"] {
            let shown = browser
                .text(&format!(
                    "#account-totals [data-total=\"{total}\"] [data-field=\"{field}\"]"
                ))
                .await;
            assert_eq!(shown, totals[total][field].to_string(), "{total}.{field}");
        }
    }
    assert_eq!(totals["today"]["request_count"], SENT.0);
    // A custom range of two dates, today to today.
    browser.set_date("#range-start", &today()).await;
    browser.set_date("#range-end", &today()).await;
    browser.click("#range-apply").await;
    let custom = browser
        .text("#account-totals [data-total=\"custom\"] [data-field=\"request_count\"]")
        .await;
    let (_, api) = gw
        .admin(
            Method::GET,
            &format!(
                "/v1/accounts/{account}/usage?start_date={0}&end_date={0}",
                today()
            ),
            None,
        )
        .await;
    assert_eq!(custom, api["custom"]["request_count"].to_string());
    let row = format!("#keys tr[data-key-id=\"{key_id}\"]");
    assert_eq!(
        browser.text(&format!("{row} [data-field=\"name\"]")).await,
        "backend"
    );
    assert_eq!(
        browser
            .text(&format!("{row} [data-field=\"active\"]"))
            .await,
        "active"
    );
    browser.find("#audit tr[data-audit-id]").await;
    browser.screenshot("account").await;
    clean_and_fitting(&browser, "account").await;

    // The key: the chart's series are the API's buckets, by day and by hour.
    browser
        .click(&format!("{row} a[data-link=\"usage\"]"))
        .await;
    browser.ready("key").await;
    chart_matches_the_api(&browser, &gw, &account, &key_id, "day").await;
    let today_row = browser
        .eval(
            "const rows = [...document.querySelectorAll('#usage-table tr[data-bucket]')]; \
             return rows.map(r => Number(r.querySelector('[data-field=request_count]').textContent)) \
             .reduce((a, b) => a + b, 0)",
        )
        .await;
    assert_eq!(today_row, json!(SENT.0), "the table holds the same counts");
    browser
        .find("#usage-interval")
        .await
        .select_by_value("hour")
        .await
        .expect("select hour");
    browser.set_date("#usage-from", &today()).await;
    browser.set_date("#usage-to", &today()).await;
    browser.click("#usage-apply").await;
    browser.ready("key").await;
    chart_matches_the_api(&browser, &gw, &account, &key_id, "hour").await;
    let csv = browser.find("#usage-csv").await;
    assert!(csv
        .attr("href")
        .await
        .expect("attr")
        .is_some_and(|h| h.starts_with("blob:")));
    assert!(csv.attr("download").await.expect("attr").is_some());
    browser.screenshot("key").await;
    clean_and_fitting(&browser, "key").await;

    // Phone width: the same views, stacked.
    browser
        .client
        .set_window_size(390, 844)
        .await
        .expect("resize");
    browser.screenshot("key-phone").await;
    clean_and_fitting(&browser, "key at phone width").await;
    browser
        .open(&format!("{}#/accounts/{account}", gw.admin_url("/ui/")))
        .await;
    browser.ready("account").await;
    browser.screenshot("account-phone").await;
    clean_and_fitting(&browser, "account at phone width").await;

    // Signing out forgets the credential.
    browser.click("#signout").await;
    browser.ready("signin").await;
    let stored = browser
        .eval("return JSON.stringify(Object.assign({}, sessionStorage))")
        .await;
    assert!(
        !stored.as_str().unwrap_or("").contains(&gw.master),
        "{stored}"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_owner_creates_a_key_sees_it_once_and_deactivates_it() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let (account, _, key) = account(&gw).await;
    let browser = Browser::start(1280, 800).await;
    sign_in(&browser, &gw, &key, "account").await;
    assert!(browser.text("#whoami").await.contains("acme"));

    browser.click("#create-key").await;
    browser.fill("#new-key-name", "from-the-ui").await;
    browser.click("#dialog-confirm").await;
    let raw = browser
        .find("#new-key-raw")
        .await
        .prop("value")
        .await
        .expect("prop")
        .expect("the raw key is shown");
    assert!(raw.starts_with("tg"), "{raw}");
    browser.screenshot("create-key").await;
    let client = common::client();
    let passes = gw.get_with_key(&client, "/new", &raw).await;
    assert_eq!(passes.status(), StatusCode::OK, "the shown key works");
    browser.click("#dialog-close").await;
    browser.ready("account").await;
    let page = browser
        .eval("return document.documentElement.outerHTML")
        .await;
    assert!(
        !page.as_str().unwrap_or("").contains(&raw),
        "the raw key is still in the page after the dialog closed"
    );

    // Deactivate it from its row: the proxy refuses it.
    let (_, keys) = gw
        .admin(Method::GET, &format!("/v1/accounts/{account}/keys"), None)
        .await;
    let new_id = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["name"] == "from-the-ui")
        .and_then(|k| k["id"].as_str())
        .expect("the created key is listed")
        .to_owned();
    let row = format!("#keys tr[data-key-id=\"{new_id}\"]");
    browser
        .click(&format!("{row} button[data-action=\"deactivate\"]"))
        .await;
    let confirm = browser
        .eval(
            "const d = document.getElementById('dialog'); \
             return !!(d && d.open && document.getElementById('dialog-confirm'))",
        )
        .await;
    if confirm == json!(true) {
        browser.click("#dialog-confirm").await;
    }
    let inactive = common::eventually(Duration::from_secs(10), || async {
        browser
            .eval_with(
                "const el = document.querySelector(arguments[0]); \
                 return el ? el.textContent.trim() : null",
                vec![json!(format!("{row} [data-field=\"active\"]"))],
            )
            .await
            == json!("inactive")
    })
    .await;
    assert!(inactive, "the row never showed the key inactive");
    let refused = gw.get_with_key(&client, "/new", &raw).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    // The audit log, filtered to deactivations, shows it.
    browser
        .find("#audit-action")
        .await
        .select_by_value("deactivate_key")
        .await
        .expect("select");
    let shown = common::eventually(Duration::from_secs(10), || async {
        browser
            .eval(
                "const rows = [...document.querySelectorAll('#audit tr[data-audit-id]')]; \
                 return rows.length > 0 && rows.every(r => \
                   r.querySelector('[data-field=action]').textContent.includes('deactivate_key'))",
            )
            .await
            == json!(true)
    })
    .await;
    assert!(shown, "the audit filter shows the deactivation");
    clean_and_fitting(&browser, "account owner").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishable_key_is_refused_with_the_apis_error() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let (account, _, _) = account(&gw).await;
    let (_, publishable) = gw
        .create_key(
            &account,
            json!({ "name": "web", "type": "publishable", "allowed_origins": ["https://a.example"] }),
        )
        .await;
    let browser = Browser::start(1280, 800).await;
    browser.open(&gw.admin_url("/ui")).await;
    browser.ready("signin").await;
    browser.fill("#credential", &publishable).await;
    browser.click("#signin-submit").await;
    // What the API says to the same credential, shown as it is.
    let answer = common::client()
        .get(gw.admin_url("/v1/account"))
        .bearer_auth(&publishable)
        .send()
        .await
        .expect("account");
    let error: Value = answer.json().await.expect("json");
    let message = error["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    let shown = common::eventually(Duration::from_secs(10), || async {
        browser
            .eval(
                "const e = document.getElementById('signin-error'); return e ? e.textContent : ''",
            )
            .await
            .as_str()
            .is_some_and(|t| t.contains(&message))
    })
    .await;
    assert!(shown, "the API's error ({message}) is not shown");
    browser.screenshot("signin-refused").await;
    browser.close().await;
}

/// A second gateway puts the first one's admin listener under `/gw` on another host name
/// (`localhost` rather than `127.0.0.1`): the app's relative URLs keep the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_behind_a_path_prefix_on_another_host_name() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let (account, _, _) = account(&gw).await;
    let front = Gateway::builder(&upstream)
        .routes(format!(
            "[[routes]]\nname = \"admin\"\npath_prefix = \"/gw\"\nupstreams = [\"http://{}\"]\n\
             auth = \"public\"\nstrip_prefix = true\n",
            gw.admin_addr
        ))
        .start()
        .await;
    let browser = Browser::start(1280, 800).await;
    let base = format!("http://localhost:{}/gw/ui", front.proxy_addr.port());
    browser.open(&base).await;
    browser.ready("signin").await;
    browser.fill("#credential", &gw.master).await;
    browser.click("#signin-submit").await;
    browser.ready("accounts").await;
    let url = browser.client.current_url().await.expect("url");
    assert!(url.path().starts_with("/gw/ui/"), "{url}");
    browser
        .click(&format!("#accounts tr[data-account-id=\"{account}\"] a"))
        .await;
    browser.ready("account").await;
    clean_and_fitting(&browser, "behind a prefix").await;
    browser.close().await;
}

#[tokio::test]
async fn the_dashboard_is_served_with_strict_security_headers() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let moved = client.get(gw.admin_url("/ui")).send().await.expect("ui");
    assert_eq!(moved.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(common::header(&moved, "location"), Some("ui/"));

    let page = client.get(gw.admin_url("/ui/")).send().await.expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    let csp = common::header(&page, "content-security-policy")
        .expect("a CSP")
        .to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing: {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(common::header(&page, "x-frame-options"), Some("DENY"));
    assert_eq!(
        common::header(&page, "referrer-policy"),
        Some("no-referrer")
    );
    assert_eq!(
        common::header(&page, "x-content-type-options"),
        Some("nosniff")
    );
    let html = page.text().await.expect("html");
    assert!(!html.contains("<script>"), "no inline script");
    assert!(!html.contains("style=\""), "no inline style");
    // Every file the page names is served, relative to it, with the same headers.
    let names: Vec<&str> = html
        .split(['"', '\''])
        .filter(|s| s.ends_with(".js") || s.ends_with(".css"))
        .collect();
    assert!(names.len() >= 3, "{names:?}");
    for name in names {
        assert!(
            !name.starts_with('/') && !name.contains("//"),
            "{name} is not relative"
        );
        let file = client
            .get(gw.admin_url(&format!("/ui/{name}")))
            .send()
            .await
            .expect("file");
        assert_eq!(file.status(), StatusCode::OK, "{name}");
        assert!(common::header(&file, "content-security-policy").is_some());
    }
    let missing = client
        .get(gw.admin_url("/ui/../Cargo.toml"))
        .send()
        .await
        .expect("file");
    assert_ne!(missing.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_roll_and_delete_go_through_the_api() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let (account, key_id, key) = account(&gw).await;
    let (spare_id, _) = gw
        .create_key(&account, json!({ "name": "spare", "type": "secret" }))
        .await;
    let browser = Browser::start(1280, 800).await;
    sign_in(&browser, &gw, &gw.master, "accounts").await;
    browser
        .click(&format!("#accounts tr[data-account-id=\"{account}\"] a"))
        .await;
    browser.ready("account").await;
    let key_row = |id: &str| format!("#keys tr[data-key-id=\"{id}\"]");
    let api_key = |id: String| {
        let path = format!("/v1/accounts/{account}/keys/{id}");
        let gw = &gw;
        async move { gw.admin(Method::GET, &path, None).await }
    };

    // Rename: the API has the new name, and so does the row.
    browser
        .click(&format!(
            "{} button[data-action=\"rename\"]",
            key_row(&spare_id)
        ))
        .await;
    browser.fill("#rename-name", "spare-renamed").await;
    browser.click("#dialog-confirm").await;
    browser.ready("account").await;
    assert_eq!(api_key(spare_id.clone()).await.1["name"], "spare-renamed");
    assert_eq!(
        browser
            .text(&format!("{} [data-field=\"name\"]", key_row(&spare_id)))
            .await,
        "spare-renamed"
    );

    // Roll with a grace period: a new raw key, shown once; the old one works until the grace
    // ends.
    browser
        .click(&format!(
            "{} button[data-action=\"roll\"]",
            key_row(&key_id)
        ))
        .await;
    browser.fill("#roll-grace", "1h").await;
    browser.click("#dialog-confirm").await;
    let rolled = browser
        .find("#new-key-raw")
        .await
        .prop("value")
        .await
        .expect("prop")
        .expect("the new raw key");
    assert_ne!(rolled, key);
    let client = common::client();
    assert_eq!(
        gw.get_with_key(&client, "/x", &rolled).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        gw.get_with_key(&client, "/y", &key).await.status(),
        StatusCode::OK
    );
    let old = api_key(key_id.clone()).await.1;
    assert!(
        old["expires_at"].is_string(),
        "the old key ends after its grace: {old}"
    );
    browser.click("#dialog-close").await;
    browser.ready("account").await;

    // Delete, after a confirmation: gone from the API, the page and the proxy.
    browser
        .click(&format!(
            "{} button[data-action=\"delete\"]",
            key_row(&spare_id)
        ))
        .await;
    browser.click("#dialog-confirm").await;
    browser.ready("account").await;
    assert_eq!(api_key(spare_id.clone()).await.0, StatusCode::NOT_FOUND);
    let gone = browser
        .eval_with(
            "return document.querySelector(arguments[0]) === null",
            vec![json!(key_row(&spare_id))],
        )
        .await;
    assert_eq!(gone, json!(true));
    // Each change wrote its audit entry, as through the API.
    let (_, audit) = gw
        .admin(Method::GET, &format!("/v1/accounts/{account}/audit"), None)
        .await;
    let actions: Vec<&str> = audit["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .filter_map(|l| l["action"].as_str())
        .collect();
    for action in ["update_key", "roll_key", "delete_key"] {
        assert!(actions.contains(&action), "{action} not in {actions:?}");
    }
    browser.close().await;
}

/// An account signs in with an OAuth access token too; the operator's search narrows the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_signs_in_and_the_operator_search_filters() {
    let upstream = Upstream::start().await;
    let gw = gateway(&upstream).await;
    let account = gw
        .create_account(json!({
            "name": "tokens-inc",
            "auth_method": "oauth",
            "permissions": ["account:read"],
        }))
        .await;
    gw.create_account(json!({ "name": "other-co" })).await;
    let (status, secret) = gw
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/secrets"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{secret}");
    let raw = secret["client_secret"].as_str().expect("secret");
    let token: Value = common::client()
        .post(gw.proxy_url("/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", account.as_str()),
            ("client_secret", raw),
        ])
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    let token = token["access_token"].as_str().expect("access token");
    let browser = Browser::start(1280, 800).await;
    sign_in(&browser, &gw, token, "account").await;
    assert!(browser.text("#whoami").await.contains("tokens-inc"));
    browser.click("#signout").await;
    browser.ready("signin").await;

    browser.fill("#credential", &gw.master).await;
    browser.click("#signin-submit").await;
    browser.ready("accounts").await;
    browser.fill("#account-search", "tokens").await;
    let visible = common::eventually(Duration::from_secs(5), || async {
        browser
            .eval(
                "return [...document.querySelectorAll('#accounts tr[data-account-id]')] \
                 .filter(r => r.offsetParent !== null).map(r => r.dataset.accountId)",
            )
            .await
            == json!([account])
    })
    .await;
    assert!(visible, "the search leaves only the matching account");
    browser.close().await;
}

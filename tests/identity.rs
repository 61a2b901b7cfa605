//! The signed identity header (`identity.signing_secret_env`): every request forwarded for a key
//! carries `X-Tollgate-Identity`, an HS256 JWS that two independent libraries verify —
//! `jsonwebtoken` here and PyJWT (installed by `.ci/run`) in a Python process — with the claims
//! the key's identity headers state (`external_id` only for a key that has one), `iat` from the
//! gateway's clock and `exp` `signed_ttl` later.

mod common;

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use tollgate::config::IdentitySigning;
use tollgate::metering::WallClock;

use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, expect_echo};

const SECRET: &str = "an-identity-secret-of-at-least-32-bytes!";

/// 2026-12-06 10:00:00 UTC, in ms.
const NOW_MS: i64 = 1_765_015_200_000;

async fn signing_gateway(upstream: &Upstream) -> Gateway {
    Gateway::builder(upstream)
        .clock(WallClock::Manual(Arc::new(AtomicI64::new(NOW_MS))))
        .tweak(|s| {
            s.identity.signing = Some(IdentitySigning {
                secret: Arc::from(SECRET.as_bytes()),
                ttl: Duration::from_secs(90),
            });
        })
        .start()
        .await
}

/// The identity header the upstream saw for a request to `path` with `key`.
async fn seen_identity(gw: &Gateway, path: &str, key: Option<&str>) -> Option<String> {
    let mut request = client()
        .get(gw.proxy_url(path))
        .header("x-tollgate-identity", "forged.by.client");
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let echo = expect_echo(request.send().await.expect("request")).await;
    echo["headers"]["x-tollgate-identity"]
        .as_str()
        .map(str::to_owned)
}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_issuer(&["tollgate"]);
    // The gateway's clock is fixed in 2026; what is checked here is the claims, not today.
    v.validate_exp = false;
    v.set_required_spec_claims(&["exp", "iat", "iss"]);
    v
}

#[tokio::test]
async fn forwarded_requests_carry_an_identity_that_jsonwebtoken_and_pyjwt_verify() {
    let upstream = Upstream::start().await;
    let gw = signing_gateway(&upstream).await;
    let (account_id, key) = gw.account_with_key().await;
    let (key_id, reader) = gw
        .create_key(
            &account_id,
            json!({ "name": "reader", "scopes": ["orders:read"], "external_id": "cus 42" }),
        )
        .await;

    let token = seen_identity(&gw, "/orders/1", Some(&reader))
        .await
        .expect("a signed identity");
    assert_ne!(token, "forged.by.client", "the client's copy is replaced");
    let claims: Value = decode::<Value>(
        &token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &validation(),
    )
    .expect("jsonwebtoken verifies it")
    .claims;
    let iat = NOW_MS / 1000;
    assert_eq!(
        claims,
        json!({
            "iss": "tollgate",
            "account_id": account_id,
            "key_id": key_id,
            "key_type": "secret",
            "scopes": ["orders:read"],
            "external_id": "cus 42",
            "iat": iat,
            "exp": iat + 90,
        })
    );

    // Another secret does not verify it.
    let other = decode::<Value>(
        &token,
        &DecodingKey::from_secret(b"another-secret-of-at-least-32-bytes-long"),
        &validation(),
    );
    assert!(other.is_err());

    // A full-access key says `*`, as X-Tollgate-Scopes does.
    let full = seen_identity(&gw, "/things", Some(&key))
        .await
        .expect("signed");
    let claims = decode::<Value>(
        &full,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &validation(),
    )
    .expect("verifies")
    .claims;
    assert_eq!(claims["scopes"], json!(["*"]));
    // A key without an external_id has no such claim.
    assert_eq!(claims.get("external_id"), None, "{claims}");

    // PyJWT, in its own process, agrees.
    let script = "import json, sys, jwt\n\
                  claims = jwt.decode(sys.argv[1], sys.argv[2], algorithms=['HS256'], \
                  issuer='tollgate', options={'verify_exp': False, 'require': ['exp', 'iat']})\n\
                  print(json.dumps(claims))\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script, &token, SECRET])
        .output()
        .expect("python3 runs (.ci/run installs PyJWT)");
    assert!(
        out.status.success(),
        "PyJWT refused the token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: Value = serde_json::from_slice(&out.stdout).expect("PyJWT's JSON");
    assert_eq!(py["key_id"], json!(key_id));
    assert_eq!(py["exp"], json!(iat + 90));

    // A public route forwards no identity, signed or not, and drops the client's.
    assert_eq!(seen_identity(&gw, "/public/x", None).await, None);
}

#[tokio::test]
async fn without_a_signing_secret_no_identity_header_is_sent() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (_, key) = gw.account_with_key().await;
    assert_eq!(seen_identity(&gw, "/things", Some(&key)).await, None);
}

#[test]
fn the_signing_secret_must_be_set_and_long_enough() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nsigning_secret_env = \"TG_ID_SECRET\"\nsigned_ttl = \"30s\"\n\
             [store]\npath = '{}'\n",
            dir.path().join("t.db").display()
        ),
    )
    .expect("write");
    let load = |value: Option<&str>| {
        let env = value.map(|v| ("TG_ID_SECRET".to_owned(), v.to_owned()));
        tollgate::config::load_with_env(&config, env)
    };
    let unset = load(None).expect_err("unset").to_string();
    assert!(unset.contains("identity.signing_secret_env"), "{unset}");
    assert!(unset.contains("`TG_ID_SECRET` is not set"), "{unset}");
    let short = load(Some("short")).expect_err("short").to_string();
    assert!(short.contains("at least 32"), "{short}");
    let settings = load(Some(SECRET)).expect("a long secret loads");
    let signing = settings.identity.signing.expect("signing on");
    assert_eq!(signing.ttl, Duration::from_secs(30));
    assert!(
        !format!("{signing:?}").contains(SECRET),
        "Debug never shows the secret"
    );
}

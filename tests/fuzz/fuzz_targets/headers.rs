//! `proxy::headers::prepare_upstream_headers` on arbitrary header maps (names and values from
//! the fuzzer, invalid ones skipped): never a panic; afterwards no hop-by-hop header and none
//! that `Connection` named, no client-sent identity header, no `Forwarded`/`X-Real-IP` from an
//! untrusted peer, the credential's header gone, and exactly one `X-Forwarded-For` that ends
//! with the peer.

#![no_main]

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use tollgate::auth::extract::Source;
use tollgate::auth::{Identity, IdentityValues, LimitValues};
use tollgate::proxy::headers::{prepare_upstream_headers, Forwarding, IdentityNames};
use tollgate::store::KeyType;

/// What never goes upstream as the client sent it.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "upgrade",
    "te",
    "trailer",
    "transfer-encoding",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "host",
    "http2-settings",
];

struct Case {
    headers: HeaderMap,
    prefix: &'static str,
    peer: IpAddr,
    trusted: bool,
    host: Option<HeaderValue>,
    credential: Option<Source>,
    identity: bool,
}

fuzz_target!(|data: &[u8]| {
    if let Some(case) = case(data) {
        check(case);
    }
});

/// The input: one byte of flags, 16 bytes of peer address, then a header block of
/// `name: value` lines (what is not a valid name or value is skipped).
///
/// Flags: bit 0 trusted peer, bit 1 with identity, bits 2–3 the credential's header (none,
/// X-API-Key, Authorization, none), bits 4–5 the identity prefix, bit 6 an IPv4 peer (its first
/// four bytes), bit 7 a request host.
fn case(data: &[u8]) -> Option<Case> {
    let (&flags, rest) = data.split_first()?;
    let peer: [u8; 16] = rest.get(..16)?.try_into().ok()?;
    let mut headers = HeaderMap::new();
    for line in rest[16..].split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    Some(Case {
        headers,
        prefix: ["X-Tollgate-", "X-Gw-", "x-", "X-Tollgate-"][usize::from(flags >> 4 & 3)],
        peer: if flags & 0x40 != 0 {
            IpAddr::from([peer[0], peer[1], peer[2], peer[3]])
        } else {
            IpAddr::from(peer)
        },
        trusted: flags & 1 != 0,
        host: (flags & 0x80 != 0).then(|| HeaderValue::from_static("api.example.com")),
        credential: [
            None,
            Some(Source::ApiKeyHeader),
            Some(Source::Authorization),
            None,
        ][usize::from(flags >> 2 & 3)],
        identity: flags & 2 != 0,
    })
}

fn check(case: Case) {
    let Case {
        mut headers,
        prefix,
        peer,
        trusted,
        host,
        credential,
        identity,
    } = case;
    let names = IdentityNames::new(prefix).expect("a valid prefix");
    let identity_values = IdentityValues {
        account_id: Arc::new(HeaderValue::from_static("acc_1")),
        scopes: None,
        external_id: Some(Box::new(HeaderValue::from_static("user 42"))),
        limits: Arc::new(LimitValues::default()),
    };
    let before = headers.clone();
    let fwd = Forwarding {
        peer,
        peer_trusted: trusted,
        host: host.as_ref(),
        credential,
        tls: trusted,
    };
    prepare_upstream_headers(
        &mut headers,
        &names,
        &fwd,
        identity.then_some(Identity {
            key_id: "key_1",
            key_type: KeyType::Secret,
            values: &identity_values,
        }),
    );

    let ours: Vec<String> = ["Account-Id", "Key-Id", "Key-Type", "Scopes", "External-Id"]
        .iter()
        .map(|s| format!("{prefix}{s}").to_ascii_lowercase())
        .collect();
    let added = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];
    for name in headers.keys() {
        let n = name.as_str();
        assert!(!HOP_BY_HOP.contains(&n), "{n} went upstream");
        let identity_like =
            n.starts_with("x-tollgate-") || n.starts_with(&prefix.to_ascii_lowercase());
        if identity_like && !added.contains(&n) {
            assert!(
                identity && ours.iter().any(|o| o == n),
                "client-sent {n} went upstream"
            );
        }
    }
    // What Connection named is gone, unless the gateway set it itself.
    for value in before.get_all("connection") {
        for token in value.as_bytes().split(|b| *b == b',') {
            let Ok(name) = HeaderName::from_bytes(token.trim_ascii()) else {
                continue;
            };
            let set_by_us = added.contains(&name.as_str())
                || (identity && ours.iter().any(|o| o == name.as_str()));
            if !set_by_us {
                assert!(
                    !headers.contains_key(&name),
                    "{name} named by Connection went upstream"
                );
            }
        }
    }
    if !trusted {
        assert!(!headers.contains_key("forwarded"));
        assert!(!headers.contains_key("x-real-ip"));
        assert_eq!(headers["x-forwarded-proto"], "http");
        match &host {
            Some(h) => assert_eq!(&headers["x-forwarded-host"], h),
            None => assert!(!headers.contains_key("x-forwarded-host")),
        }
    }
    match credential {
        Some(Source::ApiKeyHeader) => assert!(!headers.contains_key("x-api-key")),
        Some(Source::Authorization) => assert!(!headers.contains_key("authorization")),
        None => {}
    }
    let xff: Vec<&HeaderValue> = headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff.len(), 1, "X-Forwarded-For: {xff:?}");
    let xff = xff[0].as_bytes();
    let peer_text = peer.to_string();
    if trusted {
        assert!(xff.ends_with(peer_text.as_bytes()), "{xff:?}");
    } else {
        assert_eq!(xff, peer_text.as_bytes());
    }
}

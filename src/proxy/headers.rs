//! Header work of the proxy: what is removed before forwarding (hop-by-hop, the credential,
//! client-sent identity headers), what is added (X-Forwarded-*, identity), and the limit headers
//! on the way back. Header names are built once at start-up.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use std::fmt::Write as _;

use super::arena;
use crate::auth::extract::{Source, X_API_KEY};
use crate::auth::{Identity, IdentityValues};
use crate::config::LimitHeaders;
use crate::limits::{LimitSnapshot, Window, WindowState};
use crate::store::KeyType;

static SECRET: HeaderValue = HeaderValue::from_static("secret");
static PUBLISHABLE: HeaderValue = HeaderValue::from_static("publishable");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// Sent with an h2c upgrade; meaningless once the upgrade is not passed on.
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
static X_LIMIT: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-minute"),
    HeaderName::from_static("x-ratelimit-limit-hour"),
    HeaderName::from_static("x-ratelimit-limit-day"),
];
static X_REMAINING: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-remaining-minute"),
    HeaderName::from_static("x-ratelimit-remaining-hour"),
    HeaderName::from_static("x-ratelimit-remaining-day"),
];

/// Hop-by-hop headers, and `Host`: what never crosses the proxy as it came. A header's position
/// here is its bit in the masks below.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::HOST,
];
const CONNECTION_BIT: u16 = 1 << 0;
const UPGRADE_BIT: u16 = 1 << 1;
/// Dropped from requests: all of them but `Proxy-Authenticate` (the upstream gets its own
/// `Host`).
const REQUEST_DROPS: u16 = 0b10_1111_1111;
/// Dropped from responses: all of them but `Proxy-Authorization` and `Host`.
const RESPONSE_DROPS: u16 = 0b01_0111_1111;
/// Most headers [`add_limit_headers`] adds: policy, the structured field, three for the
/// tightest window, two per window.
const LIMIT_HEADERS: usize = 11;

/// The identity header names for the configured prefix.
pub struct IdentityNames {
    /// Lowercase prefix, for stripping client-sent copies.
    prefix: String,
    account_id: HeaderName,
    key_id: HeaderName,
    key_type: HeaderName,
    scopes: HeaderName,
    /// `X-Tollgate-Cost` on an upstream's answer: the credits the request cost (contract 5a).
    cost: HeaderName,
    external_id: HeaderName,
}

/// What the forwarded request needs to say about its client.
pub struct Forwarding<'a> {
    /// Client address as decided by trusted proxies.
    pub peer: IpAddr,
    /// Whether the peer is a trusted proxy (then its X-Forwarded-* are kept and extended).
    pub peer_trusted: bool,
    /// The original host, for X-Forwarded-Host.
    pub host: Option<&'a HeaderValue>,
    /// Which header held the credential, to remove exactly that one.
    pub credential: Option<Source>,
    /// The client's connection is TLS: `X-Forwarded-Proto: https`.
    pub tls: bool,
}

// === impl IdentityNames ===

impl IdentityNames {
    /// Names from `prefix` (e.g. `X-Tollgate-`); validated by config.
    pub fn new(prefix: &str) -> Result<Self, http::header::InvalidHeaderName> {
        let name = |suffix: &str| {
            HeaderName::from_bytes(format!("{prefix}{suffix}").to_ascii_lowercase().as_bytes())
        };
        Ok(IdentityNames {
            prefix: prefix.to_ascii_lowercase(),
            account_id: name("Account-Id")?,
            key_id: name("Key-Id")?,
            key_type: name("Key-Type")?,
            scopes: name("Scopes")?,
            cost: name("Cost")?,
            external_id: name("External-Id")?,
        })
    }

    /// `X-Tollgate-Cost` (with the configured prefix).
    pub fn cost(&self) -> &HeaderName {
        &self.cost
    }

    fn is_identity(&self, name: &HeaderName) -> bool {
        let n = name.as_str();
        n.starts_with(&self.prefix) || n.starts_with("x-tollgate-")
    }
}

/// Turns the client's request headers into the upstream's, in place: drops hop-by-hop headers
/// (and those that `Connection` names), the credential, `Host` (the caller sets the
/// upstream's) and any client-sent identity header; then adds X-Forwarded-* and, for a key, the
/// identity headers (`X-Tollgate-External-Id` only for a key that has one). One pass over the
/// names finds what to drop, so a request without such headers costs no removal. The
/// `X-Forwarded-For` and key id values are written into the thread's header arena; nothing
/// else is made per request.
pub fn prepare_upstream_headers(
    headers: &mut HeaderMap,
    names: &IdentityNames,
    fwd: &Forwarding<'_>,
    identity: Option<Identity<'_>>,
) {
    let mut found = 0u16;
    let mut spoofed = false;
    let mut claims = false;
    for name in headers.keys() {
        let bit = hop_by_hop_bit(name);
        found |= bit;
        spoofed |= bit == 0 && names.is_identity(name);
        claims |= name == header::FORWARDED || name == X_REAL_IP || name == HTTP2_SETTINGS;
    }
    remove_hop_by_hop(headers, found, found & REQUEST_DROPS, false);
    if claims {
        headers.remove(&HTTP2_SETTINGS);
        // What a client says about where it came from is believed only from a trusted proxy,
        // like X-Forwarded-For.
        if !fwd.peer_trusted {
            headers.remove(header::FORWARDED);
            headers.remove(&X_REAL_IP);
        }
    }
    if spoofed {
        let listed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| names.is_identity(n))
            .cloned()
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    match fwd.credential {
        Some(Source::ApiKeyHeader) => drop(headers.remove(&X_API_KEY)),
        Some(Source::Authorization) => drop(headers.remove(header::AUTHORIZATION)),
        _ => {}
    }
    if !fwd.peer_trusted {
        headers.remove(&X_FORWARDED_PROTO);
        headers.remove(&X_FORWARDED_HOST);
    }
    let xff = arena::value(|buf| {
        if fwd.peer_trusted {
            for prior in headers.get_all(&X_FORWARDED_FOR) {
                buf.extend_from_slice(prior.as_bytes());
                buf.extend_from_slice(b", ");
            }
        }
        let _ = write!(buf, "{}", fwd.peer);
    });
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        let proto = if fwd.tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if let (false, Some(host)) = (headers.contains_key(&X_FORWARDED_HOST), fwd.host) {
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    if let Some(who) = identity {
        let id = who.values;
        headers.insert(names.account_id.clone(), (*id.account_id).clone());
        // Written per request (a copy of 24 bytes into the arena) rather than kept per key: a
        // value of its own cost each cached key ~90 bytes (the value, its bytes, and their
        // shared form once first cloned).
        if let Some(key_id) = arena::value(|buf| buf.extend_from_slice(who.key_id.as_bytes())) {
            headers.insert(names.key_id.clone(), key_id);
        }
        let key_type = match who.key_type {
            KeyType::Secret => &SECRET,
            KeyType::Publishable => &PUBLISHABLE,
        };
        headers.insert(names.key_type.clone(), key_type.clone());
        headers.insert(names.scopes.clone(), id.scopes_header().clone());
        if let Some(external_id) = &id.external_id {
            headers.insert(names.external_id.clone(), (**external_id).clone());
        }
    }
}

/// The WebSocket upgrade a client asks for (`Connection: upgrade` with `Upgrade: websocket`), if
/// any. No other upgrade is passed on: an `h2c` one would make the upstream connection a tunnel
/// of HTTP/2 requests that the gateway never sees (h2c smuggling), so such a request goes on as
/// a plain one, its upgrade headers removed with the other hop-by-hop headers.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    let websocket = protocol
        .to_str()
        .is_ok_and(|p| p.trim().eq_ignore_ascii_case("websocket"));
    (websocket && connection_has(headers, "upgrade")).then(|| protocol.clone())
}

/// Whether a `Connection` header of the message lists `token` (`close`, `upgrade`, …).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Puts an upgrade request back on the upstream request: its hop-by-hop headers were removed
/// with the others, but an upgrade has to reach the upstream to happen.
pub fn ask_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Removes hop-by-hop headers from an upstream response; a `101 Switching Protocols` keeps
/// `Connection` and `Upgrade`, which the client needs to finish its upgrade.
pub fn clean_response_headers(headers: &mut HeaderMap, switching: bool) {
    let found = headers.keys().fold(0, |m, name| m | hop_by_hop_bit(name));
    let kept = if switching {
        CONNECTION_BIT | UPGRADE_BIT
    } else {
        0
    };
    remove_hop_by_hop(headers, found, found & RESPONSE_DROPS & !kept, switching);
}

/// The bit of `name` in [`HOP_BY_HOP`]; 0 for any other header.
fn hop_by_hop_bit(name: &HeaderName) -> u16 {
    HOP_BY_HOP
        .iter()
        .position(|h| h == name)
        .map_or(0, |i| 1 << i)
}

/// With `found` the bits of the [`HOP_BY_HOP`] headers present: first removes the headers that
/// `Connection` names (hop-by-hop for this message; `keep_upgrade` keeps a named `Upgrade`, which
/// a 101 needs), then those whose bits are in `dropped`. Nothing is allocated unless `Connection`
/// names a header. `Connection` naming itself is skipped: removing it here would drop its values
/// not read yet, and the headers they name would go through (it goes with `dropped`).
fn remove_hop_by_hop(headers: &mut HeaderMap, found: u16, dropped: u16, keep_upgrade: bool) {
    if found & CONNECTION_BIT != 0 {
        let mut i = 0;
        while let Some(value) = headers.get_all(header::CONNECTION).iter().nth(i).cloned() {
            for token in tokens(&value) {
                // `close` and `keep-alive` name no header worth a lookup.
                let skip = token.eq_ignore_ascii_case(b"close")
                    || token.eq_ignore_ascii_case(b"keep-alive")
                    || token.eq_ignore_ascii_case(b"connection")
                    || (keep_upgrade && token.eq_ignore_ascii_case(b"upgrade"));
                if let (false, Ok(name)) = (skip, HeaderName::from_bytes(token)) {
                    headers.remove(name);
                }
            }
            i += 1;
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if dropped & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// The comma-separated tokens of a list-valued header such as `Connection`, trimmed. Read as
/// bytes: one token that is not text (obs-text) must not hide the names beside it.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Adds the rate-limit headers of the `styles` configured for the windows in force. The limits
/// are the key's precomputed values; the remaining counts and resets are written into this
/// thread's header arena, so no value costs an allocation of its own.
pub fn add_limit_headers(
    headers: &mut HeaderMap,
    styles: LimitHeaders,
    key: &IdentityValues,
    limits: &LimitSnapshot,
) {
    let Some(tightest) = limits.tightest() else {
        return;
    };
    if styles == LimitHeaders::NONE {
        return;
    }
    headers.reserve(LIMIT_HEADERS);
    let mut n = itoa::Buffer::new();
    if styles.ietf {
        add_structured(headers, &mut n, key, &tightest);
    }
    // The key's own limits are ready-made values; an account's shared window is written out.
    let limit_of = |w: &WindowState| match &key.limits.per_window[w.window.index()] {
        Some(v) if !w.shared => v.clone(),
        _ => HeaderValue::from(w.limit),
    };
    let mut number = |v: u64| arena::value(|buf| buf.extend_from_slice(n.format(v).as_bytes()));
    if styles.legacy {
        headers.insert(RATELIMIT_LIMIT.clone(), limit_of(&tightest));
        if let Some(v) = number(u64::from(tightest.remaining)) {
            headers.insert(RATELIMIT_REMAINING.clone(), v);
        }
        if let Some(v) = number(tightest.reset) {
            headers.insert(RATELIMIT_RESET.clone(), v);
        }
    }
    if styles.per_window {
        for (i, w) in limits.windows.iter().enumerate() {
            if let Some(w) = w {
                debug_assert_eq!(Window::ALL[i], w.window);
                headers.insert(X_LIMIT[i].clone(), limit_of(w));
                if let Some(v) = number(u64::from(w.remaining)) {
                    headers.insert(X_REMAINING[i].clone(), v);
                }
            }
        }
    }
}

/// `RateLimit-Policy` (every window, made once per set of quotas) and `RateLimit` (the tightest
/// window, written into the arena).
fn add_structured(
    headers: &mut HeaderMap,
    n: &mut itoa::Buffer,
    key: &IdentityValues,
    tightest: &WindowState,
) {
    if let Some(p) = &key.limits.policy {
        headers.insert(RATELIMIT_POLICY.clone(), p.clone());
    }
    let structured = arena::value(|buf| {
        buf.extend_from_slice(if tightest.shared { b"\"shared-" } else { b"\"" });
        buf.extend_from_slice(tightest.window.name().as_bytes());
        buf.extend_from_slice(b"\";r=");
        buf.extend_from_slice(n.format(tightest.remaining).as_bytes());
        buf.extend_from_slice(b";t=");
        buf.extend_from_slice(n.format(tightest.reset).as_bytes());
    });
    if let Some(v) = structured {
        headers.insert(RATELIMIT.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn fwd(trusted: bool, credential: Option<Source>) -> Forwarding<'static> {
        Forwarding {
            peer: "10.0.0.7".parse().unwrap(),
            peer_trusted: trusted,
            host: None,
            credential,
            tls: false,
        }
    }

    #[test]
    fn hop_by_hop_named_spoofed_and_credential_headers_do_not_go_upstream() {
        let names = IdentityNames::new("X-Gw-").unwrap();
        let mut h = request_headers(&[
            ("host", "api.example.com"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-gw-key-id", "spoofed"),
            ("x-tollgate-account-id", "spoofed"),
            ("x-api-key", "tgsk_the_credential"),
            ("authorization", "Bearer for-the-upstream"),
            ("accept", "*/*"),
        ]);
        prepare_upstream_headers(
            &mut h,
            &names,
            &fwd(false, Some(Source::ApiKeyHeader)),
            None,
        );
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "accept",
                "authorization",
                "x-forwarded-for",
                "x-forwarded-proto"
            ]
        );
        assert_eq!(h["authorization"], "Bearer for-the-upstream");
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
    }

    #[test]
    fn a_trusted_peer_extends_every_forwarded_for_value_it_sent() {
        let names = IdentityNames::new("X-Tollgate-").unwrap();
        let mut h = request_headers(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "198.51.100.2, 192.0.2.3"),
            ("x-forwarded-proto", "https"),
        ]);
        prepare_upstream_headers(&mut h, &names, &fwd(true, None), None);
        assert_eq!(
            h["x-forwarded-for"],
            "203.0.113.1, 198.51.100.2, 192.0.2.3, 10.0.0.7"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }

    /// Found by the `headers` fuzz target: a first `Connection` that named `connection` removed
    /// every `Connection` value before the second was read, so the header that one named went
    /// upstream.
    #[test]
    fn a_connection_that_names_itself_does_not_hide_the_next_one() {
        let names = IdentityNames::new("X-Tollgate-").unwrap();
        let mut h = request_headers(&[
            ("connection", "connection"),
            ("connection", "x-secret-hop"),
            ("x-secret-hop", "1"),
            ("accept", "*/*"),
        ]);
        prepare_upstream_headers(&mut h, &names, &fwd(false, None), None);
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h["accept"], "*/*");
    }

    /// Found while reducing a `headers` fuzz crash (whose input had obs-text in a `Connection`
    /// value), then checked by the target: a `Connection` value with one byte that is not text
    /// named nothing at all, so the header it listed beside went upstream.
    #[test]
    fn a_connection_with_obs_text_still_names_its_other_headers() {
        let names = IdentityNames::new("X-Tollgate-").unwrap();
        let mut h = request_headers(&[("x-secret-hop", "1")]);
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret-hop, \xff").unwrap(),
        );
        prepare_upstream_headers(&mut h, &names, &fwd(false, None), None);
        assert!(h.get("x-secret-hop").is_none());
        let mut switching = request_headers(&[("upgrade", "websocket")]);
        switching.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"upgrade, connection, \xff").unwrap(),
        );
        clean_response_headers(&mut switching, true);
        assert_eq!(switching["upgrade"], "websocket");
        assert!(switching.get("connection").is_some());
    }

    #[test]
    fn only_websocket_upgrades_are_passed_on() {
        let ws = request_headers(&[("connection", "Upgrade"), ("upgrade", "WebSocket")]);
        assert_eq!(requested_upgrade(&ws).unwrap(), "WebSocket");
        let h2c = request_headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert!(requested_upgrade(&h2c).is_none());
        let mut h = h2c;
        let names = IdentityNames::new("X-Tollgate-").unwrap();
        prepare_upstream_headers(&mut h, &names, &fwd(false, None), None);
        assert!(h.get("upgrade").is_none() && h.get("http2-settings").is_none());
        assert!(h.get("connection").is_none());
    }

    #[test]
    fn an_untrusted_peer_cannot_set_forwarded_headers() {
        let names = IdentityNames::new("X-Tollgate-").unwrap();
        let mut h = request_headers(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=203.0.113.1;proto=https"),
            ("x-real-ip", "203.0.113.1"),
        ]);
        let host = HeaderValue::from_static("api.example.com");
        let mut f = fwd(false, None);
        f.host = Some(&host);
        prepare_upstream_headers(&mut h, &names, &f, None);
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert!(h.get("forwarded").is_none() && h.get("x-real-ip").is_none());
        let mut trusted =
            request_headers(&[("forwarded", "for=1.2.3.4"), ("x-real-ip", "1.2.3.4")]);
        prepare_upstream_headers(&mut trusted, &names, &fwd(true, None), None);
        assert_eq!(trusted["forwarded"], "for=1.2.3.4");
        assert_eq!(trusted["x-real-ip"], "1.2.3.4");
    }

    #[test]
    fn responses_lose_hop_by_hop_headers_except_an_upgrades_own() {
        let pairs = [
            ("connection", "upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
        ];
        let mut normal = request_headers(&pairs);
        clean_response_headers(&mut normal, false);
        assert_eq!(
            normal.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["content-type"]
        );
        let mut switching = request_headers(&pairs);
        clean_response_headers(&mut switching, true);
        let mut left: Vec<&str> = switching.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["connection", "content-type", "upgrade"]);
    }
}

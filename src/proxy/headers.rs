//! Header work of the proxy: what is removed before forwarding (hop-by-hop, the credential,
//! client-sent identity headers), what is added (X-Forwarded-*, identity), and the limit headers
//! on the way back. Header names are built once at start-up.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use crate::auth::extract::{Source, X_API_KEY};
use crate::auth::IdentityValues;
use crate::limits::{LimitSnapshot, Window};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
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

/// The identity header names for the configured prefix.
pub struct IdentityNames {
    /// Lowercase prefix, for stripping client-sent copies.
    prefix: String,
    account_id: HeaderName,
    key_id: HeaderName,
    key_type: HeaderName,
    scopes: HeaderName,
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
        })
    }

    fn is_identity(&self, name: &HeaderName) -> bool {
        let n = name.as_str();
        n.starts_with(&self.prefix) || n.starts_with("x-tollgate-")
    }
}

/// Rebuilds the request headers for upstream in one pass: drops hop-by-hop headers (and those
/// that `Connection` names), the credential, `Host` (the client sets the upstream's) and any
/// client-sent identity header; then adds X-Forwarded-* and, for a key, the identity headers.
pub fn upstream_request_headers(
    incoming: HeaderMap,
    names: &IdentityNames,
    fwd: &Forwarding<'_>,
    identity: Option<&IdentityValues>,
) -> HeaderMap {
    let connection_named = connection_listed(&incoming);
    let mut out = HeaderMap::with_capacity(incoming.len() + 8);
    let mut prior_xff: Option<HeaderValue> = None;
    let mut current: Option<HeaderName> = None;
    for (name, value) in incoming {
        if let Some(n) = name {
            current = Some(n);
        }
        let Some(name) = current.as_ref() else {
            continue;
        };
        if is_hop_by_hop(name)
            || connection_named.contains(name)
            || names.is_identity(name)
            || name == header::HOST
        {
            continue;
        }
        match fwd.credential {
            Some(Source::ApiKeyHeader) if name == X_API_KEY => continue,
            Some(Source::Authorization) if name == header::AUTHORIZATION => continue,
            _ => {}
        }
        if *name == X_FORWARDED_FOR {
            if fwd.peer_trusted {
                prior_xff = Some(value);
            }
            continue;
        }
        if !fwd.peer_trusted && (*name == X_FORWARDED_PROTO || *name == X_FORWARDED_HOST) {
            continue;
        }
        out.append(name.clone(), value);
    }
    let peer = fwd.peer.to_string();
    let xff = match prior_xff.as_ref().and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {peer}"),
        None => peer,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        out.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !out.contains_key(&X_FORWARDED_PROTO) {
        out.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if let (false, Some(host)) = (out.contains_key(&X_FORWARDED_HOST), fwd.host) {
        out.insert(X_FORWARDED_HOST.clone(), host.clone());
    }
    if let Some(id) = identity {
        out.insert(names.account_id.clone(), id.account_id.clone());
        out.insert(names.key_id.clone(), id.key_id.clone());
        out.insert(names.key_type.clone(), id.key_type.clone());
        out.insert(names.scopes.clone(), id.scopes.clone());
    }
    out
}

/// The protocol a client asks to upgrade to (`Connection: upgrade` with `Upgrade: …`, as a
/// WebSocket handshake sends), if any.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
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
    for name in connection_listed(headers) {
        if !(switching && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    for name in [&KEEP_ALIVE, &PROXY_CONNECTION] {
        headers.remove(name);
    }
    if !switching {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Adds both styles of rate-limit headers for the windows in force.
pub fn add_limit_headers(
    headers: &mut HeaderMap,
    policy: Option<&HeaderValue>,
    limits: &LimitSnapshot,
) {
    let Some(tightest) = limits.tightest() else {
        return;
    };
    if let Some(p) = policy {
        headers.insert(RATELIMIT_POLICY.clone(), p.clone());
    }
    let mut buf = itoa::Buffer::new();
    let mut structured = String::with_capacity(32);
    structured.push('"');
    structured.push_str(tightest.window.name());
    structured.push_str("\";r=");
    structured.push_str(buf.format(tightest.remaining));
    structured.push_str(";t=");
    structured.push_str(buf.format(tightest.reset));
    if let Ok(v) = HeaderValue::from_str(&structured) {
        headers.insert(RATELIMIT.clone(), v);
    }
    headers.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(tightest.limit));
    headers.insert(
        RATELIMIT_REMAINING.clone(),
        HeaderValue::from(tightest.remaining),
    );
    headers.insert(RATELIMIT_RESET.clone(), HeaderValue::from(tightest.reset));
    for (i, w) in limits.windows.iter().enumerate() {
        if let Some(w) = w {
            debug_assert_eq!(Window::ALL[i], w.window);
            headers.insert(X_LIMIT[i].clone(), HeaderValue::from(w.limit));
            headers.insert(X_REMAINING[i].clone(), HeaderValue::from(w.remaining));
        }
    }
}

/// The headers that `Connection` names: hop-by-hop for this message.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHORIZATION
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

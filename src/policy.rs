//! Network and method policy as pure functions: CIDR matching, the client's address behind
//! trusted proxies, origin matching for publishable keys ([`OriginRule`], parsed when a key is
//! cached, against a request's borrowed [`Origin`]), read-only methods, scopes.
//!
//! No I/O, no state: every function here is a decision on its arguments.

use std::fmt;
use std::net::IpAddr;

use http::Method;
use ipnet::IpNet;

/// `http` or `https`: the schemes an origin may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http`, default port 80.
    Http,
    /// `https`, default port 443.
    Https,
}

/// A request's origin (its `Origin`, or the origin part of its `Referer`), borrowed from the
/// header so that checking it allocates nothing. The host keeps the header's case; matching
/// ignores ASCII case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    scheme: Scheme,
    host: &'a str,
    /// `None` for the scheme's default port, written or not.
    port: Option<u16>,
}

/// One origin a publishable key may be used from, parsed once when the key is cached:
///
/// - `https://example.com[:port]`: exactly that origin;
/// - `https://*.example.com[:port]`: any subdomain of example.com (not the apex), over that
///   scheme and port;
/// - `example.com` (a bare domain, as `network_policy.allowed_domains` may give): that host over
///   http or https, on their default ports only (another port needs a full origin);
/// - `*.example.com`: any subdomain of example.com, likewise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRule {
    /// `None` for a bare domain: http or https.
    scheme: Option<Scheme>,
    /// Lowercase; for a wildcard, the suffix with its dot (`.example.com`).
    host: Box<str>,
    /// Whether `host` is a suffix that every subdomain matches.
    subdomains: bool,
    /// `None` for the default port of the request's scheme.
    port: Option<u16>,
}

// === impl Scheme ===

impl Scheme {
    fn parse(s: &str) -> Option<Scheme> {
        if s.eq_ignore_ascii_case("https") {
            Some(Scheme::Https)
        } else if s.eq_ignore_ascii_case("http") {
            Some(Scheme::Http)
        } else {
            None
        }
    }

    /// `http` or `https`.
    pub const fn name(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    const fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

// === impl Origin ===

impl<'a> Origin<'a> {
    /// An `Origin` header: `scheme://host[:port]`. `None` for anything else, `null` included.
    pub fn parse(header: &'a str) -> Option<Self> {
        let (scheme, authority) = header.trim().trim_end_matches('/').split_once("://")?;
        Origin::from_parts(scheme, authority)
    }

    /// The origin part of a `Referer` URL (`https://a.com/x?y` → `https://a.com`).
    pub fn of_referer(referer: &'a str) -> Option<Self> {
        let (scheme, rest) = referer.trim().split_once("://")?;
        Origin::from_parts(scheme, rest.split(['/', '?', '#']).next()?)
    }

    fn from_parts(scheme: &str, authority: &'a str) -> Option<Self> {
        let (scheme, host, port) = split_origin(scheme, authority)?;
        // A wildcard is for allowed lists; no browser sends one.
        (!host.starts_with("*.")).then_some(Origin { scheme, host, port })
    }
}

// === impl OriginRule ===

impl OriginRule {
    /// An origin (`https://example.com`, `https://*.example.com:8443`) or a bare domain
    /// (`example.com`, `*.example.com`, no port or path); `None` for anything else.
    pub fn parse(s: &str) -> Option<OriginRule> {
        let s = s.trim().trim_end_matches('/');
        let (scheme, host, port) = match s.split_once("://") {
            Some((scheme, authority)) => {
                let (scheme, host, port) = split_origin(scheme, authority)?;
                (Some(scheme), host, port)
            }
            None => (None, valid_host(s).then_some(s)?, None),
        };
        let host = host.to_ascii_lowercase();
        let (host, subdomains) = match host.strip_prefix('*') {
            Some(suffix) => (suffix.into(), true),
            None => (host.into(), false),
        };
        Some(OriginRule {
            scheme,
            host,
            subdomains,
            port,
        })
    }

    /// Whether a request from `origin` is allowed by this rule. No allocation.
    pub fn allows(&self, origin: &Origin<'_>) -> bool {
        let host = origin.host;
        self.scheme.is_none_or(|s| s == origin.scheme)
            && self.port == origin.port
            && if self.subdomains {
                host.len()
                    .checked_sub(self.host.len())
                    .filter(|at| *at > 0)
                    .and_then(|at| host.get(at..))
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(&self.host))
            } else {
                host.eq_ignore_ascii_case(&self.host)
            }
    }

    /// Whether it names a scheme (an origin rather than a bare domain).
    fn is_origin(&self) -> bool {
        self.scheme.is_some()
    }
}

/// The normalised text: lowercase, default port left out, no trailing slash.
impl fmt::Display for OriginRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(scheme) = self.scheme {
            write!(f, "{}://", scheme.name())?;
        }
        if self.subdomains {
            f.write_str("*")?;
        }
        f.write_str(&self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

// === functions ===

/// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Whether `ip` is inside any of `nets`. IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) count as
/// their IPv4 address, since dual-stack listeners report IPv4 clients that way.
pub fn ip_in(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    nets.iter().any(|n| n.contains(&ip))
}

/// `::ffff:a.b.c.d` → `a.b.c.d`; anything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy. Entries that do not
/// parse stop the walk (everything left of them is client-controlled).
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !ip_in(trusted, peer) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded_for.rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !ip_in(trusted, client) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// Normalises an origin for storing: lowercase scheme and host, no trailing slash, default
/// ports removed. `None` unless it is `http(s)://host[:port]` with a valid host name or address;
/// a host may start with `*.` (any subdomain).
pub fn normalize_origin(s: &str) -> Option<String> {
    OriginRule::parse(s)
        .filter(OriginRule::is_origin)
        .map(|rule| rule.to_string())
}

/// Normalises an allowed domain for storing: a bare domain (`example.com`, `*.example.com`)
/// lowercased, or an origin as [`normalize_origin`] does it.
pub fn normalize_domain(s: &str) -> Option<String> {
    OriginRule::parse(s).map(|rule| rule.to_string())
}

/// Whether a request from `origin` is allowed by any of `rules`.
pub fn origin_allowed(rules: &[OriginRule], origin: &Origin<'_>) -> bool {
    rules.iter().any(|rule| rule.allows(origin))
}

/// `scheme` and `host[:port]` checked: the scheme, the host as written, and the port (`None`
/// when it is the scheme's default, written or not).
fn split_origin<'a>(scheme: &str, authority: &'a str) -> Option<(Scheme, &'a str, Option<u16>)> {
    let scheme = Scheme::parse(scheme)?;
    let (host, port) = match authority.rsplit_once(':') {
        // An unbracketed IPv6 address: no port, and `valid_host` refuses it.
        Some((host, _)) if host.contains(':') && !host.ends_with(']') => (authority, None),
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, Some(port.parse::<u16>().ok()?))
        }
        Some(_) => return None,
        None => (authority, None),
    };
    let port = port.filter(|p| *p != scheme.default_port());
    valid_host(host).then_some((scheme, host, port))
}

/// A DNS name (labels of letters, digits and `-`, optionally `*.` first), or a bracketed IPv6
/// or plain IPv4 address.
fn valid_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// GET, HEAD and OPTIONS: the methods a publishable key may use, and that need a route's `read`
/// scope rather than its `write` scope.
pub fn is_read_method(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether a key with `granted` scopes (`None` = full access) holds `needed`.
pub fn has_scope(granted: Option<&[String]>, needed: &str) -> bool {
    granted.is_none_or(|g| g.iter().any(|s| s == needed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| parse_cidr(s).unwrap()).collect()
    }

    #[test]
    fn cidrs_match_v4_and_v6_and_bare_addresses() {
        let n = nets(&["10.0.0.0/8", "2001:db8::/32", "192.168.1.7"]);
        assert!(ip_in(&n, "10.1.2.3".parse().unwrap()));
        assert!(!ip_in(&n, "11.0.0.1".parse().unwrap()));
        assert!(ip_in(&n, "2001:db8::1".parse().unwrap()));
        assert!(!ip_in(&n, "2001:db9::1".parse().unwrap()));
        assert!(ip_in(&n, "192.168.1.7".parse().unwrap()));
        assert!(!ip_in(&n, "192.168.1.8".parse().unwrap()));
        assert!(ip_in(&n, "::ffff:10.9.9.9".parse().unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("nonsense").is_none());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted = nets(&["10.0.0.0/8"]);
        let xff = ["1.2.3.4", "10.0.0.2"];
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_ip("5.5.5.5".parse().unwrap(), xff.iter().copied(), &trusted),
            "5.5.5.5".parse::<IpAddr>().unwrap()
        );
        // A trusted peer: skip trusted hops from the right.
        assert_eq!(
            client_ip("10.0.0.1".parse().unwrap(), xff.iter().copied(), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // A spoofed left-most entry does not win over the first untrusted hop.
        let spoof = ["9.9.9.9", "1.2.3.4"];
        assert_eq!(
            client_ip("10.0.0.1".parse().unwrap(), spoof.iter().copied(), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // No trusted proxies configured: always the peer.
        assert_eq!(
            client_ip("10.0.0.1".parse().unwrap(), xff.iter().copied(), &[]),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn origins_are_normalised() {
        assert_eq!(
            normalize_origin("HTTPS://Example.com:443/").as_deref(),
            Some("https://example.com")
        );
        assert_eq!(
            normalize_origin("http://a.com:8080").as_deref(),
            Some("http://a.com:8080")
        );
        assert_eq!(normalize_origin("a.com"), None);
        for bad in [
            "://x",
            "x://y",
            "https://a b",
            "https://0*",
            "https://a.com:99999",
            "ftp://a.com",
            "https://a/b",
            "https://a.com:",
            "https://a.com:+443",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
        assert_eq!(
            normalize_origin("https://*.b.com").as_deref(),
            Some("https://*.b.com")
        );
        assert_eq!(
            normalize_origin("http://[::1]:8080").as_deref(),
            Some("http://[::1]:8080")
        );
        assert_eq!(
            normalize_origin("http://localhost:3000").as_deref(),
            Some("http://localhost:3000")
        );
        // The port is a number: a default one written with a leading zero is still default.
        assert_eq!(
            normalize_origin("https://a.com:0443").as_deref(),
            Some("https://a.com")
        );
    }

    fn rules(list: &[&str]) -> Vec<OriginRule> {
        list.iter()
            .map(|s| OriginRule::parse(s).unwrap_or_else(|| panic!("{s}")))
            .collect()
    }

    fn allowed(rules: &[OriginRule], origin: &str) -> bool {
        Origin::parse(origin).is_some_and(|o| origin_allowed(rules, &o))
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain_over_their_scheme_and_port() {
        let r = rules(&["https://a.com", "https://*.b.com", "http://c.com:8080"]);
        assert!(allowed(&r, "https://a.com"));
        assert!(allowed(&r, "HTTPS://A.com:443"));
        assert!(!allowed(&r, "http://a.com"));
        assert!(!allowed(&r, "https://a.com:8443"));
        assert!(allowed(&r, "https://x.b.com"));
        assert!(allowed(&r, "https://x.y.B.com"));
        assert!(!allowed(&r, "https://b.com"));
        assert!(!allowed(&r, "https://evilb.com"));
        assert!(!allowed(&r, "https://x.b.com:8443"));
        assert!(allowed(&r, "http://c.com:8080"));
        assert!(!allowed(&r, "http://c.com"));
        // A wildcard is not an origin a request can have.
        assert!(!allowed(&r, "https://*.b.com"));
        assert!(!allowed(&r, "null"));
    }

    #[test]
    fn bare_domains_match_http_and_https_on_default_ports() {
        let r = rules(&["Example.com", "*.example.org"]);
        assert!(allowed(&r, "https://example.com"));
        assert!(allowed(&r, "http://example.com"));
        assert!(allowed(&r, "http://example.com:80"));
        assert!(!allowed(&r, "https://example.com:8443"));
        assert!(!allowed(&r, "https://example.com:80"));
        assert!(!allowed(&r, "https://www.example.com"));
        assert!(!allowed(&r, "https://notexample.com"));
        assert!(allowed(&r, "https://a.example.org"));
        assert!(allowed(&r, "http://a.b.example.org"));
        assert!(!allowed(&r, "https://example.org"));
        for bad in [
            "example.com:8080",
            "example.com/x",
            "*.",
            "*",
            "a.*.com",
            "exa mple.com",
            "",
        ] {
            assert_eq!(OriginRule::parse(bad), None, "{bad}");
        }
        assert_eq!(
            normalize_domain(" *.Example.ORG ").as_deref(),
            Some("*.example.org")
        );
        assert_eq!(
            normalize_domain("https://Example.com:443/").as_deref(),
            Some("https://example.com")
        );
        assert_eq!(normalize_domain("[::1]").as_deref(), Some("[::1]"));
    }

    #[test]
    fn a_referer_gives_its_origin() {
        let r = rules(&["https://a.com:8443"]);
        for referer in [
            "https://a.com:8443/page?x=1",
            "https://a.com:8443?x",
            "https://a.com:8443#top",
        ] {
            assert!(
                Origin::of_referer(referer).is_some_and(|o| origin_allowed(&r, &o)),
                "{referer}"
            );
        }
        assert_eq!(Origin::of_referer("/relative"), None);
        assert_eq!(Origin::of_referer("https://user@a.com/"), None);
    }

    #[test]
    fn read_methods_and_scopes() {
        assert!(is_read_method(&Method::GET));
        assert!(!is_read_method(&Method::POST));
        let granted = vec!["orders:read".to_owned()];
        assert!(has_scope(None, "x"));
        assert!(has_scope(Some(&granted), "orders:read"));
        assert!(!has_scope(Some(&granted), "orders:write"));
    }
}

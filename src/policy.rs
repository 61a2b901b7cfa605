//! Network and method policy as pure functions: CIDR matching, the client's address behind
//! trusted proxies, origin matching for publishable keys, read-only methods, scopes.
//!
//! No I/O, no state: every function here is a decision on its arguments.

use std::net::IpAddr;

use http::Method;
use ipnet::IpNet;

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

/// Normalises an origin for comparison: lowercase scheme and host, no trailing slash, default
/// ports removed. `None` unless it is `http(s)://host[:port]` with a valid host name or address;
/// a host may start with `*.` (any subdomain).
pub fn normalize_origin(s: &str) -> Option<String> {
    let s = s.trim().trim_end_matches('/');
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let mut host = rest.to_ascii_lowercase();
    let (name, port) = match host.rsplit_once(':') {
        Some((name, _)) if !name.ends_with(']') && name.contains(':') => (host.as_str(), None),
        Some((name, port)) => (name, Some(port)),
        None => (host.as_str(), None),
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) || !valid_host(name) {
        return None;
    }
    if (scheme == "https" && host.ends_with(":443")) || (scheme == "http" && host.ends_with(":80"))
    {
        host.truncate(host.rfind(':').unwrap_or(host.len()));
    }
    Some(format!("{scheme}://{host}"))
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

/// The origin part of a `Referer` URL (`https://a.com/x?y` → `https://a.com`).
pub fn origin_of_referer(referer: &str) -> Option<String> {
    let (scheme, rest) = referer.trim().split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    normalize_origin(&format!("{scheme}://{host}"))
}

/// Whether a normalised `origin` is allowed by `allowed` (normalised entries). An entry
/// `https://*.example.com` allows any subdomain of example.com over https (not the apex).
pub fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    allowed.iter().any(|a| {
        if a == origin {
            return true;
        }
        match a.split_once("://*.") {
            Some((scheme, suffix)) => origin
                .strip_prefix(scheme)
                .and_then(|o| o.strip_prefix("://"))
                .is_some_and(|host| {
                    host.len() > suffix.len() + 1
                        && host.ends_with(suffix)
                        && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                }),
            None => false,
        }
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
    fn origins_are_normalised_and_matched() {
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
        assert_eq!(
            origin_of_referer("https://a.com/page?x=1").as_deref(),
            Some("https://a.com")
        );
        let allowed = vec!["https://a.com".to_owned(), "https://*.b.com".to_owned()];
        assert!(origin_allowed(&allowed, "https://a.com"));
        assert!(!origin_allowed(&allowed, "http://a.com"));
        assert!(origin_allowed(&allowed, "https://x.b.com"));
        assert!(!origin_allowed(&allowed, "https://b.com"));
        assert!(!origin_allowed(&allowed, "https://evilb.com"));
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

//! The route table: built once from config, matched per request by host, then longest path
//! prefix. Pure apart from the round-robin counter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use super::pool::Pool;
use crate::config::{RouteAuth, RouteScopes, RouteSettings, Upstream};
use crate::metrics::{Metrics, RouteCounters};

/// One upstream of a route, with what forwarding to it needs, built once.
pub struct Target {
    /// Where it is.
    pub upstream: Upstream,
    /// Its slot in the connection pool (one per distinct authority and TLS client).
    pub slot: usize,
    /// The `Host` header it gets: its own authority.
    pub host: HeaderValue,
}

/// One configured route, ready to serve.
pub struct Route {
    /// Name (metrics label).
    pub name: String,
    host: Option<String>,
    prefix: String,
    targets: Vec<Target>,
    next: AtomicUsize,
    /// Whether a key is needed.
    pub auth: RouteAuth,
    /// Scopes needed by method class.
    pub scopes: RouteScopes,
    /// Remove the prefix before forwarding.
    pub strip_prefix: bool,
    /// Upstream answer deadline.
    pub timeout: Duration,
    /// Upstream body idle deadline, either way.
    pub idle_timeout: Duration,
    /// Credits a passed request spends, unless the upstream answers `X-Tollgate-Cost`.
    pub cost: u32,
    /// Limits counted and shown, nothing refused for them.
    pub shadow: bool,
    /// `requests_total` handles of forwarded requests; shared with each request's record.
    pub counters: Arc<RouteCounters>,
}

/// All routes, most specific first.
pub struct RouteTable {
    routes: Vec<Route>,
}

// === impl RouteTable ===

impl RouteTable {
    /// Builds the table; routes with a host come before routes without, longer prefixes before
    /// shorter ones, so the first match is the best. Each upstream gets its slot in `pool`.
    pub fn new(settings: &[RouteSettings], metrics: &Metrics, pool: &mut Pool) -> Self {
        let mut routes: Vec<Route> = settings
            .iter()
            .map(|r| Route {
                name: r.name.clone(),
                host: r.host.clone(),
                prefix: r.path_prefix.clone(),
                targets: r
                    .upstreams
                    .iter()
                    .map(|u| Target {
                        upstream: u.clone(),
                        slot: pool.slot(
                            &u.authority,
                            r.upstream_tls
                                .as_ref()
                                .filter(|_| u.scheme == http::uri::Scheme::HTTPS),
                        ),
                        host: HeaderValue::from_str(u.authority.as_str())
                            .unwrap_or_else(|_| HeaderValue::from_static("")),
                    })
                    .collect(),
                next: AtomicUsize::new(0),
                auth: r.auth,
                scopes: r.scopes.clone(),
                strip_prefix: r.strip_prefix,
                timeout: r.timeout,
                idle_timeout: r.idle_timeout,
                cost: r.cost,
                shadow: r.shadow,
                counters: Arc::new(metrics.route_counters(&r.name)),
            })
            .collect();
        routes.sort_by(|a, b| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.prefix.len().cmp(&a.prefix.len()))
        });
        RouteTable { routes }
    }

    /// The best route for a host (without port, any case) and path.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            r.host
                .as_deref()
                .is_none_or(|h| host.is_some_and(|got| got.eq_ignore_ascii_case(h)))
                && prefix_matches(&r.prefix, path)
        })
    }
}

// === impl Route ===

impl Route {
    /// The next upstream, round robin.
    pub fn target(&self) -> &Target {
        let n = self.targets.len();
        if n == 1 {
            return &self.targets[0];
        }
        &self.targets[self.next.fetch_add(1, Ordering::Relaxed) % n]
    }

    /// The path to send upstream: the prefix removed when `strip_prefix` is set.
    pub fn upstream_path<'a>(&self, path: &'a str) -> &'a str {
        if !self.strip_prefix {
            return path;
        }
        let rest = path
            .get(self.prefix.trim_end_matches('/').len()..)
            .unwrap_or("");
        if rest.is_empty() {
            "/"
        } else {
            rest
        }
    }
}

/// `/api` matches `/api`, `/api/` and `/api/x` but not `/apix`; a prefix ending in `/` matches
/// anything below it.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix) || path == prefix.trim_end_matches('/');
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The host of a request without its port (case as sent); `None` when absent.
pub fn request_host(authority: Option<&str>) -> Option<&str> {
    let raw = authority?;
    Some(if raw.starts_with('[') {
        raw.split_once(']')
            .map_or(raw, |(h, _)| h)
            .trim_start_matches('[')
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteSettings;

    fn route(name: &str, host: Option<&str>, prefix: &str) -> RouteSettings {
        RouteSettings {
            name: name.to_owned(),
            path_prefix: prefix.to_owned(),
            host: host.map(str::to_owned),
            upstreams: vec![Upstream {
                scheme: http::uri::Scheme::HTTP,
                authority: "127.0.0.1:1".parse().unwrap(),
                base_path: String::new(),
            }],
            auth: RouteAuth::Required,
            scopes: RouteScopes::default(),
            strip_prefix: true,
            timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            cost: 1,
            shadow: false,
            upstream_tls: None,
        }
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let metrics = Metrics::new().unwrap();
        let t = RouteTable::new(
            &[
                route("root", None, "/"),
                route("api", None, "/api"),
                route("v2", None, "/api/v2"),
            ],
            &metrics,
            &mut Pool::new(),
        );
        assert_eq!(t.find(None, "/api/v2/x").unwrap().name, "v2");
        assert_eq!(t.find(None, "/api/v1").unwrap().name, "api");
        assert_eq!(t.find(None, "/api").unwrap().name, "api");
        assert_eq!(t.find(None, "/apix").unwrap().name, "root");
        assert_eq!(t.find(None, "/").unwrap().name, "root");
    }

    #[test]
    fn host_routes_come_first_and_no_match_is_none() {
        let metrics = Metrics::new().unwrap();
        let t = RouteTable::new(
            &[
                route("any", None, "/api"),
                route("a", Some("a.example.com"), "/"),
            ],
            &metrics,
            &mut Pool::new(),
        );
        assert_eq!(t.find(Some("a.example.com"), "/api/x").unwrap().name, "a");
        assert_eq!(t.find(Some("b.example.com"), "/api/x").unwrap().name, "any");
        assert!(t.find(Some("b.example.com"), "/other").is_none());
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        let metrics = Metrics::new().unwrap();
        let t = RouteTable::new(&[route("api", None, "/api")], &metrics, &mut Pool::new());
        let r = t.find(None, "/api/x").unwrap();
        assert_eq!(r.upstream_path("/api/x"), "/x");
        assert_eq!(r.upstream_path("/api"), "/");
    }

    #[test]
    fn hosts_lose_their_port_and_match_in_any_case() {
        let metrics = Metrics::new().unwrap();
        let t = RouteTable::new(
            &[route("a", Some("a.example.com"), "/")],
            &metrics,
            &mut Pool::new(),
        );
        assert_eq!(t.find(Some("A.Example.COM"), "/").unwrap().name, "a");
        assert_eq!(
            request_host(Some("API.example.com:8080")),
            Some("API.example.com")
        );
        assert_eq!(request_host(Some("[::1]:80")), Some("::1"));
        assert_eq!(request_host(None), None);
    }
}

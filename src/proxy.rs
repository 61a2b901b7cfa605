//! The proxy listener's request path, as plain functions called in order from [`Proxy::handle`]:
//!
//! ```text
//! route ─► credential ─► cache lookup ─► authorize (state, network, scope, limits)
//!       ─► forward (headers, streamed bodies, deadline) ─► limit headers ─► record
//! ```
//!
//! Every refusal is a [`Refusal`] turned into a response in one place ([`Proxy::refuse`]).
//! Requests identified to a key are metered whatever their outcome. Must not touch the store
//! except through the key cache, and never imports `admin`.

pub mod arena;
pub mod body;
pub mod forward;
pub mod headers;
pub mod pool;
pub mod record;
pub mod route;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use quanta::Instant;

use crate::auth::cache::{Cached, KeyCache, KeyRef, Lookup};
use crate::auth::{self, extract, RequestFacts};
use crate::config::{RouteAuth, Settings};
use crate::credential::{self, KeyHash, Kind};
use crate::limits::LimitSnapshot;
use crate::metering::{Meter, Outcome};
use crate::metrics::Metrics;
use crate::policy;
use crate::refusal::Refusal;
use crate::target::{self, TargetError};
use body::{RequestBody, ResponseBody, UsageSink};
use headers::{Forwarding, IdentityNames};
use pool::Pool;
use record::Record;
use route::{Route, RouteTable};

/// What the proxy answers with: the upstream's streamed body, or one of ours.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// Everything the request path reads, built once.
pub struct Proxy {
    routes: RouteTable,
    cache: Arc<KeyCache>,
    meter: Arc<Meter>,
    metrics: Arc<Metrics>,
    upstreams: forward::Upstreams,
    names: IdentityNames,
    trusted_proxies: Vec<IpNet>,
    max_body_bytes: u64,
}

/// What the target check decided, for the steps after it.
#[derive(Clone, Copy)]
struct Checked<'a> {
    /// The host the request is for (authority, else `Host`), for `X-Forwarded-Host`.
    host: Option<&'a HeaderValue>,
    /// The normalised path when it differs from the request's (what is matched is forwarded).
    path: Option<&'a str>,
}

/// A request identified to a key, for metering whatever happens next.
struct Identified {
    key: KeyRef,
    now_ms: i64,
}

// === impl Proxy ===

impl Proxy {
    /// Builds the proxy from settings and the shared state.
    pub fn new(
        settings: &Settings,
        cache: Arc<KeyCache>,
        meter: Arc<Meter>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, http::header::InvalidHeaderName> {
        let mut pool = Pool::new();
        let routes = RouteTable::new(&settings.routes, &metrics, &mut pool);
        Ok(Proxy {
            routes,
            cache,
            meter,
            metrics,
            upstreams: forward::Upstreams::new(pool),
            names: IdentityNames::new(&settings.identity.header_prefix)?,
            trusted_proxies: settings.proxy.trusted_proxies.clone(),
            max_body_bytes: settings.proxy.max_body_bytes,
        })
    }

    /// Serves one request from a client at `peer`.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        // An HTTP/1 request whose body the gateway refuses without reading leaves that body in
        // the connection; hyper then closes it after the answer, so the answer says so, or the
        // client's next request on it would be lost.
        let body_left = req.version() < http::Version::HTTP_2 && !req.body().is_end_stream();
        let mut response = self.serve(req, peer).await;
        if body_left && matches!(response.body(), Either::Right(_)) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    async fn serve(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let (host_value, normalised) = match checked_target(&req) {
            Ok(checked) => checked,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "request target refused");
                let refusal = match e {
                    TargetError::MethodNotAllowed => Refusal::MethodNotAllowed,
                    _ => Refusal::BadRequest,
                };
                return self.refuse("-", refusal, None, None);
            }
        };
        let path = normalised.as_deref().unwrap_or(req.uri().path());
        let host = route::request_host(host_value.as_ref().and_then(|v| v.to_str().ok()));
        let Some(route) = self.routes.find(host, path) else {
            return self.refuse("-", Refusal::NoRoute, None, None);
        };
        let target = Checked {
            host: host_value.as_ref(),
            path: normalised.as_deref(),
        };
        let response = match route.auth {
            RouteAuth::Public => self.forward(route, req, peer, target, None).await,
            RouteAuth::Required => self.keyed(route, req, peer, target).await,
        };
        self.metrics
            .request_duration
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn keyed(
        &self,
        route: &Route,
        req: Request<Incoming>,
        peer: SocketAddr,
        target: Checked<'_>,
    ) -> Response<ProxyBody> {
        let Some(presented) = extract::credential(req.headers()) else {
            return self.refuse(&route.name, Refusal::MissingCredential, None, None);
        };
        let key = match self.authenticate(&presented.raw).await {
            Ok(key) => key,
            Err(refusal) => return self.refuse(&route.name, refusal, None, None),
        };
        let now_ms = self.meter.clock().now_ms_near(key.expires_at_ms);
        let identified = Identified { key, now_ms };
        let client_ip = self.client_ip(peer, req.headers());
        let headers = req.headers();
        let facts = RequestFacts {
            method: req.method(),
            client_ip,
            origin: headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
            referer: headers.get(header::REFERER).and_then(|v| v.to_str().ok()),
            scopes: &route.scopes,
            now_ms,
        };
        let permit = match auth::decide(&identified.key, &facts).await {
            Ok(permit) => permit,
            Err((refusal, limits)) => {
                return self.refuse(&route.name, refusal, Some(&identified), limits.as_ref());
            }
        };
        let mut response = self
            .forward(
                route,
                req,
                peer,
                target,
                Some((&identified, presented.source)),
            )
            .await;
        headers::add_limit_headers(response.headers_mut(), &permit.key.identity, &permit.limits);
        response
    }

    /// Memory first, then format and checksum, then the store: a malformed credential is
    /// refused without a store read. A key that memory holds was well-formed when it was issued
    /// (its hash matches), so the format check is skipped for it, as is the clock for a fresh
    /// entry.
    async fn authenticate(&self, raw: &str) -> Result<KeyRef, Refusal> {
        let hash = KeyHash::of(raw);
        let cached = match self.cache.cached(&hash) {
            Cached::Fresh(Lookup::Found(key)) => return Ok(key),
            cached => cached,
        };
        match credential::parse(raw) {
            Ok(Kind::Secret | Kind::Publishable) => {}
            Ok(Kind::ClientSecret | Kind::AccessToken | Kind::Master) | Err(_) => {
                return Err(Refusal::InvalidCredential)
            }
        }
        match self.cache.get_after(&hash, cached).await {
            Lookup::Found(key) => Ok(key),
            Lookup::NotFound => Err(Refusal::InvalidCredential),
            Lookup::Unavailable => Err(Refusal::StoreUnavailable),
        }
    }

    fn client_ip(&self, peer: SocketAddr, headers: &http::HeaderMap) -> std::net::IpAddr {
        if self.trusted_proxies.is_empty() {
            return policy::canonical(peer.ip());
        }
        let xff = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','));
        policy::client_ip(peer.ip(), xff, &self.trusted_proxies)
    }

    async fn forward(
        &self,
        route: &Route,
        req: Request<Incoming>,
        peer: SocketAddr,
        checked: Checked<'_>,
        key: Option<(&Identified, extract::Source)>,
    ) -> Response<ProxyBody> {
        let identified = key.map(|(i, _)| i);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            return self.refuse(&route.name, Refusal::BodyTooLarge, identified, None);
        }
        let (mut parts, body) = req.into_parts();
        let client_version = parts.version;
        let target = route.target();
        let Ok(uri) =
            forward::upstream_uri(route, target, checked.path, parts.uri.path_and_query())
        else {
            return self.refuse(&route.name, Refusal::NoRoute, identified, None);
        };
        // WebSocket upgrades: the client's side of the tunnel, once upstream agrees. Any other
        // upgrade (h2c above all: a tunnel past the gateway) is not passed on.
        let upgrade = headers::requested_upgrade(&parts.headers)
            .map(|protocol| (protocol, parts.extensions.remove::<OnUpgrade>()));
        let peer_trusted = policy::ip_in(&self.trusted_proxies, peer.ip());
        let fwd = Forwarding {
            peer: policy::canonical(peer.ip()),
            peer_trusted,
            host: checked.host,
            credential: key.map(|(_, source)| source),
        };
        let mut upstream_headers = parts.headers;
        headers::prepare_upstream_headers(
            &mut upstream_headers,
            &self.names,
            &fwd,
            identified.map(|i| &i.key.identity),
        );
        upstream_headers.insert(header::HOST, target.host.clone());
        if let Some((protocol, _)) = &upgrade {
            headers::ask_upgrade(&mut upstream_headers, protocol.clone());
        }
        let sink = |i: &Identified| UsageSink {
            cell: Arc::clone(&i.key.usage),
            clock: self.meter.clock().clone(),
        };
        let mut upstream_req = Request::new(RequestBody::new(
            body,
            self.max_body_bytes,
            route.idle_timeout,
            identified.map(sink),
        ));
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() = uri;
        *upstream_req.headers_mut() = upstream_headers;
        // From here the request counts whatever its client does: if the client leaves while the
        // upstream works, this future is dropped and the record counts it then.
        let mut record = Record::new(
            Arc::clone(&route.counters),
            identified.map(|i| (sink(i), i.now_ms)),
        );
        let sent = Instant::now();
        let forward::Answer { mut response, conn } =
            match self.upstreams.send(route, target, upstream_req).await {
                Ok(answer) => answer,
                Err(refusal) => {
                    record.refused();
                    return self.refuse(&route.name, refusal, identified, None);
                }
            };
        self.metrics
            .upstream_duration
            .observe(sent.elapsed().as_secs_f64());
        let status = response.status();
        let switching = status == http::StatusCode::SWITCHING_PROTOCOLS;
        record.answered(status.as_u16());
        let record = if switching {
            match upgrade {
                Some((_, Some(client))) => {
                    let upstream = hyper::upgrade::on(&mut response);
                    tokio::spawn(tunnel(client, upstream, identified.map(sink)));
                    record.finish();
                    None
                }
                // 101 to a request that asked for no upgrade (or one that cannot be upgraded).
                _ => {
                    record.refused();
                    return self.refuse(
                        &route.name,
                        Refusal::UpstreamUnavailable,
                        identified,
                        None,
                    );
                }
            }
        } else {
            Some(record)
        };
        let (mut parts, body) = response.into_parts();
        // The answer goes out in the client's version, not the upstream's (an HTTP/1.0 upstream
        // must not turn a keep-alive HTTP/1.1 client connection into a closing 1.0 one).
        parts.version = client_version;
        headers::clean_response_headers(&mut parts.headers, switching);
        Response::from_parts(
            parts,
            Either::Left(ResponseBody::new(body, route.idle_timeout, record, conn)),
        )
    }

    /// The one place a refusal becomes a response: counted, metered when a key was identified,
    /// and given limit headers when it is a 429.
    fn refuse(
        &self,
        route: &str,
        refusal: Refusal,
        identified: Option<&Identified>,
        limits: Option<&LimitSnapshot>,
    ) -> Response<ProxyBody> {
        let (status, code) = refusal.status_and_code();
        self.metrics.refused(route, code, status.as_u16());
        if let Refusal::RateLimited { window, .. } = refusal {
            self.metrics
                .rate_limited_total
                .with_label_values(&[window.name()])
                .inc();
        }
        if let Some(i) = identified {
            i.key.usage.record(
                i.now_ms,
                Outcome {
                    status: status.as_u16(),
                },
            );
        }
        let mut response = refusal.to_response().map(Either::Right);
        if let (Some(limits), Some(i)) = (limits, identified) {
            headers::add_limit_headers(response.headers_mut(), &i.key.identity, limits);
        }
        response
    }
}

/// Method, host and path of a request, checked (`target`): the host it is for and its path
/// when normalising changed it.
fn checked_target(
    req: &Request<Incoming>,
) -> Result<(Option<HeaderValue>, Option<String>), TargetError> {
    target::check_method(req.method())?;
    let host = target::request_host(req.uri(), req.version(), req.headers())?;
    let path = match target::normalise(req.uri().path())? {
        Cow::Borrowed(_) => None,
        Cow::Owned(p) => Some(p),
    };
    Ok((host, path))
}

/// Joins an upgraded client connection to the upgraded upstream one until either side closes;
/// the bytes that pass count as the key's bytes in and out.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, sink: Option<UsageSink>) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            if let Some(sink) = sink {
                sink.cell.record_bytes(sink.clock.now_ms(), sent, received);
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
    }
}

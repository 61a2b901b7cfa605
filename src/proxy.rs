//! The proxy listener's request path, as named stages called in order from [`Proxy::serve`]
//! (`identify` and `authorize` on keyed routes only):
//!
//! ```text
//! check_target ─► route ─► identify ─► authorize ─► limit_body ─► upstream_request ─► send
//!              ─► respond ─► record
//! ```
//!
//! In pingora's terms, `check_target` to `limit_body` are the `request_filter`, `route` picks
//! the `upstream_peer`, `upstream_request` is the `upstream_request_filter`, `respond` the
//! `response_filter`, and `record` the `logging` phase that every request passes.
//!
//! A stage returns what the next needs or a [`Refusal`], which skips the rest but `record`.
//! There a refusal becomes its response and is counted from the request's [`Ticket`] (route and
//! key as far as they were known); a request that went upstream is counted by its
//! [`Record`](record::Record), which travels with the response body. Must not touch the store
//! except through the key cache, and never imports `admin`.

pub mod arena;
pub mod body;
pub mod forward;
pub mod headers;
pub mod pool;
pub mod record;
pub mod route;
pub mod signed;
pub mod tunnel;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use ipnet::IpNet;
use quanta::Instant;

use crate::auth::cache::{Cached, KeyCache, KeyRef, Lookup};
use crate::auth::{self, extract, RequestFacts};
use crate::config::{LimitHeaders, RouteAuth, Settings, MAX_COST};
use crate::credential::{self, KeyHash, Kind};
use crate::metering::Meter;
use crate::metrics::Metrics;
use crate::policy;
use crate::refusal::Refusal;
use crate::target::{self, TargetError};
use body::{RequestBody, ResponseBody};
use headers::{Forwarding, IdentityNames};
use pool::Pool;
use record::{Identified, Record, Ticket};
use route::{Route, RouteTable, Target};
use tunnel::Tunnels;

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
    /// The listener serves TLS (`X-Forwarded-Proto: https`).
    tls: bool,
    /// Signs `X-Tollgate-Identity` when `identity.signing_secret_env` is set.
    signer: Option<signed::Signer>,
    /// `limits.headers`: the styles of limit headers keyed responses carry.
    limit_headers: LimitHeaders,
    /// `proxy.expose_account_api`: `/v1/account…` on this listener goes to the account API
    /// (routed by `app`, which alone knows both edges).
    expose_account_api: bool,
    /// The WebSocket tunnels open, kept across reloads.
    tunnels: Arc<Tunnels>,
}

/// What the target check found, for the stages after it.
struct Checked {
    /// The host the request is for (authority, else `Host`), for `X-Forwarded-Host`.
    host: Option<HeaderValue>,
    /// The normalised path when it differs from the request's (what is matched is forwarded).
    path: Option<String>,
}

/// The request as it goes upstream.
struct Outgoing<'r> {
    request: Request<RequestBody>,
    /// The route's upstream it goes to, picked once.
    target: &'r Target,
}

/// What the answer needs from the client's request.
struct Client {
    /// The HTTP version the answer goes out in.
    version: http::Version,
    /// The WebSocket protocol asked for, with the client's side of the tunnel when hyper can
    /// upgrade the connection.
    upgrade: Option<(HeaderValue, Option<OnUpgrade>)>,
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
        let tunnels = Arc::new(Tunnels::default());
        Self::build(settings, cache, meter, metrics, Pool::new(), tunnels)
    }

    /// The proxy of a reloaded config, over the same shared state. Its connection pool
    /// continues this one's, so upstreams that did not change keep their idle connections.
    pub fn reloaded(&self, settings: &Settings) -> Result<Self, http::header::InvalidHeaderName> {
        Self::build(
            settings,
            Arc::clone(&self.cache),
            Arc::clone(&self.meter),
            Arc::clone(&self.metrics),
            self.upstreams.pool().continued(),
            Arc::clone(&self.tunnels),
        )
    }

    fn build(
        settings: &Settings,
        cache: Arc<KeyCache>,
        meter: Arc<Meter>,
        metrics: Arc<Metrics>,
        mut pool: Pool,
        tunnels: Arc<Tunnels>,
    ) -> Result<Self, http::header::InvalidHeaderName> {
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
            tls: settings.proxy.tls.is_some(),
            expose_account_api: settings.proxy.expose_account_api,
            limit_headers: settings.limits.headers,
            tunnels,
            signer: match &settings.identity.signing {
                Some(signing) => Some(signed::Signer::new(
                    &signing.secret,
                    signing.ttl,
                    http::HeaderName::from_bytes(
                        format!("{}identity", settings.identity.header_prefix)
                            .to_ascii_lowercase()
                            .as_bytes(),
                    )?,
                )),
                None => None,
            },
        })
    }

    /// The WebSocket tunnels this proxy (and every proxy reloaded from it) opened; the
    /// shutdown closes them once the listeners have drained.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Whether `/v1/account…` on the proxy listener is the account API's.
    pub fn exposes_account_api(&self) -> bool {
        self.expose_account_api
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

    /// The stages, in order; the first refusal skips to `record`.
    async fn serve(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let mut ticket = Ticket::default();
        let outcome = async {
            let checked = check_target(&req, peer)?;
            let route = self.route(&req, &checked)?;
            ticket.routed(route);
            match route.auth {
                RouteAuth::Public => {}
                RouteAuth::Required => {
                    let identified = self.identify(&req, &mut ticket).await?;
                    self.authorize(&req, peer, route, identified).await?;
                }
            }
            self.limit_body(&req)?;
            let (outgoing, client) = self.upstream_request(route, req, peer, &checked, &ticket)?;
            let (mut answer, record) = self.send(route, outgoing, &ticket).await?;
            self.charge(route, &mut answer.response, &ticket);
            respond(route, answer, record, client, &self.tunnels)
        }
        .await;
        self.record(&ticket, outcome, started)
    }

    /// The route for the request's host and (normalised) path.
    fn route(&self, req: &Request<Incoming>, checked: &Checked) -> Result<&Route, Refusal> {
        let path = checked.path.as_deref().unwrap_or(req.uri().path());
        let host = route::request_host(checked.host.as_ref().and_then(|v| v.to_str().ok()));
        self.routes.find(host, path).ok_or(Refusal::NoRoute)
    }

    /// The key the request's credential names; the request is metered under it from here on,
    /// refused or not.
    async fn identify<'t>(
        &self,
        req: &Request<Incoming>,
        ticket: &'t mut Ticket<'_>,
    ) -> Result<&'t mut Identified, Refusal> {
        let presented = extract::credential(req.headers()).ok_or(Refusal::MissingCredential)?;
        let key = self.authenticate(&presented.raw).await?;
        let now_ms = self.meter.clock().now_ms_near(key.expires_at_ms);
        Ok(ticket.identified(key, now_ms, presented.source))
    }

    /// Memory first, then format and checksum, then the store: a malformed credential is
    /// refused without a store read. A key that memory holds was well-formed when it was issued
    /// (its hash matches), so the format check is skipped for it, as is the clock for a fresh
    /// entry. While the store holds imported keys (contract 5a), whose raw form has no checksum,
    /// a credential that fails it is looked up like any other; whether it does is a flag in
    /// memory ([`KeyCache::admits_unchecked`]), so without imported keys a malformed credential
    /// still costs no store read. An overlong one never gets as far as the hash.
    async fn authenticate(&self, raw: &str) -> Result<KeyRef, Refusal> {
        if raw.len() > credential::MAX_PRESENTED_LEN {
            return Err(Refusal::InvalidCredential);
        }
        let hash = KeyHash::of(raw);
        let cached = match self.cache.cached(&hash) {
            Cached::Fresh(Lookup::Found(key)) => return Ok(key),
            cached => cached,
        };
        match credential::parse(raw) {
            Ok(Kind::Secret | Kind::Publishable | Kind::AccessToken) => {}
            Ok(Kind::ClientSecret | Kind::Master) => return Err(Refusal::InvalidCredential),
            Err(_) if self.cache.admits_unchecked() => {}
            Err(_) => return Err(Refusal::InvalidCredential),
        }
        match self.cache.get_after(&hash, cached).await {
            Lookup::Found(key) => Ok(key),
            Lookup::NotFound => Err(Refusal::InvalidCredential),
            Lookup::Unavailable => Err(Refusal::StoreUnavailable),
        }
    }

    /// The one decision ([`auth::decide`]): state, network, scope, limits. The windows it spent
    /// from, or that refused the request, go on the answer.
    async fn authorize(
        &self,
        req: &Request<Incoming>,
        peer: SocketAddr,
        route: &Route,
        identified: &mut Identified,
    ) -> Result<(), Refusal> {
        let headers = req.headers();
        let facts = RequestFacts {
            method: req.method(),
            client_ip: self.client_ip(peer, headers),
            origin: headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
            referer: headers.get(header::REFERER).and_then(|v| v.to_str().ok()),
            scopes: &route.scopes,
            shadow: route.shadow,
            cost: route.cost,
            required_scope: None,
            now_ms: identified.now_ms,
        };
        let (limits, decided) = match auth::decide(&identified.key, &facts).await {
            Ok(permit) => {
                if let Some(window) = permit.shadowed {
                    self.metrics.rate_limited(window.name(), true);
                }
                (Some(permit.limits), Ok(()))
            }
            Err((refusal, limits)) => (limits, Err(refusal)),
        };
        identified.limits = limits;
        decided
    }

    fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> std::net::IpAddr {
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

    /// A declared body over `max_body_bytes` is refused before anything goes upstream (a
    /// chunked one is cut by [`RequestBody`] as it streams).
    fn limit_body(&self, req: &Request<Incoming>) -> Result<(), Refusal> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(n) if n > self.max_body_bytes => Err(Refusal::BodyTooLarge),
            _ => Ok(()),
        }
    }

    /// The request to send upstream: one of the route's upstreams, the rewritten URI, the
    /// prepared headers, and the client's body, bounded and counted as it streams.
    fn upstream_request<'r>(
        &self,
        route: &'r Route,
        req: Request<Incoming>,
        peer: SocketAddr,
        checked: &Checked,
        ticket: &Ticket<'_>,
    ) -> Result<(Outgoing<'r>, Client), Refusal> {
        let (mut parts, body) = req.into_parts();
        let target = route.target();
        let path = checked.path.as_deref();
        let uri = forward::upstream_uri(route, target, path, parts.uri.path_and_query())
            .map_err(|_| Refusal::NoRoute)?;
        // WebSocket upgrades: the client's side of the tunnel, once upstream agrees. Any other
        // upgrade (h2c above all: a tunnel past the gateway) is not passed on.
        let upgrade = headers::requested_upgrade(&parts.headers)
            .map(|protocol| (protocol, parts.extensions.remove::<OnUpgrade>()));
        let protocol = upgrade.as_ref().map(|(protocol, _)| protocol);
        let headers = self.upstream_headers(parts.headers, peer, checked, ticket, target, protocol);
        let sink = ticket.usage_sink(self.meter.clock());
        let body = RequestBody::new(body, self.max_body_bytes, route.idle_timeout, sink);
        let mut request = Request::new(body);
        *request.method_mut() = parts.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let client = Client {
            version: parts.version,
            upgrade,
        };
        Ok((Outgoing { request, target }, client))
    }

    /// The client's headers made the upstream's: hop-by-hop and credential headers out,
    /// forwarding and identity headers in, the target's `Host`, and the upgrade asked for.
    fn upstream_headers(
        &self,
        mut headers: HeaderMap,
        peer: SocketAddr,
        checked: &Checked,
        ticket: &Ticket<'_>,
        target: &Target,
        upgrade: Option<&HeaderValue>,
    ) -> HeaderMap {
        let fwd = Forwarding {
            peer: policy::canonical(peer.ip()),
            peer_trusted: policy::ip_in(&self.trusted_proxies, peer.ip()),
            host: checked.host.as_ref(),
            credential: ticket.key().map(|i| i.source),
            tls: self.tls,
        };
        let identity = ticket.key().map(|i| i.key.identity());
        headers::prepare_upstream_headers(&mut headers, &self.names, &fwd, identity);
        if let (Some(signer), Some(key)) = (&self.signer, ticket.key()) {
            let now_secs = u64::try_from(key.now_ms / 1000).unwrap_or(0);
            headers.insert(
                signer.name.clone(),
                signer.sign(key.key.identity(), now_secs),
            );
        }
        headers.insert(header::HOST, target.host.clone());
        if let Some(protocol) = upgrade {
            headers::ask_upgrade(&mut headers, protocol.clone());
        }
        headers
    }

    /// Sends the request and waits for the upstream's head. The request's record is made first:
    /// from here it is counted whatever its client does (a client that leaves while the upstream
    /// works has this future dropped, and the record counts it then).
    async fn send(
        &self,
        route: &Route,
        outgoing: Outgoing<'_>,
        ticket: &Ticket<'_>,
    ) -> Result<(forward::Answer, Record), Refusal> {
        let mut record = ticket.forwarding(route, self.meter.clock());
        let sent = Instant::now();
        let Outgoing { request, target } = outgoing;
        match self.upstreams.send(route, target, request).await {
            Ok(answer) => {
                self.metrics
                    .upstream_duration
                    .observe(sent.elapsed().as_secs_f64());
                record.answered(answer.response.status().as_u16());
                Ok((answer, record))
            }
            Err(refusal) => {
                record.refused();
                Err(refusal)
            }
        }
    }

    /// The upstream's `X-Tollgate-Cost: N` (never passed on) makes the request cost N credits
    /// instead of the route's `cost`: the difference is settled on the key's lease. A value that
    /// is not a whole number from 0 to [`MAX_COST`] is ignored.
    fn charge<B>(&self, route: &Route, response: &mut Response<B>, ticket: &Ticket<'_>) {
        let Some(declared) = response.headers_mut().remove(self.names.cost()) else {
            return;
        };
        let Some(lease) = ticket.key().and_then(|i| i.key.credits.as_ref()) else {
            return;
        };
        match declared
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|n| *n <= MAX_COST)
        {
            Some(n) => lease.adjust(route.cost, n),
            None => {
                tracing::debug!(route = %route.name, value = ?declared, "upstream cost ignored")
            }
        }
    }

    /// Every answer passes here, like pingora's `logging` phase. A refusal becomes its response
    /// and is counted from the ticket; a forwarded answer carries its record, which counts it.
    /// Once the key's windows were checked, their limit headers go on the answer either way.
    fn record(
        &self,
        ticket: &Ticket<'_>,
        outcome: Result<Response<ProxyBody>, Refusal>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let mut response = outcome.unwrap_or_else(|refusal| {
            ticket.refused(&self.metrics, refusal);
            refusal.to_response().map(Either::Right)
        });
        if let Some(Identified {
            key,
            limits: Some(limits),
            ..
        }) = ticket.key()
        {
            headers::add_limit_headers(
                response.headers_mut(),
                self.limit_headers,
                &key.identity,
                limits,
            );
        }
        // A request that matched no route is not timed: it never reached a route's work.
        if ticket.route().is_some() {
            self.metrics
                .request_duration
                .observe(started.elapsed().as_secs_f64());
        }
        response
    }
}

/// The request target, checked before anything else reads it ([`target`]): the method, the one
/// host it is for, and its path when normalising changed it.
fn check_target(req: &Request<Incoming>, peer: SocketAddr) -> Result<Checked, Refusal> {
    let refuse = |e: TargetError| {
        tracing::debug!(%peer, error = %e, "request target refused");
        match e {
            TargetError::MethodNotAllowed => Refusal::MethodNotAllowed,
            _ => Refusal::BadRequest,
        }
    };
    target::check_method(req.method()).map_err(refuse)?;
    let host = target::request_host(req.uri(), req.version(), req.headers()).map_err(refuse)?;
    let path = match target::normalise(req.uri().path()).map_err(refuse)? {
        Cow::Borrowed(_) => None,
        Cow::Owned(p) => Some(p),
    };
    Ok(Checked { host, path })
}

/// The upstream's answer made the client's: a 101 becomes a tunnel, anything else streams back
/// with the record; hop-by-hop headers go, and the client's HTTP version is kept (an HTTP/1.0
/// upstream must not turn a keep-alive HTTP/1.1 client connection into a closing 1.0 one).
fn respond(
    route: &Route,
    answer: forward::Answer,
    record: Record,
    client: Client,
    tunnels: &Tunnels,
) -> Result<Response<ProxyBody>, Refusal> {
    let forward::Answer { mut response, conn } = answer;
    let switching = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let record = if switching {
        tunnels.open(&mut response, record, client.upgrade, route.idle_timeout)?;
        None
    } else {
        Some(record)
    };
    let (mut parts, body) = response.into_parts();
    parts.version = client.version;
    headers::clean_response_headers(&mut parts.headers, switching);
    let body = ResponseBody::new(body, route.idle_timeout, record, conn);
    Ok(Response::from_parts(parts, Either::Left(body)))
}

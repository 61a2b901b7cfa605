//! Sending a request upstream: the pooled keep-alive client, the upstream URI, the route's
//! deadline, and what a failure means (502, 504, or 413 when our own body limit tripped).

use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::{is_body_too_large, RequestBody};
use super::route::Route;
use crate::refusal::Refusal;

/// The upstream client: HTTP/1.1 keep-alive connections pooled per upstream.
pub struct Upstreams {
    client: Client<HttpConnector, RequestBody>,
}

// === impl Upstreams ===

impl Upstreams {
    /// A client with keep-alive pooling and TCP_NODELAY.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        Upstreams { client }
    }

    /// Sends `req` and waits for the response head within the route's timeout.
    pub async fn send(
        &self,
        route: &Route,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, Refusal> {
        match tokio::time::timeout(route.timeout, self.client.request(req)).await {
            Err(_) => Err(Refusal::UpstreamTimeout),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                if is_body_too_large(&e) {
                    Err(Refusal::BodyTooLarge)
                } else {
                    tracing::debug!(route = %route.name, error = %e, "upstream request failed");
                    Err(Refusal::UpstreamUnavailable)
                }
            }
        }
    }
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::new()
    }
}

/// The absolute upstream URI for a request path and query.
pub fn upstream_uri(route: &Route, original: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
    let upstream = route.upstream();
    let path = original.map_or("/", PathAndQuery::path);
    let forwarded_path = route.upstream_path(path);
    let path_and_query = if upstream.base_path.is_empty() && forwarded_path.len() == path.len() {
        // The common case: the client's path and query, unchanged, without a copy.
        original
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    } else {
        let query = original.and_then(PathAndQuery::query);
        let mut s = String::with_capacity(
            upstream.base_path.len() + forwarded_path.len() + query.map_or(0, |q| q.len() + 1),
        );
        s.push_str(&upstream.base_path);
        s.push_str(forwarded_path);
        if let Some(q) = query {
            s.push('?');
            s.push_str(q);
        }
        PathAndQuery::try_from(s)?
    };
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
}

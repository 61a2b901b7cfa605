//! Sending a request upstream: a connection from the pool, the upstream path, the route's
//! deadline, the one retry on a kept-alive connection that closed before the request went out,
//! and what a failure means (502, 504, or 413 when our own body limit tripped).

use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use hyper::body::Incoming;

use super::body::{caused_by, BodyTooLarge, ClientBodyError, RequestBody};
use super::headers;
use super::pool::{Checkin, Pool};
use super::route::{Route, Target};
use crate::refusal::Refusal;

/// Requests go out on at most this many idle connections before a fresh one is made: an idle
/// connection can have been closed by the upstream just as the request was written.
const REUSE_ATTEMPTS: usize = 3;

/// The upstream side of the proxy.
pub struct Upstreams {
    pool: Pool,
}

/// An upstream's answer, with its connection to give back once the body has been read.
pub struct Answer {
    /// Response head and streaming body.
    pub response: Response<Incoming>,
    /// The connection, unless it was upgraded or cannot be reused.
    pub conn: Option<Checkin>,
}

// === impl Upstreams ===

impl Upstreams {
    /// Over `pool`, whose slots the route table has numbered.
    pub fn new(pool: Pool) -> Self {
        Upstreams { pool }
    }

    /// The connection pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Sends `req` to `target` and waits for the response head within the route's timeout.
    /// `req` has an origin-form URI and its `Host`.
    pub async fn send(
        &self,
        route: &Route,
        target: &Target,
        req: Request<RequestBody>,
    ) -> Result<Answer, Refusal> {
        match tokio::time::timeout(route.timeout, self.exchange(target, req)).await {
            Err(_) => Err(Refusal::UpstreamTimeout),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                if caused_by::<BodyTooLarge>(&*e) {
                    Err(Refusal::BodyTooLarge)
                } else if caused_by::<ClientBodyError>(&*e) {
                    tracing::debug!(route = %route.name, error = %e, "client body failed");
                    Err(Refusal::BadRequest)
                } else {
                    tracing::debug!(route = %route.name, error = %e, "upstream request failed");
                    Err(Refusal::UpstreamUnavailable)
                }
            }
        }
    }

    async fn exchange(
        &self,
        target: &Target,
        mut req: Request<RequestBody>,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        let mut attempts = 0;
        loop {
            let mut conn = self.pool.checkout(target.slot).await?;
            attempts += 1;
            match conn.sender.try_send_request(req).await {
                Ok(response) => {
                    // An upgraded connection belongs to the upgrade; a response that asks for
                    // the connection to close cannot be followed by another request.
                    let reusable = response.status() != http::StatusCode::SWITCHING_PROTOCOLS
                        && !headers::connection_has(response.headers(), "close");
                    let conn = reusable.then(|| conn.into_checkin());
                    return Ok(Answer { response, conn });
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the kept-alive connection was closing. Another one may do.
                    Some(unsent) if !conn.fresh && attempts < REUSE_ATTEMPTS => req = unsent,
                    _ => return Err(Box::new(e.into_error())),
                },
            }
        }
    }
}

/// The origin-form URI to send upstream: the target's base path, the route's path (prefix
/// stripped when configured; `normalised` when the check changed the request's) and the query.
pub fn upstream_uri(
    route: &Route,
    target: &Target,
    normalised: Option<&str>,
    original: Option<&PathAndQuery>,
) -> Result<Uri, http::Error> {
    let base = &target.upstream.base_path;
    let path = normalised.unwrap_or_else(|| original.map_or("/", PathAndQuery::path));
    let forwarded_path = route.upstream_path(path);
    let unchanged = normalised.is_none() && forwarded_path.len() == path.len();
    let path_and_query = if base.is_empty() && unchanged {
        // The common case: the client's path and query, unchanged, without a copy.
        original
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    } else {
        let query = original.and_then(PathAndQuery::query);
        let mut s = String::with_capacity(
            base.len() + forwarded_path.len() + query.map_or(0, |q| q.len() + 1),
        );
        s.push_str(base);
        s.push_str(forwarded_path);
        if let Some(q) = query {
            s.push('?');
            s.push_str(q);
        }
        PathAndQuery::try_from(s)?
    };
    Ok(Uri::from(path_and_query))
}

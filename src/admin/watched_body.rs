//! [`watch_body`]: the admin API's request bodies, watched on both listeners. A body must
//! arrive whole within [`BODY_DEADLINE`] of the request's head, and an HTTP/1 answer given before
//! the body was read to its end says `Connection: close`.
//!
//! The deadline: the admin router also serves `POST /oauth/token` (and, with
//! `expose_account_api`, the account API) on the proxy listener, where anyone can connect. A
//! client that declares a body and sends none of it (or a byte now and then) would otherwise
//! hold its connection and the handler waiting on the body for as long as it liked: hyper's
//! header timeout ends with the head. Past the deadline the body read fails, and the handler
//! answers as for any body that could not be read (400 `invalid_request`), with
//! `Connection: close`. Every body the admin API takes is at most 1 MiB, so 30 s is ~35 KB/s.
//!
//! `Connection: close`: a handler that refuses a request (413 past the body bound, 401 before
//! the body is read) leaves the rest of the body in the connection. hyper then drains what has
//! already arrived and closes the connection if the body is not over, but by then the answer's
//! head is often written without saying so: a client that pools connections puts it back, and
//! its next request on it fails with the connection closed under it. Saying `close` in the head
//! tells the client not to reuse the connection. The proxy listener's own answers follow the
//! same rule (`Proxy::handle`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::header::{self, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;

/// How long a request's body may take to arrive whole, from the request's head.
pub(super) const BODY_DEADLINE: Duration = Duration::from_secs(30);

/// The body did not arrive within [`BODY_DEADLINE`].
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {BODY_DEADLINE:?}")]
struct BodyLate;

/// Runs the request with its body bounded by [`BODY_DEADLINE`]; if it came over HTTP/1 with a
/// body that the handler did not read to its end, the answer says `Connection: close`.
pub(super) async fn watch_body(request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let http1 = request.version() < http::Version::HTTP_2;
    let ended = Arc::new(AtomicBool::new(false));
    let (parts, body) = request.into_parts();
    let body = Body::new(Watched {
        inner: body,
        ended: Arc::clone(&ended),
        deadline: Box::pin(tokio::time::sleep(BODY_DEADLINE)),
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if http1 && !ended.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it has been read to its end, and fails once its deadline
/// passes with the body still waited on.
struct Watched {
    inner: Body,
    ended: Arc<AtomicBool>,
    deadline: Pin<Box<Sleep>>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(axum::Error::new(BodyLate))));
                }
            }
            Poll::Ready(None) => self.ended.store(true, Ordering::Release),
            Poll::Ready(Some(_)) if self.inner.is_end_stream() => {
                self.ended.store(true, Ordering::Release);
            }
            Poll::Ready(Some(_)) => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    /// A router that reads its whole body, as the admin API's handlers do, behind the watch.
    fn router() -> Router {
        Router::new()
            .route(
                "/",
                post(|body: Bytes| async move { format!("{} bytes", body.len()) }),
            )
            .layer(axum::middleware::from_fn(watch_body))
    }

    /// A body whose first bytes come and whose rest never does (a slow-body attack).
    fn stalled_body() -> Body {
        let first =
            futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"{\"a\""))]);
        Body::from_stream(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ))
    }

    fn request(version: http::Version, body: Body) -> Request {
        let mut request = Request::post("/").body(body).expect("request");
        *request.version_mut() = version;
        request
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_is_given_up_at_its_deadline() {
        for version in [http::Version::HTTP_11, http::Version::HTTP_2] {
            let started = tokio::time::Instant::now();
            let response = tokio::time::timeout(
                BODY_DEADLINE * 2,
                router().oneshot(request(version, stalled_body())),
            )
            .await
            .expect("the handler waited on the body past its deadline")
            .expect("infallible");
            assert_eq!(started.elapsed(), BODY_DEADLINE, "{version:?}");
            assert_eq!(response.status(), http::StatusCode::BAD_REQUEST);
            let close = response.headers().get(header::CONNECTION);
            if version == http::Version::HTTP_11 {
                assert_eq!(close.map(HeaderValue::as_bytes), Some(&b"close"[..]));
            } else {
                assert_eq!(close, None, "HTTP/2 has no Connection header");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_arrives_is_read_and_keeps_its_connection() {
        let response = router()
            .oneshot(request(http::Version::HTTP_11, Body::from("{\"a\":1}")))
            .await
            .expect("infallible");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(response.headers().get(header::CONNECTION), None);
    }
}

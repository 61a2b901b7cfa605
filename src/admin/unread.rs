//! [`close_if_body_unread`]: an HTTP/1 answer given before the request's body was read to its
//! end says `Connection: close`.
//!
//! A handler that refuses a request (413 past the body bound, 401 before the body is read)
//! leaves the rest of the body in the connection. hyper then drains what has already arrived
//! and closes the connection if the body is not over, but by then the answer's head is often
//! written without saying so: a client that pools connections puts it back, and its next
//! request on it fails with the connection closed under it. Saying `close` in the head tells the
//! client not to reuse the connection. The proxy listener's own answers follow the same rule
//! (`Proxy::handle`).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::header::{self, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};

/// Runs the request; if it came over HTTP/1 with a body that the handler did not read to its
/// end, the answer says `Connection: close`.
pub(super) async fn close_if_body_unread(request: Request, next: Next) -> Response {
    if request.version() >= http::Version::HTTP_2 || request.body().is_end_stream() {
        return next.run(request).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let (parts, body) = request.into_parts();
    let body = Body::new(Watched {
        inner: body,
        ended: Arc::clone(&ended),
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !ended.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it has been read to its end.
struct Watched {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::Release);
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

//! Every refusal the gateway makes itself, one variant per error code of the contract's proxy
//! table, each with its status beside it, and the one function that turns them into responses.
//!
//! Pure: no I/O. The proxy adds rate-limit headers to 429s; nothing else is added here.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::limits::Window;

/// What a 405 lists in `Allow`: every method but `CONNECT` and `TRACE`.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Why the gateway answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request target or framing breaks the rules of contract §4 (an ambiguous path, two
    /// `Host`s, a body that breaks its own framing or stalls).
    BadRequest,
    /// `CONNECT` or `TRACE`.
    MethodNotAllowed,
    /// No credential in any of the three header forms.
    MissingCredential,
    /// Malformed, bad checksum, unknown, or not usable here.
    InvalidCredential,
    /// Past its `expires_at` (or its roll grace).
    ExpiredCredential,
    /// Deactivated key, or inactive account.
    InactiveCredential,
    /// The account does not accept this kind of credential.
    AuthMethodNotAllowed,
    /// Client IP outside the account's or key's allowed CIDRs.
    IpNotAllowed,
    /// Publishable key used from an origin not allowed.
    OriginNotAllowed,
    /// The key lacks the route's scope for this method.
    ScopeDenied,
    /// Publishable key with a method other than GET, HEAD, OPTIONS.
    PublishableKeyWrite,
    /// No route matches host and path.
    NoRoute,
    /// Request body over `max_body_bytes`.
    BodyTooLarge,
    /// A window is exhausted; `retry_after` whole seconds until it has room.
    RateLimited {
        /// The exhausted window.
        window: Window,
        /// Seconds until one more request fits.
        retry_after: u64,
    },
    /// The key's credits are used up (contract 5a); `retry_after` whole seconds until its
    /// next refill (a day when it has none).
    UsageExceeded {
        /// Seconds until the next refill.
        retry_after: u64,
    },
    /// Upstream refused the connection or broke it.
    UpstreamUnavailable,
    /// The key could not be verified because the store is down (fail_closed).
    StoreUnavailable,
    /// Upstream did not answer within the route's timeout.
    UpstreamTimeout,
}

// === impl Refusal ===

impl Refusal {
    /// Status and code, exactly as in the contract. No `_` arm: a new variant must be mapped.
    pub fn status_and_code(self) -> (StatusCode, &'static str) {
        match self {
            Refusal::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            Refusal::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Refusal::MissingCredential => (StatusCode::UNAUTHORIZED, "missing_credential"),
            Refusal::InvalidCredential => (StatusCode::UNAUTHORIZED, "invalid_credential"),
            Refusal::ExpiredCredential => (StatusCode::UNAUTHORIZED, "expired_credential"),
            Refusal::InactiveCredential => (StatusCode::UNAUTHORIZED, "inactive_credential"),
            Refusal::AuthMethodNotAllowed => (StatusCode::UNAUTHORIZED, "auth_method_not_allowed"),
            Refusal::IpNotAllowed => (StatusCode::FORBIDDEN, "ip_not_allowed"),
            Refusal::OriginNotAllowed => (StatusCode::FORBIDDEN, "origin_not_allowed"),
            Refusal::ScopeDenied => (StatusCode::FORBIDDEN, "scope_denied"),
            Refusal::PublishableKeyWrite => (StatusCode::FORBIDDEN, "publishable_key_write"),
            Refusal::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            Refusal::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            Refusal::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Refusal::UsageExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "usage_exceeded"),
            Refusal::UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            Refusal::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            Refusal::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        }
    }

    /// A sentence for humans.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::BadRequest => "the request is malformed or ambiguous",
            Refusal::MethodNotAllowed => "this method is not allowed through the gateway",
            Refusal::MissingCredential => {
                "an API key is required: send Authorization: Bearer <key> or X-API-Key"
            }
            Refusal::InvalidCredential => "the credential is not valid",
            Refusal::ExpiredCredential => "the credential has expired",
            Refusal::InactiveCredential => "the credential is not active",
            Refusal::AuthMethodNotAllowed => "this account does not accept this kind of credential",
            Refusal::IpNotAllowed => "requests from this IP address are not allowed for this key",
            Refusal::OriginNotAllowed => "requests from this origin are not allowed for this key",
            Refusal::ScopeDenied => "the key lacks the scope this route requires",
            Refusal::PublishableKeyWrite => "publishable keys may only use GET, HEAD and OPTIONS",
            Refusal::NoRoute => "no route matches this host and path",
            Refusal::BodyTooLarge => "the request body is larger than allowed",
            Refusal::RateLimited { .. } => "rate limit exceeded",
            Refusal::UsageExceeded { .. } => "the key has no credits left",
            Refusal::UpstreamUnavailable => "the upstream service could not be reached",
            Refusal::StoreUnavailable => "the credential store is unavailable",
            Refusal::UpstreamTimeout => "the upstream service did not answer in time",
        }
    }

    /// The JSON error response, with `Retry-After` on 429s. Has no side effects.
    pub fn to_response(self) -> Response<Full<Bytes>> {
        let (status, code) = self.status_and_code();
        let body = match self {
            Refusal::RateLimited { window, .. } => serde_json::json!({
                "error": { "code": code, "message": self.message(), "window": window.name() }
            }),
            _ => serde_json::json!({ "error": { "code": code, "message": self.message() } }),
        };
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Refusal::RateLimited { retry_after, .. } | Refusal::UsageExceeded { retry_after } =
            self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        if let Refusal::MethodNotAllowed = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        }
        response
    }
}

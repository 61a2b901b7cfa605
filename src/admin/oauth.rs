//! `POST /oauth/token`, served on the proxy listener (the wiring routes that one path here): the
//! OAuth 2.0 client-credentials grant (RFC 6749 §4.4). The client is the account: `client_id`
//! is its id, `client_secret` one of its `tgcs_` secrets, given as a form body, a JSON body, or
//! HTTP Basic (one of them, RFC 6749 §2.3.1). The answer is a `tgat_` access token that acts for
//! the account on the proxy and the admin API like a secret key with the granted scopes, until
//! it expires ([`TOKEN_TTL`]) or the secret it was issued with is deleted.
//!
//! Errors are RFC 6749 §5.2's `{"error","error_description"}`: 400 `invalid_request`,
//! `unsupported_grant_type`, `invalid_scope` (a scope outside the account's `permissions`),
//! `unauthorized_client` (an account whose `auth_method` is `api_key`); 401 `invalid_client`
//! (unknown client, wrong or malformed secret, inactive account; with `WWW-Authenticate` when
//! Basic was used). Each client id may ask [`ISSUES_PER_MINUTE`] times a minute; beyond that 429
//! `rate_limited` with `Retry-After`, so that secrets cannot be guessed at speed. Every answer
//! is `Cache-Control: no-store`.

use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use chrono::Utc;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::AdminState;
use crate::credential::{self, KeyHash, Kind};
use crate::store::{AuthMethod, TokenRecord};

/// How long an access token lasts (contract §3: one hour).
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Token requests per client id and minute (with a burst of as many).
pub const ISSUES_PER_MINUTE: u32 = 30;
/// Client ids tracked before the idle ones are forgotten.
const TRACKED_CLIENTS: usize = 100_000;

/// The limiter of token requests, per client id.
pub(crate) type IssueLimiter = DefaultKeyedRateLimiter<String>;

/// A limiter of [`ISSUES_PER_MINUTE`] per client id.
pub(crate) fn issue_limiter() -> IssueLimiter {
    let per_minute = NonZeroU32::new(ISSUES_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
    IssueLimiter::keyed(Quota::per_minute(per_minute))
}

/// The fields of a token request, from whichever form it came in.
#[derive(Debug, Default, Deserialize)]
struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    scope: Option<String>,
}

/// RFC 6749 §5.1.
#[derive(Serialize)]
struct TokenAnswer {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    scope: String,
}

/// An RFC 6749 §5.2 error (or 429), as answered.
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: &'static str,
    /// Seconds, for a 429.
    retry_after: Option<u64>,
    /// The client authenticated with Basic: a 401 names the scheme.
    basic: bool,
}

/// `POST /oauth/token`.
pub(crate) async fn token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A body that could not be read (it did not arrive in time, or broke off) is the
    // client's malformed request, answered in the grant's own error shape.
    let body = match body {
        Ok(body) => body,
        // Past the size bound: axum's 413, as before.
        Err(too_large) if too_large.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return too_large.into_response()
        }
        Err(_) => {
            return OAuthError::bad("invalid_request", "the request body could not be read")
                .into_response()
        }
    };
    // Bounded as the account API's answers are (`bound_answer`), from the body's end: a hung
    // store must not hold the client, nor its connection on the public listener.
    let issued = tokio::time::timeout(state.answer_deadline, issue(&state, &headers, &body));
    match issued.await {
        Ok(Ok(answer)) => no_store((StatusCode::OK, Json(answer)).into_response()),
        Ok(Err(e)) => e.into_response(),
        Err(_) => OAuthError::unavailable().into_response(),
    }
}

async fn issue(
    state: &AdminState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<TokenAnswer, OAuthError> {
    let (req, basic) = read_request(headers, body)?;
    if req.grant_type.as_deref() != Some("client_credentials") {
        return Err(match req.grant_type {
            None => OAuthError::bad("invalid_request", "grant_type is required"),
            Some(_) => OAuthError::bad(
                "unsupported_grant_type",
                "only client_credentials is supported",
            ),
        });
    }
    let (Some(client_id), Some(secret)) = (req.client_id, req.client_secret) else {
        return Err(OAuthError::bad(
            "invalid_request",
            "client_id and client_secret are required",
        ));
    };
    let invalid_client = OAuthError::client(basic);
    if client_id.len() > 64 {
        return Err(invalid_client);
    }
    limit(state, &client_id)?;
    // A malformed secret costs no store read.
    if credential::parse(&secret) != Ok(Kind::ClientSecret) {
        return Err(invalid_client);
    }
    let found = state
        .store
        .find_secret(&KeyHash::of(&secret))
        .await
        .map_err(|_| OAuthError::unavailable())?;
    let Some(secret) =
        found.filter(|s| bool::from(s.account_id.as_bytes().ct_eq(client_id.as_bytes())))
    else {
        return Err(invalid_client);
    };
    let account = state
        .store
        .get_account(&client_id)
        .await
        .map_err(|_| OAuthError::unavailable())?
        .filter(|a| a.active)
        .ok_or(invalid_client)?;
    if account.auth_method == AuthMethod::ApiKey {
        return Err(OAuthError::bad(
            "unauthorized_client",
            "the account's auth_method is api_key",
        ));
    }
    let scopes = granted(req.scope.as_deref(), account.permissions.as_deref())?;
    let raw = credential::generate(Kind::AccessToken);
    let now = Utc::now();
    let ttl = chrono::Duration::from_std(TOKEN_TTL).unwrap_or(chrono::Duration::hours(1));
    let record = TokenRecord {
        hash: KeyHash::of(&raw),
        account_id: account.id,
        secret_id: secret.id,
        scopes: scopes.clone(),
        expires_at: now + ttl,
        created_at: now,
    };
    state
        .store
        .create_token(&record)
        .await
        .map_err(|_| OAuthError::unavailable())?;
    Ok(TokenAnswer {
        access_token: raw,
        token_type: "Bearer",
        expires_in: TOKEN_TTL.as_secs(),
        scope: scopes.map_or_else(|| "*".to_owned(), |s| s.join(" ")),
    })
}

/// The request's fields from Basic, a form or a JSON body, and whether Basic was used. Client
/// credentials in two places are refused (RFC 6749 §2.3).
fn read_request(headers: &HeaderMap, body: &[u8]) -> Result<(TokenRequest, bool), OAuthError> {
    let malformed = || OAuthError::bad("invalid_request", "the body cannot be read");
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().starts_with("application/json"));
    let mut req: TokenRequest = if body.is_empty() {
        TokenRequest::default()
    } else if json {
        serde_json::from_slice(body).map_err(|_| malformed())?
    } else {
        serde_urlencoded::from_bytes(body).map_err(|_| malformed())?
    };
    let Some(basic) = headers.get(header::AUTHORIZATION) else {
        return Ok((req, false));
    };
    let (id, secret) = basic_credentials(basic).ok_or_else(|| OAuthError::client(true))?;
    if req.client_id.as_deref().is_some_and(|b| b != id) || req.client_secret.is_some() {
        return Err(OAuthError::bad(
            "invalid_request",
            "client credentials are given in more than one way",
        ));
    }
    req.client_id = Some(id);
    req.client_secret = Some(secret);
    Ok((req, true))
}

/// `Basic base64(client_id:client_secret)`, each part form-decoded (RFC 6749 §2.3.1).
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let encoded = value.to_str().ok()?.strip_prefix("Basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let decode = |s: &str| -> Option<String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&format!("v={s}")).ok()?;
        pairs.into_iter().next().map(|(_, v)| v)
    };
    Some((decode(id)?, decode(secret)?))
}

/// The scopes a token gets: those asked for, each within the account's permissions, else all of
/// the account's (`None`: full access).
fn granted(
    asked: Option<&str>,
    permissions: Option<&[String]>,
) -> Result<Option<Vec<String>>, OAuthError> {
    let asked: Vec<String> = asked
        .unwrap_or_default()
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if asked.is_empty() {
        return Ok(permissions.map(<[String]>::to_vec));
    }
    if let Some(allowed) = permissions {
        if asked.iter().any(|s| !allowed.contains(s)) {
            return Err(OAuthError::bad(
                "invalid_scope",
                "a requested scope is outside the account's permissions",
            ));
        }
    }
    Ok(Some(asked))
}

/// One more token request of `client_id`, or 429.
fn limit(state: &AdminState, client_id: &str) -> Result<(), OAuthError> {
    let limiter = &state.token_issues;
    if limiter.len() > TRACKED_CLIENTS {
        limiter.retain_recent();
    }
    limiter
        .check_key(&client_id.to_owned())
        .map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            OAuthError {
                status: StatusCode::TOO_MANY_REQUESTS,
                error: "rate_limited",
                description: "too many token requests for this client; retry later",
                retry_after: Some(wait.as_secs() + 1),
                basic: false,
            }
        })
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

// === impl OAuthError ===

impl OAuthError {
    fn bad(error: &'static str, description: &'static str) -> Self {
        OAuthError {
            status: StatusCode::BAD_REQUEST,
            error,
            description,
            retry_after: None,
            basic: false,
        }
    }

    fn client(basic: bool) -> Self {
        OAuthError {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            description: "unknown client or wrong client secret",
            retry_after: None,
            basic,
        }
    }

    fn unavailable() -> Self {
        OAuthError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "temporarily_unavailable",
            description: "the store cannot be reached; retry later",
            retry_after: Some(1),
            basic: false,
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.error, "error_description": self.description });
        let mut response = no_store((self.status, Json(body)).into_response());
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.basic && self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tollgate\""),
            );
        }
        response
    }
}

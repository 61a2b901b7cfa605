//! [`JsonBody`]: a request body read as bytes (within the router's 64 KiB limit) and deserialized
//! so that a failure names the field it is about (`rate_limit.per_minute: invalid type…`).
//!
//! The `Content-Type` is not checked: `curl -d` sends a form type, and the body is JSON either
//! way.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::MAX_BODY_BYTES;

/// A JSON body of type `T`; an empty body is read as `{}` (for `…/deactivate` and the like).
pub(crate) struct JsonBody<T>(pub(crate) T);

// === impl JsonBody ===

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.into_response().status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge {
                    limit: MAX_BODY_BYTES,
                }
            } else {
                ApiError::InvalidBody("the request body could not be read".to_owned())
            }
        })?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        parse(text).map(JsonBody)
    }
}

/// Deserializes `bytes`, naming the field that failed.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::InvalidBody(format!("body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::InvalidBody(inner.to_string())
        } else {
            ApiError::InvalidBody(format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::InvalidBody(format!("body is not valid JSON: {e}")))?;
    Ok(value)
}

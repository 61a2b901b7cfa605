//! [`JsonBody`]: a request body read as bytes (at most 64 KiB, or the route's own bound) and
//! deserialized so that a failure names the field it is about (`rate_limit.per_minute: invalid
//! type…`); [`from_value`] does the same for a part of a body (`keys[3].hash: …`).
//!
//! The `Content-Type` is not checked: `curl -d` sends a form type, and the body is JSON either
//! way. Every body the API takes is a JSON object: an array, string, number or `null` is 400
//! `invalid_request` here, once, before serde sees it (serde would read `["acme"]` as a struct
//! whose fields come in order, and take it as `{"name":"acme"}`).

use axum::extract::{FromRequest, Request};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::MAX_BODY_BYTES;

/// A JSON body of type `T`, of at most `LIMIT` bytes (413 `body_too_large` past it; the
/// default is the API's [`MAX_BODY_BYTES`], a route that takes more names its own bound). An
/// empty body is read as `{}` (for `…/deactivate` and the like).
pub(crate) struct JsonBody<T, const LIMIT: usize = MAX_BODY_BYTES>(pub(crate) T);

// === impl JsonBody ===

impl<T, S, const LIMIT: usize> FromRequest<S> for JsonBody<T, LIMIT>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        // Read here with this extractor's own bound (the router's `DefaultBodyLimit` only
        // informs extractors that consult it), so the limit enforced is the one reported.
        let bytes = match Limited::new(req.into_body(), LIMIT).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(ApiError::BodyTooLarge { limit: LIMIT })
            }
            Err(e) => {
                return Err(ApiError::InvalidBody(format!(
                    "the request body could not be read: {e}"
                )))
            }
        };
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        parse(text).map(JsonBody)
    }
}

/// Deserializes `bytes`, a JSON object, naming the field that failed.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    object_only(bytes)?;
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

/// Deserializes `value`, the part of a body at `at` (`keys[3]`; `""` for the whole body),
/// naming the failing field by its whole path (`keys[3].scopes[0]: …`).
pub(crate) fn from_value<T: DeserializeOwned>(value: Value, at: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = match (at.is_empty(), path == ".") {
            (true, true) => return ApiError::InvalidBody(inner.to_string()),
            (true, false) => path,
            (false, true) => at.to_owned(),
            (false, false) => format!("{at}.{path}"),
        };
        ApiError::InvalidBody(format!("{field}: {inner}"))
    })
}

/// Refuses a body whose JSON value is not an object; bad JSON is left to [`parse`] to name.
fn object_only(bytes: &[u8]) -> Result<(), ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let kind = match first {
        Some(b'{') | None => return Ok(()),
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'-' | b'0'..=b'9') => "a number",
        Some(_) => return Ok(()),
    };
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
        // Not JSON at all: `parse` says so, with serde's position.
        return Ok(());
    }
    Err(ApiError::InvalidBody(format!(
        "the body must be a JSON object, not {kind}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Named {
        name: String,
    }

    #[test]
    fn only_a_json_object_is_a_body() {
        assert!(parse::<Named>(br#" {"name":"acme"} "#).is_ok());
        for body in [
            &br#"["acme"]"#[..],
            br#""acme""#,
            b"42",
            b"-1",
            b"null",
            b"true",
            b" [ ] ",
        ] {
            let err = parse::<Named>(body).unwrap_err();
            assert!(
                err.to_string().contains("must be a JSON object"),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
        let err = parse::<Named>(b"[oops").unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }
}

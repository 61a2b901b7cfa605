//! Finding the credential in a request: `X-API-Key`, `Authorization: Bearer`, or HTTP Basic with
//! the credential as user name. Pure.

use std::borrow::Cow;

use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderMap;

/// `X-API-Key`.
pub static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// Where the credential was found, so that exactly that header is removed before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `X-API-Key`; an `Authorization` beside it belongs to the upstream.
    ApiKeyHeader,
    /// `Authorization: Bearer …` or `Basic …`.
    Authorization,
}

/// A credential as presented: borrowed from the request's headers, so that finding it costs no
/// allocation, except for HTTP Basic, whose user name has to be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented<'h> {
    /// The raw credential.
    pub raw: Cow<'h, str>,
    /// Its header.
    pub source: Source,
}

/// The credential of a request, if any. A present but unusable `Authorization` (another scheme,
/// bad Base64) counts as absent.
pub fn credential(headers: &HeaderMap) -> Option<Presented<'_>> {
    if let Some(v) = headers.get(&X_API_KEY) {
        let raw = v.to_str().ok()?.trim();
        return (!raw.is_empty()).then_some(Presented {
            raw: Cow::Borrowed(raw),
            source: Source::ApiKeyHeader,
        });
    }
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let raw = if scheme.eq_ignore_ascii_case("bearer") {
        Cow::Borrowed(rest.trim())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let user = text.split_once(':').map_or(text.as_str(), |(u, _)| u);
        Cow::Owned(user.to_owned())
    } else {
        return None;
    };
    (!raw.is_empty()).then_some(Presented {
        raw,
        source: Source::Authorization,
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn with(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    #[test]
    fn three_forms_are_recognised() {
        let headers = with("authorization", "Bearer tgsk_abc");
        let bearer = credential(&headers).unwrap();
        assert_eq!(
            (&*bearer.raw, bearer.source),
            ("tgsk_abc", Source::Authorization)
        );
        assert!(
            matches!(bearer.raw, Cow::Borrowed(_)),
            "no copy of a bearer token"
        );
        let headers = with("x-api-key", "tgsk_abc");
        let api = credential(&headers).unwrap();
        assert_eq!((&*api.raw, api.source), ("tgsk_abc", Source::ApiKeyHeader));
        assert!(
            matches!(api.raw, Cow::Borrowed(_)),
            "no copy of an X-API-Key"
        );
        // curl -u tgsk_abc:  →  Basic base64("tgsk_abc:")
        let headers = with("authorization", "Basic dGdza19hYmM6");
        let basic = credential(&headers).unwrap();
        assert_eq!(basic.raw, "tgsk_abc");
    }

    #[test]
    fn api_key_header_wins_and_other_schemes_are_absent() {
        let mut h = with("x-api-key", "tgsk_a");
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Bearer upstream-token"),
        );
        assert_eq!(credential(&h).unwrap().raw, "tgsk_a");
        assert_eq!(credential(&with("authorization", "Digest x")), None);
        assert_eq!(credential(&with("authorization", "Basic !!!")), None);
        assert_eq!(credential(&HeaderMap::new()), None);
    }
}

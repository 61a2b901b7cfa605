//! Field checks shared by the account and key endpoints. Each failure names its field path.
//!
//! Values are checked here, once, so that what the store holds always parses where it is used
//! (the key cache silently skips a CIDR or origin that does not).

use chrono::{DateTime, Utc};

use crate::policy;
use crate::store::RateLimitSpec;

use super::error::ApiError;

/// Longest `external_id`.
pub(crate) const MAX_EXTERNAL_ID_CHARS: usize = 255;

/// A required display name: trimmed, non-empty, at most `max` characters.
pub(crate) fn name(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ApiError::field(field, "must not be empty"));
    }
    if trimmed.chars().count() > max {
        return Err(ApiError::field(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ApiError::field(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

/// Every window, when given, allows at least one request.
pub(crate) fn rate_limit(field: &str, spec: Option<&RateLimitSpec>) -> Result<(), ApiError> {
    let Some(spec) = spec else { return Ok(()) };
    for (window, value) in [
        ("per_minute", spec.per_minute),
        ("per_hour", spec.per_hour),
        ("per_day", spec.per_day),
    ] {
        if value == Some(0) {
            return Err(ApiError::field(
                format!("{field}.{window}"),
                "must be at least 1",
            ));
        }
    }
    Ok(())
}

/// CIDRs or bare addresses, returned trimmed.
pub(crate) fn cidrs(field: &str, list: &[String]) -> Result<Vec<String>, ApiError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| match policy::parse_cidr(s) {
            Some(_) => Ok(s.trim().to_owned()),
            None => Err(ApiError::field(
                format!("{field}[{i}]"),
                format!("{s:?} is not an IP address or CIDR"),
            )),
        })
        .collect()
}

/// Origins (`scheme://host[:port]`), returned normalised.
pub(crate) fn origins(field: &str, list: &[String]) -> Result<Vec<String>, ApiError> {
    normalised(
        field,
        list,
        policy::normalize_origin,
        "an origin like https://example.com",
    )
}

/// Domains (`example.com`, `*.example.com`) or origins (`https://example.com:8443`), returned
/// normalised. A bare domain has no port: it allows http and https on their default ports.
pub(crate) fn domains(field: &str, list: &[String]) -> Result<Vec<String>, ApiError> {
    normalised(
        field,
        list,
        policy::normalize_domain,
        "a domain like example.com or *.example.com, or an origin like https://example.com:8443",
    )
}

fn normalised(
    field: &str,
    list: &[String],
    normalise: fn(&str) -> Option<String>,
    expected: &str,
) -> Result<Vec<String>, ApiError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            normalise(s).ok_or_else(|| {
                ApiError::field(format!("{field}[{i}]"), format!("{s:?} is not {expected}"))
            })
        })
        .collect()
}

/// Scope names: non-empty, no whitespace (they travel space-separated in a header).
pub(crate) fn scope_names(field: &str, list: &[String]) -> Result<(), ApiError> {
    for (i, s) in list.iter().enumerate() {
        if s.is_empty() || s.len() > 100 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ApiError::field(
                format!("{field}[{i}]"),
                "must be 1–100 characters without spaces",
            ));
        }
    }
    Ok(())
}

/// An `external_id` (the key owner's id in the customer's own system): 1–255 visible ASCII
/// characters or spaces, neither first nor last a space. It is forwarded to upstreams as an
/// HTTP header value, which these characters always make and which would lose outer spaces.
pub(crate) fn external_id(field: &str, value: &str) -> Result<String, ApiError> {
    let visible_or_space = |b: &u8| *b == b' ' || b.is_ascii_graphic();
    let ok = (1..=MAX_EXTERNAL_ID_CHARS).contains(&value.len())
        && value.bytes().all(|b| visible_or_space(&b))
        && !value.starts_with(' ')
        && !value.ends_with(' ');
    if !ok {
        return Err(ApiError::field(
            field,
            format!(
                "must be 1–{MAX_EXTERNAL_ID_CHARS} visible ASCII characters or spaces, not \
                 beginning or ending with a space (it is sent to upstreams as an HTTP header)"
            ),
        ));
    }
    Ok(value.to_owned())
}

/// `expires_at` or `ttl` (not both) → the expiry and the lifetime that `renew` reuses.
pub(crate) fn expiry(
    expires_at: Option<DateTime<Utc>>,
    ttl: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(Option<DateTime<Utc>>, Option<u64>), ApiError> {
    match (expires_at, ttl) {
        (None, None) => Ok((None, None)),
        (Some(_), Some(_)) => Err(ApiError::field("ttl", "give expires_at or ttl, not both")),
        (Some(at), None) => {
            let secs = (at - now).num_seconds();
            if secs <= 0 {
                return Err(ApiError::field("expires_at", "must be in the future"));
            }
            if at > latest_expiry() {
                return Err(ApiError::field(
                    "expires_at",
                    "must be before the year 10000",
                ));
            }
            Ok((Some(at), u64::try_from(secs).ok()))
        }
        (None, Some(text)) => {
            let ttl = humantime::parse_duration(text).map_err(|e| {
                ApiError::field(
                    "ttl",
                    format!("{text:?} is not a duration like \"30d\" ({e})"),
                )
            })?;
            if ttl.as_secs() == 0 {
                return Err(ApiError::field("ttl", "must be at least one second"));
            }
            let at = chrono::Duration::from_std(ttl)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .filter(|at| *at <= latest_expiry())
                .ok_or_else(|| {
                    ApiError::field(
                        "ttl",
                        "is too long: the key must expire before the year 10000",
                    )
                })?;
            Ok((Some(at), Some(ttl.as_secs())))
        }
    }
}

/// The latest expiry an RFC 3339 time can state: 9999-12-31T23:59:59Z.
pub(crate) fn latest_expiry() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::external_id;

    #[test]
    fn an_external_id_is_what_a_header_value_carries_whole() {
        let longest = "x".repeat(255);
        for good in ["u", "user 42", "cus_9f8A-x.y/z@example", &longest] {
            assert_eq!(external_id("external_id", good).ok().as_deref(), Some(good));
            assert!(http::HeaderValue::from_str(good).is_ok(), "{good:?}");
        }
        let too_long = "x".repeat(256);
        for bad in [
            "",
            " lead",
            "trail ",
            "tab\there",
            "new\nline",
            "caf\u{e9}",
            &too_long,
        ] {
            let err = external_id("external_id", bad).unwrap_err().to_string();
            assert!(err.starts_with("external_id: "), "{bad:?}: {err}");
        }
    }
}

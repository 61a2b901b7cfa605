//! Field checks shared by the account and key endpoints. Each failure names its field path.
//!
//! Values are checked here, once, so that what the store holds always parses where it is used
//! (the key cache silently skips a CIDR or origin that does not).

use crate::policy;
use crate::store::RateLimitSpec;

use super::error::ApiError;

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

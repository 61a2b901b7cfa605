//! The request target, checked before anything else (contract §4): the method, the host, and
//! the path in the one normal form that routes are matched on and that is forwarded, so that
//! the upstream is sent exactly the path the gateway decided on.
//!
//! Normal form: RFC 3986 dot-segments removed (§5.2.4), percent-encoded unreserved characters
//! decoded and the hex digits of the other escapes upper-cased (§6.2.2), runs of `/` merged
//! (as nginx does by default, so that `//admin` cannot pass a route for `/admin` and reach the
//! upstream's `/admin`). What stays ambiguous — an encoded `/` or `\`, a raw `\`, an encoded NUL,
//! a malformed escape, a `..` above the root, a dot-segment with `;` parameters (`..;`, which
//! Tomcat reads as `..`) — is refused.
//!
//! Pure: no I/O, no allocation for a path that is already normal.

use std::borrow::Cow;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Uri, Version};

/// Why a request target was refused (all are 400 `bad_request`, except the methods: 405).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// `CONNECT` or `TRACE`: a gateway in front of services tunnels and echoes nothing.
    #[error("this method is not allowed through the gateway")]
    MethodNotAllowed,
    /// More than one `Host`, a `Host` that is no authority, or none on HTTP/1.1.
    #[error("the request needs exactly one valid Host")]
    BadHost,
    /// `%` not followed by two hex digits.
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    /// `%2F`, `%5C` or a raw `\`: a separator the upstream may or may not split on.
    #[error("the path has an encoded or backslash separator")]
    AmbiguousSeparator,
    /// `%00`: servers written in C stop reading at it.
    #[error("the path has an encoded NUL")]
    EncodedNul,
    /// More `..` than segments above them.
    #[error("the path climbs above the root")]
    AboveRoot,
    /// `.;x` or `..;x`: a dot-segment to some servers, a name to others.
    #[error("the path has a dot-segment with parameters")]
    DotSegmentParameters,
}

/// The host a request is for: the absolute-form or HTTP/2 authority when there is one (RFC 9112
/// §3.2.2: it wins over `Host`), else the one `Host` header. Two `Host` headers, a `Host` that
/// is not an authority, or none on an HTTP/1.1 request without an authority are refused (RFC
/// 9112 §3.2).
/// The value is a cheap clone (a parsed header shares the request's buffer).
pub fn request_host(
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, TargetError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(TargetError::BadHost);
    }
    if let Some(authority) = uri.authority() {
        if !is_authority(authority.as_str().as_bytes()) {
            return Err(TargetError::BadHost);
        }
        return HeaderValue::from_str(authority.as_str())
            .map(Some)
            .map_err(|_| TargetError::BadHost);
    }
    match host {
        Some(value) if is_authority(value.as_bytes()) => Ok(Some(value.clone())),
        Some(_) => Err(TargetError::BadHost),
        None if version == Version::HTTP_11 => Err(TargetError::BadHost),
        None => Ok(None),
    }
}

/// `CONNECT` and `TRACE` are refused.
pub fn check_method(method: &Method) -> Result<(), TargetError> {
    if method == Method::CONNECT || method == Method::TRACE {
        Err(TargetError::MethodNotAllowed)
    } else {
        Ok(())
    }
}

/// A `Host` value: `host[:port]` in the characters of RFC 3986's `reg-name`, `IP-literal` and
/// `port`; no userinfo, path or whitespace. Checked in place: parsing it into an `Authority`
/// would copy it.
fn is_authority(value: &[u8]) -> bool {
    let host_len = match value.iter().rposition(|b| *b == b':') {
        // `[::1]` has colons inside its brackets; a port follows the closing one.
        Some(i) if !value.ends_with(b"]") => {
            if !value[i + 1..].iter().all(u8::is_ascii_digit) {
                return false;
            }
            i
        }
        _ => value.len(),
    };
    host_len > 0
        && value.iter().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                )
        })
}

/// The path in normal form: borrowed when it already is, refused when it stays ambiguous.
/// Anything that does not start with `/` (`*` of `OPTIONS *`) is returned as it is; it matches
/// no route.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, TargetError> {
    if !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let mut segments: Vec<String> = Vec::new();
    // The normal form ends in `/` when the path's last segment is empty or a dot-segment.
    let mut ends_in_slash = false;
    for raw_segment in path[1..].split('/') {
        let segment = decode(raw_segment)?;
        ends_in_slash = matches!(segment.as_str(), "" | "." | "..");
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(TargetError::AboveRoot);
                }
            }
            s if is_dot_with_parameters(s) => return Err(TargetError::DotSegmentParameters),
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if ends_in_slash || out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Whether `path` (starting with `/`) is already in normal form: no escape, no backslash, no
/// empty segment but a trailing one, no dot-segment. One pass, no allocation.
fn is_normal(path: &str) -> bool {
    if path.bytes().any(|b| b == b'%' || b == b'\\') {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(s) = segments.next() {
        let last = segments.peek().is_none();
        if (s.is_empty() && !last) || s == "." || s == ".." || is_dot_with_parameters(s) {
            return false;
        }
    }
    true
}

/// `.;x` or `..;x`: a dot-segment to servers that strip `;` parameters first, a name to others.
fn is_dot_with_parameters(segment: &str) -> bool {
    segment.starts_with(".;") || segment.starts_with("..;")
}

/// One segment with its unreserved escapes decoded and the others' hex upper-cased.
fn decode(segment: &str) -> Result<String, TargetError> {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(TargetError::AmbiguousSeparator),
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).and_then(|b| hex(*b)),
                    bytes.get(i + 2).and_then(|b| hex(*b)),
                ) else {
                    return Err(TargetError::BadEscape);
                };
                let byte = hi << 4 | lo;
                match byte {
                    b'/' | b'\\' => return Err(TargetError::AmbiguousSeparator),
                    0 => return Err(TargetError::EncodedNul),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                        out.push(char::from(b));
                    }
                    b => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.push('%');
                        out.push(char::from(HEX[usize::from(b >> 4)]));
                        out.push(char::from(HEX[usize::from(b & 0xf)]));
                    }
                }
                i += 3;
            }
            _ => {
                // Copy the run up to the next escape or backslash whole (it may be UTF-8).
                let end = bytes[i..]
                    .iter()
                    .position(|b| *b == b'%' || *b == b'\\')
                    .map_or(bytes.len(), |n| i + n);
                out.push_str(&segment[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> Result<String, TargetError> {
        normalise(path).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/.well-known/x",
            "/a..b/c.",
            "/a;b=c",
            "/é",
            "*",
        ] {
            assert!(
                matches!(normalise(p), Ok(Cow::Borrowed(s)) if s == p),
                "{p}"
            );
        }
    }

    #[test]
    fn dot_segments_are_removed_in_every_spelling() {
        for p in [
            "/pub/../secret",
            "/pub/%2e%2e/secret",
            "/pub/%2E%2E/secret",
            "/pub/.%2e/secret",
            "/pub/%2e./secret",
            "/pub/./../secret",
            "/pub//../secret",
            "/./secret",
            "//secret",
            "/pub/x/../../secret",
        ] {
            assert_eq!(n(p).as_deref(), Ok("/secret"), "{p}");
        }
        assert_eq!(n("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(n("/a/b/.").as_deref(), Ok("/a/b/"));
        assert_eq!(n("/a/./b").as_deref(), Ok("/a/b"));
        assert_eq!(n("/a//b//").as_deref(), Ok("/a/b/"));
        assert_eq!(n("/a/..").as_deref(), Ok("/"));
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(n("/%61%7E%2d").as_deref(), Ok("/a~-"));
        assert_eq!(n("/a%20b%3f").as_deref(), Ok("/a%20b%3F"));
        assert_eq!(n("/%c3%a9").as_deref(), Ok("/%C3%A9"));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use TargetError::*;
        for (p, e) in [
            ("/..", AboveRoot),
            ("/a/../..", AboveRoot),
            ("/%2e%2e/x", AboveRoot),
            ("/a%2fb", AmbiguousSeparator),
            ("/a%2Fb", AmbiguousSeparator),
            ("/a%5cb", AmbiguousSeparator),
            ("/a\\b", AmbiguousSeparator),
            ("/a%00", EncodedNul),
            ("/a%", BadEscape),
            ("/a%2", BadEscape),
            ("/a%zz", BadEscape),
            ("/pub/..;/secret", DotSegmentParameters),
            ("/pub/.;x/secret", DotSegmentParameters),
            ("/pub/%2e%2e;/secret", DotSegmentParameters),
        ] {
            assert_eq!(n(p), Err(e), "{p}");
        }
    }

    #[test]
    fn normal_form_is_a_fixed_point() {
        for p in ["/pub/%2e%2e/x/./y//", "/a%20b/%7e/..", "/x/%41%2f"] {
            if let Ok(once) = n(p) {
                assert_eq!(n(&once).as_deref(), Ok(once.as_str()), "{p}");
            }
        }
    }

    #[test]
    fn the_authority_wins_and_two_hosts_are_refused() {
        let mut h = HeaderMap::new();
        h.append(header::HOST, HeaderValue::from_static("a.example"));
        let origin_form: Uri = "/x".parse().unwrap();
        let absolute: Uri = "http://b.example/x".parse().unwrap();
        let got = request_host(&origin_form, Version::HTTP_11, &h).unwrap();
        assert_eq!(got.unwrap(), "a.example");
        let got = request_host(&absolute, Version::HTTP_11, &h).unwrap();
        assert_eq!(got.unwrap(), "b.example");
        h.append(header::HOST, HeaderValue::from_static("b.example"));
        assert_eq!(
            request_host(&origin_form, Version::HTTP_11, &h),
            Err(TargetError::BadHost)
        );
        assert_eq!(
            request_host(&origin_form, Version::HTTP_11, &HeaderMap::new()),
            Err(TargetError::BadHost)
        );
        assert_eq!(
            request_host(&origin_form, Version::HTTP_10, &HeaderMap::new()),
            Ok(None)
        );
        let mut bad = HeaderMap::new();
        bad.insert(header::HOST, HeaderValue::from_static("a b"));
        assert_eq!(
            request_host(&origin_form, Version::HTTP_11, &bad),
            Err(TargetError::BadHost)
        );
    }
}

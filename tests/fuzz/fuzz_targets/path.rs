//! `target::normalise` on arbitrary paths: never a panic; the normal form is a fixed
//! point, holds no dot-segment, empty segment, encoded separator or trailing `/..`, starts with
//! `/` when the input did; and a path with unreserved characters percent-encoded normalises to
//! the same thing as the path itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::target::normalise;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(normal) = normalise(path) else {
        // Refused as ambiguous; so must be its encoded variant (checked below).
        check_variant(path, None);
        return;
    };
    if !path.starts_with('/') {
        assert_eq!(normal, path, "a path without / is left as it is");
        return;
    }
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    let again = normalise(&normal).expect("the normal form is accepted");
    assert_eq!(again, normal, "not a fixed point: {path:?}");
    for bad in ["/../", "/./", "//", "%2F", "%2f", "%5C", "%5c", "\\"] {
        assert!(!normal.contains(bad), "{path:?} -> {normal:?} holds {bad}");
    }
    for bad in ["/..", "/."] {
        assert!(
            !normal.ends_with(bad),
            "{path:?} -> {normal:?} ends with {bad}"
        );
    }
    check_variant(path, Some(&normal));
});

/// Encodes every other unreserved character outside an existing escape as `%XX` (upper- or
/// lower-case hex by position) and checks the variant normalises as the path did.
fn check_variant(path: &str, normal: Option<&str>) {
    if !path.starts_with('/') {
        return;
    }
    let bytes = path.as_bytes();
    let mut variant = String::with_capacity(path.len() * 3);
    let mut i = 0;
    let mut n = 0usize;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            // An escape (or a malformed one) is kept as it is, with what follows it.
            let end = (i + 3).min(bytes.len());
            match path.get(i..end) {
                Some(s) => variant.push_str(s),
                None => return,
            }
            i = end;
            continue;
        }
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        n += 1;
        if unreserved && n % 2 == 1 {
            if n % 4 == 1 {
                variant.push_str(&format!("%{b:02X}"));
            } else {
                variant.push_str(&format!("%{b:02x}"));
            }
            i += 1;
        } else {
            // Copy one whole character (it may be UTF-8).
            let len = path[i..].chars().next().map_or(1, char::len_utf8);
            variant.push_str(&path[i..i + len]);
            i += len;
        }
    }
    match (normal, normalise(&variant)) {
        (Some(normal), Ok(v)) => assert_eq!(v, normal, "{path:?} vs {variant:?}"),
        (None, Err(_)) => {}
        (expected, got) => panic!("{path:?} -> {expected:?} but {variant:?} -> {got:?}"),
    }
}

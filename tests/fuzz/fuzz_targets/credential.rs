//! `credential::parse` and `auth::extract::credential` on arbitrary input: never a panic; what
//! parses has the credential's shape and a checksum that matches; a body re-signed with its own
//! checksum parses as the kind of its prefix; a freshly generated credential parses.

#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate::auth::extract;
use tollgate::credential::{self, FormatError, KeyHash, Kind, CREDENTIAL_LEN};

const PREFIX_LEN: usize = 5;
const CHECKSUM_LEN: usize = 6;
const KINDS: [Kind; 5] = [
    Kind::Secret,
    Kind::Publishable,
    Kind::ClientSecret,
    Kind::AccessToken,
    Kind::Master,
];

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = std::str::from_utf8(data) {
        check_parse(raw);
        resign(raw);
        let _ = credential::preview(raw);
        let _ = credential::display_prefix(raw);
        let _ = KeyHash::from_hex(raw);
    }
    check_extract(data);
    if let Some(first) = data.first() {
        let kind = KINDS[usize::from(*first) % KINDS.len()];
        assert_eq!(credential::parse(&credential::generate(kind)), Ok(kind));
    }
});

/// `parse` agrees with the format's rules, checked here independently of its own code path.
fn check_parse(raw: &str) {
    let kind = KINDS.iter().copied().find(|k| raw.starts_with(k.prefix()));
    let shaped = raw.len() == CREDENTIAL_LEN
        && raw.as_bytes()[PREFIX_LEN..]
            .iter()
            .all(u8::is_ascii_alphanumeric);
    match credential::parse(raw) {
        Ok(parsed) => {
            assert_eq!(Some(parsed), kind, "{raw:?}");
            assert!(shaped, "{raw:?}");
            let (body, sum) = raw.split_at(CREDENTIAL_LEN - CHECKSUM_LEN);
            assert_eq!(&credential::checksum(body.as_bytes()), sum.as_bytes());
        }
        Err(FormatError::UnknownPrefix) => assert!(kind.is_none(), "{raw:?}"),
        Err(FormatError::Malformed) => assert!(!shaped || raw.len() < PREFIX_LEN, "{raw:?}"),
        Err(FormatError::BadChecksum) => {
            assert!(kind.is_some() && shaped, "{raw:?}");
            let (body, sum) = raw.split_at(CREDENTIAL_LEN - CHECKSUM_LEN);
            assert_ne!(&credential::checksum(body.as_bytes()), sum.as_bytes());
        }
    }
}

/// The first 37 bytes signed with their own checksum: a credential exactly when they have its
/// prefix and alphabet.
fn resign(raw: &str) {
    let Some(body) = raw.get(..CREDENTIAL_LEN - CHECKSUM_LEN) else {
        return;
    };
    let sum = credential::checksum(body.as_bytes());
    let mut signed = body.to_owned();
    signed.push_str(std::str::from_utf8(&sum).expect("base62 is ASCII"));
    let kind = KINDS.iter().copied().find(|k| body.starts_with(k.prefix()));
    let alphabet = body.as_bytes()[PREFIX_LEN..]
        .iter()
        .all(u8::is_ascii_alphanumeric);
    match (kind, alphabet) {
        (Some(kind), true) => assert_eq!(credential::parse(&signed), Ok(kind), "{signed:?}"),
        (Some(_), false) => assert_eq!(credential::parse(&signed), Err(FormatError::Malformed)),
        (None, _) => assert_eq!(credential::parse(&signed), Err(FormatError::UnknownPrefix)),
    }
}

/// The first byte picks the header, the rest is its value.
fn check_extract(data: &[u8]) {
    let Some((which, value)) = data.split_first() else {
        return;
    };
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    let name = match which % 3 {
        0 => "x-api-key",
        1 => "authorization",
        _ => {
            // Both: the X-API-Key wins.
            headers.insert("x-api-key", HeaderValue::from_static("tgsk_x"));
            "authorization"
        }
    };
    headers.insert(name, value.clone());
    let Some(presented) = extract::credential(&headers) else {
        return;
    };
    assert!(!presented.raw.is_empty());
    match which % 3 {
        0 => assert_eq!(presented.source, extract::Source::ApiKeyHeader),
        1 => {
            assert_eq!(presented.source, extract::Source::Authorization);
            let text = value.to_str().expect("it was read as text");
            let (scheme, rest) = text.trim().split_once(' ').expect("a scheme and a value");
            if scheme.eq_ignore_ascii_case("bearer") {
                assert_eq!(presented.raw, rest.trim());
            }
        }
        _ => assert_eq!(presented.raw, "tgsk_x"),
    }
    let _ = credential::parse(&presented.raw);
}

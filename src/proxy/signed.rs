//! The signed identity header: with `identity.signing_secret_env`, every request forwarded for a
//! key carries `X-Tollgate-Identity`, a compact JWS (RFC 7515) signed with HMAC-SHA256 (`HS256`)
//! whose claims say who the caller is, so that an upstream reachable by other paths can tell a
//! request that came through the gateway from one that claims to:
//!
//! ```json
//! {"iss":"tollgate","account_id":"acc_…","key_id":"key_…","key_type":"secret",
//!  "scopes":["orders:read"],"iat":1765000000,"exp":1765000060}
//! ```
//!
//! `scopes` is `["*"]` for a key with full access, as `X-Tollgate-Scopes` says `*`. A key with an
//! `external_id` adds the claim `external_id` (after `scopes`); a key without one has no such
//! claim. `exp` is
//! `iat` plus `identity.signed_ttl` (60 s by default): a captured header is good for that long.
//! The plain identity headers are still sent; the signed one is what to trust.
//!
//! Cost: one HMAC over ~250 bytes per request (the key's HMAC state is prepared once and cloned),
//! measured in `benches/hot_path.rs` (`sign_identity`).

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderName, HeaderValue};
use sha2::Sha256;

use crate::auth::Identity;
use crate::store::KeyType;

/// `{"alg":"HS256","typ":"JWT"}`, base64url.
const JWS_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// Signs identities with one secret.
pub struct Signer {
    /// HMAC-SHA256 keyed with the secret, cloned per signature.
    keyed: Hmac<Sha256>,
    ttl_secs: u64,
    /// `X-Tollgate-Identity` (with the configured prefix).
    pub name: HeaderName,
}

// === impl Signer ===

impl Signer {
    /// A signer with `secret` whose signatures last `ttl`, sent as `name`.
    pub fn new(secret: &[u8], ttl: Duration, name: HeaderName) -> Self {
        Signer {
            // HMAC takes a key of any length.
            keyed: Hmac::new_from_slice(secret)
                .unwrap_or_else(|_| unreachable!("HMAC accepts every key length")),
            ttl_secs: ttl.as_secs().max(1),
            name,
        }
    }

    /// The signed identity of `key` at `now_secs` (seconds since the epoch).
    pub fn sign(&self, key: Identity<'_>, now_secs: u64) -> HeaderValue {
        let id = key.values;
        let claims = Claims {
            iss: "tollgate",
            account_id: id.account_id.to_str().unwrap_or_default(),
            key_id: key.key_id,
            key_type: match key.key_type {
                KeyType::Secret => "secret",
                KeyType::Publishable => "publishable",
            },
            scopes: id
                .scopes_header()
                .to_str()
                .unwrap_or_default()
                .split(' ')
                .filter(|s| !s.is_empty())
                .collect(),
            external_id: id.external_id.as_deref().and_then(|v| v.to_str().ok()),
            iat: now_secs,
            exp: now_secs + self.ttl_secs,
        };
        // Claims are ids and scopes: serializing them cannot fail.
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let mut token = Vec::with_capacity(JWS_HEADER.len() + payload.len() * 4 / 3 + 48);
        token.extend_from_slice(JWS_HEADER.as_bytes());
        token.push(b'.');
        push_base64url(&mut token, &payload);
        let mut mac = self.keyed.clone();
        mac.update(&token);
        let signature = mac.finalize().into_bytes();
        token.push(b'.');
        push_base64url(&mut token, &signature);
        // base64url and dots only.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(token))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Appends `data` in unpadded base64url.
fn push_base64url(out: &mut Vec<u8>, data: &[u8]) {
    let start = out.len();
    out.resize(start + data.len().div_ceil(3) * 4, 0);
    let written = URL_SAFE_NO_PAD
        .encode_slice(data, &mut out[start..])
        .unwrap_or(0);
    out.truncate(start + written);
}

/// What the header says (field order as written).
#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'static str,
    account_id: &'a str,
    key_id: &'a str,
    key_type: &'static str,
    scopes: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<&'a str>,
    iat: u64,
    exp: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_the_base64url_of_hs256_jwt() {
        let decoded = URL_SAFE_NO_PAD.decode(JWS_HEADER).unwrap();
        assert_eq!(decoded, br#"{"alg":"HS256","typ":"JWT"}"#);
    }
}

//! The credential format of contract section 3: generate, parse, checksum, hash.
//!
//! Pure: no I/O, no tokio. A credential is `prefix + 32 random base62 + 6-char checksum`, where the
//! checksum is the CRC-32 (IEEE) of everything before it, in base62, most significant digit first.

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use rand::{Rng, TryRngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The base62 alphabet, in the contract's order.
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
const PREFIX_LEN: usize = 5;
/// Total length of every generated credential.
pub const CREDENTIAL_LEN: usize = PREFIX_LEN + RANDOM_LEN + CHECKSUM_LEN;
/// The longest presented credential that is looked at, in bytes: tollgate's own are
/// [`CREDENTIAL_LEN`]; an imported key (contract 5a) may be anything another system issued,
/// up to this. Anything longer is refused before it is hashed or looked up.
pub const MAX_PRESENTED_LEN: usize = 512;

/// What a credential is for; decided by its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `tgsk_`: server-side API key.
    Secret,
    /// `tgpk_`: browser key, read-only methods from allowed origins.
    Publishable,
    /// `tgcs_`: OAuth client secret.
    ClientSecret,
    /// `tgat_`: OAuth access token.
    AccessToken,
    /// `tgmk_`: the operator's key.
    Master,
}

/// Why a presented string is not a well-formed credential. Checked before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The prefix is not one of the five.
    #[error("unknown credential prefix")]
    UnknownPrefix,
    /// Wrong length or characters outside base62.
    #[error("credential is malformed")]
    Malformed,
    /// The checksum does not match the rest.
    #[error("credential checksum does not match")]
    BadChecksum,
}

/// SHA-256 of a raw credential: the only form in which a credential is stored.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

/// A `BuildHasher` for maps keyed by [`KeyHash`] or by its [`KeyHash::prefix`]: the digest is
/// already uniformly random, so its first eight bytes are the map hash and no second hash
/// function runs on the request path.
pub type KeyHashBuilder = BuildHasherDefault<IdentityHasher>;

/// Passes a `u64` through; only meant for [`KeyHash`] keys and their prefixes.
#[derive(Default)]
pub struct IdentityHasher(u64);

// === impl Kind ===

impl Kind {
    /// The five-character prefix, `tgsk_` etc.
    pub const fn prefix(self) -> &'static str {
        match self {
            Kind::Secret => "tgsk_",
            Kind::Publishable => "tgpk_",
            Kind::ClientSecret => "tgcs_",
            Kind::AccessToken => "tgat_",
            Kind::Master => "tgmk_",
        }
    }

    fn from_prefix(prefix: &str) -> Option<Kind> {
        Some(match prefix {
            "tgsk_" => Kind::Secret,
            "tgpk_" => Kind::Publishable,
            "tgcs_" => Kind::ClientSecret,
            "tgat_" => Kind::AccessToken,
            "tgmk_" => Kind::Master,
            _ => return None,
        })
    }
}

// === impl KeyHash ===

impl KeyHash {
    /// Hashes a raw credential.
    pub fn of(raw: &str) -> KeyHash {
        KeyHash(Sha256::digest(raw.as_bytes()).into())
    }

    /// The digest's first eight bytes (little-endian), uniformly random: the hash maps keyed by
    /// key hashes use it as their hash, and the key cache as its map's key.
    pub fn prefix(&self) -> u64 {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        u64::from_le_bytes([a, b, c, d, e, f, g, h])
    }

    /// Lowercase hex, as stored and as accepted by key import.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<KeyHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(KeyHash(out))
    }

    /// Constant-time equality, for comparing secrets.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.prefix());
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Enough to tell two apart in a log, not enough to matter.
        write!(f, "KeyHash({}…)", hex::encode(&self.0[..4]))
    }
}

impl serde::Serialize for KeyHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        KeyHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

// === impl IdentityHasher ===

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a KeyHash is hashed; fold it in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

// === functions ===

/// Makes a fresh credential of `kind` from the OS CSPRNG.
pub fn generate(kind: Kind) -> String {
    // The OS source failing is not recoverable: panicking beats handing out a weak key.
    let mut rng = rand::rngs::OsRng.unwrap_err();
    let mut out = String::with_capacity(CREDENTIAL_LEN);
    out.push_str(kind.prefix());
    while out.len() < PREFIX_LEN + RANDOM_LEN {
        // Rejection sampling: 248 = 4 × 62, so accepted bytes are uniform over the alphabet.
        let byte: u8 = rng.random();
        if byte < 248 {
            out.push(char::from(ALPHABET[usize::from(byte % 62)]));
        }
    }
    let checksum = checksum(out.as_bytes());
    out.push_str(std::str::from_utf8(&checksum).unwrap_or_default());
    out
}

/// A record id: `prefix_` and 20 random base62 characters (`acc_…`, `key_…`). Not a secret.
pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    let mut out = String::with_capacity(prefix.len() + 21);
    out.push_str(prefix);
    out.push('_');
    for _ in 0..20 {
        out.push(char::from(ALPHABET[rng.random_range(0..62)]));
    }
    out
}

/// Checks a presented credential's shape and checksum and says what kind it is.
pub fn parse(raw: &str) -> Result<Kind, FormatError> {
    let bytes = raw.as_bytes();
    if bytes.len() < PREFIX_LEN {
        return Err(FormatError::Malformed);
    }
    let kind = raw
        .get(..PREFIX_LEN)
        .and_then(Kind::from_prefix)
        .ok_or(FormatError::UnknownPrefix)?;
    if bytes.len() != CREDENTIAL_LEN || !bytes[PREFIX_LEN..].iter().all(u8::is_ascii_alphanumeric) {
        return Err(FormatError::Malformed);
    }
    let (body, sum) = bytes.split_at(CREDENTIAL_LEN - CHECKSUM_LEN);
    if checksum(body) != sum {
        return Err(FormatError::BadChecksum);
    }
    Ok(kind)
}

/// The 6-character base62 CRC-32 of `body`.
pub fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = u64::from(crc32fast::hash(body));
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// The first 12 characters, shown in lists.
pub fn display_prefix(raw: &str) -> String {
    raw.chars().take(12).collect()
}

/// `tgsk_Ab3x…9fQ2`: the prefix and four characters, an ellipsis, the last four.
pub fn preview(raw: &str) -> String {
    let chars: Vec<char> = raw.chars().collect();
    if chars.len() <= 13 {
        return raw.to_owned();
    }
    let head: String = chars[..9].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_fixed_vectors() {
        // CRC-32 of "" is 0; of "123456789" is the IEEE check value 0xCBF43926 = 3421780262.
        assert_eq!(&checksum(b""), b"000000");
        assert_eq!(&checksum(b"123456789"), b"3jZRME");
        // 35 characters, two short of a credential: a checksum, though `parse` refuses the length.
        assert_eq!(&checksum(b"tgsk_0123456789abcdefghijABCDEFGHIJ"), b"3P2jQb");
    }

    #[test]
    fn generated_credentials_parse_as_their_kind() {
        for kind in [
            Kind::Secret,
            Kind::Publishable,
            Kind::ClientSecret,
            Kind::AccessToken,
            Kind::Master,
        ] {
            let raw = generate(kind);
            assert_eq!(raw.len(), CREDENTIAL_LEN);
            assert!(raw.starts_with(kind.prefix()));
            assert_eq!(parse(&raw), Ok(kind));
        }
    }

    /// Credentials whose checksums were computed outside this crate (Python's `zlib.crc32` and a
    /// separate base62 encoder), so that a mistake shared by `checksum` and `parse` cannot pass.
    /// The last two bodies were solved for a CRC of 0 (all padding) and of 0xFFFFFFFF (the
    /// largest checksum, `4gfFC3`).
    const FIXED: [(&str, Kind); 4] = [
        ("tgsk_0123456789abcdefghijABCDEFGHIJ012fyiTu", Kind::Secret),
        ("tgmk_0123456789abcdefghijABCDEFGHIJ0140yK5z", Kind::Master),
        ("tgsk_Ytys3w5N1OTpgsJGcDXBbhGR1BKB8WyN000000", Kind::Secret),
        ("tgsk_YOquw2K6lVwwhLVZ6NbvwDWEI8SudpGw4gfFC3", Kind::Secret),
    ];

    #[test]
    fn fixed_credentials_parse_as_their_kind() {
        for (raw, kind) in FIXED {
            assert_eq!(parse(raw), Ok(kind), "{raw}");
            let (body, sum) = raw.split_at(CREDENTIAL_LEN - CHECKSUM_LEN);
            assert_eq!(&checksum(body.as_bytes()), sum.as_bytes(), "{raw}");
        }
    }

    #[test]
    fn a_fixed_credential_with_one_character_changed_is_refused() {
        for (raw, _) in FIXED {
            // One character of the random part, and one of the checksum.
            for at in [PREFIX_LEN + 3, CREDENTIAL_LEN - 1] {
                let mut bytes = raw.as_bytes().to_vec();
                bytes[at] = if bytes[at] == b'Z' { b'Y' } else { b'Z' };
                let changed = String::from_utf8(bytes).unwrap();
                assert_eq!(parse(&changed), Err(FormatError::BadChecksum), "{changed}");
            }
        }
    }

    #[test]
    fn one_changed_character_breaks_the_checksum() {
        let raw = generate(Kind::Secret);
        let mut bytes = raw.into_bytes();
        bytes[10] = if bytes[10] == b'a' { b'b' } else { b'a' };
        let changed = String::from_utf8(bytes).unwrap();
        assert_eq!(parse(&changed), Err(FormatError::BadChecksum));
    }

    #[test]
    fn malformed_inputs_are_told_apart() {
        assert_eq!(parse("tgxx_abc"), Err(FormatError::UnknownPrefix));
        assert_eq!(parse("tgsk_short"), Err(FormatError::Malformed));
        assert_eq!(parse(""), Err(FormatError::Malformed));
        let raw = generate(Kind::Secret).replace('a', "-");
        if raw.contains('-') {
            assert_eq!(parse(&raw), Err(FormatError::Malformed));
        }
    }

    #[test]
    fn preview_and_prefix_show_only_the_ends() {
        let raw = "tgsk_Ab3xZZZZZZZZZZZZZZZZZZZZZZZZZZZZ9fQ2xx";
        assert_eq!(display_prefix(raw), "tgsk_Ab3xZZZ");
        assert_eq!(preview(raw), "tgsk_Ab3x…Q2xx");
    }

    #[test]
    fn hash_round_trips_through_hex() {
        let h = KeyHash::of("tgsk_x");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        assert!(h.ct_eq(&KeyHash::of("tgsk_x")));
        assert!(!h.ct_eq(&KeyHash::of("tgsk_y")));
    }
}

//! The operator's master key, settled once at start-up by [`ensure_master_key`]: from the
//! environment when given (its hash replaces the stored one), else the stored hash, else a fresh
//! `tgmk_` key whose raw value the caller prints once.

use std::fmt;

use crate::credential::{self, FormatError, KeyHash, Kind};
use crate::store::{Records, StoreError};

/// The master key in force.
pub struct MasterKey {
    /// Its hash, what the admin API compares against.
    pub hash: KeyHash,
    /// The raw key, when it was generated just now: print it once; it is not kept anywhere.
    pub generated: Option<String>,
}

/// Why the master key could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// The configured variable holds something other than a valid `tgmk_` credential (the value
    /// itself is never repeated).
    #[error("the master key variable does not hold a valid tgmk_ credential ({0})")]
    NotAMasterKey(&'static str),
    /// The store could not be read or written.
    #[error("the master key could not be stored: {0}")]
    Store(#[from] StoreError),
}

/// Whether `raw` (the configured variable's value) is a valid `tgmk_` credential; checked
/// before start-up too, so that a bad value is a configuration error (exit 2).
pub fn check_master_key(raw: &str) -> Result<(), MasterKeyError> {
    let why = match credential::parse(raw.trim()) {
        Ok(Kind::Master) => return Ok(()),
        Ok(_) => "wrong prefix, expected tgmk_",
        Err(FormatError::UnknownPrefix) => "unknown prefix",
        Err(FormatError::Malformed) => "malformed",
        Err(FormatError::BadChecksum) => "checksum does not match",
    };
    Err(MasterKeyError::NotAMasterKey(why))
}

/// Settles the master key; see the module documentation.
pub async fn ensure_master_key(
    store: &dyn Records,
    from_env: Option<&str>,
) -> Result<MasterKey, MasterKeyError> {
    if let Some(raw) = from_env {
        let raw = raw.trim();
        check_master_key(raw)?;
        let hash = KeyHash::of(raw);
        store.set_master_key_hash(&hash).await?;
        return Ok(MasterKey {
            hash,
            generated: None,
        });
    }
    if let Some(hash) = store.master_key_hash().await? {
        return Ok(MasterKey {
            hash,
            generated: None,
        });
    }
    let raw = credential::generate(Kind::Master);
    let hash = KeyHash::of(&raw);
    store.set_master_key_hash(&hash).await?;
    Ok(MasterKey {
        hash,
        generated: Some(raw),
    })
}

// === impl MasterKey ===

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("hash", &self.hash)
            .field("generated", &self.generated.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

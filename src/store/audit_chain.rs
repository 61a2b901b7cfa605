//! The audit chain: how an account's audit entries are linked by hashes, and how a walk over
//! them finds the first one that does not fit. Pure: no I/O; both stores link entries with
//! [`link`] when they append, and `GET …/audit/verify` feeds entries, oldest first, to a
//! [`ChainWalk`].
//!
//! Each entry stores `prev_hash` (the `hash` of the entry before it in the same account, or
//! [`GENESIS`] for the first) and its own `hash`:
//!
//! ```text
//! hash = SHA-256( "tollgate.audit.v1\n"
//!               ‖ prev_hash                  (32 bytes)
//!               ‖ str(id) ‖ str(actor_id) ‖ str(action) ‖ str(target_type) ‖ str(target_id)
//!               ‖ str(canonical JSON of detail)
//!               ‖ opt(ip) ‖ str(created_at) ‖ opt(account_id) )
//! str(s)     = length of s in bytes as u64 big-endian ‖ the UTF-8 bytes of s
//! opt(None)  = 0x00          opt(Some(s)) = 0x01 ‖ str(s)
//! created_at = RFC 3339 in UTC with nine fraction digits and `Z` (2024-05-01T12:00:00.000000000Z)
//! canonical JSON: no whitespace, object members sorted by the bytes of their keys, strings and
//!                 numbers written as serde_json writes them
//! ```
//!
//! Every field is length-prefixed and the optional ones carry a presence byte, so no two
//! different entries encode alike; hashes are written as 64 lowercase hex digits.

use sha2::{Digest, Sha256};

use super::model::AuditEntry;

/// The `prev_hash` of an account's first chained entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Separates this encoding from any other SHA-256 input, and names its version.
const DOMAIN: &[u8] = b"tollgate.audit.v1\n";

/// The newest link of an account's chain: what the next entry's `prev_hash` must be, and which
/// entry carries it. Kept by the store beside the entries, so that a verify also notices the
/// newest entries going missing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainHead {
    /// The newest chained entry's id.
    pub id: String,
    /// Its `hash`.
    pub hash: String,
}

/// The answer of a walk over an account's chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainVerdict {
    /// Every chained entry up to the head fits.
    pub intact: bool,
    /// Chained entries checked and found good (before the first bad one, if any).
    pub entries: u64,
    /// The first entry that does not fit: changed, out of place, or following a removed one;
    /// or the head's entry if it is missing.
    pub first_bad_id: Option<String>,
}

/// A walk over one account's entries, oldest first, against the head read before it started.
/// Entries older than the first chained one (written before chaining) are skipped; entries
/// after the head (appended during the walk) are not looked at.
#[derive(Debug)]
pub struct ChainWalk {
    head: Option<ChainHead>,
    /// The `hash` the next entry's `prev_hash` must equal; `None` until the first chained entry.
    expected_prev: Option<String>,
    checked: u64,
    outcome: Option<ChainVerdict>,
}

/// Whether a [`ChainWalk`] wants more entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Feed the next entry.
    More,
    /// The verdict is known: [`ChainWalk::finish`].
    Done,
}

/// `SHA-256(prev_hash ‖ canonical entry)` as hex; `prev_hash` is hex (a bad one hashes as given,
/// so it can only produce a hash that does not match).
pub fn entry_hash(prev_hash: &str, entry: &AuditEntry) -> String {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    let mut prev = [0u8; 32];
    match hex::decode_to_slice(prev_hash, &mut prev) {
        Ok(()) => hasher.update(prev),
        Err(_) => {
            hasher.update([0xff]);
            put_str(&mut hasher, prev_hash);
        }
    }
    put_str(&mut hasher, &entry.id);
    put_str(&mut hasher, &entry.actor_id);
    put_str(&mut hasher, &entry.action);
    put_str(&mut hasher, &entry.target_type);
    put_str(&mut hasher, &entry.target_id);
    let mut detail = String::new();
    canonical_json(&entry.detail, &mut detail);
    put_str(&mut hasher, &detail);
    put_opt(&mut hasher, entry.ip.as_deref());
    put_str(
        &mut hasher,
        &entry
            .created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    );
    put_opt(&mut hasher, entry.account_id.as_deref());
    hex::encode(hasher.finalize())
}

/// `entry` as the next link after `head` (`None`: the first link): its `prev_hash` and `hash`
/// set, and the head it makes.
pub fn link(head: Option<&ChainHead>, entry: &mut AuditEntry) -> ChainHead {
    let prev = head.map_or(GENESIS, |h| h.hash.as_str()).to_owned();
    let hash = entry_hash(&prev, entry);
    entry.prev_hash = Some(prev);
    entry.hash = Some(hash.clone());
    ChainHead {
        id: entry.id.clone(),
        hash,
    }
}

fn put_str(hasher: &mut Sha256, s: &str) {
    hasher.update((s.len() as u64).to_be_bytes());
    hasher.update(s.as_bytes());
}

fn put_opt(hasher: &mut Sha256, s: Option<&str>) {
    match s {
        None => hasher.update([0]),
        Some(s) => {
            hasher.update([1]);
            put_str(hasher, s);
        }
    }
}

/// Writes `value` as canonical JSON: no whitespace, object members sorted by key bytes.
fn canonical_json(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(member, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

// === impl ChainWalk ===

impl ChainWalk {
    /// A walk up to `head`, the account's head read before the first entry (`None`: the
    /// account has no chained entries, and any chained entry found is out of place).
    pub fn new(head: Option<ChainHead>) -> ChainWalk {
        ChainWalk {
            head,
            expected_prev: None,
            checked: 0,
            outcome: None,
        }
    }

    /// Checks the next entry, oldest first: `Err(id)` is an entry that could not be read.
    pub fn check(&mut self, entry: Result<&AuditEntry, Option<&str>>) -> Step {
        if self.outcome.is_some() {
            return Step::Done;
        }
        let entry = match entry {
            Ok(entry) => entry,
            Err(id) => return self.bad(id.map(str::to_owned)),
        };
        let (Some(prev), Some(hash)) = (&entry.prev_hash, &entry.hash) else {
            if self.expected_prev.is_none() {
                // Written before chaining began: not part of the chain.
                return Step::More;
            }
            return self.bad(Some(entry.id.clone()));
        };
        let expected = self.expected_prev.as_deref().unwrap_or(GENESIS);
        if prev != expected || entry_hash(prev, entry) != *hash {
            return self.bad(Some(entry.id.clone()));
        }
        let Some(head) = &self.head else {
            // The store says the chain is empty, yet here is a link.
            return self.bad(Some(entry.id.clone()));
        };
        if entry.id == head.id {
            if *hash != head.hash {
                return self.bad(Some(entry.id.clone()));
            }
            self.checked += 1;
            self.outcome = Some(ChainVerdict {
                intact: true,
                entries: self.checked,
                first_bad_id: None,
            });
            return Step::Done;
        }
        self.checked += 1;
        self.expected_prev = Some(hash.clone());
        Step::More
    }

    /// The verdict once the entries ran out (or [`Step::Done`]): a head whose entry never came
    /// means the newest entries are gone.
    pub fn finish(self) -> ChainVerdict {
        if let Some(outcome) = self.outcome {
            return outcome;
        }
        match self.head {
            None => ChainVerdict {
                intact: true,
                entries: self.checked,
                first_bad_id: None,
            },
            Some(head) => ChainVerdict {
                intact: false,
                entries: self.checked,
                first_bad_id: Some(head.id),
            },
        }
    }

    fn bad(&mut self, id: Option<String>) -> Step {
        self.outcome = Some(ChainVerdict {
            intact: false,
            entries: self.checked,
            first_bad_id: id,
        });
        Step::Done
    }
}

#[cfg(test)]
mod tests;

//! Key names: the data model table of [`super`] as functions. Every key starts with `tg:` and
//! carries a hash tag `{…}`, which is also the tag [`super::conn::Batch`] groups commands by.

use std::sync::OnceLock;

use crate::store::Granularity;

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16_384;

/// The tag of the operator-level singletons (account list, audit index, master key hash).
/// Leading underscore: generated ids (`acc_…`, `key_…`) never collide with it.
pub(super) const GLOBAL: &str = "_global";
/// The tag of the usage indexes shared by all keys (bucket owners, last use).
pub(super) const USAGE: &str = "_usage";

/// The counter fields of a usage bucket hash, in [`crate::store::UsageCounts`] order.
pub(super) const COUNTERS: [&str; 6] = [
    "requests",
    "success",
    "error",
    "rate_limited",
    "bytes_in",
    "bytes_out",
];

pub(super) fn account(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:account")
}

pub(super) fn key_ids(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:keys")
}

pub(super) fn key(account_id: &str, key_id: &str) -> String {
    format!("tg:{{{account_id}}}:key:{key_id}")
}

pub(super) fn names(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:names")
}

pub(super) fn sites(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:sites")
}

pub(super) fn site_names(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:site_names")
}

pub(super) fn account_audit(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:audit")
}

/// The newest link of an account's audit chain: [`crate::store::audit_chain::ChainHead`] JSON.
pub(super) fn audit_head(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:audit_head")
}

/// The index (sorted set) of an account's day buckets; a bucket is [`bucket`] of it.
pub(super) fn account_usage(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:account_usage:d")
}

/// The index (sorted set) of a key's buckets of one granularity; a bucket is [`bucket`] of it.
pub(super) fn key_usage(key_id: &str, granularity: Granularity) -> String {
    format!("tg:{{{key_id}}}:usage:{}", letter(granularity))
}

/// A key's shared rate-limit counter for one window (`limits.mode = "global"`); the key's tag
/// keeps its three windows in one slot, so one script takes from all of them.
pub(super) fn rate_counter(key_id: &str, window_secs: u64, index: i64) -> String {
    format!("tg:{{{key_id}}}:rl:{window_secs}:{index}")
}

/// A key's credits: [`crate::store::credits::CreditCounter`] JSON.
pub(super) fn credits(key_id: &str) -> String {
    format!("tg:{{{key_id}}}:credits")
}

/// A lock named after an account (its tag) or anything else.
pub(super) fn lock(name: &str) -> String {
    format!("tg:{{{name}}}:lock")
}

/// The channel on which instances announce cache invalidations.
pub(super) const INVALIDATIONS: &str = "tg:invalidations";

/// One bucket (a hash of [`COUNTERS`]) of a bucket index.
pub(super) fn bucket(index_key: &str, index: i64) -> String {
    format!("{index_key}:{index}")
}

/// The hash index entry of a key hash (hex); its tag is the hex itself, which spreads the
/// entries over the cluster's slots.
pub(super) fn hash_index(hash_hex: &str) -> String {
    format!("tg:keyhash:{{{hash_hex}}}")
}

/// An account's client secrets: a hash of secret id → secret JSON.
pub(super) fn secrets(account_id: &str) -> String {
    format!("tg:{{{account_id}}}:secrets")
}

/// The tokens one client secret issued: a set of token hashes (hex).
pub(super) fn secret_tokens(account_id: &str, secret_id: &str) -> String {
    format!("tg:{{{account_id}}}:secret_tokens:{secret_id}")
}

/// The hash index entry of a client secret (hex): `acc_id` `\n` `sec_id`; tagged by itself.
pub(super) fn secret_hash(hash_hex: &str) -> String {
    format!("tg:secrethash:{{{hash_hex}}}")
}

/// An access token by its hash (hex): the token JSON, expiring with the token.
pub(super) fn token(hash_hex: &str) -> String {
    format!("tg:tokenhash:{{{hash_hex}}}")
}

pub(super) fn accounts() -> String {
    format!("tg:{{{GLOBAL}}}:accounts")
}

pub(super) fn audit() -> String {
    format!("tg:{{{GLOBAL}}}:audit")
}

pub(super) fn master_key_hash() -> String {
    format!("tg:{{{GLOBAL}}}:master_key_hash")
}

/// How many keys marked `imported` the store holds (a counter: `INCRBY`/`DECRBY`).
pub(super) fn imported_keys() -> String {
    format!("tg:{{{GLOBAL}}}:imported_keys")
}

/// Bucket indexes holding buckets of one granularity (members), each scored with (at most) its
/// lowest bucket index, so that pruning finds the owners of old buckets without a scan.
pub(super) fn owners(granularity: Granularity) -> String {
    format!("tg:{{{USAGE}}}:owners:{}", letter(granularity))
}

/// Key id → last use in milliseconds (sorted set; `ZADD GT` keeps the maximum).
pub(super) fn last_used() -> String {
    format!("tg:{{{USAGE}}}:last_used")
}

/// The last usage batch applied from one writer (`SET`, the batch's `seq`) to the usage keys of
/// one cluster slot: `slot_tag` is a tag of that slot ([`slot_tag`]; on a single server, where
/// one script takes the whole batch, [`USAGE`]). One key per (slot, writer), whatever the batch
/// ids, so that they stay few.
pub(super) fn usage_writer(slot_tag: &str, writer: u64) -> String {
    format!("tg:{{{slot_tag}}}:usage_writer:{writer:016x}")
}

/// The cluster slot of a hash tag (CRC16/XMODEM of the tag, modulo 16 384), as Redis computes it.
pub(super) fn slot_of(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in tag.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// A short tag that lands in `slot`: `_s` and a number, the first such number for that slot.
/// The table is built once (about 170 000 hashes, a few milliseconds) on first use.
pub(super) fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = tags.len();
        let mut n = 0u32;
        while missing > 0 {
            let tag = format!("_s{n}");
            let entry = &mut tags[usize::from(slot_of(&tag))];
            if entry.is_empty() {
                *entry = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot % SLOTS)]
}

/// The hash tag of a key name: what is between its first `{` and the next `}`.
pub(super) fn tag_of(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    Some(&rest[..close]).filter(|tag| !tag.is_empty())
}

fn letter(granularity: Granularity) -> char {
    match granularity {
        Granularity::Minute => 'm',
        Granularity::Hour => 'h',
        Granularity::Day => 'd',
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_accounts_records_share_its_tag() {
        for key in [
            account("acc_1"),
            key_ids("acc_1"),
            key("acc_1", "key_9"),
            names("acc_1"),
            sites("acc_1"),
            site_names("acc_1"),
            account_audit("acc_1"),
            bucket(&account_usage("acc_1"), 20_000),
        ] {
            assert_eq!(tag_of(&key), Some("acc_1"), "{key}");
        }
        let usage = key_usage("key_9", Granularity::Hour);
        assert_eq!(usage, "tg:{key_9}:usage:h");
        assert_eq!(tag_of(&bucket(&usage, 5)), Some("key_9"));
        assert_eq!(tag_of(&hash_index("ab12")), Some("ab12"));
        assert_eq!(tag_of(&owners(Granularity::Day)), Some(USAGE));
        assert_eq!(tag_of("tg:{}:x"), None);
    }

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // The cluster specification's check value, and `CLUSTER KEYSLOT` answers.
        assert_eq!(slot_of("123456789"), 0x31C3);
        assert_eq!(slot_of("foo"), 12_182);
        assert_eq!(
            slot_of("_usage"),
            slot_of(tag_of(&last_used()).unwrap_or(""))
        );
        for slot in [0, 1, 12_182, 16_383] {
            assert_eq!(slot_of(slot_tag(slot)), slot);
        }
        assert_eq!(tag_of(&usage_writer("_s7", 255)), Some("_s7"));
    }
}

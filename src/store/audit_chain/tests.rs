use chrono::DateTime;
use serde_json::json;

use super::*;

fn entry(n: u32) -> AuditEntry {
    AuditEntry {
        id: format!("aud_{n}"),
        account_id: Some("acc_1".to_owned()),
        actor_id: "master".to_owned(),
        action: "key.create".to_owned(),
        target_type: "key".to_owned(),
        target_id: format!("key_{n}"),
        detail: json!({ "name": format!("k{n}"), "a": [1, 2.5, null, true] }),
        ip: Some("127.0.0.1".to_owned()),
        created_at: DateTime::from_timestamp(1_714_564_800, 123_000_000).unwrap_or_default(),
        prev_hash: None,
        hash: None,
    }
}

/// `n` linked entries, oldest first, and the head after the last.
fn chain(n: u32) -> (Vec<AuditEntry>, Option<ChainHead>) {
    let mut head = None;
    let mut entries = Vec::new();
    for i in 0..n {
        let mut e = entry(i);
        head = Some(link(head.as_ref(), &mut e));
        entries.push(e);
    }
    (entries, head)
}

fn walk(entries: &[AuditEntry], head: Option<ChainHead>) -> ChainVerdict {
    let mut walk = ChainWalk::new(head);
    for e in entries {
        if walk.check(Ok(e)) == Step::Done {
            break;
        }
    }
    walk.finish()
}

fn bad(entries: u64, id: &str) -> ChainVerdict {
    ChainVerdict {
        intact: false,
        entries,
        first_bad_id: Some(id.to_owned()),
    }
}

fn intact(entries: u64) -> ChainVerdict {
    ChainVerdict {
        intact: true,
        entries,
        first_bad_id: None,
    }
}

#[test]
fn the_canonical_form_is_pinned() {
    // Changing the encoding breaks every stored chain: this value must never change.
    let mut e = entry(0);
    let head = link(None, &mut e);
    assert_eq!(e.prev_hash.as_deref(), Some(GENESIS));
    assert_eq!(head.hash, PINNED);
    assert_eq!(e.hash.as_deref(), Some(PINNED));
}

/// Computed from the documented form by a separate implementation (Python's `hashlib`,
/// `struct.pack('>Q', …)` and `json.dumps(…, sort_keys=True, separators=(',', ':'))`).
const PINNED: &str = "405187c0e905f66c495dd938610a553dfd18514c442e1e421379573325b3f98c";

/// A named change to an entry.
type Change = (&'static str, Box<dyn Fn(&mut AuditEntry)>);

#[test]
fn every_field_is_covered_and_none_differs_from_empty() {
    let base = entry(0);
    let original = entry_hash(GENESIS, &base);
    let changes: Vec<Change> = vec![
        ("id", Box::new(|e| e.id.push('x'))),
        ("actor_id", Box::new(|e| e.actor_id.push('x'))),
        ("action", Box::new(|e| e.action.push('x'))),
        ("target_type", Box::new(|e| e.target_type.push('x'))),
        ("target_id", Box::new(|e| e.target_id.push('x'))),
        ("detail", Box::new(|e| e.detail["name"] = json!("other"))),
        ("ip none", Box::new(|e| e.ip = None)),
        ("ip empty", Box::new(|e| e.ip = Some(String::new()))),
        (
            "created_at",
            Box::new(|e| e.created_at += chrono::Duration::nanoseconds(1)),
        ),
        ("account none", Box::new(|e| e.account_id = None)),
        (
            "account empty",
            Box::new(|e| e.account_id = Some(String::new())),
        ),
        // Moving a character from one field to the next: lengths keep them apart.
        (
            "boundary",
            Box::new(|e| {
                e.action = "key.creat".to_owned();
                e.target_type = "ekey".to_owned();
            }),
        ),
    ];
    let mut seen = std::collections::HashSet::from([original.clone()]);
    for (what, change) in changes {
        let mut changed = base.clone();
        change(&mut changed);
        let hash = entry_hash(GENESIS, &changed);
        assert!(seen.insert(hash), "{what} did not change the hash");
    }
    assert_ne!(entry_hash(&"1".repeat(64), &base), original, "prev_hash");
    assert_ne!(entry_hash("not hex", &base), original, "a bad prev_hash");
}

#[test]
fn detail_member_order_and_a_stored_round_trip_do_not_change_the_hash() {
    let mut a = entry(0);
    a.detail = serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"d":2,"c":3}],"x":"é\n"}}"#)
        .unwrap_or_default();
    let mut b = a.clone();
    b.detail = serde_json::from_str(r#"{"a":{"x":"é\n","y":[1,{"c":3,"d":2}]},"b":1}"#)
        .unwrap_or_default();
    assert_eq!(entry_hash(GENESIS, &a), entry_hash(GENESIS, &b));

    let mut c = entry(0);
    link(None, &mut c);
    let stored = serde_json::to_vec(&c.stored_json().unwrap_or_default()).unwrap_or_default();
    let read = AuditEntry::from_stored(&stored);
    assert_eq!(read.as_ref().ok(), Some(&c));
    assert_eq!(
        walk(
            &[c],
            read.ok().map(|e| ChainHead {
                id: e.id,
                hash: e.hash.unwrap_or_default()
            })
        ),
        intact(1)
    );
}

#[test]
fn an_untouched_chain_is_intact() {
    let (entries, head) = chain(5);
    assert_eq!(walk(&entries, head), intact(5));
    assert_eq!(walk(&[], None), intact(0));
}

#[test]
fn a_changed_entry_is_the_first_bad_one() {
    let (mut entries, head) = chain(5);
    entries[2].detail = json!({ "name": "forged" });
    assert_eq!(walk(&entries, head.clone()), bad(2, "aud_2"));
    // Its hash recomputed to match: the next entry no longer follows it.
    let prev = entries[2].prev_hash.clone().unwrap_or_default();
    entries[2].hash = Some(entry_hash(&prev, &entries[2]));
    assert_eq!(walk(&entries, head), bad(3, "aud_3"));
}

#[test]
fn a_removed_entry_breaks_the_chain_at_the_next_one() {
    let (mut entries, head) = chain(5);
    entries.remove(2);
    assert_eq!(walk(&entries, head.clone()), bad(2, "aud_3"));
    let (mut entries, _) = chain(5);
    entries.remove(0);
    assert_eq!(walk(&entries, head.clone()), bad(0, "aud_1"));
    // The newest gone: the head names it.
    let (mut entries, _) = chain(5);
    entries.pop();
    assert_eq!(walk(&entries, head), bad(4, "aud_4"));
}

#[test]
fn reordered_entries_break_the_chain() {
    let (mut entries, head) = chain(5);
    entries.swap(1, 2);
    assert_eq!(walk(&entries, head), bad(1, "aud_2"));
}

#[test]
fn entries_before_chaining_are_skipped_and_unhashed_ones_after_are_bad() {
    let (chained, head) = chain(3);
    let mut entries = vec![entry(90), entry(91)];
    entries.extend(chained.iter().cloned());
    assert_eq!(walk(&entries, head.clone()), intact(3));

    let mut stripped = chained.clone();
    stripped[1].hash = None;
    assert_eq!(walk(&stripped, head), bad(1, "aud_1"));
    // A link where the store has no head at all is out of place.
    assert_eq!(walk(&chained, None), bad(0, "aud_0"));
}

#[test]
fn entries_after_the_head_are_not_looked_at() {
    let (entries, _) = chain(3);
    let (_, head_at_two) = chain(2);
    let mut later = entries;
    later[2].detail = json!("appended while walking");
    assert_eq!(walk(&later, head_at_two), intact(2));
}

#[test]
fn an_unreadable_entry_is_bad() {
    let (entries, head) = chain(3);
    let mut w = ChainWalk::new(head);
    assert_eq!(w.check(Ok(&entries[0])), Step::More);
    assert_eq!(w.check(Err(Some("aud_1"))), Step::Done);
    assert_eq!(w.finish(), bad(1, "aud_1"));
}

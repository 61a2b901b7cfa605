//! The store conformance suite: every backend must pass [`run_all`], one section per role of
//! the store (records, clients, audit log, usage, fleet, and limit buckets where the store is
//! shared).
//!
//! Each check is an async fn over the role it tests, with its own random id prefix, so the suite
//! also runs against a backend shared with other runs (a reused Redis): nothing assumes the store
//! is empty, and global listings are filtered to the check's own records.

#[path = "common/redis.rs"]
mod redis_harness;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use tollgate::credential::{self, KeyHash, Kind};
use tollgate::store::audit_chain::{ChainVerdict, ChainWalk, Step, GENESIS};
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::redis::RedisStore;
use tollgate::store::{
    AccountRecord, AuditEntry, AuditLog, AuditQuery, AuthMethod, BatchId, Clients, Credits, Fleet,
    Granularity, Invalidation, InvalidationEvent, KeyRecord, KeyType, LimitBuckets, NetworkPolicy,
    Plan, Records, SecretRecord, SharedStore, SiteRecord, Store, StoreError, TokenRecord,
    TokenTake, Usage, UsageCounts, UsageDelta,
};

use redis_harness::{RedisCluster, RedisServer};

// === helpers ===

/// A random prefix for one check's ids.
fn unique() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

fn fresh_hash() -> KeyHash {
    KeyHash::of(&credential::generate(Kind::Secret))
}

/// A base time with whole seconds, plus `secs` (keeps ordering by `created_at` explicit).
fn at(secs: i64) -> DateTime<Utc> {
    let base = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_else(Utc::now);
    base + Duration::seconds(secs)
}

fn account(id: &str, created_at: DateTime<Utc>) -> AccountRecord {
    AccountRecord {
        id: id.to_owned(),
        name: format!("account {id}"),
        auth_method: AuthMethod::ApiKey,
        rate_limit: None,
        network_policy: NetworkPolicy::default(),
        permissions: None,
        plan: Plan::default(),
        active: true,
        shared_rate_limit: None,
        created_at,
        updated_at: created_at,
    }
}

fn key(id: &str, account_id: &str, name: &str, created_at: DateTime<Utc>) -> KeyRecord {
    let raw = credential::generate(Kind::Secret);
    KeyRecord {
        id: id.to_owned(),
        account_id: account_id.to_owned(),
        name: name.to_owned(),
        key_type: KeyType::Secret,
        hash: KeyHash::of(&raw),
        prefix: credential::display_prefix(&raw),
        preview: credential::preview(&raw),
        scopes: None,
        allowed_origins: Vec::new(),
        allowed_ips: Vec::new(),
        rate_limit: None,
        expires_at: None,
        lifetime_secs: None,
        active: true,
        protected: false,
        metadata: serde_json::json!({ "owner": name }),
        credit_pool: None,
        external_id: None,
        imported: false,
        shadow: false,
        created_at,
        updated_at: created_at,
    }
}

fn site(id: &str, account_id: &str, name: &str, created_at: DateTime<Utc>) -> SiteRecord {
    SiteRecord {
        id: id.to_owned(),
        account_id: account_id.to_owned(),
        name: name.to_owned(),
        created_at,
    }
}

fn audit(
    id: &str,
    account_id: Option<&str>,
    action: &str,
    target_id: &str,
    detail: serde_json::Value,
) -> AuditEntry {
    AuditEntry {
        id: id.to_owned(),
        account_id: account_id.map(str::to_owned),
        actor_id: "master".to_owned(),
        action: action.to_owned(),
        target_type: "key".to_owned(),
        target_id: target_id.to_owned(),
        detail,
        ip: Some("127.0.0.1".to_owned()),
        created_at: Utc::now(),
        prev_hash: None,
        hash: None,
    }
}

/// The entry as the caller wrote it, without the links the store added.
fn unlinked(entry: &AuditEntry) -> AuditEntry {
    AuditEntry {
        prev_hash: None,
        hash: None,
        ..entry.clone()
    }
}

/// Every entry of an account's chain, oldest first, read in pages of `page`.
async fn whole_chain(store: &dyn AuditLog, account_id: &str, page: usize) -> Vec<AuditEntry> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let got = store
            .audit_chain_page(account_id, after, page)
            .await
            .unwrap();
        assert!(got.entries.len() <= page);
        out.extend(got.entries.into_iter().map(|e| e.expect("readable")));
        match got.next {
            Some(next) => after = Some(next),
            None => return out,
        }
    }
}

/// The verdict over an account's chain as `GET …/audit/verify` reaches it.
async fn verdict(store: &dyn AuditLog, account_id: &str) -> ChainVerdict {
    let mut walk = ChainWalk::new(store.audit_head(account_id).await.unwrap());
    for entry in whole_chain(store, account_id, 3).await {
        if walk.check(Ok(&entry)) == Step::Done {
            break;
        }
    }
    walk.finish()
}

fn counts(requests: u64, bytes_in: u64) -> UsageCounts {
    UsageCounts {
        requests,
        success: requests,
        error: 0,
        rate_limited: 0,
        bytes_in,
        bytes_out: bytes_in * 2,
    }
}

fn delta(key_id: &str, minute: i64, counts: UsageCounts) -> UsageDelta {
    UsageDelta {
        key_id: key_id.into(),
        account_id: "acc_usage".into(),
        minute,
        counts,
        last_used_ms: minute * 60_000,
    }
}

fn ids<T>(records: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    records.iter().map(|r| id(r).to_owned()).collect()
}

// === the suite ===

/// Runs every role's checks against one backend: the roles every store has, then those its
/// capabilities say it has.
pub async fn run_all(store: SharedStore) {
    assert!(store.ping().await.is_ok());
    records(&*store).await;
    clients(&*store).await;
    audit_log_role(Arc::clone(&store) as Arc<dyn AuditLog>).await;
    usage_role(&*store).await;
    credits_role(Arc::clone(&store) as Arc<dyn Credits>).await;
    fleet(Arc::clone(&store)).await;
    let shared = store.capabilities().shared;
    match Arc::clone(&store).limit_buckets() {
        Some(buckets) => {
            assert!(shared, "only a shared store has limit buckets");
            take_tokens_never_pass_the_limit(buckets).await;
        }
        None => assert!(!shared, "a shared store has limit buckets"),
    }
}

// === role: credits ===

async fn credits_role(store: Arc<dyn Credits>) {
    use tollgate::store::credits::{CreditChange, Refill, RefillInterval, Totals};
    let key = format!("key_{}", unique());
    let now = Utc::now().timestamp_millis();
    assert_eq!(store.credit_state(&key, now).await.unwrap(), None);
    let none = store
        .take_credits(&key, "a", Totals::default(), 5, now)
        .await
        .unwrap();
    assert_eq!(none.granted, 0, "no counter, no credits");

    let refill = Refill {
        interval: RefillInterval::Daily,
        amount: 100,
    };
    let set = CreditChange {
        set: Some(10),
        refill: Some(Some(refill)),
        ..CreditChange::default()
    };
    let state = store.change_credits(&key, set, now).await.unwrap();
    assert_eq!((state.remaining, state.refill), (10, Some(refill)));
    let a = store
        .take_credits(&key, "a", Totals::default(), 4, now)
        .await
        .unwrap();
    let b = store
        .take_credits(&key, "b", Totals::default(), 8, now)
        .await
        .unwrap();
    assert_eq!((a.granted, b.granted), (4, 6));
    assert!(a
        .refill_at_ms
        .is_some_and(|at| at > now && at <= now + 86_400_000));
    assert_eq!(
        store
            .take_credits(&key, "c", Totals::default(), 1, now)
            .await
            .unwrap()
            .granted,
        0
    );
    let reported = Totals {
        epoch: a.epoch,
        received: a.received,
        spent: 3,
        returned: 1,
        refunded: 0,
    };
    store
        .give_back_credits(&key, "a", reported, now)
        .await
        .unwrap();
    // The same totals again (an answer lost, the call repeated) change nothing.
    store
        .give_back_credits(&key, "a", reported, now)
        .await
        .unwrap();
    let state = store.credit_state(&key, now).await.unwrap().unwrap();
    assert_eq!(state.remaining, 7, "a spent 3 and gave 1 back; b holds 6");
    let add = CreditChange {
        add: Some(5),
        ..CreditChange::default()
    };
    assert_eq!(
        store
            .change_credits(&key, add, now)
            .await
            .unwrap()
            .remaining,
        12
    );

    // Takes racing from many tasks: every credit granted once, none twice.
    let set = CreditChange {
        set: Some(200),
        ..CreditChange::default()
    };
    store.change_credits(&key, set, now).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (store, key) = (Arc::clone(&store), key.clone());
        tasks.push(tokio::spawn(async move {
            let (mut got, mut totals) = (0, Totals::default());
            loop {
                let grant = store
                    .take_credits(&key, &format!("i{t}"), totals, 3, now)
                    .await
                    .unwrap();
                if grant.granted == 0 {
                    return got;
                }
                got += grant.granted;
                totals.epoch = grant.epoch;
                totals.received = grant.received;
            }
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    assert_eq!(total, 200);

    store.delete_credits(&key).await.unwrap();
    assert_eq!(store.credit_state(&key, now).await.unwrap(), None);
}

// === role: records ===

async fn records(store: &dyn Records) {
    accounts_crud(store).await;
    account_conflicts(store).await;
    keys_crud(store).await;
    lookup_by_hash(store).await;
    key_name_taken(store).await;
    key_rename(store).await;
    key_names_ignore_case(store).await;
    key_duplicates(store).await;
    key_batches_are_all_or_nothing(store).await;
    imported_keys_are_counted(store).await;
    key_missing(store).await;
    delete_account_cascades(store).await;
    sites(store).await;
    master_key(store).await;
}

async fn accounts_crud(store: &dyn Records) {
    let p = unique();
    // Created out of order: the list is by creation time.
    let b = account(&format!("acc_{p}_b"), at(2));
    let a = account(&format!("acc_{p}_a"), at(1));
    let c = account(&format!("acc_{p}_c"), at(3));
    for acc in [&b, &a, &c] {
        store.create_account(acc).await.unwrap();
    }
    assert_eq!(store.get_account(&a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(
        store.get_account(&format!("acc_{p}_none")).await.unwrap(),
        None
    );

    let listed: Vec<AccountRecord> = store
        .list_accounts()
        .await
        .unwrap()
        .into_iter()
        .filter(|acc| acc.id.starts_with(&format!("acc_{p}_")))
        .collect();
    assert_eq!(listed, vec![a.clone(), b.clone(), c.clone()]);

    let mut changed = b.clone();
    changed.name = "renamed".to_owned();
    changed.active = false;
    changed.plan.max_keys = Some(7);
    changed.updated_at = at(10);
    store.update_account(&changed).await.unwrap();
    assert_eq!(store.get_account(&b.id).await.unwrap(), Some(changed));

    assert_eq!(store.delete_account(&a.id).await.unwrap(), Vec::new());
    assert_eq!(store.get_account(&a.id).await.unwrap(), None);
    let remaining = store
        .list_accounts()
        .await
        .unwrap()
        .into_iter()
        .filter(|acc| acc.id.starts_with(&format!("acc_{p}_")))
        .count();
    assert_eq!(remaining, 2);
}

async fn account_conflicts(store: &dyn Records) {
    let p = unique();
    let a = account(&format!("acc_{p}"), at(0));
    store.create_account(&a).await.unwrap();

    let mut again = a.clone();
    again.name = "other".to_owned();
    assert!(matches!(
        store.create_account(&again).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.get_account(&a.id).await.unwrap(), Some(a.clone()));

    let missing = account(&format!("acc_{p}_missing"), at(0));
    assert!(matches!(
        store.update_account(&missing).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.get_account(&missing.id).await.unwrap(), None);
    assert!(matches!(
        store.delete_account(&missing.id).await,
        Err(StoreError::NotFound)
    ));
}

async fn keys_crud(store: &dyn Records) {
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    let other = account(&format!("acc_{p}_other"), at(0));
    store.create_account(&acc).await.unwrap();
    store.create_account(&other).await.unwrap();

    let k2 = key(&format!("key_{p}_2"), &acc.id, "two", at(2));
    let k1 = key(&format!("key_{p}_1"), &acc.id, "one", at(1));
    let k3 = key(&format!("key_{p}_3"), &acc.id, "three", at(3));
    for k in [&k2, &k1, &k3] {
        store.create_key(k).await.unwrap();
    }

    assert_eq!(
        store.get_key(&acc.id, &k1.id).await.unwrap(),
        Some(k1.clone())
    );
    // A key is only found through its own account.
    assert_eq!(store.get_key(&other.id, &k1.id).await.unwrap(), None);
    assert_eq!(
        store
            .get_key(&acc.id, &format!("key_{p}_none"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.list_keys(&acc.id).await.unwrap(),
        vec![k1.clone(), k2.clone(), k3.clone()]
    );
    assert_eq!(store.list_keys(&other.id).await.unwrap(), Vec::new());

    let mut changed = k2.clone();
    changed.active = false;
    changed.scopes = Some(vec!["read".to_owned()]);
    changed.metadata = serde_json::json!({ "tier": "gold" });
    changed.updated_at = at(10);
    store.update_key(&changed).await.unwrap();
    assert_eq!(
        store.get_key(&acc.id, &k2.id).await.unwrap(),
        Some(changed.clone())
    );
    let found = store.lookup_key(&k2.hash).await.unwrap().unwrap();
    assert_eq!(found.key, changed);

    // Deleting through the wrong account does nothing.
    assert_eq!(store.delete_key(&other.id, &k1.id).await.unwrap(), None);
    assert_eq!(
        store.delete_key(&acc.id, &k1.id).await.unwrap(),
        Some(k1.clone())
    );
    assert_eq!(store.delete_key(&acc.id, &k1.id).await.unwrap(), None);
    assert_eq!(store.get_key(&acc.id, &k1.id).await.unwrap(), None);
    assert!(store.lookup_key(&k1.hash).await.unwrap().is_none());
    assert_eq!(
        ids(&store.list_keys(&acc.id).await.unwrap(), |k| &k.id),
        vec![k2.id.clone(), k3.id.clone()]
    );
    // The deleted key's name is free again.
    let reuse = key(&format!("key_{p}_4"), &acc.id, "one", at(4));
    store.create_key(&reuse).await.unwrap();
}

async fn lookup_by_hash(store: &dyn Records) {
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    store.create_account(&acc).await.unwrap();
    let k = key(&format!("key_{p}"), &acc.id, "main", at(1));
    store.create_key(&k).await.unwrap();

    let found = store.lookup_key(&k.hash).await.unwrap().unwrap();
    assert_eq!(found.key, k);
    assert_eq!(found.account, acc);

    // The account is read fresh with the key.
    let mut changed = acc.clone();
    changed.active = false;
    store.update_account(&changed).await.unwrap();
    let found = store.lookup_key(&k.hash).await.unwrap().unwrap();
    assert_eq!(found.account, changed);
    assert!(found.site_origins.is_empty());

    // The account's sites come with it, and only its own.
    let other = account(&format!("acc_{p}_other"), at(0));
    store.create_account(&other).await.unwrap();
    let s1 = site(&format!("site_{p}_1"), &acc.id, "https://a.example", at(2));
    let s2 = site(
        &format!("site_{p}_2"),
        &other.id,
        "https://b.example",
        at(2),
    );
    store.create_site(&s1).await.unwrap();
    store.create_site(&s2).await.unwrap();
    let found = store.lookup_key(&k.hash).await.unwrap().unwrap();
    assert_eq!(found.site_origins, vec!["https://a.example".to_owned()]);

    assert!(store.lookup_key(&fresh_hash()).await.unwrap().is_none());
}

async fn key_name_taken(store: &dyn Records) {
    let p = unique();
    let a = account(&format!("acc_{p}_a"), at(0));
    let b = account(&format!("acc_{p}_b"), at(0));
    store.create_account(&a).await.unwrap();
    store.create_account(&b).await.unwrap();

    let first = key(&format!("key_{p}_1"), &a.id, "prod", at(1));
    store.create_key(&first).await.unwrap();
    let clash = key(&format!("key_{p}_2"), &a.id, "prod", at(2));
    assert!(matches!(
        store.create_key(&clash).await,
        Err(StoreError::NameTaken)
    ));
    assert_eq!(store.get_key(&a.id, &clash.id).await.unwrap(), None);
    assert!(store.lookup_key(&clash.hash).await.unwrap().is_none());

    // The same name in another account is fine.
    let elsewhere = key(&format!("key_{p}_3"), &b.id, "prod", at(3));
    store.create_key(&elsewhere).await.unwrap();
    assert_eq!(store.list_keys(&a.id).await.unwrap(), vec![first]);
    assert_eq!(store.list_keys(&b.id).await.unwrap(), vec![elsewhere]);
}

async fn key_rename(store: &dyn Records) {
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    store.create_account(&acc).await.unwrap();
    let one = key(&format!("key_{p}_1"), &acc.id, "one", at(1));
    let two = key(&format!("key_{p}_2"), &acc.id, "two", at(2));
    store.create_key(&one).await.unwrap();
    store.create_key(&two).await.unwrap();

    let mut onto_taken = two.clone();
    onto_taken.name = "one".to_owned();
    assert!(matches!(
        store.update_key(&onto_taken).await,
        Err(StoreError::NameTaken)
    ));
    assert_eq!(
        store.get_key(&acc.id, &two.id).await.unwrap(),
        Some(two.clone())
    );

    // Keeping its own name is not a clash.
    let mut same_name = two.clone();
    same_name.active = false;
    store.update_key(&same_name).await.unwrap();

    let mut renamed = same_name.clone();
    renamed.name = "deux".to_owned();
    store.update_key(&renamed).await.unwrap();
    assert_eq!(
        store.get_key(&acc.id, &two.id).await.unwrap(),
        Some(renamed.clone())
    );
    assert_eq!(
        store.lookup_key(&two.hash).await.unwrap().map(|l| l.key),
        Some(renamed.clone())
    );

    // The old name is free, the new one taken.
    let reuse = key(&format!("key_{p}_3"), &acc.id, "two", at(3));
    store.create_key(&reuse).await.unwrap();
    let clash = key(&format!("key_{p}_4"), &acc.id, "deux", at(4));
    assert!(matches!(
        store.create_key(&clash).await,
        Err(StoreError::NameTaken)
    ));
}

/// Key names are unique within an account ignoring ASCII case (`SKB` and `skb` are one name);
/// the record keeps the name as given, and a key may change the case of its own name.
async fn key_names_ignore_case(store: &dyn Records) {
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    store.create_account(&acc).await.unwrap();
    let upper = key(&format!("key_{p}_1"), &acc.id, "SKB", at(1));
    store.create_key(&upper).await.unwrap();
    for name in ["skb", "Skb", "SKB"] {
        taken(
            store,
            &key(&format!("key_{p}_{name}"), &acc.id, name, at(2)),
        )
        .await;
    }
    assert_eq!(name_of(store, &upper).await, "SKB");

    let other = key(&format!("key_{p}_2"), &acc.id, "other", at(3));
    store.create_key(&other).await.unwrap();
    let mut onto = other.clone();
    onto.name = "sKb".to_owned();
    assert!(matches!(
        store.update_key(&onto).await,
        Err(StoreError::NameTaken)
    ));

    // Its own name in another case: allowed, and the name stays taken in every case.
    let mut recased = upper.clone();
    recased.name = "skb".to_owned();
    store.update_key(&recased).await.unwrap();
    assert_eq!(name_of(store, &upper).await, "skb");
    taken(store, &key(&format!("key_{p}_3"), &acc.id, "SKB", at(4))).await;

    // Renamed away or deleted, the name is free in any case.
    let mut away = recased.clone();
    away.name = "moved".to_owned();
    store.update_key(&away).await.unwrap();
    let again = key(&format!("key_{p}_4"), &acc.id, "Skb", at(5));
    store.create_key(&again).await.unwrap();
    store.delete_key(&acc.id, &again.id).await.unwrap();
    let last = key(&format!("key_{p}_5"), &acc.id, "sKB", at(6));
    store.create_key(&last).await.unwrap();
    taken(store, &key(&format!("key_{p}_6"), &acc.id, "MOVED", at(7))).await;
}

/// The stored name of `key`, which must exist.
async fn name_of(store: &dyn Records, key: &KeyRecord) -> String {
    let stored = store.get_key(&key.account_id, &key.id).await.unwrap();
    stored.expect("the key exists").name
}

/// Asserts that creating `key` is refused as `NameTaken`.
async fn taken(store: &dyn Records, key: &KeyRecord) {
    assert!(
        matches!(store.create_key(key).await, Err(StoreError::NameTaken)),
        "{} should be taken",
        key.name
    );
}

async fn key_duplicates(store: &dyn Records) {
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    store.create_account(&acc).await.unwrap();
    let k = key(&format!("key_{p}_1"), &acc.id, "one", at(1));
    store.create_key(&k).await.unwrap();

    let mut same_hash = key(&format!("key_{p}_2"), &acc.id, "two", at(2));
    same_hash.hash = k.hash;
    assert!(matches!(
        store.create_key(&same_hash).await,
        Err(StoreError::AlreadyExists)
    ));

    let same_id = key(&k.id, &acc.id, "three", at(3));
    assert!(matches!(
        store.create_key(&same_id).await,
        Err(StoreError::AlreadyExists)
    ));

    // Nothing of the refused keys was written.
    assert_eq!(store.list_keys(&acc.id).await.unwrap(), vec![k.clone()]);
    assert_eq!(
        store.lookup_key(&k.hash).await.unwrap().map(|l| l.key),
        Some(k.clone())
    );
    let free_again = key(&format!("key_{p}_5"), &acc.id, "two", at(5));
    store.create_key(&free_again).await.unwrap();
}

/// Asserts that `result` refused entry `index` with `want` (`NameTaken` or `AlreadyExists`).
fn refused_at(result: Result<(), StoreError>, index: usize, want: &str) {
    match result {
        Err(StoreError::InBatch { index: got, error }) => {
            let kind = match *error {
                StoreError::NameTaken => "NameTaken",
                StoreError::AlreadyExists => "AlreadyExists",
                ref other => panic!("entry {got}: {other:?}"),
            };
            assert_eq!((got, kind), (index, want));
        }
        other => panic!("expected entry {index} refused with {want}, got {other:?}"),
    }
}

/// `create_keys` writes a batch whole or not at all: a name or hash taken in the store, or
/// twice in the batch, refuses it naming the entry, and nothing of it is readable; a good batch
/// is read back whole by hash and in the account's list.
async fn key_batches_are_all_or_nothing(store: &dyn Records) {
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    let other = account(&format!("acc_{p}_other"), at(0));
    store.create_account(&acc).await.unwrap();
    store.create_account(&other).await.unwrap();
    let held = key(&format!("key_{p}_held"), &acc.id, "Taken", at(1));
    let elsewhere = key(&format!("key_{p}_else"), &other.id, "x", at(1));
    store.create_key(&held).await.unwrap();
    store.create_key(&elsewhere).await.unwrap();
    let batch = |tag: &str| -> Vec<KeyRecord> {
        (0..4)
            .map(|i| {
                let mut k = key(
                    &format!("key_{p}_{tag}{i}"),
                    &acc.id,
                    &format!("{tag} {i}"),
                    at(2 + i),
                );
                k.imported = i % 2 == 0;
                k
            })
            .collect()
    };

    let mut hash_of_another_account = batch("a");
    hash_of_another_account[2].hash = elsewhere.hash;
    refused_at(
        store.create_keys(&hash_of_another_account).await,
        2,
        "AlreadyExists",
    );
    let mut name_taken = batch("b");
    name_taken[3].name = "taKEN".to_owned();
    refused_at(store.create_keys(&name_taken).await, 3, "NameTaken");
    let mut twice_named = batch("c");
    twice_named[2].name = "C 1".to_owned();
    refused_at(store.create_keys(&twice_named).await, 2, "NameTaken");
    let mut twice_hashed = batch("d");
    twice_hashed[1].hash = twice_hashed[0].hash;
    refused_at(store.create_keys(&twice_hashed).await, 1, "AlreadyExists");
    let mut id_taken = batch("e");
    id_taken[1].id = held.id.clone();
    refused_at(store.create_keys(&id_taken).await, 1, "AlreadyExists");
    for refused in [
        &hash_of_another_account,
        &name_taken,
        &twice_named,
        &twice_hashed,
        &id_taken,
    ] {
        for k in refused.iter().filter(|k| k.hash != elsewhere.hash) {
            assert!(
                store.lookup_key(&k.hash).await.unwrap().is_none(),
                "{}",
                k.id
            );
        }
    }
    assert_eq!(store.list_keys(&acc.id).await.unwrap(), vec![held.clone()]);
    // The refused batches' names are free: their entries were never written.
    let good = batch("b");
    store.create_keys(&good).await.unwrap();
    for k in &good {
        let found = store.lookup_key(&k.hash).await.unwrap().expect("written");
        assert_eq!((&found.key, &found.account), (k, &acc));
    }
    let mut listed = vec![held.clone()];
    listed.extend(good.iter().cloned());
    assert_eq!(store.list_keys(&acc.id).await.unwrap(), listed);
    store.create_keys(&[]).await.unwrap();

    // A batch of a thousand, as an import may be.
    let many: Vec<KeyRecord> = (0..1000)
        .map(|i| {
            key(
                &format!("key_{p}_m{i}"),
                &other.id,
                &format!("m{i}"),
                at(10),
            )
        })
        .collect();
    store.create_keys(&many).await.unwrap();
    for k in many.iter().step_by(97) {
        assert_eq!(
            store.lookup_key(&k.hash).await.unwrap().map(|l| l.key),
            Some(k.clone())
        );
    }
    assert_eq!(store.list_keys(&other.id).await.unwrap().len(), 1001);
}

/// The store knows whether it holds imported keys, by creation (either way) and deletion (of
/// the key or its account); a refused batch counts nothing.
async fn imported_keys_are_counted(store: &dyn Records) {
    let p = unique();
    // The store may be shared with other runs: compare with what it said before.
    let before = store.has_imported_keys().await.unwrap();
    let acc = account(&format!("acc_{p}"), at(0));
    store.create_account(&acc).await.unwrap();
    let plain = key(&format!("key_{p}_plain"), &acc.id, "plain", at(1));
    store
        .create_keys(std::slice::from_ref(&plain))
        .await
        .unwrap();
    assert_eq!(store.has_imported_keys().await.unwrap(), before);

    let mut refused = key(&format!("key_{p}_refused"), &acc.id, "PLAIN", at(2));
    refused.imported = true;
    refused_at(
        store.create_keys(std::slice::from_ref(&refused)).await,
        0,
        "NameTaken",
    );
    assert_eq!(store.has_imported_keys().await.unwrap(), before);

    let mut one = key(&format!("key_{p}_1"), &acc.id, "one", at(3));
    one.imported = true;
    store.create_key(&one).await.unwrap();
    assert!(store.has_imported_keys().await.unwrap());
    let mut two = key(&format!("key_{p}_2"), &acc.id, "two", at(4));
    two.imported = true;
    store.create_keys(std::slice::from_ref(&two)).await.unwrap();
    // An update keeps the key imported.
    let mut renamed = one.clone();
    renamed.name = "uno".to_owned();
    store.update_key(&renamed).await.unwrap();

    store.delete_key(&acc.id, &one.id).await.unwrap();
    assert!(
        store.has_imported_keys().await.unwrap(),
        "two is still there"
    );
    store.delete_account(&acc.id).await.unwrap();
    assert_eq!(store.has_imported_keys().await.unwrap(), before);
}

async fn key_missing(store: &dyn Records) {
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    store.create_account(&acc).await.unwrap();
    let ghost = key(&format!("key_{p}"), &acc.id, "ghost", at(1));
    assert!(matches!(
        store.update_key(&ghost).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.delete_key(&acc.id, &ghost.id).await.unwrap(), None);
    assert!(store.lookup_key(&ghost.hash).await.unwrap().is_none());
}

async fn delete_account_cascades(store: &dyn Records) {
    let p = unique();
    let doomed = account(&format!("acc_{p}_doomed"), at(0));
    let kept = account(&format!("acc_{p}_kept"), at(0));
    store.create_account(&doomed).await.unwrap();
    store.create_account(&kept).await.unwrap();

    let d2 = key(&format!("key_{p}_d2"), &doomed.id, "two", at(2));
    let d1 = key(&format!("key_{p}_d1"), &doomed.id, "one", at(1));
    let k1 = key(&format!("key_{p}_k1"), &kept.id, "one", at(1));
    for k in [&d2, &d1, &k1] {
        store.create_key(k).await.unwrap();
    }
    store
        .create_site(&site(
            &format!("site_{p}_d"),
            &doomed.id,
            "https://d.example",
            at(1),
        ))
        .await
        .unwrap();
    let kept_site = site(&format!("site_{p}_k"), &kept.id, "https://k.example", at(1));
    store.create_site(&kept_site).await.unwrap();

    let removed = store.delete_account(&doomed.id).await.unwrap();
    assert_eq!(removed, vec![d1.clone(), d2.clone()]);

    assert_eq!(store.get_account(&doomed.id).await.unwrap(), None);
    assert!(store.lookup_key(&d1.hash).await.unwrap().is_none());
    assert!(store.lookup_key(&d2.hash).await.unwrap().is_none());
    assert_eq!(store.get_key(&doomed.id, &d1.id).await.unwrap(), None);
    assert_eq!(store.list_keys(&doomed.id).await.unwrap(), Vec::new());
    assert_eq!(store.list_sites(&doomed.id).await.unwrap(), Vec::new());

    // The other account is untouched.
    assert_eq!(store.list_keys(&kept.id).await.unwrap(), vec![k1.clone()]);
    assert_eq!(
        store.lookup_key(&k1.hash).await.unwrap().map(|l| l.key),
        Some(k1)
    );
    assert_eq!(store.list_sites(&kept.id).await.unwrap(), vec![kept_site]);

    // A re-created account with that id starts empty, and the names are free.
    store.create_account(&doomed).await.unwrap();
    assert_eq!(store.list_keys(&doomed.id).await.unwrap(), Vec::new());
    let reuse = key(&format!("key_{p}_d3"), &doomed.id, "one", at(3));
    store.create_key(&reuse).await.unwrap();
    let reuse_hash = key(&d1.id, &doomed.id, "again", at(4));
    store.create_key(&reuse_hash).await.unwrap();
}

async fn sites(store: &dyn Records) {
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    let other = account(&format!("acc_{p}_other"), at(0));
    store.create_account(&acc).await.unwrap();
    store.create_account(&other).await.unwrap();

    let s2 = site(&format!("site_{p}_2"), &acc.id, "https://b.example", at(2));
    let s1 = site(&format!("site_{p}_1"), &acc.id, "https://a.example", at(1));
    store.create_site(&s2).await.unwrap();
    store.create_site(&s1).await.unwrap();
    assert_eq!(
        store.list_sites(&acc.id).await.unwrap(),
        vec![s1.clone(), s2.clone()]
    );

    let dup_name = site(&format!("site_{p}_3"), &acc.id, "https://a.example", at(3));
    assert!(matches!(
        store.create_site(&dup_name).await,
        Err(StoreError::AlreadyExists)
    ));
    // The same origin in another account is fine.
    let elsewhere = site(
        &format!("site_{p}_4"),
        &other.id,
        "https://a.example",
        at(4),
    );
    store.create_site(&elsewhere).await.unwrap();
    assert_eq!(store.list_sites(&other.id).await.unwrap(), vec![elsewhere]);

    assert!(store.delete_site(&acc.id, &s1.id).await.unwrap());
    assert!(!store.delete_site(&acc.id, &s1.id).await.unwrap());
    assert!(!store.delete_site(&other.id, &s2.id).await.unwrap());
    assert_eq!(store.list_sites(&acc.id).await.unwrap(), vec![s2]);
    // Its name is free again.
    store.create_site(&dup_name).await.unwrap();
}

async fn master_key(store: &dyn Records) {
    let first = fresh_hash();
    store.set_master_key_hash(&first).await.unwrap();
    assert!(store.master_key_hash().await.unwrap() == Some(first));
    let second = fresh_hash();
    store.set_master_key_hash(&second).await.unwrap();
    assert!(store.master_key_hash().await.unwrap() == Some(second));
}

// === role: clients ===

fn secret(id: &str, account_id: &str, created_at: DateTime<Utc>) -> (String, SecretRecord) {
    let raw = credential::generate(Kind::ClientSecret);
    let record = SecretRecord {
        id: id.to_owned(),
        account_id: account_id.to_owned(),
        hash: KeyHash::of(&raw),
        prefix: raw[..12].to_owned(),
        preview: format!("{}…{}", &raw[..9], &raw[raw.len() - 4..]),
        created_at,
    };
    (raw, record)
}

fn token(secret: &SecretRecord, expires_in: Duration) -> TokenRecord {
    TokenRecord {
        hash: KeyHash::of(&credential::generate(Kind::AccessToken)),
        account_id: secret.account_id.clone(),
        secret_id: secret.id.clone(),
        scopes: Some(vec!["orders:read".to_owned()]),
        expires_at: Utc::now() + expires_in,
        created_at: Utc::now(),
    }
}

/// Client secrets by account and by hash; tokens by hash; a deleted secret takes its tokens.
async fn clients(store: &dyn Clients) {
    let p = unique();
    let acc = format!("acc_{p}");
    let other = format!("acc_{p}_other");
    let (_, second) = secret(&format!("sec_{p}_2"), &acc, at(2));
    let (raw, first) = secret(&format!("sec_{p}_1"), &acc, at(1));
    let (_, elsewhere) = secret(&format!("sec_{p}_3"), &other, at(1));
    for s in [&second, &first, &elsewhere] {
        store.create_secret(s).await.unwrap();
    }
    assert_eq!(
        store.list_secrets(&acc).await.unwrap(),
        vec![first.clone(), second.clone()]
    );
    assert_eq!(
        store.find_secret(&KeyHash::of(&raw)).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.find_secret(&fresh_hash()).await.unwrap(), None);
    // Neither the id nor the hash can be taken twice.
    let (_, same_id) = secret(&first.id, &acc, at(3));
    assert!(matches!(
        store.create_secret(&same_id).await,
        Err(StoreError::AlreadyExists)
    ));
    let same_hash = SecretRecord {
        id: format!("sec_{p}_4"),
        ..first.clone()
    };
    assert!(matches!(
        store.create_secret(&same_hash).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.list_secrets(&acc).await.unwrap().len(), 2);

    let t1 = token(&first, Duration::hours(1));
    let t2 = token(&first, Duration::hours(1));
    let kept = token(&second, Duration::hours(1));
    for t in [&t1, &t2, &kept] {
        store.create_token(t).await.unwrap();
    }
    assert_eq!(store.find_token(&t1.hash).await.unwrap(), Some(t1.clone()));
    assert!(matches!(
        store.create_token(&t1).await,
        Err(StoreError::AlreadyExists)
    ));

    // Deleting a secret revokes its tokens, and only its.
    let (deleted, mut revoked) = store
        .delete_secret(&acc, &first.id)
        .await
        .unwrap()
        .expect("deleted");
    assert_eq!(deleted, first);
    revoked.sort_by_key(|h| h.0);
    let mut expected = vec![t1.hash, t2.hash];
    expected.sort_by_key(|h| h.0);
    assert_eq!(revoked, expected);
    assert_eq!(store.find_token(&t1.hash).await.unwrap(), None);
    assert_eq!(store.find_token(&t2.hash).await.unwrap(), None);
    assert_eq!(store.find_secret(&first.hash).await.unwrap(), None);
    assert_eq!(store.find_token(&kept.hash).await.unwrap(), Some(kept));
    assert_eq!(store.list_secrets(&acc).await.unwrap(), vec![second]);
    assert_eq!(store.delete_secret(&acc, &first.id).await.unwrap(), None);
    // Another account's secret is not this account's to delete.
    assert_eq!(
        store.delete_secret(&acc, &elsewhere.id).await.unwrap(),
        None
    );
    // The hash of a deleted secret is free again.
    store.create_secret(&first).await.unwrap();

    // Expired tokens are forgotten by the next prune (a backend with TTLs forgets them itself).
    let expired = token(&first, Duration::milliseconds(-1));
    let live = token(&first, Duration::hours(1));
    store.create_token(&expired).await.unwrap();
    store.create_token(&live).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    store.prune_tokens(Utc::now()).await.unwrap();
    assert_eq!(store.find_token(&expired.hash).await.unwrap(), None);
    assert_eq!(
        store.find_token(&live.hash).await.unwrap(),
        Some(live.clone())
    );
    // A pruned token is not revoked again with its secret; the live one is.
    let (_, revoked) = store
        .delete_secret(&acc, &first.id)
        .await
        .unwrap()
        .expect("deleted");
    assert_eq!(revoked, vec![live.hash]);
}

// === role: audit log ===

async fn audit_log_role(store: Arc<dyn AuditLog>) {
    audit_log(&*store).await;
    audit_chain_links_each_account(&*store).await;
    audit_batches_append_in_order(&*store).await;
    audit_chain_stays_linear_under_concurrent_appends(&store).await;
}

/// `append_audits` is `append_audit` for each entry, in order: one chain, linked in that order.
async fn audit_batches_append_in_order(store: &dyn AuditLog) {
    let p = unique();
    let acc = format!("acc_{p}");
    store
        .append_audit(&audit(
            &format!("aud_{p}_0"),
            Some(&acc),
            "create_key",
            "k0",
            serde_json::json!({}),
        ))
        .await
        .unwrap();
    let batch: Vec<AuditEntry> = (1..=5)
        .map(|i| {
            audit(
                &format!("aud_{p}_{i}"),
                Some(&acc),
                "create_key",
                &format!("k{i}"),
                serde_json::json!({ "imported": true }),
            )
        })
        .collect();
    store.append_audits(&batch).await.unwrap();
    let chain = whole_chain(store, &acc, 100).await;
    assert_eq!(
        ids(&chain, |e| &e.id),
        (0..=5).map(|i| format!("aud_{p}_{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        verdict(store, &acc).await,
        ChainVerdict {
            intact: true,
            entries: 6,
            first_bad_id: None
        }
    );
}

async fn audit_log(store: &dyn AuditLog) {
    let p = unique();
    let acc_a = format!("acc_{p}_a");
    let acc_b = format!("acc_{p}_b");
    let create = format!("{p}.key.create");
    let delete = format!("{p}.key.delete");
    // Appended oldest first: e0 .. e5.
    let entries = vec![
        audit(
            &format!("aud_{p}_0"),
            Some(&acc_a),
            &create,
            "key_x",
            serde_json::json!({}),
        ),
        audit(
            &format!("aud_{p}_1"),
            Some(&acc_b),
            &create,
            "key_y",
            serde_json::json!({ "name": "Needle-In-Detail" }),
        ),
        audit(
            &format!("aud_{p}_2"),
            Some(&acc_a),
            &delete,
            "key_x",
            serde_json::json!({}),
        ),
        audit(
            &format!("aud_{p}_3"),
            None,
            &create,
            "key_z",
            serde_json::json!({}),
        ),
        audit(
            &format!("aud_{p}_4"),
            Some(&acc_a),
            &create,
            "key_NEEDLE_target",
            serde_json::json!({}),
        ),
        audit(
            &format!("aud_{p}_5"),
            Some(&acc_a),
            &create,
            "key_w",
            serde_json::json!({}),
        ),
    ];
    for e in &entries {
        store.append_audit(e).await.unwrap();
    }
    let audit_ids =
        |idx: &[usize]| -> Vec<String> { idx.iter().map(|i| entries[*i].id.clone()).collect() };
    let query = |limit, offset, action: Option<&str>, search: Option<&str>| AuditQuery {
        limit,
        offset,
        actions: action.into_iter().map(str::to_owned).collect(),
        search: search.map(str::to_owned),
    };

    // One account, newest first, with the account id kept.
    let page = store
        .list_audit(Some(&acc_a), &query(100, 0, None, None))
        .await
        .unwrap();
    assert_eq!(page.total, 4);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[5, 4, 2, 0]));
    assert_eq!(unlinked(&page.entries[0]), entries[5]);
    assert!(page
        .entries
        .iter()
        .all(|e| e.account_id.as_deref() == Some(acc_a.as_str())));

    // Paging: total counts all matches.
    let page = store
        .list_audit(Some(&acc_a), &query(2, 1, None, None))
        .await
        .unwrap();
    assert_eq!(page.total, 4);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[4, 2]));
    let page = store
        .list_audit(Some(&acc_a), &query(10, 4, None, None))
        .await
        .unwrap();
    assert_eq!(page.total, 4);
    assert!(page.entries.is_empty());

    // Action filter, on one account and on all.
    let page = store
        .list_audit(Some(&acc_a), &query(100, 0, Some(&delete), None))
        .await
        .unwrap();
    assert_eq!(page.total, 1);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[2]));
    let page = store
        .list_audit(None, &query(100, 0, Some(&create), None))
        .await
        .unwrap();
    assert_eq!(page.total, 5);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[5, 4, 3, 1, 0]));
    assert_eq!(page.entries[2].account_id, None);
    assert_eq!(page.entries[3].account_id.as_deref(), Some(acc_b.as_str()));
    let page = store
        .list_audit(None, &query(2, 1, Some(&create), None))
        .await
        .unwrap();
    assert_eq!(page.total, 5);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[4, 3]));
    // Any of several names (an action's current and legacy names).
    let either = AuditQuery {
        actions: vec![delete.clone(), create.clone()],
        ..query(100, 0, None, None)
    };
    let page = store.list_audit(Some(&acc_a), &either).await.unwrap();
    assert_eq!(page.total, 4);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[5, 4, 2, 0]));

    // Search is a case-insensitive substring of target id, detail, action.
    let page = store
        .list_audit(None, &query(100, 0, Some(&create), Some("needle")))
        .await
        .unwrap();
    assert_eq!(page.total, 2);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[4, 1]));
    let page = store
        .list_audit(Some(&acc_b), &query(100, 0, None, Some("NEEDLE-in")))
        .await
        .unwrap();
    assert_eq!(page.total, 1);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[1]));
    let page = store
        .list_audit(None, &query(100, 0, None, Some(&delete.to_uppercase())))
        .await
        .unwrap();
    assert_eq!(page.total, 1);
    assert_eq!(ids(&page.entries, |e| &e.id), audit_ids(&[2]));
    let page = store
        .list_audit(
            Some(&acc_a),
            &query(100, 0, None, Some(&format!("{p}-nothing"))),
        )
        .await
        .unwrap();
    assert_eq!(page.total, 0);
    assert!(page.entries.is_empty());

    // An account without entries.
    let page = store
        .list_audit(Some(&format!("acc_{p}_none")), &query(100, 0, None, None))
        .await
        .unwrap();
    assert_eq!(page.total, 0);
    assert!(page.entries.is_empty());
}

async fn audit_chain_links_each_account(store: &dyn AuditLog) {
    let p = unique();
    let (acc_a, acc_b) = (format!("acc_{p}_a"), format!("acc_{p}_b"));
    assert_eq!(store.audit_head(&acc_a).await.unwrap(), None);
    let empty = store.audit_chain_page(&acc_a, None, 10).await.unwrap();
    assert!(empty.entries.is_empty() && empty.next.is_none());
    assert!(verdict(store, &acc_a).await.intact);

    // Interleaved with another account's entries and an unchained operator entry; a link the
    // caller sets is replaced by the store's.
    let mut written = Vec::new();
    for i in 0..7 {
        let mut e = audit(
            &format!("aud_{p}_a{i}"),
            Some(&acc_a),
            "key.create",
            "k",
            serde_json::json!({ "i": i }),
        );
        e.hash = Some("forged".to_owned());
        store.append_audit(&e).await.unwrap();
        written.push(e);
        let other = audit(
            &format!("aud_{p}_b{i}"),
            Some(&acc_b),
            "key.create",
            "k",
            serde_json::json!({}),
        );
        store.append_audit(&other).await.unwrap();
        let operator = audit(
            &format!("aud_{p}_o{i}"),
            None,
            "key.create",
            "k",
            serde_json::json!({}),
        );
        store.append_audit(&operator).await.unwrap();
    }

    for page in [1, 2, 7, 100] {
        let chain = whole_chain(store, &acc_a, page).await;
        assert_eq!(
            chain.iter().map(unlinked).collect::<Vec<_>>(),
            written.iter().map(unlinked).collect::<Vec<_>>(),
            "oldest first in pages of {page}"
        );
        let mut prev = GENESIS.to_owned();
        for e in &chain {
            assert_eq!(e.prev_hash.as_deref(), Some(prev.as_str()), "{}", e.id);
            prev = e.hash.clone().expect("a hash");
            assert_eq!(prev.len(), 64);
        }
        let head = store.audit_head(&acc_a).await.unwrap().expect("a head");
        assert_eq!(
            (head.id.as_str(), head.hash.as_str()),
            (chain[6].id.as_str(), prev.as_str())
        );
    }
    assert_eq!(
        verdict(store, &acc_a).await,
        ChainVerdict {
            intact: true,
            entries: 7,
            first_bad_id: None
        }
    );
    assert_eq!(verdict(store, &acc_b).await.entries, 7);

    // The listing shows the same links; the operator entry has none.
    let page = store
        .list_audit(
            None,
            &AuditQuery {
                limit: 100,
                offset: 0,
                actions: Vec::new(),
                search: Some(p.clone()),
            },
        )
        .await
        .unwrap();
    for e in &page.entries {
        let chained = e.account_id.is_some();
        assert_eq!(
            (e.prev_hash.is_some(), e.hash.is_some()),
            (chained, chained),
            "{}",
            e.id
        );
    }
}

async fn audit_chain_stays_linear_under_concurrent_appends(store: &Arc<dyn AuditLog>) {
    let acc = format!("acc_{}", unique());
    append_at_once(&[store], &acc, 24).await;
    assert_chain_intact(&**store, &acc, 24).await;
}

/// `n` audit entries of `acc` appended at once, spread over `stores` in turn.
async fn append_at_once(stores: &[&Arc<dyn AuditLog>], acc: &str, n: usize) {
    let p = unique();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = Arc::clone(stores[i % stores.len()]);
            let e = audit(
                &format!("aud_{p}_{i}"),
                Some(acc),
                "key.update",
                "k",
                serde_json::json!({ "i": i }),
            );
            tokio::spawn(async move { store.append_audit(&e).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

async fn assert_chain_intact(store: &dyn AuditLog, acc: &str, entries: u64) {
    assert_eq!(
        verdict(store, acc).await,
        ChainVerdict {
            intact: true,
            entries,
            first_bad_id: None
        }
    );
}

// === role: usage ===

async fn usage_role(store: &dyn Usage) {
    usage(store).await;
    usage_batches_apply_once(store).await;
    usage_rollups(store).await;
}

async fn usage(store: &dyn Usage) {
    let p = unique();
    let k = format!("key_{p}");
    let other = format!("key_{p}_other");
    let m = 28_000_000_i64;

    store
        .add_usage(
            BatchId::first(),
            &[
                delta(&k, m, counts(1, 10)),
                delta(&k, m + 1, counts(2, 20)),
                delta(&other, m, counts(100, 1000)),
            ],
        )
        .await
        .unwrap();
    // A second batch merges into the buckets; a batch may hold the same bucket twice.
    store
        .add_usage(
            BatchId::first(),
            &[
                delta(&k, m, counts(3, 30)),
                delta(&k, m + 5, counts(4, 40)),
                delta(&k, m + 5, counts(1, 1)),
            ],
        )
        .await
        .unwrap();
    store.add_usage(BatchId::first(), &[]).await.unwrap();

    let all = store
        .key_usage(&k, Granularity::Minute, m - 10, m + 10)
        .await
        .unwrap();
    assert_eq!(
        all,
        vec![
            (m, counts(4, 40)),
            (m + 1, counts(2, 20)),
            (m + 5, counts(5, 41)),
        ]
    );
    // [from, to): from included, to excluded.
    assert_eq!(
        store
            .key_usage(&k, Granularity::Minute, m, m + 5)
            .await
            .unwrap(),
        vec![(m, counts(4, 40)), (m + 1, counts(2, 20))]
    );
    assert_eq!(
        store
            .key_usage(&k, Granularity::Minute, m + 1, m + 6)
            .await
            .unwrap(),
        vec![(m + 1, counts(2, 20)), (m + 5, counts(5, 41))]
    );
    assert_eq!(
        store
            .key_usage(&k, Granularity::Minute, m + 2, m + 5)
            .await
            .unwrap(),
        Vec::new()
    );
    assert_eq!(
        store
            .key_usage(&k, Granularity::Minute, m, m)
            .await
            .unwrap(),
        Vec::new()
    );
    assert_eq!(
        store
            .key_usage(&k, Granularity::Minute, m + 6, m)
            .await
            .unwrap(),
        Vec::new()
    );

    // Other keys are unaffected.
    assert_eq!(
        store
            .key_usage(&other, Granularity::Minute, m - 10, m + 10)
            .await
            .unwrap(),
        vec![(m, counts(100, 1000))]
    );
    assert_eq!(
        store
            .key_usage(
                &format!("key_{p}_none"),
                Granularity::Minute,
                m - 10,
                m + 10
            )
            .await
            .unwrap(),
        Vec::new()
    );
}

/// A batch applied again under its id — a retry after an answer was lost — changes nothing;
/// nor does an older batch of the same writer. Other writers' batches are their own.
async fn usage_batches_apply_once(store: &dyn Usage) {
    let p = unique();
    let (a, b) = (format!("key_{p}_a"), format!("key_{p}_b"));
    let account = format!("acc_{p}");
    let on = |key: &str, minute: i64, c: UsageCounts| UsageDelta {
        key_id: key.into(),
        account_id: account.as_str().into(),
        minute,
        counts: c,
        last_used_ms: minute * 60_000,
    };
    let m = 28_000_000_i64;
    let day = Granularity::Day.of_minute(m);
    let first = BatchId::first();
    // Two keys and the account: three hash tags (on a cluster, likely three slots).
    let batch = [on(&a, m, counts(1, 10)), on(&b, m + 1, counts(2, 20))];
    for _ in 0..3 {
        store.add_usage(first, &batch).await.unwrap();
    }
    let minutes = |key: String| async move {
        store
            .key_usage(&key, Granularity::Minute, 0, i64::MAX)
            .await
            .unwrap()
    };
    assert_eq!(minutes(a.clone()).await, vec![(m, counts(1, 10))]);
    assert_eq!(minutes(b.clone()).await, vec![(m + 1, counts(2, 20))]);
    assert_eq!(
        store.account_usage(&account, day, day + 1).await.unwrap(),
        vec![(day, counts(3, 30))]
    );

    // The writer's next batch counts; then neither it nor the first one again.
    let second = first.next();
    store
        .add_usage(second, &[on(&a, m, counts(4, 40))])
        .await
        .unwrap();
    store
        .add_usage(second, &[on(&a, m, counts(4, 40))])
        .await
        .unwrap();
    store.add_usage(first, &batch).await.unwrap();
    assert_eq!(minutes(a.clone()).await, vec![(m, counts(5, 50))]);
    assert_eq!(minutes(b.clone()).await, vec![(m + 1, counts(2, 20))]);

    // Another writer numbers its own batches.
    let other = BatchId::first();
    assert_ne!(other.writer, first.writer);
    store.add_usage(other, &batch).await.unwrap();
    assert_eq!(minutes(a).await, vec![(m, counts(6, 60))]);
    assert_eq!(minutes(b).await, vec![(m + 1, counts(4, 40))]);
    assert_eq!(
        store.account_usage(&account, day, day + 1).await.unwrap(),
        vec![(day, counts(10, 100))]
    );
}

async fn usage_rollups(store: &dyn Usage) {
    let p = unique();
    let (a, b) = (format!("key_{p}_a"), format!("key_{p}_b"));
    let account = format!("acc_{p}");
    let on = |key: &str, minute: i64, c: UsageCounts, last: i64| UsageDelta {
        key_id: key.into(),
        account_id: account.as_str().into(),
        minute,
        counts: c,
        last_used_ms: last,
    };
    // Day 20_000 starts at minute 28_800_000; its hour 480_000 likewise.
    let day = 20_000_i64;
    let m = day * 1_440;
    store
        .add_usage(
            BatchId::first(),
            &[
                on(&a, m, counts(1, 1), m * 60_000 + 5),
                on(&a, m + 59, counts(2, 2), (m + 59) * 60_000 + 9),
                on(&a, m + 60, counts(4, 4), (m + 60) * 60_000 + 3),
                on(&b, m + 1_439, counts(8, 8), 0),
                on(&b, m + 1_440, counts(16, 16), 0),
            ],
        )
        .await
        .unwrap();
    let hours = store
        .key_usage(&a, Granularity::Hour, 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(
        hours,
        vec![(day * 24, counts(3, 3)), (day * 24 + 1, counts(4, 4))]
    );
    let days = store
        .key_usage(&a, Granularity::Day, 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(days, vec![(day, counts(7, 7))]);
    let b_days = store
        .key_usage(&b, Granularity::Day, 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(b_days, vec![(day, counts(8, 8)), (day + 1, counts(16, 16))]);
    // Account totals are the sum of its keys, by day.
    let totals = store.account_usage(&account, day, day + 2).await.unwrap();
    assert_eq!(
        totals,
        vec![(day, counts(15, 15)), (day + 1, counts(16, 16))]
    );
    assert_eq!(
        store
            .account_usage(&account, day + 1, day + 2)
            .await
            .unwrap()
            .len(),
        1
    );
    // Last use is the latest ever written, whatever the batch order.
    store
        .add_usage(BatchId::first(), &[on(&a, m, counts(1, 0), m * 60_000 + 7)])
        .await
        .unwrap();
    let last = store
        .last_used(&[a.clone(), format!("key_{p}_never")])
        .await
        .unwrap();
    assert_eq!(last, vec![Some((m + 60) * 60_000 + 3), None]);
    // Pruning removes only buckets before the cut, for that granularity only.
    let removed = store
        .prune_usage(Granularity::Minute, m + 60)
        .await
        .unwrap();
    assert!(removed >= 2, "removed {removed}");
    let minutes = store
        .key_usage(&a, Granularity::Minute, 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(minutes, vec![(m + 60, counts(4, 4))]);
    // A key's last use outlives the minute buckets it was written with.
    store
        .prune_usage(Granularity::Minute, m + 1_441)
        .await
        .unwrap();
    assert!(store
        .key_usage(&a, Granularity::Minute, 0, i64::MAX)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.last_used(std::slice::from_ref(&a)).await.unwrap(),
        vec![Some((m + 60) * 60_000 + 3)]
    );
    assert_eq!(
        store
            .key_usage(&a, Granularity::Hour, 0, i64::MAX)
            .await
            .unwrap()
            .len(),
        2
    );
    store.prune_usage(Granularity::Day, day + 1).await.unwrap();
    assert_eq!(
        store
            .key_usage(&b, Granularity::Day, 0, i64::MAX)
            .await
            .unwrap(),
        vec![(day + 1, counts(16, 16))]
    );
    assert_eq!(
        store.account_usage(&account, 0, i64::MAX).await.unwrap(),
        vec![(day + 1, counts(16, 16))]
    );
}

// === role: fleet ===

/// What instances tell each other. A shared store delivers invalidations to every subscriber,
/// this one included, after a first `Resync`, and its locks exclude other holders until released
/// or expired; a store that only one process opens has nobody to tell and nobody to exclude.
async fn fleet(store: SharedStore) {
    let name = format!("lock_{}", unique());
    let ttl = std::time::Duration::from_secs(30);
    assert!(store.try_lock(&name, "a", ttl).await.unwrap());
    let shared = store.capabilities().shared;
    // Another holder is refused only where there can be another holder.
    assert_eq!(store.try_lock(&name, "b", ttl).await.unwrap(), !shared);
    store.unlock(&name, "b").await.unwrap();
    assert_eq!(store.try_lock(&name, "b", ttl).await.unwrap(), !shared);
    store.unlock(&name, "a").await.unwrap();
    assert!(store.try_lock(&name, "b", ttl).await.unwrap());
    store.unlock(&name, "b").await.unwrap();
    // A lock that is not released expires.
    let brief = format!("lock_{}", unique());
    let short = std::time::Duration::from_millis(50);
    assert!(store.try_lock(&brief, "a", short).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(120)).await;
    assert!(store.try_lock(&brief, "b", ttl).await.unwrap());

    let what = Invalidation::Key(fresh_hash());
    match store.subscribe_invalidations().await {
        Some(mut events) => {
            assert!(shared, "only a shared store has invalidations to follow");
            assert_eq!(next(&mut events).await, Some(InvalidationEvent::Resync));
            store.publish_invalidation(&what).await.unwrap();
            assert_eq!(
                next(&mut events).await,
                Some(InvalidationEvent::Invalidate(what))
            );
        }
        None => {
            assert!(!shared, "a shared store has invalidations to follow");
            store.publish_invalidation(&what).await.unwrap();
        }
    }
}

// === backends ===

#[tokio::test]
async fn embedded_conformance() {
    let dir = tempfile::TempDir::new().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("nested/dir/tollgate.redb")).unwrap();
    // A fresh database has no master key.
    assert!(store.master_key_hash().await.unwrap().is_none());
    run_all(Arc::new(store)).await;
}

#[tokio::test]
async fn embedded_survives_reopen() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("tollgate.redb");
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    let k = key(&format!("key_{p}"), &acc.id, "main", at(1));
    let master = fresh_hash();
    {
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.path(), path.as_path());
        store.create_account(&acc).await.unwrap();
        store.create_key(&k).await.unwrap();
        store.set_master_key_hash(&master).await.unwrap();
        store
            .add_usage(BatchId::first(), &[delta(&k.id, 5, counts(1, 2))])
            .await
            .unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    let found = store.lookup_key(&k.hash).await.unwrap().unwrap();
    assert_eq!(found.key, k);
    assert_eq!(found.account, acc);
    assert!(store.master_key_hash().await.unwrap() == Some(master));
    assert_eq!(
        store
            .key_usage(&k.id, Granularity::Minute, 0, 10)
            .await
            .unwrap(),
        vec![(5, counts(1, 2))]
    );
    // Indexes survived too.
    let clash = key(&format!("key_{p}_2"), &acc.id, "main", at(2));
    assert!(matches!(
        store.create_key(&clash).await,
        Err(StoreError::NameTaken)
    ));
}

/// A file written before names were unique ignoring case holds its name entries under the name
/// as given; opening it re-keys them once, so an older `SKB` takes `skb` too.
#[tokio::test]
async fn embedded_folds_the_key_names_of_an_older_file() {
    use redb::TableDefinition;
    const KEY_NAMES: TableDefinition<(&str, &str), &str> = TableDefinition::new("key_names");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("tollgate.redb");
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    let k = key(&format!("key_{p}"), &acc.id, "SKB", at(1));
    {
        let store = EmbeddedStore::open(&path).unwrap();
        store.create_account(&acc).await.unwrap();
        store.create_key(&k).await.unwrap();
    }
    // Make it as an older version wrote it.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut names = txn.open_table(KEY_NAMES).unwrap();
            let id = names
                .remove((acc.id.as_str(), "skb"))
                .unwrap()
                .unwrap()
                .value()
                .to_owned();
            names.insert((acc.id.as_str(), "SKB"), id.as_str()).unwrap();
            txn.open_table(META)
                .unwrap()
                .remove("key_names_folded")
                .unwrap();
        }
        txn.commit().unwrap();
        let txn = db.begin_read().unwrap();
        let names = txn.open_table(KEY_NAMES).unwrap();
        assert!(names.get((acc.id.as_str(), "SKB")).unwrap().is_some());
    }
    let store: SharedStore = Arc::new(EmbeddedStore::open(&path).unwrap());
    older_name_is_folded(&*store, &k, &p).await;
}

#[tokio::test]
async fn embedded_refuses_second_open() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("tollgate.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    match EmbeddedStore::open(&path) {
        Err(StoreError::Unavailable(msg)) => {
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // The first handle still works, and once it is closed the file opens again.
    store.ping().await.unwrap();
    drop(store);
    EmbeddedStore::open(&path).unwrap().ping().await.unwrap();
}

#[tokio::test]
async fn redis_conformance() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    assert!(!store.is_cluster());
    // A fresh server has no master key.
    assert!(store.master_key_hash().await.unwrap().is_none());
    run_all(Arc::new(store)).await;
}

/// Names that an older version wrote under the name as given (`tg:{acc}:names` field `SKB`)
/// are re-keyed by the first script that checks a name in the account, so `skb` is taken too,
/// and deleting the older key frees the name.
#[tokio::test]
async fn redis_folds_the_key_names_of_an_older_version() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    let k = key(&format!("key_{p}"), &acc.id, "SKB", at(1));
    store.create_account(&acc).await.unwrap();
    store.create_key(&k).await.unwrap();
    // Make it as an older version wrote it.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let names = format!("tg:{{{}}}:names", acc.id);
    let _: () = redis::cmd("DEL")
        .arg(&names)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&names)
        .arg("SKB")
        .arg(&k.id)
        .query_async(&mut conn)
        .await
        .unwrap();
    let store: SharedStore = Arc::new(store);
    older_name_is_folded(&*store, &k, &p).await;
}

/// With `older` (named `SKB`) indexed as an older version did: `skb` is taken, and free once
/// `older` is deleted.
async fn older_name_is_folded(store: &dyn Records, older: &KeyRecord, p: &str) {
    let clash = key(&format!("key_{p}_2"), &older.account_id, "skb", at(2));
    taken(store, &clash).await;
    store
        .delete_key(&older.account_id, &older.id)
        .await
        .unwrap();
    store.create_key(&clash).await.unwrap();
}

#[tokio::test]
async fn redis_cluster_conformance() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    assert!(store.is_cluster());
    assert!(store.master_key_hash().await.unwrap().is_none());
    run_all(Arc::new(store)).await;
}

#[tokio::test]
async fn redis_refuses_unreachable_and_unknown_urls() {
    // A port nothing listens on: refused at once, not after a hang.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let result = RedisStore::connect(&format!("redis://127.0.0.1:{closed}")).await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    let result = RedisStore::connect("http://127.0.0.1:6379").await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_unavailable_quickly_then_the_store_recovers() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let p = unique();
    let acc = account(&format!("acc_{p}"), at(0));
    store.create_account(&acc).await.unwrap();

    server.kill();
    for attempt in 0..3 {
        let started = std::time::Instant::now();
        let result = store.get_account(&acc.id).await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "attempt {attempt}: {result:?}"
        );
        let write = store.update_account(&acc).await;
        assert!(
            matches!(write, Err(StoreError::Unavailable(_))),
            "attempt {attempt}: {write:?}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "attempt {attempt} took {:?}",
            started.elapsed()
        );
    }

    // Same port, no persistence: the same store reconnects by itself and works on the new data,
    // once its circuit breaker (opened by the failures above) lets a probe through: within its
    // one-second cool-down.
    server.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = store.ping().await {
        assert!(
            std::time::Instant::now() < deadline,
            "store did not recover: {e}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(store.get_account(&acc.id).await.unwrap(), None);
    store.create_account(&acc).await.unwrap();
    assert_eq!(store.get_account(&acc.id).await.unwrap(), Some(acc));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_stops_answering_fails_calls_within_the_deadline() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    store.ping().await.unwrap();

    server.pause();
    let started = std::time::Instant::now();
    let result = store.lookup_key(&fresh_hash()).await;
    let elapsed = started.elapsed();
    server.resume();
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        elapsed < std::time::Duration::from_secs(3),
        "took {elapsed:?}"
    );

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = store.ping().await {
        assert!(
            std::time::Instant::now() < deadline,
            "store did not recover: {e}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Shared limit counters: concurrent takes from many instances never pass the limit, and a
/// new window starts from zero. Only shared (Redis) stores have them.
async fn take_tokens_never_pass_the_limit(store: Arc<dyn LimitBuckets>) {
    let key = format!("key_{}", unique());
    let take = |index: i64, want: u32| TokenTake {
        window_secs: 60,
        index,
        limit: 100,
        want,
    };
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (store, key) = (Arc::clone(&store), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = 0;
            for _ in 0..5 {
                let grants = store.take_tokens("acc", &key, &[take(7, 3)]).await.unwrap();
                got += grants[0].granted;
                assert!(grants[0].total <= 100);
            }
            got
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(
        total, 100,
        "every token handed out once, none past the limit"
    );
    let next = store
        .take_tokens(
            "acc",
            &key,
            &[
                take(8, 3),
                TokenTake {
                    window_secs: 3600,
                    index: 0,
                    limit: 2,
                    want: 3,
                },
            ],
        )
        .await
        .unwrap();
    assert_eq!((next[0].granted, next[0].total), (3, 3));
    assert_eq!((next[1].granted, next[1].total), (2, 2));

    // An account's shared buckets are counters under its id (`shared_rate_limit`), apart from
    // its keys' own.
    let account = format!("acc_{}", unique());
    let shared = store
        .take_tokens(&account, &account, &[take(8, 5)])
        .await
        .unwrap();
    assert_eq!((shared[0].granted, shared[0].total), (5, 5));
    let own = store
        .take_tokens(&account, &key, &[take(8, 1)])
        .await
        .unwrap();
    assert_eq!((own[0].granted, own[0].total), (1, 4));
}

/// Two instances (two connections, each with its own in-process turns) appending to one account
/// at once: only the head check in the script keeps the chain linear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_audit_chain_stays_linear_across_instances() {
    let server = RedisServer::start();
    let a: Arc<dyn AuditLog> = Arc::new(RedisStore::connect(&server.url()).await.unwrap());
    let b: Arc<dyn AuditLog> = Arc::new(RedisStore::connect(&server.url()).await.unwrap());
    let acc = format!("acc_{}", unique());
    append_at_once(&[&a, &b], &acc, 40).await;
    assert_chain_intact(&*a, &acc, 40).await;
    assert_eq!(whole_chain(&*b, &acc, 100).await.len(), 40);
}

async fn next(
    events: &mut tokio::sync::mpsc::Receiver<tollgate::store::InvalidationEvent>,
) -> Option<tollgate::store::InvalidationEvent> {
    tokio::time::timeout(std::time::Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
}

#[tokio::test]
async fn redis_invalidations_reach_every_subscriber() {
    let mut server = RedisServer::start();
    let a = RedisStore::connect(&server.url()).await.unwrap();
    let b = RedisStore::connect(&server.url()).await.unwrap();
    let mut events = b
        .subscribe_invalidations()
        .await
        .expect("a shared store subscribes");
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv()).await;
    assert_eq!(first.unwrap(), Some(InvalidationEvent::Resync));
    let hash = fresh_hash();
    a.publish_invalidation(&Invalidation::Key(hash))
        .await
        .unwrap();
    a.publish_invalidation(&Invalidation::Account("acc_x".into()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut events).await,
        Some(InvalidationEvent::Invalidate(Invalidation::Key(hash)))
    );
    assert_eq!(
        next(&mut events).await,
        Some(InvalidationEvent::Invalidate(Invalidation::Account(
            "acc_x".into()
        )))
    );
    // A lost subscription comes back by itself, announcing a resync.
    server.kill();
    server.restart();
    assert_eq!(next(&mut events).await, Some(InvalidationEvent::Resync));
    a.publish_invalidation(&Invalidation::All).await.unwrap();
    assert_eq!(
        next(&mut events).await,
        Some(InvalidationEvent::Invalidate(Invalidation::All))
    );
}

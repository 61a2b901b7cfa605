//! [`ObservedStore`]: the embedded store with a call counter and an off switch, for tests of
//! what the cache and the flusher do with the store's answers and failures.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use tollgate::credential::KeyHash;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::*;

/// A real embedded store, observed: counts `lookup_key` calls, and while `down` is set fails
/// `ping`, `lookup_key`, `add_usage` and `publish_invalidation` as an unreachable store would. Every call goes to the
/// real store; nothing is mocked.
pub struct ObservedStore {
    /// The store underneath.
    pub inner: EmbeddedStore,
    /// Store reads by hash so far.
    pub lookups: AtomicUsize,
    /// Whether the store is "unreachable".
    pub down: AtomicBool,
}

impl ObservedStore {
    /// Wraps `inner`, up and with no lookups counted.
    pub fn new(inner: EmbeddedStore) -> Self {
        ObservedStore {
            inner,
            lookups: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for ObservedStore {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
}

#[async_trait]
impl Records for ObservedStore {
    fn revision(&self) -> Option<u64> {
        self.inner.revision()
    }
    async fn lookup_key(&self, h: &KeyHash) -> Result<Option<KeyLookup>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.lookup_key(h).await
    }
    async fn create_account(&self, a: &AccountRecord) -> Result<(), StoreError> {
        self.inner.create_account(a).await
    }
    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.get_account(id).await
    }
    async fn list_accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        self.inner.list_accounts().await
    }
    async fn update_account(&self, a: &AccountRecord) -> Result<(), StoreError> {
        self.inner.update_account(a).await
    }
    async fn delete_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.delete_account(id).await
    }
    async fn create_key(&self, k: &KeyRecord) -> Result<(), StoreError> {
        self.inner.create_key(k).await
    }
    async fn create_keys(&self, k: &[KeyRecord]) -> Result<(), StoreError> {
        self.inner.create_keys(k).await
    }
    async fn has_imported_keys(&self) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.has_imported_keys().await
    }
    async fn get_key(&self, a: &str, k: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get_key(a, k).await
    }
    async fn list_keys(&self, a: &str) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list_keys(a).await
    }
    async fn update_key(&self, k: &KeyRecord) -> Result<(), StoreError> {
        self.inner.update_key(k).await
    }
    async fn delete_key(&self, a: &str, k: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.delete_key(a, k).await
    }
    async fn create_site(&self, s: &SiteRecord) -> Result<(), StoreError> {
        self.inner.create_site(s).await
    }
    async fn list_sites(&self, a: &str) -> Result<Vec<SiteRecord>, StoreError> {
        self.inner.list_sites(a).await
    }
    async fn delete_site(&self, a: &str, s: &str) -> Result<bool, StoreError> {
        self.inner.delete_site(a, s).await
    }
    async fn master_key_hash(&self) -> Result<Option<KeyHash>, StoreError> {
        self.inner.master_key_hash().await
    }
    async fn set_master_key_hash(&self, h: &KeyHash) -> Result<(), StoreError> {
        self.inner.set_master_key_hash(h).await
    }
}

#[async_trait]
impl AuditLog for ObservedStore {
    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        self.inner.append_audit(e).await
    }
    async fn audit_head(&self, a: &str) -> Result<Option<audit_chain::ChainHead>, StoreError> {
        self.inner.audit_head(a).await
    }
    async fn audit_chain_page(
        &self,
        a: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<AuditChainPage, StoreError> {
        self.inner.audit_chain_page(a, after, limit).await
    }
    async fn list_audit(&self, a: Option<&str>, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        self.inner.list_audit(a, q).await
    }
}

#[async_trait]
impl Usage for ObservedStore {
    async fn add_usage(&self, id: BatchId, b: &[UsageDelta]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.add_usage(id, b).await
    }
    async fn key_usage(
        &self,
        k: &str,
        g: Granularity,
        f: i64,
        t: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        self.inner.key_usage(k, g, f, t).await
    }
    async fn account_usage(
        &self,
        a: &str,
        f: i64,
        t: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        self.inner.account_usage(a, f, t).await
    }
    async fn last_used(&self, k: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        self.inner.last_used(k).await
    }
    async fn prune_usage(&self, g: Granularity, b: i64) -> Result<u64, StoreError> {
        self.inner.prune_usage(g, b).await
    }
}

#[async_trait]
impl Fleet for ObservedStore {
    async fn publish_invalidation(&self, what: &Invalidation) -> Result<(), StoreError> {
        self.check()?;
        self.inner.publish_invalidation(what).await
    }
}

#[async_trait]
impl Clients for ObservedStore {
    async fn create_secret(&self, s: &SecretRecord) -> Result<(), StoreError> {
        self.inner.create_secret(s).await
    }
    async fn list_secrets(&self, a: &str) -> Result<Vec<SecretRecord>, StoreError> {
        self.inner.list_secrets(a).await
    }
    async fn find_secret(&self, h: &KeyHash) -> Result<Option<SecretRecord>, StoreError> {
        self.inner.find_secret(h).await
    }
    async fn delete_secret(
        &self,
        a: &str,
        s: &str,
    ) -> Result<Option<(SecretRecord, Vec<KeyHash>)>, StoreError> {
        self.inner.delete_secret(a, s).await
    }
    async fn create_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.inner.create_token(t).await
    }
    async fn find_token(&self, h: &KeyHash) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_token(h).await
    }
    async fn prune_tokens(&self, now: chrono::DateTime<chrono::Utc>) -> Result<u64, StoreError> {
        self.inner.prune_tokens(now).await
    }
}

#[async_trait]
impl Credits for ObservedStore {
    async fn take_credits(
        &self,
        key_id: &str,
        instance: &str,
        totals: credits::Totals,
        want: i64,
        now_ms: i64,
    ) -> Result<credits::CreditGrant, StoreError> {
        self.check()?;
        self.inner
            .take_credits(key_id, instance, totals, want, now_ms)
            .await
    }
    async fn give_back_credits(
        &self,
        key_id: &str,
        instance: &str,
        totals: credits::Totals,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner
            .give_back_credits(key_id, instance, totals, now_ms)
            .await
    }
    async fn change_credits(
        &self,
        key_id: &str,
        change: credits::CreditChange,
        now_ms: i64,
    ) -> Result<credits::CreditState, StoreError> {
        self.inner.change_credits(key_id, change, now_ms).await
    }
    async fn credit_state(
        &self,
        key_id: &str,
        now_ms: i64,
    ) -> Result<Option<credits::CreditState>, StoreError> {
        self.inner.credit_state(key_id, now_ms).await
    }
    async fn delete_credits(&self, key_id: &str) -> Result<(), StoreError> {
        self.inner.delete_credits(key_id).await
    }
}

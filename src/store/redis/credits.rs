//! [`Credits`] on Redis: one [`CreditCounter`] per key as JSON, changed by compare-and-set
//! (`GET`, the change in Rust, then `SET_IF_EQUAL`), retried when another instance changed it in
//! between. So the state machine is written once, in [`crate::store::credits`], and a grant
//! comes off the balance exactly once whichever instances race for it. These calls are lease
//! refills, not per request; a take runs on the request path's connection and deadline.

use super::conn::Conn;
use super::keys;
use super::scripts::{self, eval};
use super::RedisStore;
use crate::store::credits::{self, CreditChange, CreditCounter, CreditGrant, CreditState, Totals};
use crate::store::{Credits, StoreError};

/// Compare-and-set rounds before giving up: each lost round means another instance's change
/// landed, and the loser waits a random while (up to twice as long each round, at most
/// [`MAX_BACKOFF_US`]) before reading again, so racing instances spread out.
const ROUNDS: u32 = 32;
const MAX_BACKOFF_US: u64 = 4_000;

/// Runs `f` on the key's counter (`None` if it has none) and stores what it leaves, atomically.
async fn with_counter<T>(
    conn: &Conn,
    key_id: &str,
    mut f: impl FnMut(&mut Option<CreditCounter>) -> T,
) -> Result<T, StoreError> {
    let key = keys::credits(key_id);
    for round in 0..ROUNDS {
        if round > 0 {
            let cap = (50u64 << round.min(10)).min(MAX_BACKOFF_US);
            let wait = rand::random_range(0..=cap);
            tokio::time::sleep(std::time::Duration::from_micros(wait)).await;
        }
        let read: Option<String> = conn.query(&::redis::cmd("GET").arg(&key).clone()).await?;
        let mut counter = read
            .as_deref()
            .map(|json| {
                serde_json::from_str::<CreditCounter>(json)
                    .map_err(|e| StoreError::Corrupt(format!("credits of {key_id}: {e}")))
            })
            .transpose()?;
        let out = f(&mut counter);
        let written = match &counter {
            Some(c) => serde_json::to_string(c)
                .map_err(|e| StoreError::Corrupt(format!("cannot encode credits: {e}")))?,
            None => String::new(),
        };
        let old = read.unwrap_or_default();
        if written == old {
            return Ok(out);
        }
        let swapped: i64 = conn
            .query(&eval(scripts::SET_IF_EQUAL, &[&key], &[&old, &written]))
            .await?;
        if swapped == 1 {
            return Ok(out);
        }
    }
    Err(StoreError::Unavailable(format!(
        "credits of {key_id}: changed by others {ROUNDS} times in a row"
    )))
}

#[async_trait::async_trait]
impl Credits for RedisStore {
    async fn take_credits(
        &self,
        key_id: &str,
        instance: &str,
        totals: Totals,
        want: i64,
        now_ms: i64,
    ) -> Result<CreditGrant, StoreError> {
        with_counter(&self.hot, key_id, |counter| {
            credits::take(counter, instance, totals, want, now_ms)
        })
        .await
    }

    async fn give_back_credits(
        &self,
        key_id: &str,
        instance: &str,
        totals: Totals,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        with_counter(&self.conn, key_id, |counter| {
            credits::give_back(counter, instance, totals, now_ms)
        })
        .await
    }

    async fn change_credits(
        &self,
        key_id: &str,
        change: CreditChange,
        now_ms: i64,
    ) -> Result<CreditState, StoreError> {
        with_counter(&self.conn, key_id, |counter| {
            credits::change(counter, change, now_ms)
        })
        .await
    }

    async fn credit_state(
        &self,
        key_id: &str,
        now_ms: i64,
    ) -> Result<Option<CreditState>, StoreError> {
        let read: Option<String> = self
            .conn
            .query(&::redis::cmd("GET").arg(keys::credits(key_id)).clone())
            .await?;
        let counter = read
            .map(|json| {
                serde_json::from_str::<CreditCounter>(&json)
                    .map_err(|e| StoreError::Corrupt(format!("credits of {key_id}: {e}")))
            })
            .transpose()?;
        Ok(credits::state_at(counter, now_ms))
    }

    async fn delete_credits(&self, key_id: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .conn
            .query(&::redis::cmd("DEL").arg(keys::credits(key_id)).clone())
            .await?;
        Ok(())
    }
}

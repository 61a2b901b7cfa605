//! [`LimitBuckets`] on Redis: one `TAKE_TOKENS` script takes from a key's minute, hour and
//! day counters at once, never letting one pass its limit. A request may wait on it, so it
//! runs on the connection with the request deadline.

use super::keys;
use super::scripts::{self, eval};
use super::RedisStore;
use crate::store::{LimitBuckets, StoreError, TokenGrant, TokenTake};

#[async_trait::async_trait]
impl LimitBuckets for RedisStore {
    async fn take_tokens(
        &self,
        _account_id: &str,
        key_id: &str,
        takes: &[TokenTake],
    ) -> Result<Vec<TokenGrant>, StoreError> {
        let counters: Vec<String> = takes
            .iter()
            .map(|t| keys::rate_counter(key_id, t.window_secs, t.index))
            .collect();
        let args: Vec<u64> = takes
            .iter()
            .flat_map(|t| [u64::from(t.limit), u64::from(t.want), t.window_secs * 2])
            .collect();
        let reply: Vec<u64> = self
            .hot
            .query(&eval(scripts::TAKE_TOKENS, &counters, &args))
            .await?;
        if reply.len() != takes.len() * 2 {
            return Err(StoreError::Corrupt(format!(
                "take_tokens answered {} values",
                reply.len()
            )));
        }
        Ok(reply
            .chunks(2)
            .map(|pair| TokenGrant {
                granted: u32::try_from(pair[0]).unwrap_or(0),
                total: pair[1],
            })
            .collect())
    }
}

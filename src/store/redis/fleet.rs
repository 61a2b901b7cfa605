//! [`Fleet`] on Redis: invalidations published on one channel and followed by one subscription
//! per instance, re-established after every loss, with a `Resync` first each time (messages
//! published while it was down are lost); locks are `SET NX PX` released by compare-and-delete.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::keys;
use super::scripts::{self, eval};
use super::RedisStore;
use crate::credential::KeyHash;
use crate::store::{Fleet, Invalidation, InvalidationEvent, StoreError};

/// Wait between subscription attempts while Redis is away.
const RETRY_EVERY: Duration = Duration::from_millis(250);

#[async_trait::async_trait]
impl Fleet for RedisStore {
    async fn publish_invalidation(&self, what: &Invalidation) -> Result<(), StoreError> {
        let payload = match what {
            Invalidation::Key(hash) => format!("k:{}", hash.to_hex()),
            Invalidation::Account(id) => format!("a:{id}"),
            Invalidation::All => "*".to_owned(),
            Invalidation::Imported => "i".to_owned(),
        };
        let _receivers: i64 = self
            .conn
            .query(&cmd!("PUBLISH", keys::INVALIDATIONS, payload))
            .await?;
        Ok(())
    }

    async fn subscribe_invalidations(&self) -> Option<mpsc::Receiver<InvalidationEvent>> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(follow(self.subscribe_url.clone(), tx));
        Some(rx)
    }

    async fn try_lock(&self, name: &str, token: &str, ttl: Duration) -> Result<bool, StoreError> {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply: Option<String> = self
            .conn
            .query(&cmd!("SET", keys::lock(name), token, "NX", "PX", millis))
            .await?;
        Ok(reply.is_some())
    }

    async fn unlock(&self, name: &str, token: &str) -> Result<(), StoreError> {
        let _deleted: i64 = self
            .conn
            .query(&eval(
                scripts::DELETE_IF_EQUAL,
                &[keys::lock(name)],
                &[token],
            ))
            .await?;
        Ok(())
    }
}

/// Forwards invalidations from `url`'s channel into `tx` until the receiver is dropped. Logs a
/// lost subscription once, and its return once.
pub(super) async fn follow(url: String, tx: mpsc::Sender<InvalidationEvent>) {
    let mut lost = false;
    while !tx.is_closed() {
        match subscribe(&url).await {
            Ok(mut pubsub) => {
                if std::mem::take(&mut lost) {
                    tracing::info!("invalidation channel back; treating cached keys as stale");
                }
                if tx.send(InvalidationEvent::Resync).await.is_err() {
                    return;
                }
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    if let Some(what) = parse(&payload) {
                        if tx.send(InvalidationEvent::Invalidate(what)).await.is_err() {
                            return;
                        }
                    }
                }
                tracing::warn!(
                    "invalidation channel lost; cache ttl is the backstop until it returns"
                );
                lost = true;
            }
            Err(e) => {
                if !std::mem::replace(&mut lost, true) {
                    tracing::warn!(error = %e, "invalidation channel unavailable; cache ttl is the backstop until it returns");
                }
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

async fn subscribe(url: &str) -> Result<::redis::aio::PubSub, ::redis::RedisError> {
    let client = ::redis::Client::open(url)?;
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|_| {
            ::redis::RedisError::from((::redis::ErrorKind::IoError, "connect timed out"))
        })??;
    pubsub.subscribe(keys::INVALIDATIONS).await?;
    Ok(pubsub)
}

/// `k:<hex hash>`, `a:<account id>`, `*` or `i` (keys imported). An instance of an older version
/// ignores a payload it does not know, such as `i`: it learns of imported keys by its cache ttl.
fn parse(payload: &str) -> Option<Invalidation> {
    match payload {
        "*" => return Some(Invalidation::All),
        "i" => return Some(Invalidation::Imported),
        _ => {}
    }
    if let Some(hex) = payload.strip_prefix("k:") {
        return KeyHash::from_hex(hex).map(Invalidation::Key);
    }
    payload
        .strip_prefix("a:")
        .map(|id| Invalidation::Account(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_back() {
        let hash = KeyHash::of("tgsk_x");
        assert_eq!(
            parse(&format!("k:{}", hash.to_hex())),
            Some(Invalidation::Key(hash))
        );
        assert_eq!(
            parse("a:acc_1"),
            Some(Invalidation::Account("acc_1".into()))
        );
        assert_eq!(parse("*"), Some(Invalidation::All));
        assert_eq!(parse("i"), Some(Invalidation::Imported));
        assert_eq!(parse("k:zz"), None);
        assert_eq!(parse("nonsense"), None);
    }
}

//! Following the invalidation channel: one subscription, re-established after every loss, with a
//! `Resync` first each time (messages published while it was down are lost).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::keys;
use crate::credential::KeyHash;
use crate::store::{Invalidation, InvalidationEvent};

/// Wait between subscription attempts while Redis is away.
const RETRY_EVERY: Duration = Duration::from_millis(250);

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

/// `k:<hex hash>`, `a:<account id>` or `*`.
fn parse(payload: &str) -> Option<Invalidation> {
    if payload == "*" {
        return Some(Invalidation::All);
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
        assert_eq!(parse("k:zz"), None);
        assert_eq!(parse("nonsense"), None);
    }
}

//! [`Fleet`] on Redis: invalidations published on one channel and followed by one subscription
//! per instance, re-established after every loss, with a `Resync` first each time (messages
//! published while it was down are lost); locks are `SET NX PX` released by compare-and-delete.
//!
//! A subscription only listens, so a connection that went half-open (a partition, a dropped NAT
//! or conntrack entry, a Redis host gone without a reset) would look like a quiet channel for
//! ever, and changes made elsewhere would reach this instance only through its cache ttl. The
//! subscription is therefore pinged every [`PING_EVERY`]; a ping not answered within
//! [`PING_DEADLINE`] (or a subscribe not confirmed in it) counts as a lost channel.

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
/// How often a quiet subscription is pinged to learn that it is still there: one command a
/// second an instance.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A ping, a connect or a subscribe without an answer after this loses the channel.
const PING_DEADLINE: Duration = Duration::from_secs(2);

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
            Ok(pubsub) => {
                if std::mem::take(&mut lost) {
                    tracing::info!("invalidation channel back; treating cached keys as stale");
                }
                if tx.send(InvalidationEvent::Resync).await.is_err() {
                    return;
                }
                match listen(pubsub, &tx).await {
                    Listened::ReceiverGone => return,
                    Listened::Lost(why) => {
                        tracing::warn!(
                            %why,
                            "invalidation channel lost; cache ttl is the backstop until it returns"
                        );
                    }
                }
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

/// Why [`listen`] returned.
enum Listened {
    /// Nobody takes the events any more (shutdown).
    ReceiverGone,
    /// The subscription ended or stopped answering: subscribe again.
    Lost(&'static str),
}

/// Forwards the subscription's messages into `tx`, pinging it every [`PING_EVERY`], until it
/// is lost or `tx`'s receiver is gone.
async fn listen(pubsub: ::redis::aio::PubSub, tx: &mpsc::Sender<InvalidationEvent>) -> Listened {
    let (mut sink, mut messages) = pubsub.split();
    let mut pings = tokio::time::interval(PING_EVERY);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Listened::Lost("the connection closed");
                };
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                if let Some(what) = parse(&payload) {
                    if tx.send(InvalidationEvent::Invalidate(what)).await.is_err() {
                        return Listened::ReceiverGone;
                    }
                }
            }
            _ = pings.tick() => {
                // The messages wait while the ping does: Redis answers in order, and at most
                // PING_DEADLINE.
                match tokio::time::timeout(PING_DEADLINE, sink.ping::<::redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => return Listened::Lost("a ping failed"),
                    Err(_) => return Listened::Lost("a ping went unanswered"),
                }
            }
            () = tx.closed() => return Listened::ReceiverGone,
        }
    }
}

async fn subscribe(url: &str) -> Result<::redis::aio::PubSub, ::redis::RedisError> {
    let timed_out =
        |what: &'static str| ::redis::RedisError::from((::redis::ErrorKind::IoError, what));
    let client = ::redis::Client::open(url)?;
    let mut pubsub = tokio::time::timeout(PING_DEADLINE, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out("connect timed out"))??;
    tokio::time::timeout(PING_DEADLINE, pubsub.subscribe(keys::INVALIDATIONS))
        .await
        .map_err(|_| timed_out("subscribe timed out"))??;
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

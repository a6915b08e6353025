//! The event feed: one pub/sub connection that turns announcements into store events.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::codec::parse_event;
use super::conn::Conn;
use super::{RESPONSE_TIMEOUT, RedisStore};
use crate::error::Result;
use crate::store::{FeedStore, StoreEvent, StoreSubscription};

/// Reconnect backoff of the event feed.
const FEED_BACKOFF_MIN: Duration = Duration::from_millis(100);
const FEED_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The events channel, through a subscription that reconnects by itself.
impl FeedStore for RedisStore {
    fn subscribe(&self) -> Result<StoreSubscription> {
        let (tx, rx) = mpsc::channel(256);
        if let Conn::Cluster(cluster) = &self.conn {
            let task = cluster.feed(self.channel(), self.target.clone(), tx);
            return Ok(StoreSubscription::new(rx, task));
        }
        let task = tokio::spawn(feed(
            self.conn.clone(),
            self.channel(),
            self.target.clone(),
            tx,
        ));
        Ok(StoreSubscription::new(rx, task))
    }
}

/// Keeps one pub/sub connection open, forwarding announcements as events. After every
/// (re)connection it sends [`StoreEvent::Resync`], since announcements made while it was
/// disconnected are lost. Retries with backoff and logs each outage once.
pub(super) async fn feed(
    conn: Conn,
    channel: String,
    target: String,
    tx: mpsc::Sender<StoreEvent>,
) {
    let mut backoff = FEED_BACKOFF_MIN;
    let mut outage = false;
    // Behind Sentinel, a failover moves the feed to the new master, even when the old
    // one is still up (it would hear nothing published on the new one).
    let mut switches = conn.switches();
    loop {
        if let Some(rx) = &mut switches {
            // Only a switch announced from now on concerns the connection made next.
            rx.borrow_and_update();
        }
        let subscribed = async {
            let mut pubsub = conn.pubsub().await.map_err(|e| e.to_string())?;
            tokio::time::timeout(RESPONSE_TIMEOUT, pubsub.subscribe(&channel))
                .await
                .map_err(|_| "no answer to SUBSCRIBE in time".to_owned())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        }
        .await;
        let pubsub = match subscribed {
            Ok(pubsub) => pubsub,
            Err(e) => {
                if !outage {
                    tracing::warn!(redis = %target, error = %e, "cluster event feed lost: Redis unreachable; serving what is loaded and retrying");
                    outage = true;
                }
                // A failover announced meanwhile means a master to reach now.
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    Some(()) = switched(&mut switches) => {}
                }
                backoff = (backoff * 2).min(FEED_BACKOFF_MAX);
                continue;
            }
        };
        if outage {
            tracing::info!(redis = %target, "cluster event feed reconnected");
        }
        backoff = FEED_BACKOFF_MIN;
        if tx.send(StoreEvent::Resync).await.is_err() {
            return;
        }
        let mut messages = pubsub.into_on_message();
        loop {
            let msg = tokio::select! {
                msg = messages.next() => msg,
                Some(()) = switched(&mut switches) => {
                    tracing::info!(redis = %target, "cluster event feed moving to the new Redis master");
                    if tx.send(StoreEvent::FeedLost).await.is_err() {
                        return;
                    }
                    break;
                }
            };
            let Some(msg) = msg else {
                // The stream ends when the connection drops; the next failure to
                // reconnect is part of this same outage, already logged.
                tracing::warn!(redis = %target, "cluster event feed lost: connection closed; reconnecting");
                outage = true;
                if tx.send(StoreEvent::FeedLost).await.is_err() {
                    return;
                }
                break;
            };
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let Some(event) = parse_event(&payload) else {
                tracing::debug!(payload, "ignoring an unknown cluster event");
                continue;
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Resolves when the sentinels announce a new master; never without Sentinel.
pub(super) async fn switched(
    switches: &mut Option<tokio::sync::watch::Receiver<u64>>,
) -> Option<()> {
    match switches {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

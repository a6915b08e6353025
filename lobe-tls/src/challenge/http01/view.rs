//! Which HTTP-01 tokens a shared store holds, kept in memory from the store's challenge
//! events, so that a request for a token nobody published costs no store round trip.
//!
//! - The view lists the store's tokens after every (re)connection of the change feed and
//!   every [`RESYNC_EVERY`] as a safety net, and follows `challenge-put`/`challenge-del`
//!   announcements in between. Events and listings are handled by one task in order, so
//!   an announcement made during a listing is applied after it.
//! - While the view is in step (feed connected, last listing good), only a token it knows
//!   is looked up in the store: a flood of random tokens makes no store round trip. A
//!   token another instance published is known here once its announcement arrives (a
//!   Redis pub/sub hop, well before the CA, which learns of the challenge only after the
//!   publication, can connect). The instance that published it answers from memory.
//! - While it is not in step (no feed yet, feed lost, listing failed, more tokens than
//!   [`MAX_NAMES`]), a token not held locally is looked up in the store at most
//!   [`FALLBACK_PER_SECOND`] times a second across all clients, so an unknown-token flood
//!   never reaches the store at its own pace.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::per_second::PerSecond;
use crate::error::Result;
use crate::store::{ChallengeStore, DynStore, StoreEvent};

/// The store key prefix of HTTP-01 tokens: `http-01/<token>`.
pub(super) const PREFIX: &str = "http-01/";

/// What a shared registry needs its store's challenge tokens for, in messages.
pub(super) const NEEDED_FOR: &str = "HTTP-01 answered by every instance sharing the store";

/// How often the view lists the store's tokens while the feed is up, in case an
/// announcement was lost (and to forget tokens that expired without one).
pub(super) const RESYNC_EVERY: Duration = Duration::from_secs(15);

/// How soon a failed listing is tried again.
const RETRY_SYNC: Duration = Duration::from_secs(1);

/// The most token names the view holds (about 100 bytes each, so about 1 MB). A cluster
/// validates a handful at a time; past this the view gives up and falls back.
pub(super) const MAX_NAMES: usize = 10_000;

/// Store lookups of tokens the view cannot vouch for, per second, while it is not in step.
pub(super) const FALLBACK_PER_SECOND: u32 = 10;

/// How long a request for a token the view does not know waits for its announcement. The
/// announcement (a pub/sub message) and the CA's request reach this instance on two
/// sockets at about the same time, and under load the request can be read first; a
/// request for a random token waits this long too, at no store cost.
pub(super) const ANNOUNCE_GRACE: Duration = Duration::from_millis(100);

/// Whether `token` is shaped like an ACME token (base64url), the only kind ever looked up.
pub(super) fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The store side of a registry: the store, the view of its tokens, and the task that
/// keeps the view current (stopped when the last registry clone goes).
pub(super) struct SharedTokens {
    pub(super) store: DynStore,
    view: Arc<View>,
    follower: OnceLock<Follower>,
    fallback: PerSecond,
    lookups: AtomicU64,
}

impl std::fmt::Debug for SharedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTokens")
            .field("in_step", &self.view.in_step())
            .field("lookups", &self.lookups.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SharedTokens {
    pub(super) fn new(store: DynStore) -> Self {
        let shared = SharedTokens {
            store,
            view: Arc::default(),
            follower: OnceLock::new(),
            fallback: PerSecond::new(FALLBACK_PER_SECOND),
            lookups: AtomicU64::new(0),
        };
        // Built outside a runtime, it starts following at the first lookup instead.
        if tokio::runtime::Handle::try_current().is_ok() {
            shared.start();
        }
        shared
    }

    /// Starts following the store, once. Must run inside a tokio runtime.
    fn start(&self) {
        self.follower.get_or_init(|| {
            let task = tokio::spawn(follow(self.store.clone(), self.view.clone()));
            Follower(task)
        });
    }

    /// The store's challenge tokens (checked when the registry was made).
    pub(super) fn challenges(&self) -> Result<&dyn ChallengeStore> {
        self.store.challenges_for(NEEDED_FOR)
    }

    /// Whether the view is in step with the store, so an unknown token is surely absent.
    pub(super) fn in_step(&self) -> bool {
        self.view.in_step()
    }

    /// How many store lookups were made (for tests and Debug).
    pub(super) fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// The key authorization another instance published for `token`, if any. Looks in
    /// the store only for a token the view knows, or within the fallback budget while
    /// the view is not in step.
    pub(super) async fn lookup(&self, token: &str) -> Option<String> {
        self.start();
        let ask = if self.view.in_step() {
            self.view.learns(token, ANNOUNCE_GRACE).await
        } else {
            self.fallback.take()
        };
        if !ask {
            return None;
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let found = match self.challenges() {
            Ok(challenges) => challenges.get_challenge(&format!("{PREFIX}{token}")).await,
            Err(e) => Err(e),
        };
        match found {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up HTTP-01 token in the shared store");
                None
            }
        }
    }
}

/// The follower task; aborted when dropped.
struct Follower(JoinHandle<()>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Default)]
struct View {
    names: RwLock<HashSet<String>>,
    /// Woken when a name is added.
    added: tokio::sync::Notify,
    /// The feed is connected and the names were listed since it (re)connected.
    in_step: AtomicBool,
}

impl View {
    fn in_step(&self) -> bool {
        self.in_step.load(Ordering::Acquire)
    }

    fn knows(&self, token: &str) -> bool {
        self.names.read().is_ok_and(|names| names.contains(token))
    }

    /// Whether `token` is known now or becomes known within `grace`. No store round trip:
    /// only the announcement being processed is waited for.
    async fn learns(&self, token: &str, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            // Registered before the check, so an announcement in between is not missed.
            added.as_mut().enable();
            if self.knows(token) {
                return true;
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return self.knows(token);
            }
        }
    }

    fn add(&self, token: &str) {
        if !is_token(token) {
            return;
        }
        let Ok(mut names) = self.names.write() else {
            return;
        };
        if names.len() >= MAX_NAMES {
            // Cannot vouch for absence any more: fall back until a listing fits.
            self.in_step.store(false, Ordering::Release);
            return;
        }
        names.insert(token.to_owned());
        drop(names);
        self.added.notify_waiters();
    }

    fn remove(&self, token: &str) {
        if let Ok(mut names) = self.names.write() {
            names.remove(token);
        }
    }

    /// Replaces the names with a listing; in step if it fits.
    fn replace(&self, listed: Vec<String>) {
        let current: HashSet<String> = listed
            .iter()
            .filter_map(|key| key.strip_prefix(PREFIX))
            .filter(|token| is_token(token))
            .map(str::to_owned)
            .collect();
        let fits = current.len() <= MAX_NAMES;
        if let Ok(mut names) = self.names.write() {
            *names = if fits { current } else { HashSet::new() };
        }
        self.in_step.store(fits, Ordering::Release);
    }
}

/// Keeps `view` current from the store's feed until the feed ends or the task is aborted.
async fn follow(store: DynStore, view: Arc<View>) {
    let feed = match store.feed_for("following the shared HTTP-01 tokens") {
        Ok(feed) => feed.subscribe(),
        Err(e) => Err(e),
    };
    let mut feed = match feed {
        Ok(feed) => feed,
        Err(e) => {
            tracing::info!(
                per_second = FALLBACK_PER_SECOND,
                error = %e,
                "no change feed from the shared store: HTTP-01 tokens not held here are looked up in it at a bounded rate"
            );
            return;
        }
    };
    // Listings happen only while the feed is up: without it the view could not stay
    // in step between them.
    let mut feed_up = false;
    let mut next_sync: Option<Instant> = None;
    loop {
        let sync_due = async {
            match next_sync {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = feed.recv() => match event {
                Some(StoreEvent::ChallengePut(key)) => {
                    if let Some(token) = key.strip_prefix(PREFIX) {
                        view.add(token);
                    }
                }
                Some(StoreEvent::ChallengeDeleted(key)) => {
                    if let Some(token) = key.strip_prefix(PREFIX) {
                        view.remove(token);
                    }
                }
                Some(StoreEvent::Resync) => {
                    feed_up = true;
                    next_sync = Some(sync(&store, &view).await);
                }
                Some(StoreEvent::FeedLost) => {
                    feed_up = false;
                    next_sync = None;
                    view.in_step.store(false, Ordering::Release);
                }
                Some(_) => {}
                None => {
                    view.in_step.store(false, Ordering::Release);
                    return;
                }
            },
            () = sync_due, if feed_up => next_sync = Some(sync(&store, &view).await),
        }
    }
}

/// Lists the store's tokens into `view`; when to list again.
async fn sync(store: &DynStore, view: &View) -> Instant {
    let listed = match store.challenges_for(NEEDED_FOR) {
        Ok(challenges) => challenges.list_challenges(PREFIX).await,
        Err(e) => Err(e),
    };
    match listed {
        Ok(listed) => {
            view.replace(listed);
            Instant::now() + RESYNC_EVERY
        }
        Err(e) => {
            if view.in_step.swap(false, Ordering::AcqRel) {
                tracing::warn!(error = %e, "cannot list HTTP-01 tokens in the shared store; looking up unknown tokens at a bounded rate until it answers");
            }
            Instant::now() + RETRY_SYNC
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_puts_the_view_in_step_and_events_keep_it_there() {
        let view = View::default();
        assert!(!view.in_step());
        view.replace(vec![
            "http-01/a".into(),
            "tls-alpn-01/x.example".into(),
            "http-01/bad token".into(),
        ]);
        assert!(view.in_step());
        assert!(view.knows("a") && !view.knows("x.example") && !view.knows("bad token"));
        view.add("b");
        view.remove("a");
        assert!(view.knows("b") && !view.knows("a"));
    }

    #[test]
    fn too_many_names_put_the_view_out_of_step() {
        let view = View::default();
        view.replace((0..=MAX_NAMES).map(|i| format!("http-01/t{i}")).collect());
        assert!(!view.in_step());
        view.replace((0..MAX_NAMES).map(|i| format!("http-01/t{i}")).collect());
        assert!(view.in_step());
        view.add("one-more");
        assert!(!view.in_step());
    }
}

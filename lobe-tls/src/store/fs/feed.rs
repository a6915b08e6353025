//! The file store's change feed: what other processes on this machine change in it
//! (`lobe-tls issue`, a cron `renew`, `revoke`, another `serve`), as [`StoreEvent`]s.
//!
//! A certificate is replaced by flipping `live/<name>`, and renewal state by renaming a
//! new `state/<name>.json` into place, so watching those two directories (not their
//! contents) sees every change. After events stop for a short debounce, the feed
//! compares each name's symlink target and state file with what it saw before and
//! announces the names that changed. The feed cannot tell this process's own writes from
//! others': a follower reloads them and finds nothing new.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;

use crate::store::{StoreEvent, StoreSubscription};

/// How long the directories must be quiet before they are compared.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What the feed knows about one name: where `live/<name>` pointed and which state file
/// was there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Seen {
    live_target: Option<PathBuf>,
    state_file: Option<(u64, u64, Option<SystemTime>)>,
}

/// Starts the feed for the store at `root`. Fails when the directories cannot be
/// created or watched.
pub(super) fn subscribe(root: &Path) -> crate::Result<StoreSubscription> {
    use crate::error::{Error, StoreErrorKind};
    let live = root.join("live");
    let state = root.join("state");
    for dir in [&live, &state] {
        super::create_private_dir(dir)?;
    }
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<()>();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let look_again = match result {
            // The feed's own directory reads show up as events too: skip those.
            Ok(events) => events
                .iter()
                .any(|e| e.need_rescan() || crate::watch::is_change(e)),
            Err(errors) => {
                for e in errors {
                    tracing::warn!(error = %e, "file store watch error; re-reading the store");
                }
                // Events may have been missed.
                true
            }
        };
        if look_again {
            let _ = wake_tx.send(());
        }
    })
    .map_err(|e| Error::store("fs", StoreErrorKind::Unavailable, e.to_string()).with_source(e))?;
    for dir in [&live, &state] {
        debouncer
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| {
                Error::store(
                    "fs",
                    StoreErrorKind::Unavailable,
                    format!("cannot watch {}: {e}", dir.display()),
                )
                .with_source(e)
            })?;
    }

    let (events, receiver) = mpsc::channel(256);
    let root = root.to_path_buf();
    let task = tokio::spawn(async move {
        // Dropped with the task: the watch ends with the feed.
        let _debouncer = debouncer;
        let mut seen = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || look(&root))
                .await
                .unwrap_or_default()
        };
        while wake_rx.recv().await.is_some() {
            while wake_rx.try_recv().is_ok() {}
            let scan_root = root.clone();
            let now = match tokio::task::spawn_blocking(move || look(&scan_root)).await {
                Ok(now) => now,
                Err(_) => continue,
            };
            let changed: Vec<String> = now
                .iter()
                .filter(|(name, current)| seen.get(*name) != Some(*current))
                .map(|(name, _)| name.clone())
                .collect();
            seen = now;
            if !changed.is_empty() {
                tracing::debug!(?changed, "certificates changed in the file store");
            }
            for name in changed {
                if events.send(StoreEvent::CertSaved(name)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(StoreSubscription::new(receiver, task))
}

/// Every certificate name with where its `live/` link points and its state file's
/// identity. Names that vanished are simply absent: removing a certificate is not
/// something a follower acts on.
fn look(root: &Path) -> HashMap<String, Seen> {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    if let Ok(listing) = std::fs::read_dir(root.join("live")) {
        for entry in listing.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            seen.entry(name).or_default().live_target = std::fs::read_link(entry.path()).ok();
        }
    }
    if let Ok(listing) = std::fs::read_dir(root.join("state")) {
        for entry in listing.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            // State without a certificate is nothing to reload.
            let Some(known) = seen.get_mut(name) else {
                continue;
            };
            if let Ok(meta) = entry.metadata() {
                known.state_file = Some((meta.ino(), meta.len(), meta.modified().ok()));
            }
        }
    }
    seen
}

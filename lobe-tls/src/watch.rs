//! Serves certificates that another process writes to a directory: certbot, a Kubernetes
//! secret mount, a deploy script, a person with an editor.
//!
//! The watcher looks for certificate/key pairs under one root directory:
//!
//! ```text
//! <root>/fullchain.pem + privkey.pem          a single pair (name: the root's own name)
//! <root>/tls.crt + tls.key                    a Kubernetes TLS secret mounted as a volume
//! <root>/<name>/fullchain.pem + privkey.pem   one directory per certificate (or tls.crt/tls.key)
//! <root>/live/<name>/fullchain.pem + ...      certbot's layout, and lobe-tls's own file store
//! ```
//!
//! Directories whose names start with a dot are skipped: Kubernetes keeps its versioned
//! copies in `..2024_01_01_...` and `..data`, and the pair is read through the user-facing
//! `tls.crt` symlink instead.
//!
//! It watches the whole root (the parent directories of every pair, so symlink flips and
//! renames are seen, not just writes), waits until events stop for a short debounce period,
//! and then re-reads every pair through its user-facing path. It also watches the root's
//! parent, so that a root which is itself replaced (a `current -> releases/42` symlink
//! flipped by a deploy, a directory removed and created again) is watched anew, and it
//! re-reads everything every [`WatchOptions::rescan_every`] for file systems that send no
//! events at all (NFS, some FUSE mounts). A pair whose content changed
//! is checked before it is served: both files parse, the key matches the certificate, and
//! the certificate has not expired. A pair that fails the check (half-written, key and
//! certificate from different versions, expired) is logged and retried; the certificate
//! served before stays in place.
//!
//! Every scan, at least once per [`WatchOptions::rescan_every`], also looks at how close
//! each served certificate is to expiry: one inside its warning window that nobody has
//! replaced is logged and announced once as [`WatchEvent::ExpiringSoon`], so that a
//! renewal job that quietly stopped is noticed before clients are.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::cert::{CertBundle, CertInfo};
use crate::error::{CertificateErrorKind, Error, Result};
use crate::renewal::RenewalPolicy;
use crate::resolver::CertResolver;

/// Whether a file system event can mean changed content. Opening and reading do not:
/// without this filter, the watcher's own reads would wake it again, forever.
pub(crate) fn is_change(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The file name pairs the watcher recognises, certificate chain first.
const PAIR_NAMES: [(&str, &str); 2] = [("fullchain.pem", "privkey.pem"), ("tls.crt", "tls.key")];

/// How the watcher behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WatchOptions {
    /// How long the directory must be quiet before it is re-read.
    pub debounce: Duration,
    /// How soon a pair that failed its check, or vanished, is looked at again.
    pub retry: Duration,
    /// How often everything is re-read even when no event came.
    pub rescan_every: Duration,
    /// The pair (by name) or DNS name whose certificate clients with no SNI or an unknown
    /// name get. Without it such handshakes are refused.
    pub default_name: Option<String>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            debounce: Duration::from_millis(250),
            retry: Duration::from_secs(5),
            rescan_every: Duration::from_secs(60),
            default_name: None,
        }
    }
}

impl WatchOptions {
    /// Serves the pair (by name) or DNS name `name` to clients with no SNI or an unknown one.
    pub fn with_default_name(mut self, name: Option<String>) -> Self {
        self.default_name = name;
        self
    }

    /// Re-reads the directory once it has been quiet for `debounce`.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Looks again at a pair that failed its check, or vanished, after `retry`.
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// Re-reads everything every `every`, even when no event came.
    pub fn with_rescan_every(mut self, every: Duration) -> Self {
        self.rescan_every = every;
        self
    }
}

/// A certificate the watcher serves.
#[derive(Debug, Clone)]
pub struct WatchedCert {
    /// The pair's name: its directory's name.
    pub name: String,
    /// The certificate chain file, as the user named it.
    pub cert_path: PathBuf,
    /// The key file, as the user named it.
    pub key_path: PathBuf,
    /// The facts of the certificate served.
    pub info: CertInfo,
}

/// What the watcher did, for logs, metrics and tests.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WatchEvent {
    /// A pair was checked and is now served (first time or changed).
    Loaded {
        /// The pair's name.
        name: String,
        /// The certificate's serial number, lower-case hex.
        serial: String,
        /// When it expires.
        not_after: OffsetDateTime,
    },
    /// A pair failed its check; whatever was served before is still served.
    Rejected {
        /// The pair's name.
        name: String,
        /// Why, in one line.
        error: String,
    },
    /// A pair has been gone for longer than the retry period and is no longer served.
    Removed {
        /// The pair's name.
        name: String,
    },
    /// The certificate served for a pair is inside its warning window (a sixth of its
    /// lifetime, at most 7 days, before expiry) and nothing has replaced it: whatever
    /// writes it has not renewed it. Sent once per certificate.
    ExpiringSoon {
        /// The pair's name.
        name: String,
        /// The certificate's serial number, lower-case hex.
        serial: String,
        /// When it expires.
        not_after: OffsetDateTime,
    },
}

/// A certificate/key pair found on disk, by its user-facing paths.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    name: String,
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// What the watcher remembers about each pair between scans.
#[derive(Debug)]
struct Entry {
    /// The pair as last served, if it ever passed its check.
    served: Option<WatchedCert>,
    /// A hash of the bytes last checked, so unchanged files are not parsed again.
    fingerprint: u64,
    /// Whether the bytes with `fingerprint` failed their check.
    failing: bool,
    /// Since when the pair has been missing from disk.
    missing_since: Option<Instant>,
    /// The serial last warned about as expiring, so each certificate is warned about once.
    warned_serial: Option<String>,
}

struct Shared {
    root: PathBuf,
    resolver: CertResolver,
    options: WatchOptions,
    /// Decides when a served certificate counts as expiring.
    policy: RenewalPolicy,
    entries: Mutex<BTreeMap<String, Entry>>,
    events: broadcast::Sender<WatchEvent>,
}

/// Watches a directory and keeps a [`CertResolver`] serving what it holds. Stops when dropped.
pub struct CertDirWatcher {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// The file system watches, and which directory the root pointed at when they were set.
struct RootWatch {
    debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    root: PathBuf,
    /// Device and inode of the directory `root` led to, while it is watched.
    watched: Option<(u64, u64)>,
}

impl RootWatch {
    /// Watches the root again when it now leads to another directory than the one
    /// watched (a flipped symlink, a directory re-created). Returns false while the root
    /// cannot be watched, so that the caller retries.
    fn follow_root(&mut self) -> bool {
        let now = std::fs::metadata(&self.root)
            .ok()
            .filter(|meta| meta.is_dir())
            .map(|meta| (meta.dev(), meta.ino()));
        if now == self.watched {
            return now.is_some();
        }
        if self.watched.take().is_some() {
            // The old watches may already be gone with the old directory.
            let _ = self.debouncer.unwatch(&self.root);
            tracing::info!(root = %self.root.display(), "certificate directory was replaced; watching the new one");
        }
        if now.is_none() {
            return false;
        }
        match self.debouncer.watch(&self.root, RecursiveMode::Recursive) {
            Ok(()) => {
                self.watched = now;
                true
            }
            Err(e) => {
                tracing::warn!(root = %self.root.display(), error = %e, "cannot watch the certificate directory; retrying");
                false
            }
        }
    }
}

impl std::fmt::Debug for CertDirWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertDirWatcher")
            .field("root", &self.shared.root)
            .finish_non_exhaustive()
    }
}

impl CertDirWatcher {
    /// Loads every valid pair under `root` into `resolver`, then keeps watching.
    ///
    /// Fails only when `root` cannot be watched at all; broken pairs are logged and retried.
    pub async fn start(
        root: impl Into<PathBuf>,
        resolver: CertResolver,
        options: WatchOptions,
    ) -> Result<Self> {
        let root = root.into();
        // Said as the flag that names it: "--cert-dir /x: no such directory", not the OS
        // error alone.
        let meta = std::fs::metadata(&root).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::config(format!("--cert-dir {}: no such directory", root.display()))
            }
            _ => Error::config(format!("--cert-dir {}: {e}", root.display())),
        })?;
        if !meta.is_dir() {
            return Err(Error::config(format!(
                "--cert-dir {}: not a directory; give the directory holding the certificates",
                root.display()
            )));
        }
        // Absolute but with symlinks kept: the root is watched through the path the user
        // gave, so that a flipped symlink leads to the new directory.
        let root = std::path::absolute(&root).map_err(|e| Error::io(&root, e))?;
        let (events, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            root: root.clone(),
            resolver,
            options,
            policy: RenewalPolicy::default(),
            entries: Mutex::new(BTreeMap::new()),
            events,
        });

        // Watch before the first scan, so that nothing written in between is missed.
        let (wake_tx, wake_rx) = mpsc::unbounded_channel::<()>();
        let event_root = root.clone();
        let debouncer = new_debouncer(
            shared.options.debounce,
            None,
            move |result: DebounceEventResult| match result {
                Ok(events) => {
                    // The parent's watch also reports the root's siblings: skip those.
                    let ours = events.iter().any(|event| {
                        event.need_rescan()
                            || (is_change(event)
                                && event.paths.iter().any(|p| p.starts_with(&event_root)))
                    });
                    if ours {
                        let _ = wake_tx.send(());
                    }
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!(error = %e, "certificate directory watch error");
                    }
                    // Something may have been missed: look again.
                    let _ = wake_tx.send(());
                }
            },
        )
        .map_err(|e| Error::config(format!("cannot watch {}: {e}", root.display())))?;
        let mut watch = RootWatch {
            debouncer,
            root: root.clone(),
            watched: None,
        };
        if !watch.follow_root() {
            return Err(Error::config(format!("cannot watch {}", root.display())));
        }
        if let Some(parent) = root.parent()
            && let Err(e) = watch.debouncer.watch(parent, RecursiveMode::NonRecursive)
        {
            tracing::warn!(root = %root.display(), error = %e, "cannot watch the certificate directory's parent; a replaced directory is noticed only at the next rescan");
        }
        let watch = Arc::new(Mutex::new(watch));

        let first = shared.clone();
        let mut needs_retry = tokio::task::spawn_blocking(move || first.scan())
            .await
            .map_err(|e| Error::config(format!("certificate directory scan failed: {e}")))?;

        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            let mut wake_rx = wake_rx;
            let retry = task_shared.options.retry;
            let rescan_every = task_shared.options.rescan_every;
            loop {
                tokio::select! {
                    woke = wake_rx.recv() => if woke.is_none() { break },
                    _ = tokio::time::sleep(retry), if needs_retry => {}
                    _ = tokio::time::sleep(rescan_every) => {}
                }
                while wake_rx.try_recv().is_ok() {}
                let scan_shared = task_shared.clone();
                let scan_watch = watch.clone();
                needs_retry = tokio::task::spawn_blocking(move || {
                    let watching = match scan_watch.lock() {
                        Ok(mut watch) => watch.follow_root(),
                        Err(poisoned) => poisoned.into_inner().follow_root(),
                    };
                    scan_shared.scan() || !watching
                })
                .await
                .unwrap_or(true);
            }
        });
        Ok(CertDirWatcher { shared, task })
    }

    /// The directory watched.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Every certificate served now, by pair name.
    pub fn certificates(&self) -> Vec<WatchedCert> {
        let entries = match self.shared.entries.lock() {
            Ok(entries) => entries,
            Err(poisoned) => poisoned.into_inner(),
        };
        entries.values().filter_map(|e| e.served.clone()).collect()
    }

    /// Events from now on: pairs loaded, rejected and removed.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.shared.events.subscribe()
    }

    /// Re-reads the directory now, without waiting for an event. Returns whether any pair
    /// is failing its check or missing.
    pub async fn rescan(&self) -> bool {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.scan())
            .await
            .unwrap_or(true)
    }
}

impl Drop for CertDirWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Shared {
    /// Reads every pair and serves what changed and passes its check. Returns whether a
    /// retry is needed (a pair failed or went missing).
    fn scan(&self) -> bool {
        let sources = discover(&self.root);
        let mut entries = match self.entries.lock() {
            Ok(entries) => entries,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut needs_retry = false;
        for source in &sources {
            needs_retry |= self.scan_one(&mut entries, source);
        }
        let now = Instant::now();
        let mut gone = Vec::new();
        for (name, entry) in entries.iter_mut() {
            if sources.iter().any(|s| &s.name == name) {
                continue;
            }
            match entry.missing_since {
                // Give a save dance or a directory flip time to finish before unloading.
                Some(since) if now.duration_since(since) >= self.options.retry => {
                    gone.push(name.clone())
                }
                Some(_) => needs_retry = true,
                None => {
                    tracing::warn!(name, root = %self.root.display(), "certificate files vanished; still serving the last good ones for now");
                    entry.missing_since = Some(now);
                    needs_retry = true;
                }
            }
        }
        for name in gone {
            if let Some(entry) = entries.remove(&name) {
                if let Some(served) = entry.served {
                    self.unserve(&served, &entries);
                }
                tracing::warn!(name, "certificate files are gone; no longer serving them");
                let _ = self.events.send(WatchEvent::Removed { name });
            }
        }
        let now = OffsetDateTime::now_utc();
        for entry in entries.values_mut() {
            self.warn_if_expiring(entry, now);
        }
        needs_retry
    }

    /// Says so, once per certificate, when a served certificate nears its expiry and
    /// nobody has replaced it. The watcher keeps serving it: it is what there is.
    fn warn_if_expiring(&self, entry: &mut Entry, now: OffsetDateTime) {
        let Some(served) = &entry.served else { return };
        let info = &served.info;
        if !self
            .policy
            .warn_expiring_once(info, &mut entry.warned_serial, now)
        {
            return;
        }
        let not_after = crate::cert::rfc3339(info.not_after);
        if info.not_after <= now {
            tracing::error!(name = served.name, serial = info.serial, %not_after, "served certificate has expired and was not replaced; renew {}", served.cert_path.display());
        } else {
            tracing::warn!(name = served.name, serial = info.serial, %not_after, "served certificate expires soon and was not replaced; is whatever renews {} still running?", served.cert_path.display());
        }
        let _ = self.events.send(WatchEvent::ExpiringSoon {
            name: served.name.clone(),
            serial: info.serial.clone(),
            not_after: info.not_after,
        });
    }

    fn scan_one(&self, entries: &mut BTreeMap<String, Entry>, source: &Source) -> bool {
        let (cert_pem, key_pem) = match read_pair(source) {
            Ok(pair) => pair,
            Err(e) => {
                let entry = entries.entry(source.name.clone()).or_insert(Entry {
                    served: None,
                    fingerprint: 0,
                    failing: true,
                    missing_since: None,
                    warned_serial: None,
                });
                entry.missing_since = None;
                entry.failing = true;
                entry.fingerprint = 0;
                self.reject(source, &e);
                return true;
            }
        };
        let fingerprint = fingerprint(&cert_pem, &key_pem);
        if let Some(entry) = entries.get_mut(&source.name) {
            entry.missing_since = None;
            if entry.fingerprint == fingerprint {
                // Unchanged since the last check; a failing pair stays failing.
                return entry.failing;
            }
        }
        let checked = check_pair(cert_pem, key_pem);
        let entry = entries.entry(source.name.clone()).or_insert(Entry {
            served: None,
            fingerprint,
            failing: false,
            missing_since: None,
            warned_serial: None,
        });
        entry.fingerprint = fingerprint;
        match checked {
            Ok((key, info)) => {
                entry.failing = false;
                let loaded = WatchedCert {
                    name: source.name.clone(),
                    cert_path: source.cert_path.clone(),
                    key_path: source.key_path.clone(),
                    info,
                };
                let previous = entry.served.replace(loaded.clone());
                self.serve(&loaded, previous.as_ref(), key);
                false
            }
            Err(e) => {
                entry.failing = true;
                self.reject(source, &e);
                true
            }
        }
    }

    fn serve(
        &self,
        loaded: &WatchedCert,
        previous: Option<&WatchedCert>,
        key: Arc<rustls::sign::CertifiedKey>,
    ) {
        if let Some(previous) = previous {
            let dropped: Vec<&String> = previous
                .info
                .domains
                .iter()
                .filter(|d| !loaded.info.domains.contains(d))
                .collect();
            if !dropped.is_empty() {
                self.resolver.remove(&dropped);
            }
        }
        self.resolver.set(&loaded.info.domains, key.clone());
        if let Some(default) = &self.options.default_name {
            let default = default.to_ascii_lowercase();
            if loaded.name == default || loaded.info.domains.contains(&default) {
                self.resolver.set_default(Some(key));
            }
        }
        tracing::info!(
            name = loaded.name,
            serial = loaded.info.serial,
            not_after = %crate::cert::rfc3339(loaded.info.not_after),
            "serving certificate from {}",
            loaded.cert_path.display()
        );
        let _ = self.events.send(WatchEvent::Loaded {
            name: loaded.name.clone(),
            serial: loaded.info.serial.clone(),
            not_after: loaded.info.not_after,
        });
    }

    /// Stops serving the names of a pair that is gone, unless another pair serves them.
    fn unserve(&self, gone: &WatchedCert, remaining: &BTreeMap<String, Entry>) {
        let still_served = |domain: &String| {
            remaining
                .values()
                .filter_map(|e| e.served.as_ref())
                .any(|s| s.info.domains.contains(domain))
        };
        let names: Vec<&String> = gone
            .info
            .domains
            .iter()
            .filter(|d| !still_served(d))
            .collect();
        self.resolver.remove(&names);
    }

    fn reject(&self, source: &Source, error: &Error) {
        tracing::warn!(
            name = source.name,
            error = %error,
            "certificate files rejected; keeping the last good certificate and retrying in {:?}",
            self.options.retry
        );
        let _ = self.events.send(WatchEvent::Rejected {
            name: source.name.clone(),
            error: error.to_string(),
        });
    }
}

/// Finds the pairs under `root`: in `root` itself, in each subdirectory, and in each
/// subdirectory of `root/live`.
fn discover(root: &Path) -> Vec<Source> {
    let mut found: HashMap<String, Source> = HashMap::new();
    // The name the user gave (`current`, not what `current` links to now), so that a
    // flipped root keeps its pair's name.
    let root_name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .or_else(|| {
            let canonical = root.canonicalize().ok()?;
            Some(canonical.file_name()?.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "default".into());
    let mut candidates = vec![(root_name, root.to_path_buf())];
    for dir in [root.to_path_buf(), root.join("live")] {
        let Ok(listing) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in listing.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let path = item.path();
            // `is_dir` follows symlinks: certbot and lobe-tls link `live/<name>` entries.
            if !name.starts_with('.') && path.is_dir() {
                candidates.push((name, path));
            }
        }
    }
    for (name, dir) in candidates {
        for (cert_file, key_file) in PAIR_NAMES {
            let cert_path = dir.join(cert_file);
            // A dangling symlink counts as present, so that it is reported and retried.
            if std::fs::symlink_metadata(&cert_path).is_ok() {
                found.entry(name.clone()).or_insert(Source {
                    name: name.clone(),
                    cert_path,
                    key_path: dir.join(key_file),
                });
                break;
            }
        }
    }
    found.into_values().collect()
}

fn read_pair(source: &Source) -> Result<(String, String)> {
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| Error::io(path, e));
    Ok((read(&source.cert_path)?, read(&source.key_path)?))
}

fn fingerprint(cert_pem: &str, key_pem: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    cert_pem.hash(&mut hasher);
    key_pem.hash(&mut hasher);
    hasher.finish()
}

/// The check a pair passes before it is served: it parses, the key matches, it names at
/// least one DNS name, and it has not expired.
fn check_pair(
    cert_pem: String,
    key_pem: String,
) -> Result<(Arc<rustls::sign::CertifiedKey>, CertInfo)> {
    let bundle = CertBundle::from_pem(cert_pem, key_pem)?;
    // Loaded now, not at first use: another tool may write the certificate and the key
    // one after the other, and a half-written pair must be refused, not served.
    bundle.check_key()?;
    let key = bundle.certified_key()?;
    let info = bundle.info()?;
    if info.domains.is_empty() {
        return Err(Error::certificate(
            CertificateErrorKind::NamesNotCovered,
            "the certificate names no DNS name in its subject alternative names",
        ));
    }
    if info.not_after <= OffsetDateTime::now_utc() {
        return Err(Error::certificate(
            CertificateErrorKind::Expired,
            format!(
                "the certificate expired at {}",
                crate::cert::rfc3339(info.not_after)
            ),
        ));
    }
    Ok((key, info))
}

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};

    use super::is_change;

    #[test]
    fn reads_are_not_changes_but_writes_renames_and_creates_are() {
        let event = |kind| notify::Event::new(kind);
        assert!(!is_change(&event(EventKind::Access(AccessKind::Open(
            AccessMode::Any
        )))));
        assert!(!is_change(&event(EventKind::Access(AccessKind::Close(
            AccessMode::Read
        )))));
        assert!(is_change(&event(EventKind::Access(AccessKind::Close(
            AccessMode::Write
        )))));
        assert!(is_change(&event(EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        )))));
        assert!(is_change(&event(EventKind::Create(CreateKind::File))));
    }
}

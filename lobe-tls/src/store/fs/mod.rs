//! The file store, in a certbot-compatible layout that nginx or HAProxy can read:
//!
//! ```text
//! <root>/live/<name>            -> ../archive/<name>/<version>   (a directory symlink)
//! <root>/archive/<name>/<version>/{cert,chain,fullchain,privkey}.pem, lobe-tls.json
//! <root>/accounts/<key>.json
//! <root>/state/<name>.json      renewal bookkeeping
//! <root>/locks/<name>.lock
//! <root>/secrets/<name>       shared secrets (session ticket keys), mode 0600
//! ```
//!
//! A new certificate is written into a staging directory (`archive/.staging/*`), synced,
//! renamed to its version in `archive/<name>/`, and then `live/<name>` is flipped to it
//! with one `rename`: a reader that resolves `live/<name>` once and reads its files from
//! what it found (as this store does) sees the old set or the new set, never a new
//! certificate with an old key.
//!
//! **A plain `live/<name>` directory** (a store copied without its symlinks, or certbot's
//! layout of per-file links) is replaced the same way: on Linux the new symlink and the
//! directory swap places in one `renameat2(RENAME_EXCHANGE)`, so `live/<name>` never goes
//! missing; where the file system cannot swap, the directory is renamed away and the link
//! renamed in right after, and a reader in between finds no certificate (this store then
//! keeps serving what it has). Either way the old directory is kept as an archived version
//! (mode 0700, its private key 0600) and pruned with the other old versions. A reader
//! that opens files by path through a plain directory (a web server reading
//! `live/<name>/fullchain.pem`, then `privkey.pem`) can straddle the swap, as it can
//! straddle any symlink flip; reload it after a renewal, as with certbot.
//!
//! **Leftovers of interrupted saves** (staging directories holding private keys, half
//! written account or state files) are pruned when the store is opened, by a background
//! thread, under one rule that never removes what a running save still needs: every save
//! holds `locks/.staging.lock` shared from before it creates anything temporary until it
//! has renamed or removed it, and the pruner removes only while it holds that lock
//! exclusively, and only entries untouched for ten minutes (which covers writers older
//! than the lock, which do not take it). All staging happens in one directory, so that
//! the check costs a few directory reads even at 10,000 certificates. See
//! [`FileStore::prune_staging`].
//!
//! The store has locks ([`LockStore`], `flock`) and secrets ([`SecretStore`]), and with
//! the `watch` feature a [change feed](super::FeedStore) that watches
//! `live/` and `state/`, so a manager following this store (see [`crate::cluster`]) picks
//! up what other processes on the machine write. It keeps no challenge tokens: it serves
//! one machine.

use std::fs::{self, DirBuilder, File};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

#[cfg(feature = "watch")]
use super::FeedStore;
use super::{
    BatchEntry, CertMeta, CertVersion, LockStore, RenewalState, SecretStore, Store, StoreLock,
    StoredCert,
};
use crate::cert::CertBundle;
use crate::error::{Error, Result};

#[cfg(feature = "watch")]
mod feed;
mod files;

use files::*;

/// How many old versions of each certificate to keep under `archive/`.
const KEEP_VERSIONS: usize = 3;
/// The metadata file next to the PEM files.
const META_FILE: &str = "lobe-tls.json";
/// How long a leftover of an interrupted save must have been untouched before it is
/// pruned. Saves by this version hold the staging lock and are safe whatever their age;
/// this covers writers that take no lock (an older lobe-tls still running during an
/// upgrade), whose saves finish within seconds.
const STAGING_GRACE: Duration = Duration::from_secs(600);
/// How long the pruner waits for running saves to finish before it leaves the
/// leftovers to the next open.
const PRUNE_WAIT: Duration = Duration::from_secs(2);
/// Held shared by every save, exclusively by the pruner (under `locks/`). Certificate
/// names cannot start with a dot, so no certificate's lock file collides with it.
const STAGING_LOCK: &str = ".staging.lock";
/// Where saves stage new sets, under `archive/` so that the final rename stays on one
/// file system. A dot name: no certificate can have it.
const STAGING_DIR: &str = ".staging";
/// Written under `locks/` once no staging directory of the older layout
/// (`archive/<name>/.tmp-*`) is left, so that later opens need not read every
/// `archive/<name>/`.
const OLD_STAGING_CLEARED: &str = ".old-staging-cleared";

/// A store on the local file system.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Opens (and creates, mode 0700) a store rooted at `root`.
    ///
    /// Leftovers of saves interrupted by a crash are pruned by a background thread (see
    /// [`FileStore::prune_staging`]), so that opening a large store stays quick.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        create_private_dir(&root)?;
        let store = FileStore { root };
        let pruner = store.clone();
        let spawned = std::thread::Builder::new()
            .name("lobe-tls-prune".into())
            .spawn(move || {
                if let Err(e) = pruner.prune_staging() {
                    tracing::warn!(store = %pruner.root.display(), error = %e, "cannot prune leftovers of interrupted saves");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start pruning leftovers of interrupted saves");
        }
        Ok(store)
    }

    /// Removes what saves interrupted by a crash left behind: staging directories
    /// (`archive/.staging/*` and, from older versions, `archive/<name>/.tmp-*`, holding
    /// private keys), swapped-out or half-made
    /// `live/.<name>.tmp-*` entries, and half-written `accounts/*.tmp-*` and
    /// `state/*.tmp-*` files. Returns their paths relative to the root, and logs them
    /// (names only).
    ///
    /// The rule, which never removes an entry a running save is about to rename: every
    /// save, in any process, holds `locks/.staging.lock` shared from before it creates
    /// its first temporary entry until it has renamed or removed the last; the pruner
    /// removes only while it holds that lock exclusively, so only when no save is running
    /// anywhere. It also leaves alone entries touched in the last ten minutes, for
    /// writers that take no lock (a lobe-tls from before the lock, during an upgrade).
    /// When saves keep the lock busy for two seconds, nothing is removed this time.
    pub fn prune_staging(&self) -> Result<Vec<String>> {
        let Some(cutoff) = SystemTime::now().checked_sub(STAGING_GRACE) else {
            return Ok(Vec::new());
        };
        let cleared = self.root.join("locks").join(OLD_STAGING_CLEARED);
        let scan_old_layout = !cleared.exists();
        let (candidates, young_old_layout) = self.leftovers(cutoff, scan_old_layout);
        // Once nothing of the older layout is left, later opens skip that scan.
        let mark_cleared = || {
            if scan_old_layout && young_old_layout == 0 && self.create_locks_dir().is_ok() {
                let _ = write_file(&cleared, b"", 0o600);
            }
        };
        if candidates.is_empty() {
            mark_cleared();
            return Ok(Vec::new());
        }
        let candidates_len = candidates.len();
        let lock = self.open_staging_lock()?;
        let deadline = Instant::now() + PRUNE_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    tracing::debug!(store = %self.root.display(), "saves are running; leaving leftovers of interrupted saves to the next open");
                    return Ok(Vec::new());
                }
                Err(fs::TryLockError::Error(e)) => {
                    return Err(Error::io(self.root.join("locks").join(STAGING_LOCK), e));
                }
            }
        }
        let mut pruned = Vec::new();
        for path in candidates {
            let removed = match fs::symlink_metadata(&path) {
                // `remove_dir_all` never follows a link out of the store.
                Ok(meta) if meta.is_dir() => fs::remove_dir_all(&path),
                Ok(_) => fs::remove_file(&path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => Err(e),
            };
            let relative = path
                .strip_prefix(&self.root)
                .unwrap_or(&path)
                .display()
                .to_string();
            match removed {
                Ok(()) => pruned.push(relative),
                Err(e) => {
                    tracing::warn!(path = %relative, error = %e, "cannot remove a leftover of an interrupted save")
                }
            }
        }
        if !pruned.is_empty() {
            tracing::info!(store = %self.root.display(), ?pruned, "removed leftovers of interrupted saves");
        }
        if pruned.len() == candidates_len {
            mark_cleared();
        }
        Ok(pruned)
    }

    /// Temporary entries of saves last touched before `cutoff`, and how many entries of
    /// the older staging layout are too young to judge (when `old_layout` is scanned).
    fn leftovers(&self, cutoff: SystemTime, old_layout: bool) -> (Vec<PathBuf>, usize) {
        let mut found = Vec::new();
        let mut young = 0;
        let mut scan = |dir: &Path, is_temp: &dyn Fn(&str) -> bool| {
            let Ok(entries) = fs::read_dir(dir) else {
                return 0;
            };
            let mut young = 0;
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !name.to_str().is_some_and(is_temp) {
                    continue;
                }
                let old = fs::symlink_metadata(entry.path())
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t <= cutoff);
                if old {
                    found.push(entry.path());
                } else {
                    young += 1;
                }
            }
            young
        };
        let archive = self.root.join("archive");
        scan(&archive.join(STAGING_DIR), &|_| true);
        // The older layout, `archive/<name>/.tmp-<version>-<n>`: one directory read per
        // certificate, so only until none is left.
        if old_layout && let Ok(names) = fs::read_dir(&archive) {
            for name in names.flatten() {
                let dot = name.file_name().to_str().is_none_or(|n| n.starts_with('.'));
                if !dot && name.file_type().is_ok_and(|t| t.is_dir()) {
                    young += scan(&name.path(), &|n| n.starts_with(".tmp-"));
                }
            }
        }
        // `live/.<name>.tmp-<n>`: names cannot start with a dot.
        scan(&self.root.join("live"), &|n| {
            n.starts_with('.') && n.contains(".tmp-")
        });
        // `<key>.tmp-<n>` beside `<key>.json`.
        for dir in ["accounts", "state"] {
            scan(&self.root.join(dir), &|n| {
                n.rsplit_once('.')
                    .is_some_and(|(_, ext)| ext.starts_with("tmp-"))
            });
        }
        (found, young)
    }

    /// Creates `locks/` (mode 0700) but never the root: a pruner that outlives a
    /// removed store must not bring it back.
    fn create_locks_dir(&self) -> Result<PathBuf> {
        let dir = self.root.join("locks");
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
            Err(e) => Err(Error::io(&dir, e)),
        }
    }

    fn open_staging_lock(&self) -> Result<File> {
        open_lock_file(&self.create_locks_dir()?.join(STAGING_LOCK))
    }

    /// Held by a save while it has temporary entries on disk; see
    /// [`FileStore::prune_staging`]. Closing the file releases it.
    fn staging_guard(&self) -> Result<File> {
        let file = self.open_staging_lock()?;
        // Blocks only while a pruner removes leftovers, which takes milliseconds.
        file.lock_shared()
            .map_err(|e| Error::io(self.root.join("locks").join(STAGING_LOCK), e))?;
        Ok(file)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `live/<name>`: the directory a web server should read.
    pub fn live_dir(&self, name: &str) -> PathBuf {
        self.root.join("live").join(name)
    }

    fn archive_dir(&self, name: &str) -> PathBuf {
        self.root.join("archive").join(name)
    }

    fn load_cert_sync(&self, name: &str) -> Result<Option<StoredCert>> {
        check_name(name)?;
        let Some(set) = self.open_live(name)? else {
            return Ok(None);
        };
        let fullchain = set.read("fullchain.pem")?;
        let key = set.read("privkey.pem")?;
        let meta: CertMeta = serde_json::from_str(&set.read(META_FILE)?).map_err(|e| {
            Error::store(
                "fs",
                crate::error::StoreErrorKind::Corrupt,
                format!(
                    "{}: unreadable metadata: {e}",
                    set.shown().join(META_FILE).display()
                ),
            )
            .with_source(e)
        })?;
        let bundle = CertBundle::from_pem(fullchain, key).map_err(|e| {
            Error::store(
                "fs",
                crate::error::StoreErrorKind::Corrupt,
                format!("{}: {e}", set.shown().display()),
            )
            .with_source(e)
        })?;
        Ok(Some(StoredCert { bundle, meta }))
    }

    /// Finds the set `live/<name>` holds, so that every file is read from that one set
    /// whatever a save flips or swaps meanwhile. `None` when there is no certificate.
    fn open_live(&self, name: &str) -> Result<Option<LiveSet>> {
        use rustix::fs::{Mode, OFlags};
        let live = self.live_dir(name);
        // A second pass only when a plain directory was swapped out under us.
        for _ in 0..2 {
            // One readlink, not a canonicalize: that walks every component of the path,
            // and start-up does this for every certificate. Versions never change.
            match fs::read_link(&live) {
                Ok(target) => {
                    return Ok(Some(LiveSet::Version(self.root.join("live").join(target))));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                // A plain directory (a copied store), whose files are replaced by swapping
                // the whole directory out: opened once and read relative to that.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
                    match rustix::fs::open(&live, flags, Mode::empty()) {
                        Ok(fd) => return Ok(Some(LiveSet::Plain(fd, live))),
                        Err(rustix::io::Errno::NOENT) => continue,
                        Err(e) => return Err(Error::io(&live, e.into())),
                    }
                }
                Err(e) => return Err(Error::io(&live, e)),
            }
        }
        Ok(None)
    }

    /// The stored certificate's serial and renewal state, without reading its key.
    fn load_version_sync(&self, name: &str) -> Result<Option<CertVersion>> {
        check_name(name)?;
        let Some(set) = self.open_live(name)? else {
            return Ok(None);
        };
        let fullchain = set.read("fullchain.pem")?;
        let serial = super::leaf_serial(&fullchain)?;
        let state = self.load_renewal_state_sync(name)?;
        Ok(Some(CertVersion { serial, state }))
    }

    fn load_renewal_state_sync(&self, name: &str) -> Result<RenewalState> {
        check_name(name)?;
        let path = self.root.join("state").join(format!("{name}.json"));
        match read_optional(&path)? {
            None => Ok(RenewalState::default()),
            Some(data) => serde_json::from_slice(&data).map_err(|e| {
                Error::store(
                    "fs",
                    crate::error::StoreErrorKind::Corrupt,
                    format!("{}: unreadable renewal state: {e}", path.display()),
                )
                .with_source(e)
            }),
        }
    }

    fn save_cert_sync(&self, cert: &StoredCert) -> Result<()> {
        let name = cert.meta.name.as_str();
        check_name(name)?;
        let archive = self.archive_dir(name);
        create_private_dir(&self.root.join("archive"))?;
        create_private_dir(&archive)?;
        create_private_dir(&self.root.join("live"))?;
        let _staging_guard = self.staging_guard()?;

        let live = self.live_dir(name);
        // A plain directory where the link goes (a copied store) is kept as the version
        // before the new one.
        let plain = fs::symlink_metadata(&live).is_ok_and(|m| m.is_dir());
        let mut next = next_version(&archive)?;
        let keep_plain_as = plain.then(|| {
            let kept = archive.join(format!("{next:04}"));
            next += 1;
            kept
        });
        let version = format!("{next:04}");
        let staging_root = self.root.join("archive").join(STAGING_DIR);
        create_private_dir(&staging_root)?;
        let staging = staging_root.join(format!("{name}-{version}-{}", rand::random::<u32>()));
        create_private_dir(&staging)?;
        let result = (|| {
            let bundle = &cert.bundle;
            write_file(
                &staging.join("cert.pem"),
                bundle.cert_pem()?.as_bytes(),
                0o644,
            )?;
            write_file(
                &staging.join("chain.pem"),
                bundle.chain_pem()?.as_bytes(),
                0o644,
            )?;
            write_file(
                &staging.join("fullchain.pem"),
                bundle.fullchain_pem().as_bytes(),
                0o644,
            )?;
            write_file(
                &staging.join("privkey.pem"),
                bundle.key_pem().as_bytes(),
                0o600,
            )?;
            let meta = serde_json::to_vec_pretty(&cert.meta).map_err(|e| {
                Error::store(
                    "fs",
                    crate::error::StoreErrorKind::Encode,
                    format!("cannot encode metadata: {e}"),
                )
                .with_source(e)
            })?;
            write_file(&staging.join(META_FILE), &meta, 0o600)?;
            sync_dir(&staging)?;
            let final_dir = archive.join(&version);
            fs::rename(&staging, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
            sync_dir(&archive)?;
            let target = Path::new("..").join("archive").join(name).join(&version);
            match &keep_plain_as {
                Some(kept) => replace_plain_dir(&live, &target, kept),
                None => flip_symlink(&live, &target),
            }
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        } else {
            prune_versions(&archive);
        }
        result
    }
}

#[async_trait]
impl Store for FileStore {
    async fn check_writable(&self) -> Result<()> {
        let root = self.root.clone();
        blocking(move || files::check_writable(&root)).await
    }

    async fn load_cert(&self, name: &str) -> Result<Option<StoredCert>> {
        let this = self.clone();
        let name = name.to_owned();
        blocking(move || this.load_cert_sync(&name)).await
    }

    async fn save_cert(&self, cert: &StoredCert) -> Result<()> {
        let this = self.clone();
        let cert = cert.clone();
        blocking(move || this.save_cert_sync(&cert)).await
    }

    async fn list_certs(&self) -> Result<Vec<String>> {
        let live = self.root.join("live");
        blocking(move || {
            let entries = match fs::read_dir(&live) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(Error::io(&live, e)),
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect();
            names.sort();
            Ok(names)
        })
        .await
    }

    async fn load_account(&self, key: &str) -> Result<Option<Vec<u8>>> {
        check_name(key)?;
        let path = self.root.join("accounts").join(format!("{key}.json"));
        blocking(move || read_optional(&path)).await
    }

    async fn save_account(&self, key: &str, data: &[u8]) -> Result<()> {
        check_name(key)?;
        let dir = self.root.join("accounts");
        let data = data.to_vec();
        let key = key.to_owned();
        let this = self.clone();
        blocking(move || {
            create_private_dir(&dir)?;
            let _staging_guard = this.staging_guard()?;
            atomic_write(&dir.join(format!("{key}.json")), &data, 0o600)
        })
        .await
    }

    async fn load_renewal_state(&self, name: &str) -> Result<RenewalState> {
        let this = self.clone();
        let name = name.to_owned();
        blocking(move || this.load_renewal_state_sync(&name)).await
    }

    async fn load_cert_batch(&self, names: &[String]) -> Vec<BatchEntry> {
        // One trip to a blocking thread for the whole batch: at start-up, a trip per
        // file costs more in thread hand-offs than the reads themselves.
        let this = self.clone();
        let batch = names.to_vec();
        let loaded = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|name| {
                    let cert = this.load_cert_sync(&name);
                    let state = match cert {
                        Ok(Some(_)) => this.load_renewal_state_sync(&name),
                        _ => Ok(RenewalState::default()),
                    };
                    BatchEntry { name, cert, state }
                })
                .collect()
        })
        .await;
        loaded.unwrap_or_else(|e| {
            BatchEntry::all_failed(names, |_| {
                Error::store(
                    "fs",
                    crate::error::StoreErrorKind::Unavailable,
                    format!("store task failed: {e}"),
                )
            })
        })
    }

    /// Reads each certificate's leaf and renewal state, never its key, in one trip to a
    /// blocking thread.
    async fn load_cert_versions(&self, names: &[String]) -> Result<Vec<Option<CertVersion>>> {
        let this = self.clone();
        let names = names.to_vec();
        blocking(move || {
            Ok(names
                .iter()
                // Anything unreadable is read in full, which reports it.
                .map(|name| this.load_version_sync(name).ok().flatten())
                .collect())
        })
        .await
    }

    async fn save_renewal_state(&self, name: &str, state: &RenewalState) -> Result<()> {
        check_name(name)?;
        let dir = self.root.join("state");
        let path = dir.join(format!("{name}.json"));
        let data = serde_json::to_vec_pretty(state).map_err(|e| {
            Error::store(
                "fs",
                crate::error::StoreErrorKind::Encode,
                format!("cannot encode renewal state: {e}"),
            )
            .with_source(e)
        })?;
        let this = self.clone();
        blocking(move || {
            create_private_dir(&dir)?;
            let _staging_guard = this.staging_guard()?;
            atomic_write(&path, &data, 0o600)
        })
        .await
    }

    async fn list_accounts(&self) -> Result<Vec<String>> {
        let dir = self.root.join("accounts");
        blocking(move || {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(Error::io(&dir, e)),
            };
            let mut keys: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
                .filter(|n| !n.starts_with('.'))
                .collect();
            keys.sort();
            Ok(keys)
        })
        .await
    }

    fn as_lock_store(&self) -> Option<&dyn LockStore> {
        Some(self)
    }

    fn as_secret_store(&self) -> Option<&dyn SecretStore> {
        Some(self)
    }

    /// With the `watch` feature: other processes on this machine are seen through a
    /// directory watch.
    #[cfg(feature = "watch")]
    fn as_feed_store(&self) -> Option<&dyn FeedStore> {
        Some(self)
    }
}

/// Advisory file locks (`flock`) under `locks/`: they end with their holder, so a crashed
/// `renew` never blocks the next one, and writes need no fencing.
#[async_trait]
impl LockStore for FileStore {
    async fn lock(
        &self,
        name: &str,
        _lease: Duration,
        wait: Duration,
    ) -> Result<Option<Box<dyn StoreLock>>> {
        check_name(name)?;
        let dir = self.root.join("locks");
        let path = dir.join(format!("{name}.lock"));
        let file = blocking({
            let path = path.clone();
            move || {
                create_private_dir(&dir)?;
                open_lock_file(&path)
            }
        })
        .await?;
        // An advisory lock held by the open file: the kernel drops it when a holder dies,
        // so a crashed `renew` never blocks the next one.
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Some(Box::new(FileLock { _file: file }))),
                Err(fs::TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
    }

    async fn save_cert_fenced(&self, cert: &StoredCert, _lock: &dyn StoreLock) -> Result<()> {
        self.save_cert(cert).await
    }
}

/// Secrets as files under `secrets/`, mode 0600.
#[async_trait]
impl SecretStore for FileStore {
    async fn load_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_name(name)?;
        let path = self.root.join("secrets").join(name);
        blocking(move || read_optional(&path)).await
    }

    async fn save_secret(&self, name: &str, data: &[u8]) -> Result<()> {
        check_name(name)?;
        let dir = self.root.join("secrets");
        let path = dir.join(name);
        let data = zeroize::Zeroizing::new(data.to_vec());
        let this = self.clone();
        blocking(move || {
            create_private_dir(&dir)?;
            let _staging_guard = this.staging_guard()?;
            atomic_write(&path, &data, 0o600)
        })
        .await
    }
}

/// Watches `live/` and `state/`: certificates and renewal state that another process
/// on this machine writes are announced within about 100 ms.
#[cfg(feature = "watch")]
impl FeedStore for FileStore {
    fn subscribe(&self) -> Result<super::StoreSubscription> {
        feed::subscribe(&self.root)
    }
}

struct FileLock {
    _file: File,
}

#[async_trait]
impl StoreLock for FileLock {
    async fn release(self: Box<Self>) -> Result<()> {
        // Closing the file releases the advisory lock.
        Ok(())
    }
}

/// Refuses names that could escape the store or hide as dot files.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "invalid certificate name {name:?}: use letters, digits, '.', '-' and '_' only"
        )))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::store(
            "fs",
            crate::error::StoreErrorKind::Unavailable,
            format!("store task failed: {e}"),
        )
        .with_source(e)
    })?
}

pub(super) fn create_private_dir(path: &Path) -> Result<()> {
    match DirBuilder::new().recursive(true).mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The certificate set `live/<name>` held when it was looked at.
enum LiveSet {
    /// The version directory the link pointed to. Versions are written once and never
    /// changed, so reading its files by path reads one set.
    Version(PathBuf),
    /// A plain directory, opened (its path kept for messages).
    Plain(OwnedFd, PathBuf),
}

impl LiveSet {
    /// Where the set is, for messages.
    fn shown(&self) -> &Path {
        match self {
            LiveSet::Version(dir) | LiveSet::Plain(_, dir) => dir,
        }
    }

    fn read(&self, file: &str) -> Result<String> {
        use rustix::fs::{Mode, OFlags};
        let path = self.shown().join(file);
        match self {
            LiveSet::Version(_) => fs::read_to_string(&path).map_err(|e| Error::io(&path, e)),
            LiveSet::Plain(dir, _) => {
                let fd =
                    rustix::fs::openat(dir, file, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                        .map_err(|e| Error::io(&path, e.into()))?;
                let mut out = String::new();
                File::from(fd)
                    .read_to_string(&mut out)
                    .map_err(|e| Error::io(&path, e))?;
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests;

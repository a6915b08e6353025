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
//! [`Store::subscribe`] watches `live/` and `state/`, so a manager following this store
//! (see [`crate::cluster`]) picks up what other processes on the machine write.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use super::{BatchEntry, CertMeta, CertVersion, RenewalState, Store, StoreLock, StoredCert};
use crate::cert::CertBundle;
use crate::error::{Error, Result};

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
            Error::Store(format!(
                "{}: unreadable metadata: {e}",
                set.shown().join(META_FILE).display()
            ))
        })?;
        let bundle = CertBundle::from_pem(fullchain, key)
            .map_err(|e| Error::Store(format!("{}: {e}", set.shown().display())))?;
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
                Error::Store(format!("{}: unreadable renewal state: {e}", path.display()))
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
            let meta = serde_json::to_vec_pretty(&cert.meta)
                .map_err(|e| Error::Store(format!("cannot encode metadata: {e}")))?;
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
            BatchEntry::all_failed(names, |_| Error::Store(format!("store task failed: {e}")))
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
        let data = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::Store(format!("cannot encode renewal state: {e}")))?;
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

    /// Watches `live/` and `state/`: certificates and renewal state that another process
    /// on this machine writes are announced within about 100 ms.
    #[cfg(feature = "watch")]
    fn subscribe(&self) -> Option<super::StoreSubscription> {
        match super::fs_feed::subscribe(&self.root) {
            Ok(feed) => Some(feed),
            Err(e) => {
                tracing::warn!(store = %self.root.display(), error = %e, "cannot watch the store; changes other processes make are seen only after a restart");
                None
            }
        }
    }

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
        Err(Error::Config(format!(
            "invalid certificate name {name:?}: use letters, digits, '.', '-' and '_' only"
        )))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Store(format!("store task failed: {e}")))?
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

/// Opens (or creates, 0600) a file that only carries an advisory lock.
fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // The umask may have narrowed the mode; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))?;
    file.write_all(data).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes through a temporary file and a rename, so a crash leaves the old file whole.
fn atomic_write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", rand::random::<u32>()));
    let result = write_file(&tmp, data, mode).and_then(|()| {
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Points `link` at `target` atomically: a new symlink beside it, renamed over it.
fn flip_symlink(link: &Path, target: &Path) -> Result<()> {
    let tmp = temp_sibling(link);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(link, e));
    }
    if let Some(parent) = link.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// A hidden name beside `live/<name>` for a link or directory on its way in or out.
fn temp_sibling(link: &Path) -> PathBuf {
    link.with_file_name(format!(
        ".{}.tmp-{}",
        link.file_name().and_then(|n| n.to_str()).unwrap_or("live"),
        rand::random::<u32>()
    ))
}

/// Puts a link to `target` where `live` is a plain directory, and keeps the directory as
/// the archived version `kept` (mode 0700, private keys 0600).
///
/// The link and the directory swap places atomically where the kernel and file system
/// can (`RENAME_EXCHANGE`); elsewhere the directory is renamed away and the link renamed
/// in, and `live` is missing in between. The caller holds the staging guard, so the
/// swapped-out directory is never pruned before it reaches the archive.
fn replace_plain_dir(live: &Path, target: &Path, kept: &Path) -> Result<()> {
    let link = temp_sibling(live);
    std::os::unix::fs::symlink(target, &link).map_err(|e| Error::io(&link, e))?;
    let old = match exchange(&link, live) {
        // The link is live; the old directory now sits where the link was made.
        Ok(()) => link,
        Err(e) if swap_unsupported(&e) => {
            let old = temp_sibling(live);
            if let Err(e) = fs::rename(live, &old) {
                let _ = fs::remove_file(&link);
                return Err(Error::io(live, e));
            }
            if let Err(e) = fs::rename(&link, live) {
                // Put the old directory back rather than leave nothing.
                let _ = fs::rename(&old, live);
                let _ = fs::remove_file(&link);
                return Err(Error::io(live, e));
            }
            old
        }
        Err(e) => {
            let _ = fs::remove_file(&link);
            return Err(Error::io(live, e));
        }
    };
    if let Some(parent) = live.parent() {
        sync_dir(parent)?;
    }
    // The certificate is replaced; what follows only tidies up the old set.
    match fs::rename(&old, kept) {
        Ok(()) => make_private(kept),
        Err(e) => {
            tracing::warn!(path = %old.display(), error = %e, "cannot archive the replaced live directory; it is pruned at a later open");
            make_private(&old);
        }
    }
    Ok(())
}

/// Swaps two directory entries in one step.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(Into::into)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Whether a failed swap means "this system cannot swap" rather than a real failure.
fn swap_unsupported(e: &std::io::Error) -> bool {
    const EINVAL: i32 = rustix::io::Errno::INVAL.raw_os_error();
    const ENOSYS: i32 = rustix::io::Errno::NOSYS.raw_os_error();
    const EOPNOTSUPP: i32 = rustix::io::Errno::OPNOTSUPP.raw_os_error();
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(EINVAL | ENOSYS | EOPNOTSUPP))
}

/// Best effort: an archived directory 0700 and the private keys in it 0600. Links are
/// left alone (certbot's point into its own archive, which certbot keeps private).
fn make_private(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let secret = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("privkey") || n == META_FILE);
        if secret && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600));
        }
    }
}

fn versions(archive: &Path) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = fs::read_dir(archive)
        .map_err(|e| Error::io(archive, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn next_version(archive: &Path) -> Result<u64> {
    Ok(versions(archive)?.last().map_or(1, |v| v + 1))
}

/// Removes all but the newest few versions. Never touches the live one, which is the newest.
fn prune_versions(archive: &Path) {
    let Ok(all) = versions(archive) else { return };
    let excess = all.len().saturating_sub(KEEP_VERSIONS);
    for v in &all[..excess] {
        let _ = fs::remove_dir_all(archive.join(format!("{v:04}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::KeyType;
    use crate::challenge::ChallengeConfig;
    use crate::domain::DomainName;

    fn sample(name: &str, domain: &str) -> StoredCert {
        let key = KeyType::EcdsaP256.generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![domain.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        StoredCert {
            bundle: CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap(),
            meta: CertMeta {
                name: name.into(),
                domains: vec![DomainName::parse(domain).unwrap()],
                key_type: KeyType::EcdsaP256,
                challenge: ChallengeConfig::default(),
                directory: "https://ca.test/dir".into(),
                issued_at: time::OffsetDateTime::now_utc(),
                profile: None,
            },
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn save_then_load_round_trips_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("store")).unwrap();
        let cert = sample("site", "a.example.com");
        store.save_cert(&cert).await.unwrap();
        let loaded = store.load_cert("site").await.unwrap().unwrap();
        assert_eq!(loaded.bundle.fullchain_pem(), cert.bundle.fullchain_pem());
        assert_eq!(loaded.meta, cert.meta);
        let live = store.live_dir("site");
        assert_eq!(mode(&live.join("privkey.pem")), 0o600);
        assert_eq!(mode(&live.join("lobe-tls.json")), 0o600);
        assert_eq!(mode(store.root()), 0o700);
        assert_eq!(mode(&store.root().join("archive/site")), 0o700);
        let staging = store.root().join("archive").join(STAGING_DIR);
        assert_eq!(mode(&staging), 0o700);
        assert_eq!(
            fs::read_dir(&staging).unwrap().count(),
            0,
            "staging left over"
        );
        assert_eq!(store.list_certs().await.unwrap(), ["site"]);
    }

    #[tokio::test]
    async fn a_batch_loads_what_single_loads_would() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("store")).unwrap();
        let good = sample("good", "good.example.com");
        store.save_cert(&good).await.unwrap();
        let state = RenewalState {
            failures: 3,
            ..RenewalState::default()
        };
        store.save_renewal_state("good", &state).await.unwrap();
        // A live directory copied as plain files rather than a symlink.
        let copied = sample("copied", "copied.example.com");
        store.save_cert(&copied).await.unwrap();
        let live = store.live_dir("copied");
        let target = fs::read_link(&live).unwrap();
        fs::remove_file(&live).unwrap();
        fs::create_dir(&live).unwrap();
        for file in ["fullchain.pem", "privkey.pem", META_FILE] {
            let from = dir.path().join("store/live").join(&target).join(file);
            fs::copy(from, live.join(file)).unwrap();
        }
        // A half-written certificate.
        store
            .save_cert(&sample("broken", "broken.example.com"))
            .await
            .unwrap();
        fs::write(store.live_dir("broken").join("privkey.pem"), "junk").unwrap();

        let names = ["good", "copied", "broken", "missing"].map(String::from);
        let batch = store.load_cert_batch(&names).await;
        let names_back: Vec<&str> = batch.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names_back, names);
        let loaded = batch[0].cert.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(loaded.bundle.fullchain_pem(), good.bundle.fullchain_pem());
        assert_eq!(batch[0].state.as_ref().unwrap().failures, 3);
        let loaded = batch[1].cert.as_ref().unwrap().as_ref().unwrap();
        assert_eq!(loaded.bundle.fullchain_pem(), copied.bundle.fullchain_pem());
        let err = batch[2].cert.as_ref().unwrap_err().to_string();
        assert!(
            err.contains("broken") && err.contains("private key"),
            "{err}"
        );
        assert!(batch[3].cert.as_ref().unwrap().is_none());
        for (entry, name) in batch.iter().zip(&names) {
            let single = store.load_cert(name).await;
            assert_eq!(entry.cert.is_ok(), single.is_ok(), "{name}");
        }
    }

    #[tokio::test]
    async fn replacing_flips_the_whole_set_and_prunes_old_versions() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut last = None;
        for _ in 0..5 {
            let cert = sample("site", "a.example.com");
            store.save_cert(&cert).await.unwrap();
            last = Some(cert);
        }
        let loaded = store.load_cert("site").await.unwrap().unwrap();
        assert_eq!(
            loaded.bundle.key_pem(),
            last.unwrap().bundle.key_pem(),
            "live must point at the newest key"
        );
        assert_eq!(
            versions(&dir.path().join("archive/site")).unwrap(),
            [3, 4, 5]
        );
    }

    #[tokio::test]
    async fn names_that_escape_the_store_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        for bad in ["../x", "a/b", ".hidden", ""] {
            assert!(store.load_cert(bad).await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn lock_excludes_a_second_holder_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let lease = Duration::from_secs(60);
        let first = store.lock("site", lease, Duration::ZERO).await.unwrap();
        assert!(first.is_some());
        let second = store
            .lock("site", lease, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(second.is_none(), "second holder got the lock");
        first.unwrap().release().await.unwrap();
        let third = store.lock("site", lease, Duration::ZERO).await.unwrap();
        assert!(third.is_some());
    }

    /// A store without the background pruner that `open` starts, so a test decides when
    /// pruning happens.
    fn unpruned(root: &Path) -> FileStore {
        create_private_dir(root).unwrap();
        FileStore {
            root: root.to_path_buf(),
        }
    }

    /// Sets the modification time of `path` itself (a link's own, not its target's) to
    /// before the grace period.
    fn backdate(path: &Path) {
        use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
        let long_ago = SystemTime::now() - STAGING_GRACE - Duration::from_secs(60);
        let secs = long_ago
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let at = Timespec {
            tv_sec: secs as i64,
            tv_nsec: 0,
        };
        let times = Timestamps {
            last_access: at,
            last_modification: at,
        };
        utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    /// Leftovers as a crash mid-save leaves them, all older than the grace period.
    fn plant_leftovers(root: &Path) -> Vec<String> {
        let staging = root.join("archive/site/.tmp-0002-1234");
        fs::create_dir_all(&staging).unwrap();
        fs::write(staging.join("privkey.pem"), "secret").unwrap();
        backdate(&staging);
        let half_made = root.join("live/.site.tmp-77");
        fs::create_dir_all(root.join("live")).unwrap();
        std::os::unix::fs::symlink("../archive/site/0002", &half_made).unwrap();
        backdate(&half_made);
        for file in ["accounts/acct.tmp-5", "state/site.tmp-6"] {
            let path = root.join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, "{}").unwrap();
            backdate(&path);
        }
        let staged = root.join("archive/.staging/site-0003-42");
        fs::create_dir_all(&staged).unwrap();
        fs::write(staged.join("privkey.pem"), "secret").unwrap();
        backdate(&staged);
        let mut planted: Vec<String> = [
            "archive/.staging/site-0003-42",
            "archive/site/.tmp-0002-1234",
            "live/.site.tmp-77",
            "accounts/acct.tmp-5",
            "state/site.tmp-6",
        ]
        .map(String::from)
        .to_vec();
        planted.sort();
        planted
    }

    #[tokio::test]
    async fn pruning_removes_old_leftovers_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = unpruned(dir.path());
        store
            .save_cert(&sample("site", "a.example.com"))
            .await
            .unwrap();
        store.save_account("acct", b"{}").await.unwrap();
        store
            .save_renewal_state("site", &RenewalState::default())
            .await
            .unwrap();
        // Old, but not leftovers: the live version and the saved files.
        for keep in ["archive/site/0001", "accounts/acct.json", "state/site.json"] {
            backdate(&dir.path().join(keep));
        }
        let planted = plant_leftovers(dir.path());
        // A save's staging directory from a moment ago: too young to judge.
        let fresh = dir.path().join("archive/site/.tmp-0003-99");
        fs::create_dir(&fresh).unwrap();

        let mut pruned = store.prune_staging().unwrap();
        pruned.sort();
        assert_eq!(pruned, planted);
        // A young entry of the older layout is left, so that layout is scanned again.
        let cleared = dir.path().join("locks").join(OLD_STAGING_CLEARED);
        assert!(!cleared.exists());
        for gone in &planted {
            assert!(
                fs::symlink_metadata(dir.path().join(gone)).is_err(),
                "{gone}"
            );
        }
        assert!(fresh.exists());
        backdate(&fresh);
        assert_eq!(
            store.prune_staging().unwrap(),
            ["archive/site/.tmp-0003-99"]
        );
        assert!(cleared.exists());
        assert!(store.load_cert("site").await.unwrap().is_some());
        assert!(store.load_account("acct").await.unwrap().is_some());
        assert_eq!(store.list_certs().await.unwrap(), ["site"]);
    }

    #[tokio::test]
    async fn opening_the_store_prunes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let planted = plant_leftovers(dir.path());
        let _store = FileStore::open(dir.path()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while planted
            .iter()
            .any(|p| fs::symlink_metadata(dir.path().join(p)).is_ok())
        {
            assert!(Instant::now() < deadline, "leftovers still there");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_running_save_keeps_its_staging_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = unpruned(dir.path());
        let planted = plant_leftovers(dir.path());
        // A save in progress (in this or another process) holds the staging lock shared.
        let running = unpruned(dir.path()).staging_guard().unwrap();
        assert!(store.prune_staging().unwrap().is_empty());
        for kept in &planted {
            assert!(
                fs::symlink_metadata(dir.path().join(kept)).is_ok(),
                "{kept}"
            );
        }
        drop(running);
        assert_eq!(store.prune_staging().unwrap().len(), planted.len());
    }

    /// Turns `live/<name>` into a plain directory holding copies of its files, as `cp -r`
    /// without `-P` or an rsync without `-l` leaves it, with a careless mode on the key.
    fn make_plain_copy(store: &FileStore, name: &str) {
        let live = store.live_dir(name);
        let target = store.root.join("live").join(fs::read_link(&live).unwrap());
        fs::remove_file(&live).unwrap();
        fs::create_dir(&live).unwrap();
        fs::set_permissions(&live, fs::Permissions::from_mode(0o755)).unwrap();
        for entry in fs::read_dir(&target).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), live.join(entry.file_name())).unwrap();
        }
        fs::set_permissions(live.join("privkey.pem"), fs::Permissions::from_mode(0o644)).unwrap();
    }

    fn hidden_in_live(store: &FileStore) -> Vec<String> {
        fs::read_dir(store.root.join("live"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[tokio::test]
    async fn a_plain_live_directory_is_replaced_by_a_link_and_kept_privately() {
        let dir = tempfile::tempdir().unwrap();
        let store = unpruned(dir.path());
        let old = sample("site", "a.example.com");
        store.save_cert(&old).await.unwrap();
        make_plain_copy(&store, "site");
        assert_eq!(
            store
                .load_cert("site")
                .await
                .unwrap()
                .unwrap()
                .bundle
                .key_pem(),
            old.bundle.key_pem()
        );

        let new = sample("site", "a.example.com");
        store.save_cert(&new).await.unwrap();
        let live = store.live_dir("site");
        assert!(fs::symlink_metadata(&live).unwrap().is_symlink());
        let loaded = store.load_cert("site").await.unwrap().unwrap();
        assert_eq!(loaded.bundle.key_pem(), new.bundle.key_pem());
        assert_eq!(loaded.bundle.fullchain_pem(), new.bundle.fullchain_pem());
        // The new set and the kept old one: directories 0700, keys 0600.
        let archive = dir.path().join("archive/site");
        assert_eq!(versions(&archive).unwrap(), [1, 2, 3]);
        assert_eq!(
            fs::read_link(&live).unwrap(),
            Path::new("../archive/site/0003")
        );
        for version in ["0002", "0003"] {
            assert_eq!(mode(&archive.join(version)), 0o700, "{version}");
            assert_eq!(mode(&archive.join(version).join("privkey.pem")), 0o600);
        }
        assert_eq!(
            fs::read_to_string(archive.join("0002/privkey.pem")).unwrap(),
            old.bundle.key_pem()
        );
        assert!(
            hidden_in_live(&store).is_empty(),
            "{:?}",
            hidden_in_live(&store)
        );
        // And the next renewal is an ordinary flip.
        store
            .save_cert(&sample("site", "a.example.com"))
            .await
            .unwrap();
        assert_eq!(
            fs::read_link(&live).unwrap(),
            Path::new("../archive/site/0004")
        );
    }

    #[tokio::test]
    async fn a_certbot_live_directory_of_links_is_replaced_without_touching_its_targets() {
        let dir = tempfile::tempdir().unwrap();
        let store = unpruned(dir.path());
        let old = sample("site", "a.example.com");
        // certbot: archive/<name>/<file>1.pem, and live/<name>/ a directory of links to them.
        let archive = dir.path().join("archive/site");
        fs::create_dir_all(&archive).unwrap();
        let live = store.live_dir("site");
        fs::create_dir_all(&live).unwrap();
        let files = [
            ("fullchain", old.bundle.fullchain_pem().to_owned()),
            ("privkey", old.bundle.key_pem().to_owned()),
            ("meta", serde_json::to_string(&old.meta).unwrap()),
        ];
        for (stem, data) in &files {
            let file = archive.join(format!("{stem}1.pem"));
            fs::write(&file, data).unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
            let link_name = match *stem {
                "meta" => META_FILE.to_owned(),
                _ => format!("{stem}.pem"),
            };
            std::os::unix::fs::symlink(
                format!("../../archive/site/{stem}1.pem"),
                live.join(link_name),
            )
            .unwrap();
        }
        assert!(store.load_cert("site").await.unwrap().is_some());

        let new = sample("site", "a.example.com");
        store.save_cert(&new).await.unwrap();
        let loaded = store.load_cert("site").await.unwrap().unwrap();
        assert_eq!(loaded.bundle.key_pem(), new.bundle.key_pem());
        // certbot's own files are neither moved nor re-moded.
        assert_eq!(mode(&archive.join("privkey1.pem")), 0o640);
        assert_eq!(
            fs::read_to_string(archive.join("privkey1.pem")).unwrap(),
            old.bundle.key_pem()
        );
        assert_eq!(mode(&archive.join("0001")), 0o700);
        assert!(hidden_in_live(&store).is_empty());
    }

    /// Whether this file system swaps entries atomically (tmpfs, ext4, xfs, btrfs do).
    fn can_exchange(dir: &Path) -> bool {
        let (a, b) = (dir.join("swap-a"), dir.join("swap-b"));
        fs::create_dir(&a).unwrap();
        std::os::unix::fs::symlink("swap-a", &b).unwrap();
        let ok = exchange(&a, &b).is_ok();
        let _ = fs::remove_file(&a);
        let _ = fs::remove_dir(&a);
        let _ = fs::remove_file(&b);
        let _ = fs::remove_dir(&b);
        ok
    }

    #[test]
    fn a_reader_never_sees_a_mix_while_a_plain_directory_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let atomic = can_exchange(dir.path());
        let store = unpruned(&dir.path().join("store"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let certs: Vec<StoredCert> = (0..2).map(|_| sample("site", "a.example.com")).collect();
        for round in 0..60 {
            runtime
                .block_on(store.save_cert(&certs[round % 2]))
                .unwrap();
            make_plain_copy(&store, "site");
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            // One reader loads in full (a new certificate with an old key fails to load:
            // they must match); the other only opens `live/site`, often enough to catch
            // it missing for a moment.
            let reader = {
                let (store, stop) = (store.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                        store.load_cert_sync("site").unwrap();
                        reads += 1;
                    }
                })
            };
            let prober = {
                let (store, stop) = (store.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut missing = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if store.open_live("site").unwrap().is_none() {
                            missing += 1;
                        }
                    }
                    missing
                })
            };
            runtime
                .block_on(store.save_cert(&certs[(round + 1) % 2]))
                .unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap();
            let missing = prober.join().unwrap();
            if atomic {
                assert_eq!(missing, 0, "live/site went missing in round {round}");
            }
            let loaded = store.load_cert_sync("site").unwrap().unwrap();
            assert_eq!(
                loaded.bundle.key_pem(),
                certs[(round + 1) % 2].bundle.key_pem()
            );
        }
    }

    #[tokio::test]
    async fn account_and_state_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.save_account("acct", b"{}").await.unwrap();
        assert_eq!(store.load_account("acct").await.unwrap().unwrap(), b"{}");
        assert_eq!(store.list_accounts().await.unwrap(), ["acct"]);
        assert_eq!(mode(&dir.path().join("accounts/acct.json")), 0o600);
        let state = RenewalState {
            failures: 2,
            ..Default::default()
        };
        store.save_renewal_state("site", &state).await.unwrap();
        assert_eq!(store.load_renewal_state("site").await.unwrap(), state);
    }
}

//! The file store, in a certbot-compatible layout that nginx or HAProxy can read:
//!
//! ```text
//! <root>/live/<name>            -> ../archive/<name>/<version>   (a directory symlink)
//! <root>/archive/<name>/<version>/{cert,chain,fullchain,privkey}.pem, lobe-tls.json
//! <root>/accounts/<key>.json
//! <root>/state/<name>.json      renewal bookkeeping
//! <root>/locks/<name>.lock
//! ```
//!
//! A new certificate is written into a fresh version directory, synced, and then
//! `live/<name>` is flipped to it with one `rename`: a reader resolving the symlink sees
//! the old set or the new set, never a new certificate with an old key.
//!
//! [`Store::subscribe`] watches `live/` and `state/`, so a manager following this store
//! (see [`crate::cluster`]) picks up what other processes on the machine write.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{BatchEntry, CertMeta, RenewalState, Store, StoreLock, StoreSubscription, StoredCert};
use crate::cert::CertBundle;
use crate::error::{Error, Result};

/// How many old versions of each certificate to keep under `archive/`.
const KEEP_VERSIONS: usize = 3;
/// The metadata file next to the PEM files.
const META_FILE: &str = "lobe-tls.json";

/// A store on the local file system.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// Opens (and creates, mode 0700) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        create_private_dir(&root)?;
        Ok(FileStore { root })
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
        let live = self.live_dir(name);
        // Resolve the symlink once, so every file comes from the same version. One
        // readlink, not a canonicalize: that walks every component of the path, and start-up
        // does this for every certificate.
        let dir = match fs::read_link(&live) {
            Ok(target) => self.root.join("live").join(target),
            // A plain directory (a copied store, say) is read as it is.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => live,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&live, e)),
        };
        let fullchain = read_string(&dir.join("fullchain.pem"))?;
        let key = read_string(&dir.join("privkey.pem"))?;
        let meta_path = dir.join(META_FILE);
        let meta: CertMeta = serde_json::from_str(&read_string(&meta_path)?).map_err(|e| {
            Error::Store(format!("{}: unreadable metadata: {e}", meta_path.display()))
        })?;
        let bundle = CertBundle::from_pem(fullchain, key)
            .map_err(|e| Error::Store(format!("{}: {e}", dir.display())))?;
        Ok(Some(StoredCert { bundle, meta }))
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

        let version = next_version(&archive)?;
        let staging = archive.join(format!(".tmp-{version}-{}", rand::random::<u32>()));
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
            flip_symlink(
                &self.live_dir(name),
                &Path::new("..").join("archive").join(name).join(&version),
            )
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
        blocking(move || {
            create_private_dir(&dir)?;
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
            let why = format!("store task failed: {e}");
            names
                .iter()
                .map(|name| BatchEntry {
                    name: name.clone(),
                    cert: Err(Error::Store(why.clone())),
                    state: Ok(RenewalState::default()),
                })
                .collect()
        })
    }

    async fn save_renewal_state(&self, name: &str, state: &RenewalState) -> Result<()> {
        check_name(name)?;
        let dir = self.root.join("state");
        let path = dir.join(format!("{name}.json"));
        let data = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::Store(format!("cannot encode renewal state: {e}")))?;
        blocking(move || {
            create_private_dir(&dir)?;
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
    fn subscribe(&self) -> Option<StoreSubscription> {
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
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))
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

fn read_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::io(path, e))
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
    let tmp = link.with_file_name(format!(
        ".{}.tmp-{}",
        link.file_name().and_then(|n| n.to_str()).unwrap_or("live"),
        rand::random::<u32>()
    ));
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

fn versions(archive: &Path) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = fs::read_dir(archive)
        .map_err(|e| Error::io(archive, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    out.sort_unstable();
    Ok(out)
}

fn next_version(archive: &Path) -> Result<String> {
    let next = versions(archive)?.last().map_or(1, |v| v + 1);
    Ok(format!("{next:04}"))
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

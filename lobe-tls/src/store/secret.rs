//! Secrets every process sharing a store must agree on (session ticket keys, the
//! affinity cookie key): read from the store, and created (or replaced) by one process
//! only, under a store lock, so that instances starting together end up with the same.

use std::time::Duration;

use zeroize::Zeroizing;

use super::DynStore;
use crate::error::{Error, Result};

/// How long a process waits for another that holds a secret's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// A secret blob in the store and the lock under which it is written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedSecret<'a> {
    /// The secret's name in the store.
    pub name: &'a str,
    /// The store lock taken to write it (not a certificate name: starts with `_-`).
    pub lock: &'a str,
    /// What it is, for messages ("session ticket key").
    pub what: &'a str,
}

impl SharedSecret<'_> {
    /// The stored value when `decode` reads it and `keep` accepts it; otherwise, under
    /// the lock, the value stored meanwhile by another process if that one will do, or
    /// the one `create` makes from what is stored (`None`: nothing readable), saved for
    /// the others. When another process holds the lock past the wait, the stored value
    /// is used as it is, if there is one.
    ///
    /// Refused when the store cannot keep secrets or has no locks to write them under.
    pub async fn load_or_create<T>(
        &self,
        store: &DynStore,
        decode: impl Fn(&[u8]) -> Option<T>,
        keep: impl Fn(&T) -> bool,
        create: impl FnOnce(Option<T>) -> Result<(T, Zeroizing<Vec<u8>>)>,
    ) -> Result<T> {
        let needed_for = format!("sharing the {}", self.what);
        let secrets = store.secrets_for(&needed_for)?;
        let locks = store.locks_for(&needed_for)?;
        let (name, decode) = (self.name, &decode);
        let read = move || async move {
            let data = secrets.load_secret(name).await?.map(Zeroizing::new);
            Ok::<_, Error>(data.and_then(|data| decode(&data)))
        };
        let stored = match read().await? {
            Some(value) if keep(&value) => return Ok(value),
            other => other,
        };
        let Some(lock) = locks
            .lock(self.lock, crate::issue::LOCK_LEASE, LOCK_WAIT)
            .await?
        else {
            return stored.ok_or_else(|| {
                Error::timeout(format!(
                    "another process holds the {} lock; try again",
                    self.what
                ))
            });
        };
        let result = async {
            let stored = match read().await? {
                // Another process wrote it while this one waited for the lock.
                Some(value) if keep(&value) => return Ok(value),
                other => other,
            };
            let (value, encoded) = create(stored)?;
            secrets.save_secret(self.name, &encoded).await?;
            Ok(value)
        }
        .await;
        if let Err(e) = lock.release().await {
            tracing::warn!(error = %e, "cannot release the {} lock", self.what);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::FileStore;
    use crate::store::SecretStore;

    const SECRET: SharedSecret<'static> = SharedSecret {
        name: "test-secret",
        lock: "_-test-secret",
        what: "test secret",
    };

    fn store() -> (tempfile::TempDir, Arc<FileStore>) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = FileStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        (dir, Arc::new(store))
    }

    /// Reads or creates a 32-byte secret; shorter blobs do not count.
    async fn key(store: &Arc<FileStore>) -> Result<Vec<u8>> {
        let store: DynStore = store.clone();
        SECRET
            .load_or_create(
                &store,
                |data| (data.len() == 32).then(|| data.to_vec()),
                |_| true,
                |_| {
                    let fresh: [u8; 32] = rand::random();
                    Ok((fresh.to_vec(), Zeroizing::new(fresh.to_vec())))
                },
            )
            .await
    }

    #[tokio::test]
    async fn processes_starting_together_agree_on_one_secret() {
        let (_dir, store) = store();
        let all = futures_util::future::join_all((0..6).map(|_| key(&store))).await;
        let first = all[0].as_ref().ok().cloned().unwrap_or_default();
        assert_eq!(first.len(), 32);
        assert!(all.iter().all(|k| k.as_ref().ok() == Some(&first)));
        assert_eq!(
            store.load_secret(SECRET.name).await.ok().flatten(),
            Some(first)
        );
    }

    #[tokio::test]
    async fn an_unreadable_or_rejected_secret_is_replaced_from_what_is_stored() {
        let (_dir, store) = store();
        store
            .save_secret(SECRET.name, b"short")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let replaced = key(&store).await.unwrap_or_default();
        assert_eq!(replaced.len(), 32);
        // `keep` rejects the stored value: `create` sees it and derives the next one.
        let dyn_store: DynStore = store.clone();
        let next = SECRET
            .load_or_create(
                &dyn_store,
                |data| Some(data.to_vec()),
                |_| false,
                |stored| {
                    let mut next = stored.unwrap_or_default();
                    next.reverse();
                    Ok((next.clone(), Zeroizing::new(next)))
                },
            )
            .await
            .unwrap_or_default();
        let mut expected = replaced.clone();
        expected.reverse();
        assert_eq!(next, expected);
        assert_eq!(key(&store).await.ok(), Some(expected));
    }

    /// A store without secrets is refused before anything is created: a secret made up
    /// per process would silently differ between the instances.
    #[tokio::test]
    async fn a_store_without_secrets_is_refused() {
        let store: DynStore = Arc::new(crate::store::core_only::CoreOnly::default());
        let created = std::sync::atomic::AtomicBool::new(false);
        let err = SECRET
            .load_or_create(
                &store,
                |data| Some(data.to_vec()),
                |_| true,
                |_| {
                    created.store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok((vec![1], Zeroizing::new(vec![1])))
                },
            )
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("sharing the test secret needs a store with secrets"),
            "{err}"
        );
        assert!(!created.load(std::sync::atomic::Ordering::Relaxed));
    }
}

//! The cluster lock: a lease with a token, renewed in the background, released by script.

use super::*;

/// A held Redis lock. A background task renews the lease every third of it until the
/// lock is released or dropped, so a long order keeps the lock, and a crashed holder
/// blocks others for one lease at most.
pub(super) struct RedisLock {
    conn: Conn,
    key: String,
    token: String,
    target: String,
    renewer: JoinHandle<()>,
    released: bool,
}

impl RedisLock {
    pub(super) fn held(
        store: &RedisStore,
        name: &str,
        key: String,
        token: String,
        lease: Duration,
    ) -> Self {
        let renewer = tokio::spawn(renew_lease(
            store.conn.clone(),
            name.to_owned(),
            key.clone(),
            token.clone(),
            lease,
        ));
        RedisLock {
            conn: store.conn.clone(),
            key,
            token,
            target: store.target.clone(),
            renewer,
            released: false,
        }
    }
}

pub(super) async fn renew_lease(
    mut conn: Conn,
    name: String,
    key: String,
    token: String,
    lease: Duration,
) {
    let script = Script::new(RENEW_SCRIPT);
    loop {
        tokio::time::sleep(lease / 3).await;
        let renewed: std::result::Result<i64, RedisError> = script
            .key(&key)
            .arg(&token)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await;
        match renewed {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(
                    name,
                    "the cluster lock expired before it could be renewed; another instance may take over"
                );
                return;
            }
            // The lease may still be valid: keep trying until it is clearly lost.
            Err(e) => tracing::warn!(name, error = %e, "cannot renew the cluster lock lease"),
        }
    }
}

#[async_trait]
impl StoreLock for RedisLock {
    fn fencing_token(&self) -> Option<&str> {
        Some(&self.token)
    }

    async fn release(mut self: Box<Self>) -> Result<()> {
        self.renewer.abort();
        self.released = true;
        let mut conn = self.conn.clone();
        Script::new(RELEASE_SCRIPT)
            .key(&self.key)
            .arg(&self.token)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::store(
                    "redis",
                    crate::error::StoreErrorKind::Unavailable,
                    format!(
                        "redis {}: cannot release lock {}: {e}; it expires with its lease",
                        self.target, self.key
                    ),
                )
                .with_source(e)
            })
    }
}

impl Drop for RedisLock {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.released {
            return;
        }
        // Best effort: without a runtime the lease simply runs out.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let mut conn = self.conn.clone();
            let key = std::mem::take(&mut self.key);
            let token = std::mem::take(&mut self.token);
            handle.spawn(async move {
                let _ = Script::new(RELEASE_SCRIPT)
                    .key(&key)
                    .arg(&token)
                    .invoke_async::<i64>(&mut conn)
                    .await;
            });
        }
    }
}

//! The cluster lock: a lease with a token, renewed in the background, released by script.

use std::time::Duration;

use ::redis::{RedisError, Script};
use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::codec::encode_cert;
use super::conn::Conn;
use super::{RedisStore, millis};
use crate::error::{Error, Result};
use crate::store::fs::check_name;
use crate::store::{LockStore, Store, StoreLock, StoredCert};

/// How often `lock` retries while another instance holds the lock.
const LOCK_POLL: Duration = Duration::from_millis(50);
/// Shortest lease accepted, so renewal (every third of the lease) stays sane.
const MIN_LEASE: Duration = Duration::from_secs(1);

/// Deletes the lock only if it still holds our token: a holder whose lease expired must
/// not release the lock another instance has taken since.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Saves a certificate (value, index, announcement) only if the lock still holds our
/// token: the fencing that keeps a holder whose lease ran out from writing over a newer
/// certificate. KEYS: lock, cert, index. ARGV: token, value, name, channel.
const FENCED_SAVE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[4], 'cert ' .. ARGV[3])
return 1
"#;

/// The fenced save on a cluster: the value only (no index, and the announcement follows
/// apart, in the channel's own slot). KEYS: lock, cert (one hash tag). ARGV: token, value.
const FENCED_SAVE_CLUSTER_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"#;

/// On a cluster, how long a lock or a fenced save waits for one replica to have it, so
/// that a master failing right after does not take it along (Redis replicates after
/// answering). Not waiting longer, nor failing: a master without a live replica keeps
/// working, only without that guard.
const REPLICA_WAIT: Duration = Duration::from_millis(200);

/// Extends the lease only if the lock still holds our token.
const RENEW_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// A one-key script, sent whole (`EVAL`, not `EVALSHA`): a replica promoted a moment ago
/// has an empty script cache, and `EVALSHA` would fail there with `NOSCRIPT`. The scripts
/// are a few lines, and Redis caches what `EVAL` compiles.
fn eval(script: &str, key: &str) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd("EVAL");
    cmd.arg(script).arg(1).arg(key);
    cmd
}

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
    loop {
        tokio::time::sleep(lease / 3).await;
        let renewed: std::result::Result<i64, RedisError> = eval(RENEW_SCRIPT, &key)
            .arg(&token)
            .arg(millis(lease))
            .query_async(&mut conn)
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
        eval(RELEASE_SCRIPT, &self.key)
            .arg(&self.token)
            .query_async::<i64>(&mut conn)
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
                let _ = eval(RELEASE_SCRIPT, &key)
                    .arg(&token)
                    .query_async::<i64>(&mut conn)
                    .await;
            });
        }
    }
}

/// Leases under `<prefix>:lock:<name>` (tagged like the certificate on a cluster),
/// renewed while held; a write under a lock is fenced by its token.
#[async_trait]
impl LockStore for RedisStore {
    async fn lock(
        &self,
        name: &str,
        lease: Duration,
        wait: Duration,
    ) -> Result<Option<Box<dyn StoreLock>>> {
        check_name(name)?;
        let lease = lease.max(MIN_LEASE);
        let key = self.keys.lock(name);
        let cluster = self.is_cluster();
        let token = format!("{:032x}", rand::random::<u128>());
        let deadline = Instant::now() + wait;
        let mut conn = self.conn.clone();
        loop {
            let mut take = ::redis::pipe();
            take.cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(millis(lease));
            if cluster {
                take.cmd("WAIT").arg(1).arg(millis(REPLICA_WAIT)).ignore();
            }
            let (taken,): (Option<String>,) = take
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error(&format!("take the lock on {name}"), &e))?;
            if taken.is_some() {
                tracing::debug!(name, "took the cluster lock");
                return Ok(Some(Box::new(RedisLock::held(
                    self, name, key, token, lease,
                ))));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(LOCK_POLL.min(deadline - Instant::now())).await;
        }
    }

    async fn save_cert_fenced(&self, cert: &StoredCert, lock: &dyn StoreLock) -> Result<()> {
        let Some(token) = lock.fencing_token() else {
            return self.save_cert(cert).await;
        };
        let name = cert.meta.name.as_str();
        let value = encode_cert(cert)?;
        let mut conn = self.conn.clone();
        let saved = match &self.conn {
            Conn::Cluster(cluster) => {
                let mut save = ::redis::pipe();
                save.cmd("EVAL")
                    .arg(FENCED_SAVE_CLUSTER_SCRIPT)
                    .arg(2)
                    .arg(self.keys.lock(name))
                    .arg(self.keys.cert(name))
                    .arg(token)
                    .arg(value)
                    .cmd("WAIT")
                    .arg(1)
                    .arg(millis(REPLICA_WAIT))
                    .ignore();
                let (saved,): (i64,) = save
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.error(&format!("save certificate {name}"), &e))?;
                if saved == 1 {
                    self.announce(cluster, &format!("cert {name}")).await;
                }
                saved
            }
            _ => {
                let index = self.keys.certs_index().unwrap_or_default();
                Script::new(FENCED_SAVE_SCRIPT)
                    .key(self.keys.lock(name))
                    .key(self.keys.cert(name))
                    .key(index)
                    .arg(token)
                    .arg(value)
                    .arg(name)
                    .arg(self.channel())
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(|e| self.error(&format!("save certificate {name}"), &e))?
            }
        };
        if saved == 1 {
            Ok(())
        } else {
            Err(Error::store(
                "redis",
                crate::error::StoreErrorKind::Locked,
                format!(
                    "the lock on {name} was lost before the new certificate was stored (its lease ran out); not overwriting what another instance may have stored since"
                ),
            ))
        }
    }
}

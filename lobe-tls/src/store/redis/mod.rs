//! The Redis store, shared by every instance of a cluster.
//!
//! Keys, under a configurable prefix (default `lobe-tls`); on a Redis Cluster they carry
//! hash tags (see the `keys` module):
//!
//! ```text
//! <prefix>:cert:<name>        one JSON value: full chain, key and metadata together
//! <prefix>:certs              set of certificate names (not on a cluster: listing scans)
//! <prefix>:account:<key>      account blob
//! <prefix>:accounts           set of account keys
//! <prefix>:state:<name>       renewal state (JSON)
//! <prefix>:challenge:<key>    challenge response, with a TTL (http-01/<token>, tls-alpn-01/<domain>)
//! <prefix>:lock:<name>        lock token, with a lease (PX)
//! <prefix>:secret:<name>      shared secret blob (session ticket keys)
//! <prefix>:events             pub/sub channel: "cert <name>", "challenge-put <key>", "challenge-del <key>"
//! ```
//!
//! A certificate and its key live in one value, so a reader never sees a new certificate
//! with an old key. Writes that also announce themselves run in one MULTI transaction.
//! The value starts with the leaf's serial (`{"serial":"…",`), so a re-sync learns what
//! is stored from the first bytes of each value (`GETRANGE`) and reads and parses in full
//! only what changed. Key parsing runs on blocking threads, never on the async runtime.
//!
//! Commands go through a `ConnectionManager`, which reconnects by itself: while Redis is
//! down every call fails fast with a one-line error, and works again once Redis is back.
//!
//! Behind Sentinel (`redis+sentinel://`, `rediss+sentinel://`), every connection, the
//! event feed's included, is made to the master the sentinels name at that moment, and
//! remade after a failover; see the `sentinel` module. On a Redis Cluster
//! (`redis+cluster://`, `rediss+cluster://`) commands go through redis-rs's cluster client;
//! see the `cluster` module.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Client, RedisError};
use async_trait::async_trait;

use super::SecretStore;
use super::fs::check_name;
use crate::error::{Error, Result};

mod address;
mod certs;
mod challenges;
mod cluster;
mod codec;
mod conn;
mod feed;
mod keys;
mod lock;
mod sentinel;

use address::{redact, split_prefix};
use cluster::{ClusterConn, ClusterUrl, is_cluster_url};
#[doc(hidden)]
pub use codec::{decode_cert, decode_renewal_state, parse_event};
use conn::Conn;
use keys::Keys;
use sentinel::is_sentinel_url;
use sentinel::{SentinelConn, SentinelUrl};

/// The key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "lobe-tls";

/// How long one command may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A store in Redis (`redis://` or `rediss://`, behind Sentinel with `redis+sentinel://`
/// or `rediss+sentinel://`, or on a Redis Cluster with `redis+cluster://` or
/// `rediss+cluster://`), shared by many instances.
///
/// Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    keys: Keys,
    target: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.target)
            .field("prefix", &self.keys.prefix())
            .finish()
    }
}

impl RedisStore {
    /// Opens a store at `url` without touching the network; the connection is made on
    /// first use and remade whenever it breaks. Must be called inside a tokio runtime.
    ///
    /// The URL is redis-rs's (`redis://[:password@]host[:port][/db]`, `rediss://` for
    /// TLS), plus an optional `prefix=NAME` query parameter for the key prefix.
    ///
    /// Behind Sentinel it is
    /// `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB][?prefix=NAME]`
    /// (`rediss+sentinel://` for TLS to the sentinels and the data nodes): the listed
    /// sentinels are asked for the master of `SERVICE` at every (re)connection. The
    /// password is the data nodes'; the sentinels are offered it too, and asked without
    /// it if they have no password.
    ///
    /// On a Redis Cluster it is
    /// `redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...][/?prefix=NAME]`
    /// (`rediss+cluster://` for TLS): the listed nodes are seeds, from which the client
    /// learns the rest. A cluster has only database 0, so the URL names none.
    pub fn open(url: &str) -> Result<Self> {
        let (url, prefix) = split_prefix(url);
        let target = redact(&url);
        let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        if is_cluster_url(&url) {
            let parsed = ClusterUrl::parse(&url).map_err(|e| {
                Error::config(format!(
                    "invalid Redis Cluster URL {target}: {e}; {}",
                    cluster::USAGE
                ))
            })?;
            let conn = ClusterConn::new(&parsed, CONNECT_TIMEOUT, RESPONSE_TIMEOUT)
                .map_err(|e| unavailable(&target, e))?;
            return Ok(RedisStore {
                conn: Conn::Cluster(conn),
                keys: Keys::new(prefix, true),
                target,
            });
        }
        if is_sentinel_url(&url) {
            let parsed = SentinelUrl::parse(&url).map_err(|e| {
                Error::config(format!(
                    "invalid Redis Sentinel URL {target}: {e}; {}",
                    sentinel::USAGE
                ))
            })?;
            let conn =
                SentinelConn::new(&parsed, CONNECT_TIMEOUT, RESPONSE_TIMEOUT).map_err(|e| {
                    Error::store(
                        "redis",
                        crate::error::StoreErrorKind::Unavailable,
                        format!("redis {target}: {e}"),
                    )
                    .with_source(e)
                })?;
            return Ok(RedisStore {
                conn: Conn::Sentinel(conn),
                keys: Keys::new(prefix, false),
                target,
            });
        }
        let client = Client::open(url.as_str()).map_err(|e| {
            Error::config(format!(
                "invalid Redis URL {target}: {e}; use redis://[:password@]host[:port][/db]"
            ))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let manager =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(|e| {
                Error::store(
                    "redis",
                    crate::error::StoreErrorKind::Unavailable,
                    format!("redis {target}: {e}"),
                )
                .with_source(e)
            })?;
        Ok(RedisStore {
            conn: Conn::Direct {
                client: Arc::new(client),
                manager,
            },
            keys: Keys::new(prefix, false),
            target,
        })
    }

    /// Opens a store at `url` and checks that Redis answers, and that it is what the URL
    /// says: a `redis+cluster://` URL must name a cluster that serves every slot, and the
    /// other URLs a Redis that is not a cluster node.
    pub async fn connect(url: &str) -> Result<Self> {
        let store = Self::open(url)?;
        match &store.conn {
            Conn::Cluster(cluster) => store.check_cluster(cluster).await?,
            Conn::Direct { .. } => {
                store.ping().await?;
                store.refuse_cluster_node().await?;
            }
            Conn::Sentinel(_) => store.ping().await?,
        }
        Ok(store)
    }

    /// Replaces the key prefix (the default is `lobe-tls`, or the URL's `prefix=`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.keys.set_prefix(prefix.into());
        self
    }

    /// The key prefix in use.
    pub fn prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// Whether this store is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// A cluster URL that reaches a standalone Redis gets an error that says so; so does a
    /// cluster that does not serve every slot.
    async fn check_cluster(&self, cluster: &ClusterConn) -> Result<()> {
        match cluster.check_state().await {
            Ok(None) => Ok(()),
            Ok(Some(why)) => Err(Error::store(
                "redis",
                crate::error::StoreErrorKind::Unavailable,
                format!("redis {}: {why}", self.target),
            )),
            Err(e) if is_cluster_disabled(&e) => Err(Error::config(format!(
                "{} names a standalone Redis, not a cluster (cluster support is disabled on it); use redis://HOST:PORT/ for it",
                self.target
            ))),
            Err(e) => Err(self.error("reach the Redis Cluster", &e)),
        }
    }

    /// A plain URL that reaches a node of a cluster would see one shard's keys, and
    /// fail on the others: refused with an error that names the right scheme.
    async fn refuse_cluster_node(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let info: std::result::Result<String, RedisError> = ::redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut conn)
            .await;
        // A server too old or too locked down to answer is no cluster node we can tell.
        let Ok(info) = info else { return Ok(()) };
        if info.lines().any(|line| line.trim() == "cluster_enabled:1") {
            return Err(Error::config(format!(
                "{} is a node of a Redis Cluster; use redis+cluster://HOST:PORT[,HOST:PORT...]/ to use the cluster",
                self.target
            )));
        }
        Ok(())
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| self.error("reach Redis", &e))
    }

    /// The pub/sub channel that announces changes (a sharded channel on a cluster whose
    /// servers have them).
    pub fn channel(&self) -> String {
        self.keys.channel()
    }

    /// Runs `writes` (an atomic pipeline over one slot's keys) and announces `event`: in
    /// the same transaction on one Redis; after it on a cluster, where the channel lives
    /// in another slot. There a failed announcement is logged, not returned: the write
    /// is done, and the other instances' re-sync finds it.
    async fn write_and_announce(
        &self,
        mut writes: ::redis::Pipeline,
        event: String,
        what: &str,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        let Conn::Cluster(cluster) = &self.conn else {
            writes.publish(self.channel(), event).ignore();
            return writes
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.error(what, &e));
        };
        writes
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(what, &e))?;
        self.announce(cluster, &event).await;
        Ok(())
    }

    /// Announces `event` on a cluster (after a write that is done).
    async fn announce(&self, cluster: &ClusterConn, event: &str) {
        if let Err(e) = cluster.publish(&self.channel(), event).await {
            tracing::warn!(redis = %self.target, event, error = %e, "cannot announce a change on the cluster; the other instances pick it up at their next re-sync");
        }
    }

    fn error(&self, what: &str, e: &RedisError) -> Error {
        Error::store(
            "redis",
            crate::error::StoreErrorKind::Unavailable,
            format!(
                "redis {}: cannot {what}: {e}; check that Redis is up and reachable",
                self.target
            ),
        )
    }
}

/// Secrets under `<prefix>:secret:<name>`.
#[async_trait]
impl SecretStore for RedisStore {
    async fn load_secret(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_name(name)?;
        let mut conn = self.conn.clone();
        conn.get(self.keys.secret(name))
            .await
            .map_err(|e| self.error(&format!("load secret {name}"), &e))
    }

    async fn save_secret(&self, name: &str, data: &[u8]) -> Result<()> {
        check_name(name)?;
        let mut conn = self.conn.clone();
        conn.set(self.keys.secret(name), data)
            .await
            .map_err(|e| self.error(&format!("save secret {name}"), &e))
    }
}

/// The error of an unreachable store, with its cause.
fn unavailable(target: &str, e: RedisError) -> Error {
    Error::store(
        "redis",
        crate::error::StoreErrorKind::Unavailable,
        format!("redis {target}: {e}"),
    )
    .with_source(e)
}

/// Whether `e` is a standalone server's answer to a cluster command.
fn is_cluster_disabled(e: &RedisError) -> bool {
    e.to_string().contains("cluster support disabled")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

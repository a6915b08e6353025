//! The Redis store, shared by every instance of a cluster.
//!
//! Keys, under a configurable prefix (default `lobe-tls`):
//!
//! ```text
//! <prefix>:cert:<name>        one JSON value: full chain, key and metadata together
//! <prefix>:certs              set of certificate names
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
//! remade after a failover; see the `sentinel` module.

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
mod codec;
mod conn;
mod feed;
mod lock;
mod sentinel;

use address::{redact, split_prefix};
#[doc(hidden)]
pub use codec::{decode_cert, decode_renewal_state, parse_event};
use conn::Conn;
use sentinel::is_sentinel_url;
use sentinel::{SentinelConn, SentinelUrl};

/// The key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "lobe-tls";

/// How long one command may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A store in Redis (`redis://` or `rediss://`, or behind Sentinel with
/// `redis+sentinel://` or `rediss+sentinel://`), shared by a cluster.
///
/// Cheap to clone: clones share one connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    target: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("target", &self.target)
            .field("prefix", &self.prefix)
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
    pub fn open(url: &str) -> Result<Self> {
        let (url, prefix) = split_prefix(url);
        let target = redact(&url);
        let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
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
                prefix,
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
            prefix,
            target,
        })
    }

    /// Opens a store at `url` and checks that Redis answers.
    pub async fn connect(url: &str) -> Result<Self> {
        let store = Self::open(url)?;
        store.ping().await?;
        Ok(store)
    }

    /// Replaces the key prefix (the default is `lobe-tls`, or the URL's `prefix=`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The key prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
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

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    fn index(&self, kind: &str) -> String {
        format!("{}:{kind}", self.prefix)
    }

    /// The pub/sub channel that announces changes.
    pub fn channel(&self) -> String {
        format!("{}:events", self.prefix)
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
        conn.get(self.key("secret", name))
            .await
            .map_err(|e| self.error(&format!("load secret {name}"), &e))
    }

    async fn save_secret(&self, name: &str, data: &[u8]) -> Result<()> {
        check_name(name)?;
        let mut conn = self.conn.clone();
        conn.set(self.key("secret", name), data)
            .await
            .map_err(|e| self.error(&format!("save secret {name}"), &e))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;

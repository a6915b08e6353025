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

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Client, RedisError, Script};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fs::check_name;
use super::{
    BatchEntry, CertMeta, CertVersion, ChallengeStore, FeedStore, LockStore, RenewalState,
    SecretStore, Store, StoreEvent, StoreLock, StoreSubscription, StoredCert,
};
use crate::cert::CertBundle;
use crate::error::{Error, Result};

mod conn;
mod feed;
mod lock;
mod sentinel;

use conn::Conn;

use feed::feed;
use lock::RedisLock;

use sentinel::is_sentinel_url;
use sentinel::{SentinelConn, SentinelUrl};

/// The key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "lobe-tls";

/// How long one command may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often `lock` retries while another instance holds the lock.
const LOCK_POLL: Duration = Duration::from_millis(50);
/// Shortest lease accepted, so renewal (every third of the lease) stays sane.
const MIN_LEASE: Duration = Duration::from_secs(1);
/// How many bytes of a certificate value hold its serial: `{"serial":"` and up to 40
/// hex digits (a 20-byte serial) and more, with room to spare.
const SERIAL_HEAD: isize = 127;
/// Names per round trip when a re-sync reads serials and states.
const VERSION_CHUNK: usize = 1000;
/// Reconnect backoff of the event feed.
const FEED_BACKOFF_MIN: Duration = Duration::from_millis(100);
const FEED_BACKOFF_MAX: Duration = Duration::from_secs(5);

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

/// Extends the lease only if the lock still holds our token.
const RENEW_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

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

/// The certificate value: one JSON document, so chain and key change together.
#[derive(serde::Serialize, serde::Deserialize)]
struct CertRecord {
    /// The leaf's serial, first so that it is the head of the value (see
    /// [`serial_from_head`]). Absent from values written before it was added.
    #[serde(default)]
    serial: Option<String>,
    fullchain: String,
    key: String,
    meta: CertMeta,
}

/// A certificate value read for its chain alone (values without a serial at their head).
#[derive(serde::Deserialize)]
struct ChainOnly {
    fullchain: String,
}

/// The serial at the head of a certificate value, as [`Store::save_cert`] writes it.
fn serial_from_head(head: &str) -> Option<&str> {
    let rest = head.strip_prefix(r#"{"serial":""#)?;
    let (serial, _) = rest.split_once('"')?;
    let hex = !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then_some(serial)
}

/// Parses a certificate value, key included: CPU work, for a blocking thread.
fn parse_state(target: &str, name: &str, raw: Option<&str>) -> Result<RenewalState> {
    match raw {
        None => Ok(RenewalState::default()),
        Some(raw) => decode_renewal_state(target, name, raw),
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

    /// The stored value of `cert`: chain, key and metadata in one JSON document, the
    /// serial first so a re-sync can read it from the value's head.
    fn encode_cert(&self, cert: &StoredCert) -> Result<String> {
        let name = cert.meta.name.as_str();
        check_name(name)?;
        let record = CertRecord {
            // A leaf that x509-parser cannot read still stores; re-syncs then read it whole.
            serial: cert.bundle.info().ok().map(|info| info.serial),
            fullchain: cert.bundle.fullchain_pem().to_owned(),
            key: cert.bundle.key_pem().to_owned(),
            meta: cert.meta.clone(),
        };
        serde_json::to_string(&record).map_err(|e| {
            Error::store(
                "redis",
                crate::error::StoreErrorKind::Encode,
                format!("cannot encode certificate {name}: {e}"),
            )
            .with_source(e)
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn load_cert(&self, name: &str) -> Result<Option<StoredCert>> {
        check_name(name)?;
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn
            .get(self.key("cert", name))
            .await
            .map_err(|e| self.error(&format!("load certificate {name}"), &e))?;
        let Some(raw) = raw else { return Ok(None) };
        let (target, name) = (self.target.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || decode_cert(&target, &name, &raw).map(Some))
            .await
            .map_err(|e| {
                Error::store(
                    "redis",
                    crate::error::StoreErrorKind::Unavailable,
                    format!("store task failed: {e}"),
                )
                .with_source(e)
            })?
    }

    /// Reads the batch in one round trip, and parses it on a blocking thread.
    async fn load_cert_batch(&self, names: &[String]) -> Vec<BatchEntry> {
        if names.is_empty() {
            return Vec::new();
        }
        let keys =
            |kind: &str| -> Vec<String> { names.iter().map(|n| self.key(kind, n)).collect() };
        let mut conn = self.conn.clone();
        let fetched: std::result::Result<(Vec<Option<String>>, Vec<Option<String>>), RedisError> =
            ::redis::pipe()
                .cmd("MGET")
                .arg(keys("cert"))
                .cmd("MGET")
                .arg(keys("state"))
                .query_async(&mut conn)
                .await;
        let (certs, states) = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                return BatchEntry::all_failed(names, |name| {
                    self.error(&format!("load certificate {name}"), &e)
                });
            }
        };
        let target = self.target.clone();
        let batch = names.to_vec();
        let parsed = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .zip(certs)
                .zip(states)
                .map(|((name, raw), raw_state)| {
                    let cert = check_name(&name).and_then(|()| match raw {
                        None => Ok(None),
                        Some(raw) => decode_cert(&target, &name, &raw).map(Some),
                    });
                    let state = match cert {
                        Ok(Some(_)) => parse_state(&target, &name, raw_state.as_deref()),
                        _ => Ok(RenewalState::default()),
                    };
                    BatchEntry { name, cert, state }
                })
                .collect()
        })
        .await;
        parsed.unwrap_or_else(|e| {
            BatchEntry::all_failed(names, |_| {
                Error::store(
                    "redis",
                    crate::error::StoreErrorKind::Unavailable,
                    format!("store task failed: {e}"),
                )
            })
        })
    }

    /// Reads the head of each certificate value (its serial) and each renewal state, a
    /// thousand names per round trip; a value without a serial at its head (written by an
    /// older lobe-tls) is read whole and its leaf parsed, never its key.
    async fn load_cert_versions(&self, names: &[String]) -> Result<Vec<Option<CertVersion>>> {
        let mut out = Vec::with_capacity(names.len());
        let mut conn = self.conn.clone();
        for chunk in names.chunks(VERSION_CHUNK) {
            let mut heads = ::redis::pipe();
            for name in chunk {
                heads
                    .cmd("GETRANGE")
                    .arg(self.key("cert", name))
                    .arg(0)
                    .arg(SERIAL_HEAD);
            }
            let heads: Vec<String> = heads
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("read certificate serials", &e))?;
            let state_keys: Vec<String> = chunk.iter().map(|n| self.key("state", n)).collect();
            let states: Vec<Option<String>> = ::redis::cmd("MGET")
                .arg(state_keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("read renewal states", &e))?;
            let mut serials: Vec<Option<String>> = heads
                .iter()
                .map(|h| serial_from_head(h).map(str::to_owned))
                .collect();
            let older: Vec<usize> = (0..chunk.len())
                .filter(|&i| serials[i].is_none() && !heads[i].is_empty())
                .collect();
            if !older.is_empty() {
                let older_keys: Vec<String> =
                    older.iter().map(|&i| self.key("cert", &chunk[i])).collect();
                let raws: Vec<Option<String>> = ::redis::cmd("MGET")
                    .arg(older_keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.error("read certificates", &e))?;
                let found = tokio::task::spawn_blocking(move || {
                    older
                        .into_iter()
                        .zip(raws)
                        .filter_map(|(i, raw)| {
                            let chain: ChainOnly = serde_json::from_str(&raw?).ok()?;
                            Some((i, super::leaf_serial(&chain.fullchain).ok()?))
                        })
                        .collect::<HashMap<usize, String>>()
                })
                .await
                .map_err(|e| {
                    Error::store(
                        "redis",
                        crate::error::StoreErrorKind::Unavailable,
                        format!("store task failed: {e}"),
                    )
                    .with_source(e)
                })?;
                for (i, serial) in found {
                    serials[i] = Some(serial);
                }
            }
            for ((name, serial), raw_state) in chunk.iter().zip(serials).zip(states) {
                // Anything odd is left to a full read, which reports it.
                let state = parse_state(&self.target, name, raw_state.as_deref()).ok();
                let version = match (check_name(name), serial, state) {
                    (Ok(()), Some(serial), Some(state)) => Some(CertVersion { serial, state }),
                    _ => None,
                };
                out.push(version);
            }
        }
        Ok(out)
    }

    async fn save_cert(&self, cert: &StoredCert) -> Result<()> {
        let name = cert.meta.name.as_str();
        let value = self.encode_cert(cert)?;
        let mut conn = self.conn.clone();
        ::redis::pipe()
            .atomic()
            .set(self.key("cert", name), value)
            .ignore()
            .sadd(self.index("certs"), name)
            .ignore()
            .publish(self.channel(), format!("cert {name}"))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("save certificate {name}"), &e))
    }

    async fn list_certs(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn
            .smembers(self.index("certs"))
            .await
            .map_err(|e| self.error("list certificates", &e))?;
        names.sort();
        Ok(names)
    }

    async fn load_account(&self, key: &str) -> Result<Option<Vec<u8>>> {
        check_name(key)?;
        let mut conn = self.conn.clone();
        conn.get(self.key("account", key))
            .await
            .map_err(|e| self.error(&format!("load account {key}"), &e))
    }

    async fn save_account(&self, key: &str, data: &[u8]) -> Result<()> {
        check_name(key)?;
        let mut conn = self.conn.clone();
        ::redis::pipe()
            .atomic()
            .set(self.key("account", key), data)
            .ignore()
            .sadd(self.index("accounts"), key)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("save account {key}"), &e))
    }

    async fn list_accounts(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = conn
            .smembers(self.index("accounts"))
            .await
            .map_err(|e| self.error("list accounts", &e))?;
        keys.sort();
        Ok(keys)
    }

    async fn load_renewal_state(&self, name: &str) -> Result<RenewalState> {
        check_name(name)?;
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn
            .get(self.key("state", name))
            .await
            .map_err(|e| self.error(&format!("load renewal state of {name}"), &e))?;
        parse_state(&self.target, name, raw.as_deref())
    }

    async fn save_renewal_state(&self, name: &str, state: &RenewalState) -> Result<()> {
        check_name(name)?;
        let value = serde_json::to_string(state).map_err(|e| {
            Error::store(
                "redis",
                crate::error::StoreErrorKind::Encode,
                format!("cannot encode renewal state: {e}"),
            )
            .with_source(e)
        })?;
        let mut conn = self.conn.clone();
        // Announced like a certificate: followers re-read the name and, finding the same
        // serial, take over the state (a revoke, a failure count, an ARI answer).
        ::redis::pipe()
            .atomic()
            .set(self.key("state", name), value)
            .ignore()
            .publish(self.channel(), format!("cert {name}"))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("save renewal state of {name}"), &e))
    }

    fn as_challenge_store(&self) -> Option<&dyn ChallengeStore> {
        Some(self)
    }

    fn as_lock_store(&self) -> Option<&dyn LockStore> {
        Some(self)
    }

    fn as_secret_store(&self) -> Option<&dyn SecretStore> {
        Some(self)
    }

    fn as_feed_store(&self) -> Option<&dyn FeedStore> {
        Some(self)
    }
}

/// Challenge responses under `<prefix>:challenge:<key>`, with a TTL, announced on the
/// events channel.
#[async_trait]
impl ChallengeStore for RedisStore {
    async fn put_challenge(&self, key: &str, value: &str, ttl: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        ::redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.key("challenge", key))
            .arg(value)
            .arg("PX")
            .arg(millis(ttl).max(1))
            .ignore()
            .publish(self.channel(), format!("challenge-put {key}"))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("publish challenge {key}"), &e))
    }

    async fn get_challenge(&self, key: &str) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        conn.get(self.key("challenge", key))
            .await
            .map_err(|e| self.error(&format!("look up challenge {key}"), &e))
    }

    async fn delete_challenge(&self, key: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        ::redis::pipe()
            .atomic()
            .del(self.key("challenge", key))
            .ignore()
            .publish(self.channel(), format!("challenge-del {key}"))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("remove challenge {key}"), &e))
    }

    async fn list_challenges(&self, prefix: &str) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let key_prefix = self.key("challenge", "");
        let pattern = format!("{key_prefix}{}*", escape_glob(prefix));
        let mut iter = conn
            .scan_match::<_, String>(pattern)
            .await
            .map_err(|e| self.error("list challenges", &e))?;
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            let key = key.map_err(|e| self.error("list challenges", &e))?;
            if let Some(k) = key.strip_prefix(&key_prefix) {
                keys.push(k.to_owned());
            }
        }
        keys.sort();
        Ok(keys)
    }
}

/// Leases under `<prefix>:lock:<name>`, renewed while held; a write under a lock is
/// fenced by its token.
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
        let key = self.key("lock", name);
        let token = format!("{:032x}", rand::random::<u128>());
        let deadline = Instant::now() + wait;
        let mut conn = self.conn.clone();
        loop {
            let taken: Option<String> = ::redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(millis(lease))
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
        let value = self.encode_cert(cert)?;
        let mut conn = self.conn.clone();
        let saved = Script::new(FENCED_SAVE_SCRIPT)
            .key(self.key("lock", name))
            .key(self.key("cert", name))
            .key(self.index("certs"))
            .arg(token)
            .arg(value)
            .arg(name)
            .arg(self.channel())
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("save certificate {name}"), &e))?;
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

/// The events channel, through a subscription that reconnects by itself.
impl FeedStore for RedisStore {
    fn subscribe(&self) -> Result<StoreSubscription> {
        let (tx, rx) = mpsc::channel(256);
        let task = tokio::spawn(feed(
            self.conn.clone(),
            self.channel(),
            self.target.clone(),
            tx,
        ));
        Ok(StoreSubscription::new(rx, task))
    }
}

/// Decodes the value stored under `<prefix>:cert:<name>`. `target` is the redacted URL
/// the error names. Public only so the fuzz targets can feed it arbitrary values.
#[doc(hidden)]
pub fn decode_cert(target: &str, name: &str, raw: &str) -> Result<StoredCert> {
    // serde's own message quotes the offending value, which in this record may be (part
    // of) the private key: say only what kind of error it is and where.
    let record: CertRecord = serde_json::from_str(raw).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => {
                "a field is missing or has the wrong type or value"
            }
            _ => "not valid JSON",
        };
        Error::store(
            "redis",
            crate::error::StoreErrorKind::Corrupt,
            format!(
                "redis {target}: certificate {name} is unreadable: {what} at line {} column {}",
                e.line(),
                e.column()
            ),
        )
    })?;
    let bundle = CertBundle::from_pem(record.fullchain, record.key).map_err(|e| {
        Error::store(
            "redis",
            crate::error::StoreErrorKind::Corrupt,
            format!("redis {target}: certificate {name}: {e}"),
        )
        .with_source(e)
    })?;
    Ok(StoredCert {
        bundle,
        meta: record.meta,
    })
}

/// Decodes the value stored under `<prefix>:state:<name>`. Public only for the fuzz targets.
#[doc(hidden)]
pub fn decode_renewal_state(target: &str, name: &str, raw: &str) -> Result<RenewalState> {
    serde_json::from_str(raw).map_err(|e| {
        Error::store(
            "redis",
            crate::error::StoreErrorKind::Corrupt,
            format!("redis {target}: renewal state of {name} is unreadable: {e}"),
        )
        .with_source(e)
    })
}

/// Parses one announcement of the events channel. Public only for the fuzz targets.
#[doc(hidden)]
pub fn parse_event(payload: &str) -> Option<StoreEvent> {
    let (kind, arg) = payload.split_once(' ')?;
    let arg = arg.to_owned();
    match kind {
        "cert" => Some(StoreEvent::CertSaved(arg)),
        "challenge-put" => Some(StoreEvent::ChallengePut(arg)),
        "challenge-del" => Some(StoreEvent::ChallengeDeleted(arg)),
        _ => None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Takes `prefix=NAME` out of the URL's query; redis-rs does not know it.
fn split_prefix(url: &str) -> (String, Option<String>) {
    let (rest, fragment) = match url.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (url, None),
    };
    let Some((base, query)) = rest.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut prefix = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("prefix=") {
            Some(value) => {
                prefix = Some(value.to_owned());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    (out, prefix)
}

/// The URL without its password, for messages. Everything up to the last `@` goes, so
/// a password with a stray `/`, `?` or `#` is hidden whole (at worst, more is hidden).
fn redact(url: &str) -> String {
    super::redact_url(url)
}

/// Escapes Redis glob characters so a prefix matches literally.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests;

//! Certificates, accounts and renewal states: the [`Store`] face of the Redis store.

use std::collections::HashMap;

use ::redis::{AsyncCommands, RedisError};
use async_trait::async_trait;

use super::RedisStore;
use super::codec::{
    ChainOnly, SERIAL_HEAD, decode_cert, encode_cert, parse_state, serial_from_head,
};
use crate::error::{Error, Result};
use crate::store::fs::check_name;
use crate::store::{
    BatchEntry, CertVersion, ChallengeStore, FeedStore, LockStore, RenewalState, SecretStore,
    Store, StoredCert,
};

/// Names per round trip when a re-sync reads serials and states.
const VERSION_CHUNK: usize = 1000;

#[async_trait]
impl Store for RedisStore {
    async fn check_writable(&self) -> Result<()> {
        // A key that expires by itself should the DEL never come (a cut connection).
        let key = self.key("write-probe", &std::process::id().to_string());
        let mut conn = self.conn.clone();
        let written: std::result::Result<(), RedisError> = ::redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("PX")
            .arg(10_000)
            .ignore()
            .cmd("DEL")
            .arg(&key)
            .ignore()
            .query_async(&mut conn)
            .await;
        written.map_err(|e| self.error("write a probe key (is the user allowed to write?)", &e))
    }

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
                            Some((i, crate::store::leaf_serial(&chain.fullchain).ok()?))
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
        let value = encode_cert(cert)?;
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

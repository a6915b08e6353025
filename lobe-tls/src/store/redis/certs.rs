//! Certificates, accounts and renewal states: the [`Store`] face of the Redis store.

use std::collections::HashMap;

use ::redis::{AsyncCommands, RedisError};
use async_trait::async_trait;
use futures_util::StreamExt;

use super::RedisStore;
use super::codec::{
    ChainOnly, SERIAL_HEAD, decode_cert, encode_cert, parse_state, serial_from_head,
};
use super::conn::Conn;
use crate::error::{Error, Result};
use crate::store::fs::check_name;
use crate::store::{
    BatchEntry, CertVersion, ChallengeStore, FeedStore, LockStore, RenewalState, SecretStore,
    Store, StoredCert,
};

/// Names per round trip when a re-sync reads serials and states.
const VERSION_CHUNK: usize = 1000;

/// Names read at once on a cluster, where each name is its own slot and so its own
/// request (the client sends them over one connection per node, pipelined).
const CLUSTER_FANOUT: usize = 128;

#[async_trait]
impl Store for RedisStore {
    async fn check_writable(&self) -> Result<()> {
        // A key that expires by itself should the DEL never come (a cut connection).
        let key = self.keys.write_probe(&std::process::id().to_string());
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
            .get(self.keys.cert(name))
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
        let cert_keys: Vec<String> = names.iter().map(|n| self.keys.cert(n)).collect();
        let state_keys: Vec<String> = names.iter().map(|n| self.keys.state(n)).collect();
        // Two commands, not one pipeline: on a cluster each MGET is split by slot.
        let (mut certs_conn, mut states_conn) = (self.conn.clone(), self.conn.clone());
        let (mut mget_certs, mut mget_states) = (::redis::cmd("MGET"), ::redis::cmd("MGET"));
        mget_certs.arg(&cert_keys);
        mget_states.arg(&state_keys);
        let fetched: std::result::Result<(Vec<Option<String>>, Vec<Option<String>>), RedisError> = tokio::try_join!(
            mget_certs.query_async(&mut certs_conn),
            mget_states.query_async(&mut states_conn),
        );
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
            let (heads, states) = self.heads_and_states(chunk).await?;
            let mut serials: Vec<Option<String>> = heads
                .iter()
                .map(|h| serial_from_head(h).map(str::to_owned))
                .collect();
            let older: Vec<usize> = (0..chunk.len())
                .filter(|&i| serials[i].is_none() && !heads[i].is_empty())
                .collect();
            if !older.is_empty() {
                let older_keys: Vec<String> =
                    older.iter().map(|&i| self.keys.cert(&chunk[i])).collect();
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
        let mut writes = ::redis::pipe();
        writes.atomic().set(self.keys.cert(name), value).ignore();
        if let Some(index) = self.keys.certs_index() {
            writes.sadd(index, name).ignore();
        }
        self.write_and_announce(
            writes,
            format!("cert {name}"),
            &format!("save certificate {name}"),
        )
        .await
    }

    async fn list_certs(&self) -> Result<Vec<String>> {
        let Some(index) = self.keys.certs_index() else {
            return self.scan_names("cert").await;
        };
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn
            .smembers(index)
            .await
            .map_err(|e| self.error("list certificates", &e))?;
        names.sort();
        Ok(names)
    }

    async fn load_account(&self, key: &str) -> Result<Option<Vec<u8>>> {
        check_name(key)?;
        let mut conn = self.conn.clone();
        conn.get(self.keys.account(key))
            .await
            .map_err(|e| self.error(&format!("load account {key}"), &e))
    }

    async fn save_account(&self, key: &str, data: &[u8]) -> Result<()> {
        check_name(key)?;
        let mut conn = self.conn.clone();
        ::redis::pipe()
            .atomic()
            .set(self.keys.account(key), data)
            .ignore()
            .sadd(self.keys.accounts_index(), key)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(&format!("save account {key}"), &e))
    }

    async fn list_accounts(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = conn
            .smembers(self.keys.accounts_index())
            .await
            .map_err(|e| self.error("list accounts", &e))?;
        keys.sort();
        Ok(keys)
    }

    async fn load_renewal_state(&self, name: &str) -> Result<RenewalState> {
        check_name(name)?;
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn
            .get(self.keys.state(name))
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
        // Announced like a certificate: followers re-read the name and, finding the same
        // serial, take over the state (a revoke, a failure count, an ARI answer).
        let mut writes = ::redis::pipe();
        writes.atomic().set(self.keys.state(name), value).ignore();
        self.write_and_announce(
            writes,
            format!("cert {name}"),
            &format!("save renewal state of {name}"),
        )
        .await
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

impl RedisStore {
    /// The head of each certificate value (where its serial is) and each renewal state,
    /// for `names`: one pipeline on one Redis; on a cluster, one request per name (its
    /// value and state share a slot), many at once.
    async fn heads_and_states(
        &self,
        names: &[String],
    ) -> Result<(Vec<String>, Vec<Option<String>>)> {
        let mut conn = self.conn.clone();
        if !matches!(self.conn, Conn::Cluster(_)) {
            let mut heads = ::redis::pipe();
            for name in names {
                heads
                    .cmd("GETRANGE")
                    .arg(self.keys.cert(name))
                    .arg(0)
                    .arg(SERIAL_HEAD);
            }
            let heads: Vec<String> = heads
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("read certificate serials", &e))?;
            let state_keys: Vec<String> = names.iter().map(|n| self.keys.state(n)).collect();
            let states: Vec<Option<String>> = ::redis::cmd("MGET")
                .arg(state_keys)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("read renewal states", &e))?;
            return Ok((heads, states));
        }
        let reads: Vec<_> = names
            .iter()
            .map(|name| {
                let mut conn = self.conn.clone();
                let mut both = ::redis::pipe();
                both.cmd("GETRANGE")
                    .arg(self.keys.cert(name))
                    .arg(0)
                    .arg(SERIAL_HEAD)
                    .cmd("GET")
                    .arg(self.keys.state(name));
                async move {
                    both.query_async::<(String, Option<String>)>(&mut conn)
                        .await
                }
            })
            .collect();
        let read: Vec<std::result::Result<(String, Option<String>), RedisError>> =
            futures_util::stream::iter(reads)
                .buffered(CLUSTER_FANOUT)
                .collect()
                .await;
        let mut heads = Vec::with_capacity(names.len());
        let mut states = Vec::with_capacity(names.len());
        for pair in read {
            let (head, state) =
                pair.map_err(|e| self.error("read certificate serials and states", &e))?;
            heads.push(head);
            states.push(state);
        }
        Ok((heads, states))
    }

    /// The names of every per-name key of `kind`, from a scan of every master.
    pub(super) async fn scan_names(&self, kind: &str) -> Result<Vec<String>> {
        self.scan_names_from(kind, "").await
    }

    /// Like [`RedisStore::scan_names`], for names that start with `name_prefix`.
    pub(super) async fn scan_names_from(
        &self,
        kind: &str,
        name_prefix: &str,
    ) -> Result<Vec<String>> {
        let (pattern, head) = self.keys.scan_pattern(kind, name_prefix);
        let keys = match &self.conn {
            Conn::Cluster(cluster) => cluster.scan_masters(&pattern).await,
            _ => {
                let mut conn = self.conn.clone();
                let mut found = Vec::new();
                match conn.scan_match::<_, String>(&pattern).await {
                    Ok(mut iter) => loop {
                        match iter.next_item().await {
                            Some(Ok(key)) => found.push(key),
                            Some(Err(e)) => break Err(e),
                            None => break Ok(found),
                        }
                    },
                    Err(e) => Err(e),
                }
            }
        }
        .map_err(|e| self.error(&format!("list the stored {kind} keys"), &e))?;
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|key| self.keys.name_in(key, &head))
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

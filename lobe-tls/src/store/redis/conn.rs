//! The connection the store's commands go through: one Redis, the master that the
//! sentinels name, or a cluster.

use std::sync::Arc;

use ::redis::aio::{ConnectionLike, ConnectionManager, PubSub};
use ::redis::{Client, Cmd, Pipeline, RedisError, RedisFuture, Value};

use super::CONNECT_TIMEOUT;
use super::cluster::ClusterConn;
use super::sentinel::SentinelConn;

/// The connection commands go through: straight to one Redis, or to the master the
/// sentinels name.
#[derive(Clone)]
pub(super) enum Conn {
    Direct {
        /// For the pub/sub feed, which needs its own connection.
        client: Arc<Client>,
        manager: ConnectionManager,
    },
    Sentinel(SentinelConn),
    Cluster(ClusterConn),
}

impl Conn {
    /// A new pub/sub connection, bounded by [`CONNECT_TIMEOUT`] (plus, behind Sentinel,
    /// the bounded lookup of the master).
    pub(super) async fn pubsub(&self) -> std::result::Result<PubSub, RedisError> {
        match self {
            Conn::Direct { client, .. } => {
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                    .await
                    .map_err(|_| {
                        RedisError::from((::redis::ErrorKind::Io, "connection timed out"))
                    })?
            }
            Conn::Sentinel(sentinel) => sentinel.pubsub(CONNECT_TIMEOUT).await,
            // A cluster's feed has its own client (see `cluster::ClusterConn::feed`).
            Conn::Cluster(_) => Err(RedisError::from((
                ::redis::ErrorKind::Client,
                "a cluster has no single pub/sub connection",
            ))),
        }
    }

    /// Failover announcements, behind Sentinel.
    pub(super) fn switches(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Conn::Direct { .. } | Conn::Cluster(_) => None,
            Conn::Sentinel(sentinel) => Some(sentinel.switches()),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Direct { manager, .. } => manager.req_packed_command(cmd),
            Conn::Sentinel(sentinel) => Box::pin(sentinel.send(cmd)),
            Conn::Cluster(cluster) => Box::pin(cluster.send(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Direct { manager, .. } => manager.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(sentinel) => Box::pin(sentinel.send_pipeline(pipeline, offset, count)),
            Conn::Cluster(cluster) => Box::pin(cluster.send_pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Direct { manager, .. } => manager.get_db(),
            Conn::Sentinel(sentinel) => sentinel.db(),
            Conn::Cluster(_) => 0,
        }
    }
}

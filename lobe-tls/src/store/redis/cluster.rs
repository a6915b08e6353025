//! Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
//!
//! Commands go through redis-rs's cluster client, which follows `MOVED` and `ASK`, retries
//! `TRYAGAIN` and `CLUSTERDOWN`, and refreshes its view of the slots when a master fails
//! and a replica takes over: lobe-tls keeps no slot table of its own. What it adds:
//!
//! - one connection for the store's commands, made on first use and kept (the client
//!   reconnects to nodes by itself), and one per change feed, over RESP3 so that
//!   subscriptions come back after a reconnection or a slot move;
//! - scans of every master, for listing (there is no index key: see `keys`);
//! - the check, at start, that the URL names a cluster that serves every slot.
//!
//! Announcements use sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`) where the servers have it
//! (Redis 7 and later), and classic pub/sub before.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{
    Cmd, ConnectionAddr, ErrorKind, Pipeline, ProtocolVersion, PushInfo, PushKind, RedisError,
    RedisResult, ServerErrorKind, TlsMode, Value,
};
use tokio::sync::{OnceCell, mpsc};

use super::address::{BadUrl, credentials, parse_host_port};
use super::codec::parse_event;
use crate::store::StoreEvent;

/// The URL schemes of a store on Redis Cluster: plain TCP and TLS.
pub(crate) const SCHEMES: [&str; 2] = ["redis+cluster://", "rediss+cluster://"];

/// The URL form, for error messages.
pub(crate) const USAGE: &str =
    "use redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...][/?prefix=NAME]";

/// A node's port when the URL names none.
const DEFAULT_PORT: u16 = 6379;

/// How long one command may take in all, retries after redirections and failovers
/// included: long enough for a replica to take over a failed master's slots with a short
/// `cluster-node-timeout`, short enough that a caller never hangs.
const OVERALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Pauses before a pipeline that met a moving slot is sent again.
const REDIRECT_PAUSE_MIN: Duration = Duration::from_millis(25);
const REDIRECT_PAUSE_MAX: Duration = Duration::from_millis(500);

/// Keys per `SCAN` step.
const SCAN_COUNT: usize = 1000;

/// Reconnect backoff of the change feed.
const FEED_BACKOFF_MIN: Duration = Duration::from_millis(100);
const FEED_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Push messages waiting for the feed task; beyond this, the feed asks for a re-sync.
const PUSH_QUEUE: usize = 1024;

/// Whether `url` names a store on Redis Cluster.
pub(crate) fn is_cluster_url(url: &str) -> bool {
    SCHEMES.iter().any(|scheme| url.starts_with(scheme))
}

/// What a `redis+cluster://` URL says. No `Debug`: it holds the password.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ClusterUrl {
    pub(crate) tls: bool,
    /// Seed nodes; the client learns the others from them.
    pub(crate) nodes: Vec<(String, u16)>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

impl ClusterUrl {
    /// Parses `url` (with `prefix=` already taken out). Errors never repeat the password.
    pub(crate) fn parse(url: &str) -> std::result::Result<ClusterUrl, BadUrl> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix(SCHEMES[0]) {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix(SCHEMES[1]) {
            (true, rest)
        } else {
            return Err("the scheme must be redis+cluster:// or rediss+cluster://".into());
        };
        // Credentials end at the last `@`, as for the Sentinel URL.
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        if let Some((_, extra)) = rest.split_once(['?', '#']) {
            return Err(format!(
                "unknown option {:?}: only prefix=NAME is understood",
                extra.split(['&', '=']).next().unwrap_or(extra)
            )
            .into());
        }
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = path.trim_end_matches('/');
        if !path.is_empty() {
            return Err(if path.parse::<u32>().is_ok() {
                format!("a cluster has only database 0; remove /{path} from the URL")
            } else {
                format!("unexpected path /{path}: a cluster URL lists nodes only")
            }
            .into());
        }
        let (username, password) = credentials(userinfo)?;
        let nodes = hosts
            .split(',')
            .map(|spec| parse_host_port(spec, DEFAULT_PORT, "node"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(ClusterUrl {
            tls,
            nodes,
            username,
            password,
        })
    }

    fn addrs(&self) -> Vec<ConnectionAddr> {
        self.nodes
            .iter()
            .map(|(host, port)| node_addr(self.tls, host, *port))
            .collect()
    }

    /// A client for the cluster; with `push`, over RESP3 with pushes sent there.
    fn client(&self, timeouts: Timeouts, push: Option<PushForward>) -> RedisResult<ClusterClient> {
        let mut builder = ClusterClientBuilder::new(self.addrs())
            .connection_timeout(timeouts.connect)
            .response_timeout(timeouts.response)
            .overall_response_timeout(Some(OVERALL_TIMEOUT))
            .retries(6)
            .min_retry_wait(50)
            .max_retry_wait(1000);
        if self.tls {
            builder = builder.tls(TlsMode::Secure);
        }
        if let Some(user) = &self.username {
            builder = builder.username(user);
        }
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        if let Some(push) = push {
            builder = builder
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(move |info| push.forward(info));
        }
        builder.build()
    }
}

/// The address of a node, over TLS or not.
fn node_addr(tls: bool, host: &str, port: u16) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_owned(), port)
    }
}

#[derive(Clone, Copy)]
struct Timeouts {
    connect: Duration,
    response: Duration,
}

/// The connection to a cluster, made on first use. Cheap to clone: clones share it.
#[derive(Clone)]
pub(crate) struct ClusterConn(Arc<Inner>);

struct Inner {
    url: ClusterUrl,
    timeouts: Timeouts,
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
    /// Whether the servers have sharded pub/sub, asked once.
    sharded: OnceCell<bool>,
}

impl ClusterConn {
    /// Prepares the client; nothing touches the network until the first command.
    pub(crate) fn new(
        url: &ClusterUrl,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Self> {
        let timeouts = Timeouts {
            connect: connect_timeout,
            response: response_timeout,
        };
        let client = url.client(timeouts, None)?;
        Ok(ClusterConn(Arc::new(Inner {
            url: url.clone(),
            timeouts,
            client,
            conn: OnceCell::new(),
            sharded: OnceCell::new(),
        })))
    }

    /// The shared connection, made now if need be (bounded by the connect timeout and
    /// one slot-map fetch).
    async fn connection(&self) -> RedisResult<ClusterConnection> {
        let inner = &self.0;
        inner
            .conn
            .get_or_try_init(|| connect(&inner.client, inner.timeouts))
            .await
            .cloned()
    }

    pub(crate) async fn send(&self, cmd: &Cmd) -> RedisResult<Value> {
        use ::redis::aio::ConnectionLike;
        let mut conn = self.connection().await?;
        conn.req_packed_command(cmd).await
    }

    /// A pipeline whose keys all share one slot (a MULTI, or commands on one certificate).
    ///
    /// The client follows a redirection of a single command, but a transaction queued on
    /// a master that has just handed its slot over comes back aborted (`EXECABORT` over
    /// `MOVED`), and a plain pipeline with the redirection inside its replies. Nothing of
    /// either was applied, so it is sent again, once the client has refreshed its slot
    /// map, until it goes through or the overall bound is spent.
    pub(crate) async fn send_pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        use ::redis::aio::ConnectionLike;
        let deadline = tokio::time::Instant::now() + OVERALL_TIMEOUT;
        let mut pause = REDIRECT_PAUSE_MIN;
        loop {
            let mut conn = self.connection().await?;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            let redirected = match &result {
                Ok(values) => values.iter().any(
                    |v| matches!(v, Value::ServerError(e) if e.kind().is_some_and(is_redirection)),
                ),
                Err(e) => is_redirected(e),
            };
            if !redirected || tokio::time::Instant::now() + pause >= deadline {
                return result;
            }
            tracing::debug!("a pipeline met a slot on the move; sending it again");
            // The client learns a move from a single command's redirection, not from
            // one inside a pipeline's replies: send one for the same key first.
            if let Some(key) = first_key(pipeline) {
                let _ = conn
                    .req_packed_command(::redis::cmd("EXISTS").arg(key))
                    .await;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(REDIRECT_PAUSE_MAX);
        }
    }

    /// Every key matching `pattern` on every master (a `SCAN` of each), without
    /// duplicates. Fails when a master cannot be scanned: a partial list would read as
    /// certificates gone.
    pub(crate) async fn scan_masters(&self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut conn = self.connection().await?;
        let first = conn
            .route_command(
                scan(0, pattern),
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await?;
        let Value::Map(by_node) = first else {
            return Err(unexpected("SCAN of every master did not answer per node"));
        };
        let mut keys = Vec::new();
        for (node, reply) in by_node {
            let node: String = ::redis::from_redis_value(node)?;
            let (mut cursor, found) = scan_reply(reply)?;
            keys.extend(found);
            let (host, port) = node
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_owned(), port.parse::<u16>().ok()?)))
                .ok_or_else(|| unexpected("a node address without a port"))?;
            while cursor != 0 {
                let reply = conn
                    .route_command(
                        scan(cursor, pattern),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port,
                        }),
                    )
                    .await?;
                let (next, found) = scan_reply(reply)?;
                keys.extend(found);
                cursor = next;
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// `CLUSTER INFO` of one node: `Err` with what is wrong when the cluster does not
    /// serve every slot.
    pub(crate) async fn check_state(&self) -> RedisResult<Option<String>> {
        let reply = self
            .send(::redis::cmd("CLUSTER").arg("INFO"))
            .await
            .and_then(|v| Ok(::redis::from_redis_value::<String>(v)?))?;
        let field = |name: &str| {
            reply.lines().find_map(|line| {
                line.trim()
                    .strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(str::to_owned)
            })
        };
        if field("cluster_state").as_deref() == Some("ok") {
            return Ok(None);
        }
        let assigned = field("cluster_slots_assigned").unwrap_or_else(|| "?".into());
        let ok = field("cluster_slots_ok").unwrap_or_else(|| "?".into());
        Ok(Some(format!(
            "the cluster is down (cluster_state:fail): {ok} of 16384 slots served, {assigned} assigned; every slot must have a live master (redis-cli --cluster check HOST:PORT tells which)"
        )))
    }

    /// Whether to announce with `SPUBLISH` (Redis 7 and later) rather than `PUBLISH`.
    async fn sharded(&self) -> bool {
        *self
            .0
            .sharded
            .get_or_init(|| async {
                let info = self.send(::redis::cmd("INFO").arg("server")).await;
                info.ok()
                    .and_then(|v| ::redis::from_redis_value::<String>(v).ok())
                    .and_then(|info| major_version(&info))
                    .is_some_and(|major| major >= 7)
            })
            .await
    }

    /// Announces `payload` on `channel`.
    pub(crate) async fn publish(&self, channel: &str, payload: &str) -> RedisResult<()> {
        let command = if self.sharded().await {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        self.send(::redis::cmd(command).arg(channel).arg(payload))
            .await
            .map(|_| ())
    }

    /// Starts following `channel`: events go to `tx` until it closes.
    pub(crate) fn feed(
        &self,
        channel: String,
        target: String,
        tx: mpsc::Sender<StoreEvent>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(feed(self.clone(), channel, target, tx))
    }
}

async fn connect(client: &ClusterClient, timeouts: Timeouts) -> RedisResult<ClusterConnection> {
    // The client asks each seed in turn for the slots; bound the whole of it.
    let bound = timeouts.connect + timeouts.response;
    tokio::time::timeout(bound, client.get_async_connection())
        .await
        .map_err(|_| RedisError::from((ErrorKind::Io, "connection to the cluster timed out")))?
}

/// Whether a server error says the slot is elsewhere, or about to be.
fn is_redirection(kind: ServerErrorKind) -> bool {
    matches!(
        kind,
        ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly
    )
}

/// Whether `e` (a failed command, or a transaction aborted over one) means the slot was
/// moving: nothing was applied, and the same commands can go again.
fn is_redirected(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ExecAbort) => {
            e.clone().into_server_errors().is_some_and(|errors| {
                errors
                    .iter()
                    .any(|(_, error)| error.kind().is_some_and(is_redirection))
            })
        }
        ErrorKind::Server(kind) => is_redirection(kind),
        _ => false,
    }
}

/// The first key a pipeline names. The store's pipelines name their key first, or, for a
/// script, after its text and key count.
fn first_key(pipeline: &Pipeline) -> Option<Vec<u8>> {
    pipeline.cmd_iter().find_map(|cmd| {
        let args: Vec<&[u8]> = cmd
            .args_iter()
            .filter_map(|arg| match arg {
                ::redis::Arg::Simple(data) => Some(data),
                _ => None,
            })
            .collect();
        let name = args.first()?.to_ascii_uppercase();
        let key = match name.as_slice() {
            b"EVAL" | b"EVALSHA" => args.get(3),
            b"WAIT" | b"PUBLISH" | b"SPUBLISH" | b"PING" | b"MULTI" | b"EXEC" => None,
            _ => args.get(1),
        };
        key.map(|key| key.to_vec())
    })
}

fn scan(cursor: u64, pattern: &str) -> Cmd {
    let mut cmd = ::redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT);
    cmd
}

fn scan_reply(reply: Value) -> RedisResult<(u64, Vec<String>)> {
    if let Value::ServerError(e) = reply {
        return Err(e.into());
    }
    Ok(::redis::from_redis_value(reply)?)
}

fn unexpected(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Client, what))
}

/// The major version in `INFO server`'s `redis_version:7.0.15`.
fn major_version(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.parse().ok())
}

/// Hands push messages to the feed task without blocking the client; when the queue is
/// full they are dropped and the feed asks for a re-sync instead.
#[derive(Clone)]
struct PushForward {
    tx: mpsc::Sender<PushInfo>,
    overflowed: Arc<AtomicBool>,
}

impl PushForward {
    fn forward(&self, info: PushInfo) -> Result<(), ()> {
        if self.tx.try_send(info).is_err() {
            self.overflowed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Keeps one subscription to the events channel, forwarding announcements as events.
/// redis-rs subscribes again by itself after a reconnection or when the channel's slot
/// moves; each such confirmation, and each overflow of the push queue, is a
/// [`StoreEvent::Resync`], since announcements may have been missed meanwhile.
async fn feed(conn: ClusterConn, channel: String, target: String, tx: mpsc::Sender<StoreEvent>) {
    let mut backoff = FEED_BACKOFF_MIN;
    let mut outage = false;
    loop {
        let (push_tx, mut pushes) = mpsc::channel(PUSH_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let forward = PushForward {
            tx: push_tx,
            overflowed: overflowed.clone(),
        };
        let subscribed = async {
            let client = conn.0.url.client(conn.0.timeouts, Some(forward))?;
            let mut subscriber = connect(&client, conn.0.timeouts).await?;
            let sharded = conn.sharded().await;
            let subscribe = async {
                if sharded {
                    subscriber.ssubscribe(&channel).await
                } else {
                    subscriber.subscribe(&channel).await
                }
            };
            tokio::time::timeout(conn.0.timeouts.response, subscribe)
                .await
                .map_err(|_| {
                    RedisError::from((ErrorKind::Io, "no answer to SUBSCRIBE in time"))
                })??;
            Ok::<_, RedisError>(subscriber)
        }
        .await;
        let subscriber = match subscribed {
            Ok(subscriber) => subscriber,
            Err(e) => {
                if !outage {
                    tracing::warn!(redis = %target, error = %e, "cluster event feed lost: Redis Cluster unreachable; serving what is loaded and retrying");
                    outage = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(FEED_BACKOFF_MAX);
                continue;
            }
        };
        if outage {
            tracing::info!(redis = %target, "cluster event feed reconnected");
            outage = false;
        }
        backoff = FEED_BACKOFF_MIN;
        if tx.send(StoreEvent::Resync).await.is_err() {
            return;
        }
        // The first confirmation is the answer to our own SUBSCRIBE.
        let mut confirmed = false;
        while let Some(push) = pushes.recv().await {
            let event = match push.kind {
                PushKind::Message | PushKind::SMessage => push
                    .data
                    .into_iter()
                    .nth(1)
                    .and_then(|payload| ::redis::from_redis_value::<String>(payload).ok())
                    .and_then(|payload| parse_event(&payload)),
                PushKind::Subscribe | PushKind::SSubscribe if !confirmed => {
                    confirmed = true;
                    None
                }
                PushKind::Subscribe | PushKind::SSubscribe => {
                    tracing::debug!(redis = %target, "cluster event feed subscribed again");
                    Some(StoreEvent::Resync)
                }
                // A node went away: the client reconnects and subscribes again.
                PushKind::Disconnection => Some(StoreEvent::FeedLost),
                _ => None,
            };
            let event = if overflowed.swap(false, Ordering::Relaxed) {
                Some(StoreEvent::Resync)
            } else {
                event
            };
            if let Some(event) = event
                && tx.send(event).await.is_err()
            {
                return;
            }
        }
        // The client is gone (it holds the push sender): start over.
        drop(subscriber);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls() {
        let url = ClusterUrl::parse("redis+cluster://:pw@h1:7000,h2,[::1]:7002/").unwrap();
        assert!(!url.tls);
        assert_eq!(
            url.nodes,
            [
                ("h1".to_owned(), 7000),
                ("h2".to_owned(), 6379),
                ("::1".to_owned(), 7002)
            ]
        );
        assert_eq!(url.password.as_deref(), Some("pw"));
        assert!(ClusterUrl::parse("rediss+cluster://h1:7000").unwrap().tls);
        let db = ClusterUrl::parse("redis+cluster://:s3cret@h1:7000/2")
            .err()
            .unwrap();
        assert_eq!(
            db.to_string(),
            "a cluster has only database 0; remove /2 from the URL"
        );
        for bad in [
            "redis+cluster://:s3cret@h1:7000/x",
            "redis+cluster://:s3cret@h1:99999",
            "redis+cluster://:s3cret@",
            "redis+cluster://:s3cret@h1?db=1",
        ] {
            let e = ClusterUrl::parse(bad).err().unwrap().to_string();
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn major_version_of_info() {
        assert_eq!(
            major_version("# Server\r\nredis_version:7.0.15\r\n"),
            Some(7)
        );
        assert_eq!(major_version("redis_version:6.2.1"), Some(6));
        assert_eq!(major_version("nothing"), None);
    }
}

//! Redis behind Sentinel (`redis+sentinel://`, `rediss+sentinel://`).
//!
//! Every connection, first or after a failure, is made to the master the sentinels name
//! at that moment (redis-rs's Sentinel support asks them and checks the node's `ROLE`),
//! and is checked once more with `ROLE` on the connection itself before any command goes
//! through it. A connection is dropped and remade when it breaks, times out or answers
//! `READONLY` (a master demoted under it), so after a failover the store talks to the new
//! master within seconds, and no write is ever accepted by a replica.
//!
//! A failover is also heard as it happens: a task follows the sentinels' `+switch-master`
//! announcements and drops the connection at once, so a master that was demoted while
//! still up (`SENTINEL FAILOVER`, a partition that heals) is not written to until the
//! sentinels get round to reconfiguring it, and the event feed moves to the new master.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use ::redis::aio::{MultiplexedConnection, PubSub};
use ::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, Pipeline, RedisConnectionInfo, RedisError, RedisResult, Role,
    ServerErrorKind, TlsMode, Value,
};
use tokio::sync::watch;

use super::address::{BadUrl, credentials, parse_host_port, percent_decode};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The URL schemes of a store behind Sentinel: plain TCP and TLS.
pub(crate) const SCHEMES: [&str; 2] = ["redis+sentinel://", "rediss+sentinel://"];

/// The port of a sentinel when the URL names none.
const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// How long finding the master may take with one set of sentinel credentials: asking
/// the sentinels (redis-rs bounds each by 1 s to connect and 0.5 s to answer) and
/// checking the master's role.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// After a failed attempt to reach the master, callers get that failure back for this
/// long instead of each asking the sentinels again: an outage costs one lookup per
/// interval, not one per command.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// Reconnect backoff of the task that follows the sentinels' announcements.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The sentinels' announcement of a new master: `<service> <old ip> <old port> <new ip>
/// <new port>`.
const SWITCH_CHANNEL: &str = "+switch-master";

/// How long after a `+switch-master` the old master is refused even if a sentinel that
/// has not heard of the switch yet still names it (and it still calls itself master).
const DEMOTED_FOR: Duration = Duration::from_secs(30);

/// Whether `url` names a store behind Sentinel.
pub(crate) fn is_sentinel_url(url: &str) -> bool {
    SCHEMES.iter().any(|scheme| url.starts_with(scheme))
}

/// What a `redis+sentinel://` URL says. No `Debug`: it holds the password.
#[derive(PartialEq, Eq)]
pub(crate) struct SentinelUrl {
    pub(crate) tls: bool,
    pub(crate) sentinels: Vec<(String, u16)>,
    pub(crate) service: String,
    pub(crate) db: i64,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

/// The URL form, for error messages.
pub(crate) const USAGE: &str =
    "use redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB][?prefix=NAME]";

impl SentinelUrl {
    /// Parses `url` (with `prefix=` already taken out). Errors never repeat the password.
    pub(crate) fn parse(url: &str) -> std::result::Result<SentinelUrl, BadUrl> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix(SCHEMES[0]) {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix(SCHEMES[1]) {
            (true, rest)
        } else {
            return Err("the scheme must be redis+sentinel:// or rediss+sentinel://".into());
        };
        // Credentials end at the last `@`, so a password with a stray `/`, `?` or `#`
        // is still taken whole, and nothing after it can echo a piece of it.
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
        let (username, password) = credentials(userinfo)?;
        let sentinels = hosts
            .split(',')
            .map(|spec| parse_host_port(spec, DEFAULT_SENTINEL_PORT, "sentinel"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut parts = path.split('/');
        let service = parts.next().unwrap_or_default();
        if service.is_empty() {
            return Err("the URL names no service (the master name the sentinels monitor)".into());
        }
        let service = percent_decode(service).ok_or("the service name is badly %-encoded")?;
        let db = match parts.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse::<i64>()
                .ok()
                .filter(|db| *db >= 0)
                .ok_or_else(|| format!("database {db:?} is not a number"))?,
        };
        if parts.any(|part| !part.is_empty()) {
            return Err("too many path segments after the service and database".into());
        }
        Ok(SentinelUrl {
            tls,
            sentinels,
            service,
            db,
            username,
            password,
        })
    }
}

/// A connection to whichever node is master now, remade through the sentinels whenever
/// it fails. Cheap to clone: clones share one connection.
#[derive(Clone)]
pub(crate) struct SentinelConn(Arc<Inner>);

struct Inner {
    /// Ways to ask the sentinels, the last one that worked first: with the data nodes'
    /// credentials (`true`), then (when there are credentials) without any.
    sentinels: tokio::sync::Mutex<Vec<(bool, SentinelClient)>>,
    /// Each sentinel, with the data nodes' credentials and without, for the task that
    /// follows their announcements.
    sentinel_nodes: Vec<(ConnectionInfo, ConnectionInfo)>,
    /// The connection in use and its generation, so a failure seen on an old connection
    /// never discards a newer one.
    current: Mutex<(u64, Option<MultiplexedConnection>)>,
    /// Held while (re)connecting, so one caller asks the sentinels and the others wait
    /// for its result; holds the last failure and when it happened.
    connecting: tokio::sync::Mutex<Option<(Instant, RedisError)>>,
    config: AsyncConnectionConfig,
    db: i64,
    service: String,
    connect_timeout: Duration,
    /// Counts the failovers heard, so the event feed can move to the new master.
    switches: watch::Sender<u64>,
    /// The task following `+switch-master`, started with the first connection.
    watcher: Mutex<Option<JoinHandle<()>>>,
    /// The master the last `+switch-master` replaced (`host:port`), and when.
    demoted: Mutex<Option<(String, Instant)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.watcher.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl SentinelConn {
    /// Prepares the clients; nothing touches the network until the first command.
    pub(crate) fn new(
        url: &SentinelUrl,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<SentinelConn> {
        let mut credentials = vec![true];
        if url.password.is_some() || url.username.is_some() {
            credentials.push(false);
        }
        let sentinels = credentials
            .into_iter()
            .map(|with_auth| Ok((with_auth, sentinel_client(url, with_auth)?)))
            .collect::<RedisResult<Vec<_>>>()?;
        let sentinel_nodes = url
            .sentinels
            .iter()
            .map(|(host, port)| -> RedisResult<_> {
                let info = sentinel_addr(url.tls, host, *port).into_connection_info()?;
                let mut auth = RedisConnectionInfo::default();
                if let Some(user) = &url.username {
                    auth = auth.set_username(user);
                }
                if let Some(password) = &url.password {
                    auth = auth.set_password(password);
                }
                Ok((info.clone().set_redis_settings(auth), info))
            })
            .collect::<RedisResult<Vec<_>>>()?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        Ok(SentinelConn(Arc::new(Inner {
            sentinels: tokio::sync::Mutex::new(sentinels),
            sentinel_nodes,
            current: Mutex::new((0, None)),
            connecting: tokio::sync::Mutex::new(None),
            config,
            db: url.db,
            service: url.service.clone(),
            connect_timeout,
            switches: watch::Sender::new(0),
            watcher: Mutex::new(None),
            demoted: Mutex::new(None),
        })))
    }

    /// Changes each time the sentinels announce a new master.
    pub(crate) fn switches(&self) -> watch::Receiver<u64> {
        self.0.switches.subscribe()
    }

    pub(crate) fn db(&self) -> i64 {
        self.0.db
    }

    /// A client for the current master, as the sentinels name it (its role checked).
    pub(crate) async fn master_client(&self) -> RedisResult<Client> {
        let mut clients = self.0.sentinels.lock().await;
        let mut last = None;
        for i in 0..clients.len() {
            let found =
                tokio::time::timeout(RESOLVE_TIMEOUT, clients[i].1.async_get_client()).await;
            let err = match found {
                Ok(Ok(client)) => {
                    // Remember which credentials the sentinels take.
                    clients.swap(0, i);
                    self.refuse_demoted(&client)?;
                    return Ok(client);
                }
                Ok(Err(e)) => e,
                Err(_) => {
                    RedisError::from((ErrorKind::Io, "the sentinels did not name a master in time"))
                }
            };
            // Only a refused login is worth trying without credentials; anything else
            // (no master yet, sentinels down) would fail the same way again.
            let auth = is_auth_error(&err);
            last = Some(err);
            if !auth {
                break;
            }
            if i + 1 < clients.len() {
                tracing::debug!("the sentinels refused the credentials; asking them without");
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((ErrorKind::InvalidClientConfig, "no sentinel is configured"))
        }))
    }

    /// Refuses the master a failover just replaced, which a sentinel that has not heard
    /// of it yet may still name.
    fn refuse_demoted(&self, client: &Client) -> RedisResult<()> {
        let demoted = self.0.demoted.lock().unwrap_or_else(|e| e.into_inner());
        let named = client.get_connection_info().addr().to_string();
        match &*demoted {
            Some((old, at)) if *old == named && at.elapsed() < DEMOTED_FOR => {
                Err(RedisError::from((
                    ErrorKind::MasterNameNotFoundBySentinel,
                    "a sentinel still names the master a failover replaced; waiting for it to catch up",
                )))
            }
            _ => Ok(()),
        }
    }

    /// Notes a failover from `old` (`host:port`) and drops the connection.
    fn switched(&self, old: Option<String>) {
        if let Some(old) = old {
            *self.0.demoted.lock().unwrap_or_else(|e| e.into_inner()) = Some((old, Instant::now()));
        }
        self.forget();
        self.0.switches.send_modify(|n| *n += 1);
    }

    /// A pub/sub connection to the current master.
    pub(crate) async fn pubsub(&self, connect_timeout: Duration) -> RedisResult<PubSub> {
        let client = self.master_client().await?;
        tokio::time::timeout(connect_timeout, client.get_async_pubsub())
            .await
            .map_err(|_| RedisError::from((ErrorKind::Io, "connection timed out")))?
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        let current = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
        current.1.clone().map(|conn| (current.0, conn))
    }

    /// The connection to the master, made (through the sentinels) if there is none.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let mut last_failure = self.0.connecting.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(current) = self.current() {
            return Ok(current);
        }
        if let Some((at, err)) = &*last_failure
            && at.elapsed() < RETRY_AFTER
        {
            return Err(err.clone());
        }
        match self.connect_to_master().await {
            Ok(conn) => {
                *last_failure = None;
                let mut current = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
                current.0 += 1;
                current.1 = Some(conn.clone());
                tracing::debug!(generation = current.0, "connected to the Redis master");
                let generation = current.0;
                drop(current);
                self.watch_switches();
                Ok((generation, conn))
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    async fn connect_to_master(&self) -> RedisResult<MultiplexedConnection> {
        let client = self.master_client().await.map_err(|e| {
            RedisError::from((e.kind(), "no master from the sentinels", e.to_string()))
        })?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&self.0.config)
            .await?;
        // The sentinels' answer may be a moment old: confirm on this very connection.
        let role: Role = ::redis::cmd("ROLE").query_async(&mut conn).await?;
        if !matches!(role, Role::Primary { .. }) {
            return Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::ReadOnly),
                "the node the sentinels named is not a master (a failover is under way)",
            )));
        }
        Ok(conn)
    }

    /// Starts following the sentinels' failover announcements, once.
    fn watch_switches(&self) {
        let mut watcher = self.0.watcher.lock().unwrap_or_else(|e| e.into_inner());
        if watcher.is_none() {
            *watcher = Some(tokio::spawn(watch_switches(Arc::downgrade(&self.0))));
        }
    }

    /// Drops the connection in use, whatever its generation: the master changed.
    fn forget(&self) {
        let mut current = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
        current.1 = None;
    }

    /// A pub/sub connection to sentinel `index`, subscribed to failover announcements,
    /// with the credentials the sentinels took last.
    async fn sentinel_pubsub(&self, index: usize) -> RedisResult<PubSub> {
        let bound = self.0.connect_timeout;
        let timed_out = || RedisError::from((ErrorKind::Io, "the sentinel did not answer in time"));
        let with_auth = self.0.sentinels.lock().await.first().is_none_or(|c| c.0);
        let Some((authed, plain)) = self.0.sentinel_nodes.get(index) else {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "no sentinel is configured",
            )));
        };
        let client = Client::open(if with_auth { authed } else { plain }.clone())?;
        let mut pubsub = tokio::time::timeout(bound, client.get_async_pubsub())
            .await
            .map_err(|_| timed_out())??;
        tokio::time::timeout(bound, pubsub.subscribe(SWITCH_CHANNEL))
            .await
            .map_err(|_| timed_out())??;
        Ok(pubsub)
    }

    /// Forgets connection `generation` after `err`, if `err` says it is broken or no
    /// longer the master's.
    fn check(&self, generation: u64, err: &RedisError) {
        if !needs_new_connection(err) {
            return;
        }
        let mut current = self.0.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 == generation && current.1.is_some() {
            tracing::debug!(error = %err, "dropping the Redis connection; the next command asks the sentinels for the master");
            current.1 = None;
        }
    }

    pub(crate) async fn send(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut conn) = self.connection().await?;
        let result = conn.send_packed_command(cmd).await;
        if let Err(e) = &result {
            self.check(generation, e);
        }
        result
    }

    pub(crate) async fn send_pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut conn) = self.connection().await?;
        let result = conn.send_packed_commands(pipeline, offset, count).await;
        if let Err(e) = &result {
            self.check(generation, e);
        }
        result
    }
}

/// Follows `+switch-master` on one sentinel at a time, dropping the connection when the
/// service's master changes. Ends when the store is dropped.
async fn watch_switches(inner: Weak<Inner>) {
    let mut backoff = WATCH_BACKOFF_MIN;
    let mut subscribed_before = false;
    // Sentinels are tried in turn: one that is down or drops the subscription gives way
    // to the next.
    let mut next = 0;
    loop {
        let Some(conn) = inner.upgrade().map(SentinelConn) else {
            return;
        };
        let count = conn.0.sentinel_nodes.len().max(1);
        let index = next % count;
        next = index + 1;
        let pubsub = conn.sentinel_pubsub(index).await;
        let service = conn.0.service.clone();
        if pubsub.is_ok() && subscribed_before {
            // An announcement may have been missed while not subscribed.
            conn.switched(None);
        }
        drop(conn);
        let pubsub = match pubsub {
            Ok(pubsub) => pubsub,
            Err(e) => {
                tracing::debug!(sentinel = index, error = %e, "cannot follow this sentinel's announcements; trying the next");
                // Back off once every sentinel has been tried.
                if next % count == 0 {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                }
                continue;
            }
        };
        subscribed_before = true;
        backoff = WATCH_BACKOFF_MIN;
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            let fields: Vec<&str> = payload.split(' ').collect();
            let [name, old_host, old_port, new_host, new_port] = fields[..] else {
                continue;
            };
            if name != service {
                continue;
            }
            let Some(conn) = inner.upgrade().map(SentinelConn) else {
                return;
            };
            tracing::info!(service, from = %format_args!("{old_host}:{old_port}"), to = %format_args!("{new_host}:{new_port}"), "the sentinels switched the Redis master; reconnecting to the new one");
            conn.switched(Some(format!("{old_host}:{old_port}")));
        }
        tokio::time::sleep(backoff).await;
    }
}

/// A client for asking the sentinels for the master, with or without the data nodes'
/// credentials for the sentinels themselves.
fn sentinel_client(url: &SentinelUrl, with_auth: bool) -> RedisResult<SentinelClient> {
    let addrs = url
        .sentinels
        .iter()
        .map(|(host, port)| sentinel_addr(url.tls, host, *port));
    let mut builder = SentinelClientBuilder::new(addrs, &url.service, SentinelServerType::Master)?
        .set_client_to_redis_db(url.db);
    if url.tls {
        builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
    }
    if let Some(user) = &url.username {
        builder = builder.set_client_to_redis_username(user);
        if with_auth {
            builder = builder.set_client_to_sentinel_username(user);
        }
    }
    if let Some(password) = &url.password {
        builder = builder.set_client_to_redis_password(password);
        if with_auth {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    builder.build()
}

/// The address of a sentinel, over TLS or not.
fn sentinel_addr(tls: bool, host: &str, port: u16) -> ConnectionAddr {
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

/// Whether a sentinel refused the login (wrong credentials, or credentials it does not
/// expect because it has no password).
fn is_auth_error(err: &RedisError) -> bool {
    if err.kind() == ErrorKind::AuthenticationFailed {
        return true;
    }
    // A sentinel without a password answers AUTH with a plain ERR.
    let code = err.code().unwrap_or_default();
    let detail = err.detail().unwrap_or_default();
    matches!(code, "NOAUTH" | "WRONGPASS") || (code == "ERR" && detail.starts_with("AUTH"))
}

/// Whether a command's failure means the connection must be replaced: it broke, timed
/// out, or reached a node that is no longer the master.
fn needs_new_connection(err: &RedisError) -> bool {
    err.is_unrecoverable_error()
        || err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || matches!(
            err.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
        // A write on a demoted master, alone or queued in a MULTI it aborts.
        || err.clone().into_server_errors().is_some_and(|errors| {
            errors.iter().any(|(_, e)| {
                matches!(
                    e.kind(),
                    Some(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
                )
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> SentinelUrl {
        match SentinelUrl::parse(url) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    #[test]
    fn the_documented_url_form_parses() {
        let url = parse("redis+sentinel://:s3cr%40t@10.0.0.1:26379,10.0.0.2:26380/mymaster/2");
        assert!(!url.tls);
        assert_eq!(
            url.sentinels,
            [("10.0.0.1".into(), 26379), ("10.0.0.2".into(), 26380)]
        );
        assert_eq!(url.service, "mymaster");
        assert_eq!(url.db, 2);
        assert_eq!(url.username, None);
        assert_eq!(url.password.as_deref(), Some("s3cr@t"));

        let url = parse("rediss+sentinel://s1,[::1]:5000,[fe80::1]/svc/");
        assert!(url.tls);
        assert_eq!(
            url.sentinels,
            [
                ("s1".into(), 26379),
                ("::1".into(), 5000),
                ("fe80::1".into(), 26379)
            ]
        );
        assert_eq!((url.service.as_str(), url.db), ("svc", 0));
        assert_eq!(url.password, None);

        let url = parse("redis+sentinel://app:pw@h:1/svc");
        assert_eq!(url.username.as_deref(), Some("app"));
        assert_eq!(url.password.as_deref(), Some("pw"));

        // Unencoded, but unambiguous up to the last `@`.
        let url = parse("redis+sentinel://:p/w?#@h:1/svc");
        assert_eq!(url.password.as_deref(), Some("p/w?#"));
        assert_eq!((url.sentinels.len(), url.service.as_str()), (1, "svc"));
    }

    #[test]
    fn malformed_urls_are_refused_without_echoing_the_password() {
        for url in [
            "redis+sentinel://:hunter2@h:1",
            "redis+sentinel://:hunter2@h:1/",
            "redis+sentinel://:hunter2@h:0/svc",
            "redis+sentinel://:hunter2@h:x/svc",
            "redis+sentinel://:hunter2@,h:1/svc",
            "redis+sentinel://:hunter2@h:1/svc/x",
            "redis+sentinel://:hunter2@h:1/svc/1/2",
            "redis+sentinel://:hunter2@h:1/svc?protocol=resp3",
            "redis+sentinel://:hunter2@[::1/svc",
            "redis+sentinel://:hunter%zz@h:1/svc",
            "redis+sentinel://:hunter2/x@h:1",
            "redis+sentinel://:hunter2?x@h:1/svc?protocol=resp3",
            "redis+sentinel://:hunter2#x@h:x/svc",
            "redis://:hunter2@h:1/svc",
        ] {
            match SentinelUrl::parse(url) {
                Ok(_) => panic!("{url} parsed"),
                Err(e) => assert!(!e.to_string().contains("hunter"), "{url}: {e}"),
            }
        }
    }

    #[test]
    fn only_broken_or_demoted_connections_are_replaced() {
        let readonly = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "READONLY",
            "You can't write against a read only replica.".to_owned(),
        ));
        assert!(needs_new_connection(&readonly));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(needs_new_connection(&io));
        let wrong_type = RedisError::from((ErrorKind::UnexpectedReturnType, "wrong type"));
        assert!(!needs_new_connection(&wrong_type));
    }
}

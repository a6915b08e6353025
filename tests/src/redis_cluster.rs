//! A real Redis Cluster on loopback: six `redis-server --cluster-enabled yes` processes,
//! three masters with one replica each, made into a cluster by `redis-cli --cluster
//! create`. Failover is quick (`cluster-node-timeout` 1 s). Every process dies with the
//! value.
//!
//! The helpers read the topology from `CLUSTER NODES` of the live nodes and, where it
//! matters, wait until all of them agree: right after a change, nodes see it at different
//! times.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The number of hash slots of every Redis Cluster.
const SLOTS: u32 = 16384;

/// Six redis-server processes in cluster mode: 3 masters and 3 replicas.
pub struct RedisCluster {
    dir: tempfile::TempDir,
    password: Option<String>,
    /// Every node as started: the first three were made masters by `--cluster create`.
    nodes: Vec<Node>,
    /// The replicas a killed master had when it was killed ([`RedisCluster::kill_node`]).
    former_replicas: HashMap<u16, Vec<u16>>,
    /// Numbers the `redis-cli` logs.
    cli_runs: AtomicU32,
    /// The client and bus ports of every node, held while the cluster lives.
    _ports: Vec<crate::Reserved>,
}

struct Node {
    port: u16,
    bus_port: u16,
    child: Option<Child>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("dir", &self.dir.path())
            .field("ports", &self.ports())
            .field("live", &self.live_ports())
            .finish_non_exhaustive()
    }
}

/// One line of `CLUSTER NODES`: a node as another node sees it.
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    port: u16,
    master: bool,
    /// The id of its master, for a replica.
    master_id: Option<String>,
    /// Flagged `fail`, `fail?`, `handshake` or `noaddr`, or its link is down.
    unhealthy: bool,
    /// Slot ranges it serves, inclusive (importing/migrating marks left out).
    slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts six nodes, makes them a cluster (`redis-cli --cluster create ...
    /// --cluster-replicas 1`), and waits until every node says `cluster_state:ok`, every
    /// replica's link to its master is up and every node sees the same topology. With
    /// `password`, every node requires it (`requirepass`, `masterauth`).
    pub fn start(password: Option<&str>) -> RedisCluster {
        crate::require("redis-server");
        crate::require("redis-cli");
        let mut cluster = RedisCluster {
            dir: tempfile::tempdir().expect("tempdir"),
            password: password.map(str::to_owned),
            nodes: Vec::new(),
            former_replicas: HashMap::new(),
            cli_runs: AtomicU32::new(0),
            _ports: Vec::new(),
        };
        for _ in 0..6 {
            let port = crate::reserve_port();
            let bus = crate::reserve_port();
            cluster.nodes.push(Node {
                port: port.port(),
                bus_port: bus.port(),
                child: None,
            });
            cluster._ports.extend([port, bus]);
        }
        for port in cluster.ports() {
            cluster.spawn_node(port);
        }
        let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
        args.extend(cluster.ports().iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = cluster.redis_cli(&args, Duration::from_secs(30));
        assert!(ok, "redis-cli --cluster create failed: {out}");
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// `redis+cluster://[:PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/`: the seeds
    /// are the three nodes started as masters.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes[..3]
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}{}/", self.auth(), hosts.join(","))
    }

    /// A plain `redis://[:PASSWORD@]127.0.0.1:PORT/` URL for one node, to look behind a
    /// client's back (a key of a slot the node does not serve answers `MOVED`).
    pub fn node_url(&self, port: u16) -> String {
        format!("redis://{}127.0.0.1:{port}/", self.auth())
    }

    /// The client port of every node, in start order, live or not.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The ports of the nodes that have not been killed.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// The live nodes that say (`ROLE`) they are masters, sorted.
    pub fn master_ports(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .live_ports()
            .into_iter()
            .filter(|port| self.role(*port).as_deref() == Some("master"))
            .collect();
        masters.sort_unstable();
        masters
    }

    /// What node `port` says its role is (`master`, `slave`), if it answers.
    pub fn role(&self, port: u16) -> Option<String> {
        self.text(port, &["ROLE"])
    }

    /// The `cluster_state` (`ok`, `fail`) node `port` reports, if it answers.
    pub fn cluster_state(&self, port: u16) -> Option<String> {
        let info = self.text(port, &["CLUSTER", "INFO"])?;
        info.lines()
            .find_map(|line| line.strip_prefix("cluster_state:"))
            .map(|state| state.trim().to_owned())
    }

    /// The hash slot of `key`, as a live node computes it (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let slot: Option<u16> = self
            .live_ports()
            .into_iter()
            .find_map(|port| self.query(port, &cmd(&["CLUSTER", "KEYSLOT", key])));
        slot.expect("a live node answers CLUSTER KEYSLOT")
    }

    /// The master serving `slot`, once every live node agrees on it (10 s at most).
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        let mut owner = None;
        self.wait(
            Duration::from_secs(10),
            &format!("the live nodes to agree on the owner of slot {slot}"),
            |c| {
                owner = c.agreed_owner(slot);
                owner.is_some()
            },
        );
        owner.expect("agreed owner")
    }

    /// The slots master `port` serves, once every live node agrees (10 s at most).
    pub fn slots_of(&self, port: u16) -> Vec<u16> {
        let mut slots = None;
        self.wait(
            Duration::from_secs(10),
            "the live nodes to agree on the slots",
            |c| {
                slots = c.agreed_slots();
                slots.is_some()
            },
        );
        let ranges = slots
            .expect("agreed slots")
            .remove(&port)
            .unwrap_or_default();
        ranges.into_iter().flat_map(|(a, b)| a..=b).collect()
    }

    /// The healthy replicas of master `port`, sorted, as the master sees them (or the first
    /// live node, when the master is down).
    pub fn replicas_of(&self, master: u16) -> Vec<u16> {
        let view = std::iter::once(master)
            .chain(self.live_ports())
            .filter(|port| self.is_live(*port))
            .find_map(|port| self.view(port))
            .expect("a live node answers CLUSTER NODES");
        let Some(id) = view.iter().find(|n| n.port == master).map(|n| n.id.clone()) else {
            return Vec::new();
        };
        let mut replicas: Vec<u16> = view
            .iter()
            .filter(|n| !n.master && !n.unhealthy && n.master_id.as_deref() == Some(&id))
            .map(|n| n.port)
            .collect();
        replicas.sort_unstable();
        replicas
    }

    /// Kills node `port` with SIGKILL (an outage: it does not hand anything over). A master
    /// remembers its replicas for [`RedisCluster::wait_for_promotion`].
    pub fn kill_node(&mut self, port: u16) {
        if self.role(port).as_deref() == Some("master") {
            let replicas = self.replicas_of(port);
            self.former_replicas.insert(port, replicas);
        }
        let node = self.node_mut(port);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed node again with its old `nodes.conf`: it rejoins the cluster (as a
    /// replica, when its slots moved on). Waits until it answers, not until it has synced.
    pub fn restart_node(&mut self, port: u16) {
        assert!(!self.is_live(port), "node {port} is running");
        self.spawn_node(port);
    }

    /// Kills the master of `slot` with SIGKILL and returns its port.
    pub fn kill_master_of_slot(&mut self, slot: u16) -> u16 {
        let master = self.master_of_slot(slot);
        self.kill_node(master);
        master
    }

    /// Waits until a replica of `old_master` (killed with [`RedisCluster::kill_node`]) is
    /// the master of `slot` for every live node, says so itself, and every live node is
    /// back to `cluster_state:ok`. Returns its port.
    pub fn wait_for_promotion(&self, old_master: u16, slot: u16, within: Duration) -> u16 {
        let replicas = self
            .former_replicas
            .get(&old_master)
            .filter(|r| !r.is_empty())
            .cloned();
        let mut promoted = None;
        self.wait(
            within,
            &format!("a replica of {old_master} to take over slot {slot}"),
            |c| {
                promoted = c.agreed_owner(slot).filter(|owner| {
                    *owner != old_master
                        && replicas.as_ref().is_none_or(|r| r.contains(owner))
                        && c.role(*owner).as_deref() == Some("master")
                });
                promoted.is_some() && c.all_live_state("ok")
            },
        );
        promoted.expect("promoted replica")
    }

    /// Asks replica `port` for a coordinated failover (`CLUSTER FAILOVER`): it takes over
    /// its master's slots and the master becomes its replica. Does not wait; see
    /// [`RedisCluster::wait_master_of_slot`].
    pub fn manual_failover(&self, replica: u16) {
        let reply = self.text(replica, &["CLUSTER", "FAILOVER"]);
        assert_eq!(
            reply.as_deref(),
            Some("OK"),
            "CLUSTER FAILOVER refused by {replica}"
        );
    }

    /// Waits until every live node says `port` serves `slot`, `port` says it is a master,
    /// and every live node is at `cluster_state:ok`.
    pub fn wait_master_of_slot(&self, slot: u16, port: u16, within: Duration) {
        self.wait(
            within,
            &format!("{port} to be the master of slot {slot}"),
            |c| {
                c.agreed_owner(slot) == Some(port)
                    && c.role(port).as_deref() == Some("master")
                    && c.all_live_state("ok")
            },
        );
    }

    /// Waits until every live node reports `cluster_state:STATE` (`ok`, `fail`).
    pub fn wait_cluster_state(&self, state: &str, within: Duration) {
        self.wait(within, &format!("cluster_state:{state} everywhere"), |c| {
            c.all_live_state(state)
        });
    }

    /// Waits until every live node reports `cluster_state:ok`, all agree on who serves
    /// every slot, each sees every other live node as healthy and in the role it claims,
    /// and every live replica's link to its master is up.
    pub fn wait_healthy(&self, within: Duration) {
        self.wait(within, "the cluster to be healthy", |c| c.is_healthy());
    }

    /// Moves exactly `slot` (and its keys) to master `to`, the way `redis-cli --cluster
    /// reshard` moves each slot: `CLUSTER SETSLOT IMPORTING` on the target, `MIGRATING` on
    /// the source, `MIGRATE` of the keys (`CLUSTER GETKEYSINSLOT`), then `SETSLOT NODE` on
    /// every master. `redis-cli` itself cannot be told which slot to move. Waits until every
    /// live node names `to`, the state is `ok` and `redis-cli --cluster check` is clean.
    pub fn reshard_slot(&self, slot: u16, to: u16) {
        let from = self.master_of_slot(slot);
        if from == to {
            return;
        }
        let slot_arg = slot.to_string();
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        self.expect_ok(
            to,
            &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id],
        );
        self.expect_ok(
            from,
            &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id],
        );
        loop {
            let keys: Vec<Vec<u8>> = self
                .query(from, &cmd(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]))
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let mut migrate = cmd(&["MIGRATE", "127.0.0.1", &to.to_string(), "", "0", "5000"]);
            if let Some(password) = &self.password {
                migrate.arg("AUTH").arg(password);
            }
            migrate.arg("KEYS").arg(&keys);
            let reply: Option<String> = self.query(from, &migrate);
            assert_eq!(
                reply.as_deref(),
                Some("OK"),
                "MIGRATE of slot {slot} from {from} to {to}"
            );
        }
        // The target first, so the source's keys are never without an owner.
        let mut masters = vec![to, from];
        masters.extend(
            self.master_ports()
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for master in masters {
            self.expect_ok(master, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
        }
        self.wait(
            Duration::from_secs(20),
            &format!("slot {slot} to move from {from} to {to}"),
            |c| c.agreed_owner(slot) == Some(to) && c.all_live_state("ok") && c.check_clean(),
        );
    }

    /// `redis-cli --cluster reshard`: moves `count` slots (redis-cli picks which) from
    /// master `from` to master `to`. Waits until the cluster is healthy and `redis-cli
    /// --cluster check` is clean; returns the slots that moved.
    pub fn reshard(&self, from: u16, to: u16, count: u16) -> Vec<u16> {
        let before = self.slots_of(to);
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let seed = format!("127.0.0.1:{from}");
        let count = count.to_string();
        let (ok, out) = self.redis_cli(
            &[
                "--cluster",
                "reshard",
                &seed,
                "--cluster-from",
                &from_id,
                "--cluster-to",
                &to_id,
                "--cluster-slots",
                &count,
                "--cluster-yes",
            ],
            Duration::from_secs(60),
        );
        assert!(ok, "redis-cli --cluster reshard failed: {out}");
        self.wait(
            Duration::from_secs(20),
            "the cluster to settle after the reshard",
            |c| c.is_healthy() && c.check_clean(),
        );
        let after = self.slots_of(to);
        after.into_iter().filter(|s| !before.contains(s)).collect()
    }

    /// Leaves `slot` served by no node, so every node goes to `cluster_state:fail`
    /// (`cluster-require-full-coverage yes`, the default). How: `CLUSTER DELSLOTS` on the
    /// owner first, then on every other live node. The owner must go first: while it still
    /// claims the slot, its gossip would hand the slot back to a node that had dropped it;
    /// once it does not, nothing claims the slot again (replicas' claims are not taken, and
    /// a node never drops a slot from another's claim). The keys stay on the old owner.
    /// Waits until no live node names an owner and all report `fail`; returns the old
    /// owner's port.
    pub fn uncover_slot(&self, slot: u16) -> u16 {
        let owner = self.master_of_slot(slot);
        let slot_arg = slot.to_string();
        let mut order = vec![owner];
        order.extend(self.live_ports().into_iter().filter(|p| *p != owner));
        for port in order {
            let reply: redis::RedisResult<redis::Value> =
                self.try_query(port, &cmd(&["CLUSTER", "DELSLOTS", &slot_arg]));
            match reply {
                Ok(_) => {}
                Err(e) if e.to_string().contains("already unassigned") => {}
                Err(e) => panic!("CLUSTER DELSLOTS {slot} on {port}: {e}"),
            }
        }
        self.wait(
            Duration::from_secs(10),
            &format!("slot {slot} to be uncovered"),
            |c| {
                c.live_ports().into_iter().all(|port| {
                    c.view(port)
                        .is_some_and(|view| owner_in(&view, slot).is_none())
                }) && c.all_live_state("fail")
            },
        );
        owner
    }

    /// Polls `done` every 50 ms until it holds; panics after `within` with every log's tail.
    pub fn wait(&self, within: Duration, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; logs in {}: {}",
                self.dir.path().display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The tail of every node's and every `redis-cli` run's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut paths: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        paths.retain(|p| p.extension().is_some_and(|e| e == "log"));
        paths.sort();
        let mut out = String::new();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("\n== {}\n", path.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Runs `args` on node `port` and asserts it answers OK.
    pub fn expect_ok(&self, port: u16, args: &[&str]) {
        let reply: redis::RedisResult<redis::Value> = self.try_query(port, &cmd(args));
        assert!(
            matches!(reply, Ok(redis::Value::Okay)),
            "{args:?} on {port}: {reply:?}"
        );
    }

    fn spawn_node(&mut self, port: u16) {
        let dir = self.dir.path().to_owned();
        let password = self.password.clone();
        let node = self.node_mut(port);
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            // A second reserved port, not port + 10000, which nobody holds for us.
            .args(["--cluster-port", &node.bus_port.to_string()])
            .args(["--cluster-announce-ip", "127.0.0.1"])
            .args(["--cluster-node-timeout", "1000"])
            // A replica always stands for election, however long its link was down, and
            // replicas stay with their masters: the topology changes only when told.
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--cluster-allow-replica-migration", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--dbfilename", &format!("dump-{port}.rdb")])
            .arg("--dir")
            .arg(&dir);
        if let Some(password) = &password {
            command.args(["--requirepass", password, "--masterauth", password]);
        }
        node.child = Some(spawn_logged(
            command,
            &dir.join(format!("redis-{port}.log")),
        ));
        self.wait(Duration::from_secs(20), "redis-server to start", |c| {
            c.text(port, &["PING"]).is_some()
        });
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("{port} is not a node of this cluster"))
    }

    fn is_live(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|n| n.port == port && n.child.is_some())
    }

    fn auth(&self) -> String {
        self.password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default()
    }

    /// The node id of `port` (`CLUSTER MYID`).
    fn node_id(&self, port: u16) -> String {
        self.text(port, &["CLUSTER", "MYID"])
            .unwrap_or_else(|| panic!("CLUSTER MYID on {port}"))
    }

    /// `CLUSTER NODES` of node `port`, parsed.
    fn view(&self, port: u16) -> Option<Vec<NodeLine>> {
        let text = self.text(port, &["CLUSTER", "NODES"])?;
        text.lines().map(parse_node_line).collect()
    }

    /// Master port -> slot ranges, when every live node answers with the same map.
    fn agreed_slots(&self) -> Option<BTreeMap<u16, Vec<(u16, u16)>>> {
        let mut agreed = None;
        for port in self.live_ports() {
            let view = self.view(port)?;
            let map: BTreeMap<u16, Vec<(u16, u16)>> = view
                .into_iter()
                .filter(|n| n.master && !n.slots.is_empty())
                .map(|mut n| {
                    n.slots.sort_unstable();
                    (n.port, n.slots)
                })
                .collect();
            match &agreed {
                None => agreed = Some(map),
                Some(first) if *first == map => {}
                Some(_) => return None,
            }
        }
        agreed
    }

    /// The master of `slot` when every live node names the same one.
    fn agreed_owner(&self, slot: u16) -> Option<u16> {
        let mut agreed = None;
        for port in self.live_ports() {
            let owner = owner_in(&self.view(port)?, slot)?;
            if agreed.is_some_and(|a| a != owner) {
                return None;
            }
            agreed = Some(owner);
        }
        agreed
    }

    fn all_live_state(&self, state: &str) -> bool {
        self.live_ports()
            .into_iter()
            .all(|port| self.cluster_state(port).as_deref() == Some(state))
    }

    fn is_healthy(&self) -> bool {
        let live = self.live_ports();
        let Some(slots) = self.agreed_slots() else {
            return false;
        };
        let covered: u32 = slots
            .values()
            .flatten()
            .map(|(a, b)| u32::from(b - a) + 1)
            .sum();
        if covered != SLOTS || !self.all_live_state("ok") {
            return false;
        }
        let mut roles = HashMap::new();
        for port in &live {
            let Some(role) = self.role(*port) else {
                return false;
            };
            if role == "slave" {
                let up = self
                    .text(*port, &["INFO", "replication"])
                    .is_some_and(|info| info.contains("master_link_status:up"));
                if !up {
                    return false;
                }
            }
            roles.insert(*port, role == "master");
        }
        live.iter().all(|port| {
            self.view(*port).is_some_and(|view| {
                live.iter().all(|other| {
                    view.iter()
                        .any(|n| n.port == *other && !n.unhealthy && roles[other] == n.master)
                })
            })
        })
    }

    /// Whether `redis-cli --cluster check` on a live node finds nothing to complain about
    /// (open slots, disagreement, uncovered slots).
    fn check_clean(&self) -> bool {
        let Some(port) = self.live_ports().first().copied() else {
            return false;
        };
        let seed = format!("127.0.0.1:{port}");
        let (ok, out) = self.redis_cli(&["--cluster", "check", &seed], Duration::from_secs(10));
        ok && !out.contains("[WARNING]") && !out.contains("[ERR]")
    }

    /// Runs `redis-cli ARGS` (the password through `REDISCLI_AUTH`, not the command line),
    /// its output logged; kills it after `within`. Returns whether it succeeded, and its
    /// output.
    fn redis_cli(&self, args: &[&str], within: Duration) -> (bool, String) {
        let run = self.cli_runs.fetch_add(1, Ordering::Relaxed);
        let log = self.dir.path().join(format!("redis-cli-{run:03}.log"));
        let mut command = Command::new("redis-cli");
        command.args(args).stdin(Stdio::null());
        match &self.password {
            Some(password) => command.env("REDISCLI_AUTH", password),
            None => command.env_remove("REDISCLI_AUTH"),
        };
        let mut child = spawn_logged(command, &log);
        let deadline = Instant::now() + within;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        (status.is_some_and(|s| s.success()), out)
    }

    /// Whether `key` exists on the master of `slot` now (asked there directly, so a
    /// test can watch a store's keys without going through a cluster client).
    pub fn exists_on_master(&self, slot: u16, key: &str) -> bool {
        let master = self.master_of_slot(slot);
        self.query::<i64>(master, &cmd(&["EXISTS", key]))
            .is_some_and(|n| n > 0)
    }

    /// A node's reply to `args` as text (a status, bulk string or the first element of an
    /// array), or `None` when it does not answer.
    fn text(&self, port: u16, args: &[&str]) -> Option<String> {
        let value: redis::Value = self.query(port, &cmd(args))?;
        text_of(&value)
    }

    fn query<T: redis::FromRedisValue>(&self, port: u16, command: &redis::Cmd) -> Option<T> {
        self.try_query(port, command).ok()
    }

    /// One command on a fresh connection to node `port`, with short timeouts.
    fn try_query<T: redis::FromRedisValue>(
        &self,
        port: u16,
        command: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.node_url(port))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_millis(500))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        command.query(&mut conn)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command
}

fn spawn_logged(mut command: Command, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log");
    command
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start a redis process")
}

fn text_of(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::Okay => Some("OK".to_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::VerbatimString { text, .. } => Some(text.clone()),
        redis::Value::Array(items) => items.first().and_then(text_of),
        _ => None,
    }
}

/// The master that serves `slot` in a `CLUSTER NODES` view.
fn owner_in(view: &[NodeLine], slot: u16) -> Option<u16> {
    view.iter()
        .find(|n| n.master && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .map(|n| n.port)
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_node_line(line: &str) -> Option<NodeLine> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return None;
    }
    let (_, port) = fields[1].split('@').next()?.rsplit_once(':')?;
    let flags: Vec<&str> = fields[2].split(',').collect();
    let unhealthy = fields[7] != "connected"
        || flags
            .iter()
            .any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr"));
    let mut slots = Vec::new();
    for field in &fields[8..] {
        // `[slot->-id]` / `[slot-<-id]`: a migration in progress, not ownership.
        if field.starts_with('[') {
            continue;
        }
        let range = match field.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let slot = field.parse().ok()?;
                (slot, slot)
            }
        };
        slots.push(range);
    }
    Some(NodeLine {
        id: fields[0].to_owned(),
        port: port.parse().ok()?,
        master: flags.contains(&"master"),
        master_id: Some(fields[3]).filter(|m| *m != "-").map(str::to_owned),
        unhealthy,
        slots,
    })
}

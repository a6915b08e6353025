//! Fault drills: a short-lived certificate falls due while something it depends on is
//! broken. Each drill checks four things:
//!
//! 1. the old certificate is still served (a verified handshake sees its serial);
//! 2. the store is not corrupted (the stored pair loads and its key matches);
//! 3. the alarm fires: the manager's event, the Prometheus counter, and `lobe-tls check`
//!    exiting 2;
//! 4. recovery comes without a restart once the fault is gone, before expiry.
//!
//! The manager runs with its defaults (check interval, backoff, request timeout); only
//! the certificate's lifetime is short. RELIABILITY.md lists the drills and results.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use lobe_tls::challenge::dns01::{DnsConfig, DnsProviderConfig};
use lobe_tls::cluster::Cluster;
use lobe_tls::manager::MaintenanceHandle;
use lobe_tls::store::Store;
use lobe_tls::{
    AcmeConfig, CertInfo, ChallengeConfig, Event, FileStore, Http01Listener, Http01Registry,
    ManagedCert, Manager, Metrics, domain,
};
use lobe_tls_tests::ari_shim::{AriShim, Fault};
use lobe_tls_tests::faulty_path::FaultyPath;
use lobe_tls_tests::{Pebble, PebbleOptions};
use time::OffsetDateTime;
use tokio::sync::broadcast;

const NAME: &str = "drill";
const DOMAIN: &str = "drill.example.test";

/// One drill's world: Pebble, a way to break the path to it, a file store, and a
/// manager with its metrics.
struct Drill {
    _pebble: Pebble,
    dir: tempfile::TempDir,
    _manager: Manager,
    events: broadcast::Receiver<Event>,
    metrics: Arc<Metrics>,
    client: Arc<rustls::ClientConfig>,
    tls: lobe_tls_tests::tls::TlsServer,
    first: CertInfo,
    _http01: Option<Http01Listener>,
    _maintenance: MaintenanceHandle,
    _follow: Cluster,
}

impl Drill {
    /// Issues the first certificate through `directory` (Pebble, or something in front
    /// of it), with `challenge`, and starts the maintenance loop.
    async fn start(
        pebble: Pebble,
        directory: &str,
        challenge: Option<ChallengeConfig>,
        dir: tempfile::TempDir,
    ) -> Drill {
        let store = Arc::new(FileStore::open(dir.path().join("store")).unwrap());
        let mut acme = AcmeConfig::new(directory);
        acme.directory_ca = Some(pebble.ca_file.clone());
        let registry = Http01Registry::new();
        let mut cert = ManagedCert::new(NAME, domain::parse_all(&[DOMAIN]).unwrap());
        let http01 = match challenge {
            Some(challenge) => {
                cert = cert.with_challenge(challenge);
                None
            }
            None => Some(
                Http01Listener::bind(pebble.http_addr(), registry.service())
                    .await
                    .unwrap(),
            ),
        };
        let manager = Manager::builder(acme, store)
            .http01(registry)
            .cert(cert)
            .build()
            .unwrap();
        let metrics = Metrics::new();
        manager.export_metrics(&metrics);
        let events = manager.subscribe();
        // Follows what other processes write to the store, as `serve` does.
        let follow = Cluster::builder(manager.clone()).start().unwrap();
        let report = manager.start().await.unwrap();
        assert_eq!(report.obtained, [NAME], "{report:?}");
        let maintenance = manager.spawn();
        let tls =
            lobe_tls_tests::tls::TlsServer::bind("127.0.0.1:0", manager.resolver().clone()).await;
        let mut client =
            (*lobe_tls_tests::tls::client_config(&pebble.issuing_root_pem().await)).clone();
        // Each handshake must see what is served now, not a resumed session.
        client.resumption = rustls::client::Resumption::disabled();
        let client = Arc::new(client);
        let first = served(&tls, &client).await.unwrap();
        Drill {
            _pebble: pebble,
            dir,
            _manager: manager,
            events,
            metrics,
            client,
            tls,
            first,
            _http01: http01,
            _maintenance: maintenance,
            _follow: follow,
        }
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Sleeps until `before` ahead of the first certificate's renewal time.
    async fn until_due(&self, before: Duration) {
        let due = self.first.not_before + (self.first.not_after - self.first.not_before) / 2;
        let wait = due - OffsetDateTime::now_utc() - before;
        if let Ok(wait) = Duration::try_from(wait) {
            tokio::time::sleep(wait).await;
        }
    }

    /// The next event of `kind` within `within`, skipping others.
    async fn event(&mut self, kind: &str, within: Duration) -> Event {
        self.event_of(&[kind], within).await
    }

    /// The next event of one of `kinds` within `within`, skipping others.
    async fn event_of(&mut self, kinds: &[&str], within: Duration) -> Event {
        let found = tokio::time::timeout(within, async {
            loop {
                let event = self.events.recv().await.unwrap();
                let this = match &event {
                    Event::RenewalFailed { .. } => "failed",
                    Event::Renewed { .. } => "renewed",
                    Event::Unusable { .. } => "unusable",
                    Event::Loaded { .. } => "loaded",
                    _ => "other",
                };
                if kinds.contains(&this) {
                    return event;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {kinds:?} event within {within:?}"))
    }

    /// Checks 1 to 3: the old certificate served, the store intact, the alarm raised.
    async fn assert_old_served_store_intact_and_alarm(&mut self, alarm_metric: &str) {
        assert_eq!(
            served(&self.tls, &self.client).await.unwrap().serial,
            self.first.serial,
            "the old certificate is still served"
        );
        self.assert_store_holds_a_servable_pair(Some(&self.first.serial.clone()))
            .await;
        // The metrics count the manager's events in a task of their own, which may see
        // the failure after this test's subscriber did: wait for it, with a deadline.
        let line = format!("{alarm_metric}{{name=\"{NAME}\"}} ");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let scraped = self.metrics.render();
            let count: u64 = scraped
                .lines()
                .find_map(|l| l.strip_prefix(&line))
                .unwrap_or_else(|| panic!("no {line}in {scraped}"))
                .parse()
                .unwrap();
            if count >= 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{alarm_metric} is {count}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(self.check(), 2, "check raises the alarm");
    }

    async fn assert_store_holds_a_servable_pair(&self, serial: Option<&str>) {
        let store = FileStore::open(self.store_dir()).unwrap();
        let stored = store.load_cert(NAME).await.unwrap().unwrap();
        let (_, info) = stored
            .bundle
            .validated_key_for(&stored.meta.domains)
            .unwrap();
        if let Some(serial) = serial {
            assert_eq!(info.serial, serial);
        }
    }

    /// Check 4: renewed without a restart, before the first certificate expires, and
    /// everything says so.
    async fn assert_recovers(&mut self) {
        let left = Duration::try_from(self.first.not_after - OffsetDateTime::now_utc())
            .expect("the first certificate expired before recovery");
        match self.event("renewed", left).await {
            Event::Renewed { serial, .. } => {
                assert_ne!(serial, self.first.serial);
                let now_served = served(&self.tls, &self.client).await.unwrap();
                assert_eq!(now_served.serial, serial);
            }
            _ => unreachable!(),
        }
        self.assert_store_holds_a_servable_pair(None).await;
        assert_eq!(self.check(), 0, "check is quiet again");
    }

    /// `lobe-tls check` on the store, as a monitoring probe runs it: its exit status.
    fn check(&self) -> i32 {
        let output = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .arg("check")
            .arg("--store")
            .arg(self.store_dir())
            .env_remove("LOBE_TLS_STORE")
            .output()
            .unwrap();
        output.status.code().unwrap()
    }
}

async fn served(
    tls: &lobe_tls_tests::tls::TlsServer,
    client: &Arc<rustls::ClientConfig>,
) -> Result<CertInfo, String> {
    lobe_tls_tests::tls::handshake_leaf(tls.addr(), DOMAIN, client.clone()).await
}

fn short_lived(secs: u64) -> Pebble {
    Pebble::start(PebbleOptions {
        validity_secs: Some(secs),
        ..PebbleOptions::default()
    })
}

fn pebble_addr(pebble: &Pebble) -> std::net::SocketAddr {
    pebble
        .directory_url
        .trim_start_matches("https://")
        .trim_end_matches("/dir")
        .parse()
        .unwrap()
}

/// A drill on the TCP path to the CA: `break_path` breaks it just before the renewal.
async fn path_drill(break_path: impl Fn(&FaultyPath)) {
    let pebble = short_lived(40);
    let path = FaultyPath::start(pebble_addr(&pebble)).await;
    let directory = format!("https://{}/dir", path.addr);
    let mut drill = Drill::start(pebble, &directory, None, tempfile::tempdir().unwrap()).await;
    drill.until_due(Duration::from_secs(1)).await;
    break_path(&path);
    drill.event("failed", Duration::from_secs(10)).await;
    drill
        .assert_old_served_store_intact_and_alarm("lobe_tls_renewal_failures_total")
        .await;
    path.heal();
    drill.assert_recovers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_ca_refusing_connections() {
    path_drill(FaultyPath::refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_ca_hanging() {
    path_drill(FaultyPath::go_dead).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_ca_answering_500() {
    let pebble = short_lived(40);
    let shim = AriShim::start(&pebble).await;
    let directory = shim.directory_url.clone();
    let mut drill = Drill::start(pebble, &directory, None, tempfile::tempdir().unwrap()).await;
    drill.until_due(Duration::from_secs(1)).await;
    shim.set_fault(Some(Fault::Status(500)));
    drill.event("failed", Duration::from_secs(10)).await;
    drill
        .assert_old_served_store_intact_and_alarm("lobe_tls_renewal_failures_total")
        .await;
    shim.set_fault(None);
    drill.assert_recovers().await;
}

/// A CA that takes 2 s for every request is slow, not down: the renewal goes through
/// (nothing to alarm about), the old certificate served until the new one is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_ca_taking_2_seconds_per_request() {
    let pebble = short_lived(90);
    let shim = AriShim::start(&pebble).await;
    let directory = shim.directory_url.clone();
    let mut drill = Drill::start(pebble, &directory, None, tempfile::tempdir().unwrap()).await;
    drill.until_due(Duration::from_secs(1)).await;
    shim.set_fault(Some(Fault::Delay(Duration::from_secs(2))));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        served(&drill.tls, &drill.client).await.unwrap().serial,
        drill.first.serial,
        "the old certificate is served while the slow renewal runs"
    );
    drill
        .assert_store_holds_a_servable_pair(Some(&drill.first.serial.clone()))
        .await;
    drill.assert_recovers().await;
    assert!(
        !drill.metrics.render().contains(&format!(
            "lobe_tls_renewal_failures_total{{name=\"{NAME}\"}} 1"
        )),
        "a slow CA is not a failure"
    );
}

/// DNS-01 through a provider hook that starts failing (its API is down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_dns_provider_failing() {
    // A renewal that reuses a valid authorization never calls the provider, so this
    // drill turns Pebble's authorization reuse off (it still reuses about 1% of the
    // time: then the drill waits for the next renewal).
    let pebble = Pebble::start(PebbleOptions {
        validity_secs: Some(40),
        authz_reuse: Some(0),
        ..PebbleOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let down = dir.path().join("provider-down");
    let hook = write_hook(dir.path(), &pebble.challtestsrv_url, &down);
    let mut dns = DnsConfig::new(DnsProviderConfig::Exec {
        program: hook.display().to_string(),
    });
    dns.resolvers = vec![pebble.dns_addr];
    let challenge = ChallengeConfig::dns01(dns);
    let directory = pebble.directory_url.clone();
    let mut drill = Drill::start(pebble, &directory, Some(challenge), dir).await;
    loop {
        drill.until_due(Duration::from_secs(1)).await;
        std::fs::write(&down, b"").unwrap();
        match drill
            .event_of(&["failed", "renewed"], Duration::from_secs(10))
            .await
        {
            Event::RenewalFailed { error, .. } => {
                assert!(error.contains("provider API down"), "{error}");
                break;
            }
            _ => {
                // An authorization was reused after all: try the next renewal.
                std::fs::remove_file(&down).unwrap();
                drill.first = served(&drill.tls, &drill.client).await.unwrap();
            }
        }
    }
    drill
        .assert_old_served_store_intact_and_alarm("lobe_tls_renewal_failures_total")
        .await;
    std::fs::remove_file(&down).unwrap();
    drill.assert_recovers().await;
}

/// A lego-style exec hook that writes TXT records through challtestsrv, and fails while
/// `down` exists.
fn write_hook(dir: &Path, challtestsrv: &str, down: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let hook = dir.join("dns-hook");
    let script = format!(
        "#!/bin/sh\n\
         if [ -e '{down}' ]; then echo 'provider API down (drill)' >&2; exit 1; fi\n\
         case \"$1\" in\n\
           present) body='{{\"host\":\"'\"$2\"'\",\"value\":\"'\"$3\"'\"}}'; path=set-txt ;;\n\
           cleanup) body='{{\"host\":\"'\"$2\"'\"}}'; path=clear-txt ;;\n\
           *) exit 2 ;;\n\
         esac\n\
         exec curl -sf -m 5 -X POST -d \"$body\" '{challtestsrv}'/\"$path\" >/dev/null\n",
        down = down.display(),
    );
    std::fs::write(&hook, script).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    hook
}

/// The disk fills up while the renewal saves: the save fails, nothing half-written is
/// served or left as the live pair, and the renewal completes once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_disk_full_during_save() {
    let pebble = short_lived(40);
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("store");
    std::fs::create_dir(&mount).unwrap();
    // A small tmpfs of its own (CI runs as root); unmounted when the drill ends.
    let _tmpfs = Tmpfs::mount(&mount, "256k");
    let directory = pebble.directory_url.clone();
    let mut drill = Drill::start(pebble, &directory, None, dir).await;
    let filler = mount.join("filler");
    drill.until_due(Duration::from_secs(1)).await;
    fill(&filler);
    drill.event("failed", Duration::from_secs(10)).await;
    drill
        .assert_old_served_store_intact_and_alarm("lobe_tls_renewal_failures_total")
        .await;
    std::fs::remove_file(&filler).unwrap();
    drill.assert_recovers().await;
}

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root): {status}"
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 4096];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
}

/// Garbage lands in the store (a bad copy, a broken script): it is refused, the old
/// certificate stays served, and the next renewal writes a good pair over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_garbage_in_the_store() {
    let pebble = short_lived(40);
    let directory = pebble.directory_url.clone();
    let mut drill = Drill::start(pebble, &directory, None, tempfile::tempdir().unwrap()).await;
    // A plain directory with garbage takes the place of the live pair.
    let live = drill.store_dir().join("live").join(NAME);
    let garbage = drill.store_dir().join("live").join(".garbage");
    std::fs::create_dir(&garbage).unwrap();
    std::fs::copy(live.join("lobe-tls.json"), garbage.join("lobe-tls.json")).unwrap();
    for file in ["cert.pem", "chain.pem", "fullchain.pem"] {
        std::fs::write(
            garbage.join(file),
            b"-----BEGIN CERTIFICATE-----\ngarbage\n",
        )
        .unwrap();
    }
    std::fs::write(garbage.join("privkey.pem"), b"not a key").unwrap();
    std::fs::remove_file(&live).unwrap();
    std::fs::rename(&garbage, &live).unwrap();
    drill.event("unusable", Duration::from_secs(10)).await;
    assert_eq!(
        served(&drill.tls, &drill.client).await.unwrap().serial,
        drill.first.serial,
        "the old certificate is still served"
    );
    let scraped = drill.metrics.render();
    assert!(
        scraped.contains(&format!(
            "lobe_tls_unusable_certificates_total{{name=\"{NAME}\"}} 1"
        )),
        "{scraped}"
    );
    assert_eq!(drill.check(), 2, "check reports the unusable pair");
    drill.assert_recovers().await;
}

/// A `lobe-tls issue` holding the certificate's lock is killed with SIGKILL mid-order:
/// the manager's renewal, which waited on the lock, goes ahead at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_lock_holder_killed_with_sigkill() {
    let pebble = short_lived(40);
    // The other process's path to the CA hangs, so it sits on the lock.
    let path = FaultyPath::start(pebble_addr(&pebble)).await;
    path.go_dead();
    let stuck_directory = format!("https://{}/dir", path.addr);
    let ca_file = pebble.ca_file.clone();
    let directory = pebble.directory_url.clone();
    let mut drill = Drill::start(pebble, &directory, None, tempfile::tempdir().unwrap()).await;
    let http_listen_port = lobe_tls_tests::reserve_port();
    let http_listen = http_listen_port.listen();
    let mut holder = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .args([
            "issue",
            "-d",
            DOMAIN,
            "--name",
            NAME,
            "--http-listen",
            &http_listen,
        ])
        .arg("--store")
        .arg(drill.store_dir())
        .args(["--directory", &stuck_directory])
        .arg("--directory-ca")
        .arg(&ca_file)
        .env_remove("LOBE_TLS_STORE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Until after the renewal fell due, the killed-to-be holder keeps the lock.
    drill.until_due(Duration::from_secs(0)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(holder.try_wait().unwrap().is_none(), "issue holds the lock");
    assert_eq!(
        served(&drill.tls, &drill.client).await.unwrap().serial,
        drill.first.serial
    );
    assert_eq!(drill.check(), 2, "check: due and not renewed");
    holder.kill().unwrap();
    holder.wait().unwrap();
    drill.assert_recovers().await;
}

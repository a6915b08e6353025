//! `lobe-tls import`: bring certificates, their renewal settings and ACME accounts over
//! from certbot, Caddy or Traefik. The reading and storing is the library's
//! (`lobe_tls::import`); this prints what happened.

use std::path::PathBuf;
use std::process::ExitCode;

use lobe_tls::import::{self, EntryKind, ImportEntry, ImportOptions, ImportResult};
use lobe_tls::{Error, Result};

use crate::global::Global;

/// Options of `lobe-tls import`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub source: Source,

    /// Only show what would be imported; write nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,

    /// Print the results as JSON.
    #[arg(long, global = true)]
    pub json: bool,

    /// Overwrite certificates and accounts the store already has.
    #[arg(long, global = true)]
    pub replace: bool,
}

/// Where to import from.
#[derive(clap::Subcommand, Debug)]
pub enum Source {
    /// From certbot's configuration directory: every renewal/NAME.conf with its live
    /// certificate and key, names, key type, server, authenticator, and its account.
    Certbot {
        /// certbot's configuration directory.
        #[arg(default_value = "/etc/letsencrypt")]
        dir: PathBuf,
    },
    /// From Caddy's file storage: certificates/ISSUER/NAME/NAME.{crt,key,json} and the ACME
    /// accounts under acme/CA/users/.
    Caddy {
        /// Caddy's storage directory (the one holding certificates/ and acme/).
        dir: PathBuf,
    },
    /// From Traefik's acme.json (v2/v3 layout). It does not name the CA: the certificates are
    /// recorded with --directory.
    Traefik {
        /// The acme.json file.
        file: PathBuf,
    },
}

/// Runs the command: exit 0 when every certificate was imported or was already there,
/// 1 when one was skipped.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    let found = match &args.source {
        Source::Certbot { dir } => import::certbot::read(dir)?,
        Source::Caddy { dir } => import::caddy::read(dir)?,
        Source::Traefik { file } => import::traefik::read(file, &global.acme_config()?.directory)?,
    };
    let spec = global.store_spec()?;
    let options = ImportOptions::new()
        .dry_run(args.dry_run)
        .replace(args.replace);
    // A dry run creates no store directory: without one, everything would be new.
    let report = match spec.dir() {
        Some(dir) if args.dry_run && !dir.exists() => import::preview_into_empty(found).await,
        _ => import::apply(found, spec.open().await?.as_ref(), options).await,
    };
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::config(format!("cannot encode JSON: {e}")))?;
        println!("{text}");
    } else {
        for entry in &report {
            print_entry(entry);
        }
    }
    let failed = report
        .iter()
        .any(|e| e.kind == EntryKind::Certificate && e.result == ImportResult::Skipped);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One line per entry; skipped ones on stderr.
fn print_entry(entry: &ImportEntry) {
    let what = match entry.kind {
        EntryKind::Certificate => "certificate",
        _ => "account",
    };
    let name = entry.name.as_deref().unwrap_or("?");
    match entry.result {
        ImportResult::Skipped => eprintln!(
            "lobe-tls: skipped {what} {}: {}",
            entry.source,
            entry.reason.as_deref().unwrap_or("unusable")
        ),
        ImportResult::Exists => println!(
            "exists {what} {name} (from {}): {}",
            entry.source,
            entry.reason.as_deref().unwrap_or("already in the store")
        ),
        result => {
            let mut line = format!("{} {what} {name} (from {})", result.as_str(), entry.source);
            if !entry.domains.is_empty() {
                line.push_str(&format!(": {}", entry.domains.join(", ")));
            }
            let mut facts = Vec::new();
            if let Some(serial) = &entry.serial {
                facts.push(format!("serial {serial}"));
            }
            if let Some(challenge) = &entry.challenge {
                facts.push(challenge.clone());
            }
            if !facts.is_empty() {
                line.push_str(&format!(" ({})", facts.join(", ")));
            }
            println!("{line}");
            for note in &entry.notes {
                println!("  note: {note}");
            }
        }
    }
}

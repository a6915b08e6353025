//! `lobe-tls store copy --from SRC --to DST`: moves certificates, keys, accounts and
//! renewal state between a directory store and Redis, either way.

use std::process::ExitCode;

use clap::Subcommand;
use lobe_tls::{Error, Result};

use lobe_tls::store::StoreSpec;

use crate::global::Global;

/// Options of `lobe-tls store`. No `Debug`: store URLs can hold passwords.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: StoreCommand,
}

/// What to do with a store.
#[derive(Subcommand)]
pub enum StoreCommand {
    /// Copy every certificate, account and renewal state from one store to another.
    Copy(CopyArgs),
}

/// Options of `lobe-tls store copy`.
#[derive(clap::Args)]
pub struct CopyArgs {
    /// The store to read: a directory or redis://... (only read, never changed).
    #[arg(long)]
    pub from: String,
    /// The store to write: a directory (created if missing) or redis://...; entries with
    /// the same names are replaced.
    #[arg(long)]
    pub to: String,
    /// Print what was copied as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub async fn run(_global: &Global, args: &Args) -> Result<ExitCode> {
    match &args.command {
        StoreCommand::Copy(copy) => run_copy(copy).await,
    }
}

async fn run_copy(args: &CopyArgs) -> Result<ExitCode> {
    if args.from == args.to {
        return Err(Error::config(
            "--from and --to name the same store; give two different stores",
        ));
    }
    // A mistyped source directory must not read as an empty store.
    let from = StoreSpec::parse(&args.from)?;
    if let Some(dir) = from.dir()
        && !dir.is_dir()
    {
        return Err(Error::config(format!(
            "--from {from} does not exist or is not a directory"
        )));
    }
    let to = StoreSpec::parse(&args.to)?;
    let from = from.open().await?;
    let to = to.open().await?;
    let report = lobe_tls::store::copy(from.as_ref(), to.as_ref()).await?;
    if args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::config(format!("cannot encode JSON: {e}")))?;
        println!("{json}");
    } else {
        println!(
            "copied {} certificates, {} accounts, {} renewal states",
            report.certs, report.accounts, report.renewal_states
        );
    }
    Ok(ExitCode::SUCCESS)
}

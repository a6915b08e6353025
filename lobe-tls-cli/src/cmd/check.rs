//! `lobe-tls check`: the monitoring probe.
//!
//! Exit 0 when every certificate is fine, 1 when one is inside the warning window, 2 when
//! one is expired, unreadable, has a key that does not match, or is past its renewal
//! time. A store that cannot be read at all is also 2: a probe must never look fine
//! because it could not look.

use std::process::ExitCode;

use lobe_tls::Result;
use lobe_tls::inventory::{check_exit_code, inventory};

use crate::global::Global;

/// Options of `lobe-tls check`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Warn (exit 1) when a certificate expires within this many days.
    /// Default: 14, capped at a third of the certificate's lifetime.
    #[arg(long, value_name = "N")]
    pub warn_days: Option<u32>,

    /// Print the reports as a JSON array.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    match probe(global, args).await {
        Ok(code) => Ok(ExitCode::from(code)),
        Err(e) => {
            eprintln!("lobe-tls: error: {}", crate::one_line(&e.to_string()));
            Ok(ExitCode::from(2))
        }
    }
}

async fn probe(global: &Global, args: &Args) -> Result<u8> {
    let store = global.open_existing_store().await?;
    let warn = args.warn_days.map(|d| time::Duration::days(d.into()));
    let reports = inventory(store.as_ref(), warn, time::OffsetDateTime::now_utc()).await?;
    if args.json {
        println!("{}", super::list::to_json(&reports)?);
    } else if reports.is_empty() {
        println!("no certificates");
    } else {
        for r in &reports {
            match (&r.error, &r.not_after) {
                (Some(error), _) => println!("{}: {}: {error}", r.name, r.status.as_str()),
                (None, Some(not_after)) => println!(
                    "{}: {} (expires {not_after}, renew after {})",
                    r.name,
                    r.status.as_str(),
                    r.renew_after.as_deref().unwrap_or("-")
                ),
                (None, None) => println!("{}: {}", r.name, r.status.as_str()),
            }
        }
    }
    Ok(check_exit_code(&reports))
}

//! `lobe-tls list`: the stored certificates, as a table or JSON.

use std::process::ExitCode;

use lobe_tls::inventory::{CertReport, inventory};
use lobe_tls::{Error, Result};

use crate::global::Global;

/// Options of `lobe-tls list`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    let store = global.open_existing_store().await?;
    let reports = inventory(store.as_ref(), None, time::OffsetDateTime::now_utc()).await?;
    if args.json {
        println!("{}", to_json(&reports)?);
    } else {
        print!("{}", table(&reports));
    }
    Ok(ExitCode::SUCCESS)
}

/// The reports as a pretty JSON array.
pub fn to_json(reports: &[CertReport]) -> Result<String> {
    serde_json::to_string_pretty(reports)
        .map_err(|e| Error::config(format!("cannot encode JSON: {e}")))
}

/// The reports as a plain-text table, one row per certificate.
pub fn table(reports: &[CertReport]) -> String {
    if reports.is_empty() {
        return "no certificates\n".to_owned();
    }
    let header = [
        "NAME",
        "STATUS",
        "NOT AFTER",
        "RENEW AFTER",
        "KEY",
        "SERIAL",
        "DOMAINS",
    ];
    let rows: Vec<[String; 7]> = reports
        .iter()
        .map(|r| {
            let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let domains = match &r.error {
                Some(error) => error.clone(),
                None => r.domains.join(","),
            };
            [
                r.name.clone(),
                r.status.as_str().to_owned(),
                or_dash(&r.not_after),
                or_dash(&r.renew_after),
                r.key_type.map_or("-".into(), |k| k.to_string()),
                or_dash(&r.serial),
                domains,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

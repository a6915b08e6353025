//! `lobe-tls renew`: renew every stored certificate that is due, for cron or a systemd
//! timer. The policy is the manager's (ARI window when the CA offers it, otherwise 1/3
//! of the lifetime left, 1/2 under 10 days; backoff after failures), and so is the
//! ordering path: store lock, re-check, order, validate, store atomically. Two runs at
//! once never order the same certificate twice.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use lobe_tls::cert::rfc3339;
use lobe_tls::manager::{ManagedCert, Manager, RenewOutcome};
use lobe_tls::{CertMeta, ChallengeConfig, Error, Result};
use time::OffsetDateTime;

use crate::global::Global;

/// Options of `lobe-tls renew`. No `Debug`: the deploy hook can hold a secret.
#[derive(clap::Args)]
pub struct Args {
    /// Renew only this certificate; repeat for more. Default: every stored certificate.
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,

    /// Renew even if not due.
    #[arg(long)]
    pub force: bool,

    /// Wait a random time up to this many seconds first, so that many machines' cron
    /// jobs do not hit the CA at the same moment.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub jitter: u64,

    /// Run this shell command once per renewed certificate, with LOBE_TLS_NAME,
    /// LOBE_TLS_DOMAINS (space-separated), LOBE_TLS_CERT_PATH, LOBE_TLS_KEY_PATH and
    /// LOBE_TLS_FULLCHAIN_PATH set (the paths only for a directory store).
    #[arg(
        long,
        value_name = "CMD",
        env = "LOBE_TLS_DEPLOY_HOOK",
        hide_env_values = true
    )]
    pub deploy_hook: Option<String>,

    /// Answer HTTP-01 through the web server that serves DIR for the certificates renewed
    /// now (see `issue --http-webroot`); recorded with them for later renewals.
    #[arg(long, env = "LOBE_TLS_HTTP_WEBROOT", value_name = "DIR")]
    pub http_webroot: Option<std::path::PathBuf>,

    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,

    /// TOML file with the fallback CAs' settings (`[[ca]]` tables, see the README).
    #[arg(long = "config", env = "LOBE_TLS_CONFIG", value_name = "FILE")]
    pub config_file: Option<std::path::PathBuf>,
}

/// What happened to one certificate.
#[derive(Debug, serde::Serialize)]
struct RenewResult {
    name: String,
    /// renewed, renewed-elsewhere, not-due, failed
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    due_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl RenewResult {
    fn new(name: &str, result: &'static str) -> Self {
        RenewResult {
            name: name.to_owned(),
            result,
            serial: None,
            not_after: None,
            due_at: None,
            error: None,
        }
    }

    fn failed(name: &str, error: impl ToString) -> Self {
        RenewResult {
            error: Some(error.to_string()),
            ..RenewResult::new(name, "failed")
        }
    }
}

/// Runs the command.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    let store = global.open_existing_store().await?;
    // A renewal writes the store: one this user cannot write fails here, in one line,
    // before anything is ordered.
    store.check_writable().await?;
    let base = global.acme_config_with_fallbacks(args.config_file.as_deref(), &[])?;
    let chain = lobe_tls::acme::CaChain::new(&base);
    if args.jitter > 0 {
        let secs = rand::random_range(0..=args.jitter);
        tracing::info!(secs, "waiting before renewing (--jitter)");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }

    let names = if args.names.is_empty() {
        store.list_certs().await?
    } else {
        args.names.clone()
    };
    let webroot = match &args.http_webroot {
        Some(dir) => Some(crate::challenge_args::absolute_webroot(dir)?),
        None => None,
    };
    let mut results = Vec::new();
    // Each certificate renews at the CA it came from: one manager per directory.
    let mut by_directory: BTreeMap<String, Vec<CertMeta>> = BTreeMap::new();
    for name in &names {
        match store.load_cert(name).await {
            // A certificate from any CA of the chain renews through the chain, primary
            // first, so one that came from a fallback goes back to the primary.
            Ok(Some(stored)) => by_directory
                .entry(if chain.contains(&stored.meta.directory) {
                    base.directory.clone()
                } else {
                    stored.meta.directory.clone()
                })
                .or_default()
                .push(stored.meta),
            Ok(None) => results.push(RenewResult::failed(
                name,
                format!("no certificate named {name:?} in the store; see lobe-tls list"),
            )),
            Err(e) => results.push(RenewResult::failed(name, e)),
        }
    }
    for (directory, metas) in by_directory {
        let mut acme = base.clone();
        if directory != base.directory {
            // A CA outside the chain: renewed there, without fallbacks.
            acme.directory = directory;
            acme.fallbacks.clear();
        }
        let mut builder = Manager::builder(acme, store.clone());
        for meta in &metas {
            let mut cert = ManagedCert::from_meta(meta);
            if let Some(dir) = &webroot {
                cert = cert.with_challenge(ChallengeConfig::http01_webroot(dir));
            }
            builder = builder.cert(cert);
        }
        let manager = builder.build()?;
        for meta in &metas {
            let result = renew_one(&manager, &meta.name, args.force).await;
            let result = match (&result, &args.deploy_hook) {
                (r, Some(hook)) if r.result == "renewed" => {
                    match run_hook(hook, global, meta).await {
                        Ok(()) => result,
                        Err(e) => RenewResult {
                            result: "failed",
                            error: Some(format!("renewed, but the deploy hook failed: {e}")),
                            ..result
                        },
                    }
                }
                _ => result,
            };
            results.push(result);
        }
    }

    let failed = results.iter().filter(|r| r.result == "failed").count();
    if args.json {
        let text = serde_json::to_string_pretty(&results)
            .map_err(|e| Error::config(format!("cannot encode JSON: {e}")))?;
        println!("{text}");
    } else {
        for r in &results {
            match r.result {
                "renewed" => println!(
                    "{}: renewed (serial {}, valid until {})",
                    r.name,
                    r.serial.as_deref().unwrap_or("?"),
                    r.not_after.as_deref().unwrap_or("?")
                ),
                "renewed-elsewhere" => println!(
                    "{}: already renewed by another process (serial {})",
                    r.name,
                    r.serial.as_deref().unwrap_or("?")
                ),
                "not-due" => println!(
                    "{}: not due until {}",
                    r.name,
                    r.due_at.as_deref().unwrap_or("?")
                ),
                _ => eprintln!(
                    "lobe-tls: error: {}: {}",
                    r.name,
                    r.error.as_deref().unwrap_or("failed")
                ),
            }
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn renew_one(manager: &Manager, name: &str, force: bool) -> RenewResult {
    // An expired or broken stored certificate cannot be loaded; it counts as missing,
    // which is due.
    if let Err(e) = manager.reload(name).await {
        tracing::warn!(cert = %name, error = %e, "stored certificate unusable; renewing it");
    }
    let now = OffsetDateTime::now_utc();
    let due_at = manager.due_at(name).await;
    if !force && due_at.is_some_and(|t| t > now) {
        return RenewResult {
            due_at: due_at.map(rfc3339),
            ..RenewResult::new(name, "not-due")
        };
    }
    match manager.renew_now(name).await {
        Ok(RenewOutcome::Ordered { info, .. }) => RenewResult {
            serial: Some(info.serial),
            not_after: Some(rfc3339(info.not_after)),
            ..RenewResult::new(name, "renewed")
        },
        Ok(RenewOutcome::RenewedElsewhere { info }) => RenewResult {
            serial: Some(info.serial),
            not_after: Some(rfc3339(info.not_after)),
            ..RenewResult::new(name, "renewed-elsewhere")
        },
        Ok(_) => RenewResult::new(name, "renewed"),
        Err(e) => RenewResult::failed(name, e),
    }
}

/// Runs the deploy hook through `sh -c` with the certificate's facts in the environment.
async fn run_hook(hook: &str, global: &Global, meta: &CertMeta) -> Result<()> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(hook);
    cmd.env("LOBE_TLS_NAME", &meta.name);
    let domains: Vec<&str> = meta.domains.iter().map(|d| d.as_str()).collect();
    cmd.env("LOBE_TLS_DOMAINS", domains.join(" "));
    if let Some(live) = global.live_dir(&meta.name) {
        cmd.env("LOBE_TLS_CERT_PATH", live.join("cert.pem"));
        cmd.env("LOBE_TLS_KEY_PATH", live.join("privkey.pem"));
        cmd.env("LOBE_TLS_FULLCHAIN_PATH", live.join("fullchain.pem"));
    }
    // The messages do not repeat the command: it can hold a secret (a token for curl).
    let status = cmd
        .status()
        .await
        .map_err(|e| Error::config(format!("cannot run the --deploy-hook command: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::config(format!(
            "the --deploy-hook command exited with {status}"
        )))
    }
}

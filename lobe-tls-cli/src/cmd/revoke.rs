//! `lobe-tls revoke`: ask the CA to revoke a stored certificate.

use std::process::ExitCode;

use clap::ValueEnum;
use lobe_tls::cert::rfc3339;
use lobe_tls::{AcmeClient, Error, Result, StoreErrorKind};

use crate::global::Global;

/// Why a certificate is revoked (RFC 5280 reason codes that ACME CAs accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Reason {
    /// No reason given.
    Unspecified,
    /// The private key was exposed.
    KeyCompromise,
    /// The names are no longer yours.
    AffiliationChanged,
    /// A newer certificate replaces it.
    Superseded,
    /// The names are no longer in use.
    CessationOfOperation,
}

impl Reason {
    fn to_acme(self) -> lobe_tls::acme::RevocationReason {
        use lobe_tls::acme::RevocationReason as R;
        match self {
            Reason::Unspecified => R::Unspecified,
            Reason::KeyCompromise => R::KeyCompromise,
            Reason::AffiliationChanged => R::AffiliationChanged,
            Reason::Superseded => R::Superseded,
            Reason::CessationOfOperation => R::CessationOfOperation,
        }
    }
}

/// Options of `lobe-tls revoke`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The stored certificate to revoke.
    #[arg(long)]
    pub name: String,

    /// Why.
    #[arg(long, value_enum, default_value = "unspecified")]
    pub reason: Reason,

    /// TOML file with the fallback CAs' settings (`[[ca]]` tables), for a certificate
    /// that came from a fallback CA.
    #[arg(long = "config", env = "LOBE_TLS_CONFIG", value_name = "FILE")]
    pub config_file: Option<std::path::PathBuf>,
}

/// Runs the command. The certificate stays in the store, recorded as revoked: `check`
/// reports it, and the next `lobe-tls renew` (or a manager's next start) replaces it.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    let store = global.open_existing_store().await?;
    let stored = store.load_cert(&args.name).await?.ok_or_else(|| {
        Error::config(format!(
            "no certificate named {:?} in the store; see lobe-tls list",
            args.name
        ))
    })?;
    // Revoke at the CA that issued it, with this account.
    let base = global.acme_config_with_fallbacks(args.config_file.as_deref(), &[])?;
    // A fallback CA's account, EAB and trust root, if it came from one.
    let mut acme = match base
        .fallbacks
        .iter()
        .find(|f| f.directory == stored.meta.directory)
    {
        Some(fallback) => fallback.clone(),
        None => base,
    };
    acme.directory = stored.meta.directory.clone();
    let client = AcmeClient::connect(&acme, store.as_ref()).await?;
    client.revoke(&stored.bundle, args.reason.to_acme()).await?;
    let info = stored.bundle.info()?;
    // Recorded, so that `check` reports it and the next renewal replaces it at once.
    let mut state = store
        .load_renewal_state(&args.name)
        .await
        .unwrap_or_default();
    state.revoked_serial = Some(info.serial.clone());
    if let Err(e) = store.save_renewal_state(&args.name, &state).await {
        return Err(Error::store(
            None,
            StoreErrorKind::Write,
            format!(
                "{} was revoked at the CA, but recording it failed ({e}); replace it with: lobe-tls renew --name {} --force",
                args.name, args.name
            ),
        ));
    }
    println!(
        "revoked {} (serial {}, was valid until {}); it is due for renewal now: lobe-tls renew --name {} replaces it",
        args.name,
        info.serial,
        rfc3339(info.not_after),
        args.name
    );
    Ok(ExitCode::SUCCESS)
}

//! `lobe-tls issue`: order one certificate and store it.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lobe_tls::acme::{CaChain, ProgressFn};
use lobe_tls::challenge::ChallengeConfig;
use lobe_tls::inventory::CertReport;
use lobe_tls::issue::{Issuance, IssueRequest};
use lobe_tls::{ChallengeKind, Error, Http01Listener, Http01Registry, KeyType, Result, domain};

use crate::challenge_args::ChallengeArgs;
use crate::global::Global;
use crate::profile_args::ProfileArgs;

/// Options of `lobe-tls issue`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The certificate's name in the store. Default: the first domain, with `*` as `_`.
    #[arg(long)]
    pub name: Option<String>,

    /// A name for the certificate; repeat for more. The first is the main name.
    #[arg(short = 'd', long = "domain", required = true, value_name = "DOMAIN")]
    pub domains: Vec<String>,

    /// Key type: ecdsa-p256, ecdsa-p384, rsa2048, rsa3072 or rsa4096.
    #[arg(long, env = "LOBE_TLS_KEY_TYPE", default_value = "ecdsa-p256")]
    pub key_type: KeyType,

    /// Print the stored certificate's facts as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub challenge: ChallengeArgs,

    #[command(flatten)]
    pub profile: ProfileArgs,
}

/// How long to wait for another process that is issuing the same name.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Runs the command. Everything that can fail locally (names, flags, the listen port)
/// fails before the CA is contacted; the store is written only after success.
pub async fn run(global: &Global, args: &Args) -> Result<ExitCode> {
    let domains = domain::parse_all(&args.domains)?;
    let mut challenge = args.challenge.to_config()?;
    if challenge.kind == lobe_tls::ChallengeKind::TlsAlpn01 && challenge.tls_listen.is_none() {
        // Standalone, like http-01's default: the CA validates on port 443.
        challenge.tls_listen = Some("0.0.0.0:443".into());
    }
    let profile = args
        .profile
        .resolve(args.challenge.config_file.as_deref())?;
    let mut request = IssueRequest::new(domains, args.key_type, challenge).with_profile(profile);
    if let Some(name) = &args.name {
        request.name = name.clone();
    }
    let acme = global.acme_config_with_fallbacks(
        args.challenge.config_file.as_deref(),
        &args.challenge.dns_recursive,
    )?;
    let spec = global.store_spec()?;
    // Local errors (names, flags, a busy port) come before the store is created.
    request.validate()?;
    let (issuance, store, _http_listener) = match &request.challenge {
        // With a shared store, the standalone listener's tokens go there too, so that any
        // `lobe-tls serve` instance sharing it answers, wherever the CA's request lands.
        ChallengeConfig {
            kind: ChallengeKind::Http01,
            http_listen: Some(addr),
            ..
        } if spec.is_redis() => {
            let store = spec.open().await?;
            let registry = Http01Registry::with_shared_store(store.clone())?;
            let addr = addr
                .parse()
                .map_err(|_| Error::config(format!("--http-listen {addr:?} is not an address")))?;
            let listener = Http01Listener::bind(addr, registry.service()).await?;
            let issuance = Issuance::prepare(request, Some(registry)).await?;
            (issuance, store, Some(listener))
        }
        _ => {
            let issuance = Issuance::prepare(request, None).await?;
            (issuance, spec.open().await?, None)
        }
    };
    let name = issuance.request().name.clone();
    let lock = lobe_tls::issue::lock_name(store.as_ref(), &name, LOCK_WAIT).await?;

    let progress = progress_printer(args.json);
    if let Some(say) = &progress {
        say(&format!("connecting to {}", acme.directory));
    }
    let issued = async {
        // The primary CA first, then each fallback while the one before fails.
        CaChain::new(&acme)
            .issue(&issuance, store.as_ref(), Some(lock.as_ref()), progress)
            .await
    }
    .await;
    // Released here, not on drop: the process exits next, and a release left to a
    // background task would leave a shared store's lock held for its whole lease.
    if let Err(e) = lock.release().await {
        tracing::warn!(cert = %name, error = %e, "cannot release the store lock; it expires with its lease");
    }
    let stored = issued?;

    let state = store.load_renewal_state(&name).await.unwrap_or_default();
    let report = CertReport::of(&stored, &state, None, time::OffsetDateTime::now_utc());
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| lobe_tls::Error::config(format!("cannot encode JSON: {e}")))?;
        println!("{text}");
    } else {
        println!(
            "issued {name}: {} (valid until {}, serial {})",
            report.domains.join(", "),
            report.not_after.as_deref().unwrap_or("?"),
            report.serial.as_deref().unwrap_or("?"),
        );
        if let Some(dir) = spec.live_dir(&name) {
            println!("files: {}", dir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Progress lines on stderr, only for a person watching a terminal.
fn progress_printer(json: bool) -> Option<ProgressFn> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    Some(Arc::new(|message: &str| eprintln!("lobe-tls: {message}")))
}

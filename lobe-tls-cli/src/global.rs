//! Options every command takes, each also readable from its environment variable.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use lobe_tls::store::{DynStore, StoreSpec};
use lobe_tls::{AcmeConfig, Eab, Error, Result};

/// Global options.
///
/// `Debug` is written by hand: the store URL can hold a password, and the EAB HMAC key
/// is a secret. Options that can carry a secret hide their environment value in `--help`.
#[derive(Args, Clone)]
pub struct Global {
    /// Where certificates live: a directory, or a Redis URL for a cluster, such as
    /// redis://:PASSWORD@HOST:6379/0 (rediss:// for TLS). Prefer the env var for a URL
    /// with a password: the command line shows in ps.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_STORE",
        hide_env_values = true,
        default_value = "/var/lib/lobe-tls",
        help_heading = "Certificates"
    )]
    pub store: String,

    /// ACME directory: a URL, letsencrypt or letsencrypt-staging.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_DIRECTORY",
        hide_env_values = true,
        default_value = "letsencrypt",
        help_heading = "ACME"
    )]
    pub directory: String,

    /// Extra trust root (PEM) for the ACME server's own HTTPS, e.g. Pebble's.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_DIRECTORY_CA",
        help_heading = "ACME"
    )]
    pub directory_ca: Option<PathBuf>,

    /// Contact email for the ACME account.
    #[arg(long, global = true, env = "LOBE_TLS_EMAIL", help_heading = "ACME")]
    pub email: Option<String>,

    /// External Account Binding key id.
    #[arg(long, global = true, env = "LOBE_TLS_EAB_KID", help_heading = "ACME")]
    pub eab_kid: Option<String>,

    /// External Account Binding HMAC key (base64url). Prefer the env var: the command line shows in ps.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_EAB_HMAC_KEY",
        hide_env_values = true,
        help_heading = "ACME"
    )]
    pub eab_hmac_key: Option<String>,

    /// A CA to order from when the one before fails for reasons of its own (unreachable,
    /// no answer in time, 5xx, rateLimited, paused); repeat for more, tried in order.
    /// Its EAB and trust root come from a `[[ca]]` table of the --config file.
    #[arg(
        long = "fallback-directory",
        global = true,
        env = "LOBE_TLS_FALLBACK_DIRECTORY",
        hide_env_values = true,
        value_delimiter = ',',
        value_name = "URL",
        help_heading = "ACME"
    )]
    pub fallback_directories: Vec<String>,

    /// Recursive resolver (IP:PORT, repeatable) for the CAA check before each order.
    /// Default: --dns-recursive if given, else the system's (/etc/resolv.conf).
    #[arg(
        long = "caa-resolver",
        global = true,
        env = "LOBE_TLS_CAA_RESOLVER",
        value_delimiter = ',',
        value_name = "IP:PORT",
        help_heading = "ACME"
    )]
    pub caa_resolvers: Vec<SocketAddr>,

    /// Skip the CAA check before ordering (the CA still checks CAA).
    #[arg(long, global = true, help_heading = "ACME")]
    pub no_caa_check: bool,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive). Default:
    /// info for serve (one line per listener and site at start, what a reload changed,
    /// issuance and renewals), warn for the other commands.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_LOG",
        help_heading = "Logging and admin"
    )]
    pub log: Option<String>,

    /// This process's own log lines: text for people, or one JSON object per line for a
    /// collector (Loki, ELK) that takes the access log too.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_LOG_FORMAT",
        value_name = "text|json",
        default_value = "text",
        value_parser = ["text", "json"],
        help_heading = "Logging and admin"
    )]
    pub log_format: String,
}

impl Global {
    /// The ACME settings these options describe.
    pub fn acme_config(&self) -> Result<AcmeConfig> {
        let mut config = AcmeConfig::new(lobe_tls::acme::resolve_directory(&self.directory)?);
        config.directory_ca = self.directory_ca.clone();
        config.email = self.email.clone();
        config.eab = match (&self.eab_kid, &self.eab_hmac_key) {
            (Some(kid), Some(hmac)) => Some(Eab {
                kid: kid.clone(),
                hmac_key_b64: hmac.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(Error::config(
                    "--eab-kid and --eab-hmac-key go together: give both or neither",
                ));
            }
        };
        config.caa.disabled = self.no_caa_check;
        config.caa.resolvers = self.caa_resolvers.clone();
        Ok(config)
    }

    /// [`Global::acme_config`] with the fallback CAs (`--fallback-directory`, `[[ca]]`
    /// tables of `config_file`), and `dns_recursive` for the CAA check unless
    /// `--caa-resolver` was given.
    pub fn acme_config_with_fallbacks(
        &self,
        config_file: Option<&Path>,
        dns_recursive: &[SocketAddr],
    ) -> Result<AcmeConfig> {
        let mut config = self.acme_config()?;
        if config.caa.resolvers.is_empty() {
            config.caa.resolvers = dns_recursive.to_vec();
        }
        config.fallbacks =
            lobe_tls::acme::fallbacks_from(&config, &self.fallback_directories, config_file)?;
        Ok(config)
    }

    /// The store `--store` names; its `Display` hides a URL's password.
    pub fn store_spec(&self) -> Result<StoreSpec> {
        StoreSpec::parse(&self.store)
    }

    /// The directory a web server reads for certificate `name`, for a directory store.
    pub fn live_dir(&self, name: &str) -> Option<PathBuf> {
        self.store_spec().ok()?.live_dir(name)
    }

    /// Opens the store named by `--store` for reading: a directory must exist already, so
    /// a mistyped path is an error rather than a new empty store.
    pub async fn open_existing_store(&self) -> Result<DynStore> {
        self.store_spec()?.open_existing().await
    }
}

/// Shows the options with the store's password and the EAB key hidden.
impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spec = self.store_spec().map(|s| s.to_string());
        f.debug_struct("Global")
            .field("store", &spec.as_deref().unwrap_or("<unparsable>"))
            .field("directory", &lobe_tls::store::redact_url(&self.directory))
            .field("directory_ca", &self.directory_ca)
            .field("email", &self.email)
            .field("eab_kid", &self.eab_kid)
            .field(
                "eab_hmac_key",
                &self.eab_hmac_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "fallback_directories",
                &self
                    .fallback_directories
                    .iter()
                    .map(|d| lobe_tls::store::redact_url(d))
                    .collect::<Vec<_>>(),
            )
            .field("caa_resolvers", &self.caa_resolvers)
            .field("no_caa_check", &self.no_caa_check)
            .field("log", &self.log)
            .finish()
    }
}

/// Logs go to stderr, filtered by `--log`, coloured only on a terminal (journald and log
/// files get plain text). A filter that does not parse is an error, not a silent default.
///
/// No dependency's target is filtered out: at `trace`, none of them (rustls, hyper-util,
/// hickory, redis-rs) logs a credential. `tests/secrets.rs` plants secrets and checks
/// the trace logs, so one that starts to would be caught there.
///
/// Without `--log`, redis-rs says only errors: its cluster client warns once per node it
/// cannot reach, while lobe-tls reports the same outage once, in its own words.
pub fn init_logging(global: &Global, default: &str) -> Result<()> {
    let default = format!("{default},redis=error");
    let log = global.log.as_deref().unwrap_or(&default);
    let filter = tracing_subscriber::EnvFilter::try_new(log).map_err(|e| {
        Error::config_key(
            "--log",
            format!(
                "--log {log:?} is not a log filter ({e}); use a level such as info or debug, or a directive such as lobe_tls=debug"
            ),
        )
        .with_source(e)
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if global.log_format == "json" {
        // One object per line: timestamp, level, target, message and fields.
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    Ok(())
}

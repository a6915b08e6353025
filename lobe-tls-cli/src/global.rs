//! Options every command takes, each also readable from its environment variable.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use lobe_tls::store::DynStore;
use lobe_tls::{AcmeConfig, Eab, Error, FileStore, RedisStore, Result};

/// Global options.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Where certificates live: a directory, or redis://host:port/ for a cluster.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_STORE",
        default_value = "/var/lib/lobe-tls"
    )]
    pub store: String,

    /// ACME directory: a URL, letsencrypt or letsencrypt-staging.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_DIRECTORY",
        default_value = "letsencrypt"
    )]
    pub directory: String,

    /// Extra trust root (PEM) for the ACME server's own HTTPS, e.g. Pebble's.
    #[arg(long, global = true, env = "LOBE_TLS_DIRECTORY_CA")]
    pub directory_ca: Option<PathBuf>,

    /// Contact email for the ACME account.
    #[arg(long, global = true, env = "LOBE_TLS_EMAIL")]
    pub email: Option<String>,

    /// External Account Binding key id.
    #[arg(long, global = true, env = "LOBE_TLS_EAB_KID")]
    pub eab_kid: Option<String>,

    /// External Account Binding HMAC key (base64url). Prefer the env var: the command line shows in ps.
    #[arg(
        long,
        global = true,
        env = "LOBE_TLS_EAB_HMAC_KEY",
        hide_env_values = true
    )]
    pub eab_hmac_key: Option<String>,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, env = "LOBE_TLS_LOG", default_value = "warn")]
    pub log: String,
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
                return Err(Error::Config(
                    "--eab-kid and --eab-hmac-key go together: give both or neither".into(),
                ));
            }
        };
        Ok(config)
    }

    fn is_redis(&self) -> bool {
        is_redis_url(&self.store)
    }

    /// The directory a web server reads for certificate `name`, for a file store.
    pub fn live_dir(&self, name: &str) -> Option<PathBuf> {
        (!self.is_redis()).then(|| PathBuf::from(&self.store).join("live").join(name))
    }

    /// Opens the store named by `--store` for reading: a directory must exist already, so
    /// a mistyped path is an error rather than a new empty store.
    pub async fn open_existing_store(&self) -> Result<DynStore> {
        if !self.is_redis() && !std::path::Path::new(&self.store).is_dir() {
            return Err(Error::Config(format!(
                "store {} does not exist or is not a directory; check --store (env LOBE_TLS_STORE)",
                self.store
            )));
        }
        self.open_store().await
    }

    /// Opens the store named by `--store`, creating a directory store if needed.
    pub async fn open_store(&self) -> Result<DynStore> {
        open_store_at(&self.store).await
    }
}

/// Whether `spec` names a Redis store rather than a directory.
pub fn is_redis_url(spec: &str) -> bool {
    spec.starts_with("redis://")
        || spec.starts_with("rediss://")
        || spec.starts_with("redis+sentinel://")
        || spec.starts_with("rediss+sentinel://")
}

/// Opens a store from a `--store`-style value: a `redis://` or `rediss://` URL (checked
/// by a PING, so a wrong URL fails here with a clear message), or a directory, created
/// if missing.
pub async fn open_store_at(spec: &str) -> Result<DynStore> {
    if is_redis_url(spec) {
        return Ok(Arc::new(RedisStore::connect(spec).await?));
    }
    Ok(Arc::new(FileStore::open(spec)?))
}

/// Logs go to stderr, filtered by `--log`, coloured only on a terminal (journald and log
/// files get plain text). A filter that does not parse is an error, not a silent default.
pub fn init_logging(global: &Global) -> std::result::Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&global.log).map_err(|e| {
        format!(
            "--log {:?} is not a log filter ({e}); use a level such as info or debug, or a directive such as lobe_tls=debug",
            global.log
        )
    })?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    Ok(())
}

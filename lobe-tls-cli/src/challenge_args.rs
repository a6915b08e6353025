//! Challenge options shared by `issue` and `serve`, turned into a library `ChallengeConfig`.

use std::net::SocketAddr;

use clap::{Args, ValueEnum};
use lobe_tls::challenge::{ChallengeConfig, ChallengeKind, DnsConfig, DnsProviderConfig};
use lobe_tls::{Error, Result};

/// The DNS providers the CLI knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DnsProviderName {
    /// Run a program as lego's exec provider does: PROG present|cleanup FQDN VALUE.
    Exec,
    /// Pebble's test DNS server, through its management API.
    Challtestsrv,
}

/// How to validate the names.
#[derive(Args, Debug, Clone)]
pub struct ChallengeArgs {
    /// Challenge type: http-01, dns-01 (needed for wildcards) or tls-alpn-01.
    #[arg(long, env = "LOBE_TLS_CHALLENGE", default_value = "http-01")]
    pub challenge: ChallengeKind,

    /// Address of the standalone HTTP-01 listener.
    #[arg(long, env = "LOBE_TLS_HTTP_LISTEN", default_value = "0.0.0.0:80")]
    pub http_listen: String,

    /// Address of the standalone TLS-ALPN-01 listener (port 443 must reach it), for
    /// --challenge tls-alpn-01.
    #[arg(long, env = "LOBE_TLS_TLS_LISTEN")]
    pub tls_listen: Option<String>,

    /// DNS provider for dns-01.
    #[arg(long, env = "LOBE_TLS_DNS_PROVIDER")]
    pub dns_provider: Option<DnsProviderName>,

    /// Program for --dns-provider exec.
    #[arg(long, env = "LOBE_TLS_DNS_EXEC")]
    pub dns_exec: Option<String>,

    /// Management API URL for --dns-provider challtestsrv.
    #[arg(long, env = "LOBE_TLS_CHALLTESTSRV")]
    pub challtestsrv: Option<String>,

    /// Resolver (IP:PORT) for the propagation check; repeatable. Default: the system's.
    #[arg(
        long = "dns-resolver",
        env = "LOBE_TLS_DNS_RESOLVER",
        value_delimiter = ','
    )]
    pub dns_resolvers: Vec<SocketAddr>,

    /// Seconds to wait for a DNS-01 record to become visible.
    #[arg(long, env = "LOBE_TLS_PROPAGATION_TIMEOUT", default_value_t = 120)]
    pub propagation_timeout: u64,

    /// Skip the DNS propagation check.
    #[arg(long, env = "LOBE_TLS_NO_PROPAGATION_CHECK")]
    pub no_propagation_check: bool,
}

impl ChallengeArgs {
    /// The library configuration these options describe, with their combinations checked.
    pub fn to_config(&self) -> Result<ChallengeConfig> {
        let mut config = ChallengeConfig {
            kind: self.challenge,
            ..ChallengeConfig::default()
        };
        match self.challenge {
            ChallengeKind::Http01 => config.http_listen = Some(self.http_listen.clone()),
            ChallengeKind::Dns01 => config.dns = Some(self.dns_config()?),
            ChallengeKind::TlsAlpn01 => config.tls_listen = self.tls_listen.clone(),
            _ => {}
        }
        Ok(config)
    }

    fn dns_config(&self) -> Result<DnsConfig> {
        let provider = match self.dns_provider {
            None => {
                return Err(Error::Config(
                    "--challenge dns-01 needs --dns-provider (exec or challtestsrv)".into(),
                ));
            }
            Some(DnsProviderName::Exec) => DnsProviderConfig::Exec {
                program: self.dns_exec.clone().ok_or_else(|| {
                    Error::Config("--dns-provider exec needs --dns-exec PROG".into())
                })?,
            },
            Some(DnsProviderName::Challtestsrv) => DnsProviderConfig::Challtestsrv {
                url: self.challtestsrv.clone().ok_or_else(|| {
                    Error::Config("--dns-provider challtestsrv needs --challtestsrv URL".into())
                })?,
            },
        };
        let mut dns = DnsConfig::new(provider);
        dns.resolvers = self.dns_resolvers.clone();
        dns.propagation_timeout_secs = self.propagation_timeout;
        dns.propagation_check = !self.no_propagation_check;
        Ok(dns)
    }
}

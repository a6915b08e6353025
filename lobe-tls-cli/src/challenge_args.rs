//! Challenge options shared by `issue` and `serve`, turned into a library `ChallengeConfig`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use lobe_tls::challenge::{ChallengeConfig, ChallengeKind, DnsConfig, DnsProviderConfig};
use lobe_tls::{Error, Result};

/// The DNS providers the CLI knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DnsProviderName {
    /// Dynamic DNS UPDATE signed with TSIG (BIND, Knot, PowerDNS, Windows DNS);
    /// settings from LOBE_TLS_RFC2136_* or the rfc2136 table of the --config file.
    Rfc2136,
    /// Cloudflare's API; token from CLOUDFLARE_API_TOKEN or the cloudflare table of the
    /// --config file.
    Cloudflare,
    /// A webhook compatible with lego's httpreq; settings from LOBE_TLS_HTTPREQ_* or the
    /// httpreq table of the --config file.
    Httpreq,
    /// Run a program as lego's exec provider does: PROG present|cleanup FQDN VALUE.
    Exec,
    /// Pebble's test DNS server, through its management API.
    Challtestsrv,
}

/// How to validate the names.
#[derive(Args, Debug, Clone)]
pub struct ChallengeArgs {
    /// Challenge type: http-01, dns-01 (needed for wildcards) or tls-alpn-01 [default:
    /// http-01]. For serve's on-demand names, given, it pins that one; left out, they try
    /// http-01 on --http-listen (or --http-webroot) first and tls-alpn-01 on --listen after.
    #[arg(
        long,
        env = "LOBE_TLS_CHALLENGE",
        value_name = "CHALLENGE",
        help_heading = "ACME"
    )]
    pub challenge: Option<ChallengeKind>,

    /// Address of the standalone HTTP-01 listener.
    #[arg(
        long,
        env = "LOBE_TLS_HTTP_LISTEN",
        default_value = "0.0.0.0:80",
        help_heading = "Listeners"
    )]
    pub http_listen: std::net::SocketAddr,

    /// Answer HTTP-01 through the web server that serves DIR: the token is written to
    /// DIR/.well-known/acme-challenge/ and removed afterwards; no port is bound for it.
    /// Recorded with the certificate, so renewals use it again.
    #[arg(
        long,
        env = "LOBE_TLS_HTTP_WEBROOT",
        value_name = "DIR",
        help_heading = "ACME"
    )]
    pub http_webroot: Option<PathBuf>,

    /// Address of the standalone TLS-ALPN-01 listener (port 443 must reach it), for
    /// --challenge tls-alpn-01 with issue and renew; serve ignores it and answers
    /// TLS-ALPN-01 on --listen.
    #[arg(long, env = "LOBE_TLS_TLS_LISTEN", help_heading = "ACME")]
    pub tls_listen: Option<std::net::SocketAddr>,

    /// DNS provider for dns-01.
    #[arg(long, env = "LOBE_TLS_DNS_PROVIDER", help_heading = "ACME")]
    pub dns_provider: Option<DnsProviderName>,

    /// Program for --dns-provider exec.
    #[arg(long, env = "LOBE_TLS_DNS_EXEC", help_heading = "ACME")]
    pub dns_exec: Option<String>,

    /// Management API URL for --dns-provider challtestsrv.
    #[arg(long, env = "LOBE_TLS_CHALLTESTSRV", help_heading = "ACME")]
    pub challtestsrv: Option<String>,

    /// TOML file with, for serve, the sites: `[[site]]` tables, re-read on SIGHUP, whose
    /// keys include some no flag sets (rise, fall, health_timeout, cookie_name: README,
    /// "Sites"), and `client_prefix_v4`/`client_prefix_v6`; for every command, fallback
    /// CAs (`[[ca]]`), the DNS provider's settings and secrets (tables rfc2136, cloudflare
    /// and httpreq) and a top-level `profile` for --profile. Environment variables and
    /// flags win over it; serve refuses any other top-level key.
    #[arg(
        long = "config",
        env = "LOBE_TLS_CONFIG",
        value_name = "FILE",
        help_heading = "ACME"
    )]
    pub config_file: Option<PathBuf>,

    /// Check the DNS-01 record at these servers (IP:PORT, repeatable) instead of the
    /// zone's authoritative nameservers, which are found by default.
    #[arg(
        long = "dns-resolver",
        env = "LOBE_TLS_DNS_RESOLVER",
        value_delimiter = ',',
        help_heading = "ACME"
    )]
    pub dns_resolvers: Vec<SocketAddr>,

    /// Recursive resolver (IP:PORT, repeatable) that follows _acme-challenge CNAMEs and
    /// finds the zone's nameservers. Default: the system's (/etc/resolv.conf).
    #[arg(
        long = "dns-recursive",
        env = "LOBE_TLS_DNS_RECURSIVE",
        value_delimiter = ',',
        help_heading = "ACME"
    )]
    pub dns_recursive: Vec<SocketAddr>,

    /// Seconds to wait for a DNS-01 record to become visible.
    #[arg(
        long,
        env = "LOBE_TLS_PROPAGATION_TIMEOUT",
        default_value_t = 120,
        help_heading = "ACME"
    )]
    pub propagation_timeout: u64,

    /// Longest pause between two rounds of the propagation check, in seconds (the first
    /// rounds come after 25 ms, doubling).
    #[arg(
        long,
        env = "LOBE_TLS_PROPAGATION_INTERVAL",
        default_value_t = 1.0,
        help_heading = "ACME"
    )]
    pub propagation_interval: f64,

    /// Skip the DNS propagation check.
    #[arg(long, env = "LOBE_TLS_NO_PROPAGATION_CHECK", help_heading = "ACME")]
    pub no_propagation_check: bool,
}

impl ChallengeArgs {
    /// The library configuration these options describe, with their combinations checked.
    pub fn to_config(&self) -> Result<ChallengeConfig> {
        let kind = self.challenge.unwrap_or_default();
        let mut config = ChallengeConfig::default();
        config.kind = kind;
        if self.http_webroot.is_some() && kind != ChallengeKind::Http01 {
            return Err(Error::config(format!(
                "--http-webroot answers http-01, not {kind}: drop one of them"
            )));
        }
        match kind {
            ChallengeKind::Http01 => match &self.http_webroot {
                Some(dir) => config.http_webroot = Some(absolute_webroot(dir)?),
                None => config.http_listen = Some(self.http_listen.to_string()),
            },
            ChallengeKind::Dns01 => config.dns = Some(self.dns_config()?),
            ChallengeKind::TlsAlpn01 => {
                config.tls_listen = self.tls_listen.map(|addr| addr.to_string())
            }
            _ => {}
        }
        Ok(config)
    }

    /// The configuration `--challenge` pins, when it is given: on-demand names then use
    /// that kind alone instead of choosing.
    pub fn pinned(&self) -> Result<Option<ChallengeConfig>> {
        match self.challenge {
            Some(_) => self.to_config().map(Some),
            None => Ok(None),
        }
    }

    fn dns_config(&self) -> Result<DnsConfig> {
        let provider = match self.dns_provider {
            None => {
                return Err(Error::config(
                    "--challenge dns-01 needs --dns-provider (rfc2136, cloudflare, httpreq, exec or challtestsrv)",
                ));
            }
            Some(DnsProviderName::Rfc2136) => DnsProviderConfig::Rfc2136 {
                config_file: self.absolute_config_file()?,
            },
            Some(DnsProviderName::Cloudflare) => DnsProviderConfig::Cloudflare {
                config_file: self.absolute_config_file()?,
            },
            Some(DnsProviderName::Httpreq) => DnsProviderConfig::Httpreq {
                config_file: self.absolute_config_file()?,
            },
            Some(DnsProviderName::Exec) => DnsProviderConfig::Exec {
                program: self
                    .dns_exec
                    .clone()
                    .ok_or_else(|| Error::config("--dns-provider exec needs --dns-exec PROG"))?,
            },
            Some(DnsProviderName::Challtestsrv) => DnsProviderConfig::Challtestsrv {
                url: self.challtestsrv.clone().ok_or_else(|| {
                    Error::config("--dns-provider challtestsrv needs --challtestsrv URL")
                })?,
            },
        };
        let mut dns = DnsConfig::new(provider);
        dns.resolvers = self.dns_resolvers.clone();
        dns.recursive_resolvers = self.dns_recursive.clone();
        dns.propagation_timeout_secs = self.propagation_timeout;
        dns.propagation_interval_ms = interval_ms(self.propagation_interval)?;
        dns.propagation_check = !self.no_propagation_check;
        Ok(dns)
    }

    /// The config file as an absolute path: the store's metadata keeps it so that a
    /// renewal started from another directory finds it.
    fn absolute_config_file(&self) -> Result<Option<PathBuf>> {
        let Some(path) = &self.config_file else {
            return Ok(None);
        };
        std::path::absolute(path)
            .map(Some)
            .map_err(|e| Error::io(path, e))
    }
}

/// The webroot as an absolute path (the store's metadata keeps it for renewals started
/// from anywhere), checked to be a directory now rather than at the CA's first request.
pub fn absolute_webroot(dir: &std::path::Path) -> Result<PathBuf> {
    let dir = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
    lobe_tls::challenge::WebrootSolver::new(&dir)?;
    Ok(dir)
}

fn interval_ms(seconds: f64) -> Result<u64> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        return Err(Error::config(format!(
            "--propagation-interval {seconds}: give seconds between 0.025 and 3600"
        )));
    }
    Ok(Duration::from_secs_f64(seconds).as_millis().max(25) as u64)
}

//! All of `lobe-tls serve` inside a program: DOMAIN proxied to UPSTREAM, its certificate
//! issued through HTTP-01 on port 80 and renewed in the background, until Ctrl-C.
//!
//! ```text
//! LOBE_TLS_STORE=./store cargo run -p lobe-tls-examples --example edge -- chat.example.com 127.0.0.1:3000
//! ```
//!
//! `LOBE_TLS_DIRECTORY` picks the CA (default: Let's Encrypt staging).

use lobe_tls::edge::{EdgeConfig, SiteConfig, UpstreamSpec};
use lobe_tls::server::{Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let [_, domain, upstream]: [String; 3] = std::env::args()
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| "usage: edge DOMAIN UPSTREAM")?;
    let site = SiteConfig::new(vec![domain], vec![UpstreamSpec::Addr(upstream)]);
    let mut config = ServerConfig::new("0.0.0.0:443".parse()?, EdgeConfig::new(vec![site]));
    config.store = Some(lobe_tls::store::StoreSpec::parse(
        &std::env::var("LOBE_TLS_STORE").unwrap_or("./lobe-tls-store".into()),
    )?);
    config.acme = Some(lobe_tls::AcmeConfig::new(
        std::env::var("LOBE_TLS_DIRECTORY").unwrap_or(lobe_tls::acme::LETSENCRYPT_STAGING.into()),
    ));
    let server = Server::start(config).await?;
    Ok(server
        .run(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
        .await?)
}

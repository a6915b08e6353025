//! Standalone challenge listeners for the manager, shared by the orders that run at the
//! same time and closed when the last of them ends, so a proxy's ports are held only
//! while an order needs them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::http01::{Http01Listener, Http01Registry};
use super::tls_alpn01::TlsAlpn01Listener;
use crate::error::{Error, Result};
use crate::resolver::CertResolver;
use crate::store::DynStore;

/// Standalone challenge listeners, shared by the orders running at the same time and
/// closed when the last of them ends.
#[derive(Default)]
pub(crate) struct Standalone {
    http: tokio::sync::Mutex<HashMap<SocketAddr, (Weak<Http01Listener>, Http01Registry)>>,
    tls: tokio::sync::Mutex<HashMap<SocketAddr, (Weak<TlsAlpn01Listener>, CertResolver)>>,
}

/// How long to retry binding a port that a just-closed listener may still hold.
const REBIND_ATTEMPTS: u32 = 40;

impl Standalone {
    /// The HTTP-01 listener on `addr` and its registry, bound now if none is open. With a
    /// `shared` store the registry also publishes its tokens there, so that every
    /// instance sharing the store can answer, wherever the CA's request lands.
    pub(crate) async fn http(
        &self,
        addr: SocketAddr,
        shared: Option<DynStore>,
    ) -> Result<(Arc<Http01Listener>, Http01Registry)> {
        let mut map = self.http.lock().await;
        if let Some((weak, registry)) = map.get(&addr)
            && let Some(listener) = weak.upgrade()
        {
            return Ok((listener, registry.clone()));
        }
        let registry = match shared {
            Some(store) => Http01Registry::with_shared_store(store)?,
            None => Http01Registry::new(),
        };
        let listener =
            Arc::new(bind_retrying(|| Http01Listener::bind(addr, registry.service())).await?);
        map.insert(addr, (Arc::downgrade(&listener), registry.clone()));
        Ok((listener, registry))
    }

    /// The TLS-ALPN-01 listener on `addr` and its resolver, bound now if none is open.
    pub(crate) async fn tls(
        &self,
        addr: SocketAddr,
    ) -> Result<(Arc<TlsAlpn01Listener>, CertResolver)> {
        let mut map = self.tls.lock().await;
        if let Some((weak, resolver)) = map.get(&addr)
            && let Some(listener) = weak.upgrade()
        {
            return Ok((listener, resolver.clone()));
        }
        let resolver = CertResolver::new();
        let listener =
            Arc::new(bind_retrying(|| TlsAlpn01Listener::bind(addr, resolver.clone())).await?);
        map.insert(addr, (Arc::downgrade(&listener), resolver.clone()));
        Ok((listener, resolver))
    }
}

/// Binds with `bind`, retrying while the port is still held by a listener that was
/// just dropped.
async fn bind_retrying<L, F>(bind: impl Fn() -> F) -> Result<L>
where
    F: std::future::Future<Output = Result<L>>,
{
    let mut attempt = 0;
    loop {
        match bind().await {
            Ok(listener) => return Ok(listener),
            Err(e) if attempt < REBIND_ATTEMPTS && addr_in_use(&e) => attempt += 1,
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn addr_in_use(error: &Error) -> bool {
    matches!(error, Error::Listen { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse)
}

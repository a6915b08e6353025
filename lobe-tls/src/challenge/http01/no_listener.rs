//! The standalone HTTP-01 listener's stand-in in a build without the `http01-listener`
//! feature (no HTTP server in the library).
//!
//! It has no value, so the code that would hold a listener (an issuance, the manager's
//! standalone challenges) compiles unchanged and never holds one: binding it is a
//! configuration error that names the feature. HTTP-01 then goes through the application's
//! own server ([`super::Http01Service`]) or a webroot.

use std::net::SocketAddr;

use super::Http01Service;
use crate::error::{Error, Result};

/// No standalone HTTP-01 listener in this build.
#[derive(Debug)]
pub(crate) enum Http01Listener {}

impl Http01Listener {
    /// Always an error: this build has no HTTP server to listen with.
    pub(crate) async fn bind(addr: SocketAddr, _service: Http01Service) -> Result<Self> {
        Err(Error::config(format!(
            "cannot listen on {addr} for http-01: this build of lobe-tls has no standalone \
             listener (feature `http01-listener`); use a webroot or mount Http01Service in \
             your own server"
        )))
    }

    /// The bound address (there is never one).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        match *self {}
    }
}

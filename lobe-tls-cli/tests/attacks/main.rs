//! Attacks on `lobe-tls serve` with its defaults, each beside a legitimate client whose
//! success and latency are measured, with `serve`'s memory and CPU before, during and
//! after. Real tools: Python's `h2` for crafted HTTP/2 frames, raw sockets for slow and
//! oversized requests.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod h2;
mod headers;
mod on_demand;
mod port80;
mod proxy;
mod slow;
mod spray;
mod support;
mod upload;

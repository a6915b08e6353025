//! `lobe-tls serve` as an edge: the real binary in http mode in front of real backend
//! processes, a real HAProxy in front of it, real signals. One test binary, so the test
//! that holds streams quiet for 65 s runs beside all the others.
// Test helpers: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod balancing;
mod bodies;
mod browser;
mod budget;
mod client_prefix;
mod inflight;
mod ip_lists;
mod limits;
mod proxy_trust;
mod request_id;
mod streams;
mod support;

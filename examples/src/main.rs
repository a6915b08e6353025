//! Embedding examples for lobe-tls live in `examples/examples/`; this binary lists them.

fn main() {
    println!("lobe-tls embedding examples:");
    println!("  cargo run -p lobe-tls-examples --example tokio_rustls_server -- DOMAIN...");
    println!("  cargo run -p lobe-tls-examples --example axum_http01 -- DOMAIN...");
}

//! A small HTTP/1.1 upstream for trying the edge by hand and for benchmarks:
//! `backend ADDR NAME` (see `lobe_tls_tests::backend` for its routes).

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let name = args.next().unwrap_or_else(|| "backend".into());
    if let Err(e) = lobe_tls_tests::backend::serve(&addr, &name).await {
        eprintln!("backend: {e}");
        std::process::exit(1);
    }
}

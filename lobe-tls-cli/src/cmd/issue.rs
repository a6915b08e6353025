//! `lobe-tls issue`.

use std::process::ExitCode;

use crate::global::Global;

/// Options of `lobe-tls issue`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs the command.
pub async fn run(_global: &Global, _args: &Args) -> lobe_tls::Result<ExitCode> {
    Err(lobe_tls::Error::Config("not built yet".into()))
}

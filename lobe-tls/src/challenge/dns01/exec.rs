//! The `exec` provider, compatible with lego's: `PROG present <fqdn> <value>` and
//! `PROG cleanup <fqdn> <value>`, the fqdn with its trailing dot.

use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

use super::{DnsProvider, ProviderFailure, provider_error};
use crate::error::DnsErrorKind;
use crate::error::Result;

/// How long a hook may run before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs an external program to create and delete records.
#[derive(Debug, Clone)]
pub struct ExecProvider {
    program: String,
}

impl ExecProvider {
    /// A provider that runs `program`.
    pub fn new(program: impl Into<String>) -> Self {
        ExecProvider {
            program: program.into(),
        }
    }

    async fn run(&self, action: &str, fqdn: &str, value: &str) -> Result<()> {
        let fail = |failure: ProviderFailure| provider_error("exec", action, fqdn, failure);
        let mut command = Command::new(&self.program);
        command.arg(action).arg(fqdn).arg(value).kill_on_drop(true);
        let output = tokio::time::timeout(HOOK_TIMEOUT, command.output())
            .await
            .map_err(|e| {
                fail(
                    ProviderFailure::new(
                        DnsErrorKind::ProviderUnreachable,
                        format!("{} ran longer than {HOOK_TIMEOUT:?}", self.program),
                    )
                    .with_source(e),
                )
            })?
            .map_err(|e| {
                fail(
                    ProviderFailure::new(
                        DnsErrorKind::ProviderUnreachable,
                        format!("cannot run {}: {e}", self.program),
                    )
                    .with_source(e),
                )
            })?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last_line = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let detail = format!(
            "{} exited with {}{}{}",
            self.program,
            output.status,
            if last_line.is_empty() { "" } else { ": " },
            last_line.trim()
        );
        Err(fail(ProviderFailure::refused(
            detail,
            None,
            output
                .status
                .code()
                .and_then(|c| u64::try_from(c).ok())
                .into_iter()
                .collect(),
            last_line.trim(),
        )))
    }
}

#[async_trait]
impl DnsProvider for ExecProvider {
    async fn present(&self, fqdn: &str, value: &str) -> Result<()> {
        self.run("present", fqdn, value).await
    }

    async fn cleanup(&self, fqdn: &str, value: &str) -> Result<()> {
        self.run("cleanup", fqdn, value).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn passes_lego_arguments_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let hook = dir.path().join("hook.sh");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$1 $2 $3\" >> {}\n[ \"$1\" = cleanup ] && {{ echo 'zone locked' >&2; exit 3; }}\nexit 0\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        let provider = ExecProvider::new(hook.to_str().unwrap());
        provider
            .present("_acme-challenge.example.com.", "v1")
            .await
            .unwrap();
        let err = provider
            .cleanup("_acme-challenge.example.com.", "v1")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("zone locked") && err.contains("_acme-challenge.example.com."),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "present _acme-challenge.example.com. v1\ncleanup _acme-challenge.example.com. v1\n"
        );
    }
}

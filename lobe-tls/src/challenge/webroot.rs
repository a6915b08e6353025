//! HTTP-01 through a webroot: the response goes into a directory that an existing web
//! server already serves, at `DIR/.well-known/acme-challenge/TOKEN`, as certbot's webroot
//! plugin does. lobe-tls binds no port.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{ChallengeData, ChallengeKind, Solver};
use crate::error::{ChallengeErrorKind, Error, Result};

/// The path below the webroot that HTTP-01 requests ask for (RFC 8555 §8.3).
const CHALLENGE_DIR: [&str; 2] = [".well-known", "acme-challenge"];

/// Writes HTTP-01 responses into a webroot served by another web server.
///
/// Token files are world-readable (0644, the web server usually runs as another user),
/// in 0755 directories created only where missing; each file is written under a
/// temporary name and renamed, so the web server never serves half a response, and it
/// is removed again in [`Solver::cleanup`].
#[derive(Debug, Clone)]
pub struct WebrootSolver {
    root: PathBuf,
}

impl WebrootSolver {
    /// A solver writing below `root`, which must be an existing directory.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        match fs::metadata(&root) {
            Ok(meta) if meta.is_dir() => Ok(WebrootSolver { root }),
            Ok(_) => Err(Error::config_key(
                "--http-webroot",
                format!("--http-webroot {}: not a directory", root.display()),
            )),
            Err(e) => Err(Error::config_key(
                "--http-webroot",
                format!(
                    "--http-webroot {}: {e}; give the directory your web server serves",
                    root.display()
                ),
            )
            .with_source(e)),
        }
    }

    /// The webroot.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the response for `token` goes; refuses a token that is not base64url, so
    /// that no CA answer can name a path outside the challenge directory.
    fn token_path(&self, token: &str) -> Result<PathBuf> {
        let valid = !token.is_empty()
            && token.len() <= 256
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(Error::challenge(
                ChallengeErrorKind::BadToken,
                format!(
                    "the CA sent an HTTP-01 token that is not base64url ({} bytes); not writing it",
                    token.len()
                ),
            ));
        }
        Ok(self.challenge_dir().join(token))
    }

    fn challenge_dir(&self) -> PathBuf {
        CHALLENGE_DIR
            .iter()
            .fold(self.root.clone(), |path, part| path.join(part))
    }
}

/// Creates each missing directory of the challenge path, 0755 whatever the umask.
fn ensure_dirs(root: &Path) -> Result<PathBuf> {
    let mut path = root.to_path_buf();
    for part in CHALLENGE_DIR {
        path.push(part);
        match fs::DirBuilder::new().mode(0o755).create(&path) {
            Ok(()) => fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::io(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(path)
}

/// Writes `body` to `path` through a temporary file in the same directory, 0644.
fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("token");
    let tmp = dir.join(format!(".{name}.tmp{}", rand::random::<u32>()));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        // The umask may have taken bits away; the web server must be able to read it.
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
        file.write_all(body)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::challenge(
            ChallengeErrorKind::Solver,
            format!("webroot task failed: {e}"),
        )
        .with_source(e)
    })?
}

#[async_trait]
impl Solver for WebrootSolver {
    fn kind(&self) -> ChallengeKind {
        ChallengeKind::Http01
    }

    async fn present(&self, challenge: &ChallengeData) -> Result<()> {
        let path = self.token_path(&challenge.token)?;
        let root = self.root.clone();
        let body = challenge.key_authorization.clone().into_bytes();
        blocking(move || {
            ensure_dirs(&root)?;
            write_atomic(&path, &body)
        })
        .await?;
        tracing::debug!(domain = %challenge.domain, webroot = %self.root.display(), "HTTP-01 token written");
        Ok(())
    }

    async fn cleanup(&self, challenge: &ChallengeData) -> Result<()> {
        let path = self.token_path(&challenge.token)?;
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(token: &str) -> ChallengeData {
        ChallengeData {
            domain: "example.com".parse().unwrap(),
            token: token.into(),
            key_authorization: format!("{token}.thumb"),
            dns_value: String::new(),
            digest: [0; 32],
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn token_file_is_world_readable_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let solver = WebrootSolver::new(dir.path()).unwrap();
        let c = challenge("tok_EN-1");
        solver.present(&c).await.unwrap();
        let file = dir.path().join(".well-known/acme-challenge/tok_EN-1");
        assert_eq!(fs::read_to_string(&file).unwrap(), "tok_EN-1.thumb");
        assert_eq!(mode(&file), 0o644);
        assert_eq!(mode(&dir.path().join(".well-known")), 0o755);
        assert_eq!(mode(&dir.path().join(".well-known/acme-challenge")), 0o755);
        solver.cleanup(&c).await.unwrap();
        assert!(!file.exists());
        // Nothing else was left behind (no temporary file).
        let left: Vec<_> = fs::read_dir(dir.path().join(".well-known/acme-challenge"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A second cleanup (the order failed before presenting) is fine.
        solver.cleanup(&c).await.unwrap();
    }

    #[tokio::test]
    async fn existing_dirs_keep_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let wk = dir.path().join(".well-known");
        fs::create_dir(&wk).unwrap();
        fs::set_permissions(&wk, fs::Permissions::from_mode(0o750)).unwrap();
        let solver = WebrootSolver::new(dir.path()).unwrap();
        solver.present(&challenge("abc")).await.unwrap();
        assert_eq!(mode(&wk), 0o750);
    }

    #[tokio::test]
    async fn path_tokens_and_missing_roots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let solver = WebrootSolver::new(dir.path()).unwrap();
        for token in ["../x", "a/b", "", "a.b"] {
            let err = solver.present(&challenge(token)).await.unwrap_err();
            assert!(err.to_string().contains("not base64url"), "{err}");
        }
        assert!(!dir.path().join(".well-known").exists());
        let err = WebrootSolver::new(dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("--http-webroot"), "{err}");
    }
}

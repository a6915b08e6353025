//! `--profile NAME` for `issue` and `serve`, or `profile = "NAME"` at the top level of the
//! `--config` file.

use std::path::Path;

use clap::Args;
use lobe_tls::{Error, Result};

/// The ACME profile to order under.
#[derive(Args, Debug, Clone)]
pub struct ProfileArgs {
    /// ACME profile to order under (classic, tlsserver, shortlived, ...); the CA's
    /// directory must list it. Stored with the certificate and used again on renewal.
    /// Default: `profile` in the --config file, else the CA's default (shortlived for an
    /// IP address when the CA lists it).
    #[arg(long, env = "LOBE_TLS_PROFILE", help_heading = "Certificates")]
    pub profile: Option<String>,
}

impl ProfileArgs {
    /// The profile asked for: the flag, else the config file's top-level `profile`.
    pub fn resolve(&self, config_file: Option<&Path>) -> Result<Option<String>> {
        let profile = match (&self.profile, config_file) {
            (Some(profile), _) => Some(profile.clone()),
            (None, Some(file)) => from_config_file(file)?,
            (None, None) => None,
        };
        if let Some(profile) = &profile {
            lobe_tls::issue::check_profile_name(profile)?;
        }
        Ok(profile)
    }
}

/// The top-level `profile` string of the TOML file `path`, if it sets one.
fn from_config_file(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        Error::config(format!(
            "{}: not valid TOML: {}",
            path.display(),
            e.message().replace('\n', " ")
        ))
    })?;
    match doc.get("profile") {
        None => Ok(None),
        Some(toml::Value::String(profile)) => Ok(Some(profile.clone())),
        Some(_) => Err(Error::config(format!(
            "{}: `profile` must be a string, such as profile = \"shortlived\"",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_the_config_file_which_wins_over_nothing() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            b"profile = \"shortlived\"\n[rfc2136]\nnameserver = \"127.0.0.1:53\"\n",
        )
        .unwrap();
        let none = ProfileArgs { profile: None };
        assert_eq!(none.resolve(None).unwrap(), None);
        assert_eq!(
            none.resolve(Some(file.path())).unwrap().as_deref(),
            Some("shortlived")
        );
        let flag = ProfileArgs {
            profile: Some("tlsserver".into()),
        };
        assert_eq!(
            flag.resolve(Some(file.path())).unwrap().as_deref(),
            Some("tlsserver")
        );
        let bad = ProfileArgs {
            profile: Some("two words".into()),
        };
        let err = bad.resolve(None).unwrap_err().to_string();
        assert!(err.contains("--profile") && !err.contains('\n'), "{err}");
        std::fs::write(file.path(), "profile = 6\n").unwrap();
        let err = none.resolve(Some(file.path())).unwrap_err().to_string();
        assert!(err.contains("must be a string"), "{err}");
    }
}

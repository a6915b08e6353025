//! Reading the sites of the configuration file, whole, for a start or a reload: a file
//! that does not parse or check leaves the running sites as they are.

use std::path::Path;

use super::config::SiteConfig;
use super::config_file::parse_sites;
use crate::error::{Error, Result};

/// Reads the `[[site]]` tables of the file at `path`.
pub fn read_sites(path: &Path) -> Result<Vec<SiteConfig>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::io(path, source))?;
    parse_sites(&text).map_err(|e| Error::config(format!("{}: {e}", path.display())))
}

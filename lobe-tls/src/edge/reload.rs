//! Reloading the sites from the configuration file: read and check the whole file
//! first, then swap; a file that does not parse or check leaves the running sites as
//! they are.

use std::path::Path;

use super::EdgeHandle;
use super::site::{SiteConfig, parse_sites};
use crate::error::{Error, Result};

/// Reads the `[[site]]` tables of the file at `path`.
pub fn read_sites(path: &Path) -> Result<Vec<SiteConfig>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_sites(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Re-reads `path` and swaps in its sites, plus `extra` (sites from command-line flags);
/// returns the sites now in effect (e.g. to have certificates issued for new domains).
/// On error nothing changes, and the one-line error says why.
pub fn reload_from(
    handle: &EdgeHandle,
    path: &Path,
    extra: &[SiteConfig],
) -> Result<Vec<SiteConfig>> {
    let mut sites = read_sites(path)?;
    sites.extend(extra.iter().cloned());
    handle.reload(sites.clone())?;
    Ok(sites)
}

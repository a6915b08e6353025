//! The file primitives under the file store: advisory lock files, atomic writes, the
//! directory swaps that flip `live/<name>`, and the numbered versions under `archive/`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{KEEP_VERSIONS, META_FILE};
use crate::error::{Error, Result};

/// Opens (or creates, 0600) a file that only carries an advisory lock.
pub(super) fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

pub(super) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

pub(super) fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // The umask may have narrowed the mode; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))?;
    file.write_all(data).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes through a temporary file and a rename, so a crash leaves the old file whole.
pub(super) fn atomic_write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", rand::random::<u32>()));
    let result = write_file(&tmp, data, mode).and_then(|()| {
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

pub(super) fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Points `link` at `target` atomically: a new symlink beside it, renamed over it.
pub(super) fn flip_symlink(link: &Path, target: &Path) -> Result<()> {
    let tmp = temp_sibling(link);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(link, e));
    }
    if let Some(parent) = link.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// A hidden name beside `live/<name>` for a link or directory on its way in or out.
pub(super) fn temp_sibling(link: &Path) -> PathBuf {
    link.with_file_name(format!(
        ".{}.tmp-{}",
        link.file_name().and_then(|n| n.to_str()).unwrap_or("live"),
        rand::random::<u32>()
    ))
}

/// Puts a link to `target` where `live` is a plain directory, and keeps the directory as
/// the archived version `kept` (mode 0700, private keys 0600).
///
/// The link and the directory swap places atomically where the kernel and file system
/// can (`RENAME_EXCHANGE`); elsewhere the directory is renamed away and the link renamed
/// in, and `live` is missing in between. The caller holds the staging guard, so the
/// swapped-out directory is never pruned before it reaches the archive.
pub(super) fn replace_plain_dir(live: &Path, target: &Path, kept: &Path) -> Result<()> {
    let link = temp_sibling(live);
    std::os::unix::fs::symlink(target, &link).map_err(|e| Error::io(&link, e))?;
    let old = match exchange(&link, live) {
        // The link is live; the old directory now sits where the link was made.
        Ok(()) => link,
        Err(e) if swap_unsupported(&e) => {
            let old = temp_sibling(live);
            if let Err(e) = fs::rename(live, &old) {
                let _ = fs::remove_file(&link);
                return Err(Error::io(live, e));
            }
            if let Err(e) = fs::rename(&link, live) {
                // Put the old directory back rather than leave nothing.
                let _ = fs::rename(&old, live);
                let _ = fs::remove_file(&link);
                return Err(Error::io(live, e));
            }
            old
        }
        Err(e) => {
            let _ = fs::remove_file(&link);
            return Err(Error::io(live, e));
        }
    };
    if let Some(parent) = live.parent() {
        sync_dir(parent)?;
    }
    // The certificate is replaced; what follows only tidies up the old set.
    match fs::rename(&old, kept) {
        Ok(()) => make_private(kept),
        Err(e) => {
            tracing::warn!(path = %old.display(), error = %e, "cannot archive the replaced live directory; it is pruned at a later open");
            make_private(&old);
        }
    }
    Ok(())
}

/// Swaps two directory entries in one step.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(super) fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(Into::into)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Whether a failed swap means "this system cannot swap" rather than a real failure.
pub(super) fn swap_unsupported(e: &std::io::Error) -> bool {
    const EINVAL: i32 = rustix::io::Errno::INVAL.raw_os_error();
    const ENOSYS: i32 = rustix::io::Errno::NOSYS.raw_os_error();
    const EOPNOTSUPP: i32 = rustix::io::Errno::OPNOTSUPP.raw_os_error();
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(EINVAL | ENOSYS | EOPNOTSUPP))
}

/// Best effort: an archived directory 0700 and the private keys in it 0600. Links are
/// left alone (certbot's point into its own archive, which certbot keeps private).
pub(super) fn make_private(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let secret = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("privkey") || n == META_FILE);
        if secret && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600));
        }
    }
}

pub(super) fn versions(archive: &Path) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = fs::read_dir(archive)
        .map_err(|e| Error::io(archive, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    out.sort_unstable();
    Ok(out)
}

pub(super) fn next_version(archive: &Path) -> Result<u64> {
    Ok(versions(archive)?.last().map_or(1, |v| v + 1))
}

/// Removes all but the newest few versions. Never touches the live one, which is the newest.
pub(super) fn prune_versions(archive: &Path) {
    let Ok(all) = versions(archive) else { return };
    let excess = all.len().saturating_sub(KEEP_VERSIONS);
    for v in &all[..excess] {
        let _ = fs::remove_dir_all(archive.join(format!("{v:04}")));
    }
}

/// Writes and removes a probe file in the root and in each directory saves write into,
/// so a store this process cannot write is found at once, in one line that says who
/// cannot write where.
pub(super) fn check_writable(root: &Path) -> Result<()> {
    // The root, and the directories saves write into where they exist already.
    let dirs = ["", "live", "archive", "state", "accounts"];
    let dirs = dirs.iter().map(|d| {
        if d.is_empty() {
            root.to_path_buf()
        } else {
            root.join(d)
        }
    });
    for dir in dirs.filter(|d| d.is_dir()) {
        let probe = dir.join(format!(".write-probe-{}", std::process::id()));
        let written = fs::write(&probe, b"");
        let _ = fs::remove_file(&probe);
        if let Err(e) = written {
            let uid = rustix::process::getuid().as_raw();
            return Err(Error::store(
                "fs",
                crate::error::StoreErrorKind::Write,
                format!(
                    "--store {}: this process (uid {uid}) cannot write {} ({e}); give it write access or run as the store's owner",
                    root.display(),
                    dir.display()
                ),
            )
            .with_source(e));
        }
    }
    Ok(())
}

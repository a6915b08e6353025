//! The credential files: `api_keys_file` (`NAME:HASH` lines) and `basic_auth_file`
//! (htpasswd), read line by line into the sets the parent module checks against. An
//! error names the file and the line, never the line's text (it may hold a key).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};

use super::{ApiKeys, Users};
use crate::error::{Error, Result};

/// The lines of `path`, with their 1-based numbers, skipping blank and `#` lines.
fn lines(what: &str, path: &Path) -> Result<Vec<(usize, String)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::config(format!("{what} {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim().to_owned()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .collect())
}

/// A malformed line: the file and the line number, never the line (it may hold a key).
fn malformed(path: &Path, line: usize, why: &str) -> Error {
    Error::config(format!("{}:{line}: {why}", path.display()))
}

/// A NAME as `X-Authenticated-Name` carries it.
fn entry_name(path: &Path, line: usize, name: &str) -> Result<Arc<str>> {
    if name.is_empty()
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
        || HeaderValue::from_str(name).is_err()
    {
        return Err(malformed(
            path,
            line,
            "the name before ':' must be non-empty visible ASCII without spaces",
        ));
    }
    Ok(name.into())
}

pub(super) fn read_api_keys(path: &Path, header: HeaderName) -> Result<ApiKeys> {
    let mut keys = ApiKeys {
        header,
        digests: Vec::new(),
        hashed: Vec::new(),
    };
    for (line, text) in lines("api_keys_file", path)? {
        let Some((name, hash)) = text.split_once(':') else {
            return Err(malformed(path, line, "expected NAME:HASH"));
        };
        let name = entry_name(path, line, name)?;
        if let Some(hex) = hash.strip_prefix("sha256:") {
            let digest = lowercase_hex_digest(hex).ok_or_else(|| {
                malformed(
                    path,
                    line,
                    "sha256: must be followed by 64 lowercase hex digits (printf %s KEY | sha256sum)",
                )
            })?;
            keys.digests.push((name, digest));
        } else if hash.starts_with("$argon2id$") && argon2_hash(hash) {
            keys.hashed.push((name, hash.into()));
        } else {
            return Err(malformed(
                path,
                line,
                "HASH must be sha256:<64 lowercase hex digits> or an argon2id PHC string ($argon2id$...)",
            ));
        }
    }
    Ok(keys)
}

pub(super) fn read_users(path: &Path) -> Result<Users> {
    let mut users = Users {
        by_name: HashMap::new(),
    };
    let mut first_line = HashMap::new();
    for (line, text) in lines("basic_auth_file", path)? {
        let Some((user, hash)) = text.split_once(':') else {
            return Err(malformed(
                path,
                line,
                "expected USER:HASH (htpasswd format)",
            ));
        };
        let name = entry_name(path, line, user)?;
        let bcrypt_hash = ["$2y$", "$2b$", "$2a$"]
            .iter()
            .any(|prefix| hash.starts_with(prefix))
            && hash
                .parse::<bcrypt::HashParts>()
                .is_ok_and(|parts| (4..=31).contains(&parts.get_cost()));
        let argon2_hash = ["$argon2id$", "$argon2i$", "$argon2d$"]
            .iter()
            .any(|prefix| hash.starts_with(prefix))
            && argon2_hash(hash);
        if !(bcrypt_hash || argon2_hash) {
            return Err(malformed(
                path,
                line,
                "the hash must be bcrypt ($2y$, as htpasswd -B writes) or argon2 ($argon2id$...)",
            ));
        }
        if let Some(first) = first_line.insert(user.to_owned(), line) {
            return Err(malformed(
                path,
                line,
                &format!("user {name} is listed already on line {first}"),
            ));
        }
        users
            .by_name
            .insert(user.as_bytes().to_vec(), (name, hash.into()));
    }
    Ok(users)
}

/// Whether `hash` is an argon2 PHC string the verifier takes.
fn argon2_hash(hash: &str) -> bool {
    argon2::password_hash::phc::PasswordHash::new(hash)
        .ok()
        .is_some_and(|parsed| argon2::Params::try_from(&parsed).is_ok())
}

fn lowercase_hex_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

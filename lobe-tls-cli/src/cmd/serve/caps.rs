//! The connection caps `serve` has by default, and the open-file limit the total one is
//! derived from: a busy site never meets them by accident, but one client cannot take
//! every descriptor of the process.

use std::path::Path;

use lobe_tls::client_key::ClientPrefixes;
use lobe_tls::{Error, Result};

/// Descriptors kept aside from the connections: listeners, the store, health checks,
/// idle pooled upstream connections, log files.
const RESERVED_FDS: u64 = 256;

/// Connections open at once from one client address unless `--max-conns-per-ip` says
/// otherwise (a browser opens a handful; thousands are a crowd behind one NAT or a flood).
pub const DEFAULT_MAX_CONNS_PER_IP: usize = 4096;

/// Raises the soft limit on open files to the hard one, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do, so that 10,000 connections work out of the box. Returns
/// the soft limit in effect (`None`: unlimited).
pub fn raise_nofile() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {}
            // Some systems refuse the hard limit itself (macOS caps it lower): keep the
            // soft one.
            Err(e) => tracing::debug!(error = %e, "cannot raise the open-file limit"),
        }
    }
    let limit = getrlimit(Resource::Nofile);
    tracing::debug!(
        soft = ?limit.current,
        hard = ?limit.maximum,
        "open-file limit"
    );
    limit.current
}

/// The default total cap for an open-file limit of `nofile`: a proxied connection takes
/// two descriptors (the client's and, for a stream or in tcp mode, the upstream's).
pub fn default_max_conns(nofile: Option<u64>) -> Option<usize> {
    let nofile = nofile?;
    let conns = nofile.saturating_sub(RESERVED_FDS).max(RESERVED_FDS) / 2;
    Some(usize::try_from(conns).unwrap_or(usize::MAX))
}

/// A cap as given (0: none) or, when not given, its default.
pub fn cap(given: Option<usize>, default: Option<usize>) -> Option<usize> {
    match given {
        Some(0) => None,
        Some(n) => Some(n),
        None => default,
    }
}

/// Who counts as one client: `--client-prefix-v4`/`-v6` when given, else the
/// `client_prefix_v4`/`client_prefix_v6` keys of the --config file, else /32 and /64.
/// A value out of range is a one-line error that names where it came from.
pub fn client_prefixes(
    flag_v4: Option<u32>,
    flag_v6: Option<u32>,
    config_file: Option<&Path>,
) -> Result<ClientPrefixes> {
    let (file_v4, file_v6) = match config_file {
        Some(path) if flag_v4.is_none() || flag_v6.is_none() => prefixes_in_file(path)?,
        _ => (None, None),
    };
    let bits =
        |flag: Option<u32>, file: Option<(String, i64)>, max: u8, default: u8, flag_name: &str| {
            let (value, source) = match (flag, file) {
                (Some(bits), _) => (i64::from(bits), format!("--{flag_name} {bits}")),
                (None, Some((source, bits))) => (bits, source),
                (None, None) => return Ok(default),
            };
            u8::try_from(value)
                .ok()
                .filter(|bits| (1..=max).contains(bits))
                .ok_or_else(|| {
                    Error::config(format!(
                        "{source} is out of range: give 1 to {max} bits (default {default})"
                    ))
                })
        };
    let v4 = bits(
        flag_v4,
        file_v4,
        32,
        ClientPrefixes::DEFAULT_V4,
        "client-prefix-v4",
    )?;
    let v6 = bits(
        flag_v6,
        file_v6,
        128,
        ClientPrefixes::DEFAULT_V6,
        "client-prefix-v6",
    )?;
    ClientPrefixes::new(v4, v6)
}

/// The top-level `client_prefix_v4` and `client_prefix_v6` integers of the TOML file
/// `path`, each with how to name it in an error.
#[allow(clippy::type_complexity)]
fn prefixes_in_file(path: &Path) -> Result<(Option<(String, i64)>, Option<(String, i64)>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        Error::config(format!(
            "{}: not valid TOML: {}",
            path.display(),
            e.message().replace('\n', " ")
        ))
    })?;
    let key = |name: &str| match doc.get(name) {
        None => Ok(None),
        Some(toml::Value::Integer(bits)) => Ok(Some((
            format!("{}: {name} = {bits}", path.display()),
            *bits,
        ))),
        Some(other) => Err(Error::config(format!(
            "{}: `{name}` must be a number of bits, such as {name} = {}, not {other}",
            path.display(),
            if name.ends_with("v4") { 32 } else { 64 }
        ))),
    };
    Ok((key("client_prefix_v4")?, key("client_prefix_v6")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_prefixes_come_from_the_flag_then_the_file_then_the_default() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("serve.toml");
        std::fs::write(
            &file,
            "client_prefix_v6 = 56\n[[site]]\nupstreams = [\"127.0.0.1:1\"]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let got = |v4, v6, file: Option<&Path>| {
            client_prefixes(v4, v6, file)
                .map(|p| (p.v4(), p.v6()))
                .map_err(|e| e.to_string())
        };
        assert_eq!(got(None, None, None), Ok((32, 64)));
        assert_eq!(got(None, None, Some(&file)), Ok((32, 56)));
        assert_eq!(got(Some(24), Some(48), Some(&file)), Ok((24, 48)));
        let e = got(None, Some(129), None).err().unwrap_or_default();
        assert!(
            e.contains("--client-prefix-v6 129 is out of range") && !e.contains('\n'),
            "{e}"
        );
        assert!(got(Some(0), None, None).is_err());
        std::fs::write(&file, "client_prefix_v4 = 40\n").unwrap_or_else(|e| panic!("{e}"));
        let e = got(None, None, Some(&file)).err().unwrap_or_default();
        assert!(
            e.contains("client_prefix_v4 = 40 is out of range: give 1 to 32 bits"),
            "{e}"
        );
        std::fs::write(&file, "client_prefix_v6 = \"64\"\n").unwrap_or_else(|e| panic!("{e}"));
        let e = got(None, None, Some(&file)).err().unwrap_or_default();
        assert!(e.contains("must be a number of bits"), "{e}");
    }

    #[test]
    fn the_total_leaves_room_for_upstreams_and_the_process() {
        assert_eq!(default_max_conns(Some(1024)), Some(384));
        assert_eq!(default_max_conns(Some(1_048_576)), Some(524_160));
        // A tiny limit still admits some connections.
        assert_eq!(default_max_conns(Some(100)), Some(128));
        assert_eq!(default_max_conns(None), None);
    }

    #[test]
    fn zero_turns_a_cap_off_and_nothing_keeps_the_default() {
        assert_eq!(cap(Some(0), Some(10)), None);
        assert_eq!(cap(Some(3), Some(10)), Some(3));
        assert_eq!(cap(None, Some(10)), Some(10));
    }
}

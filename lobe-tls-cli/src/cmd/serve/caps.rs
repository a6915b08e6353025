//! The connection caps `serve` has by default, and the open-file limit the total one is
//! derived from: a busy site never meets them by accident, but one client cannot take
//! every descriptor of the process.

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

#[cfg(test)]
mod tests {
    use super::*;

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

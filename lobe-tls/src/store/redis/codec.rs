//! The values under the store's keys: a certificate record (chain, key and metadata
//! in one JSON document, the leaf's serial at its head), renewal states, and the
//! announcements of the events channel.

use crate::cert::CertBundle;
use crate::error::{Error, Result};
use crate::store::fs::check_name;
use crate::store::{CertMeta, RenewalState, StoreEvent, StoredCert};

/// How many bytes of a certificate value hold its serial: `{"serial":"` and up to 40
/// hex digits (a 20-byte serial) and more, with room to spare.
pub(super) const SERIAL_HEAD: isize = 127;

/// The certificate value: one JSON document, so chain and key change together.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct CertRecord {
    /// The leaf's serial, first so that it is the head of the value (see
    /// [`serial_from_head`]). Absent from values written before it was added.
    #[serde(default)]
    pub(super) serial: Option<String>,
    pub(super) fullchain: String,
    pub(super) key: String,
    pub(super) meta: CertMeta,
}

/// A certificate value read for its chain alone (values without a serial at their head).
#[derive(serde::Deserialize)]
pub(super) struct ChainOnly {
    pub(super) fullchain: String,
}

/// The serial at the head of a certificate value, as [`Store::save_cert`](crate::store::Store::save_cert) writes it.
pub(super) fn serial_from_head(head: &str) -> Option<&str> {
    let rest = head.strip_prefix(r#"{"serial":""#)?;
    let (serial, _) = rest.split_once('"')?;
    let hex = !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then_some(serial)
}

/// Parses a certificate value, key included: CPU work, for a blocking thread.
pub(super) fn parse_state(target: &str, name: &str, raw: Option<&str>) -> Result<RenewalState> {
    match raw {
        None => Ok(RenewalState::default()),
        Some(raw) => decode_renewal_state(target, name, raw),
    }
}

/// The stored value of `cert`: chain, key and metadata in one JSON document, the
/// serial first so a re-sync can read it from the value's head.
pub(super) fn encode_cert(cert: &StoredCert) -> Result<String> {
    let name = cert.meta.name.as_str();
    check_name(name)?;
    let record = CertRecord {
        // A leaf that x509-parser cannot read still stores; re-syncs then read it whole.
        serial: cert.bundle.info().ok().map(|info| info.serial),
        fullchain: cert.bundle.fullchain_pem().to_owned(),
        key: cert.bundle.key_pem().to_owned(),
        meta: cert.meta.clone(),
    };
    serde_json::to_string(&record).map_err(|e| {
        Error::store(
            "redis",
            crate::error::StoreErrorKind::Encode,
            format!("cannot encode certificate {name}: {e}"),
        )
        .with_source(e)
    })
}

/// Decodes the value stored under `<prefix>:cert:<name>`. `target` is the redacted URL
/// the error names. Public only so the fuzz targets can feed it arbitrary values.
#[doc(hidden)]
pub fn decode_cert(target: &str, name: &str, raw: &str) -> Result<StoredCert> {
    // serde's own message quotes the offending value, which in this record may be (part
    // of) the private key: say only what kind of error it is and where.
    let record: CertRecord = serde_json::from_str(raw).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => {
                "a field is missing or has the wrong type or value"
            }
            _ => "not valid JSON",
        };
        Error::store(
            "redis",
            crate::error::StoreErrorKind::Corrupt,
            format!(
                "redis {target}: certificate {name} is unreadable: {what} at line {} column {}",
                e.line(),
                e.column()
            ),
        )
    })?;
    let bundle = CertBundle::from_pem(record.fullchain, record.key).map_err(|e| {
        Error::store(
            "redis",
            crate::error::StoreErrorKind::Corrupt,
            format!("redis {target}: certificate {name}: {e}"),
        )
        .with_source(e)
    })?;
    Ok(StoredCert {
        bundle,
        meta: record.meta,
    })
}

/// Decodes the value stored under `<prefix>:state:<name>`. Public only for the fuzz targets.
#[doc(hidden)]
pub fn decode_renewal_state(target: &str, name: &str, raw: &str) -> Result<RenewalState> {
    serde_json::from_str(raw).map_err(|e| {
        Error::store(
            "redis",
            crate::error::StoreErrorKind::Corrupt,
            format!("redis {target}: renewal state of {name} is unreadable: {e}"),
        )
        .with_source(e)
    })
}

/// Parses one announcement of the events channel. Public only for the fuzz targets.
#[doc(hidden)]
pub fn parse_event(payload: &str) -> Option<StoreEvent> {
    let (kind, arg) = payload.split_once(' ')?;
    let arg = arg.to_owned();
    match kind {
        "cert" => Some(StoreEvent::CertSaved(arg)),
        "challenge-put" => Some(StoreEvent::ChallengePut(arg)),
        "challenge-del" => Some(StoreEvent::ChallengeDeleted(arg)),
        _ => None,
    }
}

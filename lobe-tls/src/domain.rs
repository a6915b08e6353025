//! Validated domain names: IDN to punycode, wildcard rules, and the errors for bad names.
//!
//! Every name is checked here before anything is sent to a CA, so a typo costs a
//! clear message instead of a failed order counted against rate limits.
//!
//! A [`DomainName`] may also be an IP address (RFC 8738), written plainly as
//! `192.0.2.10` or `2001:db8::1`: it travels through the store, the resolver and the
//! challenges like a name, and becomes an `ip` identifier only when ordered. Keeping one
//! type means stored metadata, `-d` flags and every API taking names stay as they were.

use std::fmt;
use std::net::IpAddr;

/// The longest name DNS allows, without the trailing dot (RFC 1035).
const MAX_NAME_LEN: usize = 253;
/// The longest label DNS allows (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// Why a domain name was rejected. Each message names the input and says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    /// The name was empty.
    #[error("empty domain name: give a name such as example.com")]
    Empty,
    /// The name contained whitespace.
    #[error("invalid domain name {0:?}: it contains whitespace")]
    Whitespace(String),
    /// Two dots in a row, or a leading dot.
    #[error(
        "invalid domain name {0:?}: it has an empty label (two dots in a row or a leading dot)"
    )]
    EmptyLabel(String),
    /// A `*` somewhere other than as the whole leftmost label.
    #[error(
        "invalid domain name {0:?}: a wildcard is only allowed as the whole leftmost label, as in *.example.com"
    )]
    BadWildcard(String),
    /// The name is longer than 253 characters.
    #[error("invalid domain name {0:?}: it is longer than {MAX_NAME_LEN} characters")]
    TooLong(String),
    /// One label is longer than 63 characters.
    #[error(
        "invalid domain name {name:?}: label {label:?} is longer than {MAX_LABEL_LEN} characters"
    )]
    LabelTooLong {
        /// The name as given.
        name: String,
        /// The offending label.
        label: String,
    },
    /// A single label such as `localhost`, which no public CA issues for.
    #[error("invalid domain name {0:?}: it needs at least two labels, as in example.com")]
    SingleLabel(String),
    /// An IP address in a spelling other than the plain one (a trailing dot, a wildcard,
    /// characters that IDN maps to digits and dots).
    #[error(
        "{0:?} is an IP address in a form a certificate cannot name: write it plainly, as 192.0.2.10 or 2001:db8::1"
    )]
    IpAddress(String),
    /// An IP address together with DNS-01, which cannot validate one (RFC 8738 §7).
    #[error("{0:?} is an IP address: validate it with --challenge http-01 or tls-alpn-01")]
    IpNeedsHttpOrAlpn(String),
    /// Characters that are not allowed in a host name, after IDN mapping.
    #[error("invalid domain name {name:?}: {reason}")]
    Invalid {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A wildcard together with HTTP-01 or TLS-ALPN-01.
    #[error("{0:?} is a wildcard: wildcard certificates need --challenge dns-01")]
    WildcardNeedsDns(String),
}

/// A domain name that passed validation: lower-case ASCII (punycode), no trailing dot,
/// optionally with a `*.` wildcard as its leftmost label; or an IP address in its
/// canonical text form (`192.0.2.10`, `2001:db8::1`), see [`DomainName::ip`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

impl DomainName {
    /// Validates `input` and converts an internationalised name to punycode.
    ///
    /// ```
    /// use lobe_tls::DomainName;
    /// let name = DomainName::parse("Bücher.Example.").unwrap();
    /// assert_eq!(name.as_str(), "xn--bcher-kva.example");
    /// assert!(DomainName::parse("a..example.com").is_err());
    /// ```
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(DomainError::Empty);
        }
        if trimmed.chars().any(char::is_whitespace) {
            return Err(DomainError::Whitespace(input.to_owned()));
        }
        // An address written plainly is an IP identifier, kept in its canonical form
        // (`2001:DB8:0::1` becomes `2001:db8::1`), so it compares like the SAN it gets.
        if let Ok(ip) = trimmed.parse::<IpAddr>() {
            return Ok(DomainName(ip.to_canonical().to_string()));
        }
        let without_dot = trimmed.strip_suffix('.').unwrap_or(trimmed);
        // After the trailing dot is gone: `127.0.0.1.` is an address too.
        if without_dot.parse::<IpAddr>().is_ok() {
            return Err(DomainError::IpAddress(input.to_owned()));
        }
        let (wildcard, base) = match without_dot.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, without_dot),
        };
        if base.contains('*') {
            return Err(DomainError::BadWildcard(input.to_owned()));
        }
        if base.is_empty() || base.split('.').any(str::is_empty) {
            return Err(DomainError::EmptyLabel(input.to_owned()));
        }
        // Length limits first, so an over-long name gets its own message rather than the
        // IDN mapper's generic refusal.
        if let Some(label) = base.split('.').find(|l| l.len() > MAX_LABEL_LEN) {
            return Err(DomainError::LabelTooLong {
                name: input.to_owned(),
                label: label.to_owned(),
            });
        }
        if base.len() > MAX_NAME_LEN {
            return Err(DomainError::TooLong(input.to_owned()));
        }
        let ascii = idna::domain_to_ascii_strict(base).map_err(|_| DomainError::Invalid {
            name: input.to_owned(),
            reason: "it contains characters not allowed in a host name (letters, digits and hyphens only; no leading or trailing hyphen)".into(),
        })?;
        // IDN mapping can make an address out of other characters (full-width digits
        // and dots), and a wildcard must not cover one either.
        if ascii.parse::<IpAddr>().is_ok() {
            return Err(DomainError::IpAddress(input.to_owned()));
        }
        if let Some(label) = ascii.split('.').find(|l| l.len() > MAX_LABEL_LEN) {
            return Err(DomainError::LabelTooLong {
                name: input.to_owned(),
                label: label.to_owned(),
            });
        }
        let full = if wildcard {
            format!("*.{ascii}")
        } else {
            ascii
        };
        if full.len() > MAX_NAME_LEN {
            return Err(DomainError::TooLong(input.to_owned()));
        }
        if !full.contains('.') {
            return Err(DomainError::SingleLabel(input.to_owned()));
        }
        Ok(DomainName(full))
    }

    /// The name as lower-case ASCII, with `*.` in front for a wildcard.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is a `*.` wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }

    /// The name without its wildcard label: the name DNS-01 validates.
    pub fn base(&self) -> &str {
        self.0.strip_prefix("*.").unwrap_or(&self.0)
    }

    /// The DNS-01 record name with a trailing dot: `_acme-challenge.<base>.`.
    pub fn acme_challenge_fqdn(&self) -> String {
        format!("_acme-challenge.{}.", self.base())
    }

    /// The address, if this is an IP address rather than a DNS name.
    pub fn ip(&self) -> Option<IpAddr> {
        self.0.parse().ok()
    }

    /// The server name a TLS-ALPN-01 validation sends for this name: the name itself, or
    /// for an address its reverse-DNS name (RFC 8738 §6), `10.2.0.192.in-addr.arpa` for
    /// `192.0.2.10` and the `ip6.arpa` nibble name for an IPv6 address.
    pub fn tls_alpn_server_name(&self) -> String {
        match self.ip() {
            Some(ip) => reverse_dns_name(ip),
            None => self.0.clone(),
        }
    }
}

/// The reverse-DNS name of `ip` (RFC 1035 §3.5, RFC 3596 §2.5), without a trailing dot.
pub fn reverse_dns_name(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                name.push(hex_digit(byte & 0x0f));
                name.push('.');
                name.push(hex_digit(byte >> 4));
                name.push('.');
            }
            name.push_str("ip6.arpa");
            name
        }
    }
}

fn hex_digit(nibble: u8) -> char {
    char::from_digit(u32::from(nibble), 16).unwrap_or('0')
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl TryFrom<String> for DomainName {
    type Error = DomainError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        DomainName::parse(&value)
    }
}

impl From<DomainName> for String {
    fn from(value: DomainName) -> Self {
        value.0
    }
}

impl std::str::FromStr for DomainName {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DomainName::parse(s)
    }
}

/// The store name of a certificate for `domains` when none is given: the first domain,
/// with a wildcard's `*` as `_`. So `*.example.com` is stored as `_.example.com` and never
/// overwrites the certificate of `example.com`. `issue` and `serve` both name by it.
///
/// An IPv6 address has its colons as `_` too (`2001:db8::1` is stored as
/// `2001_db8__1`): a colon is not safe in file names everywhere, and no DNS name
/// contains `_` in that place, so the names cannot collide.
///
/// ```
/// use lobe_tls::domain::{parse_all, store_name};
/// assert_eq!(store_name(&parse_all(&["*.example.com", "example.com"]).unwrap()), "_.example.com");
/// assert_eq!(store_name(&parse_all(&["example.com"]).unwrap()), "example.com");
/// assert_eq!(store_name(&parse_all(&["2001:db8::1"]).unwrap()), "2001_db8__1");
/// ```
pub fn store_name(domains: &[DomainName]) -> String {
    domains
        .first()
        .map(|d| d.as_str().replace(['*', ':'], "_"))
        .unwrap_or_default()
}

/// Parses and deduplicates a list of names, keeping the order given.
pub fn parse_all<S: AsRef<str>>(inputs: &[S]) -> Result<Vec<DomainName>, DomainError> {
    let mut out: Vec<DomainName> = Vec::with_capacity(inputs.len());
    for input in inputs {
        let name = DomainName::parse(input.as_ref())?;
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if out.is_empty() {
        return Err(DomainError::Empty);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names_of_a_wildcard_and_its_apex_differ() {
        let wildcard = store_name(&parse_all(&["*.Example.com", "example.com"]).unwrap());
        let apex = store_name(&parse_all(&["example.com", "*.example.com"]).unwrap());
        assert_eq!(wildcard, "_.example.com");
        assert_eq!(apex, "example.com");
        assert_eq!(store_name(&[]), "");
    }

    #[test]
    fn idn_becomes_punycode_and_case_folds() {
        assert_eq!(
            DomainName::parse("MÜNCHEN.de").unwrap().as_str(),
            "xn--mnchen-3ya.de"
        );
    }

    #[test]
    fn trailing_dot_is_tolerated() {
        assert_eq!(
            DomainName::parse("example.com.").unwrap().as_str(),
            "example.com"
        );
    }

    #[test]
    fn wildcard_only_as_whole_leftmost_label() {
        assert!(DomainName::parse("*.example.com").unwrap().is_wildcard());
        for bad in [
            "a.*.example.com",
            "*a.example.com",
            "**.example.com",
            "*.*.example.com",
        ] {
            assert!(
                matches!(
                    DomainName::parse(bad),
                    Err(DomainError::BadWildcard(_) | DomainError::Invalid { .. })
                ),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn rejects_empty_labels_spaces_and_lengths() {
        assert_eq!(DomainName::parse(""), Err(DomainError::Empty));
        assert!(matches!(
            DomainName::parse("a..b.com"),
            Err(DomainError::EmptyLabel(_))
        ));
        assert!(matches!(
            DomainName::parse(".a.com"),
            Err(DomainError::EmptyLabel(_))
        ));
        assert!(matches!(
            DomainName::parse("ex ample.com"),
            Err(DomainError::Whitespace(_))
        ));
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(matches!(
            DomainName::parse(&long_label),
            Err(DomainError::LabelTooLong { .. })
        ));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        assert!(matches!(
            DomainName::parse(&long_name),
            Err(DomainError::TooLong(_))
        ));
        assert!(matches!(
            DomainName::parse("localhost"),
            Err(DomainError::SingleLabel(_))
        ));
        assert!(matches!(
            DomainName::parse("exa_mple.com"),
            Err(DomainError::Invalid { .. })
        ));
    }

    /// Found by the `domain` fuzz target: an address with a trailing dot, or spelled
    /// with characters IDN maps to digits and dots, passed as a name (and parsing the
    /// result again failed).
    #[test]
    fn addresses_in_any_spelling_are_refused() {
        for input in [
            "127.27.0.0.",
            "::1.",
            "\u{ff11}\u{ff12}\u{ff17}\u{ff0e}\u{ff10}\u{ff0e}\u{ff10}\u{ff0e}\u{ff11}",
            "127\u{3002}0\u{3002}0\u{3002}1",
            "*.127.0.0.1",
            "*.10.0.0.1.",
        ] {
            assert!(
                matches!(DomainName::parse(input), Err(DomainError::IpAddress(_))),
                "{input:?}: {:?}",
                DomainName::parse(input)
            );
        }
    }

    #[test]
    fn plain_addresses_are_ip_identifiers_in_canonical_form() {
        let v4 = DomainName::parse("192.0.2.10").unwrap();
        assert_eq!(v4.ip(), Some("192.0.2.10".parse().unwrap()));
        assert_eq!(v4.tls_alpn_server_name(), "10.2.0.192.in-addr.arpa");
        let v6 = DomainName::parse(" 2001:DB8:0::1 ").unwrap();
        assert_eq!(v6.as_str(), "2001:db8::1");
        assert_eq!(
            v6.tls_alpn_server_name(),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
        // An IPv4-mapped address is the IPv4 address.
        assert_eq!(DomainName::parse("::ffff:192.0.2.10").unwrap(), v4);
        assert!(!v4.is_wildcard());
        assert_eq!(DomainName::parse("example.com").unwrap().ip(), None);
        assert_eq!(
            DomainName::parse("example.com")
                .unwrap()
                .tls_alpn_server_name(),
            "example.com"
        );
        // Parsed again, and through JSON, it stays the same.
        assert_eq!(DomainName::parse(v6.as_str()).unwrap(), v6);
        let json = serde_json::to_string(&v6).unwrap();
        assert_eq!(serde_json::from_str::<DomainName>(&json).unwrap(), v6);
    }

    #[test]
    fn ip_store_names_are_valid_file_names() {
        for (input, stored) in [
            ("192.0.2.10", "192.0.2.10"),
            ("2001:db8::1", "2001_db8__1"),
            ("::1", "__1"),
        ] {
            let name = store_name(&parse_all(&[input]).unwrap());
            assert_eq!(name, stored);
            crate::store::fs::check_name(&name).unwrap();
        }
    }

    #[test]
    fn error_messages_are_one_line() {
        let err = DomainName::parse("a..b").unwrap_err().to_string();
        assert!(!err.contains('\n'));
        assert!(err.contains("a..b"));
    }

    #[test]
    fn parse_all_dedupes_in_order() {
        let names = parse_all(&["b.example", "A.example", "b.example."]).unwrap();
        let strs: Vec<_> = names.iter().map(DomainName::as_str).collect();
        assert_eq!(strs, ["b.example", "a.example"]);
    }

    #[test]
    fn challenge_fqdn_strips_wildcard() {
        let name = DomainName::parse("*.example.com").unwrap();
        assert_eq!(name.acme_challenge_fqdn(), "_acme-challenge.example.com.");
    }
}

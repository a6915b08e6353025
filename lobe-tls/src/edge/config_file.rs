//! What the configuration file holds: its `[[site]]` tables, read here, beside the tables
//! and keys other parts of lobe-tls read; anything else is refused with its line.

use serde::Deserialize;

use super::config::SiteConfig;
use crate::error::{Error, Result};

/// The top-level keys of the configuration file, each read by one part of lobe-tls:
/// `site` (here), `ca` (the fallback CAs), `rfc2136`, `cloudflare` and `httpreq` (the
/// DNS providers), `profile` (`--profile`), `client_prefix_v4` and `client_prefix_v6`
/// (who counts as one client). Any other is refused, not ignored: a misspelled
/// `[[sites]]` would drop its sites without a word.
pub const CONFIG_KEYS: &[&str] = &[
    "site",
    "ca",
    "rfc2136",
    "cloudflare",
    "httpreq",
    "profile",
    "client_prefix_v4",
    "client_prefix_v6",
];

/// Reads the `[[site]]` tables of a configuration file's text (other tables are left to
/// their readers). A top-level key outside [`CONFIG_KEYS`] is an error, and errors name
/// the line and column where the TOML parser gives one.
pub fn parse_sites(text: &str) -> Result<Vec<SiteConfig>> {
    let keys: std::collections::BTreeMap<toml::Spanned<String>, serde::de::IgnoredAny> =
        toml::from_str(text).map_err(|e| Error::config(toml_error(text, &e)))?;
    let mut unknown: Vec<_> = keys
        .into_keys()
        .filter(|key| !CONFIG_KEYS.contains(&key.get_ref().as_str()))
        .collect();
    unknown.sort_by_key(|key| key.span().start);
    if let Some(key) = unknown.first() {
        return Err(Error::config(unknown_key(text, key)));
    }
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        site: Vec<SiteConfig>,
    }
    let file: File = toml::from_str(text).map_err(|e| {
        Error::config(format!(
            "cannot read the [[site]] tables: {}",
            toml_error(text, &e)
        ))
    })?;
    Ok(file.site)
}

/// A TOML error on one line, with its line and column when the parser gives a place.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    // The parser puts a detail on a line of its own ("invalid table header\nexpected ...").
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// The 1-based line and column of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .chars()
        .count()
        + 1;
    (line, column)
}

/// How a known top-level key is written.
fn written(key: &str) -> String {
    match key {
        "site" | "ca" => format!("[[{key}]]"),
        "rfc2136" | "cloudflare" | "httpreq" => format!("[{key}]"),
        _ => key.to_owned(),
    }
}

/// The error for a top-level key nothing reads, with the closest known one when a
/// small typo explains it.
fn unknown_key(text: &str, key: &toml::Spanned<String>) -> String {
    let (line, _) = line_column(text, key.span().start);
    let name = key.get_ref();
    let hint = closest_key(name)
        .map(|known| format!(" (did you mean {}?)", written(known)))
        .unwrap_or_default();
    let known: Vec<String> = CONFIG_KEYS.iter().map(|k| written(k)).collect();
    format!(
        "line {line}: unknown top-level key `{name}`{hint}; the file takes {}",
        known.join(", ")
    )
}

/// The known key within a typo or two of `name` (one for short names), if any.
fn closest_key(name: &str) -> Option<&'static str> {
    let budget = (name.chars().count() / 3).clamp(1, 2);
    CONFIG_KEYS
        .iter()
        .map(|known| (strsim::levenshtein(name, known), *known))
        .filter(|(distance, _)| *distance <= budget)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, known)| known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::config::LbPolicy;
    use std::time::Duration;

    #[test]
    fn the_default_idle_timeout_is_at_least_an_hour() {
        let sites = parse_sites("[[site]]\nupstreams = [\"127.0.0.1:1\"]\n").unwrap_or_default();
        assert!(sites[0].idle() >= Duration::from_secs(3600));
        assert_eq!(sites[0].lb, LbPolicy::LeastConn);
    }

    #[test]
    fn a_broken_file_is_one_line() {
        let Err(e) = parse_sites("[[site]]\nupstreams = 3\n") else {
            panic!("accepted a broken file");
        };
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn a_misspelled_table_is_refused_with_its_line_and_the_closest_key() {
        let text = "client_prefix_v6 = 56\n\n[[sites]]\nupstreams = [\"127.0.0.1:1\"]\n";
        let e = parse_sites(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("line 3: unknown top-level key `sites` (did you mean [[site]]?)"),
            "{e}"
        );
        assert!(e.contains("[rfc2136]") && !e.contains('\n'), "{e}");
        // No guess when nothing is close.
        let e = parse_sites("banana = 1\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown top-level key `banana`;"), "{e}");
        assert_eq!(closest_key("client_prefix_4"), Some("client_prefix_v4"));
        assert_eq!(closest_key("cloudfare"), Some("cloudflare"));
        // Every key another reader takes is accepted.
        let all = "profile = \"classic\"\nclient_prefix_v4 = 24\nclient_prefix_v6 = 56\n\
                   [rfc2136]\n[cloudflare]\n[httpreq]\n[[ca]]\ndirectory = \"x\"\n\
                   [[site]]\nupstreams = [\"127.0.0.1:1\"]\n";
        assert_eq!(parse_sites(all).map(|s| s.len()).ok(), Some(1));
    }

    #[test]
    fn toml_errors_name_their_line() {
        let e = parse_sites("[[site]]\nupstreams = [\"127.0.0.1:1\"]\nupstream = 3\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("line 3, column 1: unknown field `upstream`"),
            "{e}"
        );
        let e = parse_sites("[[site]\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("line 1, column"), "{e}");
    }

    #[test]
    fn sites_parse_with_defaults_and_routes() {
        let sites = parse_sites(
            r#"
[rfc2136]
server = "127.0.0.1:53"

[[site]]
domains = ["chat.example.com"]
upstreams = ["10.0.0.1:8080", { addr = "10.0.0.2:8080", weight = 3 }]
lb = "cookie"
health_path = "/healthz"
health_interval = 0.5

[[site.route]]
path = "/api/"
upstreams = ["10.0.0.9:9000"]
lb = "ip-hash"
"#,
        )
        .unwrap_or_default();
        assert_eq!(sites.len(), 1);
        let site = &sites[0];
        assert_eq!(site.lb, LbPolicy::Cookie);
        assert_eq!(site.upstreams[1].weight(), 3);
        assert_eq!(site.health_interval, 0.5);
        assert!(
            site.idle() >= Duration::from_secs(3600),
            "idle default under 1 h"
        );
        assert_eq!(site.routes[0].lb, Some(LbPolicy::IpHash));
    }
}

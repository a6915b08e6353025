//! `serve --check-config`, as `nginx -t`: every check `serve` makes of its flags and the
//! --config file before it binds anything, each part on its own so that one error does
//! not hide the next. Nothing is bound, ordered, opened or contacted.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use lobe_tls::Result;
use lobe_tls::edge::SiteConfig;

use super::{Args, caps, flag_problems, flag_site, flag_site_problems, managed_cert};
use crate::global::Global;

/// Prints `ok: ...` on stdout (exit 0) or each error on a line of stderr (exit 2).
pub fn check_config(global: &Global, args: &Args) -> ExitCode {
    let report = check(global, args);
    if report.errors.is_empty() {
        println!(
            "ok: {} sites, {} upstreams, {} certificate names",
            report.sites, report.upstreams, report.names
        );
        ExitCode::SUCCESS
    } else {
        for error in &report.errors {
            eprintln!("lobe-tls: error: {}", crate::one_line(error));
        }
        ExitCode::from(2)
    }
}

/// What a check found.
#[derive(Debug, Default)]
struct Report {
    sites: usize,
    upstreams: usize,
    names: usize,
    errors: Vec<String>,
}

impl Report {
    /// Keeps the error of `result`, once (two readers may refuse the same thing).
    fn note<T>(&mut self, result: Result<T>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.push(e.to_string());
                None
            }
        }
    }

    fn push(&mut self, error: String) {
        if !self.errors.contains(&error) {
            self.errors.push(error);
        }
    }
}

fn check(global: &Global, args: &Args) -> Report {
    let mut report = Report::default();
    for problem in flag_problems(args) {
        report.push(problem.to_owned());
    }
    // The admin listener: a token file that reads, and no exposed page without one.
    let token = args
        .admin_token_file
        .as_deref()
        .map(|path| report.note(lobe_tls::server::AdminToken::read_file(path)));
    if let Some(addr) = args.admin_listen.0
        && token.is_none()
    {
        report.note(lobe_tls::server::check_admin_exposure(addr, false));
    }
    // The file is read once for its sites; when it cannot be read or is not TOML, that
    // one error stands and the other readers of the file are not asked to repeat it.
    let path = args.challenge.config_file.as_deref();
    let mut file_ok = true;
    let mut sites_read = true;
    let mut sites = Vec::new();
    if let Some(path) = path {
        file_ok = readable_toml(path);
        sites_read = false;
        if let Some(file_sites) = report.note(lobe_tls::edge::read_sites(path)) {
            sites_read = true;
            for site in &file_sites {
                for problem in site.problems().into_iter().chain(list_problems(site)) {
                    report.push(format!(
                        "{}: site {}: {problem}",
                        path.display(),
                        site.name()
                    ));
                }
            }
            sites = file_sites;
        }
    }
    let file = path.filter(|_| file_ok);
    if let Some(site) = flag_site(args) {
        for problem in flag_site_problems(&site) {
            report.push(problem);
        }
        sites.push(site);
    }
    // The credential files, read as the edge reads them when it builds the sites.
    for site in &sites {
        for problem in lobe_tls::edge::auth_problems(site) {
            report.push(problem);
        }
        if site.has_auth() && args.mode == lobe_tls::edge::Mode::Tcp {
            report.push(format!(
                "site {}: api_keys_file and basic_auth_file need --mode http (tcp mode reads no headers)",
                site.name()
            ));
        }
    }
    for problem in lobe_tls::edge::claim_problems(&sites) {
        report.push(problem);
    }
    // A file whose sites did not read may well have had some.
    if sites.is_empty() && sites_read {
        report.push(
            "no upstream: give --upstream HOST:PORT (repeatable) or [[site]] tables in --config"
                .to_owned(),
        );
    }
    report.note(caps::client_prefixes(
        args.client_prefix_v4,
        args.client_prefix_v6,
        file,
    ));
    report.note(managed_cert(args, file));
    report.note(args.challenge.to_config());
    report.note(args.on_demand.to_config());
    report.note(global.store_spec());
    report.note(global.acme_config_with_fallbacks(file, &args.challenge.dns_recursive));
    report.sites = sites.len();
    report.upstreams = sites.iter().map(upstream_count).sum();
    report.names = certificate_names(&args.domains, &sites);
    report
}

/// The entries of a site's and its routes' `allow` and `deny` lists that are not
/// networks (the edge compiles the lists only when it builds the sites).
fn list_problems(site: &SiteConfig) -> Vec<String> {
    let lists = [("", &site.allow, &site.deny)].into_iter().chain(
        site.routes
            .iter()
            .map(|route| (route.path.as_str(), &route.allow, &route.deny)),
    );
    let mut problems = Vec::new();
    for (route, allow, deny) in lists {
        let place = if route.is_empty() {
            String::new()
        } else {
            format!("route {route}: ")
        };
        for (key, list) in [("allow", allow), ("deny", deny)] {
            for entry in list {
                if let Err(e) = lobe_tls::edge::parse_cidr(entry) {
                    problems.push(format!("{place}{key}: {e}"));
                }
            }
        }
    }
    problems
}

/// Whether the file at `path` reads as TOML (`read_sites` says why when it does not).
fn readable_toml(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| text.parse::<toml::Table>().is_ok())
}

/// The distinct upstream addresses of a site, its routes' included.
fn upstream_count(site: &SiteConfig) -> usize {
    site.upstreams
        .iter()
        .chain(site.routes.iter().flat_map(|route| &route.upstreams))
        .map(|spec| spec.addr())
        .collect::<BTreeSet<_>>()
        .len()
}

/// The distinct names of `-d` and of the sites' domains, compared as DNS compares them.
fn certificate_names(domains: &[String], sites: &[SiteConfig]) -> usize {
    domains
        .iter()
        .chain(sites.iter().flat_map(|site| &site.domains))
        .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
        .collect::<BTreeSet<_>>()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_upstreams_are_counted_once() {
        let mut site = SiteConfig::new(
            vec!["A.example.".into(), "b.example".into()],
            vec![lobe_tls::edge::UpstreamSpec::Addr("127.0.0.1:1".into())],
        );
        site.upstreams
            .push(lobe_tls::edge::UpstreamSpec::Addr("127.0.0.1:1".into()));
        assert_eq!(upstream_count(&site), 1);
        site.deny = vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()];
        let problems = list_problems(&site);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("deny: \"10.0.0.0/33\""),
            "{problems:?}"
        );
        assert_eq!(
            certificate_names(&["a.example".into(), "c.example".into()], &[site]),
            3
        );
    }
}

//! The store's URL: the `prefix=` parameter lobe-tls adds to redis-rs's, the pieces of
//! the Sentinel and cluster URLs (node lists, credentials), and the redacted form that
//! messages name.

/// Takes `prefix=NAME` out of the URL's query; redis-rs does not know it.
pub(super) fn split_prefix(url: &str) -> (String, Option<String>) {
    let (rest, fragment) = match url.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (url, None),
    };
    let Some((base, query)) = rest.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut prefix = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("prefix=") {
            Some(value) => {
                prefix = Some(value.to_owned());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    (out, prefix)
}

/// The URL without its password, for messages. Everything up to the last `@` goes, so
/// a password with a stray `/`, `?` or `#` is hidden whole (at worst, more is hidden).
pub(super) fn redact(url: &str) -> String {
    crate::store::redact_url(url)
}

/// Why a Sentinel or cluster URL was refused, in words that never repeat its password.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadUrl(String);

impl From<&str> for BadUrl {
    fn from(why: &str) -> Self {
        BadUrl(why.to_owned())
    }
}

impl From<String> for BadUrl {
    fn from(why: String) -> Self {
        BadUrl(why)
    }
}

/// The user name and password in a URL's `USER:PASSWORD` (either may be empty), decoded.
pub(super) fn credentials(
    userinfo: Option<&str>,
) -> std::result::Result<(Option<String>, Option<String>), BadUrl> {
    let Some(userinfo) = userinfo else {
        return Ok((None, None));
    };
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let user = percent_decode(user).ok_or("the user name is badly %-encoded")?;
    let pass = percent_decode(pass).ok_or("the password is badly %-encoded")?;
    Ok((
        (!user.is_empty()).then_some(user),
        (!pass.is_empty()).then_some(pass),
    ))
}

/// `HOST:PORT`, `HOST` (`default_port`), `[V6]:PORT` or `[V6]`, of a `role` (`sentinel`,
/// `node`) that messages name.
pub(super) fn parse_host_port(
    spec: &str,
    default_port: u16,
    role: &str,
) -> std::result::Result<(String, u16), BadUrl> {
    let (host, port) = if let Some(rest) = spec.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{role} address {spec:?} lacks its closing ]"))?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("{role} address {spec:?} is malformed").into()),
            },
        }
    } else {
        match spec.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (spec, None),
        }
    };
    if host.is_empty() {
        return Err(format!(
            "{role} address {spec:?} has no host; list them as HOST:PORT,HOST:PORT"
        )
        .into());
    }
    let port = match port {
        None => default_port,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{role} address {spec:?} has a bad port"))?,
    };
    Ok((host.to_owned(), port))
}

/// Decodes `%XX` escapes; `None` if one is malformed or the result is not UTF-8.
pub(super) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

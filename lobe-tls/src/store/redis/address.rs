//! The store's URL: the `prefix=` parameter lobe-tls adds to redis-rs's, and the
//! redacted form that messages name.

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

//! API keys and basic auth: the credentials of a site or a route, read from their files
//! when the sites are built (at start and on each SIGHUP, so a file that does not read
//! leaves the running set in force), and a request's credential checked against them.
//! A leaf: it imports nothing of the edge but the configuration.
//!
//! Keys stored as `sha256:` digests are checked at once, in constant time. Password
//! hashes (argon2, bcrypt) cost milliseconds of CPU each: a flood of wrong passwords
//! would be a CPU exhaustion attack, so they run on blocking threads, two at a time in
//! the whole process, with a bounded queue; a success is remembered (keyed by a SHA-256
//! of the site and the credential) so that a legitimate client pays once per reload.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

mod files;

use super::config::SiteConfig;
use crate::error::{Error, Result};
use files::{read_api_keys, read_users};

/// The header that carries an API key unless `api_key_header` names another.
pub(crate) const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
/// The header through which the edge tells the upstream who was admitted; a client's own
/// is always removed.
pub(crate) const AUTHENTICATED_NAME: HeaderName = HeaderName::from_static("x-authenticated-name");
/// Longest credential header read; a longer one is refused unread.
const MAX_CREDENTIAL_HEADER: usize = 4096;
/// Password-hash verifications run at once in the process.
static SLOW_CHECKS: Semaphore = Semaphore::const_new(2);
/// Requests waiting for one; more are answered 503 at once.
const MAX_WAITING: usize = 256;
static WAITING: AtomicUsize = AtomicUsize::new(0);
/// Successful password-hash verifications remembered per credential set.
const CACHE_ENTRIES: usize = 4096;

/// The credentials that judge one block (a site, or a route that sets its own).
pub(crate) struct Credentials {
    realm: String,
    api_keys: Option<ApiKeys>,
    users: Option<Users>,
    pass_credentials: bool,
    /// SHA-256(site, credential) of credentials verified by a password hash → the name.
    verified: Mutex<HashMap<[u8; 32], Arc<str>>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counts only: hashes stay out of logs.
        f.debug_struct("Credentials")
            .field("realm", &self.realm)
            .field(
                "api_keys",
                &self
                    .api_keys
                    .as_ref()
                    .map(|k| k.digests.len() + k.hashed.len()),
            )
            .field("users", &self.users.as_ref().map(|u| u.by_name.len()))
            .finish_non_exhaustive()
    }
}

struct ApiKeys {
    header: HeaderName,
    /// (name, SHA-256 of the key).
    digests: Vec<(Arc<str>, [u8; 32])>,
    /// (name, argon2id PHC string).
    hashed: Vec<(Arc<str>, Arc<str>)>,
}

struct Users {
    /// user → (the user as a header value, its hash).
    by_name: HashMap<Vec<u8>, (Arc<str>, Arc<str>)>,
}

/// What one block of a site configures, for [`Credentials::load`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sources<'a> {
    pub api_keys_file: Option<&'a Path>,
    pub api_key_header: Option<&'a str>,
    pub basic_auth_file: Option<&'a Path>,
}

impl Credentials {
    /// The credentials of one block of site `site`, or `None` when it sets no file (it
    /// then inherits). A file that cannot be read, or a malformed line, is a one-line
    /// error naming the file and the line, never the line's text.
    pub(crate) fn load(
        site: &str,
        sources: Sources<'_>,
        pass_credentials: bool,
    ) -> Result<Option<Self>> {
        if sources.api_keys_file.is_none() && sources.basic_auth_file.is_none() {
            return Ok(None);
        }
        let api_keys = match sources.api_keys_file {
            Some(path) => {
                let header = sources.api_key_header.unwrap_or(DEFAULT_API_KEY_HEADER);
                let header = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                    Error::config(format!(
                        "site {site}: api_key_header {header:?} is not a header name"
                    ))
                })?;
                Some(read_api_keys(path, header)?)
            }
            None => None,
        };
        let users = sources.basic_auth_file.map(read_users).transpose()?;
        Ok(Some(Credentials {
            realm: site.replace(['"', '\\'], ""),
            api_keys,
            users,
            pass_credentials,
            verified: Mutex::new(HashMap::new()),
        }))
    }

    /// Checks the credentials `headers` carry: the API key header, `Authorization:
    /// Bearer` (with API keys) and `Authorization: Basic` (with users). Any one that
    /// passes admits.
    pub(crate) async fn verify(&self, headers: &HeaderMap) -> Verdict {
        let mut known: Option<Arc<str>> = None;
        if let Some(keys) = &self.api_keys
            && let Some(value) = headers.get(&keys.header)
        {
            match self.check_key(keys, value.as_bytes()).await {
                Check::Passed(name) => return self.admit(name, keys.header.clone()),
                Check::Busy => return Verdict::Busy,
                Check::Failed(_) => {}
            }
        }
        if let Some(value) = headers.get(header::AUTHORIZATION)
            && value.len() <= MAX_CREDENTIAL_HEADER
        {
            let value = value.as_bytes();
            let (scheme, rest) = match value.iter().position(|b| *b == b' ') {
                Some(at) => (&value[..at], trim(&value[at + 1..])),
                None => (value, &[][..]),
            };
            let check = if scheme.eq_ignore_ascii_case(b"bearer")
                && let Some(keys) = &self.api_keys
            {
                self.check_key(keys, rest).await
            } else if scheme.eq_ignore_ascii_case(b"basic")
                && let Some(users) = &self.users
            {
                self.check_basic(users, rest).await
            } else {
                Check::Failed(None)
            };
            match check {
                Check::Passed(name) => return self.admit(name, header::AUTHORIZATION),
                Check::Busy => return Verdict::Busy,
                Check::Failed(name) => known = known.or(name),
            }
        }
        Verdict::Refused(Refusal {
            name: known,
            challenges: self.challenges(),
        })
    }

    fn admit(&self, name: Arc<str>, header: HeaderName) -> Verdict {
        Verdict::Admitted(Authenticated {
            name,
            strip: if self.pass_credentials {
                Vec::new()
            } else {
                vec![header]
            },
        })
    }

    /// `WWW-Authenticate` values of a 401: one per scheme the block takes.
    fn challenges(&self) -> Vec<HeaderValue> {
        let mut out = Vec::new();
        let realm = &self.realm;
        if self.users.is_some() {
            out.extend(
                HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")).ok(),
            );
        }
        if self.api_keys.is_some() {
            out.extend(HeaderValue::from_str(&format!("Bearer realm=\"{realm}\"")).ok());
        }
        out
    }

    async fn check_key(&self, keys: &ApiKeys, key: &[u8]) -> Check {
        let key = trim(key);
        if key.is_empty() || key.len() > MAX_CREDENTIAL_HEADER {
            return Check::Failed(None);
        }
        let digest: [u8; 32] = Sha256::digest(key).into();
        // Every digest compared, each in constant time: neither the key nor which entry
        // it matched shows in the time taken.
        let mut found = None;
        for (name, stored) in &keys.digests {
            if bool::from(digest.ct_eq(stored)) && found.is_none() {
                found = Some(name.clone());
            }
        }
        if let Some(name) = found {
            return Check::Passed(name);
        }
        if keys.hashed.is_empty() {
            return Check::Failed(None);
        }
        let remembered = self.remembered(&[b"key", key]);
        if let Some(name) = self.recall(&remembered) {
            return Check::Passed(name);
        }
        let hashed = keys.hashed.clone();
        let key = Zeroizing::new(key.to_vec());
        let found = slowly(move || {
            use argon2::password_hash::PasswordVerifier;
            hashed
                .iter()
                .find(|(_, hash)| {
                    argon2::Argon2::default()
                        .verify_password(&key, hash.as_ref())
                        .is_ok()
                })
                .map(|(name, _)| name.clone())
        })
        .await;
        self.settle(remembered, found)
    }

    async fn check_basic(&self, users: &Users, encoded: &[u8]) -> Check {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return Check::Failed(None);
        };
        let decoded = Zeroizing::new(decoded);
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return Check::Failed(None);
        };
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        let entry = users.by_name.get(user);
        let remembered = self.remembered(&[b"basic", &decoded]);
        if entry.is_some()
            && let Some(name) = self.recall(&remembered)
        {
            return Check::Passed(name);
        }
        // An unknown user costs one verification too (against another user's hash, the
        // answer ignored), so the time taken does not tell which users exist.
        let Some((name, hash)) = entry.or_else(|| users.by_name.values().next()).cloned() else {
            return Check::Failed(None);
        };
        let exists = entry.is_some();
        let password = Zeroizing::new(password.to_vec());
        let passed = slowly(move || verify_password(&password, &hash)).await;
        match passed {
            None => Check::Busy,
            Some(true) if exists => self.settle(remembered, Some(Some(name))),
            // A known user with a wrong password: named in the log.
            Some(false) if exists => Check::Failed(Some(name)),
            Some(_) => Check::Failed(None),
        }
    }

    /// The cache key of a credential: SHA-256 of the site and the credential's parts.
    fn remembered(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.realm.as_bytes());
        for part in parts {
            hasher.update([0u8]);
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.finalize().into()
    }

    fn recall(&self, key: &[u8; 32]) -> Option<Arc<str>> {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// The outcome of a slow check (`None`: no room to run it), remembered on success.
    fn settle(&self, key: [u8; 32], outcome: Option<Option<Arc<str>>>) -> Check {
        match outcome {
            None => Check::Busy,
            Some(None) => Check::Failed(None),
            Some(Some(name)) => {
                let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
                if verified.len() >= CACHE_ENTRIES
                    && let Some(evicted) = verified.keys().next().copied()
                {
                    verified.remove(&evicted);
                }
                verified.insert(key, name.clone());
                Check::Passed(name)
            }
        }
    }
}

/// A basic-auth password against a bcrypt or argon2 hash.
fn verify_password(password: &[u8], hash: &str) -> bool {
    if hash.starts_with("$argon2") {
        use argon2::password_hash::PasswordVerifier;
        argon2::Argon2::default()
            .verify_password(password, hash)
            .is_ok()
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

/// Runs `check` on a blocking thread once one of the process's few slots is free;
/// `None` when too many requests already wait for one.
async fn slowly<T: Send + 'static>(check: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    /// Counts a waiting request until it holds a slot or is dropped.
    struct Waiting;
    impl Drop for Waiting {
        fn drop(&mut self) {
            WAITING.fetch_sub(1, Ordering::Relaxed);
        }
    }
    if WAITING.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING {
        WAITING.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let waiting = Waiting;
    let permit = SLOW_CHECKS.acquire().await.ok()?;
    drop(waiting);
    // The slot goes with the work: a client that hangs up does not free it early.
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        check()
    })
    .await
    .ok()
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end.max(start)]
}

enum Check {
    Passed(Arc<str>),
    /// With the name of the entry that was tried, when one was (a known user).
    Failed(Option<Arc<str>>),
    Busy,
}

/// What a block made of a request's credentials.
#[derive(Debug)]
pub(crate) enum Verdict {
    Admitted(Authenticated),
    Refused(Refusal),
    /// Too many password checks wait already: 503, try again.
    Busy,
}

/// Who a request was admitted as, carried to the forwarding phase.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated {
    /// The key's or the user's NAME.
    pub name: Arc<str>,
    /// The headers that carried an admitting credential, removed before the upstream.
    pub strip: Vec<HeaderName>,
}

impl Authenticated {
    /// Adds what another block admitted.
    pub(crate) fn and(mut self, other: Authenticated) -> Self {
        self.strip.extend(other.strip);
        self
    }
}

/// A 401: the name of the entry that was tried, if any (for the log), and the
/// `WWW-Authenticate` values.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub name: Option<Arc<str>>,
    pub challenges: Vec<HeaderValue>,
}

/// The request's headers as the upstream gets them: a client's own
/// `X-Authenticated-Name` always removed; for an admitted request, the credential removed
/// (unless `pass_credentials`) and the name the edge vouches for added.
pub(crate) fn vouch(headers: &mut HeaderMap, authenticated: Option<&Authenticated>) {
    headers.remove(&AUTHENTICATED_NAME);
    let Some(authenticated) = authenticated else {
        return;
    };
    for name in &authenticated.strip {
        headers.remove(name);
    }
    if let Ok(value) = HeaderValue::from_str(&authenticated.name) {
        headers.insert(AUTHENTICATED_NAME, value);
    }
}

/// Every block of `site` (the site's own, then each route's) with the files it sets.
pub(crate) fn blocks(site: &SiteConfig) -> Vec<(String, Sources<'_>)> {
    let own = Sources {
        api_keys_file: site.api_keys_file.as_deref(),
        api_key_header: site.api_key_header.as_deref(),
        basic_auth_file: site.basic_auth_file.as_deref(),
    };
    std::iter::once((String::new(), own))
        .chain(site.routes.iter().map(|route| {
            (
                format!(" route {}", route.path),
                Sources {
                    api_keys_file: route.api_keys_file.as_deref(),
                    api_key_header: route
                        .api_key_header
                        .as_deref()
                        .or(site.api_key_header.as_deref()),
                    basic_auth_file: route.basic_auth_file.as_deref(),
                },
            )
        }))
        .collect()
}

/// What is wrong with the credential files of `site` and its routes, one line each (as
/// `serve --check-config` reports them); empty when they all read.
pub fn problems(site: &SiteConfig) -> Vec<String> {
    let name = site.name();
    blocks(site)
        .into_iter()
        .filter_map(|(_, sources)| Credentials::load(&name, sources, false).err())
        .map(|e| e.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "k3y-0f-the-billing-service";

    fn sha256_line(name: &str, key: &str) -> String {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{name}:sha256:{hex}")
    }

    fn argon2id(secret: &str) -> String {
        use argon2::password_hash::PasswordHasher;
        // Small parameters: a test, not a deployment.
        let params = argon2::Params::new(1024, 1, 1, None).unwrap_or_default();
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        argon
            .hash_password_with_salt(secret.as_bytes(), b"saltsaltsaltsalt")
            .map(|h| h.to_string())
            .unwrap_or_default()
    }

    fn load(keys: Option<&str>, users: Option<&str>) -> Result<Credentials> {
        let dir = tempfile::tempdir().map_err(|e| Error::config(e.to_string()))?;
        let write = |file: &str, text: Option<&str>| {
            text.map(|text| {
                let path = dir.path().join(file);
                std::fs::write(&path, text).map(|()| path)
            })
            .transpose()
            .map_err(|e| Error::config(e.to_string()))
        };
        let keys = write("keys", keys)?;
        let users = write("users", users)?;
        let sources = Sources {
            api_keys_file: keys.as_deref(),
            api_key_header: None,
            basic_auth_file: users.as_deref(),
        };
        Credentials::load("a.example", sources, false)?
            .ok_or_else(|| Error::config("no credentials"))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                map.append(k, v);
            }
        }
        map
    }

    fn admitted(verdict: Verdict) -> Option<String> {
        match verdict {
            Verdict::Admitted(a) => Some(a.name.to_string()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn sha256_and_argon2id_keys_admit_by_header_and_bearer() {
        let file = format!(
            "# billing\n\n{}\n  {}  \n",
            sha256_line("billing", KEY),
            format_args!("reports:{}", argon2id("another-key"))
        );
        let Ok(creds) = load(Some(&file), None) else {
            panic!("the keys file did not load");
        };
        let verdict = creds.verify(&headers(&[("x-api-key", KEY)])).await;
        assert_eq!(admitted(verdict).as_deref(), Some("billing"));
        let bearer = format!("Bearer {KEY}");
        let verdict = creds.verify(&headers(&[("authorization", &bearer)])).await;
        assert_eq!(admitted(verdict).as_deref(), Some("billing"));
        let verdict = creds
            .verify(&headers(&[("x-api-key", "another-key")]))
            .await;
        assert_eq!(admitted(verdict).as_deref(), Some("reports"));
        // The second time from the cache.
        assert_eq!(creds.verified.lock().map(|v| v.len()).unwrap_or(0), 1);
        let verdict = creds
            .verify(&headers(&[("authorization", "bearer another-key")]))
            .await;
        assert_eq!(admitted(verdict).as_deref(), Some("reports"));
        for wrong in [
            &[("x-api-key", "nope")][..],
            &[],
            &[("authorization", "Basic eDp5")],
        ] {
            let Verdict::Refused(refusal) = creds.verify(&headers(wrong)).await else {
                panic!("admitted {wrong:?}");
            };
            assert_eq!(refusal.challenges.len(), 1);
            assert_eq!(refusal.challenges[0], "Bearer realm=\"a.example\"");
        }
        assert!(creds.verified.lock().map(|v| v.len()).unwrap_or(0) == 1);
        // Debug output shows counts, not hashes.
        let debug = format!("{creds:?}");
        assert!(
            !debug.contains("argon2") && !debug.contains("sha256"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn basic_auth_takes_bcrypt_and_argon2_and_names_the_user_it_refuses() {
        let bcrypt_hash = bcrypt::hash("s3cret", 4).unwrap_or_default();
        let file = format!("alice:{bcrypt_hash}\nbob:{}\n", argon2id("hunter2"));
        let Ok(creds) = load(Some(&sha256_line("svc", KEY)), Some(&file)) else {
            panic!("the files did not load");
        };
        let basic = |user: &str, password: &str| {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            headers(&[("authorization", &format!("Basic {encoded}"))])
        };
        assert_eq!(
            admitted(creds.verify(&basic("alice", "s3cret")).await).as_deref(),
            Some("alice")
        );
        assert_eq!(
            admitted(creds.verify(&basic("bob", "hunter2")).await).as_deref(),
            Some("bob")
        );
        // Either credential admits a site with both.
        let verdict = creds.verify(&headers(&[("x-api-key", KEY)])).await;
        assert_eq!(admitted(verdict).as_deref(), Some("svc"));
        let Verdict::Refused(refusal) = creds.verify(&basic("alice", "wrong")).await else {
            panic!("a wrong password passed");
        };
        assert_eq!(refusal.name.as_deref(), Some("alice"));
        assert_eq!(refusal.challenges.len(), 2);
        assert!(
            refusal.challenges[0]
                .to_str()
                .unwrap_or_default()
                .starts_with("Basic realm=\"a.example\"")
        );
        let Verdict::Refused(refusal) = creds.verify(&basic("mallory", "s3cret")).await else {
            panic!("an unknown user passed");
        };
        assert_eq!(refusal.name, None);
        let Verdict::Refused(_) = creds
            .verify(&headers(&[("authorization", "Basic !!!")]))
            .await
        else {
            panic!("junk passed");
        };
        // A header past the cap is not read.
        let long = format!("Basic {}", "A".repeat(MAX_CREDENTIAL_HEADER + 4));
        let Verdict::Refused(_) = creds.verify(&headers(&[("authorization", &long)])).await else {
            panic!("a huge header passed");
        };
    }

    #[test]
    fn malformed_lines_name_the_file_and_line_and_never_the_secret() {
        let hex = "A".repeat(64);
        for (keys, users, line, says) in [
            (
                Some(format!("ok:sha256:{}\nbad:sha256:{hex}\n", "a".repeat(64))),
                None,
                2,
                "lowercase hex",
            ),
            (
                Some("\n# c\nno-colon-here\n".to_owned()),
                None,
                3,
                "NAME:HASH",
            ),
            (Some("x:md5:abc\n".to_owned()), None, 1, "argon2id"),
            (
                Some("x:$argon2id$garbage\n".to_owned()),
                None,
                1,
                "argon2id",
            ),
            (Some(":sha256:abc\n".to_owned()), None, 1, "name"),
            (None, Some("u:$apr1$xyz$abc\n".to_owned()), 1, "htpasswd -B"),
            (None, Some("u:$2y$05$tooshort\n".to_owned()), 1, "bcrypt"),
        ] {
            let Err(e) = load(keys.as_deref(), users.as_deref()) else {
                panic!("accepted {keys:?} {users:?}");
            };
            let e = e.to_string();
            let file = if keys.is_some() { "keys" } else { "users" };
            assert!(e.contains(&format!("{file}:{line}: ")), "{e}");
            assert!(e.contains(says), "{e}");
            assert!(
                !e.contains('\n') && !e.contains(&hex) && !e.contains("xyz"),
                "{e}"
            );
        }
        let twice = format!(
            "u:{}\nu:{}\n",
            bcrypt::hash("a", 4).unwrap_or_default(),
            bcrypt::hash("b", 4).unwrap_or_default()
        );
        let e = load(None, Some(&twice))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("users:2: user u is listed already on line 1"),
            "{e}"
        );
        let e = load(Some("x"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("keys:1"), "{e}");
    }

    #[test]
    fn the_edge_vouches_for_the_name_and_drops_the_credential() {
        let mut map = headers(&[
            ("x-authenticated-name", "admin"),
            ("x-api-key", KEY),
            ("authorization", "Bearer other"),
        ]);
        vouch(&mut map, None);
        assert!(map.get("x-authenticated-name").is_none());
        let who = Authenticated {
            name: "billing".into(),
            strip: vec![HeaderName::from_static("x-api-key")],
        };
        map.insert(AUTHENTICATED_NAME, HeaderValue::from_static("admin"));
        vouch(&mut map, Some(&who));
        assert_eq!(
            map.get("x-authenticated-name").map(|v| v.as_bytes()),
            Some(&b"billing"[..])
        );
        assert!(map.get("x-api-key").is_none());
        // Only the credential that admitted goes.
        assert!(map.get("authorization").is_some());
    }

    #[tokio::test]
    async fn a_flood_of_slow_checks_runs_two_at_a_time() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (running, most) = (running.clone(), most.clone());
                tokio::spawn(slowly(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                }))
            })
            .collect();
        for task in tasks {
            assert!(matches!(task.await, Ok(Some(()))));
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?}");
    }
}

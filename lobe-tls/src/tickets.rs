//! TLS 1.3 session tickets whose keys are shared through the store, so that a client
//! that got a ticket from one instance resumes on any other instance behind the same
//! load balancer.
//!
//! The store holds one small secret blob with three keys: the previous one (still
//! accepted), the current one (tickets are sealed with it) and the next one (already
//! accepted, sealing starts at the next rotation). Every instance reads the blob at start
//! and polls it; whichever instance finds it due rotates it under the store's lock
//! (previous dropped, current becomes previous, next becomes current, a fresh next). As
//! each key is known to every instance a whole period before anyone seals with it, an
//! instance that polls late still opens every ticket its peers issue.
//!
//! Tickets are sealed with AES-256-GCM from aws-lc-rs: a 4-byte key id, a random 96-bit
//! nonce, then the ciphertext and tag; the key id is also the additional data.
//!
//! A single process without a store uses rustls's own rotating ticketer instead
//! ([`local_ticketer`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::store::{DynStore, SharedSecret};

/// How often ticket keys are rotated by default.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(12 * 3600);
/// How often an instance re-reads the shared keys by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(60);
/// The secret's name in the store.
const SECRET_NAME: &str = "session-ticket-keys";
/// The store lock taken to rotate (not a certificate name: those never start with `_-`).
const LOCK_NAME: &str = "_-session-ticket-keys";
/// The blob's format tag.
const MAGIC: &[u8; 4] = b"LTK1";
const KEY_LEN: usize = 32;
const ID_LEN: usize = 4;

/// How shared ticket keys are kept.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TicketConfig {
    /// How long each key seals tickets before the next one takes over; also the
    /// lifetime announced to clients.
    pub rotation: Duration,
    /// How often the keys are re-read from the store.
    pub poll: Duration,
}

impl Default for TicketConfig {
    fn default() -> Self {
        TicketConfig {
            rotation: DEFAULT_ROTATION,
            poll: DEFAULT_POLL,
        }
    }
}

/// rustls's own ticketer (random keys per process, rotated every 6 hours): resumption
/// on one instance, with nothing stored.
pub fn local_ticketer() -> Result<Arc<dyn ProducesTickets>> {
    rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| Error::config(format!("cannot set up session tickets: {e}")))
}

/// One raw key and its id.
#[derive(Clone)]
struct RawKey {
    id: u32,
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl RawKey {
    fn generate(rng: &SystemRandom) -> Result<Self> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        let mut id = [0u8; ID_LEN];
        rng.fill(bytes.as_mut())
            .and_then(|()| rng.fill(&mut id))
            .map_err(|_| Error::config("no randomness for session ticket keys"))?;
        Ok(RawKey {
            id: u32::from_be_bytes(id),
            bytes,
        })
    }
}

/// The three keys as stored: previous, current, next.
#[derive(Clone)]
struct KeySet {
    /// Unix seconds of the last rotation.
    rotated_at: i64,
    previous: RawKey,
    current: RawKey,
    next: RawKey,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids only: the keys never reach a log.
        f.debug_struct("KeySet")
            .field("rotated_at", &self.rotated_at)
            .field("current", &self.current.id)
            .finish_non_exhaustive()
    }
}

impl KeySet {
    fn generate(now: i64, rng: &SystemRandom) -> Result<Self> {
        Ok(KeySet {
            rotated_at: now,
            previous: RawKey::generate(rng)?,
            current: RawKey::generate(rng)?,
            next: RawKey::generate(rng)?,
        })
    }

    /// Whether the set is due for rotation at `now`.
    fn due(&self, now: i64, rotation: Duration) -> bool {
        now.saturating_sub(self.rotated_at) >= secs(rotation)
    }

    /// The set after one rotation at `now`; a set more than two periods old is replaced
    /// whole, as its next key is old too.
    fn rotated(&self, now: i64, rotation: Duration, rng: &SystemRandom) -> Result<Self> {
        if now.saturating_sub(self.rotated_at) >= 2 * secs(rotation) {
            return Self::generate(now, rng);
        }
        Ok(KeySet {
            rotated_at: now,
            previous: self.current.clone(),
            current: self.next.clone(),
            next: RawKey::generate(rng)?,
        })
    }

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(4 + 8 + 3 * (ID_LEN + KEY_LEN)));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.rotated_at.to_be_bytes());
        for key in [&self.previous, &self.current, &self.next] {
            out.extend_from_slice(&key.id.to_be_bytes());
            out.extend_from_slice(key.bytes.as_ref());
        }
        out
    }

    fn decode(data: &[u8]) -> Option<Self> {
        let rest = data.strip_prefix(MAGIC.as_slice())?;
        let (at, mut rest) = rest.split_first_chunk::<8>()?;
        let mut keys = Vec::with_capacity(3);
        for _ in 0..3 {
            let (id, tail) = rest.split_first_chunk::<ID_LEN>()?;
            let (key, tail) = tail.split_first_chunk::<KEY_LEN>()?;
            keys.push(RawKey {
                id: u32::from_be_bytes(*id),
                bytes: Zeroizing::new(*key),
            });
            rest = tail;
        }
        if !rest.is_empty() {
            return None;
        }
        let next = keys.pop()?;
        let current = keys.pop()?;
        let previous = keys.pop()?;
        Some(KeySet {
            rotated_at: i64::from_be_bytes(*at),
            previous,
            current,
            next,
        })
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX).max(1)
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// The keys in use, ready for the AEAD.
struct Sealer {
    current: (u32, LessSafeKey),
    accepted: Vec<(u32, LessSafeKey)>,
}

impl Sealer {
    fn new(set: &KeySet) -> Result<Self> {
        let key = |raw: &RawKey| {
            UnboundKey::new(&AES_256_GCM, raw.bytes.as_ref())
                .map(|k| (raw.id, LessSafeKey::new(k)))
                .map_err(|_| Error::config("unusable session ticket key"))
        };
        Ok(Sealer {
            current: key(&set.current)?,
            accepted: vec![key(&set.current)?, key(&set.next)?, key(&set.previous)?],
        })
    }
}

/// A rustls ticketer sealing with keys from the store; see the module documentation.
pub struct SharedTicketer {
    sealer: ArcSwap<Sealer>,
    /// The id of the current key, to tell when a re-read brought new keys.
    current_id: std::sync::atomic::AtomicU32,
    lifetime: u32,
    rng: SystemRandom,
}

impl fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedTicketer")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl SharedTicketer {
    fn new(set: &KeySet, rotation: Duration) -> Result<Self> {
        Ok(SharedTicketer {
            sealer: ArcSwap::from_pointee(Sealer::new(set)?),
            current_id: std::sync::atomic::AtomicU32::new(set.current.id),
            lifetime: u32::try_from(rotation.as_secs()).unwrap_or(u32::MAX),
            rng: SystemRandom::new(),
        })
    }

    fn install(&self, set: &KeySet) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.current_id.load(Ordering::Relaxed) == set.current.id {
            return Ok(());
        }
        self.sealer.store(Arc::new(Sealer::new(set)?));
        self.current_id.store(set.current.id, Ordering::Relaxed);
        tracing::info!("session ticket keys rotated");
        Ok(())
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let sealer = self.sealer.load();
        let (id, key) = &sealer.current;
        let id = id.to_be_bytes();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(ID_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&id);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id),
            &mut sealed,
        )
        .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let (id, rest) = cipher.split_first_chunk::<ID_LEN>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let sealer = self.sealer.load();
        let wanted = u32::from_be_bytes(*id);
        let (_, key) = sealer.accepted.iter().find(|(k, _)| *k == wanted)?;
        let mut buf = sealed.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(*id),
                &mut buf,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

/// Ticket keys shared through a store, kept fresh by a background task that stops when
/// this is dropped.
#[derive(Debug)]
pub struct SharedTickets {
    ticketer: Arc<SharedTicketer>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SharedTickets {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SharedTickets {
    /// Reads the ticket keys from `store` (creating or rotating them under the store's
    /// lock when missing or due) and starts re-reading them every `config.poll`.
    /// Errors when the store cannot keep secrets or cannot be read.
    pub async fn start(store: DynStore, config: TicketConfig) -> Result<Self> {
        let set = sync(&store, &config).await?;
        let ticketer = Arc::new(SharedTicketer::new(&set, config.rotation)?);
        let keys = ticketer.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.poll.max(Duration::from_secs(1)));
            tick.tick().await;
            loop {
                tick.tick().await;
                match sync(&store, &config).await {
                    Ok(set) => {
                        if let Err(e) = keys.install(&set) {
                            tracing::warn!(error = %e, "cannot use the session ticket keys");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot refresh the session ticket keys; keeping the ones in use")
                    }
                }
            }
        });
        Ok(SharedTickets { ticketer, task })
    }

    /// The ticketer to put into [`rustls::ServerConfig::ticketer`].
    pub fn ticketer(&self) -> Arc<dyn ProducesTickets> {
        self.ticketer.clone()
    }
}

/// The key set to use now: the stored one, or under the store's lock a new or rotated
/// one, saved for the other instances. When another instance holds the lock (it is
/// rotating), the stored set serves until its keys arrive at the next poll.
async fn sync(store: &DynStore, config: &TicketConfig) -> Result<KeySet> {
    let now = now();
    SharedSecret {
        name: SECRET_NAME,
        lock: LOCK_NAME,
        what: "session ticket key",
    }
    .load_or_create(
        store,
        decode_stored,
        |set| !set.due(now, config.rotation),
        |stored| {
            let rng = SystemRandom::new();
            let set = match stored {
                Some(set) => set.rotated(now, config.rotation, &rng)?,
                None => KeySet::generate(now, &rng)?,
            };
            let encoded = set.encode();
            Ok((set, encoded))
        },
    )
    .await
}

/// The stored key set; an unreadable blob counts as none (it is replaced).
fn decode_stored(data: &[u8]) -> Option<KeySet> {
    let set = KeySet::decode(data);
    if set.is_none() {
        tracing::warn!("the stored session ticket keys are unreadable; replacing them");
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn ticketer(set: &KeySet) -> SharedTicketer {
        SharedTicketer::new(set, 12 * HOUR).unwrap_or_else(|e| panic!("{e}"))
    }

    fn set(now: i64) -> KeySet {
        KeySet::generate(now, &SystemRandom::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_ticket_opens_with_the_same_keys_and_not_when_tampered_with() {
        let keys = set(0);
        let a = ticketer(&keys);
        let b = ticketer(&KeySet::decode(&keys.encode()).unwrap_or_else(|| panic!("decode")));
        let ticket = a.encrypt(b"session state").unwrap_or_default();
        assert_eq!(b.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(b.decrypt(&bad), None, "byte {i}");
        }
        assert_eq!(b.decrypt(&ticket[..10]), None);
        assert_eq!(b.decrypt(&[]), None);
        let other = ticketer(&set(0));
        assert_eq!(other.decrypt(&ticket), None);
    }

    #[test]
    fn rotation_keeps_tickets_of_the_previous_key_and_accepts_the_next_key_early() {
        let rng = SystemRandom::new();
        let rotation = 12 * HOUR;
        let first = set(1_000);
        assert!(!first.due(1_000 + 11 * 3600, rotation));
        assert!(first.due(1_000 + 12 * 3600, rotation));
        let second = first
            .rotated(1_000 + 12 * 3600, rotation, &rng)
            .unwrap_or_else(|e| panic!("{e}"));
        let old = ticketer(&first);
        let new = ticketer(&second);
        // Sealed before the rotation: still opens after it.
        let before = old.encrypt(b"before").unwrap_or_default();
        assert_eq!(new.decrypt(&before).as_deref(), Some(&b"before"[..]));
        // Sealed by an instance that rotated already: opens on one that has not yet.
        let after = new.encrypt(b"after").unwrap_or_default();
        assert_eq!(old.decrypt(&after).as_deref(), Some(&b"after"[..]));
        // Two rotations later the first key is gone.
        let third = second
            .rotated(1_000 + 24 * 3600, rotation, &rng)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ticketer(&third).decrypt(&before), None);
        // Long unused: a whole new set.
        let stale = first
            .rotated(1_000 + 48 * 3600, rotation, &rng)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(stale.previous.id, first.next.id);
        assert_ne!(stale.current.id, first.next.id);
    }

    #[test]
    fn decoding_refuses_anything_but_a_whole_set() {
        let encoded = set(5).encode();
        assert!(KeySet::decode(&encoded).is_some());
        assert!(KeySet::decode(&encoded[..encoded.len() - 1]).is_none());
        let mut longer = encoded.to_vec();
        longer.push(0);
        assert!(KeySet::decode(&longer).is_none());
        assert!(KeySet::decode(b"LTK2").is_none());
        assert!(KeySet::decode(&[]).is_none());
    }

    #[test]
    fn debug_output_holds_no_key_material() {
        let keys = set(7);
        let text = format!("{keys:?} {:?}", ticketer(&keys));
        let hex: String = keys
            .current
            .bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!text.contains(&hex));
        assert!(!text.contains(&format!("{:?}", keys.current.bytes.as_ref())));
    }

    #[tokio::test]
    async fn instances_sharing_a_file_store_share_keys_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store: DynStore =
            Arc::new(crate::FileStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
        let a = SharedTickets::start(store.clone(), TicketConfig::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let b = SharedTickets::start(store.clone(), TicketConfig::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let ticket = a.ticketer().encrypt(b"state").unwrap_or_default();
        assert_eq!(
            b.ticketer().decrypt(&ticket).as_deref(),
            Some(&b"state"[..])
        );
        let path = dir.path().join("secrets").join(SECRET_NAME);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

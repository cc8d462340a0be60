//! Basic credentials: the `Authorization` header checked against `access.htpasswd` with bcrypt,
//! remembering verified and refused credentials apart, and limiting failed logins per client
//! address and per user before any bcrypt work.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::Digest as _;

use crate::config::access::Htpasswd;

/// `user` and `password` of an `Authorization: Basic …` header, if it is one and well formed.
pub fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// How long a checked (user, password) pair is remembered.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// How long a wrong pair is remembered (repeating it costs no bcrypt work meanwhile).
const REFUSED_TTL: Duration = Duration::from_secs(60);
/// Most remembered pairs of each kind. Right and wrong pairs are kept apart, so that wrong ones,
/// which anyone can make, never push out right ones.
const MAX_CACHED: usize = 10_000;
/// At most this many bcrypt computations run at once (the others wait), so a flood of wrong
/// passwords cannot take every core.
const MAX_BCRYPT: usize = 2;
/// Failed checks a client address (an IPv4 address, an IPv6 /64) may have pending before its
/// further uncached credentials are refused unchecked; one more is allowed every
/// [`FAILURE_REFILL`]. A check in progress counts as a failure until it succeeds.
pub const ADDRESS_FAILURES: u32 = 10;
/// Failed checks for one user name before checks for it from addresses that have failed too are
/// refused unchecked (an address with no pending failure is always checked).
pub const USER_FAILURES: u32 = 10;
/// How fast a failure is forgotten: one per this long (10 a minute).
pub const FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Most addresses and most user names tracked for failures each; when full, those whose failures
/// are all forgotten make room.
const MAX_TRACKED: usize = 10_000;

/// The answer to a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Right: the user name.
    Allowed(String),
    /// Missing, malformed or wrong.
    Refused,
    /// Not checked: too many recent failures from this client address (or for this user from an
    /// address that failed too). Nothing is known about the credentials; try again after this.
    Limited { retry_after: Duration },
}

/// Failures of one address or user, as a token bucket: each pending failure takes a token, and
/// tokens come back one per [`FAILURE_REFILL`].
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, burst: u32, now: Instant) {
        let earned =
            now.saturating_duration_since(self.at).as_secs_f64() / FAILURE_REFILL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(f64::from(burst));
        self.at = now;
    }

    /// Time until one token is back.
    fn wait(&self) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        Duration::from_secs_f64(missing * FAILURE_REFILL.as_secs_f64())
    }

    fn full(&self, burst: u32) -> bool {
        self.tokens >= f64::from(burst)
    }
}

/// Token buckets by key, bounded in number.
struct Buckets<K> {
    burst: u32,
    map: HashMap<K, Bucket>,
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new(burst: u32) -> Self {
        Buckets {
            burst,
            map: HashMap::new(),
        }
    }

    /// The bucket of `key`, refilled to `now`; `None` when the table is full of keys that still
    /// have failures pending (such a key is then not limited).
    fn get(&mut self, key: &K, now: Instant) -> Option<&mut Bucket> {
        if !self.map.contains_key(key) {
            if self.map.len() >= MAX_TRACKED {
                let burst = self.burst;
                self.map.retain(|_, b| {
                    b.refill(burst, now);
                    !b.full(burst)
                });
                if self.map.len() >= MAX_TRACKED {
                    return None;
                }
            }
            self.map.insert(
                key.clone(),
                Bucket {
                    tokens: f64::from(self.burst),
                    at: now,
                },
            );
        }
        let burst = self.burst;
        let b = self.map.get_mut(key)?;
        b.refill(burst, now);
        Some(b)
    }

    /// Gives back a token taken for a check that succeeded.
    fn refund(&mut self, key: &K, now: Instant) {
        let burst = self.burst;
        if let Some(b) = self.map.get_mut(key) {
            b.refill(burst, now);
            b.tokens = (b.tokens + 1.0).min(f64::from(burst));
        }
    }
}

/// The unit a client address is limited by: an IPv4 address, or the /64 of an IPv6 address (one
/// machine usually has a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => IpAddr::V4(a),
        IpAddr::V6(a) => IpAddr::V6(ipnet::Ipv6Net::new(a, 64).map_or(a, |n| n.network())),
    }
}

/// The failure limits, per address and per user name.
struct Limits {
    addresses: Buckets<IpAddr>,
    users: Buckets<String>,
}

/// What a check took from the limits before it ran.
struct Reservation {
    address: Option<IpAddr>,
    user: Option<String>,
    /// The address had no failure pending: its check goes in the lane failures cannot fill.
    clean: bool,
}

/// A check that identical requests share: right or wrong, or the time to wait when the limits
/// refused it.
type Flight = Arc<tokio::sync::OnceCell<Result<bool, Duration>>>;

/// Remembered answers: right pairs and wrong pairs apart, each bounded.
struct Remembered {
    verified: HashMap<[u8; 32], Instant>,
    refused: HashMap<[u8; 32], Instant>,
}

/// Checks `Authorization` headers against an htpasswd file, remembering results for a while, and
/// keeping clients whose credentials keep failing from delaying everyone else's first check.
pub struct Verifier {
    remembered: Mutex<Remembered>,
    limits: Mutex<Limits>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Checks from addresses with failures pending take this first, so they hold at most one of
    /// the [`MAX_BCRYPT`] slots and never queue in front of a clean address's check for long.
    suspect_lane: Arc<tokio::sync::Semaphore>,
    /// bcrypt computations run (`regcache_auth_bcrypt_checks_total`).
    checks: prometheus_client::metrics::counter::Counter,
    /// Checks running, by credentials key, for identical requests to join.
    in_flight: Mutex<HashMap<[u8; 32], Flight>>,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier::new(Default::default())
    }
}

impl Verifier {
    /// How long a client at `peer` must wait before a credential of its is checked again, when
    /// its address has [`ADDRESS_FAILURES`] failures pending (for checks without bcrypt, such as
    /// the peer token).
    pub fn address_limited(&self, peer: IpAddr) -> Option<Duration> {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let b = limits.addresses.get(&address_key(peer), Instant::now())?;
        (b.tokens < 1.0).then(|| b.wait())
    }

    /// Counts a refused credential (a wrong peer token) against `peer`'s address, like a failed
    /// login.
    pub fn address_failed(&self, peer: IpAddr) {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = limits.addresses.get(&address_key(peer), Instant::now()) {
            b.tokens = (b.tokens - 1.0).max(0.0);
        }
    }

    /// A verifier that counts its bcrypt computations in `checks`.
    pub fn new(checks: prometheus_client::metrics::counter::Counter) -> Verifier {
        Verifier {
            remembered: Mutex::new(Remembered {
                verified: HashMap::new(),
                refused: HashMap::new(),
            }),
            limits: Mutex::new(Limits {
                addresses: Buckets::new(ADDRESS_FAILURES),
                users: Buckets::new(USER_FAILURES),
            }),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_BCRYPT)),
            suspect_lane: Arc::new(tokio::sync::Semaphore::new(1)),
            checks,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Checks the credentials of `authorization`, sent by a client at `peer`.
    pub async fn check(
        &self,
        htpasswd: &Htpasswd,
        authorization: Option<&[u8]>,
        peer: IpAddr,
    ) -> Verdict {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return Verdict::Refused;
        };
        let hash = htpasswd.hash_of(&user);
        // The key covers the stored hash too: editing the file invalidates what was remembered.
        let mut h = sha2::Sha256::new();
        for part in [
            user.as_bytes(),
            password.as_bytes(),
            hash.unwrap_or("").as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let key: [u8; 32] = h.finalize().into();
        if let Some(ok) = self.remembered(&key) {
            return if ok {
                Verdict::Allowed(user)
            } else {
                Verdict::Refused
            };
        }
        let known = hash.is_some();
        let Some(stored) = hash.or(htpasswd.decoy.as_deref()).map(str::to_owned) else {
            return Verdict::Refused;
        };
        // Identical credentials arriving together (a client starting several pulls at once) share
        // one check, one bcrypt computation and one reservation.
        let flight = Arc::clone(
            self.in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_default(),
        );
        let outcome = *flight
            .get_or_init(|| self.verify(key, peer, &user, password, stored, known))
            .await;
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if in_flight.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                in_flight.remove(&key);
            }
        }
        match outcome {
            Ok(true) => Verdict::Allowed(user),
            Ok(false) => Verdict::Refused,
            Err(retry_after) => Verdict::Limited { retry_after },
        }
    }

    /// Reserves a failure, runs bcrypt in the right lane, gives the reservation back on success
    /// and remembers the answer; the time to wait when the limits refuse the check.
    async fn verify(
        &self,
        key: [u8; 32],
        peer: IpAddr,
        user: &str,
        password: String,
        stored: String,
        known: bool,
    ) -> Result<bool, Duration> {
        let reservation = self.reserve(peer, user)?;
        let lane = if reservation.clean {
            None
        } else {
            Arc::clone(&self.suspect_lane).acquire_owned().await.ok()
        };
        let Ok(permit) = Arc::clone(&self.slots).acquire_owned().await else {
            return Ok(false);
        };
        self.checks.inc();
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(password.as_bytes(), &stored).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
            && known;
        drop(lane);
        if ok {
            let now = Instant::now();
            let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(a) = &reservation.address {
                limits.addresses.refund(a, now);
            }
            if let Some(u) = &reservation.user {
                limits.users.refund(u, now);
            }
        }
        self.remember(key, ok);
        Ok(ok)
    }

    /// Takes a failure token from the address and, when it has one, from the user, before any
    /// bcrypt work; the time to wait when the check must not run.
    fn reserve(&self, peer: IpAddr, user: &str) -> Result<Reservation, Duration> {
        let now = Instant::now();
        let address = address_key(peer);
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let (clean, address) = match limits.addresses.get(&address, now) {
            Some(b) if b.tokens < 1.0 => return Err(b.wait()),
            Some(b) => {
                let clean = b.full(ADDRESS_FAILURES);
                b.tokens -= 1.0;
                (clean, Some(address))
            }
            // Too many addresses failing at once to track one more: checked, in the slow lane.
            None => (false, None),
        };
        let user = user.to_owned();
        let user = match limits.users.get(&user, now) {
            Some(b) if b.tokens >= 1.0 => {
                b.tokens -= 1.0;
                Some(user)
            }
            // The user's failures are used up: only an address without failures is checked, so
            // that flooding a name does not lock its owner out.
            Some(b) if !clean => {
                let wait = b.wait();
                if let Some(a) = &address {
                    limits.addresses.refund(a, now);
                }
                return Err(wait);
            }
            _ => None,
        };
        Ok(Reservation {
            address,
            user,
            clean,
        })
    }

    fn remembered(&self, key: &[u8; 32]) -> Option<bool> {
        let mut r = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = r.verified.get(key) {
            if at.elapsed() < VERIFIED_TTL {
                return Some(true);
            }
            r.verified.remove(key);
        }
        if let Some(at) = r.refused.get(key) {
            if at.elapsed() < REFUSED_TTL {
                return Some(false);
            }
            r.refused.remove(key);
        }
        None
    }

    fn remember(&self, key: [u8; 32], ok: bool) {
        let mut r = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        let (map, ttl) = if ok {
            (&mut r.verified, VERIFIED_TTL)
        } else {
            (&mut r.refused, REFUSED_TTL)
        };
        if map.len() >= MAX_CACHED {
            map.retain(|_, at| at.elapsed() < ttl);
        }
        if map.len() >= MAX_CACHED {
            if !ok {
                // Full of fresh wrong pairs: this one is not remembered (it is rate-limited anyway).
                return;
            }
            // Full of fresh right pairs (10,000 users logged in within 5 minutes): the oldest goes.
            if let Some(oldest) = map.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(key, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn basic_headers_parse() {
        let enc = base64::engine::general_purpose::STANDARD.encode("u:p:with:colons");
        assert_eq!(
            parse_basic(format!("Basic {enc}").as_bytes()),
            Some(("u".into(), "p:with:colons".into()))
        );
        assert_eq!(parse_basic(b"Bearer abc"), None);
        assert_eq!(parse_basic(b"Basic !!!"), None);
        assert_eq!(parse_basic(b"Basic"), None);
        assert_eq!(parse_basic(&[0xff, 0xfe]), None);
    }

    fn hdr(u: &str, p: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    }

    /// An htpasswd file where each of `names` has the password "right".
    fn users(names: &[&str]) -> Htpasswd {
        let hash = bcrypt::hash("right", 4).expect("hash");
        let text: String = names.iter().map(|n| format!("{n}:{hash}\n")).collect();
        Htpasswd::parse(&text, Path::new("h")).expect("valid")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[tokio::test]
    async fn verifier_checks_and_remembers() {
        let h = users(&["alice"]);
        let v = Verifier::default();
        let peer = ip("10.0.0.1");
        let check = |u: &str, p: &str| {
            let a = hdr(u, p);
            let v = &v;
            let h = &h;
            async move { v.check(h, Some(a.as_bytes()), peer).await }
        };
        assert_eq!(
            check("alice", "right").await,
            Verdict::Allowed("alice".into())
        );
        assert_eq!(check("alice", "wrong").await, Verdict::Refused);
        assert_eq!(check("mallory", "right").await, Verdict::Refused);
        assert_eq!(v.check(&h, None, peer).await, Verdict::Refused);
        assert_eq!(v.checks.get(), 3);
        // Remembered: a second check is answered from the cache.
        assert_eq!(
            check("alice", "right").await,
            Verdict::Allowed("alice".into())
        );
        assert_eq!(check("alice", "wrong").await, Verdict::Refused);
        assert_eq!(v.checks.get(), 3, "no bcrypt work for remembered answers");
        // A changed file invalidates the remembered answer.
        let hash2 = bcrypt::hash("new", 4).expect("hash");
        let h2 = Htpasswd::parse(&format!("alice:{hash2}\n"), Path::new("h")).expect("valid");
        assert_eq!(
            v.check(&h2, Some(hdr("alice", "right").as_bytes()), peer)
                .await,
            Verdict::Refused
        );
    }

    #[tokio::test]
    async fn failures_are_limited_per_address_before_any_bcrypt_work() {
        let hash = bcrypt::hash("right", 4).expect("hash");
        let h =
            Htpasswd::parse(&format!("alice:{hash}\nbob:{hash}\n"), Path::new("h")).expect("valid");
        let v = Verifier::default();
        let attacker = ip("10.0.0.66");
        for i in 0..ADDRESS_FAILURES {
            let a = hdr("alice", &format!("guess{i}"));
            assert_eq!(
                v.check(&h, Some(a.as_bytes()), attacker).await,
                Verdict::Refused
            );
        }
        let checked = v.checks.get();
        assert_eq!(checked, u64::from(ADDRESS_FAILURES));
        for i in 0..50 {
            let a = hdr("bob", &format!("more{i}"));
            match v.check(&h, Some(a.as_bytes()), attacker).await {
                Verdict::Limited { retry_after } => {
                    assert!(retry_after > Duration::ZERO && retry_after <= FAILURE_REFILL)
                }
                other => panic!("guess {i} over the limit: {other:?}"),
            }
        }
        // Even the right password is not checked from the flooding address...
        assert!(matches!(
            v.check(&h, Some(hdr("bob", "right").as_bytes()), attacker)
                .await,
            Verdict::Limited { .. }
        ));
        assert_eq!(v.checks.get(), checked, "no bcrypt work over the limit");
        // ...nor from another address of its IPv6 /64.
        let v6 = Verifier::default();
        for i in 0..ADDRESS_FAILURES {
            let a = hdr("alice", &format!("guess{i}"));
            let peer = ip(&format!("2001:db8::{i:x}"));
            assert_eq!(
                v6.check(&h, Some(a.as_bytes()), peer).await,
                Verdict::Refused
            );
        }
        assert!(matches!(
            v6.check(&h, Some(hdr("alice", "x").as_bytes()), ip("2001:db8::ffff"))
                .await,
            Verdict::Limited { .. }
        ));
        // A known wrong pair is still answered 401 from memory: it costs nothing.
        assert_eq!(
            v.check(&h, Some(hdr("alice", "guess0").as_bytes()), attacker)
                .await,
            Verdict::Refused
        );
        // Other addresses are checked as usual, the attacked user's included.
        assert_eq!(
            v.check(&h, Some(hdr("alice", "right").as_bytes()), ip("10.0.0.7"))
                .await,
            Verdict::Allowed("alice".into())
        );
    }

    #[tokio::test]
    async fn a_flooded_user_is_still_checked_from_an_address_without_failures() {
        let h = users(&["alice"]);
        let v = Verifier::default();
        // Failures for alice from many addresses, a few each: her name's budget runs out.
        for n in 0..USER_FAILURES {
            for i in 0..2 {
                let a = hdr("alice", &format!("guess{n}-{i}"));
                let peer = ip(&format!("10.1.0.{n}"));
                let _ = v.check(&h, Some(a.as_bytes()), peer).await;
            }
        }
        let checked = v.checks.get();
        // An address that already failed gets no more checks for alice.
        let r = v
            .check(&h, Some(hdr("alice", "again").as_bytes()), ip("10.1.0.1"))
            .await;
        assert!(matches!(r, Verdict::Limited { .. }), "{r:?}");
        assert_eq!(v.checks.get(), checked);
        // A clean address is checked: alice's own machine logs her in.
        assert_eq!(
            v.check(&h, Some(hdr("alice", "right").as_bytes()), ip("10.2.0.1"))
                .await,
            Verdict::Allowed("alice".into())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_credentials_arriving_together_share_one_check() {
        let h = Arc::new(users(&["alice"]));
        let v = Arc::new(Verifier::default());
        let peer = ip("10.0.0.1");
        // More at once than the address's failure budget: none is refused unchecked.
        let n = ADDRESS_FAILURES as usize * 3;
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (h, v, barrier) = (Arc::clone(&h), Arc::clone(&v), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    v.check(&h, Some(hdr("alice", "right").as_bytes()), peer)
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.expect("task"), Verdict::Allowed("alice".into()));
        }
        assert!(
            v.checks.get() < n as u64,
            "{} bcrypt checks for {n} identical requests",
            v.checks.get()
        );
        assert!(v.in_flight.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn wrong_passwords_never_evict_remembered_right_ones() {
        let h = users(&["alice"]);
        let v = Verifier::default();
        let peer = ip("10.0.0.1");
        assert_eq!(
            v.check(&h, Some(hdr("alice", "right").as_bytes()), peer)
                .await,
            Verdict::Allowed("alice".into())
        );
        for i in 0..(MAX_CACHED as u32 + 50) {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            v.remember(key, false);
        }
        assert_eq!(
            v.remembered.lock().expect("lock").refused.len(),
            MAX_CACHED,
            "wrong pairs are bounded"
        );
        let checked = v.checks.get();
        assert_eq!(
            v.check(&h, Some(hdr("alice", "right").as_bytes()), peer)
                .await,
            Verdict::Allowed("alice".into())
        );
        assert_eq!(v.checks.get(), checked, "still remembered");
    }
}

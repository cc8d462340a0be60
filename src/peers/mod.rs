//! The fleet as a tier: the other regcache servers of `[peers]`, which fill from each other.
//!
//! # Design
//!
//! Every server of a fleet reads the same list of base URLs, itself included, and the same token.
//! This module owns what one server knows of the others and how it talks to them; what to ask
//! them, and when, is the cache's (`cache/tier.rs`, the `Peer` tier).
//!
//! - **Identity.** Each server makes a random 128-bit `server_id` at start (no key in the
//!   config). A URL whose IP address and port are the listen address is this server; any other is
//!   recognised when it answers a probe or a request with this server's own id (a name, a
//!   `0.0.0.0` listener, NAT). Every peer request carries the sender's id
//!   ([`SERVER_ID_HEADER`]), so a server that reaches itself is told at once instead of waiting for
//!   its own fill.
//! - **One owner per digest.** [`score`] is the first 8 bytes of
//!   `sha256(url ‖ "\n" ‖ digest)`: rendezvous (highest random weight) hashing. Every server ranks
//!   the same URLs the same way, so they agree on the owner, and when a peer goes down only its
//!   digests move (to the next in rank). [`Peers::owners`] gives the healthy peers ranked above
//!   this server: the ones it asks, in order, before filling from its own tiers.
//! - **Health.** Every listed peer counts as up after start, until a probe or a request to it
//!   fails; then it is down at once (a black-holed peer costs one timeout) and skipped until a
//!   background probe (`GET /v2/` with the peer headers, expecting `200` and a server id) finds it
//!   again, after 0.5 s, then at doubling intervals up to 10 s. Up peers are probed every 3 s, so
//!   one that died quietly is noticed without a client paying for it (`health.rs`).
//! - **Requests** (`client.rs`): ordinary registry requests with [`TOKEN_HEADER`] (never
//!   `Authorization`: client and peer credentials never mix), [`HOP_HEADER`] (the receiver never
//!   forwards it to a third peer) and, for the outage queries, [`LOCAL_ONLY_HEADER`] (answer from
//!   the store only). An answer without the peer's server id is not a peer's (a load balancer, a
//!   refused token) and counts as a failure. They are sent on the background runtime given to
//!   [`Peers::new`], wherever the caller runs (`crate::runtime`), so that the pooled connections
//!   to peers live there and not on the shard of the request that opened them.
//!
//! A tier: it uses only the base layers (`config`, `oci`, `telemetry`).

mod client;
mod health;

use std::collections::HashSet;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::config::PeersConfig;
use crate::oci::reference::Digest;
use crate::telemetry::metrics::Metrics;

pub use client::{PeerAnswer, PeerError, PeerStream, Want};
pub use health::PeerStatus;

use health::Health;

/// Request header with the shared token: what makes a request a peer request.
pub const TOKEN_HEADER: &str = "x-regcache-peer-token";
/// Request header marking a request from a peer: the receiver never forwards it to a third peer.
pub const HOP_HEADER: &str = "x-regcache-hop";
/// Request header asking a peer to answer from its store only (the outage queries).
pub const LOCAL_ONLY_HEADER: &str = "x-regcache-local-only";
/// The sender's server id, on peer requests and on the answers to them.
pub const SERVER_ID_HEADER: &str = "x-regcache-server-id";
/// On a peer's answer for a tag: when the upstream last confirmed it (Unix milliseconds).
pub const CHECKED_AT_HEADER: &str = "x-regcache-checked-at";

/// How long a peer may take to answer a probe or an outage query beyond its connect timeout.
pub(crate) const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// The fleet as this server sees it; one per server, changed in place by [`Peers::apply`].
pub struct Peers {
    /// This server's id, sent with every peer request and answer.
    id: String,
    /// The address this server listens on, to recognise itself in the list.
    listen: SocketAddr,
    ring: RwLock<Arc<Ring>>,
    metrics: Arc<Metrics>,
    /// Where requests to peers are sent and their connections driven (the server's background
    /// runtime), wherever the caller runs.
    runtime: tokio::runtime::Handle,
}

/// The list and settings in force.
pub(crate) struct Ring {
    pub(crate) peers: Vec<Arc<Peer>>,
    pub(crate) settings: Arc<Settings>,
}

/// What every request to a peer needs.
pub(crate) struct Settings {
    pub(crate) token: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) client: reqwest::Client,
}

/// One listed server.
pub struct Peer {
    url: reqwest::Url,
    /// This server itself.
    me: AtomicBool,
    health: Mutex<Health>,
    /// Digests this peer answered with bytes that failed verification: not asked of it again.
    bad: Mutex<HashSet<Digest>>,
}

/// A digest's place for one peer: higher is asked first.
pub fn score(url: &str, d: &Digest) -> u64 {
    let sum = Digest::sha256_of(format!("{url}\n{d}").as_bytes());
    u64::from_str_radix(sum.hex().get(..16).unwrap_or("0"), 16).unwrap_or(0)
}

impl Peer {
    fn new(url: reqwest::Url, me: bool) -> Peer {
        Peer {
            url,
            me: AtomicBool::new(me),
            health: Mutex::new(Health::new()),
            bad: Mutex::new(HashSet::new()),
        }
    }

    /// Its base URL as listed (the key it is ranked and labelled by).
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Whether it is this server.
    pub fn is_self(&self) -> bool {
        self.me.load(Ordering::Relaxed)
    }

    /// Whether it is believed up (never asked while down).
    pub fn is_up(&self) -> bool {
        lock(&self.health).is_up()
    }

    /// Notes that its copy of `d` failed verification: it is not asked for `d` again.
    pub fn rejected(&self, d: &Digest) {
        tracing::error!(peer = self.url(), digest = %d, "a peer's bytes failed verification; not asking it for that digest again");
        lock(&self.bad).insert(d.clone());
    }

    /// Whether it may be asked for `d` (its copy of `d` never failed verification).
    pub fn may_give(&self, d: &Digest) -> bool {
        !lock(&self.bad).contains(d)
    }
}

impl Peers {
    /// The fleet of `config`, for a server listening on `listen`, sending its requests on
    /// `runtime`. Contacts nothing.
    pub fn new(
        config: &PeersConfig,
        listen: SocketAddr,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Peers> {
        let settings = Arc::new(Settings::new(config)?);
        let peers: Vec<Arc<Peer>> = config
            .urls
            .iter()
            .map(|u| Arc::new(Peer::new(u.clone(), is_listen_address(u, listen))))
            .collect();
        let p = Peers {
            id: new_server_id(),
            listen,
            ring: RwLock::new(Arc::new(Ring { peers, settings })),
            metrics,
            runtime,
        };
        for peer in &p.ring().peers {
            p.export(peer);
        }
        Ok(p)
    }

    /// This server's id.
    pub fn server_id(&self) -> &str {
        &self.id
    }

    pub(crate) fn ring(&self) -> Arc<Ring> {
        Arc::clone(&self.ring.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies a changed list, token or timeout. A peer listed before and after keeps its health
    /// (and whether it is this server).
    pub fn apply(&self, config: &PeersConfig) -> anyhow::Result<()> {
        let old = self.ring();
        let settings = if old.settings.token == config.token
            && old.settings.connect_timeout == config.connect_timeout
        {
            Arc::clone(&old.settings)
        } else {
            Arc::new(Settings::new(config)?)
        };
        let peers: Vec<Arc<Peer>> = config
            .urls
            .iter()
            .map(|u| match old.peers.iter().find(|p| p.url == *u) {
                Some(p) => Arc::clone(p),
                None => Arc::new(Peer::new(u.clone(), is_listen_address(u, self.listen))),
            })
            .collect();
        for gone in old
            .peers
            .iter()
            .filter(|p| !peers.iter().any(|n| n.url == p.url))
        {
            self.metrics.peer_up.remove(&Metrics::peer(gone.url()));
            self.metrics
                .peer_received_bytes
                .remove(&Metrics::peer(gone.url()));
        }
        let changed = peers.len() != old.peers.len()
            || peers.iter().zip(&old.peers).any(|(a, b)| a.url != b.url);
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Ring { peers, settings });
        for peer in &self.ring().peers {
            self.export(peer);
        }
        if changed {
            let urls: Vec<&str> = config.urls.iter().map(|u| u.as_str()).collect();
            tracing::info!(peers = ?urls, "peer list changed");
        }
        Ok(())
    }

    /// The healthy peers to ask for `d` before this server fills it from its own tiers: those
    /// ranked above this server (all of them when this server is not in the list), best first,
    /// without the ones whose copy of `d` failed verification.
    pub fn owners(&self, d: &Digest) -> Vec<Arc<Peer>> {
        let mut ranked: Vec<(u64, Arc<Peer>)> = self
            .ring()
            .peers
            .iter()
            .map(|p| (score(p.url(), d), Arc::clone(p)))
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.url().cmp(b.1.url())));
        ranked
            .into_iter()
            .map(|(_, p)| p)
            .take_while(|p| !p.is_self())
            .filter(|p| p.is_up() && p.may_give(d))
            .collect()
    }

    /// The healthy peers other than this server, for the outage queries.
    pub fn others_up(&self) -> Vec<Arc<Peer>> {
        self.ring()
            .peers
            .iter()
            .filter(|p| !p.is_self() && p.is_up())
            .cloned()
            .collect()
    }

    /// Whether `token` is the fleet's (compared in constant time).
    pub fn token_is(&self, token: &[u8]) -> bool {
        let want = Digest::sha256_of(self.ring().settings.token.as_bytes());
        let got = Digest::sha256_of(token);
        want.hex()
            .bytes()
            .zip(got.hex().bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Every listed peer and its health, for `/readyz`.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.ring().peers.iter().map(|p| p.status()).collect()
    }

    /// Sets `regcache_peer_up` for `peer`, and `regcache_peer_received_bytes_total` at 0 from
    /// the start (neither for this server itself).
    fn export(&self, peer: &Peer) {
        if peer.is_self() {
            self.metrics.peer_up.remove(&Metrics::peer(peer.url()));
            self.metrics
                .peer_received_bytes
                .remove(&Metrics::peer(peer.url()));
        } else {
            self.metrics
                .peer_up
                .get_or_create(&Metrics::peer(peer.url()))
                .set(i64::from(peer.is_up()));
            Metrics::at_zero(&self.metrics.peer_received_bytes, "peer", &[peer.url()]);
        }
    }
}

impl Settings {
    fn new(config: &PeersConfig) -> anyhow::Result<Settings> {
        // Straight to the peers, never through HTTP_PROXY: a fleet is one network.
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("regcache/", env!("CARGO_PKG_VERSION"), " peer"))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client for [peers]: {e}"))?;
        Ok(Settings {
            token: config.token.clone(),
            connect_timeout: config.connect_timeout,
            client,
        })
    }
}

/// Whether `url` names the address this server listens on (an IP address, not `0.0.0.0`, and
/// the same port).
fn is_listen_address(url: &reqwest::Url, listen: SocketAddr) -> bool {
    let ip = match url.host() {
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
        _ => return false,
    };
    !listen.ip().is_unspecified()
        && ip.to_canonical() == listen.ip().to_canonical()
        && url.port_or_known_default() == Some(listen.port())
}

/// 128 random bits as hex, from the kernel (or, failing that, from the time and the process).
fn new_server_id() -> String {
    let mut seed = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed));
    let d = match random {
        Ok(()) => Digest::sha256_of(&seed),
        Err(_) => Digest::sha256_of(
            format!(
                "{:?} {} {:?}",
                std::time::SystemTime::now(),
                std::process::id(),
                std::time::Instant::now()
            )
            .as_bytes(),
        ),
    };
    d.hex().get(..32).unwrap_or_default().to_owned()
}

/// Locks `m`, ignoring poisoning (what it guards stays consistent across a panic).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(urls: &[&str]) -> PeersConfig {
        PeersConfig {
            urls: urls
                .iter()
                .map(|u| reqwest::Url::parse(u).expect("url"))
                .collect(),
            token: "t0ken".into(),
            connect_timeout: Duration::from_millis(250),
        }
    }

    /// A runtime for the peers' requests (these tests send none).
    fn runtime() -> tokio::runtime::Handle {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime")
            })
            .handle()
            .clone()
    }

    fn digests(n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| Digest::sha256_of(format!("blob {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn a_server_finds_itself_by_its_listen_address_only_when_it_names_one() {
        let urls = [
            "http://127.0.0.2:5000",
            "http://127.0.0.3:5000",
            "http://cache-4:5000",
        ];
        let listen: SocketAddr = "127.0.0.3:5000".parse().expect("addr");
        let p =
            Peers::new(&config(&urls), listen, Arc::new(Metrics::new()), runtime()).expect("peers");
        let me: Vec<bool> = p.ring().peers.iter().map(|p| p.is_self()).collect();
        assert_eq!(me, [false, true, false]);
        let any: SocketAddr = "0.0.0.0:5000".parse().expect("addr");
        let p =
            Peers::new(&config(&urls), any, Arc::new(Metrics::new()), runtime()).expect("peers");
        assert!(
            p.ring().peers.iter().all(|p| !p.is_self()),
            "0.0.0.0 names no peer: the probes tell"
        );
        assert_ne!(
            p.server_id(),
            Peers::new(&config(&urls), any, Arc::new(Metrics::new()), runtime())
                .expect("peers")
                .server_id(),
            "each server makes its own id"
        );
        assert_eq!(p.server_id().len(), 32);
    }

    #[test]
    fn every_server_ranks_a_digest_the_same_and_asks_only_peers_above_itself() {
        let urls = [
            "http://127.0.0.1:5000",
            "http://127.0.0.2:5000",
            "http://127.0.0.3:5000",
            "http://127.0.0.4:5000",
        ];
        let fleet: Vec<Peers> = urls
            .iter()
            .map(|u| {
                let listen = u.trim_start_matches("http://").parse().expect("addr");
                Peers::new(&config(&urls), listen, Arc::new(Metrics::new()), runtime())
                    .expect("peers")
            })
            .collect();
        let mut owned = [0usize; 4];
        for d in digests(400) {
            let best = (0..4)
                .max_by_key(|&i| score(fleet[i].ring().peers[i].url(), &d))
                .expect("four");
            owned[best] += 1;
            for (i, p) in fleet.iter().enumerate() {
                let asks: Vec<String> = p.owners(&d).iter().map(|o| o.url().to_owned()).collect();
                if i == best {
                    assert!(asks.is_empty(), "the owner asks no one: {asks:?}");
                } else {
                    assert_eq!(
                        asks.first().map(String::as_str),
                        Some(fleet[best].ring().peers[best].url()),
                        "server {i} asks the owner first"
                    );
                }
            }
        }
        assert!(
            owned.iter().all(|&n| n > 60),
            "400 digests spread over 4 owners: {owned:?}"
        );
    }

    #[test]
    fn a_peer_going_down_moves_only_its_own_digests_and_skips_it() {
        let urls = [
            "http://10.0.0.1:5000",
            "http://10.0.0.2:5000",
            "http://10.0.0.3:5000",
        ];
        let p = Peers::new(
            &config(&urls),
            "127.0.0.1:1".parse().expect("addr"),
            Arc::new(Metrics::new()),
            runtime(),
        )
        .expect("peers");
        let ds = digests(200);
        let before: Vec<String> = ds.iter().map(|d| p.owners(d)[0].url().to_owned()).collect();
        let down = Arc::clone(&p.ring().peers[1]);
        down.failed("test", &p.metrics);
        for (d, owner) in ds.iter().zip(&before) {
            let now = p.owners(d);
            assert!(
                now.iter().all(|o| o.url() != down.url()),
                "a down peer is skipped"
            );
            if owner != down.url() {
                assert_eq!(
                    now[0].url(),
                    owner,
                    "a digest of an up peer keeps its owner"
                );
            }
        }
        assert!(!p.others_up().iter().any(|o| o.url() == down.url()));
        let d = &ds[0];
        let first = p.owners(d)[0].url().to_owned();
        p.owners(d)[0].rejected(d);
        assert!(
            p.owners(d).iter().all(|o| o.url() != first),
            "a peer that sent wrong bytes is not asked for that digest again"
        );
    }

    #[test]
    fn a_reload_keeps_the_health_of_peers_still_listed() {
        let p = Peers::new(
            &config(&["http://10.0.0.1:5000", "http://10.0.0.2:5000"]),
            "127.0.0.1:1".parse().expect("addr"),
            Arc::new(Metrics::new()),
            runtime(),
        )
        .expect("peers");
        p.ring().peers[0].failed("test", &p.metrics);
        let mut next = config(&["http://10.0.0.1:5000", "http://10.0.0.3:5000"]);
        next.token = "other".into();
        p.apply(&next).expect("apply");
        let ring = p.ring();
        assert_eq!(ring.peers.len(), 2);
        assert!(!ring.peers[0].is_up(), "10.0.0.1 stays down");
        assert!(ring.peers[1].is_up(), "a new peer starts up");
        assert!(p.token_is(b"other") && !p.token_is(b"t0ken") && !p.token_is(b""));
        let text = p.metrics.render();
        assert!(text.contains("peer=\"http://10.0.0.3:5000/\""), "{text}");
        assert!(
            !text.contains("10.0.0.2"),
            "a removed peer leaves the metrics: {text}"
        );
    }
}

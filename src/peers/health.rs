//! Peer health: whether each peer is up, the per-peer breaker (one failure marks a peer down, so a
//! black-holed peer costs one timeout), the background probes that find it again, and the log
//! lines and metrics of every change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::{lock, Peer, Peers};
use crate::telemetry::metrics::Metrics;

/// First wait before probing a peer that went down; doubled after each failed probe.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between two probes of a down peer.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Time between two probes of an up peer.
const UP_INTERVAL: Duration = Duration::from_secs(3);
/// How often the probe loop looks for a probe that is due.
const TICK: Duration = Duration::from_millis(100);

/// One peer's breaker and probe schedule.
pub(crate) struct Health {
    up: bool,
    /// When it last changed state.
    since: Instant,
    next_probe: Instant,
    backoff: Duration,
    probing: bool,
}

/// What `/readyz` says about a peer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub url: String,
    pub up: bool,
    /// This server itself.
    #[serde(rename = "self")]
    pub me: bool,
    pub down_for_seconds: Option<u64>,
}

impl Health {
    /// Up, with a first probe at once (it tells whether the peer is this server).
    pub(crate) fn new() -> Health {
        let now = Instant::now();
        Health {
            up: true,
            since: now,
            next_probe: now,
            backoff: FIRST_BACKOFF,
            probing: false,
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up
    }
}

impl Peer {
    /// A request or probe to it failed (`why`): it is down from now on, until a probe finds it.
    pub(crate) fn failed(&self, why: &str, metrics: &Metrics) {
        let mut h = lock(&self.health);
        if !h.up {
            return;
        }
        let now = Instant::now();
        h.up = false;
        h.since = now;
        h.backoff = FIRST_BACKOFF;
        if !h.probing {
            h.next_probe = now + FIRST_BACKOFF;
        }
        drop(h);
        metrics
            .peer_up
            .get_or_create(&Metrics::peer(self.url()))
            .set(0);
        tracing::warn!(peer = self.url(), reason = why, "peer down: ownership of its digests moves to the next in rank; probing it in the background");
    }

    /// It answered as a peer: up again if it was down.
    pub(crate) fn answered(&self, metrics: &Metrics) {
        let mut h = lock(&self.health);
        if h.up {
            return;
        }
        let down_for = h.since.elapsed();
        h.up = true;
        h.since = Instant::now();
        h.backoff = FIRST_BACKOFF;
        drop(h);
        metrics
            .peer_up
            .get_or_create(&Metrics::peer(self.url()))
            .set(1);
        tracing::info!(
            peer = self.url(),
            down_s = down_for.as_secs(),
            "peer back: it owns its digests again"
        );
    }

    /// It answered with this server's own id: it is this server, and leaves the ring.
    pub(crate) fn is_me(&self, metrics: &Metrics) {
        if !self.me.swap(true, std::sync::atomic::Ordering::Relaxed) {
            metrics.peer_up.remove(&Metrics::peer(self.url()));
            metrics
                .peer_received_bytes
                .remove(&Metrics::peer(self.url()));
            tracing::info!(
                peer = self.url(),
                "this server is this entry of peers.urls (its own server id answered)"
            );
        }
    }

    pub(crate) fn status(&self) -> PeerStatus {
        let h = lock(&self.health);
        PeerStatus {
            url: self.url().to_owned(),
            up: h.up,
            me: self.is_self(),
            down_for_seconds: (!h.up).then(|| h.since.elapsed().as_secs()),
        }
    }

    /// Whether a probe is due now; if so it is marked as running.
    fn take_due(&self, now: Instant) -> bool {
        let mut h = lock(&self.health);
        if h.probing || h.next_probe > now {
            return false;
        }
        h.probing = true;
        true
    }

    /// Schedules the next probe after one ended: soon while down (doubling), else in a while.
    fn probed(&self) {
        let mut h = lock(&self.health);
        let now = Instant::now();
        h.probing = false;
        if h.up {
            h.next_probe = now + UP_INTERVAL;
        } else {
            h.next_probe = now + h.backoff;
            h.backoff = (h.backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl Peers {
    /// Probes every peer but this server in the background, for as long as it is polled (the
    /// maintenance task; the probes running stop with it).
    pub async fn probe_forever(self: Arc<Self>) {
        let mut running = JoinSet::new();
        loop {
            let ring = self.ring();
            let now = Instant::now();
            for peer in &ring.peers {
                if peer.is_self() || !peer.take_due(now) {
                    continue;
                }
                let (this, peer, settings) = (
                    Arc::clone(&self),
                    Arc::clone(peer),
                    Arc::clone(&ring.settings),
                );
                running.spawn(async move {
                    this.probe(&peer, &settings).await;
                    peer.probed();
                });
            }
            while running.try_join_next().is_some() {}
            tokio::time::sleep(TICK).await;
        }
    }
}

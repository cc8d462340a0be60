//! `GET /_regcache/status`: the operator's view of a running server in one JSON document
//! ([`Status`]): version and uptime, each upstream's state (and since when it is down), its
//! rate-limit quota and the tags it had served stale in the last hour, the store, the shared
//! bucket, the peers, and the traffic since start. `regcache status` and the status page read it.
//!
//! It is under the same access rules as the registry API (`access.allow`, `access.htpasswd`), not
//! the loopback rule of the other `/_regcache/` endpoints: it changes nothing, and an operator
//! looks at it from elsewhere. Its answers are never cached (`Cache-Control: no-store`).

use std::collections::BTreeMap;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::app::App;
use crate::cache::Outcome;
use crate::http::error::ApiError;
use crate::http::response::{plain, Body};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::stale::StaleSummary;
use crate::upstream::Upstream;

/// The endpoint's path.
pub const PATH: &str = "/_regcache/status";

/// Up or down: a down upstream, bucket or peer is the word `down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Up,
    Down,
}

impl State {
    fn of(up: bool) -> State {
        if up {
            State::Up
        } else {
            State::Down
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
        }
    }
}

/// The answer of `GET /_regcache/status` (docs/API.md has the schema).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// regcache's version.
    pub version: String,
    /// When the server started, in seconds since the Unix epoch.
    pub started_at: u64,
    pub uptime_seconds: u64,
    /// True when nothing below is wrong: the store is ready and not full, every upstream is up,
    /// the bucket (if any) is up, every peer but this server is up.
    pub healthy: bool,
    pub upstreams: Vec<UpstreamState>,
    pub store: StoreState,
    /// With `[store.s3]` only.
    pub bucket: Option<BucketState>,
    /// With `[peers]` only (else empty), this server included (`self`).
    pub peers: Vec<PeerState>,
    pub traffic: Traffic,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpstreamState {
    pub name: String,
    pub url: String,
    /// The circuit breaker's state: `down` while the upstream is marked down.
    pub state: State,
    /// When it was marked down (seconds since the Unix epoch), while it is.
    pub down_since: Option<u64>,
    pub down_for_seconds: Option<u64>,
    /// The rate-limit quota the upstream last announced (`ratelimit-limit`,
    /// `ratelimit-remaining`), when it did: `limit`, `remaining`, `window_seconds`, `source`,
    /// `observed_at` (RFC 3339).
    pub ratelimit: Option<serde_json::Value>,
    /// The tags served stale in the last hour.
    pub stale_last_hour: StaleSummary,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoreState {
    /// The store answers (database readable, `tmp/` writable): what `/readyz` reports.
    pub ready: bool,
    /// Why it is not ready.
    pub error: Option<String>,
    /// Bytes of the blobs it holds.
    pub used_bytes: u64,
    /// Free bytes on its filesystem, when known.
    pub free_bytes: Option<u64>,
    /// The last write failed for lack of space: blobs are served without being cached.
    pub full: bool,
    /// `[store] max_size`, when set.
    pub max_size: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BucketState {
    /// `down` while the bucket is skipped after a failure.
    pub state: State,
    /// Writes waiting for the bucket to answer again.
    pub pending_writes: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeerState {
    pub url: String,
    pub state: State,
    /// This server's own entry in the list.
    #[serde(rename = "self")]
    pub is_self: bool,
    pub down_for_seconds: Option<u64>,
}

/// What the server answered since it started (the counters of `/metrics`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// Manifest and blob answers, by cache outcome (`hit`, `miss`, `stale`, …).
    pub outcomes: BTreeMap<String, u64>,
    /// All of them.
    pub answers: u64,
    /// Those served from what the cache holds (`hit`, `revalidated`, `stale`, `shared`).
    pub hits: u64,
    /// `hits / answers`, without answers yet none.
    pub hit_ratio: Option<f64>,
    /// Body bytes sent to clients.
    pub served_bytes: u64,
    /// Blob bytes received from the upstreams, all of them.
    pub fetched_bytes: u64,
    /// The same, by upstream.
    pub fetched_bytes_by_upstream: BTreeMap<String, u64>,
    /// `served_bytes - fetched_bytes` (0 if fewer were served).
    pub saved_bytes: u64,
}

/// The rate-limit quota `upstream` last announced, as `/readyz` shows it
/// (`{"limit","remaining","window_seconds","source","observed_at"}`), if it announced one.
fn ratelimit(upstream: &Upstream) -> Option<serde_json::Value> {
    serde_json::to_value(upstream.ratelimit()?.status()).ok()
}

/// The server's state now.
pub fn status(app: &App) -> Status {
    let routing = app.routing();
    let upstreams: Vec<UpstreamState> = routing
        .upstreams()
        .iter()
        .map(|u| {
            let s = u.status();
            UpstreamState {
                state: State::of(s.up),
                down_since: s
                    .down_for_seconds
                    .map(|d| crate::store::now_secs().saturating_sub(d)),
                down_for_seconds: s.down_for_seconds,
                ratelimit: ratelimit(u),
                stale_last_hour: app.stale.recent(&s.name),
                name: s.name,
                url: s.url,
            }
        })
        .collect();
    let store = &app.cache.store;
    let check = store.check();
    let store = StoreState {
        ready: check.is_ok(),
        error: check.err().map(|e| e.to_string()),
        used_bytes: store.used_bytes(),
        free_bytes: crate::store::free_bytes(store.root()),
        full: store.is_full(),
        max_size: routing.config.store.max_size,
    };
    let bucket = app.cache.bucket().map(|b| BucketState {
        state: State::of(b.is_up()),
        pending_writes: app.metrics.bucket_pending.get().max(0) as u64,
    });
    let peers: Vec<PeerState> = app.cache.peers().map_or_else(Vec::new, |p| {
        p.status()
            .into_iter()
            .map(|p| PeerState {
                url: p.url,
                state: State::of(p.up || p.me),
                is_self: p.me,
                down_for_seconds: p.down_for_seconds,
            })
            .collect()
    });
    let traffic = traffic(&app.metrics, routing.upstreams());
    let uptime = app.uptime().as_secs();
    let mut status = Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: crate::store::now_secs().saturating_sub(uptime),
        uptime_seconds: uptime,
        healthy: false,
        upstreams,
        store,
        bucket,
        peers,
        traffic,
    };
    status.healthy = status.problems().is_empty();
    status
}

impl Status {
    /// What is wrong, one short sentence each (none when healthy): what `healthy` sums up, and
    /// what `regcache status` and the status page print first.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.store.error {
            out.push(format!("the store is not ready: {e}"));
        } else if !self.store.ready {
            out.push("the store is not ready".to_owned());
        }
        if self.store.full {
            out.push("the store's disk is full: blobs are served without being cached".to_owned());
        }
        for u in self.upstreams.iter().filter(|u| u.state == State::Down) {
            out.push(format!("upstream {} is down", u.name));
        }
        if self.bucket.as_ref().is_some_and(|b| b.state == State::Down) {
            out.push("the shared bucket is down".to_owned());
        }
        for p in self.peers.iter().filter(|p| p.state == State::Down) {
            out.push(format!("peer {} is down", p.url));
        }
        out
    }
}

/// A rate-limit quota (`ratelimit` of an upstream) in words: `80 of 100 left, window 6h`, or the
/// JSON itself when it has no `remaining`.
pub fn quota_text(v: &serde_json::Value) -> String {
    let Some(remaining) = v["remaining"].as_u64() else {
        return v.to_string();
    };
    let mut out = match v["limit"].as_u64() {
        Some(limit) => format!("{remaining} of {limit} left"),
        None => format!("{remaining} left"),
    };
    if let Some(w) = v["window_seconds"].as_u64() {
        out.push_str(&format!(", window {}", duration_text(w)));
    }
    out
}

/// A number of seconds in words: `1h 30m 5s`.
pub fn duration_text(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// A time in seconds since the Unix epoch, in RFC 3339 (UTC): `2026-01-01T00:00:00Z`.
pub fn time_text(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs),
    )
    .to_string()
}

/// The traffic counters of `metrics`, with the bytes fetched from each of `upstreams`.
fn traffic(metrics: &Metrics, upstreams: &[Arc<Upstream>]) -> Traffic {
    let mut outcomes = BTreeMap::new();
    let (mut answers, mut hits) = (0, 0);
    for o in Outcome::ALL {
        let n = metrics
            .cache_outcomes
            .get_or_create(&vec![("outcome", o.as_str().to_owned())])
            .get();
        answers += n;
        if o.is_hit() {
            hits += n;
        }
        outcomes.insert(o.as_str().to_owned(), n);
    }
    let fetched_bytes_by_upstream: BTreeMap<String, u64> = upstreams
        .iter()
        .map(|u| {
            let n = metrics
                .bytes_fetched
                .get_or_create(&Metrics::upstream(u.name()))
                .get();
            (u.name().to_owned(), n)
        })
        .collect();
    let fetched_bytes = fetched_bytes_by_upstream.values().sum();
    let served_bytes = metrics.bytes_served.get();
    Traffic {
        outcomes,
        answers,
        hits,
        hit_ratio: (answers > 0).then(|| hits as f64 / answers as f64),
        served_bytes,
        fetched_bytes,
        fetched_bytes_by_upstream,
        saved_bytes: served_bytes.saturating_sub(fetched_bytes),
    }
}

/// The answer to `GET`/`HEAD` [`PATH`].
pub fn answer(app: &App, method: &Method) -> Result<Response<Body>, ApiError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::unsupported(&format!("{method}")));
    }
    // Serialized from the struct, so that the fields come in the documented order.
    let body = serde_json::to_string(&status(app))
        .map_err(|e| ApiError::new(crate::http::error::Code::Internal, e.to_string()))?;
    let mut resp = plain(
        StatusCode::OK,
        body,
        "application/json",
        method == Method::HEAD,
    );
    no_store(&mut resp);
    Ok(resp)
}

/// Marks an answer as never to be cached: the state it shows is the state now.
pub fn no_store(resp: &mut Response<Body>) {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

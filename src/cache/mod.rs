//! The pull-through policy: serve from the store, revalidate tags, fill misses once (single
//! flight) from the tier chain, and share what the upstream gave with the bucket.
//!
//! Manifests are small: one fetch per (upstream, repository, reference) at a time, shared by every
//! client asking meanwhile, verified, then stored (`manifest.rs`, on `flight.rs`); a cached tag
//! waits for its revalidation at most `revalidate_budget`, then is served stale while the
//! revalidation goes on (`revalidate.rs`). Blobs are
//! filled by a background task into a temporary file (`blob.rs` starts or joins fills, `fill.rs`
//! runs them, `tail.rs` keeps them in memory on a full disk); every client asking for the same
//! blob meanwhile reads that file as it grows, and the last byte of every response is held back
//! until the digest has been verified, so a client never receives a complete body that is wrong.
//! Content the store does not hold comes from the first tier of the chain that gives it: the
//! peers (`peer.rs`), the shared bucket, then the upstream (`tier.rs`); what the upstream gave is written on to the
//! bucket (`share.rs`). This module has the `Cache` itself, its construction and its limits.
//!
//! The cache knows nothing of HTTP: the http layer streams a fill's bytes to its clients through
//! [`FillReader`]'s API.
//!
//! What outlives the request that started it or serves several clients — blob fills, manifest
//! flights, writes to the bucket — runs on the runtime given to [`Cache::new`] (the server's
//! background runtime), never on the caller's: a server's connection shards each run their own
//! runtime, and a stalled shard must not stall the other shards' clients waiting on that work.

mod blob;
mod error;
mod fill;
mod flight;
mod manifest;
mod peer;
mod revalidate;
mod share;
mod tail;
mod tier;

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::bucket::Bucket;
use crate::oci::reference::{Digest, RepoName};
use crate::store::{Hold, RepoKey, Store, StoreError};
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

pub use error::{CacheError, InternalError};
pub use fill::{FillReader, FillState, Span};
pub use peer::PeerTier;
pub use tier::{BucketTier, Tier, Tiers};

use fill::Fill;
use flight::Flights;
use share::PendingShares;
use tail::FillMemory;

/// How a request was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the store with no upstream contact.
    Hit,
    /// Served from the store after the upstream confirmed it is current.
    Revalidated,
    /// Fetched from the upstream by this request.
    Miss,
    /// Joined a fetch another request had started.
    Coalesced,
    /// Served from the store because the upstream could not answer.
    Stale,
    /// Answered by the upstream without caching (e.g. a HEAD of an uncached blob).
    Passthrough,
    /// Served from the shared bucket (`[store.s3]`): another server fetched it.
    Shared,
}

impl Outcome {
    /// Every outcome, for reports that list them all.
    pub const ALL: [Outcome; 7] = [
        Outcome::Hit,
        Outcome::Revalidated,
        Outcome::Miss,
        Outcome::Coalesced,
        Outcome::Stale,
        Outcome::Passthrough,
        Outcome::Shared,
    ];

    /// Whether the answer came from what the cache holds, without fetching it from the upstream
    /// (the hits of the hit ratio): `hit`, `revalidated`, `stale` and `shared`.
    pub fn is_hit(self) -> bool {
        match self {
            Outcome::Hit | Outcome::Revalidated | Outcome::Stale | Outcome::Shared => true,
            Outcome::Miss | Outcome::Coalesced | Outcome::Passthrough => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Revalidated => "revalidated",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Stale => "stale",
            Outcome::Passthrough => "passthrough",
            Outcome::Shared => "shared",
        }
    }
}

/// Who asks the cache: one of its clients, or another server of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Asker {
    #[default]
    Client,
    /// A peer request (`x-regcache-hop`): answered by the normal path without asking the peers
    /// (nothing is forwarded to a third peer), or, `local_only`, from the store alone (a fill
    /// in progress may be joined).
    Peer { local_only: bool },
}

impl Asker {
    /// Whether the answer may come from the peers.
    pub fn may_ask_peers(self) -> bool {
        self == Asker::Client
    }
}

/// A request routed to one upstream and repository.
#[derive(Clone)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub repo: RepoName,
}

impl Route {
    pub fn key(&self) -> RepoKey {
        RepoKey {
            upstream: self.upstream.name().to_owned(),
            repo: self.repo.clone(),
        }
    }
}

/// A manifest ready to serve.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    pub outcome: Outcome,
    /// Set when served stale: why the upstream could not be asked.
    pub stale_reason: Option<String>,
}

/// A blob ready to serve.
pub struct Blob {
    pub size: Option<u64>,
    pub source: BlobSource,
    pub outcome: Outcome,
}

/// Where a blob response's bytes come from.
pub enum BlobSource {
    /// A committed file, held against eviction while it is read.
    File(File, Hold),
    /// A fill in progress (or just finished).
    Fill(FillReader),
    /// Nothing to send (HEAD).
    Empty,
}

/// The cache: the store, the tier chain, and the fetches in flight.
pub struct Cache {
    pub store: Arc<Store>,
    /// Where content the store does not hold comes from, in order.
    tiers: Tiers,
    max_manifest_size: AtomicU64,
    manifests: Flights<Manifest>,
    /// Tag revalidations, which a manifest flight waits for at most `revalidate_budget`.
    revalidations: Flights<revalidate::Confirmed>,
    fills: Mutex<HashMap<String, Arc<Fill>>>,
    /// Bounds the blob fills running at once (`limits.max_fills`), and its size.
    fill_slots: Mutex<(Arc<tokio::sync::Semaphore>, usize)>,
    /// How long a new fill waits for a slot (`limits.fill_wait`), in milliseconds.
    fill_wait_ms: AtomicU64,
    /// What fills on a full disk hold in memory (`limits.fill_memory`).
    fill_memory: Arc<FillMemory>,
    pub metrics: Arc<Metrics>,
    /// Writes to the bucket that wait for it to answer again.
    pending: Arc<PendingShares>,
    /// Where fills, manifest flights and writes to the bucket run (the background runtime).
    runtime: tokio::runtime::Handle,
}

impl Cache {
    /// A cache on `store` that fills from `tiers`, running its fills, manifest flights and writes
    /// to the bucket on `runtime`.
    pub fn new(
        store: Arc<Store>,
        tiers: Tiers,
        max_manifest_size: u64,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Cache {
        let pending = Arc::new(PendingShares::new(
            metrics.bucket_pending.clone(),
            Arc::clone(&store),
        ));
        // Every outcome, source and failure reason at 0 from the start, so that rates, ratios and
        // alerts over them have series before the first of each happens.
        Metrics::at_zero(
            &metrics.cache_outcomes,
            "outcome",
            &Outcome::ALL.map(Outcome::as_str),
        );
        Metrics::at_zero(&metrics.fills, "source", &tier::FILL_SOURCES);
        Metrics::at_zero(
            &metrics.fills_failed,
            "reason",
            &CacheError::FILL_FAILURE_REASONS,
        );
        Cache {
            store,
            tiers,
            max_manifest_size: AtomicU64::new(max_manifest_size),
            manifests: Flights::new(runtime.clone()),
            revalidations: Flights::new(runtime.clone()),
            fills: Mutex::new(HashMap::new()),
            fill_slots: Mutex::new((Arc::new(tokio::sync::Semaphore::new(64)), 64)),
            fill_wait_ms: AtomicU64::new(30_000),
            fill_memory: Arc::new(FillMemory::new(
                crate::config::LimitsConfig::default().fill_memory,
                metrics.fill_memory.clone(),
            )),
            metrics,
            pending,
            runtime,
        }
    }

    /// The shared bucket, when `[store.s3]` is configured.
    pub fn bucket(&self) -> Option<&Arc<Bucket>> {
        self.tiers.bucket()
    }

    /// The fleet, when `[peers]` is configured.
    pub fn peers(&self) -> Option<&Arc<crate::peers::Peers>> {
        self.tiers.peers()
    }

    /// Sets how many blob fills may run at once, how long a new one waits for a slot, and how
    /// much memory fills on a full disk may hold for later clients to join. A new number of fills
    /// takes effect for fills started from now on, a new budget for the next bytes kept.
    pub fn set_fill_limits(&self, max: usize, wait: Duration, memory: u64) {
        self.fill_memory.set_limit(memory);
        let mut slots = lock(&self.fill_slots);
        if slots.1 != max {
            *slots = (Arc::new(tokio::sync::Semaphore::new(max)), max);
        }
        self.fill_wait_ms.store(
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// A slot for one more blob fill, waiting at most `limits.fill_wait`.
    async fn fill_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, CacheError> {
        let (slots, max) = {
            let s = lock(&self.fill_slots);
            (Arc::clone(&s.0), s.1)
        };
        if let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
            return Ok(p);
        }
        let wait = Duration::from_millis(self.fill_wait_ms.load(Ordering::Relaxed));
        match tokio::time::timeout(wait, slots.acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => {
                self.metrics
                    .limit_rejections
                    .get_or_create(&vec![("limit", "max_fills".to_owned())])
                    .inc();
                Err(CacheError::Busy(format!(
                    "{max} blob fills are already running (limits.max_fills); no slot freed up \
                     within {}s",
                    wait.as_secs_f64()
                )))
            }
        }
    }

    /// A slot for one more blob fill if one is free now.
    fn free_fill_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = Arc::clone(&lock(&self.fill_slots).0);
        slots.try_acquire_owned().ok()
    }

    pub fn set_max_manifest_size(&self, n: u64) {
        self.max_manifest_size.store(n, Ordering::Relaxed);
    }

    fn max_manifest_size(&self) -> u64 {
        self.max_manifest_size.load(Ordering::Relaxed)
    }
}

/// Locks `m`, ignoring poisoning (what it guards stays consistent across a panic).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` (store work) on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::task("blocking", e))?
        .map_err(CacheError::from)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A cache on a fresh store in `dir` with no bucket, and a route to an upstream that refuses
    /// connections; both run their tasks on the current runtime.
    pub(crate) fn cache_without_upstream(dir: &std::path::Path) -> (Arc<Cache>, Route) {
        let runtime = tokio::runtime::Handle::current();
        let store = Arc::new(Store::open(dir).expect("store"));
        let metrics = Arc::new(Metrics::new());
        let config = crate::config::Config::parse(
            "[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n",
            "test",
            &crate::config::Overrides::default(),
        )
        .expect("config");
        let upstream = Upstream::new(
            config.upstreams[0].clone(),
            Arc::clone(&metrics),
            runtime.clone(),
        )
        .expect("upstream");
        let route = Route {
            upstream,
            repo: "library/alpine".parse().expect("repo"),
        };
        let tiers = Tiers::from_config(&config, &metrics, &runtime).expect("tiers");
        let cache = Cache::new(store, tiers, 4 << 20, metrics, runtime);
        (Arc::new(cache), route)
    }
}

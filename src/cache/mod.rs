//! The pull-through logic: serve from the store, revalidate tags, fill misses once (single flight).
//!
//! Manifests are small: one upstream fetch per (upstream, repository, reference) at a time, shared
//! by every client asking meanwhile, verified, then stored. Blobs are filled by a background task
//! into a temporary file; every client asking for the same blob meanwhile reads that file as it
//! grows, and the last byte of every response is held back until the digest has been verified, so
//! a client never receives a complete body that is wrong.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{mpsc, watch};

use crate::bucket::{or_without, upstream_id, Bucket};
use crate::oci::media::{self, Accept, Negotiated};
use crate::oci::reference::{Digest, Reference, RepoName, Tag};
use crate::store::{now_millis, Hold, RepoKey, Store, StoreError, TempBlob};
use crate::telemetry::metrics::Metrics;
use crate::upstream::{media_type_from_body, Upstream, UpstreamError};

/// Size of the chunks read from files and sent to clients.
pub const CHUNK: usize = 256 * 1024;
/// Bytes gathered from the upstream before one write to the temporary file.
const WRITE_BATCH: usize = 1 << 20;
/// Batches a fill may receive and write ahead of its hash.
const HASH_AHEAD: usize = 16;
/// How many times a broken upstream blob stream is resumed with a `Range` request.
const RESUME_ATTEMPTS: u32 = 3;
/// What a fill on a full disk that streams the blob through (the memory budget is used up) keeps
/// ahead of its slowest reader, besides the batch it has just received.
const THROUGH_WINDOW: u64 = 2 * WRITE_BATCH as u64;

/// Why the cache could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("store: {0}")]
    Store(String),
    #[error("content from upstream {upstream} does not match digest {expected} (got {actual})")]
    DigestMismatch {
        upstream: String,
        expected: String,
        actual: String,
    },
    #[error("blob {digest} from upstream {upstream}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        upstream: String,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("internal: {0}")]
    Internal(String),
    /// A limit was reached (`limits.max_fills`): try again later.
    #[error("busy: {0}")]
    Busy(String),
    /// What the upstream answers this client for this manifest, by its `Accept`, is "unknown"
    /// (an OCI type it does not accept, a list without a linux/amd64 entry): a `404`.
    #[error("{0}")]
    NotAcceptable(&'static str),
}

impl From<StoreError> for CacheError {
    fn from(e: StoreError) -> Self {
        CacheError::Store(e.to_string())
    }
}

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

/// Progress of a blob fill, published to every reader.
#[derive(Debug, Clone)]
pub enum FillState {
    Connecting,
    Streaming { size: Option<u64>, written: u64 },
    Done { size: u64 },
    Failed(CacheError),
}

/// A blob being fetched from the upstream into a temporary file.
pub struct Fill {
    /// Its key in `Cache::fills`.
    key: String,
    /// The temporary file, for the readers that join; `None` once none can.
    file: Mutex<Option<File>>,
    state: watch::Receiver<FillState>,
    /// Set when the disk filled up mid-fill: the file holds the bytes before `disk_len`, memory
    /// the rest, and the blob is served to its clients without being cached.
    tail: Mutex<Option<MemoryTail>>,
    /// Set when the bytes come from the shared bucket rather than the upstream.
    from_bucket: AtomicBool,
    /// The readers, by id, each with the position it has sent up to.
    readers: Mutex<HashMap<u64, u64>>,
    next_reader: AtomicU64,
    /// Set when a fill on a full disk has used up the memory budget: it then keeps only what its
    /// readers have not sent yet, and no one can join it.
    through: AtomicBool,
    /// Woken when a reader moves on or leaves (a fill streaming through waits for its readers).
    progress: tokio::sync::Notify,
    /// Set when the fill's task has ended, however it ended.
    ended: AtomicBool,
}

/// A write to the shared bucket.
#[derive(Clone)]
enum Share {
    /// A committed blob: uploaded from its file, then linked to the repository it was
    /// fetched for (`upstream-id`, repository).
    Blob {
        digest: Digest,
        size: u64,
        link: Option<(String, RepoName)>,
    },
    /// A manifest fetched for `repo`, with the tag that pointed at it and when.
    Manifest {
        upstream: String,
        repo: RepoName,
        digest: Digest,
        media_type: String,
        bytes: Bytes,
        tag: Option<(Tag, u64)>,
    },
    /// A tag the upstream confirmed at `checked_at_ms`.
    Tag {
        upstream: String,
        repo: RepoName,
        tag: Tag,
        digest: Digest,
        checked_at_ms: u64,
    },
}

/// Where a fill reads from.
enum Source {
    Upstream(reqwest::Response),
    Bucket(futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>),
}

struct MemoryTail {
    disk_len: u64,
    /// Chunks after `disk_len`, with the offset each starts at (from the first one a reader
    /// still needs, once the fill streams through).
    chunks: VecDeque<(u64, Bytes)>,
    /// Bytes in `chunks`, counted in `memory`.
    bytes: u64,
    memory: Arc<FillMemory>,
}

impl MemoryTail {
    /// Keeps `chunk`, which starts at `at` (and was counted in `memory`).
    fn push(&mut self, at: u64, chunk: Bytes) {
        self.bytes += chunk.len() as u64;
        self.chunks.push_back((at, chunk));
    }

    /// Drops the chunks that end at or before `pos`.
    fn drop_before(&mut self, pos: u64) {
        let mut freed = 0;
        while let Some((start, c)) = self.chunks.front() {
            if start + c.len() as u64 > pos {
                break;
            }
            freed += c.len() as u64;
            self.chunks.pop_front();
        }
        self.bytes -= freed;
        self.memory.give_back(freed);
    }
}

impl Drop for MemoryTail {
    fn drop(&mut self) {
        self.memory.give_back(self.bytes);
    }
}

/// The memory that fills on a full disk hold, all of them together, and its budget
/// (`limits.fill_memory`).
pub(crate) struct FillMemory {
    used: AtomicU64,
    limit: AtomicU64,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl FillMemory {
    /// Counts `n` more bytes if they fit in the budget.
    fn try_take(&self, n: u64) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let fits = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(n).filter(|t| *t <= limit)
            })
            .is_ok();
        self.publish();
        fits
    }

    /// Counts `n` more bytes, over the budget if need be (a fill streaming through).
    fn take(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
        self.publish();
    }

    fn give_back(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
        self.publish();
    }

    fn publish(&self) {
        let used = self.used.load(Ordering::Relaxed);
        self.gauge.set(i64::try_from(used).unwrap_or(i64::MAX));
    }
}

/// Where a blob response's bytes come from.
pub enum BlobSource {
    /// A committed file, held against eviction while it is read.
    File(File, crate::store::Hold),
    /// A fill in progress (or just finished).
    Fill(FillReader),
    /// Nothing to send (HEAD).
    Empty,
}

/// One client's place in a fill, from the moment it joins until its body ends: the fill keeps
/// what this reader has not sent yet, and the blob is held against eviction (the fill may commit
/// it while the reader is still sending it).
pub struct FillReader {
    cache: Arc<Cache>,
    fill: Arc<Fill>,
    id: u64,
    /// The reader's own descriptor of the temporary file.
    file: Option<File>,
    hold: Option<Hold>,
}

impl FillReader {
    /// Waits until the fill is done, returning its size.
    pub async fn wait_done(&self) -> Result<u64, CacheError> {
        self.fill.wait_done().await
    }

    /// Notes that everything before `pos` has been sent. `false`: the fill has let this reader
    /// go (it read nothing for the upstream's `idle_timeout` while the others waited for it).
    fn advance(&self, pos: u64) -> bool {
        let kept = match lock(&self.fill.readers).get_mut(&self.id) {
            Some(p) => {
                *p = pos;
                true
            }
            None => false,
        };
        if self.fill.through.load(Ordering::Relaxed) {
            self.fill.trim();
        }
        self.fill.progress.notify_one();
        kept
    }
}

impl Drop for FillReader {
    fn drop(&mut self) {
        lock(&self.fill.readers).remove(&self.id);
        self.fill.trim();
        self.fill.progress.notify_one();
        self.cache.settle(&self.fill);
    }
}

/// The fill task's claim on the fill's place in `Cache::fills`: when the task ends, however it
/// ends (a panic included), the fill leaves the map unless readers should still join it, so that
/// the next request starts a new fill instead of joining one that will never finish.
struct FillTask {
    cache: Arc<Cache>,
    fill: Arc<Fill>,
}

impl Drop for FillTask {
    fn drop(&mut self) {
        self.fill.ended.store(true, Ordering::Relaxed);
        self.cache.settle(&self.fill);
    }
}

/// Locks `m`, ignoring poisoning (what it guards stays consistent across a panic).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A blob ready to serve.
pub struct Blob {
    pub size: Option<u64>,
    pub source: BlobSource,
    pub outcome: Outcome,
}

type Flight<T> = Shared<BoxFuture<'static, Result<T, CacheError>>>;

/// Runs one future per key at a time; callers with the same key share its result.
struct Flights<T: Clone> {
    map: Arc<Mutex<HashMap<String, Flight<T>>>>,
}

/// Takes a flight's key out of the map when the flight's task ends, however it ends (a panic
/// included), so that the next request starts a new flight instead of sharing a failed one.
struct Landing<T: Clone> {
    map: Arc<Mutex<HashMap<String, Flight<T>>>>,
    key: String,
}

impl<T: Clone> Drop for Landing<T> {
    fn drop(&mut self) {
        lock(&self.map).remove(&self.key);
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    fn new() -> Self {
        Flights {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Returns the shared result and whether this caller joined an existing flight.
    async fn run<F>(&self, key: String, make: impl FnOnce() -> F) -> (Result<T, CacheError>, bool)
    where
        F: Future<Output = Result<T, CacheError>> + Send + 'static,
    {
        let (flight, joined) = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = map.get(&key) {
                (f.clone(), true)
            } else {
                let fut = make();
                let landing = Landing {
                    map: Arc::clone(&self.map),
                    key: key.clone(),
                };
                // Spawned so that a client hanging up does not cancel the work others wait for.
                let handle = tokio::spawn(async move {
                    let _landing = landing;
                    fut.await
                });
                let shared = async move {
                    handle
                        .await
                        .unwrap_or_else(|e| Err(CacheError::Internal(format!("fetch task: {e}"))))
                }
                .boxed()
                .shared();
                map.insert(key, shared.clone());
                (shared, false)
            }
        };
        (flight.await, joined)
    }
}

/// The cache: store plus upstreams plus in-flight fetches.
pub struct Cache {
    pub store: Arc<Store>,
    max_manifest_size: std::sync::atomic::AtomicU64,
    manifests: Flights<Manifest>,
    fills: Mutex<HashMap<String, Arc<Fill>>>,
    /// Bounds the blob fills running at once (`limits.max_fills`), and its size.
    fill_slots: Mutex<(Arc<tokio::sync::Semaphore>, usize)>,
    /// How long a new fill waits for a slot (`limits.fill_wait`), in milliseconds.
    fill_wait_ms: std::sync::atomic::AtomicU64,
    /// What fills on a full disk hold in memory (`limits.fill_memory`).
    fill_memory: Arc<FillMemory>,
    pub metrics: Arc<Metrics>,
    /// The shared tier, when `[store.s3]` is configured.
    pub bucket: Option<Arc<Bucket>>,
    /// Blobs whose copy in the bucket failed verification: fetched from the upstream instead.
    bucket_bad: Mutex<std::collections::HashSet<Digest>>,
    /// Writes to the bucket that wait for it to answer again.
    pending: Arc<PendingShares>,
}

/// Writes waiting for the bucket, with the gauge that counts them.
struct PendingShares {
    items: Mutex<std::collections::VecDeque<Share>>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    /// Where deferred writes are also recorded (the `outbox` table), to survive a restart.
    store: Arc<Store>,
}

/// A write owed to the bucket as the `outbox` table keeps it (a manifest's bytes are read back
/// from the store).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum ShareRecord {
    Blob {
        digest: String,
        size: u64,
        #[serde(default)]
        upstream: Option<String>,
        #[serde(default)]
        repo: Option<String>,
    },
    Manifest {
        upstream: String,
        repo: String,
        digest: String,
        media_type: String,
        tag: Option<String>,
        checked_at_ms: u64,
    },
    Tag {
        upstream: String,
        repo: String,
        tag: String,
        digest: String,
        checked_at_ms: u64,
    },
}

impl Share {
    /// The outbox key: one entry per object it writes (a newer write replaces an older one).
    fn key(&self) -> String {
        match self {
            Share::Blob { digest, .. } => format!("blob\0{digest}"),
            Share::Manifest {
                upstream,
                repo,
                digest,
                ..
            } => format!("manifest\0{upstream}\0{repo}\0{digest}"),
            Share::Tag {
                upstream,
                repo,
                tag,
                ..
            } => format!("tag\0{upstream}\0{repo}\0{tag}"),
        }
    }

    fn record(&self) -> ShareRecord {
        match self.clone() {
            Share::Blob { digest, size, link } => ShareRecord::Blob {
                digest: digest.to_string(),
                size,
                upstream: link.as_ref().map(|(u, _)| u.clone()),
                repo: link.map(|(_, r)| r.to_string()),
            },
            Share::Manifest {
                upstream,
                repo,
                digest,
                media_type,
                tag,
                ..
            } => ShareRecord::Manifest {
                upstream,
                repo: repo.to_string(),
                digest: digest.to_string(),
                media_type,
                checked_at_ms: tag.as_ref().map_or(0, |(_, at)| *at),
                tag: tag.map(|(t, _)| t.to_string()),
            },
            Share::Tag {
                upstream,
                repo,
                tag,
                digest,
                checked_at_ms,
            } => ShareRecord::Tag {
                upstream,
                repo: repo.to_string(),
                tag: tag.to_string(),
                digest: digest.to_string(),
                checked_at_ms,
            },
        }
    }

    /// The write a record describes, if it still can be done (`None`: malformed, or the
    /// manifest is no longer stored).
    fn from_record(r: ShareRecord, store: &Store) -> Option<Share> {
        Some(match r {
            ShareRecord::Blob {
                digest,
                size,
                upstream,
                repo,
            } => Share::Blob {
                digest: digest.parse().ok()?,
                size,
                link: match (upstream, repo) {
                    (Some(u), Some(r)) => Some((u, r.parse().ok()?)),
                    _ => None,
                },
            },
            ShareRecord::Manifest {
                upstream,
                repo,
                digest,
                media_type,
                tag,
                checked_at_ms,
            } => {
                let digest: Digest = digest.parse().ok()?;
                let (_, bytes) = store.manifest(&digest).ok()??;
                let tag = match tag {
                    Some(t) => Some((t.parse().ok()?, checked_at_ms)),
                    None => None,
                };
                Share::Manifest {
                    upstream,
                    repo: repo.parse().ok()?,
                    digest,
                    media_type,
                    bytes,
                    tag,
                }
            }
            ShareRecord::Tag {
                upstream,
                repo,
                tag,
                digest,
                checked_at_ms,
            } => Share::Tag {
                upstream,
                repo: repo.parse().ok()?,
                tag: tag.parse().ok()?,
                digest: digest.parse().ok()?,
                checked_at_ms,
            },
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Internal(format!("blocking task: {e}")))?
        .map_err(CacheError::from)
}

/// The digest a client gets for a manifest body: the header's algorithm if given, else sha256.
/// A signed schema 1 manifest's digest covers its body without the signatures.
fn verify_manifest(
    up: &Upstream,
    fetched: &crate::upstream::FetchedManifest,
    expected: Option<&Digest>,
) -> Result<Digest, CacheError> {
    let header = fetched.header_digest.as_ref();
    let signed;
    let bytes: &[u8] = if fetched.media_type == media::DOCKER_SCHEMA1_SIGNED {
        signed = media::schema1_payload(&fetched.bytes).ok_or_else(|| UpstreamError::Invalid {
            upstream: up.name().to_owned(),
            detail: "a schema 1 manifest without a readable signature".into(),
        })?;
        &signed
    } else {
        &fetched.bytes
    };
    let alg_of = expected.or(header);
    let actual = match alg_of {
        Some(d) => {
            let mut h = d.hasher();
            h.update(bytes);
            h.finish()
        }
        None => Digest::sha256_of(bytes),
    };
    for want in [expected, header].into_iter().flatten() {
        if *want != actual && want.algorithm() == actual.algorithm() {
            return Err(CacheError::DigestMismatch {
                upstream: up.name().to_owned(),
                expected: want.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    Ok(actual)
}

/// The `subject` of a manifest and the descriptor to list it under in the referrers API.
fn referrer_descriptor(bytes: &[u8], media_type: &str, d: &Digest) -> Option<(Digest, Vec<u8>)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let subject: Digest = v.get("subject")?.get("digest")?.as_str()?.parse().ok()?;
    let artifact_type = v
        .get("artifactType")
        .and_then(|a| a.as_str())
        .or_else(|| v.get("config")?.get("mediaType")?.as_str())
        .map(str::to_owned);
    let mut desc = serde_json::json!({
        "mediaType": media_type,
        "digest": d.to_string(),
        "size": bytes.len(),
    });
    if let Some(a) = artifact_type {
        desc["artifactType"] = serde_json::Value::String(a);
    }
    if let Some(ann) = v.get("annotations") {
        desc["annotations"] = ann.clone();
    }
    Some((subject, serde_json::to_vec(&desc).ok()?))
}

impl Cache {
    pub fn new(store: Arc<Store>, max_manifest_size: u64, metrics: Arc<Metrics>) -> Cache {
        let pending = Arc::new(PendingShares {
            items: Mutex::new(std::collections::VecDeque::new()),
            gauge: metrics.bucket_pending.clone(),
            store: Arc::clone(&store),
        });
        Cache {
            store,
            max_manifest_size: std::sync::atomic::AtomicU64::new(max_manifest_size),
            manifests: Flights::new(),
            fills: Mutex::new(HashMap::new()),
            fill_slots: Mutex::new((Arc::new(tokio::sync::Semaphore::new(64)), 64)),
            fill_wait_ms: std::sync::atomic::AtomicU64::new(30_000),
            fill_memory: Arc::new(FillMemory {
                used: AtomicU64::new(0),
                limit: AtomicU64::new(crate::config::LimitsConfig::default().fill_memory),
                gauge: metrics.fill_memory.clone(),
            }),
            metrics,
            bucket: None,
            bucket_bad: Mutex::new(std::collections::HashSet::new()),
            pending,
        }
    }

    /// Sets how many blob fills may run at once, how long a new one waits for a slot, and how
    /// much memory fills on a full disk may hold for later clients to join. A new number of fills
    /// takes effect for fills started from now on, a new budget for the next bytes kept.
    pub fn set_fill_limits(&self, max: usize, wait: Duration, memory: u64) {
        self.fill_memory.limit.store(memory, Ordering::Relaxed);
        let mut slots = self.fill_slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.1 != max {
            *slots = (Arc::new(tokio::sync::Semaphore::new(max)), max);
        }
        self.fill_wait_ms.store(
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// A slot for one more blob fill, waiting at most `limits.fill_wait`.
    async fn fill_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, CacheError> {
        let (slots, max) = {
            let s = self.fill_slots.lock().unwrap_or_else(|p| p.into_inner());
            (Arc::clone(&s.0), s.1)
        };
        if let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
            return Ok(p);
        }
        let wait =
            Duration::from_millis(self.fill_wait_ms.load(std::sync::atomic::Ordering::Relaxed));
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

    pub fn set_max_manifest_size(&self, n: u64) {
        self.max_manifest_size
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn stored_manifest(
        &self,
        d: &Digest,
        outcome: Outcome,
    ) -> Result<Option<Manifest>, CacheError> {
        let Some((media_type, bytes)) = self.store.manifest(d)? else {
            return Ok(None);
        };
        self.store.touch(d);
        Ok(Some(Manifest {
            digest: d.clone(),
            media_type,
            bytes,
            outcome,
            stale_reason: None,
        }))
    }

    /// A manifest by tag or digest, as the upstream answers a client accepting `accept`.
    pub async fn manifest(
        self: &Arc<Self>,
        route: &Route,
        reference: &Reference,
        accept: Accept,
    ) -> Result<Manifest, CacheError> {
        let key = route.key();
        match reference {
            Reference::Digest(d) => {
                if self.store.is_linked(&key, d)? {
                    if let Some(m) = self.stored_manifest(d, Outcome::Hit)? {
                        if accept.is_all() || media::serves_as_is(&m.media_type, accept, false) {
                            return Ok(m);
                        }
                    }
                }
            }
            Reference::Tag(t) => {
                if let Some(m) = self.fresh_tag(route, t, accept)? {
                    return Ok(m);
                }
            }
        }
        // Clients with other Accept sets may get other answers: they never share a flight.
        let flight_key = if accept.is_all() {
            format!("{}/{}@{}", key.upstream, key.repo, reference)
        } else {
            format!(
                "{}/{}@{} accept={accept}",
                key.upstream, key.repo, reference
            )
        };
        let (this, route2, reference2) = (Arc::clone(self), route.clone(), reference.clone());
        let (result, joined) = self
            .manifests
            .run(flight_key, move || async move {
                this.fetch_manifest(&route2, &reference2, accept).await
            })
            .await;
        let mut m = result?;
        if joined && m.outcome == Outcome::Miss {
            m.outcome = Outcome::Coalesced;
        }
        Ok(m)
    }

    /// A tag's manifest from the store, with no upstream contact: the full-Accept record's when
    /// it is fresh and served as it is to `accept`, else the fresh record of `accept` itself.
    fn fresh_tag(
        &self,
        route: &Route,
        t: &Tag,
        accept: Accept,
    ) -> Result<Option<Manifest>, CacheError> {
        let key = route.key();
        let records: &[Accept] = if accept.is_all() {
            &[Accept::ALL]
        } else {
            &[Accept::ALL, accept]
        };
        for &record in records {
            let Some(rec) = self.store.tag_for(&key, t, record)? else {
                continue;
            };
            let age = Duration::from_millis(now_millis().saturating_sub(rec.checked_at_ms));
            if age >= route.upstream.config.freshness {
                continue;
            }
            let Ok(d) = rec.digest.parse::<Digest>() else {
                continue;
            };
            let Some((media_type, bytes)) = self.store.manifest(&d)? else {
                continue;
            };
            if record == accept || media::serves_as_is(&media_type, accept, true) {
                self.store.touch(&d);
                return Ok(Some(Manifest {
                    digest: d,
                    media_type,
                    bytes,
                    outcome: Outcome::Hit,
                    stale_reason: None,
                }));
            }
        }
        Ok(None)
    }

    /// The stored manifest a tag's record for `accept` points at, however old the record.
    fn tagged_manifest(
        &self,
        key: &RepoKey,
        t: &Tag,
        accept: Accept,
    ) -> Result<Option<Manifest>, CacheError> {
        let Some(rec) = self.store.tag_for(key, t, accept)? else {
            return Ok(None);
        };
        let Ok(d) = rec.digest.parse::<Digest>() else {
            return Ok(None);
        };
        self.stored_manifest(&d, Outcome::Hit)
    }

    /// The slow path of [`Cache::manifest`], run once per key at a time.
    async fn fetch_manifest(
        &self,
        route: &Route,
        reference: &Reference,
        accept: Accept,
    ) -> Result<Manifest, CacheError> {
        let up = &route.upstream;
        let key = route.key();
        match reference {
            Reference::Digest(_) if !accept.is_all() => {
                // Not stored here, or stored with a type this client may not be given: the
                // upstream decides, and the store answers as it would when it cannot.
                match self.download_manifest(route, reference, None, accept).await {
                    Err(CacheError::Upstream(e)) if e.is_unavailable() => {
                        self.answer_without_upstream(route, reference, accept, e)
                    }
                    r => r,
                }
            }
            Reference::Digest(d) => {
                if let Some(m) = self.shared_manifest(route, d).await? {
                    return Ok(m);
                }
                if self.store.manifest_info(d)?.is_some() {
                    // Stored for another repository: the upstream must confirm this one has it.
                    up.head_manifest(&route.repo, &d.to_string(), Accept::ALL)
                        .await?;
                    let (store, k2, d2) = (Arc::clone(&self.store), key.clone(), d.clone());
                    blocking(move || store.link(&k2, &d2)).await?;
                    if let Some(m) = self.stored_manifest(d, Outcome::Revalidated)? {
                        return Ok(m);
                    }
                }
                self.download_manifest(route, reference, None, Accept::ALL)
                    .await
            }
            Reference::Tag(t) => {
                if accept.is_all() {
                    if let Some(m) = self.shared_tag(route, t).await? {
                        return Ok(m);
                    }
                }
                if let Some(m) = self.fresh_tag(route, t, accept)? {
                    return Ok(m); // another flight refreshed it meanwhile
                }
                if let Some(cached) = self.tagged_manifest(&key, t, accept)? {
                    return self.revalidate_tag(route, t, accept, cached).await;
                }
                match self
                    .download_manifest(route, reference, Some(t), accept)
                    .await
                {
                    Err(CacheError::Upstream(e)) if e.is_unavailable() && !accept.is_all() => {
                        self.answer_without_upstream(route, reference, accept, e)
                    }
                    r => r,
                }
            }
        }
    }

    /// Asks the upstream whether the cached manifest of tag `t` for `accept` is still the one
    /// (`HEAD` with that Accept); fetches the new one if not, serves the cached one stale if the
    /// upstream cannot answer.
    async fn revalidate_tag(
        &self,
        route: &Route,
        t: &Tag,
        accept: Accept,
        cached: Manifest,
    ) -> Result<Manifest, CacheError> {
        let up = &route.upstream;
        // A cached tag never waits for the upstream longer than the connect timeout.
        let head = match tokio::time::timeout(
            up.config.connect_timeout,
            up.head_manifest(&route.repo, t.as_str(), accept),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                let e = UpstreamError::Timeout {
                    upstream: up.name().to_owned(),
                    what: "tag revalidation",
                };
                up.record_failure(&e);
                Err(e)
            }
        };
        match head {
            Ok(head) => match head.digest {
                Some(d) if d == cached.digest => {
                    let now = now_millis();
                    let (store, k2, t2, d2) =
                        (Arc::clone(&self.store), route.key(), t.clone(), d.clone());
                    blocking(move || store.set_tag_for(&k2, &t2, accept, &d2, now)).await?;
                    if accept.is_all() {
                        self.share(Share::Tag {
                            upstream: upstream_id(&up.config.url),
                            repo: route.repo.clone(),
                            tag: t.clone(),
                            digest: d,
                            checked_at_ms: now,
                        });
                    }
                    Ok(Manifest {
                        outcome: Outcome::Revalidated,
                        ..cached
                    })
                }
                _ => {
                    self.download_manifest(route, &Reference::Tag(t.clone()), Some(t), accept)
                        .await
                }
            },
            Err(e) if e.is_unavailable() => {
                tracing::warn!(upstream = up.name(), repo = %route.repo, tag = %t, %accept, error = %e, "upstream cannot answer; serving the cached tag");
                Ok(Manifest {
                    outcome: Outcome::Stale,
                    stale_reason: Some(e.to_string()),
                    ..cached
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What the upstream would answer a client accepting `accept` (narrower than all four),
    /// worked out from the store while the upstream cannot answer (`e`): the full-Accept
    /// manifest as it is, a refusal, or a list's linux/amd64 child if stored. Anything else
    /// (a schema 1 conversion, a child not stored here) is `e`, as for any uncached content.
    fn answer_without_upstream(
        &self,
        route: &Route,
        reference: &Reference,
        accept: Accept,
        e: UpstreamError,
    ) -> Result<Manifest, CacheError> {
        let key = route.key();
        let (stored, by_tag) = match reference {
            Reference::Digest(d) if self.store.is_linked(&key, d)? => {
                (self.stored_manifest(d, Outcome::Stale)?, false)
            }
            Reference::Digest(_) => (None, false),
            Reference::Tag(t) => (self.tagged_manifest(&key, t, Accept::ALL)?, true),
        };
        let Some(stored) = stored else {
            return Err(e.into());
        };
        let served = match media::negotiate(&stored.media_type, &stored.bytes, accept, by_tag) {
            Negotiated::AsIs => stored,
            Negotiated::Refused(why) => return Err(CacheError::NotAcceptable(why)),
            Negotiated::Child(d) => {
                let child = if self.store.is_linked(&key, &d)? {
                    self.stored_manifest(&d, Outcome::Stale)?
                } else {
                    None
                };
                match child {
                    Some(c) if media::serves_as_is(&c.media_type, accept, true) => c,
                    _ => return Err(e.into()),
                }
            }
            Negotiated::Schema1 => return Err(e.into()),
        };
        tracing::warn!(upstream = route.upstream.name(), repo = %route.repo, reference = %reference, %accept, digest = %served.digest, error = %e, "upstream cannot answer; serving what it would from the cache");
        Ok(Manifest {
            outcome: Outcome::Stale,
            stale_reason: Some(e.to_string()),
            ..served
        })
    }

    /// A manifest by digest from the shared bucket, if the bucket says `route`'s repository has
    /// it (another server fetched it from the upstream for that repository).
    async fn shared_manifest(
        &self,
        route: &Route,
        d: &Digest,
    ) -> Result<Option<Manifest>, CacheError> {
        let Some(b) = self.bucket.as_ref().filter(|b| b.is_up()) else {
            return Ok(None);
        };
        let linked = b
            .is_linked(&upstream_id(&route.upstream.config.url), &route.repo, d)
            .await;
        if or_without(linked, "manifest link") {
            self.import_manifest(b, route, d, None).await
        } else {
            Ok(None)
        }
    }

    /// A tag from the shared bucket when its record is newer than ours: served (`Some`) when
    /// still fresh, else only copied so that revalidation and stale answers start from it.
    async fn shared_tag(&self, route: &Route, t: &Tag) -> Result<Option<Manifest>, CacheError> {
        let Some(b) = self.bucket.as_ref().filter(|b| b.is_up()) else {
            return Ok(None);
        };
        let local = self.store.tag(&route.key(), t)?.map(|r| r.checked_at_ms);
        let rec = b
            .tag(&upstream_id(&route.upstream.config.url), &route.repo, t)
            .await;
        let Some(rec) = or_without(rec, "tag record") else {
            return Ok(None);
        };
        if local.is_some_and(|l| l >= rec.checked_at_ms) {
            return Ok(None);
        }
        let Ok(d) = rec.digest.parse::<Digest>() else {
            return Ok(None);
        };
        let imported = self
            .import_manifest(b, route, &d, Some((t, rec.checked_at_ms)))
            .await?;
        let age = Duration::from_millis(now_millis().saturating_sub(rec.checked_at_ms));
        Ok(imported.filter(|_| age < route.upstream.config.freshness))
    }

    /// Stores the manifest `d` for `route` (taking the bytes from the bucket unless stored
    /// here), and points `tag` at it with the bucket record's check time.
    async fn import_manifest(
        &self,
        b: &Bucket,
        route: &Route,
        d: &Digest,
        tag: Option<(&Tag, u64)>,
    ) -> Result<Option<Manifest>, CacheError> {
        let (media_type, bytes) = match self.store.manifest(d)? {
            Some(m) => m,
            None => {
                let max = self
                    .max_manifest_size
                    .load(std::sync::atomic::Ordering::Relaxed);
                let Some((mt, bytes)) = or_without(b.manifest(d, max).await, "manifest") else {
                    return Ok(None);
                };
                if bytes.len() as u64 > max || !d.matches(&bytes) {
                    b.corrupt();
                    tracing::warn!(digest = %d, "the bucket's copy of a manifest is oversized or does not match its digest; ignoring it");
                    return Ok(None);
                }
                let mt = mt
                    .filter(|m| m.contains('/') && m != "application/octet-stream")
                    .or_else(|| media_type_from_body(&bytes))
                    .unwrap_or_else(|| media::OCI_MANIFEST.into());
                (mt, bytes)
            }
        };
        let subject = referrer_descriptor(&bytes, &media_type, d);
        let (store, key, d2, mt, bytes2, tag2) = (
            Arc::clone(&self.store),
            route.key(),
            d.clone(),
            media_type.clone(),
            bytes.clone(),
            tag.map(|(t, at)| (t.clone(), at)),
        );
        blocking(move || {
            store.put_manifest(
                &key,
                &d2,
                &mt,
                &bytes2,
                None,
                subject.as_ref().map(|(s, desc)| (s, desc.as_slice())),
            )?;
            if let Some((t, at)) = tag2 {
                store.set_tag(&key, &t, &d2, at)?;
            }
            Ok(())
        })
        .await?;
        Ok(Some(Manifest {
            digest: d.clone(),
            media_type,
            bytes,
            outcome: Outcome::Shared,
            stale_reason: None,
        }))
    }

    /// Fetches a manifest as the upstream answers a client accepting `accept`, verifies it,
    /// stores it and points `tag`'s record for `accept` at it.
    async fn download_manifest(
        &self,
        route: &Route,
        reference: &Reference,
        tag: Option<&Tag>,
        accept: Accept,
    ) -> Result<Manifest, CacheError> {
        let up = &route.upstream;
        let fetched = up
            .get_manifest(
                &route.repo,
                &reference.to_string(),
                self.max_manifest_size
                    .load(std::sync::atomic::Ordering::Relaxed),
                accept,
            )
            .await?;
        let expected = match reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        };
        let digest = verify_manifest(up, &fetched, expected)?;
        if !digest.matches(&fetched.bytes) {
            // A signed schema 1 conversion: signed anew at each request, its bytes do not hash to
            // its digest, so the store (content-addressed) cannot keep it.
            return Ok(Manifest {
                digest,
                media_type: fetched.media_type,
                bytes: fetched.bytes,
                outcome: Outcome::Passthrough,
                stale_reason: None,
            });
        }
        let subject = referrer_descriptor(&fetched.bytes, &fetched.media_type, &digest);
        let (store, key, d2, mt, bytes, tag2) = (
            Arc::clone(&self.store),
            route.key(),
            digest.clone(),
            fetched.media_type.clone(),
            fetched.bytes.clone(),
            tag.cloned(),
        );
        let stored = blocking(move || {
            store.put_manifest(
                &key,
                &d2,
                &mt,
                &bytes,
                tag2.as_ref().map(|t| (t, accept)),
                subject.as_ref().map(|(s, desc)| (s, desc.as_slice())),
            )
        })
        .await;
        let outcome = match stored {
            Ok(()) => {
                // The bucket's tag records are for the full Accept only.
                self.share(Share::Manifest {
                    upstream: upstream_id(&up.config.url),
                    repo: route.repo.clone(),
                    digest: digest.clone(),
                    media_type: fetched.media_type.clone(),
                    bytes: fetched.bytes.clone(),
                    tag: tag
                        .filter(|_| accept.is_all())
                        .map(|t| (t.clone(), now_millis())),
                });
                Outcome::Miss
            }
            Err(e) => {
                // Verified bytes are still good to serve; they are just not cached.
                tracing::warn!(digest = %digest, error = %e, "cannot store the manifest; serving it uncached");
                if let CacheError::Store(msg) = &e {
                    if msg.contains("No space left") || msg.contains("os error 28") {
                        self.store.set_full(true);
                    }
                }
                Outcome::Passthrough
            }
        };
        Ok(Manifest {
            digest,
            media_type: fetched.media_type,
            bytes: fetched.bytes,
            outcome,
            stale_reason: None,
        })
    }

    /// A blob for `GET` (`want_body`) or `HEAD`.
    pub async fn blob(
        self: &Arc<Self>,
        route: &Route,
        d: &Digest,
        want_body: bool,
    ) -> Result<Blob, CacheError> {
        let key = route.key();
        if !want_body {
            // HEAD of a stored blob: the database alone answers.
            if let Some((size, true)) = self.store.lookup_blob(&key, d)? {
                return Ok(Blob {
                    size: Some(size),
                    source: BlobSource::Empty,
                    outcome: Outcome::Hit,
                });
            }
        }
        if let Some((file, size)) = self.store.open_blob(d)? {
            let mut outcome = Outcome::Hit;
            if !self.store.is_linked(&key, d)? {
                // Stored for another repository: only served here once the upstream confirmed
                // that this repository has it, to a server of the bucket (its link there) or now.
                // A manifest of this repository that names the digest is a claim, not proof.
                if self.bucket_links_blob(route, d).await {
                    outcome = Outcome::Shared;
                } else {
                    route.upstream.head_blob(&route.repo, d).await?;
                    // The confirmed link goes to the bucket too, so that another server may
                    // serve the blob for this repository while the upstream is down.
                    self.share(Share::Blob {
                        digest: d.clone(),
                        size,
                        link: Some((upstream_id(&route.upstream.config.url), route.repo.clone())),
                    });
                    outcome = Outcome::Revalidated;
                }
                let (store, k2, d2) = (Arc::clone(&self.store), key.clone(), d.clone());
                blocking(move || store.link(&k2, &d2)).await?;
            }
            return Ok(Blob {
                size: Some(size),
                source: if want_body {
                    self.store.touch(d);
                    BlobSource::File(file, self.store.hold(d))
                } else {
                    BlobSource::Empty
                },
                outcome,
            });
        }
        let fill_key = format!("{}/{}@{}", key.upstream, key.repo, d);
        let existing = {
            let fills = lock(&self.fills);
            match fills.get(&fill_key) {
                Some(f) => {
                    let reader = if want_body {
                        Some(self.attach(f, d)?)
                    } else {
                        None
                    };
                    Some((Arc::clone(f), reader))
                }
                None => None,
            }
        };
        if !want_body && existing.is_none() {
            if let Some(size) = self.shared_blob_size(route, d).await? {
                return Ok(Blob {
                    size: Some(size),
                    source: BlobSource::Empty,
                    outcome: Outcome::Shared,
                });
            }
        }
        let (fill, reader, mut outcome) = match existing {
            Some((f, reader)) => (f, reader, Outcome::Coalesced),
            None if !want_body => {
                // A HEAD of a blob nobody is fetching: start the fill if a slot is free (so a
                // HEAD through a chain of mirrors fills each of them), else just ask.
                let slot = self
                    .fill_slots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .0
                    .clone()
                    .try_acquire_owned();
                match slot {
                    Ok(slot) => self.start_fill(route, d, fill_key, slot, false)?,
                    Err(_) => {
                        let size = route.upstream.head_blob(&route.repo, d).await?;
                        return Ok(Blob {
                            size,
                            source: BlobSource::Empty,
                            outcome: Outcome::Passthrough,
                        });
                    }
                }
            }
            None => {
                let slot = self.fill_slot().await?;
                self.start_fill(route, d, fill_key, slot, true)?
            }
        };
        let size = fill.wait_started().await?;
        if outcome == Outcome::Miss && fill.from_bucket.load(Ordering::Relaxed) {
            outcome = Outcome::Shared;
        }
        Ok(Blob {
            size,
            source: match reader {
                Some(r) => BlobSource::Fill(r),
                None => BlobSource::Empty,
            },
            outcome,
        })
    }

    /// Whether a fill of `d` for `route` is under way, without joining or starting one: `Some(true)`
    /// while it fetches or commits, `Some(false)` for a fill on a full disk, served from memory and
    /// never committed. A commit records the blob before its fill leaves `fills`.
    pub fn filling(&self, route: &Route, d: &Digest) -> Option<bool> {
        let key = route.key();
        let fill =
            Arc::clone(lock(&self.fills).get(&format!("{}/{}@{}", key.upstream, key.repo, d))?);
        let to_disk = fill.disk_len().is_none();
        Some(to_disk)
    }

    /// Whether the bucket may be asked for blob `d` on behalf of `route`'s repository: the
    /// upstream confirmed that repository has it, here (a local link) or to the server that
    /// wrote the bucket's link. A manifest of the repository that names the digest is not enough.
    async fn bucket_for_blob(
        &self,
        route: &Route,
        d: &Digest,
    ) -> Result<Option<&Arc<Bucket>>, CacheError> {
        let Some(b) = self.bucket.as_ref().filter(|b| b.is_up()) else {
            return Ok(None);
        };
        if self
            .bucket_bad
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(d)
        {
            return Ok(None);
        }
        if self.store.is_linked(&route.key(), d)? || self.bucket_links_blob(route, d).await {
            return Ok(Some(b));
        }
        Ok(None)
    }

    /// Whether the bucket links blob `d` to `route`'s repository: a server fetched it from the
    /// upstream for that repository, or the upstream confirmed it there. False without a bucket
    /// in use.
    async fn bucket_links_blob(&self, route: &Route, d: &Digest) -> bool {
        let Some(b) = self.bucket.as_ref().filter(|b| b.is_up()) else {
            return false;
        };
        let linked = b
            .is_blob_linked(&upstream_id(&route.upstream.config.url), &route.repo, d)
            .await;
        or_without(linked, "blob link")
    }

    /// The size of blob `d` if the bucket holds it for `route`.
    async fn shared_blob_size(&self, route: &Route, d: &Digest) -> Result<Option<u64>, CacheError> {
        let Some(b) = self.bucket_for_blob(route, d).await? else {
            return Ok(None);
        };
        Ok(or_without(b.head_blob(d).await, "blob size"))
    }

    /// A presigned URL of the bucket's copy of `d`, when `[store.s3] redirect` is on, the blob
    /// is not in the local tier, and `route`'s repository may have it.
    pub async fn blob_redirect(
        &self,
        route: &Route,
        d: &Digest,
    ) -> Result<Option<reqwest::Url>, CacheError> {
        // Cheap checks first: this runs before every blob GET when a bucket is configured.
        if !self.bucket.as_ref().is_some_and(|b| b.redirects())
            || self.store.blob_size(d)?.is_some()
        {
            return Ok(None);
        }
        let Some(b) = self.bucket_for_blob(route, d).await? else {
            return Ok(None);
        };
        Ok(or_without(b.blob_url(d).await, "presigned URL"))
    }

    /// Opens the blob's bytes from `offset`: the bucket's copy when it may serve `route` and
    /// holds it, else the upstream. `total`: the blob's size, when known.
    async fn open_source(
        &self,
        route: &Route,
        d: &Digest,
        offset: u64,
        bucket: bool,
        total: Option<u64>,
    ) -> Result<(Source, Option<u64>), CacheError> {
        if bucket {
            if let Some(b) = self.bucket_for_blob(route, d).await? {
                if let Some(blob) = or_without(b.get_blob(d, offset).await, "blob") {
                    return Ok((Source::Bucket(blob.stream), Some(blob.size)));
                }
            }
        }
        let resp = route
            .upstream
            .get_blob(&route.repo, d, offset, total)
            .await?;
        let size = resp.content_length();
        Ok((Source::Upstream(resp), size))
    }

    /// The next chunk of a fill's source (`Ok(None)` at its end).
    async fn next_chunk(
        &self,
        up: &Upstream,
        source: &mut Source,
    ) -> Result<Option<Bytes>, UpstreamError> {
        match source {
            Source::Upstream(resp) => up.next_chunk(resp).await,
            Source::Bucket(stream) => {
                let idle = up.config.idle_timeout;
                let r =
                    match tokio::time::timeout(idle, futures_util::StreamExt::next(stream)).await {
                        Ok(Some(Ok(c))) => return Ok(Some(c)),
                        Ok(None) => return Ok(None),
                        Ok(Some(Err(e))) => e.to_string(),
                        Err(_) => format!("no data for {idle:?}"),
                    };
                if let Some(b) = &self.bucket {
                    b.failed("get", &r);
                }
                Err(UpstreamError::Unreachable {
                    upstream: "bucket".into(),
                    detail: r,
                })
            }
        }
    }

    /// A new reader of `fill`, which must be in `Cache::fills` (so that it still holds every
    /// byte) while `fills` is locked. Nothing may fail after it is made under that lock: its drop
    /// locks `fills`.
    fn attach(self: &Arc<Self>, fill: &Arc<Fill>, d: &Digest) -> Result<FillReader, CacheError> {
        let file = match lock(&fill.file).as_ref() {
            Some(f) => Some(
                f.try_clone()
                    .map_err(|e| CacheError::Store(format!("dup temporary file: {e}")))?,
            ),
            None => None,
        };
        let id = fill.next_reader.fetch_add(1, Ordering::Relaxed);
        lock(&fill.readers).insert(id, 0);
        Ok(FillReader {
            cache: Arc::clone(self),
            fill: Arc::clone(fill),
            id,
            file,
            hold: Some(self.store.hold(d)),
        })
    }

    /// Takes `fill` out of `Cache::fills` once nothing needs it there: its task has ended, and
    /// it is not a blob held in memory on a full disk that clients are still reading (later
    /// requests join that one rather than fetch the blob again).
    fn settle(&self, fill: &Arc<Fill>) {
        let mut fills = lock(&self.fills);
        let listed = fills.get(&fill.key).is_some_and(|f| Arc::ptr_eq(f, fill));
        if listed && fill.ended.load(Ordering::Relaxed) && !fill.kept_for_joiners() {
            fills.remove(&fill.key);
            lock(&fill.file).take();
        }
    }

    /// Starts (or joins, if one raced us) the fill of `d` for `route`, with a reader if the
    /// request wants the body; the fill holds `slot` until it ends.
    fn start_fill(
        self: &Arc<Self>,
        route: &Route,
        d: &Digest,
        fill_key: String,
        slot: tokio::sync::OwnedSemaphorePermit,
        want_body: bool,
    ) -> Result<(Arc<Fill>, Option<FillReader>, Outcome), CacheError> {
        let mut fills = lock(&self.fills);
        if let Some(f) = fills.get(&fill_key) {
            let f = Arc::clone(f);
            let reader = if want_body {
                Some(self.attach(&f, d)?)
            } else {
                None
            };
            return Ok((f, reader, Outcome::Coalesced));
        }
        let temp = self.store.temp_blob()?;
        let read = temp
            .file()
            .ok_or_else(|| CacheError::Internal("temporary file closed".into()))?
            .try_clone()
            .map_err(|e| CacheError::Store(format!("dup temporary file: {e}")))?;
        let (tx, rx) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill::new(fill_key.clone(), read, rx));
        let reader = if want_body {
            Some(self.attach(&fill, d)?)
        } else {
            None
        };
        fills.insert(fill_key, Arc::clone(&fill));
        drop(fills);
        let task = FillTask {
            cache: Arc::clone(self),
            fill: Arc::clone(&fill),
        };
        let this = Arc::clone(self);
        let (route, d, fill2) = (route.clone(), d.clone(), Arc::clone(&fill));
        tokio::spawn(async move {
            let _slot = slot;
            let started = std::time::Instant::now();
            let result = this.run_fill(&route, &d, temp, &tx, &fill2).await;
            let from_bucket = fill2.from_bucket.load(Ordering::Relaxed);
            if from_bucket
                && matches!(
                    result,
                    Err(CacheError::DigestMismatch { .. } | CacheError::SizeMismatch { .. })
                )
            {
                // Never serve that copy again: the next request fetches from the upstream.
                tracing::error!(digest = %d, "the shared bucket's copy of a blob failed verification; using the upstream for it from now on");
                if let Some(b) = &this.bucket {
                    b.corrupt();
                }
                this.bucket_bad
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(d.clone());
            }
            let labels = Metrics::upstream(route.upstream.name());
            match &result {
                Ok(_) => this
                    .metrics
                    .fill_seconds
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64()),
                Err(e) => {
                    let reason = match e {
                        CacheError::Upstream(_) | CacheError::NotAcceptable(_) => "upstream",
                        CacheError::DigestMismatch { .. } => "digest",
                        CacheError::SizeMismatch { .. } => "size",
                        CacheError::Store(_) => "store",
                        CacheError::Internal(_) => "internal",
                        CacheError::Busy(_) => "busy",
                    };
                    this.metrics
                        .fills_failed
                        .get_or_create(&vec![("reason", reason.to_owned())])
                        .inc();
                }
            }
            let in_memory = lock(&fill2.tail).is_some();
            match result {
                Ok(size) if in_memory => {
                    // Done first: the fill stays in the map while clients read it from memory,
                    // for later requests to join.
                    tx.send_replace(FillState::Done { size });
                    drop(task);
                }
                Ok(size) => {
                    // Out of the map before publishing the outcome, so that later requests see
                    // the store.
                    drop(task);
                    tracing::debug!(upstream = route.upstream.name(), digest = %d, size, "blob committed");
                    tx.send_replace(FillState::Done { size });
                }
                Err(e) => {
                    drop(task);
                    tracing::warn!(upstream = route.upstream.name(), repo = %route.repo, digest = %d, error = %e, "blob fill failed");
                    tx.send_replace(FillState::Failed(e));
                }
            }
        });
        Ok((fill, reader, Outcome::Miss))
    }

    /// Downloads, hashes and commits one blob; returns its size.
    async fn run_fill(
        &self,
        route: &Route,
        d: &Digest,
        temp: TempBlob,
        tx: &watch::Sender<FillState>,
        fill: &Arc<Fill>,
    ) -> Result<u64, CacheError> {
        let up = &route.upstream;
        let (mut source, size) = self.open_source(route, d, 0, true, None).await?;
        let from_bucket = matches!(source, Source::Bucket(_));
        fill.from_bucket.store(from_bucket, Ordering::Relaxed);
        tx.send_replace(FillState::Streaming { size, written: 0 });
        // The hash runs on its own blocking thread, fed batch by batch: a batch is published to
        // the readers once written, without waiting for its hash (only the last byte waits for
        // the digest). At most HASH_AHEAD batches wait for it.
        let (hash_tx, mut hash_rx) = mpsc::channel::<Vec<Bytes>>(HASH_AHEAD);
        let mut hasher = d.hasher();
        let hashing = tokio::task::spawn_blocking(move || {
            while let Some(parts) = hash_rx.blocking_recv() {
                for p in &parts {
                    hasher.update(p);
                }
            }
            hasher
        });
        // The temporary file; `None` once the disk is full (the blob then goes on in memory).
        let mut state = Some(temp);
        let mut written: u64 = 0;
        let mut resumes = 0;
        // A read that came back while batching, to handle first on the next turn.
        let mut carry: Option<Result<Option<Bytes>, UpstreamError>> = None;
        loop {
            let next = match carry.take() {
                Some(r) => r,
                None => self.next_chunk(up, &mut source).await,
            };
            let chunk = match next {
                Ok(Some(c)) if c.is_empty() => continue,
                Ok(Some(c)) => c,
                Ok(None) if size.is_none_or(|s| written >= s) => break,
                Ok(None) | Err(_) if resumes < RESUME_ATTEMPTS => {
                    // The stream broke (or ended early): ask for the rest.
                    resumes += 1;
                    tracing::warn!(upstream = up.name(), digest = %d, written, attempt = resumes, "blob stream broke; resuming with Range");
                    source = self.open_source(route, d, written, false, size).await?.0;
                    continue;
                }
                Ok(None) => {
                    return Err(CacheError::SizeMismatch {
                        upstream: up.name().to_owned(),
                        digest: d.to_string(),
                        expected: size.unwrap_or(0),
                        actual: written,
                    })
                }
                Err(e) => return Err(e.into()),
            };
            // Whatever else has already arrived goes to disk in the same write (fewer trips to
            // the blocking pool, fewer wake-ups of the readers), without copying it together.
            let mut parts = vec![chunk];
            let mut total = parts[0].len();
            while total < WRITE_BATCH {
                match self.next_chunk(up, &mut source).now_or_never() {
                    Some(Ok(Some(c))) => {
                        total += c.len();
                        parts.push(c);
                    }
                    Some(other) => {
                        carry = Some(other);
                        break;
                    }
                    None => break,
                }
            }
            let len = total as u64;
            if size.is_some_and(|s| written + len > s) {
                return Err(CacheError::SizeMismatch {
                    upstream: up.name().to_owned(),
                    digest: d.to_string(),
                    expected: size.unwrap_or(0),
                    actual: written + len,
                });
            }
            // On a full disk the batch is kept in memory, as a copy of its own.
            let kept = state.is_none().then(|| own_copy(&parts, len));
            let hashed = match &kept {
                Some(chunk) => vec![chunk.clone()],
                None => parts.clone(),
            };
            hash_tx
                .send(hashed)
                .await
                .map_err(|_| CacheError::Internal("hash task ended early".into()))?;
            match (state.take(), kept) {
                (Some(temp), _) => {
                    let (temp, result) = tokio::task::spawn_blocking(move || {
                        let mut temp = temp;
                        let r = temp.write_all_parts(&parts).map_err(|e| (e, parts));
                        (temp, r)
                    })
                    .await
                    .map_err(|e| CacheError::Internal(format!("write task: {e}")))?;
                    match result {
                        Ok(()) => state = Some(temp),
                        Err((e, parts)) if crate::store::is_disk_full(&e) => {
                            // Disk full: keep serving this fill's clients from memory, cache
                            // nothing. The temporary file goes at once; its bytes stay readable
                            // through the descriptors of the readers that still need them.
                            drop(temp);
                            self.store.set_full(true);
                            tracing::warn!(digest = %d, at = written, "disk full during a fill: serving it from memory without caching");
                            *lock(&fill.tail) = Some(MemoryTail {
                                disk_len: written,
                                chunks: VecDeque::new(),
                                bytes: 0,
                                memory: Arc::clone(&self.fill_memory),
                            });
                            let chunk = own_copy(&parts, len);
                            drop(parts);
                            self.keep_in_memory(up, d, fill, written, chunk).await?;
                        }
                        Err((e, _)) => {
                            return Err(CacheError::Store(format!("writing temporary blob: {e}")))
                        }
                    }
                }
                (None, Some(chunk)) => {
                    drop(parts);
                    self.keep_in_memory(up, d, fill, written, chunk).await?;
                }
                (None, None) => return Err(CacheError::Internal("fill state lost".into())),
            }
            written += len;
            if matches!(source, Source::Upstream(_)) {
                self.metrics
                    .bytes_fetched
                    .get_or_create(&Metrics::upstream(up.name()))
                    .inc_by(len);
            }
            tx.send_replace(FillState::Streaming { size, written });
        }
        drop(hash_tx);
        let actual = hashing
            .await
            .map_err(|e| CacheError::Internal(format!("hash task: {e}")))?
            .finish();
        if actual != *d {
            return Err(CacheError::DigestMismatch {
                upstream: up.name().to_owned(),
                expected: d.to_string(),
                actual: actual.to_string(),
            });
        }
        let Some(temp) = state else {
            tracing::info!(digest = %d, size = written, "blob served without caching (disk full)");
            return Ok(written);
        };
        // Verified: the clients may have their last byte now, while the commit (fsync, rename,
        // database) proceeds; they read the file through descriptors the commit does not touch.
        tx.send_replace(FillState::Done { size: written });
        let (store, key, d2) = (Arc::clone(&self.store), route.key(), d.clone());
        match blocking(move || store.commit_blob(temp, &d2, written, &key, None)).await {
            Ok(()) => {
                self.store.set_full(false);
                if !from_bucket {
                    self.share(Share::Blob {
                        digest: d.clone(),
                        size: written,
                        link: Some((upstream_id(&up.config.url), route.repo.clone())),
                    });
                }
            }
            Err(CacheError::Store(msg)) if msg.contains("os error 28") => {
                // The bytes were verified and the clients have them; only caching failed.
                self.store.set_full(true);
                tracing::warn!(digest = %d, "disk full at commit: blob served without caching");
            }
            Err(e) => {
                tracing::error!(digest = %d, error = %e, "cannot commit a verified blob: served without caching");
            }
        }
        Ok(written)
    }
}

impl Cache {
    /// Keeps `chunk` (at `at`) of a fill on a full disk in memory for its readers.
    /// Within `limits.fill_memory` (all fills together) the fill keeps the whole blob, so that
    /// later requests can join it. Past it, the fill streams the blob through: it leaves the map
    /// (later requests start their own fill), keeps only what its readers have not sent yet, and
    /// reads on from the upstream only when its slowest reader is less than
    /// [`THROUGH_WINDOW`] behind.
    async fn keep_in_memory(
        &self,
        up: &Upstream,
        d: &Digest,
        fill: &Arc<Fill>,
        at: u64,
        chunk: Bytes,
    ) -> Result<(), CacheError> {
        let len = chunk.len() as u64;
        if !fill.through.load(Ordering::Relaxed) {
            if self.fill_memory.try_take(len) {
                if let Some(t) = lock(&fill.tail).as_mut() {
                    t.push(at, chunk);
                }
                return Ok(());
            }
            self.stream_through(fill);
            tracing::warn!(digest = %d, at, readers = lock(&fill.readers).len(), "disk full and limits.fill_memory used up: streaming the blob through to its clients without keeping it");
        }
        let idle = up.config.idle_timeout;
        loop {
            if lock(&fill.readers).is_empty() {
                return Err(CacheError::Store(
                    "disk full and no client is reading the blob any more".into(),
                ));
            }
            fill.trim();
            let kept = lock(&fill.tail).as_ref().map_or(0, |t| t.bytes);
            if kept <= THROUGH_WINDOW {
                break;
            }
            if tokio::time::timeout(idle, fill.progress.notified())
                .await
                .is_err()
            {
                let n = fill.let_slowest_go();
                tracing::warn!(digest = %d, readers = n, "a client of a blob streamed through a full disk read nothing for {idle:?}: ending its body so that the others go on");
            }
        }
        self.fill_memory.take(len);
        if let Some(t) = lock(&fill.tail).as_mut() {
            t.push(at, chunk);
        }
        Ok(())
    }

    /// Makes a fill on a full disk stream through: out of the map, so no one joins it any more,
    /// and without its own descriptor of the temporary file.
    fn stream_through(&self, fill: &Arc<Fill>) {
        let mut fills = lock(&self.fills);
        if fills.get(&fill.key).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            fills.remove(&fill.key);
        }
        fill.through.store(true, Ordering::Relaxed);
        lock(&fill.file).take();
    }
}

impl Cache {
    /// Writes `item` to the bucket in the background; when the bucket is skipped or the write
    /// fails, keeps it for [`Cache::retry_shares`].
    fn share(&self, item: Share) {
        self.share_item(item, false);
    }

    /// [`Cache::share`]; `recorded`: the write is in the outbox (a retry), to be removed from
    /// it once done.
    fn share_item(&self, item: Share, recorded: bool) {
        let Some(b) = &self.bucket else {
            return;
        };
        if !b.is_up() {
            self.pending.defer(item, recorded);
            return;
        }
        // Over a copy that failed verification here, the good one is written anyway.
        let replace = match &item {
            Share::Blob { digest, .. } => self
                .bucket_bad
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(digest),
            _ => false,
        };
        let (b, pending, store) = (
            Arc::clone(b),
            Arc::clone(&self.pending),
            Arc::clone(&self.store),
        );
        tokio::spawn(async move {
            // One of a few write slots first: a retry of thousands of writes neither opens
            // thousands of files nor floods the bucket.
            let _slot = match b.upload_slot().await {
                Ok(s) => s,
                Err(_) => return,
            };
            let r = match &item {
                Share::Blob { digest, size, link } => {
                    // Opened now, so eviction cannot take the file away during the upload.
                    match store.open_blob(digest) {
                        Ok(Some((file, _))) => {
                            let r = b.put_blob(digest, file, *size, replace).await;
                            match (r, link) {
                                (Ok(()), Some((upstream, repo))) => {
                                    b.put_blob_link(upstream, repo, digest).await
                                }
                                (r, _) => r,
                            }
                        }
                        Ok(None) => {
                            // Evicted meanwhile: nothing left to share.
                            pending.forget(&item, recorded);
                            return;
                        }
                        Err(e) => Err(crate::bucket::BucketError::Other(e.to_string())),
                    }
                }
                Share::Manifest {
                    upstream,
                    repo,
                    digest,
                    media_type,
                    bytes,
                    tag,
                } => {
                    let tag = tag.as_ref().map(|(t, at)| (t, *at));
                    b.put_manifest(upstream, repo, digest, media_type, bytes.clone(), tag)
                        .await
                }
                Share::Tag {
                    upstream,
                    repo,
                    tag,
                    digest,
                    checked_at_ms,
                } => b.put_tag(upstream, repo, tag, digest, *checked_at_ms).await,
            };
            match r {
                Ok(()) => pending.forget(&item, recorded),
                Err(e) => {
                    tracing::debug!(error = %e, "not shared yet; retried when the bucket answers");
                    pending.defer(item, recorded);
                }
            }
        });
    }

    /// Writes what could not be shared earlier, once the bucket answers again (run by the
    /// maintenance loop).
    pub fn retry_shares(&self) {
        if !self.bucket.as_ref().is_some_and(|b| b.is_up()) {
            return;
        }
        let items: Vec<Share> = {
            let mut q = self.pending.items.lock().unwrap_or_else(|p| p.into_inner());
            self.pending.gauge.set(0);
            q.drain(..).collect()
        };
        if !items.is_empty() {
            tracing::info!(
                count = items.len(),
                "sharing what the bucket missed while it was unreachable"
            );
        }
        for item in items {
            self.share_item(item, true);
        }
    }
}

/// Most writes kept for the bucket while it does not answer; the oldest are dropped beyond this.
const MAX_PENDING: usize = 10_000;

impl PendingShares {
    /// Keeps `item` for a retry, in memory and (unless `recorded` already) in the outbox.
    fn defer(&self, item: Share, recorded: bool) {
        if !recorded {
            let (key, record) = (item.key(), serde_json::to_vec(&item.record()));
            let store = Arc::clone(&self.store);
            if let Ok(record) = record {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = store.outbox_add(&key, &record) {
                        tracing::warn!(error = %e, "cannot record a write owed to the bucket");
                    }
                });
            }
        }
        let mut q = self.items.lock().unwrap_or_else(|p| p.into_inner());
        // One entry per object: a newer write (a later tag confirmation) replaces the older.
        let key = item.key();
        if let Some(old) = q.iter_mut().find(|x| x.key() == key) {
            *old = item;
            return;
        }
        if q.len() >= MAX_PENDING {
            if let Some(old) = q.pop_front() {
                self.forget(&old, true);
            }
            tracing::warn!(
                max = MAX_PENDING,
                "too many writes waiting for the bucket: dropping the oldest"
            );
        }
        q.push_back(item);
        self.gauge.set(q.len() as i64);
    }

    /// Drops `item` from the outbox once written (or no longer writable).
    fn forget(&self, item: &Share, recorded: bool) {
        if recorded {
            let (key, store) = (item.key(), Arc::clone(&self.store));
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.outbox_remove(&key) {
                    tracing::warn!(error = %e, "cannot clear a write owed to the bucket");
                }
            });
        }
    }
}

impl Cache {
    /// Queues the writes owed to the bucket that a previous run recorded (called once at start;
    /// the maintenance loop retries them).
    pub fn load_outbox(&self) -> Result<usize, CacheError> {
        if self.bucket.is_none() {
            return Ok(0);
        }
        let mut n = 0;
        let records = self.store.outbox()?;
        let mut q = self.pending.items.lock().unwrap_or_else(|p| p.into_inner());
        for (key, raw) in records {
            let share = serde_json::from_slice::<ShareRecord>(&raw)
                .ok()
                .and_then(|r| Share::from_record(r, &self.store));
            match share {
                Some(item) => {
                    q.push_back(item);
                    n += 1;
                }
                // Malformed, or its manifest was evicted: nothing left to write.
                None => self.store.outbox_remove(&key)?,
            }
        }
        self.pending.gauge.set(q.len() as i64);
        Ok(n)
    }
}

impl Fill {
    fn new(key: String, file: File, state: watch::Receiver<FillState>) -> Fill {
        Fill {
            key,
            file: Mutex::new(Some(file)),
            state,
            tail: Mutex::new(None),
            from_bucket: AtomicBool::new(false),
            readers: Mutex::new(HashMap::new()),
            next_reader: AtomicU64::new(0),
            through: AtomicBool::new(false),
            progress: tokio::sync::Notify::new(),
            ended: AtomicBool::new(false),
        }
    }

    /// Where the memory tail starts, once the disk is full.
    fn disk_len(&self) -> Option<u64> {
        lock(&self.tail).as_ref().map(|t| t.disk_len)
    }

    /// A finished fill whose blob is in memory (disk full), whole, and still being read: later
    /// requests for the blob join it.
    fn kept_for_joiners(&self) -> bool {
        let done = matches!(*self.state.borrow(), FillState::Done { .. });
        let in_memory = lock(&self.tail).is_some();
        let read = !lock(&self.readers).is_empty();
        done && in_memory && read && !self.through.load(Ordering::Relaxed)
    }

    /// Once the fill streams through: drops the chunks that every reader has sent.
    fn trim(&self) {
        if !self.through.load(Ordering::Relaxed) {
            return;
        }
        let upto = lock(&self.readers)
            .values()
            .min()
            .copied()
            .unwrap_or(u64::MAX);
        if let Some(t) = lock(&self.tail).as_mut() {
            t.drop_before(upto);
        }
    }

    /// Lets the readers furthest behind go (their bodies end with an error); returns how many.
    fn let_slowest_go(&self) -> usize {
        let mut readers = lock(&self.readers);
        let Some(min) = readers.values().min().copied() else {
            return 0;
        };
        let before = readers.len();
        readers.retain(|_, pos| *pos > min);
        before - readers.len()
    }

    /// Bytes at `pos` from the memory tail (`Ok`), or how many to read from the file (`Err`).
    fn memory_slice(&self, pos: u64, len: usize) -> Result<Bytes, usize> {
        let tail = lock(&self.tail);
        let Some(t) = tail.as_ref() else {
            return Err(len);
        };
        if pos < t.disk_len {
            return Err(len.min((t.disk_len - pos) as usize));
        }
        let i = t.chunks.partition_point(|(start, _)| *start <= pos);
        match i.checked_sub(1).and_then(|i| t.chunks.get(i)) {
            Some((start, chunk)) if pos < start + chunk.len() as u64 => {
                let off = (pos - start) as usize;
                Ok(chunk.slice(off..chunk.len().min(off + len)))
            }
            _ => Err(0),
        }
    }

    /// Waits until the upstream answered; returns the blob's size if it announced one.
    async fn wait_started(&self) -> Result<Option<u64>, CacheError> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Connecting => {}
                FillState::Streaming { size, .. } => return Ok(*size),
                FillState::Done { size } => return Ok(Some(*size)),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::Internal("fill ended without a result".into()));
            }
        }
    }

    /// Waits until the fill is done, returning its size.
    pub async fn wait_done(&self) -> Result<u64, CacheError> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Done { size } => return Ok(*size),
                FillState::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::Internal("fill ended without a result".into()));
            }
        }
    }
}

/// `parts` (`len` bytes) copied into one buffer of their own. What a fill keeps in memory is
/// copied out of the HTTP client's read buffers: keeping a slice would keep its whole buffer, and
/// the memory held would be more than the memory counted against `limits.fill_memory`.
fn own_copy(parts: &[Bytes], len: u64) -> Bytes {
    let mut chunk = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    for p in parts {
        chunk.extend_from_slice(p);
    }
    Bytes::from(chunk)
}

/// Reads the next `len` bytes of a file this stream owns (its own file position: the first read
/// seeks to `offset`). Unlike [`read_at`], the buffer is not zeroed first.
async fn read_next(mut file: File, offset: u64, len: usize) -> io::Result<(File, Bytes)> {
    use std::io::{Read, Seek, SeekFrom};
    tokio::task::spawn_blocking(move || {
        if file.stream_position()? != offset {
            file.seek(SeekFrom::Start(offset))?;
        }
        let mut buf = Vec::with_capacity(len);
        (&mut file).take(len as u64).read_to_end(&mut buf)?;
        if buf.len() < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file is shorter than recorded",
            ));
        }
        Ok((file, Bytes::from(buf)))
    })
    .await
    .map_err(io::Error::other)?
}

/// Reads up to `len` bytes at `offset` if the page cache holds them, without blocking
/// (`preadv2` with `RWF_NOWAIT`). `None`: they are not all cached (or the filesystem cannot say),
/// so read on the blocking pool instead. A short result is fine: the stream asks for the rest.
pub(crate) fn read_cached(file: &File, offset: u64, len: usize) -> Option<io::Result<Bytes>> {
    let mut buf = PooledBuf::take();
    let want = len.min(buf.0.len());
    let r = rustix::io::preadv2(
        file,
        &mut [io::IoSliceMut::new(&mut buf.0[..want])],
        offset,
        rustix::io::ReadWriteFlags::NOWAIT,
    );
    match r {
        Ok(0) => Some(Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file is shorter than recorded",
        ))),
        Ok(n) => {
            buf.1 = n;
            Some(Ok(Bytes::from_owner(buf)))
        }
        Err(_) => None, // EAGAIN (not cached), EOPNOTSUPP, …: the blocking read decides
    }
}

/// Read buffers of [`CHUNK`] bytes, zeroed once and reused: a chunk handed to hyper returns its
/// buffer here when hyper drops it, so a hot stream neither allocates nor zeroes per chunk
/// (`preadv2` needs initialised memory). At most [`POOL_MAX`] idle buffers are kept.
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
const POOL_MAX: usize = 32;

/// A pooled buffer and how many of its bytes are valid.
struct PooledBuf(Vec<u8>, usize);

impl PooledBuf {
    fn take() -> PooledBuf {
        let buf = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
        PooledBuf(buf.unwrap_or_else(|| vec![0u8; CHUNK]), 0)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(buf);
        }
    }
}

pub type BodyChunk = Result<Bytes, io::Error>;

/// Bytes `start..=end` of a committed file, read as the client consumes them: each chunk is one
/// trip to the blocking pool, with no task or channel in between.
pub fn stream_file(
    file: File,
    hold: crate::store::Hold,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = BodyChunk> + Send + 'static {
    futures_util::stream::unfold(
        (Some(file), start, hold),
        move |(file, pos, hold)| async move {
            let file = file?;
            if pos > end {
                return None;
            }
            let len = CHUNK.min((end + 1 - pos) as usize);
            // Bytes already in the page cache are read right here; only a read that would wait
            // for the disk goes to the blocking pool (a hand-off costs more than the copy).
            let read = match read_cached(&file, pos, len) {
                Some(r) => r.map(|chunk| (file, chunk)),
                None => read_next(file, pos, len).await,
            };
            match read {
                Ok((f, chunk)) => {
                    let next = pos + chunk.len() as u64;
                    Some((Ok(chunk), (Some(f), next, hold)))
                }
                // The error ends the body (hyper aborts the response); nothing follows it.
                Err(e) => Some((Err(e), (None, pos, hold))),
            }
        },
    )
}

/// Streams bytes `start..=end` of a blob being filled, as they arrive. The last byte is sent only
/// once the fill has verified the blob (when the upstream did not announce the size, the last
/// byte received so far is always held back, since any byte may be the last); a failed fill ends
/// the stream with an error.
pub fn stream_fill(
    mut reader: FillReader,
    lane: Option<Arc<crate::http::sendfile::Lane>>,
    start: u64,
    end: u64,
) -> mpsc::Receiver<BodyChunk> {
    use crate::http::sendfile::{placeholder, read_range, Source, SEND_CHUNK};
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let fill = Arc::clone(&reader.fill);
        let mut rx_state = fill.state.clone();
        // The reader's descriptor and its hold on the blob go with every range queued on the
        // lane, until the range is sent.
        let mut source = match reader.file.take() {
            Some(file) => Some(Arc::new(Source {
                file,
                hold: reader.hold.take(),
            })),
            None => {
                let _ = tx
                    .send(Err(io::Error::other("the fill has no file to read")))
                    .await;
                return;
            }
        };
        // With a lane, written bytes go out with sendfile (they were just written, so cached).
        let step = if lane.is_some() { SEND_CHUNK } else { CHUNK };
        let mut pos = start;
        loop {
            if !reader.advance(pos) {
                let _ = tx
                    .send(Err(io::Error::other(
                        "this client fell too far behind a blob streamed through a full disk",
                    )))
                    .await;
                return;
            }
            // Past the part of a fill on a full disk that went to its temporary file: let the
            // file go, so that its space is freed once nobody needs it.
            if source.is_some() && fill.disk_len().is_some_and(|l| pos >= l) {
                source = None;
            }
            let state = rx_state.borrow_and_update().clone();
            let (limit, done) = match state {
                FillState::Connecting => (pos, false),
                FillState::Streaming {
                    size: Some(_),
                    written,
                } => (written.min(end), false),
                FillState::Streaming {
                    size: None,
                    written,
                } => (written.saturating_sub(1).min(end), false),
                // `end` is u64::MAX when the size was not announced: stop at the size.
                FillState::Done { size } => (size.min(end.saturating_add(1)), true),
                FillState::Failed(e) => {
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            if pos < limit {
                let len = step.min((limit - pos) as usize);
                let read = match fill.memory_slice(pos, len) {
                    Ok(chunk) if !chunk.is_empty() => Ok(chunk),
                    Err(len) if len > 0 => match &source {
                        Some(source) => {
                            let placed =
                                lane.as_ref().and_then(|l| placeholder(l, source, pos, len));
                            match placed {
                                Some(p) => Ok(p),
                                None => match read_cached(&source.file, pos, len) {
                                    Some(r) => r,
                                    None => {
                                        read_range(Arc::clone(source), pos, len.min(CHUNK)).await
                                    }
                                },
                            }
                        }
                        None => Err(io::Error::other(format!("fill has no file for byte {pos}"))),
                    },
                    _ => Err(io::Error::other(format!("fill has no byte at {pos}"))),
                };
                match read {
                    Ok(chunk) => {
                        pos += chunk.len() as u64;
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                continue;
            }
            if done || pos > end {
                return;
            }
            if rx_state.changed().await.is_err()
                && !matches!(
                    *rx_state.borrow(),
                    FillState::Done { .. } | FillState::Failed(_)
                )
            {
                let _ = tx
                    .send(Err(io::Error::other("fill ended without a result")))
                    .await;
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cached_reads_return_the_file_bytes_or_defer_to_the_blocking_read() {
        let mut f = tempfile::tempfile().expect("temp file");
        let data: Vec<u8> = (0..CHUNK * 2 + 123).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).expect("write");
        // Just written, so in the page cache: on filesystems with RWF_NOWAIT this reads inline.
        let mut pos = 0usize;
        let mut inline = 0;
        while pos < data.len() {
            let len = CHUNK.min(data.len() - pos);
            let chunk = match read_cached(&f, pos as u64, len) {
                Some(r) => {
                    inline += 1;
                    r.expect("cached read")
                }
                None => Bytes::from(data[pos..pos + len].to_vec()),
            };
            assert!(!chunk.is_empty() && chunk.len() <= len);
            assert_eq!(&chunk[..], &data[pos..pos + chunk.len()], "bytes at {pos}");
            pos += chunk.len();
        }
        if let Some(r) = read_cached(&f, data.len() as u64, 10) {
            inline += 1;
            let e = r.expect_err("past the end");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
        eprintln!("{inline} reads served inline");
    }

    #[test]
    fn owed_bucket_writes_survive_their_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let d = Digest::sha256_of(b"layer");
        let items = [
            Share::Blob {
                digest: d.clone(),
                size: 5,
                link: Some((
                    "127.0.0.1:5000".into(),
                    "library/alpine".parse().expect("repo"),
                )),
            },
            Share::Tag {
                upstream: "127.0.0.1:5000".into(),
                repo: "library/alpine".parse().expect("repo"),
                tag: "3.20".parse().expect("tag"),
                digest: d.clone(),
                checked_at_ms: 42,
            },
        ];
        for item in items {
            let json = serde_json::to_vec(&item.record()).expect("json");
            let back = serde_json::from_slice::<ShareRecord>(&json).expect("parse");
            let again = Share::from_record(back, &store).expect("still writable");
            assert_eq!(again.key(), item.key());
            assert_eq!(
                serde_json::to_vec(&again.record()).expect("json"),
                json,
                "the record round-trips"
            );
        }
        // A manifest whose bytes are gone from the store is no longer owed.
        let gone = ShareRecord::Manifest {
            upstream: "h".into(),
            repo: "r".into(),
            digest: d.to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            tag: None,
            checked_at_ms: 0,
        };
        assert!(Share::from_record(gone, &store).is_none());
        let bad = ShareRecord::Blob {
            digest: "sha256:nothex".into(),
            size: 1,
            upstream: None,
            repo: None,
        };
        assert!(Share::from_record(bad, &store).is_none());
    }

    fn panics_inside_the_flight() -> Result<u32, CacheError> {
        panic!("a bug inside the flight")
    }

    #[tokio::test]
    async fn a_manifest_flight_that_panics_is_forgotten_and_the_next_request_starts_a_new_one() {
        let flights = Flights::<u32>::new();
        let (first, joined) = flights
            .run("docker/library/alpine@3.20".into(), || async {
                panics_inside_the_flight()
            })
            .await;
        assert!(
            matches!(first, Err(CacheError::Internal(_))) && !joined,
            "the flight that panicked: {first:?}, joined {joined}"
        );
        let (second, joined) = flights
            .run("docker/library/alpine@3.20".into(), || async { Ok(7) })
            .await;
        assert!(
            matches!(second, Ok(7)) && !joined,
            "the next request must start a flight of its own, not share the one that panicked: \
             {second:?}, joined {joined}"
        );
    }

    /// A cache on a fresh store in `dir`, and a route to an upstream that refuses connections.
    fn cache_without_upstream(dir: &std::path::Path) -> (Arc<Cache>, Route) {
        let store = Arc::new(Store::open(dir).expect("store"));
        let metrics = Arc::new(Metrics::new());
        let config = crate::config::Config::parse(
            "[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n",
            "test",
            &crate::config::Overrides::default(),
        )
        .expect("config");
        let upstream =
            Upstream::new(config.upstreams[0].clone(), Arc::clone(&metrics)).expect("upstream");
        let route = Route {
            upstream,
            repo: "library/alpine".parse().expect("repo"),
        };
        (Arc::new(Cache::new(store, 4 << 20, metrics)), route)
    }

    #[tokio::test]
    async fn a_fill_task_that_panics_is_forgotten_and_the_next_request_starts_a_new_fill() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cache, route) = cache_without_upstream(dir.path());
        let d = Digest::sha256_of(b"layer");
        let key = format!("docker/library/alpine@{d}");
        // A fill listed the way `start_fill` lists it, whose task panics.
        let (tx, rx) = watch::channel(FillState::Connecting);
        let file = tempfile::tempfile().expect("temp file");
        let fill = Arc::new(Fill::new(key.clone(), file, rx));
        lock(&cache.fills).insert(key.clone(), Arc::clone(&fill));
        let task = FillTask {
            cache: Arc::clone(&cache),
            fill,
        };
        let ended = tokio::spawn(async move {
            let (_task, _tx) = (task, tx);
            panics_inside_the_flight()
        })
        .await;
        assert!(ended.is_err_and(|e| e.is_panic()));
        assert!(
            !lock(&cache.fills).contains_key(&key),
            "the fill whose task panicked is still in the map"
        );
        // The next request starts a fill of its own, which fails for want of an upstream,
        // instead of joining the dead one.
        let e = cache
            .blob(&route, &d, true)
            .await
            .err()
            .expect("nothing listens on port 9");
        assert!(
            matches!(e, CacheError::Upstream(_)),
            "the next request got {e:?}, not the upstream's error"
        );
    }

    #[test]
    fn reused_read_buffers_expose_only_the_bytes_just_read() {
        let mut big = tempfile::tempfile().expect("temp file");
        big.write_all(&vec![0xAA; CHUNK]).expect("write");
        let mut small = tempfile::tempfile().expect("temp file");
        small.write_all(b"tiny").expect("write");
        for _ in 0..3 {
            // Fill the pool with buffers full of 0xAA, then read 4 bytes into one of them.
            let chunks: Vec<Bytes> = (0..4)
                .filter_map(|_| read_cached(&big, 0, CHUNK))
                .map(|r| r.expect("read"))
                .collect();
            assert!(chunks.iter().all(|c| c.iter().all(|b| *b == 0xAA)));
            drop(chunks);
            if let Some(r) = read_cached(&small, 0, CHUNK) {
                assert_eq!(
                    &r.expect("read")[..],
                    b"tiny",
                    "no stale byte after the read"
                );
            }
        }
    }
}

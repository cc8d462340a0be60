//! The pull-through logic: serve from the store, revalidate tags, fill misses once (single flight).
//!
//! Manifests are small: one upstream fetch per (upstream, repository, reference) at a time, shared
//! by every client asking meanwhile, verified, then stored. Blobs are filled by a background task
//! into a temporary file; every client asking for the same blob meanwhile reads that file as it
//! grows, and the last byte of every response is held back until the digest has been verified, so
//! a client never receives a complete body that is wrong.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{mpsc, watch};

use crate::bucket::{or_without, upstream_id, Bucket};
use crate::metrics::Metrics;
use crate::reference::{Digest, Reference, RepoName, Tag};
use crate::store::{now_millis, RepoKey, Store, StoreError, TempBlob};
use crate::upstream::{media_type_from_body, Upstream, UpstreamError};

/// Size of the chunks read from files and sent to clients.
pub const CHUNK: usize = 256 * 1024;
/// Bytes gathered from the upstream before one write to the temporary file.
const WRITE_BATCH: usize = 1 << 20;
/// Batches a fill may receive and write ahead of its hash.
const HASH_AHEAD: usize = 16;
/// How many times a broken upstream blob stream is resumed with a `Range` request.
const RESUME_ATTEMPTS: u32 = 3;

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
    file: File,
    state: watch::Receiver<FillState>,
    /// Set when the disk filled up mid-fill: the file holds the bytes before `disk_len`, memory
    /// the rest, and the blob is served to its clients without being cached.
    tail: Mutex<Option<MemoryTail>>,
    /// Set when the bytes come from the shared bucket rather than the upstream.
    from_bucket: std::sync::atomic::AtomicBool,
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
    /// Chunks after `disk_len`, with the offset each starts at.
    chunks: Vec<(u64, Bytes)>,
    bytes: u64,
}

/// The most a fill on a full disk keeps in memory for its clients before giving up.
const MAX_MEMORY_TAIL: u64 = 1 << 30;

/// Where a blob response's bytes come from.
pub enum BlobSource {
    /// A committed file, held against eviction while it is read.
    File(File, crate::store::Hold),
    /// A fill in progress (or just finished).
    Fill(Arc<Fill>),
    /// Nothing to send (HEAD).
    Empty,
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
                let map2 = Arc::clone(&self.map);
                let key2 = key.clone();
                // Spawned so that a client hanging up does not cancel the work others wait for.
                let handle = tokio::spawn(async move {
                    let r = fut.await;
                    map2.lock().unwrap_or_else(|p| p.into_inner()).remove(&key2);
                    r
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
            // One entry per repository link: a blob fetched for two repositories owes both.
            Share::Blob {
                digest,
                link: Some((upstream, repo)),
                ..
            } => format!("blob\0{digest}\0{upstream}\0{repo}"),
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
fn verify_manifest(
    up: &Upstream,
    bytes: &[u8],
    header: Option<&Digest>,
    expected: Option<&Digest>,
) -> Result<Digest, CacheError> {
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
            metrics,
            bucket: None,
            bucket_bad: Mutex::new(std::collections::HashSet::new()),
            pending,
        }
    }

    /// Sets how many blob fills may run at once and how long a new one waits for a slot. A new
    /// size takes effect for fills started from now on.
    pub fn set_fill_limits(&self, max: usize, wait: Duration) {
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

    /// A manifest by tag or digest.
    pub async fn manifest(
        self: &Arc<Self>,
        route: &Route,
        reference: &Reference,
    ) -> Result<Manifest, CacheError> {
        let key = route.key();
        match reference {
            Reference::Digest(d) => {
                if self.store.is_linked(&key, d)? {
                    if let Some(m) = self.stored_manifest(d, Outcome::Hit)? {
                        return Ok(m);
                    }
                }
            }
            Reference::Tag(t) => {
                if let Some(rec) = self.store.tag(&key, t)? {
                    let age = now_millis().saturating_sub(rec.checked_at_ms);
                    if Duration::from_millis(age) < route.upstream.config.freshness {
                        if let Ok(d) = rec.digest.parse::<Digest>() {
                            if let Some(m) = self.stored_manifest(&d, Outcome::Hit)? {
                                return Ok(m);
                            }
                        }
                    }
                }
            }
        }
        let flight_key = format!("{}/{}@{}", key.upstream, key.repo, reference);
        let (this, route2, reference2) = (Arc::clone(self), route.clone(), reference.clone());
        let (result, joined) = self
            .manifests
            .run(flight_key, move || async move {
                this.fetch_manifest(&route2, &reference2).await
            })
            .await;
        let mut m = result?;
        if joined && m.outcome == Outcome::Miss {
            m.outcome = Outcome::Coalesced;
        }
        Ok(m)
    }

    /// The slow path of [`Cache::manifest`], run once per key at a time.
    async fn fetch_manifest(
        &self,
        route: &Route,
        reference: &Reference,
    ) -> Result<Manifest, CacheError> {
        let up = &route.upstream;
        let key = route.key();
        match reference {
            Reference::Digest(d) => {
                if let Some(m) = self.shared_manifest(route, d).await? {
                    return Ok(m);
                }
                if self.store.manifest_info(d)?.is_some() {
                    // Stored for another repository: the upstream must confirm this one has it.
                    up.head_manifest(&route.repo, &d.to_string()).await?;
                    let (store, k2, d2) = (Arc::clone(&self.store), key.clone(), d.clone());
                    blocking(move || store.link(&k2, &d2)).await?;
                    if let Some(m) = self.stored_manifest(d, Outcome::Revalidated)? {
                        return Ok(m);
                    }
                }
                self.download_manifest(route, reference, None).await
            }
            Reference::Tag(t) => {
                if let Some(m) = self.shared_tag(route, t).await? {
                    return Ok(m);
                }
                let cached = match self.store.tag(&key, t)? {
                    Some(rec) => match rec.digest.parse::<Digest>() {
                        Ok(d) => self.stored_manifest(&d, Outcome::Hit)?.map(|m| (rec, m)),
                        Err(_) => None,
                    },
                    None => None,
                };
                let Some((rec, cached)) = cached else {
                    return self.download_manifest(route, reference, Some(t)).await;
                };
                if Duration::from_millis(now_millis().saturating_sub(rec.checked_at_ms))
                    < up.config.freshness
                {
                    return Ok(cached); // another flight refreshed it meanwhile
                }
                // A cached tag never waits for the upstream longer than the connect timeout.
                let head = match tokio::time::timeout(
                    up.config.connect_timeout,
                    up.head_manifest(&route.repo, t.as_str()),
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
                                (Arc::clone(&self.store), key.clone(), t.clone(), d.clone());
                            blocking(move || store.set_tag(&k2, &t2, &d2, now)).await?;
                            self.share(Share::Tag {
                                upstream: upstream_id(&up.config.url),
                                repo: route.repo.clone(),
                                tag: t.clone(),
                                digest: d,
                                checked_at_ms: now,
                            });
                            Ok(Manifest {
                                outcome: Outcome::Revalidated,
                                ..cached
                            })
                        }
                        _ => self.download_manifest(route, reference, Some(t)).await,
                    },
                    Err(e) if e.is_unavailable() => {
                        tracing::warn!(upstream = up.name(), repo = %route.repo, tag = %t, error = %e, "upstream cannot answer; serving the cached tag");
                        Ok(Manifest {
                            outcome: Outcome::Stale,
                            stale_reason: Some(e.to_string()),
                            ..cached
                        })
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
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
                    .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
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

    async fn download_manifest(
        &self,
        route: &Route,
        reference: &Reference,
        tag: Option<&Tag>,
    ) -> Result<Manifest, CacheError> {
        let up = &route.upstream;
        let fetched = up
            .get_manifest(
                &route.repo,
                &reference.to_string(),
                self.max_manifest_size
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .await?;
        let expected = match reference {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        };
        let digest = verify_manifest(up, &fetched.bytes, fetched.header_digest.as_ref(), expected)?;
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
                tag2.as_ref(),
                subject.as_ref().map(|(s, desc)| (s, desc.as_slice())),
            )
        })
        .await;
        let outcome = match stored {
            Ok(()) => {
                self.share(Share::Manifest {
                    upstream: upstream_id(&up.config.url),
                    repo: route.repo.clone(),
                    digest: digest.clone(),
                    media_type: fetched.media_type.clone(),
                    bytes: fetched.bytes.clone(),
                    tag: tag.map(|t| (t.clone(), now_millis())),
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
        let existing = self
            .fills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fill_key)
            .cloned();
        if !want_body && existing.is_none() {
            if let Some(size) = self.shared_blob_size(route, d).await? {
                return Ok(Blob {
                    size: Some(size),
                    source: BlobSource::Empty,
                    outcome: Outcome::Shared,
                });
            }
        }
        let (fill, mut outcome) = match existing {
            Some(f) => (f, Outcome::Coalesced),
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
                    Ok(slot) => self.start_fill(route, d, fill_key, slot)?,
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
                self.start_fill(route, d, fill_key, slot)?
            }
        };
        let size = fill.wait_started().await?;
        if outcome == Outcome::Miss && fill.from_bucket.load(std::sync::atomic::Ordering::Relaxed) {
            outcome = Outcome::Shared;
        }
        Ok(Blob {
            size,
            source: if want_body {
                BlobSource::Fill(fill)
            } else {
                BlobSource::Empty
            },
            outcome,
        })
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
    /// holds it, else the upstream.
    async fn open_source(
        &self,
        route: &Route,
        d: &Digest,
        offset: u64,
        bucket: bool,
    ) -> Result<(Source, Option<u64>), CacheError> {
        if bucket {
            if let Some(b) = self.bucket_for_blob(route, d).await? {
                if let Some(blob) = or_without(b.get_blob(d, offset).await, "blob") {
                    return Ok((Source::Bucket(blob.stream), Some(blob.size)));
                }
            }
        }
        let resp = route.upstream.get_blob(&route.repo, d, offset).await?;
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

    /// Starts (or joins, if one raced us) the fill of `d` for `route`; the fill holds `slot`
    /// until it ends.
    fn start_fill(
        self: &Arc<Self>,
        route: &Route,
        d: &Digest,
        fill_key: String,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(Arc<Fill>, Outcome), CacheError> {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fills.get(&fill_key) {
            return Ok((Arc::clone(f), Outcome::Coalesced));
        }
        let temp = self.store.temp_blob()?;
        let read = temp
            .file()
            .ok_or_else(|| CacheError::Internal("temporary file closed".into()))?
            .try_clone()
            .map_err(|e| CacheError::Store(format!("dup temporary file: {e}")))?;
        let (tx, rx) = watch::channel(FillState::Connecting);
        let fill = Arc::new(Fill {
            file: read,
            state: rx,
            tail: Mutex::new(None),
            from_bucket: std::sync::atomic::AtomicBool::new(false),
        });
        fills.insert(fill_key.clone(), Arc::clone(&fill));
        drop(fills);
        let this = Arc::clone(self);
        let (route, d, fill2) = (route.clone(), d.clone(), Arc::clone(&fill));
        tokio::spawn(async move {
            let _slot = slot;
            let started = std::time::Instant::now();
            let result = this.run_fill(&route, &d, temp, &tx, &fill2).await;
            let from_bucket = fill2.from_bucket.load(std::sync::atomic::Ordering::Relaxed);
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
                        CacheError::Upstream(_) => "upstream",
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
            // Remove before publishing the outcome, so that later requests see the store.
            this.fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fill_key);
            match result {
                Ok(size) => {
                    tracing::debug!(upstream = route.upstream.name(), digest = %d, size, "blob committed");
                    tx.send_replace(FillState::Done { size });
                }
                Err(e) => {
                    tracing::warn!(upstream = route.upstream.name(), repo = %route.repo, digest = %d, error = %e, "blob fill failed");
                    tx.send_replace(FillState::Failed(e));
                }
            }
        });
        Ok((fill, Outcome::Miss))
    }

    /// Downloads, hashes and commits one blob; returns its size.
    async fn run_fill(
        &self,
        route: &Route,
        d: &Digest,
        temp: TempBlob,
        tx: &watch::Sender<FillState>,
        fill: &Fill,
    ) -> Result<u64, CacheError> {
        let up = &route.upstream;
        let (mut source, size) = self.open_source(route, d, 0, true).await?;
        let from_bucket = matches!(source, Source::Bucket(_));
        fill.from_bucket
            .store(from_bucket, std::sync::atomic::Ordering::Relaxed);
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
                    source = self.open_source(route, d, written, false).await?.0;
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
            let mut temp = state
                .take()
                .ok_or_else(|| CacheError::Internal("fill state lost".into()))?;
            hash_tx
                .send(parts.clone())
                .await
                .map_err(|_| CacheError::Internal("hash task ended early".into()))?;
            let on_disk = fill
                .tail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none();
            if on_disk {
                let (t, result) = tokio::task::spawn_blocking(move || {
                    let r = temp.write_all_parts(&parts).map_err(|e| (e, parts));
                    (temp, r)
                })
                .await
                .map_err(|e| CacheError::Internal(format!("write task: {e}")))?;
                temp = t;
                if let Err((e, parts)) = result {
                    if !crate::store::is_disk_full(&e) {
                        return Err(CacheError::Store(format!("writing temporary blob: {e}")));
                    }
                    // Disk full: keep serving this fill's clients from memory, cache nothing.
                    self.store.set_full(true);
                    tracing::warn!(digest = %d, at = written, "disk full during a fill: streaming through without caching");
                    let chunks = at_offsets(written, parts).collect();
                    *fill.tail.lock().unwrap_or_else(|p| p.into_inner()) = Some(MemoryTail {
                        disk_len: written,
                        bytes: len,
                        chunks,
                    });
                }
            } else {
                let mut tail = fill.tail.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(t) = tail.as_mut() {
                    t.bytes += len;
                    if t.bytes > MAX_MEMORY_TAIL {
                        return Err(CacheError::Store(
                            "disk full and the blob is too large to stream from memory".into(),
                        ));
                    }
                    t.chunks.extend(at_offsets(written, parts));
                }
            }
            state = Some(temp);
            written += len;
            if matches!(source, Source::Upstream(_)) {
                self.metrics
                    .bytes_fetched
                    .get_or_create(&Metrics::upstream(up.name()))
                    .inc_by(len);
            }
            tx.send_replace(FillState::Streaming { size, written });
        }
        let temp = state
            .take()
            .ok_or_else(|| CacheError::Internal("fill state lost".into()))?;
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
        if fill
            .tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            tracing::info!(digest = %d, size = written, "blob served without caching (disk full)");
            return Ok(written);
        }
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
                    // Recorded by a version that keyed a blob by its digest alone: re-keyed,
                    // so that writing it clears it.
                    if item.key() != key {
                        self.store.outbox_remove(&key)?;
                        self.store.outbox_add(&item.key(), &raw)?;
                    }
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
    /// Bytes at `pos` from the memory tail (`Ok`), or how many to read from the file (`Err`).
    fn memory_slice(&self, pos: u64, len: usize) -> Result<Bytes, usize> {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
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

/// Consecutive `parts` paired with their offsets, the first at `start`.
fn at_offsets(start: u64, parts: Vec<Bytes>) -> impl Iterator<Item = (u64, Bytes)> {
    let mut at = start;
    parts.into_iter().map(move |p| {
        let here = at;
        at += p.len() as u64;
        (here, p)
    })
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
/// once the fill has verified and committed the blob; a failed fill ends the stream with an error.
pub fn stream_fill(
    fill: Arc<Fill>,
    lane: Option<Arc<crate::sendfile::Lane>>,
    start: u64,
    end: u64,
) -> mpsc::Receiver<BodyChunk> {
    use crate::sendfile::{placeholder, read_range, Source, SEND_CHUNK};
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut rx_state = fill.state.clone();
        let source = match fill.file.try_clone() {
            Ok(file) => Arc::new(Source { file, hold: None }),
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        // With a lane, written bytes go out with sendfile (they were just written, so cached).
        let step = if lane.is_some() { SEND_CHUNK } else { CHUNK };
        let mut pos = start;
        loop {
            let state = rx_state.borrow_and_update().clone();
            let (limit, done) = match state {
                FillState::Connecting => (pos, false),
                FillState::Streaming { written, .. } => (written.min(end), false),
                // `end` is u64::MAX when the size was not announced: stop at the size.
                FillState::Done { size } => (size.min(end.saturating_add(1)), true),
                FillState::Failed(e) => {
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            while pos < limit {
                let len = step.min((limit - pos) as usize);
                let read = match fill.memory_slice(pos, len) {
                    Ok(chunk) if !chunk.is_empty() => Ok(chunk),
                    Err(len) if len > 0 => {
                        let placed = lane
                            .as_ref()
                            .and_then(|l| placeholder(l, &source, pos, len));
                        match placed {
                            Some(p) => Ok(p),
                            None => match read_cached(&source.file, pos, len) {
                                Some(r) => r,
                                None => read_range(Arc::clone(&source), pos, len.min(CHUNK)).await,
                            },
                        }
                    }
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

    #[test]
    fn owed_links_of_one_blob_to_two_repositories_are_both_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let with_bucket = |store: &Arc<Store>| {
            let mut cache = Cache::new(Arc::clone(store), 1 << 20, Arc::new(Metrics::new()));
            let cfg = crate::config::S3Config {
                bucket: "regcache".into(),
                endpoint: Some("http://127.0.0.1:9".parse().expect("url")),
                region: "us-east-1".into(),
                prefix: String::new(),
                access_key_id: Some("k".into()),
                secret_access_key: Some("s".into()),
                virtual_hosted_style: false,
                timeout: Duration::from_secs(1),
                redirect: false,
                redirect_ttl: Duration::from_secs(60),
            };
            cache.bucket = Some(Arc::new(
                Bucket::new(&cfg, Arc::clone(&cache.metrics)).expect("bucket client"),
            ));
            cache
        };
        let d = Digest::sha256_of(b"a layer both repositories use");
        let owed = |repo: &str| Share::Blob {
            digest: d.clone(),
            size: 29,
            link: Some(("127.0.0.1:5000".into(), repo.parse().expect("repo"))),
        };
        // What a version that keyed a blob's entry by its digest alone left in the outbox.
        let legacy = serde_json::to_vec(&owed("small/app").record()).expect("json");
        store
            .outbox_add(&format!("blob\0{d}"), &legacy)
            .expect("record");

        let cache = with_bucket(&store);
        assert_eq!(cache.load_outbox().expect("load"), 1);
        // The bucket is down: the same blob, fetched for another repository, is owed too.
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async { cache.pending.defer(owed("big/app"), false) });
        drop(rt); // waits for the outbox write
        let queued = cache.pending.items.lock().expect("queue").len();
        assert_eq!(queued, 2, "one owed link replaced the other");

        let recorded: Vec<String> = store
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|(key, _)| key.replace('\0', " "))
            .collect();
        assert_eq!(recorded.len(), 2, "recorded: {recorded:?}");
        assert_eq!(
            with_bucket(&store).load_outbox().expect("load"),
            2,
            "after a restart, recorded: {recorded:?}"
        );
        // Written, each link's entry goes: none is left under the old key.
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            for repo in ["small/app", "big/app"] {
                cache.pending.forget(&owed(repo), true);
            }
        });
        drop(rt);
        let left = store.outbox().expect("outbox");
        assert!(
            left.is_empty(),
            "left in the outbox: {:?}",
            left.iter()
                .map(|(k, _)| k.replace('\0', " "))
                .collect::<Vec<_>>()
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

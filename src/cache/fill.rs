//! Blob fills: the fill task (bytes from the tier chain, hashed on their own thread, written to a
//! temporary file in batches, verified, committed), its state as its readers see it, and the
//! readers' API ([`FillReader`]) through which the http layer streams a fill to its clients.

use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};

use super::share::Share;
use super::tail::MemoryTail;
use super::tier::TierBlob;
use super::{lock, Cache, CacheError, InternalError, Outcome, Route};
use crate::bucket::upstream_id;
use crate::oci::reference::Digest;
use crate::store::{Hold, StoreError, TempBlob};
use crate::telemetry::metrics::Metrics;

/// Bytes gathered from a tier before one write to the temporary file.
pub(super) const WRITE_BATCH: usize = 1 << 20;
/// Batches a fill may receive and write ahead of its hash.
const HASH_AHEAD: usize = 16;
/// How many times a broken upstream blob stream is resumed with a `Range` request.
const RESUME_ATTEMPTS: u32 = 3;

/// Progress of a blob fill, published to every reader.
#[derive(Debug, Clone)]
pub enum FillState {
    Connecting,
    Streaming { size: Option<u64>, written: u64 },
    Done { size: u64 },
    Failed(CacheError),
}

/// A blob being fetched from the tier chain into a temporary file.
pub(crate) struct Fill {
    /// Its key in `Cache::fills`.
    pub(super) key: String,
    /// The temporary file, for the readers that join; `None` once none can.
    pub(super) file: Mutex<Option<File>>,
    pub(super) state: watch::Receiver<FillState>,
    /// Set when the disk filled up mid-fill: the file holds the bytes before `disk_len`, memory
    /// the rest, and the blob is served to its clients without being cached.
    pub(super) tail: Mutex<Option<MemoryTail>>,
    /// The tier the bytes come from (`Tier::name`): a shared tier (peers, bucket) or the upstream.
    source: Mutex<&'static str>,
    /// The readers, by id, each with the position it has sent up to.
    pub(super) readers: Mutex<HashMap<u64, u64>>,
    next_reader: AtomicU64,
    /// Set when a fill on a full disk has used up the memory budget: it then keeps only what its
    /// readers have not sent yet, and no one can join it.
    pub(super) through: AtomicBool,
    /// Woken when a reader moves on or leaves (a fill streaming through waits for its readers).
    pub(super) progress: tokio::sync::Notify,
    /// Set when the fill's task has ended, however it ended.
    ended: AtomicBool,
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

/// Where the bytes at a position of a fill are.
pub enum Span {
    /// In memory (the tail of a fill on a full disk): these bytes.
    Memory(Bytes),
    /// In the temporary file: this many bytes (at least one) from the position.
    File(usize),
    /// Nowhere: not written, or already dropped by a fill streaming through.
    Missing,
}

impl FillReader {
    /// The fill's progress, to read and wait on.
    pub fn state(&self) -> watch::Receiver<FillState> {
        self.fill.state.clone()
    }

    /// Waits until the fill is done, returning its size.
    pub async fn wait_done(&self) -> Result<u64, CacheError> {
        self.fill.wait_done().await
    }

    /// This reader's descriptor of the temporary file (the bytes the fill writes are read from
    /// it), with the blob's hold against eviction, for the body to keep until its last byte is
    /// sent. `None`: taken already, or the fill no longer had a file when this reader joined.
    pub fn take_file(&mut self) -> Option<(File, Option<Hold>)> {
        let file = self.file.take()?;
        Some((file, self.hold.take()))
    }

    /// Notes that everything before `pos` has been sent. `false`: the fill has let this reader
    /// go (it read nothing for the upstream's `idle_timeout` while the others waited for it).
    pub fn advance(&self, pos: u64) -> bool {
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

    /// Where the `len` bytes at `pos` are (up to `len` of them).
    pub fn span(&self, pos: u64, len: usize) -> Span {
        match self.fill.memory_slice(pos, len) {
            Ok(chunk) if !chunk.is_empty() => Span::Memory(chunk),
            Err(n) if n > 0 => Span::File(n),
            _ => Span::Missing,
        }
    }

    /// Whether the temporary file holds nothing at or after `pos` (the fill went on in memory
    /// when the disk filled up): the reader may let its descriptor go, so that the file's space
    /// is freed once nobody needs it.
    pub fn past_file(&self, pos: u64) -> bool {
        self.fill.disk_len().is_some_and(|l| pos >= l)
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

impl Fill {
    fn new(key: String, file: File, state: watch::Receiver<FillState>) -> Fill {
        Fill {
            key,
            file: Mutex::new(Some(file)),
            state,
            tail: Mutex::new(None),
            source: Mutex::new("upstream"),
            readers: Mutex::new(HashMap::new()),
            next_reader: AtomicU64::new(0),
            through: AtomicBool::new(false),
            progress: tokio::sync::Notify::new(),
            ended: AtomicBool::new(false),
        }
    }

    /// Whether the bytes come from a shared tier rather than the upstream.
    pub(super) fn is_shared(&self) -> bool {
        self.source() != "upstream"
    }

    /// The tier the bytes come from (`peer`, `bucket` or `upstream`), once a tier answered.
    pub(super) fn source(&self) -> &'static str {
        *lock(&self.source)
    }

    /// Whether a tier answered (bytes are coming, or came).
    pub(super) fn has_source(&self) -> bool {
        matches!(
            &*self.state.borrow(),
            FillState::Streaming { .. } | FillState::Done { .. }
        )
    }

    /// Waits until a tier answered; returns the blob's size if it announced one.
    pub(super) async fn wait_started(&self) -> Result<Option<u64>, CacheError> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Connecting => {}
                FillState::Streaming { size, .. } => return Ok(*size),
                FillState::Done { size } => return Ok(Some(*size)),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::broken("fill ended without a result"));
            }
        }
    }

    /// Waits until the fill is done, returning its size.
    async fn wait_done(&self) -> Result<u64, CacheError> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Done { size } => return Ok(*size),
                FillState::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::broken("fill ended without a result"));
            }
        }
    }
}

/// `dup` of a fill's temporary file, for one more reader.
fn dup(file: &File) -> Result<File, CacheError> {
    file.try_clone().map_err(|source| {
        InternalError::Io {
            what: "dup of a fill's temporary file",
            source,
        }
        .into()
    })
}

impl Cache {
    /// A new reader of `fill`, which must be in `Cache::fills` (so that it still holds every
    /// byte) while `fills` is locked. Nothing may fail after it is made under that lock: its drop
    /// locks `fills`.
    pub(super) fn attach(
        self: &Arc<Self>,
        fill: &Arc<Fill>,
        d: &Digest,
    ) -> Result<FillReader, CacheError> {
        let file = match lock(&fill.file).as_ref() {
            Some(f) => Some(dup(f)?),
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
    /// request wants the body; the fill holds `slot` until it ends. `peers`: whether the fill may
    /// ask the peers (not for a request from a peer).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_fill(
        self: &Arc<Self>,
        route: &Route,
        d: &Digest,
        fill_key: String,
        slot: tokio::sync::OwnedSemaphorePermit,
        want_body: bool,
        peers: bool,
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
        let read = dup(temp
            .file()
            .ok_or_else(|| CacheError::broken("temporary file closed"))?)?;
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
        // On the cache's runtime, not the shard of the client that started it: clients of other
        // shards join it, and it must go on when that client hangs up or its shard stalls.
        self.runtime.spawn(async move {
            let _slot = slot;
            let started = std::time::Instant::now();
            let result = this.run_fill(&route, &d, temp, &tx, &fill2, peers).await;
            let labels = Metrics::upstream(route.upstream.name());
            match &result {
                Ok(_) => this
                    .metrics
                    .fill_seconds
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64()),
                Err(e) => {
                    this.metrics
                        .fills_failed
                        .get_or_create(&vec![("reason", e.fill_failure_reason().to_owned())])
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

    /// Downloads, hashes and commits one blob from the first tier that gives it (the peers only
    /// if `peers`); returns its size. A copy from a shared tier that fails verification is not
    /// read from that tier (that peer) again.
    async fn run_fill(
        &self,
        route: &Route,
        d: &Digest,
        temp: TempBlob,
        tx: &watch::Sender<FillState>,
        fill: &Arc<Fill>,
        peers: bool,
    ) -> Result<u64, CacheError> {
        let first = self
            .tiers
            .open_blob(&self.store, route, d, 0, None, 0, peers)
            .await?;
        let tier = self.tiers.get(first.index);
        *lock(&fill.source) = tier.name();
        let sender = first.stream.peer().cloned();
        let result = self.copy_blob(route, d, temp, tx, fill, first, peers).await;
        if matches!(
            result,
            Err(CacheError::DigestMismatch { .. } | CacheError::SizeMismatch { .. })
        ) {
            // Never serve that copy again: the next request fetches it from the next tier.
            tier.rejected(d);
            if let Some(p) = sender {
                p.rejected(d);
            }
        }
        result
    }

    /// The body of [`Cache::run_fill`]: copies the blob from `source` (resuming from the next
    /// tiers when it breaks), verifies and commits it.
    #[allow(clippy::too_many_arguments)]
    async fn copy_blob(
        &self,
        route: &Route,
        d: &Digest,
        temp: TempBlob,
        tx: &watch::Sender<FillState>,
        fill: &Arc<Fill>,
        source: TierBlob,
        peers: bool,
    ) -> Result<u64, CacheError> {
        let up = &route.upstream;
        let TierBlob {
            stream: mut source,
            size,
            index: mut at,
        } = source;
        let from_origin = source.is_origin();
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
        let mut carry = None;
        loop {
            let next = match carry.take() {
                Some(r) => r,
                None => source.next_chunk(up).await,
            };
            let chunk = match next {
                Ok(Some(c)) if c.is_empty() => continue,
                Ok(Some(c)) => c,
                Ok(None) if size.is_none_or(|s| written >= s) => break,
                // A shared tier's stream that ended early always resumes from the next tier.
                Ok(None) | Err(_) if resumes < RESUME_ATTEMPTS || !source.is_origin() => {
                    // The stream broke (or ended early): ask for the rest.
                    resumes += 1;
                    let from = self.tiers.get(at).name();
                    tracing::warn!(upstream = up.name(), digest = %d, written, attempt = resumes, from, "blob stream broke; resuming with Range");
                    let next = self
                        .tiers
                        .open_blob(
                            &self.store,
                            route,
                            d,
                            written,
                            size,
                            self.tiers.after(at),
                            peers,
                        )
                        .await?;
                    (source, at) = (next.stream, next.index);
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
                match source.next_chunk(up).now_or_never() {
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
            let kept = state.is_none().then(|| super::tail::own_copy(&parts, len));
            let hashed = match &kept {
                Some(chunk) => vec![chunk.clone()],
                None => parts.clone(),
            };
            hash_tx
                .send(hashed)
                .await
                .map_err(|_| CacheError::broken("hash task ended early"))?;
            match (state.take(), kept) {
                (Some(temp), _) => {
                    let (temp, result) = tokio::task::spawn_blocking(move || {
                        let mut temp = temp;
                        let r = temp.write_all_parts(&parts).map_err(|e| (e, parts));
                        (temp, r)
                    })
                    .await
                    .map_err(|e| CacheError::task("write", e))?;
                    match result {
                        Ok(()) => state = Some(temp),
                        Err((e, parts)) if crate::store::is_disk_full(&e) => {
                            // Disk full: keep serving this fill's clients from memory, cache
                            // nothing. The temporary file goes at once; its bytes stay readable
                            // through the descriptors of the readers that still need them.
                            let cause = Arc::new(StoreError::Io {
                                path: temp.path().to_owned(),
                                source: e,
                            });
                            drop(temp);
                            self.store.set_full(true);
                            tracing::warn!(digest = %d, at = written, "disk full during a fill: serving it from memory without caching");
                            *lock(&fill.tail) = Some(MemoryTail::new(
                                written,
                                cause,
                                Arc::clone(&self.fill_memory),
                            ));
                            let chunk = super::tail::own_copy(&parts, len);
                            drop(parts);
                            self.keep_in_memory(up, d, fill, written, chunk).await?;
                        }
                        Err((e, _)) => {
                            return Err(StoreError::Io {
                                path: temp.path().to_owned(),
                                source: e,
                            }
                            .into())
                        }
                    }
                }
                (None, Some(chunk)) => {
                    drop(parts);
                    self.keep_in_memory(up, d, fill, written, chunk).await?;
                }
                (None, None) => return Err(CacheError::broken("fill state lost")),
            }
            written += len;
            if source.is_origin() {
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
            .map_err(|e| CacheError::task("hash", e))?
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
        // What the upstream gave is owed to the bucket from the commit on.
        let share = from_origin.then(|| Share::Blob {
            digest: d.clone(),
            size: written,
            link: Some((upstream_id(&up.config.url), route.repo.clone())),
        });
        match self
            .commit_and_share(share, move |owed| {
                store.commit_blob(temp, &d2, written, &key, None, owed)
            })
            .await
        {
            Ok(()) => self.store.set_full(false),
            Err(e) if e.is_disk_full() => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::cache_without_upstream;

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
            panic!("a bug inside the fill task")
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
}

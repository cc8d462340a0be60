//! Fills on a full disk: the memory tail that keeps such a blob for its clients without caching
//! it, the budget of all such tails (`limits.fill_memory`), and streaming a blob through once the
//! budget is used up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::fill::{Fill, FillState, WRITE_BATCH};
use super::{lock, Cache, CacheError};
use crate::oci::reference::Digest;
use crate::store::StoreError;
use crate::upstream::Upstream;

/// What a fill on a full disk that streams the blob through (the memory budget is used up) keeps
/// ahead of its slowest reader, besides the batch it has just received.
const THROUGH_WINDOW: u64 = 2 * WRITE_BATCH as u64;

/// The bytes of a fill past the point where the disk filled up.
pub(super) struct MemoryTail {
    pub(super) disk_len: u64,
    /// Chunks after `disk_len`, with the offset each starts at (from the first one a reader
    /// still needs, once the fill streams through).
    chunks: VecDeque<(u64, Bytes)>,
    /// Bytes in `chunks`, counted in `memory`.
    pub(super) bytes: u64,
    memory: Arc<FillMemory>,
    /// The write that found the disk full.
    cause: Arc<StoreError>,
}

impl MemoryTail {
    /// An empty tail after the `disk_len` bytes that went to the temporary file.
    pub(super) fn new(disk_len: u64, cause: Arc<StoreError>, memory: Arc<FillMemory>) -> Self {
        MemoryTail {
            disk_len,
            chunks: VecDeque::new(),
            bytes: 0,
            memory,
            cause,
        }
    }

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
    /// Nothing held yet, a budget of `limit` bytes, reported in `gauge`.
    pub(super) fn new(limit: u64, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        FillMemory {
            used: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            gauge,
        }
    }

    /// Sets the budget, for the next bytes kept.
    pub(super) fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

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

/// `parts` (`len` bytes) copied into one buffer of their own. What a fill keeps in memory is
/// copied out of the HTTP client's read buffers: keeping a slice would keep its whole buffer, and
/// the memory held would be more than the memory counted against `limits.fill_memory`.
pub(super) fn own_copy(parts: &[Bytes], len: u64) -> Bytes {
    let mut chunk = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    for p in parts {
        chunk.extend_from_slice(p);
    }
    Bytes::from(chunk)
}

impl Fill {
    /// Where the memory tail starts, once the disk is full.
    pub(super) fn disk_len(&self) -> Option<u64> {
        lock(&self.tail).as_ref().map(|t| t.disk_len)
    }

    /// A finished fill whose blob is in memory (disk full), whole, and still being read: later
    /// requests for the blob join it.
    pub(super) fn kept_for_joiners(&self) -> bool {
        let done = matches!(*self.state.borrow(), FillState::Done { .. });
        let in_memory = lock(&self.tail).is_some();
        let read = !lock(&self.readers).is_empty();
        done && in_memory && read && !self.through.load(Ordering::Relaxed)
    }

    /// Once the fill streams through: drops the chunks that every reader has sent.
    pub(super) fn trim(&self) {
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
    pub(super) fn memory_slice(&self, pos: u64, len: usize) -> Result<Bytes, usize> {
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
}

impl Cache {
    /// Keeps `chunk` (at `at`) of a fill on a full disk in memory for its readers.
    /// Within `limits.fill_memory` (all fills together) the fill keeps the whole blob, so that
    /// later requests can join it. Past it, the fill streams the blob through: it leaves the map
    /// (later requests start their own fill), keeps only what its readers have not sent yet, and
    /// reads on from the upstream only when its slowest reader is less than
    /// [`THROUGH_WINDOW`] behind.
    pub(super) async fn keep_in_memory(
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
                tracing::warn!(digest = %d, at, "disk full and no client is reading the blob any more: ending its fill");
                let cause = lock(&fill.tail).as_ref().map(|t| Arc::clone(&t.cause));
                return Err(match cause {
                    Some(cause) => CacheError::Store(cause),
                    None => CacheError::broken("a fill on a full disk without its memory tail"),
                });
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

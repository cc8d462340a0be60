//! Blob response bodies, of one range or of the parts of a `multipart/byteranges` answer: a
//! committed file (by `sendfile` placeholders on a plain connection, by reads into pooled buffers
//! elsewhere) and a fill in progress (through the cache's [`FillReader`], holding back the last
//! byte until the fill has verified the blob).
//!
//! A chunk whose bytes are in the page cache is read on the runtime thread (`preadv2` with
//! `RWF_NOWAIT`) into a reused buffer; only a read that would wait for the disk goes to the
//! blocking pool.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::cache::{FillReader, FillState, Span};
use crate::http::sendfile::{placeholder, read_range, Lane, Source, SEND_CHUNK};
use crate::store::Hold;

/// Size of the chunks read from files and sent to clients.
pub const CHUNK: usize = 256 * 1024;

pub type BodyChunk = Result<Bytes, io::Error>;

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

/// Reads up to `len` bytes at `offset` if the page cache holds them, without blocking
/// (`preadv2` with `RWF_NOWAIT`). `None`: they are not all cached (or the filesystem cannot say),
/// so read on the blocking pool instead. A short result is fine: the stream asks for the rest.
fn read_cached(file: &File, offset: u64, len: usize) -> Option<io::Result<Bytes>> {
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

/// Reads the next `len` bytes of a file this stream owns (its own file position: the first read
/// seeks to `offset`). Unlike [`read_range`], the buffer is not zeroed first.
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

/// Bytes `start..=end` of a committed file, read as the client consumes them: each chunk is one
/// trip to the blocking pool, with no task or channel in between.
pub fn stream_file(
    file: File,
    hold: Hold,
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

/// Bytes `start..=end` of `source` as a body for a connection with `lane`: placeholders for cached
/// chunks (sent with `sendfile` by the connection's writer), real bytes for the rest.
pub fn stream_sendfile(
    lane: Arc<Lane>,
    source: Source,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = BodyChunk> + Send + 'static {
    stream_source(Some(lane), Arc::new(source), start, end)
}

/// Bytes `start..=end` of `source`: with a `lane`, placeholders for cached chunks and real bytes
/// for the rest ([`stream_sendfile`]); without, real bytes, read inline when cached.
fn stream_source(
    lane: Option<Arc<Lane>>,
    source: Arc<Source>,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = BodyChunk> + Send + 'static {
    let step = if lane.is_some() { SEND_CHUNK } else { CHUNK };
    futures_util::stream::unfold(Some(start), move |pos| {
        let lane = lane.clone();
        let source = Arc::clone(&source);
        async move {
            let pos = pos?;
            if pos > end {
                return None;
            }
            let len = step.min((end.saturating_add(1) - pos) as usize);
            let placed = lane.and_then(|lane| placeholder(&lane, &source, pos, len));
            let chunk = match placed {
                Some(p) => Ok(p),
                // Some page is not cached: the next 256 KiB as bytes, into a pooled buffer if
                // those are cached, else read on the blocking pool.
                None => match read_cached(&source.file, pos, len.min(CHUNK)) {
                    Some(r) => r,
                    None => read_range(source, pos, len.min(CHUNK)).await,
                },
            };
            match chunk {
                Ok(c) => {
                    let next = pos + c.len() as u64;
                    Some((Ok(c), Some(next)))
                }
                // The error ends the body (hyper aborts the response); nothing follows it.
                Err(e) => Some((Err(e), None)),
            }
        }
    })
}

/// One part of a `multipart/byteranges` body: the bytes before it (its delimiter and header
/// lines) and the inclusive range of the blob it carries.
pub struct Part {
    pub head: Bytes,
    pub start: u64,
    pub end: u64,
}

/// A `multipart/byteranges` body of a committed file: each part's head as plain bytes, then its
/// range as [`stream_sendfile`] sends it with a `lane` (placeholders between the heads), read
/// without; then `tail` (the close delimiter).
pub fn stream_file_parts(
    source: Source,
    lane: Option<Arc<Lane>>,
    parts: Vec<Part>,
    tail: Bytes,
) -> impl futures_util::Stream<Item = BodyChunk> + Send + 'static {
    use futures_util::stream::{self, StreamExt as _};
    let source = Arc::new(source);
    let pieces = parts
        .into_iter()
        .map(|p| (p.head, Some((p.start, p.end))))
        .chain(std::iter::once((tail, None)));
    // One piece after the other: the lane's ranges are queued in the order hyper writes them.
    stream::iter(pieces).flat_map(move |(head, range)| {
        let bytes = stream::once(std::future::ready(Ok(head)));
        match range {
            Some((start, end)) => bytes
                .chain(stream_source(lane.clone(), Arc::clone(&source), start, end))
                .left_stream(),
            None => bytes.right_stream(),
        }
    })
}

/// Streams bytes `start..=end` of a blob being filled, as they arrive. The last byte is sent only
/// once the fill has verified the blob (when the upstream did not announce the size, the last
/// byte received so far is always held back, since any byte may be the last); a failed fill ends
/// the stream with an error.
pub fn stream_fill(
    reader: FillReader,
    lane: Option<Arc<Lane>>,
    start: u64,
    end: u64,
) -> mpsc::Receiver<BodyChunk> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        if let Some(mut fill) = FillSend::new(reader, lane, tx).await {
            fill.range(start, end, end, u64::MAX).await;
        }
    });
    rx
}

/// A `multipart/byteranges` body of a blob of `size` bytes being filled: each part's head, then
/// its bytes as they arrive (all of them, but for the blob's last byte, which waits until the fill
/// has verified the blob), then `tail` (the close delimiter) once the fill is done. So every part
/// reaches the client as soon as the fill has its bytes, and the body is complete only once the
/// blob is verified; a failed fill ends the stream with an error.
pub fn stream_fill_parts(
    reader: FillReader,
    lane: Option<Arc<Lane>>,
    size: u64,
    parts: Vec<Part>,
    tail: Bytes,
) -> mpsc::Receiver<BodyChunk> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let Some(mut fill) = FillSend::new(reader, lane, tx).await else {
            return;
        };
        for (i, part) in parts.iter().enumerate() {
            // The fill keeps what a later part still needs (parts may come in any order).
            let needed = parts[i + 1..].iter().map(|p| p.start).min();
            let held = part.end.saturating_add(1).min(size.saturating_sub(1));
            if !fill.send(Ok(part.head.clone())).await
                || !fill
                    .range(part.start, part.end, held, needed.unwrap_or(u64::MAX))
                    .await
            {
                return;
            }
        }
        // Nothing more to read: the fill need not keep any byte for this body.
        fill.reader.advance(u64::MAX);
        let last = match fill.reader.wait_done().await {
            Ok(_) => Ok(tail),
            Err(e) => Err(io::Error::other(e)),
        };
        fill.send(last).await;
    });
    rx
}

/// A body's view of a fill (the task behind [`stream_fill`] and [`stream_fill_parts`]): its reader,
/// the fill's progress, the reader's descriptor of the temporary file, and the body's channel.
struct FillSend {
    reader: FillReader,
    state: watch::Receiver<FillState>,
    source: Option<Arc<Source>>,
    lane: Option<Arc<Lane>>,
    step: usize,
    tx: mpsc::Sender<BodyChunk>,
}

impl FillSend {
    /// `None` (with the error sent) when the reader has no file.
    async fn new(
        mut reader: FillReader,
        lane: Option<Arc<Lane>>,
        tx: mpsc::Sender<BodyChunk>,
    ) -> Option<FillSend> {
        let state = reader.state();
        // The reader's descriptor and its hold on the blob go with every range queued on the
        // lane, until the range is sent.
        let source = match reader.take_file() {
            Some((file, hold)) => Some(Arc::new(Source { file, hold })),
            None => {
                let _ = tx
                    .send(Err(io::Error::other("the fill has no file to read")))
                    .await;
                return None;
            }
        };
        // With a lane, written bytes go out with sendfile (they were just written, so cached).
        let step = if lane.is_some() { SEND_CHUNK } else { CHUNK };
        Some(FillSend {
            reader,
            state,
            source,
            lane,
            step,
            tx,
        })
    }

    /// Sends `chunk`; `false`: the client is gone.
    async fn send(&self, chunk: BodyChunk) -> bool {
        self.tx.send(chunk).await.is_ok()
    }

    /// Sends bytes `start..=end` as the fill writes them. Until the fill is done, the bytes from
    /// `held` on wait (a single range holds its last byte: `held == end`). `needed` is the lowest
    /// position the body reads after this range (`u64::MAX`: none), which the fill must keep.
    /// `false`: the body ended (an error was sent, or the client is gone).
    async fn range(&mut self, start: u64, end: u64, held: u64, needed: u64) -> bool {
        let (reader, lane, step, tx) = (&self.reader, &self.lane, self.step, &self.tx);
        let (rx_state, source) = (&mut self.state, &mut self.source);
        let mut pos = start;
        loop {
            if !reader.advance(pos.min(needed)) {
                let _ = tx
                    .send(Err(io::Error::other(
                        "this client fell too far behind a blob streamed through a full disk",
                    )))
                    .await;
                return false;
            }
            // Past the part of a fill on a full disk that went to its temporary file: let the
            // file go, so that its space is freed once nobody needs it.
            if source.is_some() && reader.past_file(pos.min(needed)) {
                *source = None;
            }
            let state = rx_state.borrow_and_update().clone();
            let (limit, done) = match state {
                FillState::Connecting => (pos, false),
                FillState::Streaming {
                    size: Some(_),
                    written,
                } => (written.min(held), false),
                FillState::Streaming {
                    size: None,
                    written,
                } => (written.saturating_sub(1).min(held), false),
                // `end` is u64::MAX when the size was not announced: stop at the size.
                FillState::Done { size } => (size.min(end.saturating_add(1)), true),
                FillState::Failed(e) => {
                    let _ = tx.send(Err(io::Error::other(e))).await;
                    return false;
                }
            };
            if pos < limit {
                let len = step.min((limit - pos) as usize);
                let read = match reader.span(pos, len) {
                    Span::Memory(chunk) => Ok(chunk),
                    Span::File(len) => match &source {
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
                    Span::Missing => Err(io::Error::other(format!("fill has no byte at {pos}"))),
                };
                match read {
                    Ok(chunk) => {
                        pos += chunk.len() as u64;
                        if tx.send(Ok(chunk)).await.is_err() {
                            return false;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return false;
                    }
                }
                continue;
            }
            if done || pos > end {
                return true;
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
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::sendfile::tests::{file_with, pair};
    use crate::http::sendfile::{is_placeholder, LaneIo};
    use std::io::Write;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

    #[tokio::test]
    async fn file_parts_are_their_heads_and_ranges_with_and_without_a_lane() {
        use futures_util::StreamExt as _;
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i * 13 + i / 509) as u8)
            .collect();
        // Out of order, overlapping, one across a 2 MiB sendfile chunk, one at the end.
        let ranges = [(2_500_000u64, 2_999_999u64), (0, 9), (5, 2_200_000), (7, 7)];
        let parts = || -> Vec<Part> {
            ranges
                .iter()
                .enumerate()
                .map(|(i, &(start, end))| Part {
                    head: Bytes::from(format!("<part {i}>")),
                    start,
                    end,
                })
                .collect()
        };
        let mut want = Vec::new();
        for (i, &(a, z)) in ranges.iter().enumerate() {
            want.extend_from_slice(format!("<part {i}>").as_bytes());
            want.extend_from_slice(&data[a as usize..=z as usize]);
        }
        want.extend_from_slice(b"<end>");
        let source = || Source {
            file: file_with(&data),
            hold: None,
        };

        // No lane (TLS): the bytes themselves.
        let mut got = Vec::new();
        let mut s = Box::pin(stream_file_parts(
            source(),
            None,
            parts(),
            Bytes::from_static(b"<end>"),
        ));
        while let Some(c) = s.next().await {
            let c = c.expect("chunk");
            assert!(!is_placeholder(&c), "no placeholder without a lane");
            got.extend_from_slice(&c);
        }
        assert!(
            got == want,
            "without a lane: {} bytes, not the parts",
            got.len()
        );

        // A lane: placeholders for the ranges, written by LaneIo between the plain heads.
        let (mut io, lane, mut client): (LaneIo, _, _) = pair().await;
        let chunks: Vec<Bytes> = stream_file_parts(
            source(),
            Some(Arc::clone(&lane)),
            parts(),
            Bytes::from_static(b"<end>"),
        )
        .map(|c| c.expect("chunk"))
        .collect()
        .await;
        assert!(
            chunks.iter().filter(|c| is_placeholder(c)).count() >= ranges.len(),
            "a cached file gives placeholders"
        );
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            got
        });
        for c in &chunks {
            io.write_all(c).await.expect("write");
        }
        io.shutdown().await.expect("shutdown");
        drop(io);
        let got = reader.await.expect("reader");
        assert!(
            got == want,
            "with a lane: {} bytes, not the parts",
            got.len()
        );
        assert!(lane.is_idle(), "every range sent");
    }

    #[tokio::test]
    async fn placeholders_become_the_file_bytes_around_plain_bytes() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (mut io, lane, mut client): (LaneIo, _, _) = pair().await;
        let source = Source {
            file: file_with(&data),
            hold: None,
        };
        let (a, z) = (100u64, 4_500_000u64);
        let chunks: Vec<Bytes> = {
            use futures_util::StreamExt as _;
            stream_sendfile(Arc::clone(&lane), source, a, z)
                .map(|c| c.expect("chunk"))
                .collect()
                .await
        };
        assert_eq!(chunks.len(), 3, "2 MiB chunks");
        assert!(
            chunks.iter().all(|c| is_placeholder(c)),
            "a cached file gives placeholders"
        );
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            got
        });
        io.write_all(b"head").await.expect("plain bytes");
        for c in &chunks {
            io.write_all(c).await.expect("placeholder");
        }
        io.write_all(b"tail").await.expect("plain bytes");
        io.shutdown().await.expect("shutdown");
        drop(io);
        let got = reader.await.expect("reader");
        let mut want = b"head".to_vec();
        want.extend_from_slice(&data[a as usize..=z as usize]);
        want.extend_from_slice(b"tail");
        assert!(
            got == want,
            "the client got {} bytes, not the range",
            got.len()
        );
        assert!(lane.is_idle(), "every range sent");
    }
}

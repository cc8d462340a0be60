//! Zero-copy blob bodies on plain-HTTP connections: hyper is handed placeholder chunks, and the
//! connection's writer sends the file's bytes in their place with `sendfile(2)`.
//!
//! hyper only writes what a body yields, so it cannot send a file without copying it through
//! memory twice (file → buffer → socket). Here a body yields, for each chunk, a *placeholder*: a
//! slice of [`PLACEHOLDER`], a static region that is never read, with the chunk's length; and it
//! queues the matching file range on the connection's [`Lane`]. hyper queues the placeholder
//! unchanged (its vectored write strategy, forced with `writev(true)`), and when it writes it,
//! [`LaneIo`] sees a slice inside [`PLACEHOLDER`], takes the range at the head of the lane and
//! calls `sendfile` instead; the bytes go from the page cache to the socket without a copy through
//! user space. A placeholder that does not match the lane's head ends the connection with an error:
//! placeholder bytes are never sent.
//!
//! Only chunks whose pages are already cached take this path (checked with `preadv2(RWF_NOWAIT)`
//! probes), so `sendfile` does not wait for the disk on a runtime thread; other chunks are read on
//! the blocking pool and sent as ordinary bytes. The bodies of committed blobs
//! (`body::stream_sendfile`) and of fills in progress (`body::stream_fill`, up to the bytes already
//! written) both use it. TLS connections have no lane and never see a placeholder.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Largest chunk sent with one placeholder (one `sendfile` call when the socket keeps up; nginx's
/// `sendfile_max_chunk` is the same).
pub const SEND_CHUNK: usize = 2 << 20;

/// The placeholder region: body chunks pointing into it stand for file ranges. It lives in `.bss`
/// and nothing reads it. Twice [`SEND_CHUNK`], so that each placeholder can start at its own
/// offset (see [`Job::start`]).
static PLACEHOLDER: [u8; 2 * SEND_CHUNK] = [0; 2 * SEND_CHUNK];

/// Placeholders start at one of this many offsets, in turn.
const STARTS: usize = 256;

/// Distance between page-cache probes within a chunk.
const PROBE_STEP: usize = 256 * 1024;

/// A file being sent, kept open (and held against eviction) until its last range is written.
pub struct Source {
    pub file: File,
    pub hold: Option<crate::store::Hold>,
}

/// One file range standing behind one placeholder.
struct Job {
    source: Arc<Source>,
    offset: u64,
    len: usize,
    /// Where the placeholder starts in [`PLACEHOLDER`]: successive placeholders start at
    /// different offsets, so a placeholder that is not the lane's head is recognised as such.
    start: usize,
}

/// The file ranges a connection owes, in the order their placeholders were yielded to hyper.
#[derive(Default)]
pub struct Lane {
    jobs: Mutex<VecDeque<Job>>,
    /// Placeholders handed out so far.
    issued: std::sync::atomic::AtomicUsize,
}

/// The connection's lane, reachable from its requests (a request extension).
#[derive(Clone)]
pub struct LaneRef(pub Arc<Lane>);

#[cfg(test)]
impl Lane {
    /// Whether every range queued has been sent.
    pub(crate) fn is_idle(&self) -> bool {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// Whether `buf` is a placeholder.
#[cfg(test)]
pub(crate) fn is_placeholder(buf: &[u8]) -> bool {
    placeholder_offset(buf).is_some()
}

/// Where `buf` sits in [`PLACEHOLDER`], if it is a placeholder.
fn placeholder_offset(buf: &[u8]) -> Option<usize> {
    let base = PLACEHOLDER.as_ptr() as usize;
    let p = buf.as_ptr() as usize;
    (!buf.is_empty() && p >= base && p < base + PLACEHOLDER.len()).then(|| p - base)
}

/// Whether every probed page of `offset..offset + len` is in the page cache.
fn cached(file: &File, offset: u64, len: usize) -> bool {
    let mut byte = [0u8; 1];
    let last = offset + len as u64 - 1;
    let probes = (offset..last)
        .step_by(PROBE_STEP)
        .chain(std::iter::once(last));
    for at in probes {
        let r = rustix::io::preadv2(
            file,
            &mut [io::IoSliceMut::new(&mut byte)],
            at,
            rustix::io::ReadWriteFlags::NOWAIT,
        );
        if r != Ok(1) {
            return false;
        }
    }
    true
}

/// A placeholder for the `len` bytes of `source` at `offset`, queued on `lane`, if the page cache
/// holds them (`None`: read them instead).
pub fn placeholder(lane: &Lane, source: &Arc<Source>, offset: u64, len: usize) -> Option<Bytes> {
    let len = len.min(SEND_CHUNK);
    if len == 0 || !cached(&source.file, offset, len) {
        return None;
    }
    let n = lane
        .issued
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = (n % STARTS) * (SEND_CHUNK / STARTS);
    lane.jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push_back(Job {
            source: Arc::clone(source),
            offset,
            len,
            start,
        });
    Some(Bytes::from_static(&PLACEHOLDER[start..start + len]))
}

/// Reads the `len` bytes of `source` at `offset` on the blocking pool.
pub async fn read_range(source: Arc<Source>, offset: u64, len: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        source.file.read_exact_at(&mut buf, offset).map(|()| buf)
    })
    .await
    .map_err(io::Error::other)?
    .map(Bytes::from)
}

/// A plain TCP connection whose writes turn placeholders into `sendfile` calls.
pub struct LaneIo {
    stream: TcpStream,
    lane: Arc<Lane>,
    sent: Counter,
}

impl LaneIo {
    /// Wraps `stream`; `sent` counts the bytes sent with `sendfile`.
    pub fn new(stream: TcpStream, sent: Counter) -> (LaneIo, Arc<Lane>) {
        let lane = Arc::new(Lane::default());
        (
            LaneIo {
                stream,
                lane: Arc::clone(&lane),
                sent,
            },
            lane,
        )
    }

    /// Sends (part of) the range behind the placeholder `buf`, found `pos` bytes into
    /// [`PLACEHOLDER`].
    fn poll_send_range(
        &self,
        cx: &mut Context<'_>,
        pos: usize,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut jobs = self.lane.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(job) = jobs.front() else {
            return Poll::Ready(Err(out_of_step("no file range is queued")));
        };
        // What is left of the head's placeholder ends where it ends: `pos + len == start + len`.
        let at = pos.wrapping_sub(job.start);
        if pos < job.start || at + buf.len() != job.len {
            return Poll::Ready(Err(out_of_step("the placeholder does not match the range")));
        }
        let source = Arc::clone(&job.source);
        let mut offset = job.offset + at as u64;
        let len = buf.len();
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.stream, &source.file, Some(&mut offset), len)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file is shorter than recorded",
                    )))
                }
                Ok(n) => {
                    self.sent.inc_by(n as u64);
                    if n == len {
                        jobs.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

fn out_of_step(what: &str) -> io::Error {
    tracing::error!(what, "sendfile lane out of step; closing the connection");
    io::Error::other(format!("sendfile lane out of step: {what}"))
}

impl AsyncRead for LaneIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LaneIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Ordinary bytes up to the first placeholder go out with one `writev`; a placeholder at the
        // front goes out with `sendfile`.
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if let Some(pos) = placeholder_offset(&bufs[first]) {
            return this.poll_send_range(cx, pos, &bufs[first]);
        }
        let end = bufs[first..]
            .iter()
            .position(|b| placeholder_offset(b).is_some())
            .map_or(bufs.len(), |i| first + i);
        Pin::new(&mut this.stream).poll_write_vectored(cx, &bufs[first..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A connected pair on loopback: (the server side wrapped in a lane, the client side).
    pub(crate) async fn pair() -> (LaneIo, Arc<Lane>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (io, lane) = LaneIo::new(accepted.expect("accept").0, Counter::default());
        (io, lane, client.expect("connect"))
    }

    /// A temporary file holding `data`.
    pub(crate) fn file_with(data: &[u8]) -> File {
        let mut f = tempfile::tempfile().expect("temp file");
        std::io::Write::write_all(&mut f, data).expect("write");
        f
    }

    #[tokio::test]
    async fn a_placeholder_out_of_step_is_an_error_and_sends_nothing() {
        let data = vec![7u8; 300_000];
        let (mut io, lane, mut client) = pair().await;
        // Nothing queued: a placeholder cannot be written.
        let e = io
            .write(&PLACEHOLDER[..10])
            .await
            .expect_err("a placeholder with no range");
        assert!(e.to_string().contains("out of step"), "{e}");
        let source = Source {
            file: file_with(&data),
            hold: None,
        };
        let chunks = [placeholder(&lane, &Arc::new(source), 0, 300_000).expect("cached")];
        // The right length at the wrong start (another placeholder's), and a wrong length.
        let start = lane.jobs.lock().expect("lock")[0].start;
        let other = (start + SEND_CHUNK / STARTS) % SEND_CHUNK;
        for wrong in [&PLACEHOLDER[other..other + 300_000], &chunks[0][..299_999]] {
            let e = io.write(wrong).await.expect_err("a mismatched placeholder");
            assert!(e.to_string().contains("out of step"), "{e}");
        }
        io.shutdown().await.expect("shutdown");
        drop(io);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert!(got.is_empty(), "{} bytes were sent", got.len());
    }
}

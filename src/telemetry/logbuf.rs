//! Log output to standard error: each line written at once, except the lines below WARN (info,
//! debug, trace) of the shard threads (mostly the access log), which are batched into one write
//! per 32 KiB or per heartbeat (250 ms).
//!
//! Measured on a blob `HEAD` at 60 000 requests/s: writing each access-log line with its own
//! `write(2)` was 8.5 % of the server's CPU. A WARN or ERROR line first writes what its thread has
//! batched, then itself, so it is never delayed and the thread's lines stay in order.

use std::cell::RefCell;
use std::io::{self, Write};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// What a batching thread keeps at most before writing.
const BATCH: usize = 32 << 10;

thread_local! {
    /// This thread's batch; `None` on threads that do not batch.
    static BATCHED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Makes this thread batch its lines below WARN, until the returned guard is dropped (which
/// writes the batch, also when the thread unwinds). The thread must call [`flush`] regularly.
#[must_use = "the batch is written when the guard is dropped"]
pub fn batch_this_thread() -> Batching {
    BATCHED.with(|b| *b.borrow_mut() = Some(Vec::with_capacity(BATCH)));
    Batching(())
}

/// While it lives, its thread batches its lines; dropping it writes them and stops batching.
pub struct Batching(());

impl Drop for Batching {
    fn drop(&mut self) {
        flush();
        BATCHED.with(|b| *b.borrow_mut() = None);
    }
}

/// Writes what this thread has batched (nothing on threads that do not batch).
pub fn flush() {
    BATCHED.with(|b| {
        if let Some(buf) = b.borrow_mut().as_mut() {
            write_out(buf);
        }
    });
}

fn write_out(buf: &mut Vec<u8>) {
    if !buf.is_empty() {
        // Nowhere to report a failed write to standard error.
        let _ = io::stderr().write_all(buf);
        buf.clear();
    }
}

/// The log writer: standard error, batched as described in the module docs.
pub struct Stderr;

/// One log line on its way out.
pub enum Line {
    /// Written at once.
    Direct(io::Stderr),
    /// Added to this thread's batch (written at once if the thread does not batch).
    Batched,
}

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Line::Direct(err) => err.write(data),
            Line::Batched => BATCHED.with(|b| match b.borrow_mut().as_mut() {
                Some(buf) => {
                    buf.extend_from_slice(data);
                    if buf.len() >= BATCH {
                        write_out(buf);
                    }
                    Ok(data.len())
                }
                None => io::stderr().write(data),
            }),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Line::Direct(err) => err.flush(),
            Line::Batched => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        line_for(Level::ERROR)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        line_for(*meta.level())
    }
}

/// The writer for a line at `level`.
fn line_for(level: Level) -> Line {
    // Levels compare by verbosity: WARN and ERROR are at most WARN.
    if level <= Level::WARN {
        flush();
        Line::Direct(io::stderr())
    } else {
        Line::Batched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batched() -> Option<Vec<u8>> {
        BATCHED.with(|b| b.borrow().clone())
    }

    #[test]
    fn batching_threads_keep_info_lines_until_a_flush_or_a_warning() {
        std::thread::spawn(|| {
            let batching = batch_this_thread();
            let mut line = line_for(Level::INFO);
            assert!(matches!(line, Line::Batched));
            line.write_all(b"logbuf test: a batched line\n")
                .expect("batched");
            assert_eq!(
                batched().as_deref(),
                Some(&b"logbuf test: a batched line\n"[..]),
                "kept, not written"
            );
            // A warning writes the batch out first.
            assert!(matches!(line_for(Level::WARN), Line::Direct(_)));
            assert_eq!(batched().map(|b| b.len()), Some(0));
            line_for(Level::DEBUG)
                .write_all(b"logbuf test: flushed\n")
                .expect("batched");
            flush();
            assert_eq!(batched().map(|b| b.len()), Some(0));
            line_for(Level::INFO)
                .write_all(b"logbuf test: written when the guard goes\n")
                .expect("batched");
            drop(batching);
            assert_eq!(batched(), None, "written, and no longer batching");
        })
        .join()
        .expect("batching thread");
        // Other threads write each line at once.
        line_for(Level::INFO)
            .write_all(b"logbuf test: written at once\n")
            .expect("written");
        assert_eq!(batched(), None);
    }
}

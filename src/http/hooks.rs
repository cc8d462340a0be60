//! Test hooks, present only when the server starts with `REGCACHE_TEST_HOOKS=1`: every response
//! names the shard that served it (`x-regcache-shard`), and `POST /_regcache/test/stall` blocks one
//! shard's thread, so that a test can place its connections and stall a shard. Without the
//! variable neither exists (the endpoint is a `404` like any unknown operator path).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::http::body::BodyChunk;

/// The environment variable that turns the hooks on (value `1`), read once when serving starts.
pub const ENV: &str = "REGCACHE_TEST_HOOKS";

/// Response header naming the shard that served the request (with the hooks on).
pub const SHARD_HEADER: &str = "x-regcache-shard";

/// The operator path of the stall hook, below `/_regcache/`.
pub const STALL_PATH: &str = "test/stall";

/// Whether the hooks are on (`REGCACHE_TEST_HOOKS=1`).
pub fn enabled() -> bool {
    std::env::var_os(ENV).is_some_and(|v| v == "1")
}

/// An order to block a shard's thread, sent to that shard.
pub struct Stall {
    duration: Duration,
    /// Told when the thread is about to block.
    started: oneshot::Sender<()>,
    /// Told when the thread runs again.
    ended: oneshot::Sender<()>,
}

impl Stall {
    /// Blocks the calling thread (the shard's own, which runs nothing else meanwhile: not its
    /// connections, not its timers) for the stall's duration.
    pub fn block(self) {
        let _ = self.started.send(());
        std::thread::sleep(self.duration);
        let _ = self.ended.send(());
    }
}

/// Each shard's stall queue, one receiver per shard, read by the shard's accept loop.
pub fn stall_queues(shards: usize) -> (Stalls, Vec<mpsc::UnboundedReceiver<Stall>>) {
    let (senders, receivers) = (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
    (Stalls(Arc::new(senders)), receivers)
}

/// Where stall orders go: one queue per shard.
#[derive(Clone)]
pub struct Stalls(Arc<Vec<mpsc::UnboundedSender<Stall>>>);

/// What a shard puts in the extensions of every request it serves when the hooks are on.
#[derive(Clone)]
pub struct ShardHooks {
    /// The shard serving the request.
    pub shard: usize,
    pub stalls: Stalls,
}

/// Why a stall could not be ordered.
#[derive(Debug, thiserror::Error)]
pub enum StallError {
    #[error("no shard {shard}: there are {count}")]
    NoShard { shard: usize, count: usize },
    #[error("shard {0} has stopped")]
    Stopped(usize),
}

impl ShardHooks {
    /// Blocks shard `shard`'s thread for `duration`. Returns once that thread is blocked, with
    /// the body to answer: one line, sent when the thread runs again. (Asked on a connection of
    /// the shard to stall, the answer comes only after the stall, like everything on it.)
    pub async fn stall(
        &self,
        shard: usize,
        duration: Duration,
    ) -> Result<mpsc::Receiver<BodyChunk>, StallError> {
        let queues = &self.stalls.0;
        let queue = queues.get(shard).ok_or(StallError::NoShard {
            shard,
            count: queues.len(),
        })?;
        let (started, on_start) = oneshot::channel();
        let (ended, on_end) = oneshot::channel();
        queue
            .send(Stall {
                duration,
                started,
                ended,
            })
            .map_err(|_| StallError::Stopped(shard))?;
        on_start.await.map_err(|_| StallError::Stopped(shard))?;
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let line = match on_end.await {
                Ok(()) => format!(
                    "shard {shard} ran again after {} ms\n",
                    duration.as_millis()
                ),
                Err(_) => format!("shard {shard} stopped while stalled\n"),
            };
            let _ = tx.send(Ok(Bytes::from(line))).await;
        });
        Ok(rx)
    }
}

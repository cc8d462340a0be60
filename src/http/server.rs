//! The listener's side of the server: the shards (one thread with a current-thread runtime per
//! CPU) and their accept loops, each connection placed on the least loaded shard, TLS handshakes,
//! HTTP/1.1 connections handed to [`handle`](crate::http::handle()), and the drain on shutdown.
//! The [`App`] it serves is assembled by `App::open`; [`run`] spawns its maintenance loop.
//!
//! [`run`] takes an already bound listener and a shutdown future, so tests bind `127.0.0.1:0` and
//! call it directly. It enforces the connection limits of `[limits]`: at most `max_connections`
//! open connections (the next ones get a `503` and are closed), `max_header_size` for a request
//! head and `header_read_timeout` to send it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;

use crate::app::App;
use crate::http::error::{ApiError, Code};
use crate::telemetry::metrics::Metrics;

/// At most this many connections over `limits.max_connections` are being answered `503` at once;
/// beyond that they are closed without an answer.
const MAX_REFUSING: usize = 64;

/// What a connection over `limits.max_connections` is told before it is closed.
fn over_capacity_response() -> bytes::Bytes {
    ApiError::new(
        Code::Unavailable,
        "regcache has too many open connections (limits.max_connections); retry",
    )
    .retry_after("1")
    .to_http1_closing()
}

/// Answers a connection over the limit with a `503` and closes it, without reading a request. At
/// most [`MAX_REFUSING`] are answered at once (2 s each at most); the rest are just closed.
fn refuse(
    stream: tokio::net::TcpStream,
    tls: bool,
    refusing: &Arc<tokio::sync::Semaphore>,
    answer: &bytes::Bytes,
) {
    let Ok(permit) = Arc::clone(refusing).try_acquire_owned() else {
        return;
    };
    if tls {
        // A plain-text answer means nothing inside TLS: just close.
        return;
    }
    let answer = answer.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let _permit = permit;
        let mut stream = stream;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            stream.write_all(&answer).await?;
            stream.shutdown().await?;
            // Read what the client sent, so that closing does not reset the connection before it
            // has read the answer.
            let mut sink = [0u8; 4096];
            let mut total = 0;
            while total < 64 << 10 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => total += n,
                }
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
    });
}

/// Counts a connection out of `connections_open` when its task ends, however it ends.
struct OpenGuard(Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// Counts a connection out of its shard's load when the connection ends, however it ends
/// (including before it reaches the shard it was handed to).
struct LoadGuard(Gauge);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An accepted connection on its way to the shard that will serve it.
struct Handoff {
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    load: LoadGuard,
}

/// What every shard shares: the connection limits, the TLS acceptor, and each shard's load and
/// hand-off queue.
struct Shared {
    app: Arc<App>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Open connections per shard (also the `shard_connections` metric).
    loads: Vec<Gauge>,
    /// Where a shard sends a connection it accepted for another shard.
    handoffs: Vec<tokio::sync::mpsc::UnboundedSender<Handoff>>,
    /// Each shard's last heartbeat (milliseconds since the epoch; also in `App::shard_beats`).
    beats: Vec<Arc<AtomicU64>>,
    /// Held while a connection's shard is chosen.
    placing: Mutex<()>,
    /// One permit per open connection, across all shards (`limits.max_connections`).
    open: Arc<tokio::sync::Semaphore>,
    refusing: Arc<tokio::sync::Semaphore>,
    over_capacity: bytes::Bytes,
    grace: Duration,
    /// Each shard's stall queue, with the test hooks on (`REGCACHE_TEST_HOOKS=1`).
    stalls: Option<crate::http::hooks::Stalls>,
    /// Checks client credentials against `[access] htpasswd`, remembering the answers: one for
    /// every shard, so a credential verified on one is known to all.
    auth: Arc<crate::http::auth::Verifier>,
}

/// How many shards serve connections: one per CPU this process may use.
pub fn shard_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Shared {
    /// The shard that should serve a connection `me` has just accepted: `me` unless another shard
    /// has fewer open connections (the least loaded one, the lowest index on a tie). Counts the
    /// connection in the chosen shard's load at once, so that the next choice sees it.
    ///
    /// A shard that has stopped (its inbox is closed) or stalled (no heartbeat for
    /// [`STALLED_AFTER_MS`]) is never chosen.
    fn place(&self, me: usize) -> (usize, LoadGuard) {
        // One choice at a time: two shards accepting at once would both see the same loads.
        let _one = self.placing.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::store::now_millis();
        let usable = |i: usize| {
            !self.handoffs[i].is_closed()
                && now.saturating_sub(self.beats[i].load(Ordering::Relaxed)) < STALLED_AFTER_MS
        };
        let mut to = me;
        for (i, load) in self.loads.iter().enumerate() {
            if load.get() < self.loads[to].get() && usable(i) {
                to = i;
            }
        }
        (to, self.count_in(to))
    }

    /// Counts one more connection in shard `i`'s load, until the guard is dropped.
    fn count_in(&self, i: usize) -> LoadGuard {
        let load = self.loads[i].clone();
        load.inc();
        LoadGuard(load)
    }
}

/// A shard whose last heartbeat is older than this gets no new connections from the others.
const STALLED_AFTER_MS: u64 = 1000;

/// Serves `app` on `listener` until `shutdown` completes, then drains connections for at most
/// `grace`.
///
/// Connections are served by [`shard_count`] shards: one thread each, with its own
/// single-threaded runtime, accepting from the same listening socket (like nginx's workers). A
/// connection goes to the least loaded shard and stays there, so its wake-ups never cross threads
/// and each shard polls only its own sockets. What the connections start that outlives a request
/// or serves several shards (fills, manifest flights, uploads, upstream requests and their pooled
/// connections) runs on the background runtime the cache and the upstreams were given (see
/// `App::open`), which must run until this returns; the maintenance loop runs on the caller's
/// runtime. So a shard depends on no other shard, and each stops once its own connections have
/// drained.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> anyhow::Result<()> {
    let acceptor = match &app.tls {
        Some(reloader) => Some(crate::http::tls::acceptor(Arc::clone(reloader))?),
        None => None,
    };
    let max_connections = app.routing().config.limits.max_connections;
    let count = shard_count();
    let (handoffs, mut inboxes): (Vec<_>, Vec<_>) = (0..count)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let (stalls, mut stall_queues) = if crate::http::hooks::enabled() {
        tracing::warn!(
            "test hooks on ({}=1): responses name their shard, and POST /_regcache/test/stall \
             blocks a shard",
            crate::http::hooks::ENV
        );
        let (stalls, queues) = crate::http::hooks::stall_queues(count);
        (Some(stalls), queues.into_iter().map(Some).collect())
    } else {
        (None, (0..count).map(|_| None).collect::<Vec<_>>())
    };
    let loads = (0..count)
        .map(|i| {
            let gauge = app
                .metrics
                .shard_connections
                .get_or_create(&vec![("shard", i.to_string())])
                .clone();
            gauge.set(0);
            gauge
        })
        .collect();
    let shared = Arc::new(Shared {
        app: Arc::clone(&app),
        acceptor,
        loads,
        handoffs,
        beats: (0..count)
            .map(|_| Arc::new(AtomicU64::new(crate::store::now_millis())))
            .collect(),
        placing: Mutex::new(()),
        open: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        refusing: Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING)),
        over_capacity: over_capacity_response(),
        grace,
        auth: Arc::new(crate::http::auth::Verifier::new(
            app.metrics.auth_bcrypt_checks.clone(),
        )),
        stalls,
    });
    let listener = listener.into_std()?;
    app.watch_shards(shared.beats.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shards = Vec::new();
    let mut started = Ok(());
    for (i, (inbox, stalls)) in inboxes.drain(..).zip(stall_queues.drain(..)).enumerate() {
        let shard = Shard {
            index: i,
            inbox,
            stalls,
            shared: Arc::clone(&shared),
            stop: stop_rx.clone(),
        };
        match shard.start(&listener) {
            Ok(done) => shards.push(done),
            Err(e) => {
                started = Err(e);
                break;
            }
        }
    }
    drop(listener);
    if let Err(e) = started {
        let _ = stop_tx.send(true);
        for done in shards {
            let _ = done.await;
        }
        return Err(e);
    }
    let upkeep = tokio::spawn(Arc::clone(&app).maintain());
    shutdown.await;
    app.set_stopping();
    let _ = stop_tx.send(true);
    upkeep.abort();
    let _ = app.cache.store.flush_access();
    tracing::info!("shutting down: draining in-flight requests");
    for done in shards {
        let _ = done.await;
    }
    let _ = app.cache.store.flush_access();
    tracing::info!("all connections closed");
    Ok(())
}

/// One shard before it starts: its place among the shards and what it shares with them.
struct Shard {
    index: usize,
    /// Connections other shards accepted for this one.
    inbox: tokio::sync::mpsc::UnboundedReceiver<Handoff>,
    /// Stall orders for this shard (test hooks only).
    stalls: Option<tokio::sync::mpsc::UnboundedReceiver<crate::http::hooks::Stall>>,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Shard {
    /// Starts the shard's thread; the receiver completes when the thread is done.
    fn start(
        self,
        listener: &std::net::TcpListener,
    ) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
        let listener = listener.try_clone()?;
        let beat = Arc::clone(&self.shared.beats[self.index]);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("rc-shard-{}", self.index))
            .spawn(move || {
                self.run(listener, &beat);
                drop(done_tx);
            })?;
        Ok(done_rx)
    }

    fn run(self, listener: std::net::TcpListener, beat: &Arc<AtomicU64>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, shard = self.index, "cannot start a shard's runtime");
                // Never seen as stalled (its heartbeat is in the future): the watchdog does not
                // wait for it, and its closed inbox keeps connections away.
                beat.store(u64::MAX, Ordering::Relaxed);
                return;
            }
        };
        let beat = Arc::clone(beat);
        // The access log of a busy shard goes out in batches, written at each beat (and when the
        // thread ends, however it ends).
        let _batching = crate::telemetry::logbuf::batch_this_thread();
        rt.block_on(async move {
            let heart = tokio::spawn(async move {
                loop {
                    beat.store(crate::store::now_millis(), Ordering::Relaxed);
                    crate::telemetry::logbuf::flush();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
            serve_shard(
                self.index,
                listener,
                self.inbox,
                self.stalls,
                Arc::clone(&self.shared),
                self.stop,
            )
            .await;
            // Drained: nothing on this shard serves another shard's clients (fills and upstream
            // connections live on the background runtime), so it stops now.
            heart.abort();
        });
        // Blocking work still running (a read for a client cut off at the end of the grace
        // period) is not waited for: the connection is gone.
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}

/// One shard: accepts connections and serves them until `stop` turns true, then drains them for
/// at most the grace period.
///
/// All shards accept from one socket, and the first to wake takes every connection waiting: a
/// burst (wrk, a fleet starting at once) would all land on one shard, which then does all the
/// sending while the others idle. So a shard serves a connection it accepted only if no other
/// shard has fewer open; else it hands it to the least loaded one (see [`Shared::place`]).
async fn serve_shard(
    me: usize,
    listener: std::net::TcpListener,
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<Handoff>,
    mut stalls: Option<tokio::sync::mpsc::UnboundedReceiver<crate::http::hooks::Stall>>,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "a shard cannot use the listener");
            return;
        }
    };
    let app = &shared.app;
    let hooks = shared
        .stalls
        .as_ref()
        .map(|stalls| crate::http::hooks::ShardHooks {
            shard: me,
            stalls: stalls.clone(),
        });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut last_refusal_log: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match Arc::clone(&shared.open).try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => {
                        app.metrics
                            .limit_rejections
                            .get_or_create(&vec![("limit", "max_connections".to_owned())])
                            .inc();
                        if last_refusal_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            last_refusal_log = Some(std::time::Instant::now());
                            let max_connections = app.routing().config.limits.max_connections;
                            tracing::warn!(%peer, max_connections, "too many open connections (limits.max_connections): refusing new ones with 503");
                        }
                        refuse(stream, shared.acceptor.is_some(), &shared.refusing, &shared.over_capacity);
                        continue;
                    }
                };
                let (to, load) = shared.place(me);
                if to == me {
                    serve_connection(&shared, &graceful, &hooks, stream, peer, slot, load);
                    continue;
                }
                match stream.into_std() {
                    Ok(stream) => {
                        let handoff = Handoff { stream, peer, slot, load };
                        if let Err(back) = shared.handoffs[to].send(handoff) {
                            // That shard stopped since it was chosen: serve it here after all.
                            let back = Handoff { load: shared.count_in(me), ..back.0 };
                            take(&shared, &graceful, &hooks, back);
                        }
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot hand a connection to another shard"),
                }
            }
            Some(handoff) = inbox.recv() => take(&shared, &graceful, &hooks, handoff),
            // Blocks this shard's thread: the test hook that stands for a stalled shard.
            Some(stall) = next_stall(&mut stalls), if stalls.is_some() => stall.block(),
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    drop(inbox);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("a shard's connections are closed"),
        () = tokio::time::sleep(shared.grace) => tracing::warn!(grace_s = shared.grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

/// The next stall order of a shard's queue (test hooks only; never without them).
async fn next_stall(
    queue: &mut Option<tokio::sync::mpsc::UnboundedReceiver<crate::http::hooks::Stall>>,
) -> Option<crate::http::hooks::Stall> {
    match queue {
        Some(q) => q.recv().await,
        None => std::future::pending().await,
    }
}

/// Serves a connection another shard accepted (or one it could not hand over) on this shard.
fn take(
    shared: &Arc<Shared>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    hooks: &Option<crate::http::hooks::ShardHooks>,
    handoff: Handoff,
) {
    let Handoff {
        stream,
        peer,
        slot,
        load,
    } = handoff;
    match tokio::net::TcpStream::from_std(stream) {
        Ok(stream) => serve_connection(shared, graceful, hooks, stream, peer, slot, load),
        Err(e) => tracing::warn!(%peer, error = %e, "cannot take a connection from another shard"),
    }
}

/// Serves one accepted connection on the current shard.
fn serve_connection(
    shared: &Arc<Shared>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    hooks: &Option<crate::http::hooks::ShardHooks>,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    load: LoadGuard,
) {
    let app = &shared.app;
    let _ = stream.set_nodelay(true);
    let limits = app.routing().config.limits.clone();
    let app2 = Arc::clone(app);
    // Plain connections send cached blob ranges with sendfile: their requests carry the
    // connection's lane (see `sendfile`). TLS connections have none.
    let (conn, lane) = match shared.acceptor.clone() {
        None => {
            let (io, lane) =
                crate::http::sendfile::LaneIo::new(stream, app.metrics.sendfile_bytes.clone());
            (Ok(io), Some(crate::http::sendfile::LaneRef(lane)))
        }
        Some(acceptor) => (Err((stream, acceptor)), None),
    };
    let hooks = hooks.clone();
    let auth = Arc::clone(&shared.auth);
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(lane) = &lane {
            req.extensions_mut().insert(lane.clone());
        }
        if let Some(hooks) = &hooks {
            req.extensions_mut().insert(hooks.clone());
        }
        crate::http::handle(Arc::clone(&app2), Arc::clone(&auth), peer, req)
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_size)
        .keep_alive(true)
        // Body chunks must reach the writer as they are (no copying into one buffer): the
        // sendfile placeholders depend on it.
        .writev(true);
    let metrics = Arc::clone(&app.metrics);
    let watcher = graceful.watcher();
    tokio::spawn(async move {
        let (_slot, _load) = (slot, load);
        metrics.connections_open.inc();
        let _open = OpenGuard(metrics);
        let result = match conn {
            Ok(io) => {
                watcher
                    .watch(http.serve_connection(TokioIo::new(io), service))
                    .await
            }
            Err((stream, acceptor)) => {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await;
                let tls = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                watcher
                    .watch(http.serve_connection(TokioIo::new(tls), service))
                    .await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    });
}

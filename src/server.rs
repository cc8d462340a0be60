//! The server: assembles the store, upstreams and cache into an [`App`], accepts connections and
//! drains them on shutdown.
//!
//! [`run`] takes an already bound listener and a shutdown future, so tests bind `127.0.0.1:0` and
//! call it directly. It enforces the connection limits of `[limits]`: at most `max_connections`
//! open connections (the next ones get a `503` and are closed), `max_header_size` for a request
//! head and `header_read_timeout` to send it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::upstream::Upstream;

/// The part of the configuration that can change while serving: upstreams and routing.
pub struct Routing {
    pub config: Config,
    upstreams: Vec<Arc<Upstream>>,
    /// Lower-case host name → index in `upstreams`.
    hosts: HashMap<String, usize>,
}

impl Routing {
    /// Builds the upstream clients, reusing those of `previous` whose settings did not change (so
    /// their tokens and circuit state survive a reload).
    pub fn build(
        config: Config,
        metrics: &Arc<Metrics>,
        previous: Option<&Routing>,
    ) -> anyhow::Result<Routing> {
        let mut upstreams = Vec::new();
        let mut hosts = HashMap::new();
        for (i, u) in config.upstreams.iter().enumerate() {
            for h in &u.hosts {
                hosts.insert(h.to_ascii_lowercase(), i);
            }
            let reused = previous
                .and_then(|p| p.upstreams.iter().find(|old| old.config == *u))
                .cloned();
            let up = match reused {
                Some(up) => up,
                None => Upstream::new(u.clone(), Arc::clone(metrics)).map_err(|e| {
                    anyhow::anyhow!("cannot build the HTTP client for upstream {}: {e}", u.name)
                })?,
            };
            upstreams.push(up);
        }
        Ok(Routing {
            config,
            upstreams,
            hosts,
        })
    }

    pub fn default_upstream(&self) -> Arc<Upstream> {
        Arc::clone(&self.upstreams[self.config.default_upstream])
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    pub fn upstream_for_host(&self, host: &str) -> Option<Arc<Upstream>> {
        self.hosts
            .get(&host.to_ascii_lowercase())
            .map(|&i| Arc::clone(&self.upstreams[i]))
    }

    /// Every pin as an image reference (`name:tag` or `name@digest`).
    pub fn pin_names(
        &self,
        store: &crate::store::Store,
    ) -> Result<Vec<String>, crate::store::StoreError> {
        Ok(store
            .pins()?
            .into_iter()
            .map(|(u, r, x)| {
                let name = self.catalog_name(&u, &r);
                if x.contains(':') {
                    format!("{name}@{x}")
                } else {
                    format!("{name}:{x}")
                }
            })
            .collect())
    }

    /// The name under which `/v2/_catalog` lists a cached repository.
    pub fn catalog_name(&self, upstream: &str, repo: &str) -> String {
        if upstream == self.config.default_upstream().name {
            return repo.to_owned();
        }
        match self.upstreams.iter().find(|u| u.name() == upstream) {
            Some(u) => {
                let host = u.config.hosts.first().cloned().unwrap_or_default();
                format!("{host}/{repo}")
            }
            None => format!("{upstream}/{repo}"),
        }
    }
}

/// Everything a request handler needs.
pub struct App {
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    routing: RwLock<Arc<Routing>>,
    /// The listener's certificate, when serving HTTPS.
    pub tls: Option<Arc<crate::tls::CertReloader>>,
    /// Checks client credentials against `[access] htpasswd`, remembering the answers.
    pub auth: crate::access::Verifier,
    /// Each shard's last sign of life (milliseconds since the epoch), for the systemd watchdog.
    shard_beats: Mutex<Vec<Arc<AtomicU64>>>,
    /// Set once shutdown has begun: draining shards stop beating, and that is expected.
    stopping: std::sync::atomic::AtomicBool,
    /// When the certificate's coming end was last logged (Unix seconds): at most once a day.
    tls_reminded_at: std::sync::atomic::AtomicI64,
    /// Whether the certificate in force was logged as expired.
    tls_expired_logged: std::sync::atomic::AtomicBool,
}

impl App {
    /// Opens (and locks) the store and builds the upstream clients. Contacts no upstream.
    pub fn open(config: Config) -> anyhow::Result<Arc<App>> {
        let store = Store::open(&config.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the store in {}: {e}",
                config.data_dir.display()
            )
        })?;
        let metrics = Arc::new(Metrics::new());
        let mut cache = Cache::new(
            Arc::new(store),
            config.max_manifest_size,
            Arc::clone(&metrics),
        );
        if let Some(s3) = &config.store.s3 {
            cache.bucket = Some(Arc::new(crate::bucket::Bucket::new(
                s3,
                Arc::clone(&metrics),
            )?));
        }
        match cache.load_outbox() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                count = n,
                "writes owed to the shared bucket from the last run"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the writes owed to the shared bucket")
            }
        }
        let cache = Arc::new(cache);
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(crate::tls::CertReloader::new(&t.cert, &t.key)?)),
            None => None,
        };
        cache.set_fill_limits(config.limits.max_fills, config.limits.fill_wait);
        log_warnings(&config);
        let routing = Routing::build(config, &metrics, None)?;
        Ok(Arc::new(App {
            cache,
            metrics,
            routing: RwLock::new(Arc::new(routing)),
            tls,
            auth: crate::access::Verifier::new(),
            shard_beats: Mutex::new(Vec::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            // The warnings of the config were just logged: the next reminder is a day away.
            tls_reminded_at: std::sync::atomic::AtomicI64::new(crate::tls::unix_now()),
            tls_expired_logged: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Whether every shard has run within `within` (true before the shards start and once
    /// shutdown has begun). A shard stuck in a blocking call stops beating (it beats every
    /// 250 ms), and the watchdog ping is withheld.
    pub fn shards_responsive(&self, within: Duration) -> bool {
        if self.stopping.load(Ordering::Relaxed) {
            return true;
        }
        let now = crate::store::now_millis();
        let limit = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
        self.shard_beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .all(|b| now.saturating_sub(b.load(Ordering::Relaxed)) <= limit)
    }

    /// The routing in force now.
    pub fn routing(&self) -> Arc<Routing> {
        Arc::clone(&self.routing.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies a new, already validated configuration. Settings that need a restart (listen
    /// address, data directory) are reported and left as they are.
    pub fn reload(&self, config: Config) -> anyhow::Result<()> {
        let current = self.routing();
        let old = &current.config;
        if config.data_dir != old.data_dir {
            tracing::warn!(new = %config.data_dir.display(), "data_dir changed: takes effect at the next restart");
        }
        if config.listen != old.listen {
            tracing::warn!(new = %config.listen, "listen changed: takes effect at the next restart");
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => self.tls_expired_logged.store(false, Ordering::Relaxed),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload the TLS certificate; the one in force stays")
                }
            }
        }
        if config.tls.is_some() != self.tls.is_some() {
            tracing::warn!("tls turned on or off: takes effect at the next restart");
        }
        if config.config_store != old.config_store {
            tracing::warn!("config_store changed: takes effect at the next restart");
        }
        if config.store.s3 != old.store.s3 {
            tracing::warn!("store.s3 changed: takes effect at the next restart");
        }
        if config.limits.max_connections != old.limits.max_connections {
            tracing::warn!(
                new = config.limits.max_connections,
                "limits.max_connections changed: takes effect at the next restart"
            );
        }
        log_warnings(&config);
        self.cache
            .set_fill_limits(config.limits.max_fills, config.limits.fill_wait);
        let config = Config {
            data_dir: old.data_dir.clone(),
            listen: old.listen,
            config_store: old.config_store.clone(),
            store: crate::config::StoreConfig {
                s3: old.store.s3.clone(),
                ..config.store
            },
            ..config
        };
        self.cache.set_max_manifest_size(config.max_manifest_size);
        let routing = Routing::build(config, &self.metrics, Some(&current))?;
        let names: Vec<String> = routing
            .upstreams
            .iter()
            .map(|u| format!("{}={}", u.name(), u.config.url))
            .collect();
        *self.routing.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routing);
        tracing::info!(upstreams = ?names, "configuration applied");
        Ok(())
    }

    /// Flushes access times and, if the store is over a limit (or over `target` when given),
    /// evicts least recently used content.
    pub async fn collect(&self, target: Option<u64>) -> anyhow::Result<crate::evict::EvictReport> {
        let store = Arc::clone(&self.cache.store);
        let cfg = self.routing().config.store.clone();
        let report = tokio::task::spawn_blocking(move || {
            store.flush_access()?;
            let target = target.or_else(|| {
                crate::evict::target(&store, cfg.max_size, cfg.min_free, cfg.low_water)
            });
            match target {
                Some(t) => crate::evict::evict_to(&store, t),
                None => Ok(crate::evict::EvictReport::default()),
            }
        })
        .await??;
        self.metrics.evicted_bytes.inc_by(report.bytes);
        self.metrics.evicted_blobs.inc_by(report.blobs);
        Ok(report)
    }

    /// Background upkeep: recovery at start, then access-time flushes and eviction.
    pub async fn maintain(self: Arc<Self>) {
        let store = Arc::clone(&self.cache.store);
        match tokio::task::spawn_blocking(move || crate::verify::recover(&store)).await {
            Ok(Err(e)) => tracing::error!(error = %e, "store recovery failed"),
            Err(e) => tracing::error!(error = %e, "store recovery task failed"),
            Ok(Ok(_)) => {}
        }
        loop {
            let interval = self.routing().config.store.gc_interval;
            tokio::time::sleep(interval).await;
            if let Err(e) = self.collect(None).await {
                tracing::error!(error = %e, "background collection failed");
            }
            self.cache.retry_shares();
            self.check_certificate_expiry();
            let store = &self.cache.store;
            if store.is_full() && free_bytes(store.root()).is_some_and(|f| f > 64 << 20) {
                store.set_full(false);
            }
        }
    }

    /// Sets the certificate expiry gauge (called when metrics are scraped).
    pub fn refresh_tls_metric(&self) {
        if let Some(tls) = &self.tls {
            let cert = tls.paths().0.display().to_string();
            self.metrics
                .tls_expiry
                .get_or_create(&vec![("cert", cert)])
                .set(tls.not_after());
        }
    }

    /// Warns while the certificate in force is within `tls.expiry_warning` of its end, and logs
    /// an error once it has ended (a certificate that expires while regcache runs is still
    /// served: there is none better). Once a day, and at once when it expires.
    fn check_certificate_expiry(&self) {
        let (Some(tls), Some(cfg)) = (&self.tls, self.routing().config.tls.clone()) else {
            return;
        };
        let now = crate::tls::unix_now();
        let not_after = tls.not_after();
        let expired = now > not_after;
        let newly_expired = expired && !self.tls_expired_logged.swap(true, Ordering::Relaxed);
        let last = self.tls_reminded_at.load(Ordering::Relaxed);
        if !newly_expired && now.saturating_sub(last) < 86_400 {
            return;
        }
        let cert = tls.paths().0;
        if expired {
            tracing::error!(cert = %cert.display(), not_after = %crate::tls::format_utc(not_after), "the TLS certificate in force has expired: clients that verify it fail; install a renewed one and reload");
        } else if let Some(w) = crate::tls::expiry_warning(cert, not_after, now, cfg.expiry_warning)
        {
            tracing::warn!("{w}");
        } else {
            return;
        }
        self.tls_reminded_at.store(now, Ordering::Relaxed);
    }

    /// Updates the store gauges (called when metrics are scraped).
    pub fn refresh_store_metrics(&self) {
        self.metrics
            .store_full
            .set(i64::from(self.cache.store.is_full()));
        if let Ok((n, bytes)) = self.cache.store.usage() {
            self.metrics.store_blobs.set(n as i64);
            self.metrics.store_bytes.set(bytes as i64);
        }
        if let Some(free) = free_bytes(self.cache.store.root()) {
            self.metrics.store_free_bytes.set(free as i64);
        }
    }
}

fn log_warnings(config: &Config) {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
}

/// Free bytes on the filesystem holding `path` (available to unprivileged users), via `statvfs`.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// At most this many connections over `limits.max_connections` are being answered `503` at once;
/// beyond that they are closed without an answer.
const MAX_REFUSING: usize = 64;

/// What a connection over `limits.max_connections` is told before it is closed.
fn over_capacity_response() -> bytes::Bytes {
    let body = serde_json::json!({"errors": [{
        "code": "UNAVAILABLE",
        "message": "regcache has too many open connections (limits.max_connections); retry",
        "detail": null,
    }]})
    .to_string();
    bytes::Bytes::from(format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
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
/// and each shard polls only its own sockets. What the connections start (fills, uploads) runs on
/// their shard; the maintenance loop runs on the caller's runtime.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> anyhow::Result<()> {
    let acceptor = match &app.tls {
        Some(reloader) => Some(crate::tls::acceptor(Arc::clone(reloader))?),
        None => None,
    };
    let max_connections = app.routing().config.limits.max_connections;
    let count = shard_count();
    let (handoffs, mut inboxes): (Vec<_>, Vec<_>) = (0..count)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
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
    });
    let listener = listener.into_std()?;
    *app.shard_beats.lock().unwrap_or_else(|p| p.into_inner()) = shared.beats.clone();
    app.stopping.store(false, Ordering::Relaxed);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // How many shards have drained their connections. A shard keeps its runtime running until all
    // have: a fill or an upstream connection that lives on it may still serve another shard's
    // clients during their drain.
    let (drained, _) = tokio::sync::watch::channel(0usize);
    let drained = Arc::new(drained);
    let mut shards = Vec::new();
    let mut started = Ok(());
    for (i, inbox) in inboxes.drain(..).enumerate() {
        let shard = Shard {
            index: i,
            count,
            inbox,
            shared: Arc::clone(&shared),
            stop: stop_rx.clone(),
            drained: Arc::clone(&drained),
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
    let unstarted = count - shards.len();
    drained.send_modify(|n| *n += unstarted);
    if let Err(e) = started {
        let _ = stop_tx.send(true);
        for done in shards {
            let _ = done.await;
        }
        return Err(e);
    }
    let upkeep = tokio::spawn(Arc::clone(&app).maintain());
    shutdown.await;
    app.stopping.store(true, Ordering::Relaxed);
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
    count: usize,
    /// Connections other shards accepted for this one.
    inbox: tokio::sync::mpsc::UnboundedReceiver<Handoff>,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
    drained: Arc<tokio::sync::watch::Sender<usize>>,
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
                // Not watched, and counted as drained, so that nothing waits for it.
                beat.store(u64::MAX, Ordering::Relaxed);
                self.drained.send_modify(|n| *n += 1);
                return;
            }
        };
        let beat = Arc::clone(beat);
        // The access log of a busy shard goes out in batches, written at each beat (and when the
        // thread ends, however it ends).
        let _batching = crate::logbuf::batch_this_thread();
        rt.block_on(async move {
            let heart = tokio::spawn(async move {
                loop {
                    beat.store(crate::store::now_millis(), Ordering::Relaxed);
                    crate::logbuf::flush();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            });
            serve_shard(
                self.index,
                listener,
                self.inbox,
                Arc::clone(&self.shared),
                self.stop,
            )
            .await;
            self.drained.send_modify(|n| *n += 1);
            let count = self.count;
            let _ = self.drained.subscribe().wait_for(|n| *n >= count).await;
            heart.abort();
        });
        // Blocking work still running (a fill's write) is not waited for: the process is stopping,
        // and recovery at the next start cleans up after it.
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
                    serve_connection(&shared, &graceful, stream, peer, slot, load);
                    continue;
                }
                match stream.into_std() {
                    Ok(stream) => {
                        let handoff = Handoff { stream, peer, slot, load };
                        if let Err(back) = shared.handoffs[to].send(handoff) {
                            // That shard stopped since it was chosen: serve it here after all.
                            let back = Handoff { load: shared.count_in(me), ..back.0 };
                            take(&shared, &graceful, back);
                        }
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "cannot hand a connection to another shard"),
                }
            }
            Some(handoff) = inbox.recv() => take(&shared, &graceful, handoff),
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

/// Serves a connection another shard accepted (or one it could not hand over) on this shard.
fn take(
    shared: &Arc<Shared>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    handoff: Handoff,
) {
    let Handoff {
        stream,
        peer,
        slot,
        load,
    } = handoff;
    match tokio::net::TcpStream::from_std(stream) {
        Ok(stream) => serve_connection(shared, graceful, stream, peer, slot, load),
        Err(e) => tracing::warn!(%peer, error = %e, "cannot take a connection from another shard"),
    }
}

/// Serves one accepted connection on the current shard.
fn serve_connection(
    shared: &Arc<Shared>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
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
                crate::sendfile::LaneIo::new(stream, app.metrics.sendfile_bytes.clone());
            (Ok(io), Some(crate::sendfile::LaneRef(lane)))
        }
        Some(acceptor) => (Err((stream, acceptor)), None),
    };
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(lane) = &lane {
            req.extensions_mut().insert(lane.clone());
        }
        crate::api::handle(Arc::clone(&app2), peer, req)
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

//! The running service's state: the store, the cache and its tiers, the routing to upstreams,
//! metrics and the listener's certificate, assembled by [`App::open`]; reloads
//! ([`App::reload`], driven by the config watchers in [`watch`]) and the maintenance loop
//! ([`App::maintain`]), which also runs the probes of the peers.

mod routing;
pub mod tls;
pub mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::cache::{Cache, Tiers};
use crate::config::Config;
use crate::store::{free_bytes, Store, StoreError};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::stale::StaleLog;

pub use routing::Routing;

/// Everything a request handler needs.
pub struct App {
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    routing: RwLock<Arc<Routing>>,
    /// The listener's certificate, when serving HTTPS.
    pub tls: Option<Arc<tls::CertReloader>>,
    /// Each shard's last sign of life (milliseconds since the epoch), for the systemd watchdog.
    shard_beats: Mutex<Vec<Arc<AtomicU64>>>,
    /// Set once shutdown has begun: draining shards stop beating, and that is expected.
    stopping: std::sync::atomic::AtomicBool,
    /// When the certificate's coming end was last logged (Unix seconds): at most once a day.
    tls_reminded_at: std::sync::atomic::AtomicI64,
    /// Whether the certificate in force was logged as expired.
    tls_expired_logged: std::sync::atomic::AtomicBool,
    /// The background runtime: fills, manifest flights, writes to the bucket and every request
    /// to an upstream or the bucket run there (see [`App::open`]).
    background: tokio::runtime::Handle,
    /// The tags served stale in the last hour, per upstream (`GET /_regcache/status`).
    pub stale: StaleLog,
    /// When [`App::open`] assembled this service (its uptime starts there).
    started: Instant,
}

/// Why [`App::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store cannot be opened: permissions, a newer schema, or the data directory locked by
    /// another regcache ([`OpenError::is_in_use`]).
    #[error("cannot open the store in {}", data_dir.display())]
    Store {
        data_dir: std::path::PathBuf,
        #[source]
        source: Box<StoreError>,
    },
    /// The rest of the assembly: the shared bucket's client, the certificate, the routing table.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl OpenError {
    /// Whether another running regcache holds the data directory (so the store commands can ask
    /// that server instead).
    pub fn is_in_use(&self) -> bool {
        matches!(self, OpenError::Store { source, .. } if matches!(**source, StoreError::Locked { .. }))
    }
}

impl App {
    /// Opens (and locks) the store and builds the upstream clients. Contacts no upstream.
    ///
    /// `background` is the runtime for the work that outlives a request or serves several
    /// connection shards: blob fills, manifest flights, writes to the bucket, and every request
    /// to an upstream or the bucket with its pooled connection. `serve` gives a small runtime of
    /// its own, which it keeps running until the server has drained; a test that runs the server
    /// in-process may give the runtime the server runs on.
    pub fn open(config: Config, background: tokio::runtime::Handle) -> Result<Arc<App>, OpenError> {
        let store = Store::open(&config.data_dir).map_err(|source| OpenError::Store {
            data_dir: config.data_dir.clone(),
            source: Box::new(source),
        })?;
        let metrics = Arc::new(Metrics::new());
        let cache = Cache::new(
            Arc::new(store),
            Tiers::from_config(&config, &metrics, &background)?,
            config.max_manifest_size,
            Arc::clone(&metrics),
            background.clone(),
        );
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
            Some(t) => Some(Arc::new(tls::CertReloader::new(&t.cert, &t.key)?)),
            None => None,
        };
        cache.set_fill_limits(
            config.limits.max_fills,
            config.limits.fill_wait,
            config.limits.fill_memory,
        );
        log_warnings(&config);
        let routing = Routing::build(config, &metrics, &background, None)?;
        Ok(Arc::new(App {
            cache,
            metrics,
            routing: RwLock::new(Arc::new(routing)),
            tls,
            shard_beats: Mutex::new(Vec::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            // The warnings of the config were just logged: the next reminder is a day away.
            tls_reminded_at: std::sync::atomic::AtomicI64::new(crate::config::tls::unix_now()),
            tls_expired_logged: std::sync::atomic::AtomicBool::new(false),
            background,
            stale: StaleLog::default(),
            started: Instant::now(),
        }))
    }

    /// How long this service has been up.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
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

    /// Watches these heartbeats (one per shard, milliseconds since the epoch) from now on.
    pub fn watch_shards(&self, beats: Vec<Arc<AtomicU64>>) {
        *self.shard_beats.lock().unwrap_or_else(|p| p.into_inner()) = beats;
        self.stopping.store(false, Ordering::Relaxed);
    }

    /// Shutdown has begun: draining shards stop beating, and that is expected.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
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
        // The peer tier is a link of the chain built at start: its list, token and timeout change
        // here, its presence at the next start.
        let peers = if config.peers.is_some() == old.peers.is_some() {
            config.peers.clone()
        } else {
            tracing::warn!("[peers] turned on or off: takes effect at the next restart");
            old.peers.clone()
        };
        if let (Some(p), Some(c)) = (self.cache.peers(), &peers) {
            p.apply(c)?;
        }
        if config.limits.max_connections != old.limits.max_connections {
            tracing::warn!(
                new = config.limits.max_connections,
                "limits.max_connections changed: takes effect at the next restart"
            );
        }
        log_warnings(&config);
        self.cache.set_fill_limits(
            config.limits.max_fills,
            config.limits.fill_wait,
            config.limits.fill_memory,
        );
        let config = Config {
            data_dir: old.data_dir.clone(),
            listen: old.listen,
            config_store: old.config_store.clone(),
            store: crate::config::StoreConfig {
                s3: old.store.s3.clone(),
                ..config.store
            },
            peers,
            ..config
        };
        self.cache.set_max_manifest_size(config.max_manifest_size);
        let routing = Routing::build(config, &self.metrics, &self.background, Some(&current))?;
        let names: Vec<String> = routing
            .upstreams()
            .iter()
            .map(|u| format!("{}={}", u.name(), u.config.url))
            .collect();
        *self.routing.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routing);
        tracing::info!(upstreams = ?names, "configuration applied");
        Ok(())
    }

    /// Flushes access times and, if the store is over a limit (or over `target` when given),
    /// evicts least recently used content.
    pub async fn collect(
        &self,
        target: Option<u64>,
    ) -> anyhow::Result<crate::store::evict::EvictReport> {
        let store = Arc::clone(&self.cache.store);
        let cfg = self.routing().config.store.clone();
        let report = tokio::task::spawn_blocking(move || {
            store.flush_access()?;
            let target = target.or_else(|| {
                crate::store::evict::target(&store, cfg.max_size, cfg.min_free, cfg.low_water)
            });
            match target {
                Some(t) => crate::store::evict::evict_to(&store, t),
                None => Ok(crate::store::evict::EvictReport::default()),
            }
        })
        .await??;
        self.metrics.evicted_bytes.inc_by(report.bytes);
        self.metrics.evicted_blobs.inc_by(report.blobs);
        Ok(report)
    }

    /// Background upkeep: recovery at start, then access-time flushes and eviction; meanwhile the
    /// probes of the peers (`[peers]`).
    pub async fn maintain(self: Arc<Self>) {
        let probes = async {
            match self.cache.peers() {
                Some(p) => Arc::clone(p).probe_forever().await,
                None => std::future::pending().await,
            }
        };
        tokio::join!(probes, Arc::clone(&self).upkeep());
    }

    async fn upkeep(self: Arc<Self>) {
        let store = Arc::clone(&self.cache.store);
        match tokio::task::spawn_blocking(move || crate::store::verify::recover(&store)).await {
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
        let now = crate::config::tls::unix_now();
        let not_after = tls.not_after();
        let expired = now > not_after;
        let newly_expired = expired && !self.tls_expired_logged.swap(true, Ordering::Relaxed);
        let last = self.tls_reminded_at.load(Ordering::Relaxed);
        if !newly_expired && now.saturating_sub(last) < 86_400 {
            return;
        }
        let cert = tls.paths().0;
        if expired {
            tracing::error!(cert = %cert.display(), not_after = %crate::config::tls::format_utc(not_after), "the TLS certificate in force has expired: clients that verify it fail; install a renewed one and reload");
        } else if let Some(w) =
            crate::config::tls::expiry_warning(cert, not_after, now, cfg.expiry_warning)
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

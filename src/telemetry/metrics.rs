//! Prometheus metrics: what regcache counts, and their text exposition for `/metrics`.
//!
//! One [`Metrics`] per server (not a global), so that several servers in one test process keep
//! separate counts.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Every metric regcache exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub cache_outcomes: Family<Labels, Counter>,
    pub bytes_served: Counter,
    /// Body bytes sent with `sendfile(2)` (part of `bytes_served`).
    pub sendfile_bytes: Counter,
    pub bytes_fetched: Family<Labels, Counter>,
    pub upstream_up: Family<Labels, Gauge>,
    pub upstream_errors: Family<Labels, Counter>,
    pub upstream_state_changes: Family<Labels, Counter>,
    /// What the upstream's last answer with rate-limit headers announced (`upstream::ratelimit`).
    pub upstream_ratelimit_limit: Family<Labels, Gauge>,
    pub upstream_ratelimit_remaining: Family<Labels, Gauge>,
    pub upstream_ratelimit_window: Family<Labels, Gauge>,
    pub fill_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    pub fills_failed: Family<Labels, Counter>,
    /// Blob bytes that fills on a full disk hold in memory.
    pub fill_memory: Gauge,
    pub store_blobs: Gauge,
    pub store_bytes: Gauge,
    pub store_free_bytes: Gauge,
    pub store_full: Gauge,
    pub evicted_bytes: Counter,
    pub evicted_blobs: Counter,
    /// Requests or connections refused by a `[limits]` bound or by access control, by `limit`.
    pub limit_rejections: Family<Labels, Counter>,
    /// bcrypt computations run to check client credentials (`[access] htpasswd`).
    pub auth_bcrypt_checks: Counter,
    pub connections_open: Gauge,
    /// Open client connections by shard (`shard`), which the shards balance.
    pub shard_connections: Family<Labels, Gauge>,
    /// With `[store.s3]` only: no sample without a bucket (see [`Metrics::set_bucket_up`]).
    pub bucket_up: Family<Labels, Gauge>,
    pub bucket_errors: Family<Labels, Counter>,
    pub bucket_read: Counter,
    pub bucket_written: Counter,
    pub bucket_pending: Gauge,
    /// `notAfter` of the listener's TLS certificate in force, by `cert` path (with `[tls]`).
    pub tls_expiry: Family<Labels, Gauge>,
    /// 1 while a peer (`peer`: its URL) is up, 0 while it is skipped after a failure.
    pub peer_up: Family<Labels, Gauge>,
    /// Blob bytes received from each peer.
    pub peer_received_bytes: Family<Labels, Counter>,
    /// Body bytes answered to peer requests.
    pub peer_sent_bytes: Counter,
    /// Requests to peers by `peer` and `result`.
    pub peer_requests: Family<Labels, Counter>,
    /// Blob answers by where their bytes came from (`source`: store, bucket, peer, upstream).
    pub fills: Family<Labels, Counter>,
    /// Time until each answer's head was ready, by `route` ([`Metrics::duration_route`]) and
    /// `outcome` (the cache outcome, `error`, or `none`).
    pub request_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// 1, labelled with the version, OS and architecture of this build.
    pub build_info: Family<Labels, Gauge>,
    /// Tag revalidations that outlived `revalidate_budget`, by `upstream` and how they ended
    /// (`result`: updated, unchanged, failed).
    pub background_revalidations: Family<Labels, Counter>,
}

fn fill_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 16))
}

/// 0.5 ms to 16 s: a hit takes well under a millisecond, a miss waits for the upstream.
fn request_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("regcache");
        let m = Metrics {
            requests: Family::default(),
            cache_outcomes: Family::default(),
            bytes_served: Counter::default(),
            sendfile_bytes: Counter::default(),
            bytes_fetched: Family::default(),
            upstream_up: Family::default(),
            upstream_errors: Family::default(),
            upstream_state_changes: Family::default(),
            upstream_ratelimit_limit: Family::default(),
            upstream_ratelimit_remaining: Family::default(),
            upstream_ratelimit_window: Family::default(),
            fill_seconds: Family::new_with_constructor(fill_histogram as fn() -> Histogram),
            fills_failed: Family::default(),
            fill_memory: Gauge::default(),
            store_blobs: Gauge::default(),
            store_bytes: Gauge::default(),
            store_free_bytes: Gauge::default(),
            store_full: Gauge::default(),
            evicted_bytes: Counter::default(),
            evicted_blobs: Counter::default(),
            limit_rejections: Family::default(),
            auth_bcrypt_checks: Counter::default(),
            connections_open: Gauge::default(),
            shard_connections: Family::default(),
            bucket_up: Family::default(),
            bucket_errors: Family::default(),
            bucket_read: Counter::default(),
            bucket_written: Counter::default(),
            bucket_pending: Gauge::default(),
            tls_expiry: Family::default(),
            peer_up: Family::default(),
            peer_received_bytes: Family::default(),
            peer_sent_bytes: Counter::default(),
            peer_requests: Family::default(),
            fills: Family::default(),
            request_duration: Family::new_with_constructor(request_histogram as fn() -> Histogram),
            build_info: Family::default(),
            background_revalidations: Family::default(),
            registry: Registry::default(),
        };
        m.build_info
            .get_or_create(&vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("os", std::env::consts::OS.to_owned()),
                ("arch", std::env::consts::ARCH.to_owned()),
            ])
            .set(1);
        registry.register(
            "requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            "cache_outcomes",
            "Answers by cache outcome (hit, revalidated, miss, coalesced, stale, passthrough)",
            m.cache_outcomes.clone(),
        );
        registry.register(
            "served_bytes",
            "Body bytes sent to clients",
            m.bytes_served.clone(),
        );
        registry.register(
            "sendfile_bytes",
            "Body bytes sent with sendfile(2), straight from the page cache (part of served_bytes)",
            m.sendfile_bytes.clone(),
        );
        registry.register(
            "upstream_fetched_bytes",
            "Blob bytes received from upstreams",
            m.bytes_fetched.clone(),
        );
        registry.register(
            "upstream_up",
            "1 while the upstream's circuit is closed (reachable), 0 while it is marked down",
            m.upstream_up.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by kind (unreachable, timeout, status, invalid)",
            m.upstream_errors.clone(),
        );
        registry.register(
            "upstream_state_changes",
            "Circuit breaker transitions by new state (down, up)",
            m.upstream_state_changes.clone(),
        );
        registry.register(
            "upstream_ratelimit_limit",
            "Pulls the upstream allows per window, as its last answer with a ratelimit-limit \
             header said",
            m.upstream_ratelimit_limit.clone(),
        );
        registry.register(
            "upstream_ratelimit_remaining",
            "Pulls left in the upstream's window, as its last answer with a ratelimit-remaining \
             header said",
            m.upstream_ratelimit_remaining.clone(),
        );
        registry.register(
            "upstream_ratelimit_window_seconds",
            "Length of the upstream's rate-limit window (w=), as its last answer announced it",
            m.upstream_ratelimit_window.clone(),
        );
        registry.register(
            "fill_duration_seconds",
            "Time to fetch, verify and commit one blob",
            m.fill_seconds.clone(),
        );
        registry.register(
            "fills_failed",
            "Blob fills that failed, by reason",
            m.fills_failed.clone(),
        );
        registry.register(
            "fill_memory_bytes",
            "Blob bytes held in memory by fills on a full disk (limits.fill_memory bounds what is \
             kept for later clients to join)",
            m.fill_memory.clone(),
        );
        registry.register(
            "store_blobs",
            "Blobs recorded in the store",
            m.store_blobs.clone(),
        );
        registry.register(
            "store_size_bytes",
            "Bytes of blobs recorded in the store",
            m.store_bytes.clone(),
        );
        registry.register(
            "store_free_bytes",
            "Free bytes on the store's filesystem",
            m.store_free_bytes.clone(),
        );
        registry.register(
            "store_full",
            "1 while the store's filesystem is full (blobs are served without caching)",
            m.store_full.clone(),
        );
        registry.register(
            "evicted_bytes",
            "Bytes evicted from the store",
            m.evicted_bytes.clone(),
        );
        registry.register(
            "evicted_blobs",
            "Blobs evicted from the store",
            m.evicted_blobs.clone(),
        );
        registry.register(
            "limit_rejections",
            "Connections and requests refused by a limit or access control, by limit \
             (max_connections, max_uri_length, max_fills, access_allow, auth, auth_rate)",
            m.limit_rejections.clone(),
        );
        registry.register(
            "auth_bcrypt_checks",
            "bcrypt computations run to check client credentials (answers remembered or refused \
             by the failure limits cost none)",
            m.auth_bcrypt_checks.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open now",
            m.connections_open.clone(),
        );
        registry.register(
            "shard_connections",
            "Client connections open now, by shard (a new connection goes to the least loaded)",
            m.shard_connections.clone(),
        );
        registry.register(
            "bucket_up",
            "1 while the shared bucket ([store.s3]) is in use, 0 while it is skipped after a failure",
            m.bucket_up.clone(),
        );
        registry.register(
            "bucket_errors",
            "Failed requests to the shared bucket, by operation",
            m.bucket_errors.clone(),
        );
        registry.register(
            "bucket_read_bytes",
            "Bytes read from the shared bucket",
            m.bucket_read.clone(),
        );
        registry.register(
            "bucket_written_bytes",
            "Bytes written to the shared bucket",
            m.bucket_written.clone(),
        );
        registry.register(
            "bucket_pending_writes",
            "Writes (blobs, manifests, tag records) waiting for the shared bucket to answer again",
            m.bucket_pending.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "End of validity (notAfter) of the TLS certificate in force, in seconds since the \
             Unix epoch, by certificate file",
            m.tls_expiry.clone(),
        );
        registry.register(
            "peer_up",
            "1 while the peer ([peers]) is up, 0 while it is skipped after a failure until a probe \
             finds it",
            m.peer_up.clone(),
        );
        registry.register(
            "peer_received_bytes",
            "Blob bytes received from each peer",
            m.peer_received_bytes.clone(),
        );
        registry.register(
            "peer_sent_bytes",
            "Body bytes answered to peer requests",
            m.peer_sent_bytes.clone(),
        );
        registry.register(
            "peer_requests",
            "Requests to peers by result (ok, not_found, status, timeout, unreachable, refused, self)",
            m.peer_requests.clone(),
        );
        registry.register(
            "fills",
            "Blob answers by where their bytes came from: store (a hit), or a fill from the bucket, \
             a peer or the upstream",
            m.fills.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time until an answer's head was ready (not its body's transfer), by route (manifest, \
             blob, tags, catalog, referrers, other) and outcome (the cache outcome, error, none)",
            m.request_duration.clone(),
        );
        registry.register(
            "build_info",
            "1, labelled with the version, OS and architecture of this build",
            m.build_info.clone(),
        );
        registry.register(
            "background_revalidations",
            "Tag revalidations that outlived revalidate_budget (the request was served stale) and \
             went on in the background, by how they ended: updated (the tag moved; the new \
             manifest is stored), unchanged, failed",
            m.background_revalidations.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Sets `regcache_bucket_up`, which has a sample only once a bucket set it: without
    /// `[store.s3]` there is no bucket to be down, and a 0 would say there was.
    pub fn set_bucket_up(&self, up: bool) {
        self.bucket_up.get_or_create(&Vec::new()).set(i64::from(up));
    }

    /// Creates the series of `family` with `label` = each of `values` (at 0 when new), so that
    /// they are exported before their first count.
    pub fn at_zero<M: prometheus_client::metrics::TypedMetric + Default>(
        family: &Family<Labels, M>,
        label: &'static str,
        values: &[&str],
    ) {
        for v in values {
            drop(family.get_or_create(&vec![(label, (*v).to_owned())]));
        }
    }

    /// The `route` label of `request_duration_seconds` for a request's route label: the
    /// registry's endpoints by name, everything else `other`.
    pub fn duration_route(route: &str) -> &'static str {
        match route {
            "manifest" => "manifest",
            "blob" => "blob",
            "tags" => "tags",
            "catalog" => "catalog",
            "referrers" => "referrers",
            _ => "other",
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn upstream(name: &str) -> Labels {
        vec![("upstream", name.to_owned())]
    }

    pub fn peer(url: &str) -> Labels {
        vec![("peer", url.to_owned())]
    }
}

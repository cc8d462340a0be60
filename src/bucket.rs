//! The shared tier: an S3-compatible bucket that several regcache servers fill and read.
//!
//! Layout below the configured prefix (every object is content-addressed or a small record):
//! - `blobs/sha256/<hex>`: blob bytes, uploaded only after the digest was verified and the blob
//!   committed to the local store; one PUT (or one completed multipart upload) makes it visible
//!   whole, so a server killed mid-upload leaves nothing under the final key;
//! - `manifests/sha256/<hex>`: manifest bytes, `Content-Type` = the manifest's media type;
//! - `repos/<upstream-id>/<repo>/_manifests/sha256/<hex>` and `…/_layers/sha256/<hex>`: empty, the
//!   manifest or blob belongs to that repository (the bucket equivalent of the store's links);
//! - `repos/<upstream-id>/<repo>/_tags/<tag>`: `{"digest", "checked_at_ms"}`, so freshness is
//!   shared: a tag one server confirmed is fresh for all of them.
//!
//! `upstream-id` is the upstream URL's `host[:port][/path]`, so that servers naming the same
//! upstream differently still share its tags. Every call is bounded by `timeout`; after a failure
//! the bucket is skipped for [`DOWN_FOR`] and the servers carry on with their local tier and the
//! upstream. Requests are sent on the runtime given to [`Bucket::new`] (the server's background
//! runtime), so that the pooled connections live there and not on a shard ([`OnRuntime`]).

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore,
    PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};

use crate::config::S3Config;
use crate::oci::reference::{Digest, RepoName, Tag};
use crate::runtime::on_runtime;
use crate::telemetry::metrics::Metrics;

/// How long the bucket is left alone after a request to it failed.
pub const DOWN_FOR: Duration = Duration::from_secs(10);
/// Blobs up to this size are uploaded with one conditional PUT; larger ones in parts this size.
const PART: usize = 16 << 20;
/// Writes to the bucket running at once (an upload holds at most two parts in memory).
const UPLOADS: usize = 4;
/// The most a tag record may weigh (it is a digest and a time).
const MAX_TAG_RECORD: u64 = 4096;

/// Why the bucket could not answer.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("bucket skipped: it failed {0} s ago")]
    Skipped(u64),
    #[error("bucket request timed out ({0:?})")]
    Timeout(Duration),
    #[error("bucket: {0}")]
    Store(#[from] object_store::Error),
    /// A key object_store refuses (the configured prefix and one of the layout's keys).
    #[error("bucket: key {key:?}: {source}")]
    Key {
        key: String,
        #[source]
        source: object_store::path::Error,
    },
    /// An object larger than such an object may be: refused before its body was read.
    #[error("bucket: {key}: larger than the {max} bytes such an object may have")]
    Oversized { key: String, max: u64 },
    /// A failure on this server, not in the bucket: reading the blob to upload, encoding a tag
    /// record, …
    #[error("bucket: {what}: {source}")]
    Local {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A tag record as the bucket holds it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SharedTag {
    pub digest: String,
    pub checked_at_ms: u64,
}

/// A blob download from the bucket.
pub struct BucketBlob {
    pub size: u64,
    pub stream: BoxStream<'static, object_store::Result<Bytes>>,
}

pub struct Bucket {
    s3: Arc<AmazonS3>,
    prefix: String,
    timeout: Duration,
    redirect: Option<Duration>,
    /// The origin of `down_until`: a monotonic clock, so that a step of the wall clock neither
    /// ends nor extends a skip.
    epoch: Instant,
    /// Milliseconds since `epoch` until which the bucket is skipped (0: in use).
    down_until: AtomicU64,
    uploads: Arc<tokio::sync::Semaphore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// A bucket answer, or `T::default()` (not held, not linked) when the bucket could not answer:
/// the caller then goes on without it (the local tier and the upstream).
pub fn or_without<T: Default>(r: Result<T, BucketError>, what: &'static str) -> T {
    r.unwrap_or_else(|e| {
        tracing::debug!(what, error = %e, "going on without the bucket");
        T::default()
    })
}

/// The bucket's name for an upstream: its URL's `host[:port][/path]`.
pub fn upstream_id(url: &reqwest::Url) -> String {
    let mut id = url.host_str().unwrap_or("upstream").to_owned();
    if let Some(port) = url.port() {
        id.push_str(&format!(":{port}"));
    }
    let path = url.path().trim_matches('/');
    if !path.is_empty() {
        id.push('/');
        id.push_str(path);
    }
    id
}

/// The bucket's HTTP client: object_store's own reqwest client, each request sent as a task of
/// `runtime` ([`on_runtime`]), so that its pooled connections live on the background runtime, not
/// on the shard of the request that opened them. (object_store's `SpawnedReqwestConnector` does
/// the same but copies each body through an unbounded channel, as fast as the bucket sends it: a
/// fill waiting for its slowest reader would then hold a whole blob in memory. Here the body is
/// read through the connection task's own bounded channel.)
#[derive(Debug)]
struct OnRuntime {
    runtime: tokio::runtime::Handle,
}

impl HttpConnector for OnRuntime {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Spawned {
            client: ReqwestConnector::default().connect(options)?,
            runtime: self.runtime.clone(),
        }))
    }
}

#[derive(Debug)]
struct Spawned {
    client: HttpClient,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpService for Spawned {
    /// Sends `req` as a task of the runtime ([`on_runtime`]), aborted when the caller gives up.
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let client = self.client.clone();
        on_runtime(&self.runtime, async move { client.execute(req).await })
            .await
            .unwrap_or_else(|stopped| Err(HttpError::new(HttpErrorKind::Interrupted, stopped)))
    }
}

impl Bucket {
    /// Builds the client, sending its requests on `runtime`; contacts nothing.
    pub fn new(
        cfg: &S3Config,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Bucket> {
        let mut options = ClientOptions::new()
            .with_connect_timeout(cfg.timeout)
            // Whole-request deadlines would cut long blob downloads: each call is bounded by
            // `timeout` here instead, and a download per chunk.
            .with_timeout_disabled()
            .with_pool_idle_timeout(Duration::from_secs(60));
        if cfg.endpoint.as_ref().is_some_and(|u| u.scheme() == "http") {
            options = options.with_allow_http(true);
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_virtual_hosted_style_request(cfg.virtual_hosted_style)
            .with_client_options(options)
            .with_http_connector(OnRuntime { runtime })
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_millis(500),
                    base: 2.0,
                },
                max_retries: 2,
                retry_timeout: cfg.timeout,
            });
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e.as_str().trim_end_matches('/'));
        }
        if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let s3 = b.build().map_err(|e| anyhow::anyhow!("[store.s3]: {e}"))?;
        if !cfg.prefix.is_empty() {
            Path::parse(&cfg.prefix)
                .map_err(|e| anyhow::anyhow!("store.s3.prefix {:?}: {e}", cfg.prefix))?;
        }
        metrics.set_bucket_up(true);
        Ok(Bucket {
            s3: Arc::new(s3),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            redirect: cfg.redirect.then_some(cfg.redirect_ttl),
            epoch: Instant::now(),
            down_until: AtomicU64::new(0),
            uploads: Arc::new(tokio::sync::Semaphore::new(UPLOADS)),
            metrics,
        })
    }

    /// Whether GETs of blobs the bucket holds are answered with a presigned URL.
    pub fn redirects(&self) -> bool {
        self.redirect.is_some()
    }

    /// Milliseconds since the bucket was built, on the monotonic clock.
    fn clock_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the bucket is in use (not skipped after a failure).
    pub fn is_up(&self) -> bool {
        self.down_until.load(Ordering::Relaxed) <= self.clock_ms()
    }

    fn path(&self, key: &str) -> Result<Path, BucketError> {
        let full = if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        };
        Path::parse(&full).map_err(|source| BucketError::Key { key: full, source })
    }

    fn blob_key(d: &Digest) -> String {
        format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())
    }

    fn manifest_key(d: &Digest) -> String {
        format!("manifests/{}/{}", d.algorithm().as_str(), d.hex())
    }

    fn link_key(upstream: &str, repo: &RepoName, d: &Digest) -> String {
        format!(
            "repos/{upstream}/{repo}/_manifests/{}/{}",
            d.algorithm().as_str(),
            d.hex()
        )
    }

    fn blob_link_key(upstream: &str, repo: &RepoName, d: &Digest) -> String {
        format!(
            "repos/{upstream}/{repo}/_layers/{}/{}",
            d.algorithm().as_str(),
            d.hex()
        )
    }

    fn tag_key(upstream: &str, repo: &RepoName, tag: &Tag) -> String {
        format!("repos/{upstream}/{repo}/_tags/{tag}")
    }

    /// Runs one bucket call: skipped while the bucket is down, bounded by the timeout, and a
    /// failure (other than "not found" and "already exists") marks the bucket down.
    async fn call<T, F>(&self, op: &'static str, f: F) -> Result<T, BucketError>
    where
        F: std::future::Future<Output = object_store::Result<T>>,
    {
        self.call_within(op, self.timeout, f).await
    }

    /// [`Bucket::call`] with its own deadline (uploads get time in proportion to their size).
    async fn call_within<T, F>(
        &self,
        op: &'static str,
        deadline: Duration,
        f: F,
    ) -> Result<T, BucketError>
    where
        F: std::future::Future<Output = object_store::Result<T>>,
    {
        let until = self.down_until.load(Ordering::Relaxed);
        let now = self.clock_ms();
        if until > now {
            return Err(BucketError::Skipped(
                (DOWN_FOR.as_millis() as u64).saturating_sub(until - now) / 1000,
            ));
        }
        let result = match tokio::time::timeout(deadline, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e @ object_store::Error::NotFound { .. }))
            | Ok(Err(e @ object_store::Error::AlreadyExists { .. })) => return Err(e.into()),
            Ok(Err(e)) => Err(BucketError::from(e)),
            Err(_) => Err(BucketError::Timeout(deadline)),
        };
        match &result {
            Ok(_) => {
                if self.down_until.swap(0, Ordering::Relaxed) != 0 {
                    tracing::info!("bucket reachable again");
                }
                self.metrics.set_bucket_up(true);
            }
            Err(e) => self.failed(op, e),
        }
        result
    }

    /// Records a failed bucket request: the bucket is skipped for [`DOWN_FOR`].
    pub fn failed(&self, op: &'static str, e: &dyn std::fmt::Display) {
        let now = self.clock_ms();
        let was = self
            .down_until
            .swap(now + DOWN_FOR.as_millis() as u64, Ordering::Relaxed);
        if was <= now {
            tracing::warn!(op, error = %e, skip_for = ?DOWN_FOR, "bucket request failed: using the local tier and the upstream only");
        }
        self.metrics.set_bucket_up(false);
        self.metrics
            .bucket_errors
            .get_or_create(&vec![("op", op.to_owned())])
            .inc();
    }

    /// Counts an object that failed verification (`bucket_errors_total{op="verify"}`).
    pub fn corrupt(&self) {
        self.metrics
            .bucket_errors
            .get_or_create(&vec![("op", "verify".to_owned())])
            .inc();
    }

    /// A small object whole (`None` when absent); one larger than `max` bytes is refused
    /// before its body is read.
    async fn get_small(
        &self,
        op: &'static str,
        key: &str,
        max: u64,
    ) -> Result<Option<(Attributes, Bytes)>, BucketError> {
        let path = self.path(key)?;
        let s3 = Arc::clone(&self.s3);
        let r = self
            .call(op, async move {
                let r = s3.get(&path).await?;
                if r.meta.size > max {
                    return Ok(None);
                }
                let attributes = r.attributes.clone();
                Ok(Some((attributes, r.bytes().await?)))
            })
            .await;
        match r {
            Ok(Some((a, b))) => {
                self.metrics.bucket_read.inc_by(b.len() as u64);
                Ok(Some((a, b)))
            }
            Ok(None) => {
                self.corrupt();
                Err(BucketError::Oversized {
                    key: key.to_owned(),
                    max,
                })
            }
            Err(BucketError::Store(object_store::Error::NotFound { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put_small(
        &self,
        op: &'static str,
        key: &str,
        bytes: Bytes,
        opts: PutOptions,
    ) -> Result<(), BucketError> {
        let path = self.path(key)?;
        let len = bytes.len() as u64;
        let s3 = Arc::clone(&self.s3);
        let deadline = self.upload_time(len);
        match self
            .call_within(op, deadline, async move {
                s3.put_opts(&path, PutPayload::from(bytes), opts).await
            })
            .await
        {
            Ok(_) => {
                self.metrics.bucket_written.inc_by(len);
                Ok(())
            }
            Err(BucketError::Store(object_store::Error::AlreadyExists { .. })) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The size of the blob if the bucket holds it.
    pub async fn head_blob(&self, d: &Digest) -> Result<Option<u64>, BucketError> {
        let path = self.path(&Self::blob_key(d))?;
        let s3 = Arc::clone(&self.s3);
        match self.call("head", async move { s3.head(&path).await }).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(BucketError::Store(object_store::Error::NotFound { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts a download of the blob from `offset`; `None` if the bucket does not hold it.
    pub async fn get_blob(
        &self,
        d: &Digest,
        offset: u64,
    ) -> Result<Option<BucketBlob>, BucketError> {
        let path = self.path(&Self::blob_key(d))?;
        let s3 = Arc::clone(&self.s3);
        let opts = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            ..GetOptions::default()
        };
        match self
            .call("get", async move { s3.get_opts(&path, opts).await })
            .await
        {
            Ok(r) => {
                let size = r.meta.size;
                let metrics = Arc::clone(&self.metrics);
                let stream = r
                    .into_stream()
                    .inspect_ok(move |b| {
                        metrics.bucket_read.inc_by(b.len() as u64);
                    })
                    .boxed();
                Ok(Some(BucketBlob { size, stream }))
            }
            Err(BucketError::Store(object_store::Error::NotFound { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A presigned URL for a blob the bucket holds (`None`: redirects are off, or it does not).
    pub async fn blob_url(&self, d: &Digest) -> Result<Option<reqwest::Url>, BucketError> {
        let Some(ttl) = self.redirect else {
            return Ok(None);
        };
        if self.head_blob(d).await?.is_none() {
            return Ok(None);
        }
        let path = self.path(&Self::blob_key(d))?;
        let s3 = Arc::clone(&self.s3);
        let url = self
            .call("sign", async move {
                s3.signed_url(http::Method::GET, &path, ttl).await
            })
            .await?;
        Ok(Some(url))
    }

    /// Time allowed to write `bytes`: `timeout`, plus a second per MiB (the upload must keep
    /// at least 1 MiB/s).
    fn upload_time(&self, bytes: u64) -> Duration {
        self.timeout + Duration::from_secs(bytes >> 20)
    }

    /// Waits for one of the [`UPLOADS`] upload slots.
    pub async fn upload_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, BucketError> {
        Arc::clone(&self.uploads)
            .acquire_owned()
            .await
            .map_err(|e| BucketError::Local {
                what: "upload slots",
                source: Box::new(e),
            })
    }

    /// Uploads a verified blob from `file` (`size` bytes) unless the bucket already holds it
    /// (`replace`: even then, over a copy that failed verification). The object appears under
    /// its final key only once complete. The caller holds an [`Bucket::upload_slot`].
    pub async fn put_blob(
        &self,
        d: &Digest,
        file: File,
        size: u64,
        replace: bool,
    ) -> Result<(), BucketError> {
        if !replace && self.head_blob(d).await?.is_some() {
            return Ok(());
        }
        let key = Self::blob_key(d);
        let file = Arc::new(std::sync::Mutex::new(file));
        if size <= PART as u64 {
            let bytes = read_part(&file, size as usize).await?;
            let mode = if replace {
                PutMode::Overwrite
            } else {
                PutMode::Create
            };
            return self
                .put_small(
                    "put",
                    &key,
                    bytes,
                    PutOptions {
                        mode,
                        ..PutOptions::default()
                    },
                )
                .await;
        }
        let part_time = self.upload_time(PART as u64);
        let path = self.path(&key)?;
        let s3 = Arc::clone(&self.s3);
        let upload = self
            .call("put", async move { s3.put_multipart(&path).await })
            .await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut left = size;
        while left > 0 {
            let n = left.min(PART as u64) as usize;
            let part = match read_part(&file, n).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tokio::time::timeout(self.timeout, writer.abort()).await;
                    return Err(e);
                }
            };
            let waited = tokio::time::timeout(part_time, writer.wait_for_capacity(1)).await;
            match waited {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.failed("put", &e);
                    return Err(e.into());
                }
                Err(_) => {
                    let e = BucketError::Timeout(part_time);
                    self.failed("put", &e);
                    // Bounded too: the bucket is hanging. Parts left behind are invisible.
                    let _ = tokio::time::timeout(self.timeout, writer.abort()).await;
                    return Err(e);
                }
            }
            writer.put(part);
            left -= n as u64;
        }
        match tokio::time::timeout(part_time, writer.finish()).await {
            Ok(Ok(_)) => {
                self.metrics.bucket_written.inc_by(size);
                Ok(())
            }
            Ok(Err(e)) => {
                self.failed("put", &e);
                Err(e.into())
            }
            Err(_) => {
                let e = BucketError::Timeout(part_time);
                self.failed("put", &e);
                Err(e)
            }
        }
    }

    /// A manifest's media type and bytes, if the bucket holds them (the caller verifies them).
    pub async fn manifest(
        &self,
        d: &Digest,
        max: u64,
    ) -> Result<Option<(Option<String>, Bytes)>, BucketError> {
        Ok(self
            .get_small("get", &Self::manifest_key(d), max)
            .await?
            .map(|(a, b)| {
                let mt = a.get(&Attribute::ContentType).map(|v| v.to_string());
                (mt, b)
            }))
    }

    /// Whether the manifest `d` belongs to `repo` of the upstream `upstream` (an id).
    pub async fn is_linked(
        &self,
        upstream: &str,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<bool, BucketError> {
        self.exists(&Self::link_key(upstream, repo, d)).await
    }

    /// Whether an object exists under `key` (one `HEAD`).
    async fn exists(&self, key: &str) -> Result<bool, BucketError> {
        let path = self.path(key)?;
        let s3 = Arc::clone(&self.s3);
        match self.call("head", async move { s3.head(&path).await }).await {
            Ok(_) => Ok(true),
            Err(BucketError::Store(object_store::Error::NotFound { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Records that blob `d` belongs to `repo`: the upstream gave or confirmed it for that
    /// repository, so any server may serve it for the repository from the bucket.
    pub async fn put_blob_link(
        &self,
        upstream: &str,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<(), BucketError> {
        self.put_small(
            "put",
            &Self::blob_link_key(upstream, repo, d),
            Bytes::new(),
            PutOptions::default(),
        )
        .await
    }

    /// Whether the bucket links blob `d` to `repo`.
    pub async fn is_blob_linked(
        &self,
        upstream: &str,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<bool, BucketError> {
        self.exists(&Self::blob_link_key(upstream, repo, d)).await
    }

    /// Publishes a verified manifest of `repo` (and the tag pointing at it, confirmed now).
    pub async fn put_manifest(
        &self,
        upstream: &str,
        repo: &RepoName,
        d: &Digest,
        media_type: &str,
        bytes: Bytes,
        tag: Option<(&Tag, u64)>,
    ) -> Result<(), BucketError> {
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, media_type.to_owned().into());
        self.put_small(
            "put",
            &Self::manifest_key(d),
            bytes,
            PutOptions {
                mode: PutMode::Create,
                attributes,
                ..PutOptions::default()
            },
        )
        .await?;
        self.put_small(
            "put",
            &Self::link_key(upstream, repo, d),
            Bytes::new(),
            PutOptions::default(),
        )
        .await?;
        if let Some((tag, checked_at_ms)) = tag {
            self.put_tag(upstream, repo, tag, d, checked_at_ms).await?;
        }
        Ok(())
    }

    /// The tag record of `repo:tag`, if any.
    pub async fn tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<SharedTag>, BucketError> {
        let Some((_, bytes)) = self
            .get_small("get", &Self::tag_key(upstream, repo, tag), MAX_TAG_RECORD)
            .await?
        else {
            return Ok(None);
        };
        match serde_json::from_slice::<SharedTag>(&bytes) {
            Ok(mut t) if t.digest.parse::<Digest>().is_ok() => {
                // A server whose clock runs ahead must not make a tag fresh for longer.
                t.checked_at_ms = t.checked_at_ms.min(wall_clock_ms());
                Ok(Some(t))
            }
            _ => {
                tracing::warn!(upstream, repo = %repo, tag = %tag, "ignoring a malformed tag record in the bucket");
                Ok(None)
            }
        }
    }

    /// Records that the upstream confirmed `repo:tag` → `d` at `checked_at_ms`.
    pub async fn put_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        d: &Digest,
        checked_at_ms: u64,
    ) -> Result<(), BucketError> {
        // Never replace a newer confirmation (another server's, or a retry arriving late). The
        // record's time was capped at our clock when read, so one written by a server whose
        // clock runs ahead is replaced by the next confirmation.
        if let Some(current) = self.tag(upstream, repo, tag).await? {
            if current.checked_at_ms > checked_at_ms
                || (current.checked_at_ms == checked_at_ms && current.digest == d.to_string())
            {
                return Ok(());
            }
        }
        let rec = SharedTag {
            digest: d.to_string(),
            checked_at_ms,
        };
        let body = serde_json::to_vec(&rec).map_err(|e| BucketError::Local {
            what: "tag record",
            source: Box::new(e),
        })?;
        self.put_small(
            "put",
            &Self::tag_key(upstream, repo, tag),
            Bytes::from(body),
            PutOptions::default(),
        )
        .await
    }
}

/// Milliseconds since the Unix epoch: the clock of tag records (`checked_at_ms`), shared by the
/// servers of a bucket. The store's `now_millis` reads the same clock; it is not used here
/// because a tier uses no other tier.
fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads the next `n` bytes of `file` on the blocking pool.
async fn read_part(file: &Arc<std::sync::Mutex<File>>, n: usize) -> Result<Bytes, BucketError> {
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; n];
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        f.read_exact(&mut buf).map_err(|e| BucketError::Local {
            what: "reading the blob to upload",
            source: Box::new(e),
        })?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|e| BucketError::Local {
        what: "read task",
        source: Box::new(e),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_ids_name_host_port_and_path() {
        let id = |u: &str| upstream_id(&reqwest::Url::parse(u).expect("url"));
        assert_eq!(id("https://registry-1.docker.io"), "registry-1.docker.io");
        assert_eq!(id("http://127.0.0.1:5000/"), "127.0.0.1:5000");
        assert_eq!(
            id("https://ghcr.io:443"),
            "ghcr.io",
            "default ports are not part of it"
        );
        assert_eq!(id("https://h.example/mirror/"), "h.example/mirror");
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        let d: Digest = format!("sha256:{}", "ab".repeat(32))
            .parse()
            .expect("digest");
        let repo: RepoName = "library/alpine".parse().expect("repo");
        let tag: Tag = "3.20".parse().expect("tag");
        assert_eq!(
            Bucket::blob_key(&d),
            format!("blobs/sha256/{}", "ab".repeat(32))
        );
        assert_eq!(
            Bucket::manifest_key(&d),
            format!("manifests/sha256/{}", "ab".repeat(32))
        );
        assert_eq!(
            Bucket::link_key("127.0.0.1:5000", &repo, &d),
            format!(
                "repos/127.0.0.1:5000/library/alpine/_manifests/sha256/{}",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            Bucket::tag_key("127.0.0.1:5000", &repo, &tag),
            "repos/127.0.0.1:5000/library/alpine/_tags/3.20"
        );
        for k in [Bucket::blob_key(&d), Bucket::tag_key("h:1", &repo, &tag)] {
            assert!(Path::parse(&k).is_ok(), "{k} is a valid object key");
        }
    }
}

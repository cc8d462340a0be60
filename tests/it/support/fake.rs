//! In-process fake upstream OCI registry (pull side) with switches for faults a real registry cannot show.
//!
//! The fake binds `127.0.0.1:0`, serves HTTP/1.1 on a tokio task until the [`FakeUpstream`] is dropped,
//! and records every request so tests can count upstream traffic and inspect headers. Modelled on the
//! idea of rust-oci-client's `tests/digest_validation.rs`: a tiny server on port 0 with misbehaviour
//! switches and hit counters.
//!
//! Routes:
//! - `GET|HEAD /v2/` — `200 {}` with `Docker-Distribution-API-Version: registry/2.0`.
//! - `GET|HEAD /v2/<name>/manifests/<tag|digest>` — stored media type, `Docker-Content-Digest`. A
//!   Docker manifest list asked for by tag without the list type in `Accept` is answered with its
//!   linux/amd64 child, as distribution does. [`FakeUpstream::set_answer_delay`] makes every
//!   manifest answer wait; [`FakeUpstream::manifest_answers`] counts those sent.
//! - `GET|HEAD /v2/<name>/blobs/<digest>` — octet-stream, single `Range` supported (206 / 416).
//!   With [`FakeUpstream::set_head_without_length`], manifest and blob `HEAD`s carry no
//!   `Content-Length`.
//! - `GET /v2/<name>/tags/list[?n=&last=]` — paginated with a `Link: <...>; rel="next"` header.
//! - `GET /token?service=..&scope=..` — bearer token issuer (when token auth is on); it can be made
//!   to fail with [`FakeUpstream::set_token_answer`].
//! - `GET|HEAD /redirected/<digest>` — "blob storage" target of [`FakeUpstream::set_blob_redirect`];
//!   serves the blob from any repository of this fake, with no authentication.
//!
//! With [`FakeUpstream::set_ratelimit`], every `/v2/` answer carries Docker Hub's rate-limit headers
//! and manifest `GET`s spend its quota; [`FakeUpstream::set_retry_after`] sets the forced 429s'
//! `Retry-After`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::media::{DOCKER_LIST, OCI_MANIFEST};

/// Size of the pieces blob bodies are streamed in when trickling is off.
const STREAM_CHUNK: usize = 64 * 1024;
/// `service` in bearer challenges and expected on `/token`.
pub const SERVICE: &str = "fake-registry";
/// Media type [`FakeUpstream::add_image`] uses for its config blob.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type [`FakeUpstream::add_image`] uses for its (uncompressed tar) layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// Header names are lowercase; values that are not UTF-8 are converted lossily.
    pub headers: Vec<(String, String)>,
}

impl RequestRecord {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// How the fake's token service answers (see [`FakeUpstream::set_token_answer`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TokenAnswer {
    /// A token for the scopes asked for (after the Basic check, when one is set).
    #[default]
    Token,
    /// This status, with an OCI error body.
    Status(u16),
    /// `200` with a JSON object that holds no token.
    NoToken,
    /// `200` with a body that is not JSON.
    Garbage,
    /// Reads the request and never answers (the connection is held open).
    Stall,
}

/// A fake upstream registry; stops serving (and cuts all its connections) when dropped.
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

impl FakeUpstream {
    /// Binds `127.0.0.1:0` and serves on a tokio task until dropped.
    pub async fn start() -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake upstream: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake upstream: local_addr of bound listener");
        let state = Arc::new(State::new(addr));
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        FakeUpstream { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT` (what goes in an image reference).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Stores a blob in `repo` (blobs are per repository); returns `sha256:<hex>`.
    pub fn add_blob(&self, repo: &str, data: Bytes) -> String {
        let digest = sha256_digest(&data);
        lock(&self.state.store)
            .repos
            .entry(repo.to_string())
            .or_default()
            .blobs
            .insert(digest.clone(), data);
        digest
    }

    /// Removes a blob from `repo`; returns whether it was there.
    pub fn remove_blob(&self, repo: &str, digest: &str) -> bool {
        lock(&self.state.store)
            .repos
            .get_mut(repo)
            .map(|r| r.blobs.remove(digest).is_some())
            .unwrap_or(false)
    }

    /// Stores a manifest by digest and, if given, points `tag` at it; returns the digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        body: Bytes,
    ) -> String {
        let digest = sha256_digest(&body);
        let mut store = lock(&self.state.store);
        let r = store.repos.entry(repo.to_string()).or_default();
        r.manifests
            .insert(digest.clone(), (media_type.to_string(), body));
        if let Some(tag) = tag {
            r.tags.insert(tag.to_string(), digest.clone());
        }
        digest
    }

    /// Points `tag` at an already stored manifest digest (simulates a tag moving upstream).
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        let mut store = lock(&self.state.store);
        let r = store.repos.entry(repo.to_string()).or_default();
        assert!(
            r.manifests.contains_key(digest),
            "fake upstream: set_tag({repo}:{tag}) to unknown manifest {digest}"
        );
        r.tags.insert(tag.to_string(), digest.to_string());
    }

    /// Removes a tag (the manifest stays reachable by digest); returns whether it existed.
    pub fn remove_tag(&self, repo: &str, tag: &str) -> bool {
        lock(&self.state.store)
            .repos
            .get_mut(repo)
            .map(|r| r.tags.remove(tag).is_some())
            .unwrap_or(false)
    }

    /// Removes a manifest by digest, and every tag pointing at it; returns whether it existed.
    pub fn remove_manifest(&self, repo: &str, digest: &str) -> bool {
        let mut store = lock(&self.state.store);
        let Some(r) = store.repos.get_mut(repo) else {
            return false;
        };
        r.tags.retain(|_, d| d != digest);
        r.manifests.remove(digest).is_some()
    }

    /// Convenience: an OCI image with a config blob and one uncompressed-tar layer, tagged `tag`.
    /// Returns `(manifest digest, layer digest)`.
    pub fn add_image(&self, repo: &str, tag: &str, layer: Bytes) -> (String, String) {
        let layer_len = layer.len();
        let layer_digest = self.add_blob(repo, layer);
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        });
        let config =
            Bytes::from(serde_json::to_vec(&config).expect("fake upstream: serialize config"));
        let config_len = config.len();
        let config_digest = self.add_blob(repo, config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config_len },
            "layers": [ { "mediaType": OCI_LAYER_TAR, "digest": layer_digest, "size": layer_len } ],
        });
        let manifest =
            Bytes::from(serde_json::to_vec(&manifest).expect("fake upstream: serialize manifest"));
        let manifest_digest = self.add_manifest(repo, Some(tag), OCI_MANIFEST, manifest);
        (manifest_digest, layer_digest)
    }

    // ---- behaviour switches -------------------------------------------------------------------

    /// Registry endpoints require `Authorization: Bearer <token>` issued by `GET /token` for the
    /// repository (scope `repository:<repo>:pull`); otherwise 401 with a Bearer challenge.
    pub fn set_token_auth(&self, on: bool) {
        lock(&self.state.cfg).token_auth = on;
    }

    /// Lifetime of tokens issued from now on (default 300 s); expired tokens are refused.
    pub fn set_token_ttl(&self, secs: u64) {
        lock(&self.state.cfg).token_ttl = secs;
    }

    /// When `Some`: with token auth off, registry endpoints require this Basic user:pass; with token
    /// auth on, `/token` requires it (registry endpoints then require the bearer token instead).
    pub fn set_basic_auth(&self, creds: Option<(&str, &str)>) {
        lock(&self.state.cfg).basic = creds.map(|(u, p)| (u.to_string(), p.to_string()));
    }

    /// How `GET /token` answers from now on ([`TokenAnswer::Token`] by default), whatever the
    /// credentials; the registry endpoints keep asking for a token.
    pub fn set_token_answer(&self, answer: TokenAnswer) {
        if let TokenAnswer::Status(s) = answer {
            assert!(
                StatusCode::from_u16(s).is_ok(),
                "fake upstream: set_token_answer(Status({s})) is not a valid HTTP status"
            );
        }
        lock(&self.state.cfg).token_answer = answer;
    }

    /// Blob bodies are served with their last byte flipped (same length, wrong digest).
    pub fn set_corrupt_blobs(&self, on: bool) {
        lock(&self.state.cfg).corrupt = on;
    }

    /// Blob responses declare the full Content-Length but the connection is cut after half the body.
    pub fn set_short_blobs(&self, on: bool) {
        lock(&self.state.cfg).short = on;
    }

    /// Blob `GET`s are answered without `Content-Length` (chunked): the size is not announced.
    pub fn set_unannounced_size(&self, on: bool) {
        lock(&self.state.cfg).no_length = on;
    }

    /// `HEAD` answers of manifests and blobs carry no `Content-Length` (the size is not announced;
    /// `GET`s keep theirs).
    pub fn set_head_without_length(&self, on: bool) {
        lock(&self.state.cfg).head_no_length = on;
    }

    /// Ranged blob `GET`s are answered `206` with as many bytes as were asked for, but from offset
    /// 0, and a `Content-Range` that says so (`bytes 0-<n-1>/<total>`): a server that ignores
    /// where a resumed read starts.
    pub fn set_wrong_content_range(&self, on: bool) {
        lock(&self.state.cfg).wrong_range = on;
    }

    /// Blob bodies are trickled: `chunk` bytes, then sleep `delay`, ...; `chunk == 0` turns it off.
    pub fn set_slow_blobs(&self, chunk: usize, delay: Duration) {
        let mut cfg = lock(&self.state.cfg);
        cfg.slow_chunk = chunk;
        cfg.slow_delay = delay;
    }

    /// Every `/v2/...` request is answered with this status and an OCI error body
    /// (429 → `TOOMANYREQUESTS` + `Retry-After: 7`; others → `UNKNOWN` etc.). `None` turns it off.
    pub fn set_status(&self, status: Option<u16>) {
        if let Some(s) = status {
            assert!(
                StatusCode::from_u16(s).is_ok(),
                "fake upstream: set_status({s}) is not a valid HTTP status"
            );
        }
        lock(&self.state.cfg).status = status;
    }

    /// `Retry-After` of the 429s of [`FakeUpstream::set_status`] (`None`: the default `7`).
    pub fn set_retry_after(&self, value: Option<&str>) {
        lock(&self.state.cfg).retry_after = value.map(str::to_owned);
    }

    /// Every `/v2/` answer carries Docker Hub's rate-limit headers (`ratelimit-limit:
    /// <limit>;w=<window>`, `ratelimit-remaining: <remaining>;w=<window>`,
    /// `docker-ratelimit-source: <source>`). Like Docker Hub, each manifest `GET` (not `HEAD`)
    /// counts one pull: it takes one from `remaining`, and once none is left it is answered `429
    /// TOOMANYREQUESTS` (without `Retry-After`). `None` turns it off.
    pub fn set_ratelimit(&self, quota: Option<(u64, u64, u64, &str)>) {
        lock(&self.state.cfg).ratelimit = quota.map(|(l, r, w, s)| (l, r, w, s.to_owned()));
    }

    /// Pulls left of [`FakeUpstream::set_ratelimit`]'s quota.
    pub fn ratelimit_remaining(&self) -> Option<u64> {
        lock(&self.state.cfg).ratelimit.as_ref().map(|q| q.1)
    }

    /// Accept and read requests but never answer them (connections are held open).
    pub fn set_stall(&self, on: bool) {
        lock(&self.state.cfg).stall = on;
    }

    /// While closed, manifest requests are received (and counted) but not answered; opening the
    /// gate answers them all.
    pub fn set_manifest_gate(&self, closed: bool) {
        self.state.manifest_gate.send_replace(closed);
    }

    /// Every manifest answer (`HEAD` and `GET`, whatever its status, `set_status`'s included)
    /// waits `delay` before it is sent: a slow upstream. `Duration::ZERO` turns it off.
    pub fn set_answer_delay(&self, delay: Duration) {
        lock(&self.state.cfg).answer_delay = delay;
    }

    /// Manifest responses carry a `Docker-Content-Digest` that is valid in form but wrong.
    pub fn set_lying_digest_header(&self, on: bool) {
        lock(&self.state.cfg).lying_digest = on;
    }

    /// Blob GETs of known blobs answer `307 Location: <target_base>/redirected/<digest>`.
    pub fn set_blob_redirect(&self, target_base: Option<String>) {
        lock(&self.state.cfg).redirect = target_base.map(|b| b.trim_end_matches('/').to_string());
    }

    // ---- counters -----------------------------------------------------------------------------

    /// Requests with exactly this method and path (path without the query).
    pub fn hits(&self, method: &str, path: &str) -> usize {
        lock(&self.state.stats)
            .hits
            .get(&(method.to_string(), path.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// GETs of `/v2/<any repo>/blobs/<digest>` or `/redirected/<digest>` that were answered with
    /// the blob body (200/206, including corrupt/short/slow ones). Requests refused for auth, by
    /// `set_status`, stalled, 404ed, or answered with a redirect are not counted (see `hits`).
    pub fn blob_gets(&self, digest: &str) -> usize {
        lock(&self.state.stats)
            .blob_gets
            .get(digest)
            .copied()
            .unwrap_or(0)
    }

    /// Total blob body bytes handed to the connection (counted as each chunk is yielded to hyper).
    pub fn blob_bytes_sent(&self) -> u64 {
        self.state.blob_bytes.load(Ordering::SeqCst)
    }

    /// Answers to manifest requests (`HEAD` and `GET`, any status) handed to the connection, so
    /// that a test can tell whether regcache answered before the upstream did. Stalled and
    /// gated requests are not answered until released.
    pub fn manifest_answers(&self) -> usize {
        lock(&self.state.stats).manifest_answers
    }

    /// Requests to `/token` (any outcome).
    pub fn token_requests(&self) -> usize {
        lock(&self.state.stats).token_requests
    }

    /// Every request received since start / the last `reset_counters`, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.stats).records.clone()
    }

    /// Total number of requests received since start / the last `reset_counters`.
    pub fn request_count(&self) -> usize {
        lock(&self.state.stats).records.len()
    }

    pub fn reset_counters(&self) {
        *lock(&self.state.stats) = Stats::default();
        self.state.blob_bytes.store(0, Ordering::SeqCst);
    }
}

// ---- state --------------------------------------------------------------------------------------

struct State {
    addr: SocketAddr,
    store: Mutex<Store>,
    cfg: Mutex<Config>,
    stats: Mutex<Stats>,
    blob_bytes: AtomicU64,
    token_seq: AtomicU64,
    /// `true` while manifest requests are held ([`FakeUpstream::set_manifest_gate`]).
    manifest_gate: tokio::sync::watch::Sender<bool>,
}

impl State {
    fn new(addr: SocketAddr) -> State {
        State {
            addr,
            store: Mutex::new(Store::default()),
            cfg: Mutex::new(Config {
                token_ttl: 300,
                ..Config::default()
            }),
            stats: Mutex::new(Stats::default()),
            blob_bytes: AtomicU64::new(0),
            token_seq: AtomicU64::new(0),
            manifest_gate: tokio::sync::watch::Sender::new(false),
        }
    }
}

#[derive(Default)]
struct Store {
    repos: BTreeMap<String, Repo>,
    tokens: HashMap<String, TokenInfo>,
}

#[derive(Default)]
struct Repo {
    blobs: HashMap<String, Bytes>,
    /// digest -> (media type, body)
    manifests: HashMap<String, (String, Bytes)>,
    /// tag -> digest
    tags: BTreeMap<String, String>,
}

struct TokenInfo {
    scopes: Vec<String>,
    expires: Instant,
}

#[derive(Default, Clone)]
struct Config {
    token_auth: bool,
    token_ttl: u64,
    token_answer: TokenAnswer,
    basic: Option<(String, String)>,
    corrupt: bool,
    short: bool,
    no_length: bool,
    head_no_length: bool,
    wrong_range: bool,
    slow_chunk: usize,
    slow_delay: Duration,
    status: Option<u16>,
    stall: bool,
    answer_delay: Duration,
    lying_digest: bool,
    redirect: Option<String>,
    retry_after: Option<String>,
    /// `(limit, remaining, window seconds, source)`.
    ratelimit: Option<(u64, u64, u64, String)>,
}

#[derive(Default)]
struct Stats {
    hits: HashMap<(String, String), usize>,
    blob_gets: HashMap<String, usize>,
    token_requests: usize,
    manifest_answers: usize,
    records: Vec<RequestRecord>,
}

/// Locks, ignoring poisoning (a panicking test thread must not cascade into unrelated panics).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---- server -------------------------------------------------------------------------------------

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut conns = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let state = state.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            // Errors (client went away, short body cut) are expected; nothing to do with them.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    {
        let mut stats = lock(&state.stats);
        *stats
            .hits
            .entry((method.as_str().to_string(), path.clone()))
            .or_default() += 1;
        if path == "/token" {
            stats.token_requests += 1;
        }
        stats.records.push(RequestRecord {
            method: method.as_str().to_string(),
            path: path.clone(),
            query: query.clone(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        });
    }
    let cfg = lock(&state.cfg).clone();
    if cfg.stall {
        std::future::pending::<()>().await;
    }
    if path.contains("/manifests/") {
        let mut gate = state.manifest_gate.subscribe();
        // An error means the fake is being dropped: answer anyway.
        let _ = gate.wait_for(|closed| !closed).await;
        if !cfg.answer_delay.is_zero() {
            tokio::time::sleep(cfg.answer_delay).await;
        }
    }
    let headers = req.headers();

    if path == "/token" {
        if cfg.token_answer == TokenAnswer::Stall {
            std::future::pending::<()>().await;
        }
        return token_endpoint(&state, &cfg, &method, headers, query.as_deref());
    }
    if let Some(digest) = path.strip_prefix("/redirected/") {
        if method != Method::GET && method != Method::HEAD {
            return oci_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "method not allowed",
            );
        }
        let digest = percent_decode(digest);
        let data = {
            let store = lock(&state.store);
            store
                .repos
                .values()
                .find_map(|r| r.blobs.get(&digest).cloned())
        };
        return match data {
            Some(data) => serve_blob(&state, &cfg, &method, headers, &digest, data),
            None => oci_error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to registry",
            ),
        };
    }
    if path == "/v2" || path.starts_with("/v2/") {
        let (quota, spent) = count_pull(&state, &method, &path);
        let mut resp = if spent {
            oci_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                "fake upstream: pull rate limit reached",
            )
        } else {
            registry(&state, &cfg, &method, headers, &path, query.as_deref())
        };
        for (name, value) in quota {
            resp.headers_mut().insert(
                name,
                http::HeaderValue::from_str(&value).expect("fake upstream: rate-limit header"),
            );
        }
        resp.headers_mut().insert(
            "docker-distribution-api-version",
            http::HeaderValue::from_static("registry/2.0"),
        );
        if path.contains("/manifests/") {
            lock(&state.stats).manifest_answers += 1;
        }
        return resp;
    }
    text(StatusCode::NOT_FOUND, "not found")
}

/// The rate-limit headers of [`FakeUpstream::set_ratelimit`] for one `/v2/` request, after
/// counting it (a manifest `GET`), and whether the quota was spent before it.
fn count_pull(state: &State, method: &Method, path: &str) -> (Vec<(&'static str, String)>, bool) {
    let mut cfg = lock(&state.cfg);
    let Some((limit, remaining, window, source)) = cfg.ratelimit.as_mut() else {
        return (Vec::new(), false);
    };
    let mut spent = false;
    if *method == Method::GET && path.contains("/manifests/") {
        spent = *remaining == 0;
        *remaining = remaining.saturating_sub(1);
    }
    let headers = vec![
        ("ratelimit-limit", format!("{limit};w={window}")),
        ("ratelimit-remaining", format!("{remaining};w={window}")),
        ("docker-ratelimit-source", source.clone()),
    ];
    (headers, spent)
}

enum Route<'a> {
    Base,
    Manifest { name: &'a str, reference: String },
    Blob { name: &'a str, digest: String },
    Tags { name: &'a str },
}

fn route(path: &str) -> Option<Route<'_>> {
    if path == "/v2" || path == "/v2/" {
        return Some(Route::Base);
    }
    let rest = path.strip_prefix("/v2/")?;
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return (!name.is_empty()).then_some(Route::Tags { name });
    }
    let m = rest.rfind("/manifests/");
    let b = rest.rfind("/blobs/");
    let (idx, is_manifest) = match (m, b) {
        (Some(m), Some(b)) if m > b => (m, true),
        (Some(m), None) => (m, true),
        (_, Some(b)) => (b, false),
        (None, None) => return None,
    };
    let name = &rest[..idx];
    let reference = &rest[idx
        + if is_manifest {
            "/manifests/".len()
        } else {
            "/blobs/".len()
        }..];
    if name.is_empty() || reference.is_empty() || reference.contains('/') {
        return None;
    }
    let reference = percent_decode(reference);
    Some(if is_manifest {
        Route::Manifest { name, reference }
    } else {
        Route::Blob {
            name,
            digest: reference,
        }
    })
}

fn registry(
    state: &Arc<State>,
    cfg: &Config,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    query: Option<&str>,
) -> Response<Body> {
    if let Some(status) = cfg.status {
        let status = StatusCode::from_u16(status).expect("validated in set_status");
        let code = match status.as_u16() {
            401 => "UNAUTHORIZED",
            403 => "DENIED",
            404 => "NAME_UNKNOWN",
            429 => "TOOMANYREQUESTS",
            _ => "UNKNOWN",
        };
        let mut resp = oci_error(status, code, "fake upstream: forced status");
        if status.as_u16() == 429 {
            let retry_after = cfg.retry_after.as_deref().unwrap_or("7");
            resp.headers_mut().insert(
                "retry-after",
                http::HeaderValue::from_str(retry_after).expect("fake upstream: Retry-After"),
            );
        }
        return resp;
    }
    let Some(route) = route(path) else {
        return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such route");
    };
    let repo = match &route {
        Route::Base => None,
        Route::Manifest { name, .. } | Route::Blob { name, .. } | Route::Tags { name } => {
            Some(*name)
        }
    };
    if let Some(denied) = check_auth(state, cfg, headers, repo) {
        return denied;
    }
    let is_tags = matches!(route, Route::Tags { .. });
    if *method != Method::GET && (*method != Method::HEAD || is_tags) {
        return oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "method not allowed",
        );
    }
    match route {
        Route::Base => json(StatusCode::OK, Bytes::from_static(b"{}"), method),
        Route::Manifest { name, reference } => {
            let found = {
                let store = lock(&state.store);
                store.repos.get(name).and_then(|r| {
                    let digest = if reference.contains(':') {
                        reference.clone()
                    } else {
                        r.tags.get(&reference)?.clone()
                    };
                    let (mt, body) = r.manifests.get(&digest)?;
                    if mt == DOCKER_LIST
                        && !reference.contains(':')
                        && !accepts(headers, DOCKER_LIST)
                    {
                        let child = amd64_child(body)?;
                        let (cmt, cbody) = r.manifests.get(&child)?;
                        return Some((child, cmt.clone(), cbody.clone()));
                    }
                    Some((digest, mt.clone(), body.clone()))
                })
            };
            let Some((digest, media_type, body)) = found else {
                return oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "manifest unknown",
                );
            };
            let header_digest = if cfg.lying_digest {
                let mut lie = body.to_vec();
                lie.extend_from_slice(b"lie");
                sha256_digest(&lie)
            } else {
                digest
            };
            let mut builder = Response::builder()
                .status(StatusCode::OK)
                .header("content-type", media_type)
                .header("docker-content-digest", header_digest);
            if !(cfg.head_no_length && *method == Method::HEAD) {
                builder = builder.header("content-length", body.len());
            }
            let body = if *method == Method::HEAD {
                empty()
            } else {
                full(body)
            };
            builder
                .body(body)
                .expect("fake upstream: manifest response")
        }
        Route::Blob { name, digest } => {
            let data = {
                let store = lock(&state.store);
                store
                    .repos
                    .get(name)
                    .and_then(|r| r.blobs.get(&digest).cloned())
            };
            let Some(data) = data else {
                return oci_error(
                    StatusCode::NOT_FOUND,
                    "BLOB_UNKNOWN",
                    "blob unknown to registry",
                );
            };
            if let (Some(base), true) = (&cfg.redirect, *method == Method::GET) {
                return Response::builder()
                    .status(StatusCode::TEMPORARY_REDIRECT)
                    .header("location", format!("{base}/redirected/{digest}"))
                    .header("docker-content-digest", digest)
                    .body(empty())
                    .expect("fake upstream: redirect response");
            }
            serve_blob(state, cfg, method, headers, &digest, data)
        }
        Route::Tags { name } => tags_list(state, name, query),
    }
}

/// Whether the request's `Accept` lines name `media_type`.
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().unwrap_or("").trim() == media_type)
}

/// The digest of the linux/amd64 entry of a manifest list.
fn amd64_child(list: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(list).ok()?;
    v.get("manifests")?.as_array()?.iter().find_map(|m| {
        let p = m.get("platform")?;
        (p.get("architecture")? == "amd64" && p.get("os")? == "linux")
            .then(|| m.get("digest")?.as_str().map(str::to_owned))?
    })
}

fn tags_list(state: &Arc<State>, name: &str, query: Option<&str>) -> Response<Body> {
    let params = parse_query(query);
    let n: Option<usize> = params
        .iter()
        .find(|(k, _)| k == "n")
        .and_then(|(_, v)| v.parse().ok());
    let last = params
        .iter()
        .find(|(k, _)| k == "last")
        .map(|(_, v)| v.clone());
    let all: Vec<String> = {
        let store = lock(&state.store);
        let Some(r) = store.repos.get(name) else {
            return oci_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "repository name not known to registry",
            );
        };
        r.tags.keys().cloned().collect()
    };
    let after: Vec<String> = all
        .into_iter()
        .filter(|t| last.as_ref().is_none_or(|l| t > l))
        .collect();
    let (page, more) = match n {
        Some(n) => (
            after.iter().take(n).cloned().collect::<Vec<_>>(),
            n > 0 && after.len() > n,
        ),
        None => (after.clone(), false),
    };
    let body = serde_json::json!({ "name": name, "tags": page });
    let mut resp = json(
        StatusCode::OK,
        Bytes::from(serde_json::to_vec(&body).expect("fake upstream: serialize tags")),
        &Method::GET,
    );
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        let link = format!("</v2/{name}/tags/list?n={n}&last={last}>; rel=\"next\"");
        resp.headers_mut().insert(
            "link",
            http::HeaderValue::from_str(&link).expect("fake upstream: link header"),
        );
    }
    resp
}

fn serve_blob(
    state: &Arc<State>,
    cfg: &Config,
    method: &Method,
    headers: &HeaderMap,
    digest: &str,
    data: Bytes,
) -> Response<Body> {
    let data = if cfg.corrupt && !data.is_empty() {
        let mut v = data.to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x01;
        Bytes::from(v)
    } else {
        data
    };
    let total = data.len() as u64;
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, total));
    let (status, slice, content_range) = match range {
        None => (StatusCode::OK, data, None),
        Some(Err(())) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{total}"))
                .body(empty())
                .expect("fake upstream: 416 response");
        }
        Some(Ok((a, b))) if cfg.wrong_range => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(..=(b - a) as usize),
            Some(format!("bytes 0-{}/{total}", b - a)),
        ),
        Some(Ok((a, b))) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(a as usize..=b as usize),
            Some(format!("bytes {a}-{b}/{total}")),
        ),
    };
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/octet-stream")
        .header("docker-content-digest", digest)
        .header("accept-ranges", "bytes");
    let announced = match *method {
        Method::HEAD => !cfg.head_no_length,
        _ => !cfg.no_length,
    };
    if announced {
        builder = builder.header("content-length", slice.len());
    }
    if let Some(cr) = content_range {
        builder = builder.header("content-range", cr);
    }
    if *method == Method::HEAD {
        return builder
            .body(empty())
            .expect("fake upstream: blob HEAD response");
    }
    *lock(&state.stats)
        .blob_gets
        .entry(digest.to_string())
        .or_default() += 1;
    let limit = if cfg.short {
        slice.len() / 2
    } else {
        slice.len()
    };
    let chunk = if cfg.slow_chunk > 0 {
        cfg.slow_chunk
    } else {
        STREAM_CHUNK
    };
    let delay = if cfg.slow_chunk > 0 {
        cfg.slow_delay
    } else {
        Duration::ZERO
    };
    let body = blob_body(BlobStream {
        data: slice,
        pos: 0,
        limit,
        chunk,
        delay,
        cut: cfg.short,
        state: state.clone(),
    });
    builder.body(body).expect("fake upstream: blob response")
}

struct BlobStream {
    data: Bytes,
    pos: usize,
    limit: usize,
    chunk: usize,
    delay: Duration,
    cut: bool,
    state: Arc<State>,
}

fn blob_body(s: BlobStream) -> Body {
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        if s.pos >= s.limit {
            if s.cut {
                s.cut = false;
                // Pending first so hyper flushes what it buffered; an error drops unflushed bytes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let err = std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "fake upstream: short blob, cutting the connection",
                );
                return Some((Err(err), s));
            }
            return None;
        }
        if s.pos > 0 && !s.delay.is_zero() {
            tokio::time::sleep(s.delay).await;
        }
        let end = (s.pos + s.chunk).min(s.limit);
        let piece = s.data.slice(s.pos..end);
        s.pos = end;
        s.state
            .blob_bytes
            .fetch_add(piece.len() as u64, Ordering::SeqCst);
        Some((Ok(Frame::data(piece)), s))
    });
    StreamBody::new(stream).boxed_unsync()
}

/// `None`: no usable Range (serve everything); `Some(Err)`: unsatisfiable; `Some(Ok((a, b)))`: inclusive.
fn parse_range(v: &str, total: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || total == 0 {
            return Some(Err(()));
        }
        return Some(Ok((total.saturating_sub(n), total - 1)));
    }
    let a: u64 = a.parse().ok()?;
    let b: Option<u64> = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    if let Some(b) = b {
        if b < a {
            return None;
        }
    }
    if a >= total {
        return Some(Err(()));
    }
    let b = b.map_or(total - 1, |b| b.min(total - 1));
    Some(Ok((a, b)))
}

// ---- auth ---------------------------------------------------------------------------------------

fn check_auth(
    state: &Arc<State>,
    cfg: &Config,
    headers: &HeaderMap,
    repo: Option<&str>,
) -> Option<Response<Body>> {
    if cfg.token_auth {
        if bearer_ok(state, headers, repo) {
            return None;
        }
        let mut challenge = format!(
            "Bearer realm=\"http://{}/token\",service=\"{SERVICE}\"",
            state.addr
        );
        if let Some(repo) = repo {
            challenge.push_str(&format!(",scope=\"repository:{repo}:pull\""));
        }
        return Some(unauthorized(challenge));
    }
    if let Some(creds) = &cfg.basic {
        if !basic_ok(headers, creds) {
            return Some(unauthorized("Basic realm=\"fake\"".to_string()));
        }
    }
    None
}

fn unauthorized(challenge: String) -> Response<Body> {
    let mut resp = oci_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required",
    );
    resp.headers_mut().insert(
        "www-authenticate",
        http::HeaderValue::from_str(&challenge).expect("fake upstream: challenge header"),
    );
    resp
}

fn auth_param<'h>(headers: &'h HeaderMap, scheme: &str) -> Option<&'h str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (s, rest) = v.trim().split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

fn basic_ok(headers: &HeaderMap, (user, pass): &(String, String)) -> bool {
    auth_param(headers, "basic") == Some(base64(format!("{user}:{pass}").as_bytes()).as_str())
}

fn bearer_ok(state: &Arc<State>, headers: &HeaderMap, repo: Option<&str>) -> bool {
    let Some(token) = auth_param(headers, "bearer") else {
        return false;
    };
    let store = lock(&state.store);
    let Some(info) = store.tokens.get(token) else {
        return false;
    };
    if Instant::now() >= info.expires {
        return false;
    }
    let Some(repo) = repo else {
        return true;
    };
    info.scopes.iter().any(|scope| {
        scope
            .strip_prefix("repository:")
            .and_then(|s| s.rsplit_once(':'))
            .is_some_and(|(name, actions)| {
                name == repo && actions.split(',').any(|a| a == "pull" || a == "*")
            })
    })
}

fn token_endpoint(
    state: &Arc<State>,
    cfg: &Config,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Response<Body> {
    if *method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match cfg.token_answer {
        TokenAnswer::Token | TokenAnswer::Stall => {}
        TokenAnswer::Status(s) => {
            let status = StatusCode::from_u16(s).expect("validated in set_token_answer");
            return oci_error(status, "UNKNOWN", "fake token service: forced status");
        }
        TokenAnswer::NoToken => {
            let body =
                Bytes::from_static(br#"{"expires_in":300,"issued_at":"2024-01-01T00:00:00Z"}"#);
            return json(StatusCode::OK, body, &Method::GET);
        }
        TokenAnswer::Garbage => {
            return json(
                StatusCode::OK,
                Bytes::from_static(b"<html>sign in</html>"),
                &Method::GET,
            );
        }
    }
    if let Some(creds) = &cfg.basic {
        if !basic_ok(headers, creds) {
            return unauthorized("Basic realm=\"fake\"".to_string());
        }
    }
    let params = parse_query(query);
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let seq = state.token_seq.fetch_add(1, Ordering::SeqCst);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let token = format!(
        "fake-{}-{seq}-{}",
        state.addr.port(),
        &hex(&Sha256::digest(format!(
            "{seq}{}{scopes:?}",
            now.as_nanos()
        )))[..16]
    );
    let ttl = cfg.token_ttl;
    lock(&state.store).tokens.insert(
        token.clone(),
        TokenInfo {
            scopes,
            expires: Instant::now() + Duration::from_secs(ttl),
        },
    );
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": ttl,
        "issued_at": rfc3339(now.as_secs()),
    });
    json(
        StatusCode::OK,
        Bytes::from(serde_json::to_vec(&body).expect("fake upstream: serialize token")),
        &Method::GET,
    )
}

// ---- small helpers ------------------------------------------------------------------------------

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn text(status: StatusCode, msg: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(full(Bytes::from_static(msg.as_bytes())))
        .expect("fake upstream: text response")
}

fn json(status: StatusCode, body: Bytes, method: &Method) -> Response<Body> {
    let builder = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len());
    let body = if *method == Method::HEAD {
        empty()
    } else {
        full(body)
    };
    builder.body(body).expect("fake upstream: json response")
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body =
        serde_json::json!({ "errors": [ { "code": code, "message": message, "detail": null } ] });
    json(
        status,
        Bytes::from(serde_json::to_vec(&body).expect("fake upstream: serialize error")),
        &Method::GET,
    )
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn base64(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for c in input.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hi = (b[i + 1] as char).to_digit(16);
            let lo = (b[i + 2] as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k=v&k2=v2` with percent-decoding and `+` as space.
fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(secs: u64) -> String {
    let (y, m, d) = regcache::config::tls::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("build reqwest client")
    }

    #[tokio::test]
    async fn fake_manifest_get_has_digest_header() {
        let fake = FakeUpstream::start().await;
        let (mdigest, _) = fake.add_image("library/alpine", "3", Bytes::from_static(b"layer"));
        let url = format!("{}/v2/library/alpine/manifests/3", fake.url());
        let resp = client().get(&url).send().await.expect("GET manifest");
        assert_eq!(resp.status(), 200);
        let h = resp.headers().clone();
        assert_eq!(h["docker-content-digest"], mdigest.as_str());
        assert_eq!(h["content-type"], OCI_MANIFEST);
        assert_eq!(h["docker-distribution-api-version"], "registry/2.0");
        let body = resp.bytes().await.expect("manifest body");
        assert_eq!(sha256_digest(&body), mdigest);
        assert_eq!(h["content-length"], body.len().to_string().as_str());

        // HEAD keeps Content-Length, by digest works, unknown is MANIFEST_UNKNOWN.
        let head = client()
            .head(format!(
                "{}/v2/library/alpine/manifests/{mdigest}",
                fake.url()
            ))
            .send()
            .await
            .expect("HEAD manifest");
        assert_eq!(head.status(), 200);
        assert_eq!(
            head.headers()["content-length"],
            body.len().to_string().as_str()
        );
        let missing = client()
            .get(format!("{}/v2/library/alpine/manifests/nope", fake.url()))
            .send()
            .await
            .expect("GET missing manifest");
        assert_eq!(missing.status(), 404);
        assert!(missing
            .text()
            .await
            .expect("404 body")
            .contains("MANIFEST_UNKNOWN"));
        assert_eq!(fake.hits("GET", "/v2/library/alpine/manifests/3"), 1);

        fake.set_lying_digest_header(true);
        let resp = client()
            .get(&url)
            .send()
            .await
            .expect("GET manifest (lying)");
        let lie = resp.headers()["docker-content-digest"]
            .to_str()
            .expect("ascii")
            .to_string();
        assert_ne!(lie, mdigest);
        assert!(
            lie.starts_with("sha256:") && lie.len() == 71,
            "valid-looking digest: {lie}"
        );
    }

    #[tokio::test]
    async fn fake_blob_range_and_repo_isolation() {
        let fake = FakeUpstream::start().await;
        let data: Bytes = (0..200_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let digest = fake.add_blob("a/b/c", data.clone());
        let url = format!("{}/v2/a/b/c/blobs/{digest}", fake.url());

        let resp = client()
            .get(&url)
            .header("range", "bytes=100-199")
            .send()
            .await
            .expect("ranged GET");
        assert_eq!(resp.status(), 206);
        assert_eq!(resp.headers()["content-range"], "bytes 100-199/200000");
        assert_eq!(
            resp.bytes().await.expect("range body"),
            data.slice(100..200)
        );

        let resp = client()
            .get(&url)
            .header("range", "bytes=150000-")
            .send()
            .await
            .expect("open-ended ranged GET");
        assert_eq!(resp.status(), 206);
        assert_eq!(
            resp.bytes().await.expect("range body"),
            data.slice(150_000..)
        );

        let resp = client()
            .get(&url)
            .header("range", "bytes=200000-")
            .send()
            .await
            .expect("unsatisfiable ranged GET");
        assert_eq!(resp.status(), 416);

        let resp = client().get(&url).send().await.expect("full GET");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.expect("full body"), data);
        assert_eq!(fake.blob_gets(&digest), 3);
        assert_eq!(fake.blob_bytes_sent(), 100 + 50_000 + 200_000);

        let other = client()
            .get(format!("{}/v2/other/blobs/{digest}", fake.url()))
            .send()
            .await
            .expect("GET blob in other repo");
        assert_eq!(other.status(), 404);
        assert!(other
            .text()
            .await
            .expect("404 body")
            .contains("BLOB_UNKNOWN"));
    }

    #[tokio::test]
    async fn fake_token_flow() {
        let fake = FakeUpstream::start().await;
        fake.add_image("repo/a", "v1", Bytes::from_static(b"aaa"));
        fake.add_image("repo/b", "v1", Bytes::from_static(b"bbb"));
        fake.set_token_auth(true);
        fake.set_basic_auth(Some(("alice", "s3cret")));

        let url = format!("{}/v2/repo/a/manifests/v1", fake.url());
        let resp = client().get(&url).send().await.expect("anonymous GET");
        assert_eq!(resp.status(), 401);
        let challenge = resp.headers()["www-authenticate"]
            .to_str()
            .expect("ascii")
            .to_string();
        assert_eq!(
            challenge,
            format!(
                "Bearer realm=\"{}/token\",service=\"fake-registry\",scope=\"repository:repo/a:pull\"",
                fake.url()
            )
        );

        let token_url = format!("{}/token", fake.url());
        let q = [
            ("service", "fake-registry"),
            ("scope", "repository:repo/a:pull"),
        ];
        let denied = client()
            .get(&token_url)
            .query(&q)
            .send()
            .await
            .expect("token w/o creds");
        assert_eq!(denied.status(), 401);
        let tok: serde_json::Value = client()
            .get(&token_url)
            .query(&q)
            .basic_auth("alice", Some("s3cret"))
            .send()
            .await
            .expect("token request")
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).expect("token json"))
            .expect("token body");
        let token = tok["token"].as_str().expect("token field").to_string();
        assert_eq!(tok["access_token"], tok["token"]);
        assert_eq!(tok["expires_in"], 300);
        assert!(tok["issued_at"].as_str().expect("issued_at").ends_with('Z'));
        assert_eq!(fake.token_requests(), 2);

        let ok = client()
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("authed GET");
        assert_eq!(ok.status(), 200);
        let wrong_repo = client()
            .get(format!("{}/v2/repo/b/manifests/v1", fake.url()))
            .bearer_auth(&token)
            .send()
            .await
            .expect("GET other repo with token");
        assert_eq!(wrong_repo.status(), 401);

        let rec = fake.requests();
        let last = rec.last().expect("recorded requests");
        assert_eq!(last.path, "/v2/repo/b/manifests/v1");
        assert_eq!(
            last.header("Authorization"),
            Some(format!("Bearer {token}").as_str())
        );

        fake.set_token_ttl(0);
        let tok: serde_json::Value = client()
            .get(&token_url)
            .query(&q)
            .basic_auth("alice", Some("s3cret"))
            .send()
            .await
            .expect("token request")
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).expect("token json"))
            .expect("token body");
        let expired = tok["token"].as_str().expect("token field");
        let resp = client()
            .get(&url)
            .bearer_auth(expired)
            .send()
            .await
            .expect("GET expired");
        assert_eq!(resp.status(), 401);
    }

    #[tokio::test]
    async fn fake_corrupt_short_slow_and_status() {
        let fake = FakeUpstream::start().await;
        let data: Bytes = vec![7u8; 100_000].into();
        let digest = fake.add_blob("r", data.clone());
        let url = format!("{}/v2/r/blobs/{digest}", fake.url());

        fake.set_corrupt_blobs(true);
        let resp = client().get(&url).send().await.expect("GET corrupt");
        assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
        let body = resp.bytes().await.expect("corrupt body");
        assert_eq!(body.len(), data.len());
        assert_ne!(
            sha256_digest(&body),
            digest,
            "corrupt blob must not match its digest"
        );
        fake.set_corrupt_blobs(false);

        fake.set_short_blobs(true);
        let resp = client()
            .get(&url)
            .send()
            .await
            .expect("GET short: headers arrive");
        assert_eq!(resp.content_length(), Some(100_000));
        let mut got = 0usize;
        let mut stream = resp.bytes_stream();
        let mut failed = false;
        use futures_util::StreamExt as _;
        while let Some(item) = stream.next().await {
            match item {
                Ok(b) => got += b.len(),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "short body must end in an error");
        assert_eq!(got, 50_000, "half the body arrives before the cut");
        fake.set_short_blobs(false);

        fake.set_slow_blobs(10_000, Duration::from_millis(20));
        let t0 = Instant::now();
        let body = client()
            .get(&url)
            .send()
            .await
            .expect("GET slow")
            .bytes()
            .await
            .expect("slow body");
        assert_eq!(body, data);
        assert!(
            t0.elapsed() >= Duration::from_millis(9 * 20),
            "trickled: {:?}",
            t0.elapsed()
        );
        fake.set_slow_blobs(0, Duration::ZERO);

        fake.set_status(Some(429));
        let resp = client().get(&url).send().await.expect("GET 429");
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
        assert!(resp
            .text()
            .await
            .expect("429 body")
            .contains("TOOMANYREQUESTS"));
        fake.set_status(None);

        fake.set_stall(true);
        let stalled =
            tokio::time::timeout(Duration::from_millis(300), client().get(&url).send()).await;
        assert!(stalled.is_err(), "stalled request must not be answered");
        fake.set_stall(false);
    }

    #[tokio::test]
    async fn fake_redirect_and_tags_pagination() {
        let origin = FakeUpstream::start().await;
        let storage = FakeUpstream::start().await;
        let data = Bytes::from_static(b"redirected layer bytes");
        let digest = origin.add_blob("r", data.clone());
        // The storage fake knows the blob too (any repo), and serves it under /redirected/.
        storage.add_blob("storage", data.clone());
        origin.set_blob_redirect(Some(storage.url()));
        origin.set_basic_auth(Some(("u", "p")));

        let url = format!("{}/v2/r/blobs/{digest}", origin.url());
        let resp = client()
            .get(&url)
            .basic_auth("u", Some("p"))
            .send()
            .await
            .expect("GET redirect");
        assert_eq!(resp.status(), 307);
        let loc = resp.headers()["location"]
            .to_str()
            .expect("ascii")
            .to_string();
        assert_eq!(loc, format!("{}/redirected/{digest}", storage.url()));
        // Default reqwest policy follows, and drops Authorization on cross-host redirects.
        let followed = reqwest::Client::new()
            .get(&url)
            .basic_auth("u", Some("p"))
            .send()
            .await
            .expect("GET following redirect");
        assert_eq!(followed.status(), 200);
        assert_eq!(followed.bytes().await.expect("redirected body"), data);
        assert_eq!(storage.blob_gets(&digest), 1);
        assert_eq!(origin.blob_gets(&digest), 0);
        assert!(storage
            .requests()
            .iter()
            .all(|r| r.header("authorization").is_none()));

        for t in ["a", "b", "c", "d", "e"] {
            origin.add_manifest(
                "r",
                Some(t),
                OCI_MANIFEST,
                Bytes::from(format!("{{\"t\":\"{t}\"}}")),
            );
        }
        let resp = client()
            .get(format!("{}/v2/r/tags/list?n=2&last=a", origin.url()))
            .basic_auth("u", Some("p"))
            .send()
            .await
            .expect("GET tags");
        assert_eq!(
            resp.headers()["link"],
            "</v2/r/tags/list?n=2&last=c>; rel=\"next\""
        );
        let v: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("tags body")).expect("tags json");
        assert_eq!(v, serde_json::json!({"name": "r", "tags": ["b", "c"]}));
        let resp = client()
            .get(format!("{}/v2/r/tags/list?n=2&last=c", origin.url()))
            .basic_auth("u", Some("p"))
            .send()
            .await
            .expect("GET tags page 2");
        assert!(resp.headers().get("link").is_none());
        let v: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("tags body")).expect("tags json");
        assert_eq!(v["tags"], serde_json::json!(["d", "e"]));
    }
}

//! The upstream registry client: requests, Bearer/Basic auth, token cache and bounded waits.
//!
//! One [`Upstream`] per configured registry. Every request has a connect timeout (in the client),
//! a time limit for the response headers, and callers read bodies with [`Upstream::next_chunk`],
//! which bounds the idle time between chunks. Redirects are followed by reqwest, which drops
//! `Authorization` when a redirect leaves the host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use crate::config::{Credentials, UpstreamConfig};
use crate::metrics::Metrics;
use crate::reference::{Digest, RepoName};

/// Every manifest media type regcache asks for, in the upstream `Accept` header.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// An upstream failure, keeping what a caller needs to answer its client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Refused, DNS failure, TLS failure, reset: the upstream could not be reached.
    #[error("upstream {upstream} unreachable: {detail}")]
    Unreachable { upstream: String, detail: String },
    /// Connected, but no headers (or no next body chunk) in time.
    #[error("upstream {upstream} timed out waiting for {what}")]
    Timeout {
        upstream: String,
        what: &'static str,
    },
    /// The upstream answered with a non-success status.
    #[error("upstream {upstream} answered {status} for {path}")]
    Status {
        upstream: String,
        status: u16,
        path: String,
        retry_after: Option<String>,
    },
    /// The upstream's answer breaks the protocol (bad digest header, oversized manifest, …).
    #[error("upstream {upstream} sent an invalid response: {detail}")]
    Invalid { upstream: String, detail: String },
}

impl UpstreamError {
    /// True when the upstream could not give an answer at all (as opposed to "not found").
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Invalid { .. } => false,
        }
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Status { .. } => "status",
            UpstreamError::Invalid { .. } => "invalid",
        }
    }
}

/// Circuit breaker state of one upstream.
#[derive(Debug, Default)]
struct Breaker {
    /// Consecutive failures while up.
    failures: u32,
    /// Set while the upstream is marked down.
    down_since: Option<Instant>,
}

/// What `/readyz` reports about an upstream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub url: String,
    pub up: bool,
    pub down_for_seconds: Option<u64>,
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (quoted values may hold commas).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), val.trim().to_owned());
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

struct CachedToken {
    token: String,
    expires: Instant,
}

/// What a manifest `HEAD` told us.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
}

/// A fetched manifest, not yet verified.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub header_digest: Option<Digest>,
}

/// A client for one upstream registry.
pub struct Upstream {
    pub config: UpstreamConfig,
    client: reqwest::Client,
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// Set once the upstream asked for Basic auth: send it up front from then on.
    basic: std::sync::atomic::AtomicBool,
    breaker: Mutex<Breaker>,
    metrics: Arc<Metrics>,
    me: Weak<Upstream>,
}

fn classify(upstream: &str, e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        UpstreamError::Timeout {
            upstream: upstream.to_owned(),
            what: "the connection",
        }
    } else {
        // Show the root cause (connection refused, DNS, TLS) rather than reqwest's wrapper.
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        UpstreamError::Unreachable {
            upstream: upstream.to_owned(),
            detail,
        }
    }
}

impl Upstream {
    pub fn new(
        config: UpstreamConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Upstream>, UpstreamError> {
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| UpstreamError::Invalid {
                upstream: config.name.clone(),
                detail: format!("cannot read ca_file {}: {e}", path.display()),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                UpstreamError::Invalid {
                    upstream: config.name.clone(),
                    detail: format!("invalid PEM in ca_file {}: {e}", path.display()),
                }
            })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("regcache/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()
            .map_err(|e| UpstreamError::Invalid {
                upstream: config.name.clone(),
                detail: format!("cannot build the HTTP client: {e}"),
            })?;
        metrics
            .upstream_up
            .get_or_create(&Metrics::upstream(&config.name))
            .set(1);
        Ok(Arc::new_cyclic(|me| Upstream {
            config,
            client,
            tokens: Mutex::new(HashMap::new()),
            basic: std::sync::atomic::AtomicBool::new(false),
            breaker: Mutex::new(Breaker::default()),
            metrics,
            me: me.clone(),
        }))
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the circuit is closed (the upstream is believed reachable).
    pub fn is_up(&self) -> bool {
        self.breaker().down_since.is_none()
    }

    pub fn status(&self) -> UpstreamStatus {
        let down = self.breaker().down_since;
        UpstreamStatus {
            name: self.name().to_owned(),
            url: self.config.url.to_string(),
            up: down.is_none(),
            down_for_seconds: down.map(|d| d.elapsed().as_secs()),
        }
    }

    /// Fails at once while the upstream is marked down: clients are not made to wait for it.
    fn check_circuit(&self) -> Result<(), UpstreamError> {
        match self.breaker().down_since {
            None => Ok(()),
            Some(since) => Err(UpstreamError::Unreachable {
                upstream: self.name().to_owned(),
                detail: format!(
                    "marked down {}s ago after repeated failures; probing it in the background",
                    since.elapsed().as_secs()
                ),
            }),
        }
    }

    /// Counts a failure; after `failure_threshold` in a row the upstream is marked down and one
    /// background probe starts.
    pub fn record_failure(&self, e: &UpstreamError) {
        self.metrics
            .upstream_errors
            .get_or_create(&vec![
                ("upstream", self.name().to_owned()),
                ("kind", e.kind().to_owned()),
            ])
            .inc();
        if !e.is_unavailable() {
            return;
        }
        let newly_down = {
            let mut b = self.breaker();
            b.failures += 1;
            if b.down_since.is_none() && b.failures >= self.config.failure_threshold {
                b.down_since = Some(Instant::now());
                true
            } else {
                false
            }
        };
        if newly_down {
            tracing::warn!(upstream = self.name(), error = %e, "upstream marked down; serving from the cache and probing in the background");
            self.metrics
                .upstream_up
                .get_or_create(&Metrics::upstream(self.name()))
                .set(0);
            self.metrics
                .upstream_state_changes
                .get_or_create(&vec![
                    ("upstream", self.name().to_owned()),
                    ("state", "down".to_owned()),
                ])
                .inc();
            if let Some(me) = self.me.upgrade() {
                let weak = Arc::downgrade(&me);
                drop(me);
                tokio::spawn(probe_until_up(weak));
            }
        }
    }

    fn record_success(&self) {
        let was_down = {
            let mut b = self.breaker();
            b.failures = 0;
            b.down_since.take()
        };
        if let Some(since) = was_down {
            tracing::info!(
                upstream = self.name(),
                down_s = since.elapsed().as_secs(),
                "upstream is back up"
            );
            self.metrics
                .upstream_up
                .get_or_create(&Metrics::upstream(self.name()))
                .set(1);
            self.metrics
                .upstream_state_changes
                .get_or_create(&vec![
                    ("upstream", self.name().to_owned()),
                    ("state", "up".to_owned()),
                ])
                .inc();
        }
    }

    /// One probe: `GET /v2/`. Any answer that is not 5xx or 429 means the upstream is back.
    async fn probe(&self) -> bool {
        let req = self.client.get(self.url("/v2/"));
        let total = self.config.connect_timeout + self.config.header_timeout;
        match tokio::time::timeout(total, req.send()).await {
            Ok(Ok(resp)) => {
                let s = resp.status();
                !(s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS)
            }
            _ => false,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.url.as_str().trim_end_matches('/'), path)
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        match tokens.get(scope) {
            Some(t) if t.expires > Instant::now() => Some(t.token.clone()),
            Some(_) => {
                tokens.remove(scope);
                None
            }
            None => None,
        }
    }

    fn with_basic(
        &self,
        req: reqwest::RequestBuilder,
        creds: &Credentials,
    ) -> reqwest::RequestBuilder {
        req.basic_auth(&creds.username, Some(&creds.password))
    }

    /// Gets a Bearer token from the challenge's realm.
    async fn fetch_token(&self, ch: &Challenge, scope: &str) -> Result<String, UpstreamError> {
        let name = self.name();
        let realm = ch
            .params
            .get("realm")
            .ok_or_else(|| UpstreamError::Invalid {
                upstream: name.to_owned(),
                detail: "Bearer challenge without realm".into(),
            })?;
        let mut url = reqwest::Url::parse(realm).map_err(|e| UpstreamError::Invalid {
            upstream: name.to_owned(),
            detail: format!("Bearer realm {realm:?} is not a URL: {e}"),
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(UpstreamError::Invalid {
                upstream: name.to_owned(),
                detail: format!("Bearer realm {realm:?} is not http(s)"),
            });
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = ch.params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair(
                "scope",
                ch.params.get("scope").map_or(scope, |s| s.as_str()),
            );
        }
        let mut req = self.client.get(url);
        if let Some(c) = &self.config.credentials {
            req = self.with_basic(req, c);
        }
        let resp = tokio::time::timeout(self.config.header_timeout, req.send())
            .await
            .map_err(|_| UpstreamError::Timeout {
                upstream: name.to_owned(),
                what: "a token",
            })?
            .map_err(|e| classify(name, e))?;
        if !resp.status().is_success() {
            return Err(UpstreamError::Status {
                upstream: name.to_owned(),
                status: if resp.status() == StatusCode::UNAUTHORIZED
                    || resp.status() == StatusCode::FORBIDDEN
                {
                    401
                } else {
                    resp.status().as_u16()
                },
                path: "token realm".into(),
                retry_after: None,
            });
        }
        let body = self.read_body(resp, 1 << 20, "token").await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let t: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Invalid {
                upstream: name.to_owned(),
                detail: format!("token response is not JSON: {e}"),
            })?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| UpstreamError::Invalid {
                upstream: name.to_owned(),
                detail: "token response has no token".into(),
            })?;
        // The spec's default lifetime is 60 s; renew a little early.
        let ttl = t.expires_in.unwrap_or(60).max(10);
        let expires = Instant::now() + Duration::from_secs(ttl - ttl.min(10).min(ttl / 2));
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                scope.to_owned(),
                CachedToken {
                    token: token.clone(),
                    expires,
                },
            );
        Ok(token)
    }

    /// Sends a request for `path` (starting with `/v2/`) with auth; returns a 2xx response or an
    /// error carrying the status.
    pub async fn send(
        &self,
        method: Method,
        repo: Option<&RepoName>,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        self.check_circuit()?;
        let result = self.send_inner(method, repo, path, headers).await;
        match &result {
            Ok(_) => self.record_success(),
            Err(e) => {
                if !e.is_unavailable() {
                    // The upstream answered (404, 401, …): it is up.
                    self.record_success();
                }
                self.record_failure(e);
            }
        }
        result
    }

    async fn send_inner(
        &self,
        method: Method,
        repo: Option<&RepoName>,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        let name = self.name();
        let scope = repo
            .map(|r| format!("repository:{r}:pull"))
            .unwrap_or_default();
        let mut refreshed = false;
        loop {
            let mut req = self
                .client
                .request(method.clone(), self.url(path))
                .headers(headers.clone());
            if let Some(tok) = self.cached_token(&scope) {
                req = req.bearer_auth(tok);
            } else if let (true, Some(c)) = (
                self.basic.load(std::sync::atomic::Ordering::Relaxed),
                &self.config.credentials,
            ) {
                req = self.with_basic(req, c);
            }
            let resp = tokio::time::timeout(self.config.header_timeout, req.send())
                .await
                .map_err(|_| UpstreamError::Timeout {
                    upstream: name.to_owned(),
                    what: "response headers",
                })?
                .map_err(|e| classify(name, e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                refreshed = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                match challenge {
                    Some(ch) if ch.scheme == "bearer" => {
                        self.tokens
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&scope);
                        self.fetch_token(&ch, &scope).await?;
                        continue;
                    }
                    Some(ch) if ch.scheme == "basic" && self.config.credentials.is_some() => {
                        self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    _ => {}
                }
            }
            if status.is_success() {
                return Ok(resp);
            }
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Err(UpstreamError::Status {
                upstream: name.to_owned(),
                status: status.as_u16(),
                path: path.to_owned(),
                retry_after,
            });
        }
    }

    /// Reads the next body chunk, bounded by the idle timeout.
    pub async fn next_chunk(&self, resp: &mut Response) -> Result<Option<Bytes>, UpstreamError> {
        let r = match tokio::time::timeout(self.config.idle_timeout, resp.chunk()).await {
            Err(_) => Err(UpstreamError::Timeout {
                upstream: self.name().to_owned(),
                what: "the next body chunk",
            }),
            Ok(r) => r.map_err(|e| classify(self.name(), e)),
        };
        if let Err(e) = &r {
            self.record_failure(e);
        }
        r
    }

    /// Reads a whole (small) body, refusing more than `max` bytes.
    pub async fn read_body(
        &self,
        mut resp: Response,
        max: u64,
        what: &str,
    ) -> Result<Bytes, UpstreamError> {
        let too_big = || UpstreamError::Invalid {
            upstream: self.name().to_owned(),
            detail: format!("{what} is larger than {max} bytes"),
        };
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(too_big());
        }
        let mut buf = Vec::new();
        while let Some(chunk) = self.next_chunk(&mut resp).await? {
            if buf.len() as u64 + chunk.len() as u64 > max {
                return Err(too_big());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    }

    fn manifest_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        h
    }

    fn digest_header(&self, resp: &Response) -> Result<Option<Digest>, UpstreamError> {
        match resp.headers().get("docker-content-digest") {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .map(Some)
                .ok_or_else(|| UpstreamError::Invalid {
                    upstream: self.name().to_owned(),
                    detail: format!("malformed Docker-Content-Digest {v:?}"),
                }),
        }
    }

    /// `HEAD /v2/<repo>/manifests/<reference>`.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
    ) -> Result<ManifestHead, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(Method::HEAD, Some(repo), &path, Self::manifest_headers())
            .await?;
        Ok(ManifestHead {
            digest: self.digest_header(&resp)?,
            media_type: content_type(&resp),
            size: resp.content_length(),
        })
    }

    /// `GET /v2/<repo>/manifests/<reference>`, at most `max` bytes.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        max: u64,
    ) -> Result<FetchedManifest, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(Method::GET, Some(repo), &path, Self::manifest_headers())
            .await?;
        let header_digest = self.digest_header(&resp)?;
        let media_type = content_type(&resp);
        let bytes = self.read_body(resp, max, "manifest").await?;
        let media_type = media_type
            .or_else(|| media_type_from_body(&bytes))
            .ok_or_else(|| UpstreamError::Invalid {
                upstream: self.name().to_owned(),
                detail: "manifest without a media type".into(),
            })?;
        Ok(FetchedManifest {
            bytes,
            media_type,
            header_digest,
        })
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`: the size if the upstream has it for `repo`.
    pub async fn head_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{d}");
        let resp = self
            .send(Method::HEAD, Some(repo), &path, HeaderMap::new())
            .await?;
        Ok(resp.content_length())
    }

    /// `GET /v2/<repo>/blobs/<digest>`, from byte `from` when resuming.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        from: u64,
    ) -> Result<Response, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{d}");
        let mut h = HeaderMap::new();
        if from > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={from}-")) {
                h.insert(reqwest::header::RANGE, v);
            }
        }
        let resp = self.send(Method::GET, Some(repo), &path, h).await?;
        if from > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(UpstreamError::Invalid {
                upstream: self.name().to_owned(),
                detail: format!(
                    "asked for bytes from {from} but got status {}",
                    resp.status()
                ),
            });
        }
        Ok(resp)
    }

    /// `GET` of a small JSON document (tags list, referrers), with its `Link` header.
    pub async fn get_json(
        &self,
        repo: &RepoName,
        path_and_query: &str,
    ) -> Result<(Bytes, Option<String>), UpstreamError> {
        let resp = self
            .send(Method::GET, Some(repo), path_and_query, HeaderMap::new())
            .await?;
        let link = resp
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = self.read_body(resp, 16 << 20, "listing").await?;
        Ok((body, link))
    }
}

/// Probes a down upstream with exponential backoff until it answers, then closes the circuit.
async fn probe_until_up(upstream: Weak<Upstream>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::time::sleep(backoff).await;
        let Some(up) = upstream.upgrade() else { return };
        if up.is_up() {
            return;
        }
        if up.probe().await {
            up.record_success();
            return;
        }
        tracing::debug!(
            upstream = up.name(),
            next_probe_s = backoff.as_secs_f64() * 2.0,
            "upstream still down"
        );
        backoff = (backoff * 2).min(up.config.probe_max_interval);
    }
}

fn content_type(resp: &Response) -> Option<String> {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
        .filter(|s| !s.is_empty() && s != "application/octet-stream" && s != "text/plain")
}

/// The `mediaType` field of a manifest body, when the upstream sent no usable Content-Type.
pub fn media_type_from_body(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<M>(bytes).ok()?.media_type
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_bearer_challenge() {
        let ch = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .expect("parses");
        assert_eq!(ch.scheme, "bearer");
        assert_eq!(ch.params["realm"], "https://auth.docker.io/token");
        assert_eq!(ch.params["service"], "registry.docker.io");
        assert_eq!(ch.params["scope"], "repository:library/alpine:pull,push");
    }

    #[test]
    fn parses_basic_challenge_and_junk() {
        let ch = parse_challenge(r#"Basic realm="Registry Realm""#).expect("parses");
        assert_eq!(ch.scheme, "basic");
        assert_eq!(ch.params["realm"], "Registry Realm");
        assert!(parse_challenge("").is_none());
        let ch = parse_challenge("Bearer garbage").expect("scheme only");
        assert!(ch.params.is_empty());
    }

    #[test]
    fn media_type_falls_back_to_body() {
        assert_eq!(
            media_type_from_body(br#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#)
                .as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(media_type_from_body(b"not json"), None);
    }
}

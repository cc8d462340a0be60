//! The upstream registry client: requests for manifests, blobs and JSON listings, and reading
//! their bodies with bounded waits.
//!
//! One [`Upstream`] per configured registry. Every request has a connect timeout (in the client),
//! a time limit for the response headers, and callers read bodies with [`Upstream::next_chunk`],
//! which bounds the idle time between chunks. Requests are sent on the runtime given to
//! [`Upstream::new`] (the server's background runtime, through `crate::runtime::on_runtime`),
//! wherever the caller runs, so that the pooled connections live there and not on the shard of
//! the request that opened them. The rest
//! lives beside this file: failures and their causes (`error.rs`), auth and the token cache
//! (`auth.rs`), the circuit breaker and its probe (`breaker.rs`), the rate-limit headers and the
//! `Retry-After` hold (`ratelimit.rs`), and the address policy for redirects and token realms
//! (`redirect.rs`).

mod auth;
mod breaker;
mod error;
mod ratelimit;
mod redirect;

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT};
use reqwest::{Method, Response, StatusCode};

use crate::config::UpstreamConfig;
use crate::oci::manifest::{json_depth, media_type_from_body};
use crate::oci::media::Accept;
use crate::oci::reference::{Digest, RepoName};
use crate::runtime::on_runtime;
use crate::telemetry::metrics::Metrics;

use error::classify;

pub use auth::{parse_challenge, Challenge};
pub use breaker::UpstreamStatus;
pub use error::{Cause, UpstreamError};
pub use ratelimit::{
    parse_quota, parse_retry_after, whole_seconds, QuotaValue, RateLimitSnapshot, RateLimitStatus,
    MAX_HOLD, MAX_WINDOW, RATELIMIT_HEADERS,
};
pub use redirect::{check_redirect, host_class, HostClass, Refused, MAX_REDIRECTS};

/// Deepest nesting of JSON arrays and objects accepted from an upstream (manifests, listings,
/// token answers). serde_json itself stops at 128; this refuses such documents before parsing.
pub const MAX_JSON_DEPTH: usize = 64;

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
    auth: auth::Auth,
    breaker: Mutex<breaker::Breaker>,
    ratelimit: Mutex<ratelimit::RateLimit>,
    metrics: Arc<Metrics>,
    me: Weak<Upstream>,
    /// Where requests are sent and their connections driven (the server's background runtime).
    runtime: tokio::runtime::Handle,
}

impl Upstream {
    /// A client for one registry, sending its requests on `runtime`. Contacts nothing.
    pub fn new(
        config: UpstreamConfig,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Upstream>, UpstreamError> {
        let invalid = |detail: String, source: Cause| UpstreamError::Invalid {
            upstream: config.name.clone(),
            detail,
            source: Some(source),
        };
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                invalid(
                    format!("cannot read ca_file {}", path.display()),
                    Arc::new(e),
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                invalid(
                    format!("invalid PEM in ca_file {}", path.display()),
                    Arc::new(e),
                )
            })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("regcache/", env!("CARGO_PKG_VERSION")))
            .redirect(redirect::policy(
                config.url.clone(),
                config.allow_private_redirects,
            ))
            .build()
            .map_err(|e| invalid("cannot build the HTTP client".into(), Arc::new(e)))?;
        metrics
            .upstream_up
            .get_or_create(&Metrics::upstream(&config.name))
            .set(1);
        // At 0 from the start, so that bytes saved and fetched are known before the first fill.
        Metrics::at_zero(&metrics.bytes_fetched, "upstream", &[&config.name]);
        for kind in UpstreamError::COUNTED_KINDS {
            drop(metrics.upstream_errors.get_or_create(&vec![
                ("upstream", config.name.clone()),
                ("kind", kind.to_owned()),
            ]));
        }
        Ok(Arc::new_cyclic(|me| Upstream {
            config,
            client,
            auth: auth::Auth::default(),
            breaker: Mutex::new(breaker::Breaker::default()),
            ratelimit: Mutex::new(ratelimit::RateLimit::default()),
            metrics,
            me: me.clone(),
            runtime,
        }))
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The address of `path` (`/v2/…`, with its query if any) on this upstream. Joined as text
    /// on purpose: `Url::join` would replace the configured URL's own path (`https://h/mirror/`)
    /// with the absolute `path`, and `set_path` would escape the `?` of a query.
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.url.as_str().trim_end_matches('/'), path)
    }

    /// An [`UpstreamError::Invalid`] of this upstream.
    fn invalid(&self, detail: impl Into<String>, source: Option<Cause>) -> UpstreamError {
        UpstreamError::Invalid {
            upstream: self.name().to_owned(),
            detail: detail.into(),
            source,
        }
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
        let result = self.send_on_runtime(method, repo, path, headers).await;
        if let Err(UpstreamError::Status {
            status: 429,
            retry_after: Some(v),
            ..
        }) = &result
        {
            self.hold(v);
        }
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

    /// [`Upstream::send_inner`] as a task of this upstream's runtime ([`on_runtime`]), so that
    /// its pooled connections live there and not on the shard of the request that opened them.
    async fn send_on_runtime(
        &self,
        method: Method,
        repo: Option<&RepoName>,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        let Some(me) = self.me.upgrade() else {
            // Not in an `Arc` (it always is, from `new`): send from here.
            return self.send_inner(method, repo, path, headers).await;
        };
        let (repo, path) = (repo.cloned(), path.to_owned());
        let sent = async move { me.send_inner(method, repo.as_ref(), &path, headers).await };
        on_runtime(&self.runtime, sent)
            .await
            .unwrap_or_else(|stopped| {
                Err(UpstreamError::Unreachable {
                    upstream: self.name().to_owned(),
                    source: Arc::new(stopped),
                })
            })
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
            let req = self
                .client
                .request(method.clone(), self.url(path))
                .headers(headers.clone());
            let req = self.authorize(req, &scope);
            let resp = tokio::time::timeout(self.config.header_timeout, req.send())
                .await
                .map_err(|_| UpstreamError::Timeout {
                    upstream: name.to_owned(),
                    what: "response headers",
                })?
                .map_err(|e| classify(name, e))?;
            self.observe(resp.headers());
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                refreshed = true;
                if self.answer_challenge(&resp, &scope).await? {
                    continue;
                }
            }
            if status.is_success() {
                return Ok(resp);
            }
            if status.is_redirection() {
                // A redirect reqwest did not follow (a Location that is not an http(s) URL): the
                // upstream misbehaves, it is not down. Only the target's scheme and host are
                // named: a redirect often carries a signed query.
                let target = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| reqwest::Url::parse(l).ok())
                    .map_or_else(
                        || "an unusable Location".to_owned(),
                        |u| format!("{}://{}", u.scheme(), u.host_str().unwrap_or("")),
                    );
                return Err(self.invalid(
                    format!(
                        "refused to follow the upstream's redirect ({status}) to {target}: only \
                         http and https are followed"
                    ),
                    None,
                ));
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
        let r = self.chunk_in_time(resp).await;
        if let Err(e) = &r {
            self.record_failure(e);
        }
        r
    }

    /// [`Upstream::next_chunk`] without counting a failure.
    async fn chunk_in_time(&self, resp: &mut Response) -> Result<Option<Bytes>, UpstreamError> {
        match tokio::time::timeout(self.config.idle_timeout, resp.chunk()).await {
            Err(_) => Err(UpstreamError::Timeout {
                upstream: self.name().to_owned(),
                what: "the next body chunk",
            }),
            Ok(r) => r.map_err(|e| classify(self.name(), e)),
        }
    }

    /// Reads a whole (small) body, refusing more than `max` bytes.
    pub async fn read_body(
        &self,
        resp: Response,
        max: u64,
        what: &str,
    ) -> Result<Bytes, UpstreamError> {
        let r = self.collect_body(resp, max, what).await;
        if let Err(e) = &r {
            self.record_failure(e);
        }
        r
    }

    /// [`Upstream::read_body`] without counting a failure.
    async fn collect_body(
        &self,
        mut resp: Response,
        max: u64,
        what: &str,
    ) -> Result<Bytes, UpstreamError> {
        let too_big = || self.invalid(format!("{what} is larger than {max} bytes"), None);
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(too_big());
        }
        let mut buf = Vec::new();
        while let Some(chunk) = self.chunk_in_time(&mut resp).await? {
            if buf.len() as u64 + chunk.len() as u64 > max {
                return Err(too_big());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    }

    /// Refuses a JSON document nested deeper than [`MAX_JSON_DEPTH`] (counted as an upstream
    /// error in the metrics).
    fn check_depth(&self, body: &[u8], what: &str) -> Result<(), UpstreamError> {
        let depth = json_depth(body);
        if depth <= MAX_JSON_DEPTH {
            return Ok(());
        }
        let e = self.invalid(
            format!("{what} nests JSON {depth} levels deep (the limit is {MAX_JSON_DEPTH})"),
            None,
        );
        self.record_failure(&e);
        Err(e)
    }

    /// Asks for the manifest types `accept` names (none: no `Accept`).
    fn manifest_headers(accept: Accept) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = accept
            .header_value()
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            h.insert(ACCEPT, v);
        }
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
                .ok_or_else(|| {
                    self.invalid(format!("malformed Docker-Content-Digest {v:?}"), None)
                }),
        }
    }

    /// `HEAD /v2/<repo>/manifests/<reference>`, for a client accepting `accept`.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        accept: Accept,
    ) -> Result<ManifestHead, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(
                Method::HEAD,
                Some(repo),
                &path,
                Self::manifest_headers(accept),
            )
            .await?;
        Ok(ManifestHead {
            digest: self.digest_header(&resp)?,
            media_type: content_type(&resp),
            size: header_length(&resp),
        })
    }

    /// `GET /v2/<repo>/manifests/<reference>` for a client accepting `accept`, at most `max` bytes.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        max: u64,
        accept: Accept,
    ) -> Result<FetchedManifest, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(
                Method::GET,
                Some(repo),
                &path,
                Self::manifest_headers(accept),
            )
            .await?;
        let header_digest = self.digest_header(&resp)?;
        let media_type = content_type(&resp);
        let bytes = self.read_body(resp, max, "manifest").await?;
        self.check_depth(&bytes, "manifest")?;
        let media_type = media_type
            .or_else(|| media_type_from_body(&bytes))
            .ok_or_else(|| self.invalid("manifest without a media type", None))?;
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
        Ok(header_length(&resp))
    }

    /// `GET /v2/<repo>/blobs/<digest>`, from byte `from` when resuming a blob of `total` bytes
    /// (when known). A resumed read must be a `206` whose `Content-Range` starts at `from` (and
    /// names `total`, if the server states one): any other answer would put bytes in the wrong
    /// place.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        from: u64,
        total: Option<u64>,
    ) -> Result<Response, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{d}");
        let mut h = HeaderMap::new();
        if from > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={from}-")) {
                h.insert(reqwest::header::RANGE, v);
            }
        }
        let resp = self.send(Method::GET, Some(repo), &path, h).await?;
        if from == 0 {
            return Ok(resp);
        }
        let range = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .map(|v| v.to_str().unwrap_or("(not text)"));
        let checked = if resp.status() == StatusCode::PARTIAL_CONTENT {
            check_content_range(range, from, total)
        } else {
            Err(format!("got status {}", resp.status()))
        };
        if let Err(detail) = checked {
            let e = self.invalid(format!("asked for bytes from {from}: {detail}"), None);
            self.record_failure(&e);
            return Err(e);
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
        self.check_depth(&body, "listing")?;
        Ok((body, link))
    }
}

/// Checks the `Content-Range` of a `206` to a request for the bytes from `from` of a blob of
/// `total` bytes (when known): `bytes <from>-<last>/<total or *>`.
fn check_content_range(range: Option<&str>, from: u64, total: Option<u64>) -> Result<(), String> {
    let Some(range) = range else {
        return Err("the 206 has no Content-Range".into());
    };
    let parsed = range
        .trim()
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(span, size)| {
            let (first, last) = span.split_once('-')?;
            let first: u64 = first.trim().parse().ok()?;
            let last: u64 = last.trim().parse().ok()?;
            let size = match size.trim() {
                "*" => None,
                n => Some(n.parse::<u64>().ok()?),
            };
            (first <= last).then_some((first, size))
        });
    match parsed {
        None => Err(format!("unreadable Content-Range {range:?}")),
        Some((first, _)) if first != from => Err(format!(
            "the 206 starts at byte {first} (Content-Range {range:?})"
        )),
        Some((_, Some(size))) if total.is_some_and(|t| t != size) => Err(format!(
            "the 206 is for a blob of {size} bytes, not {} (Content-Range {range:?})",
            total.unwrap_or(0)
        )),
        Some(_) => Ok(()),
    }
}

/// The `Content-Length` header (reqwest's `content_length()` is the body's size, 0 for a HEAD).
pub fn header_length(resp: &Response) -> Option<u64> {
    resp.headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn content_type(resp: &Response) -> Option<String> {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
        .filter(|s| !s.is_empty() && s != "application/octet-stream" && s != "text/plain")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_read_must_start_where_it_was_asked_to_in_a_blob_of_the_known_size() {
        let ok = [
            ("bytes 150000-299999/300000", Some(300_000)),
            ("bytes 150000-299999/*", Some(300_000)),
            ("bytes 150000-299999/300000", None),
            ("bytes 150000-150000/300000", Some(300_000)),
        ];
        for (range, total) in ok {
            assert_eq!(
                check_content_range(Some(range), 150_000, total),
                Ok(()),
                "{range} for {total:?}"
            );
        }
        let refused = [
            (None, Some(300_000), "no Content-Range"),
            (
                Some("bytes 0-149999/300000"),
                Some(300_000),
                "starts at byte 0",
            ),
            (
                Some("bytes 150001-299999/300000"),
                None,
                "starts at byte 150001",
            ),
            (
                Some("bytes 150000-299999/400000"),
                Some(300_000),
                "of 400000 bytes",
            ),
            (Some("bytes 150000-149999/300000"), None, "unreadable"),
            (Some("bytes */300000"), None, "unreadable"),
            (Some("items 150000-299999/300000"), None, "unreadable"),
        ];
        for (range, total, why) in refused {
            let e = check_content_range(range, 150_000, total)
                .expect_err(&format!("{range:?} for {total:?} must be refused"));
            assert!(e.contains(why), "{range:?}: {e}");
        }
    }
}

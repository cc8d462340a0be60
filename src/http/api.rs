//! The HTTP API: the pull side of the OCI distribution spec, routing to upstreams, OCI errors.
//!
//! Paths are parsed here into [`RepoName`], [`Reference`] and [`Digest`] values, and requests are
//! routed to an upstream by `?ns=` (containerd), a leading host segment (podman mirrors with a
//! path), or else the default upstream. Every error leaves as OCI error JSON.
//!
//! Access control is applied here before anything else: the request target's length
//! (`limits.max_uri_length`), the client address (`access.allow`), Basic credentials
//! (`access.htpasswd`), and, once a request is routed, the upstream's `allow_repos` and
//! `deny_repos`, so that a refused repository never reaches the cache or the upstream.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

use crate::app::App;
use crate::cache::{self, BlobSource, CacheError, Outcome, Route};
use crate::http::access::Verdict;
use crate::http::body::{self, BodyChunk};
use crate::oci::media::{self, Accept};
use crate::oci::reference::{Digest, ParseError, Reference, RepoName};
use crate::upstream::UpstreamError;

pub type Body = BoxBody<Bytes, io::Error>;

/// Largest `n` accepted on tag and catalog listings by default (`limits.max_page`).
pub const MAX_PAGE: usize = 10_000;

/// An error answered to a client as OCI error JSON.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<String>,
    /// Ask for Basic credentials (`WWW-Authenticate`), with a 401.
    pub challenge: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            challenge: false,
        }
    }

    fn unsupported(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            format!("{what}: regcache is a read-only mirror"),
        )
    }

    fn into_response(self, head: bool) -> Response<Body> {
        let body = serde_json::json!({
            "errors": [{"code": self.code, "message": self.message, "detail": null}]
        })
        .to_string();
        let len = body.len();
        let mut resp = Response::new(if head { empty() } else { full(body) });
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if let Some(v) = self
            .retry_after
            .and_then(|r| HeaderValue::from_str(&r).ok())
        {
            h.insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        if self.challenge {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"regcache\""),
            );
        }
        resp
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Name(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string())
            }
            ParseError::Tag(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "TAG_INVALID", e.to_string())
            }
            ParseError::Digest(_) | ParseError::Algorithm(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string())
            }
        }
    }
}

/// What kind of object a request was about, to pick the right "unknown" code.
#[derive(Clone, Copy)]
enum Object {
    Manifest,
    Blob,
    Repository,
}

fn cache_error(e: CacheError, object: Object) -> ApiError {
    match &e {
        CacheError::Upstream(u) => upstream_error(u, object),
        CacheError::NotAcceptable(why) => {
            ApiError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", *why)
        }
        CacheError::NotStored(why) => match object {
            Object::Blob => ApiError::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", *why),
            _ => ApiError::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", *why),
        },
        CacheError::DigestMismatch { .. } | CacheError::SizeMismatch { .. } => {
            tracing::error!(error = %e, "upstream sent content that failed verification");
            ApiError::new(StatusCode::BAD_GATEWAY, "UNKNOWN", e.to_string())
        }
        CacheError::Busy(msg) => ApiError {
            retry_after: Some("5".into()),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", msg.clone())
        },
        CacheError::Store(_) | CacheError::Internal(_) => {
            tracing::error!(error = %e, "internal error");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "internal error; see the regcache log",
            )
        }
    }
}

fn upstream_error(u: &UpstreamError, object: Object) -> ApiError {
    match u {
        UpstreamError::Status { status: 404, .. } => match object {
            Object::Manifest => ApiError::new(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown to the upstream",
            ),
            Object::Blob => ApiError::new(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to the upstream",
            ),
            Object::Repository => ApiError::new(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "repository unknown to the upstream",
            ),
        },
        UpstreamError::Status { status: 401, .. } => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "the upstream refused regcache's credentials for this repository",
        ),
        UpstreamError::Status { status: 403, .. } => ApiError::new(
            StatusCode::FORBIDDEN,
            "DENIED",
            "the upstream denied access to this repository",
        ),
        UpstreamError::Status {
            status: 429,
            retry_after,
            ..
        } => ApiError {
            retry_after: retry_after.clone().or_else(|| Some("30".into())),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                u.to_string(),
            )
        },
        UpstreamError::Invalid { .. } => {
            tracing::warn!(error = %u, "refused an invalid upstream response");
            ApiError::new(StatusCode::BAD_GATEWAY, "UNKNOWN", u.to_string())
        }
        // Unreachable, timed out, 5xx, a token service that gave no token, anything else: the
        // upstream is unavailable. Never a 404, which would tell the client the image does not
        // exist.
        _ => ApiError {
            retry_after: Some("10".into()),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                u.to_string(),
            )
        },
    }
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn channel_body(rx: mpsc::Receiver<BodyChunk>) -> Body {
    let s = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (c.map(Frame::data), rx))
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// The parsed shape of a `/v2/…` path.
#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    Base,
    Catalog,
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    Upload,
    Tags(&'a str),
    Referrers(&'a str, &'a str),
    Unknown,
}

impl Endpoint<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Base => "base",
            Endpoint::Catalog => "catalog",
            Endpoint::Manifest(..) => "manifest",
            Endpoint::Blob(..) => "blob",
            Endpoint::Upload => "upload",
            Endpoint::Tags(_) => "tags",
            Endpoint::Referrers(..) => "referrers",
            Endpoint::Unknown => "other",
        }
    }
}

/// `/healthz`, `/readyz` and `/metrics`, outside the registry API.
fn ops_endpoint(
    app: &Arc<App>,
    path: &str,
    method: &Method,
    info: &mut LogInfo,
) -> Option<Result<Response<Body>, ApiError>> {
    let head = method == Method::HEAD;
    let (route, resp) = match path {
        "/healthz" => ("healthz", plain(StatusCode::OK, "ok\n", "text/plain", head)),
        "/readyz" => {
            let store_ok = app.cache.store.check();
            let upstreams: Vec<_> = app
                .routing()
                .upstreams()
                .iter()
                .map(|u| u.status())
                .collect();
            let mut body = serde_json::json!({
                "ready": store_ok.is_ok(),
                "store_full": app.cache.store.is_full(),
                "store_used_bytes": app.cache.store.used_bytes(),
                "store": match &store_ok { Ok(()) => "ok".to_owned(), Err(e) => e.to_string() },
                "upstreams": upstreams,
            });
            if let Some(b) = app.cache.bucket() {
                // Like an upstream, a bucket that is down does not make regcache unready.
                body["bucket"] = serde_json::json!({ "up": b.is_up() });
            }
            if let Some(p) = app.cache.peers() {
                // Nor do peers: a server can always serve what it holds and go upstream.
                body["peers"] = serde_json::json!(p.status());
            }
            let status = if store_ok.is_ok() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut r = json_response(&body, head, "application/json");
            *r.status_mut() = status;
            ("readyz", r)
        }
        "/metrics" => {
            app.refresh_store_metrics();
            (
                "metrics",
                plain(
                    StatusCode::OK,
                    app.metrics.render(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    head,
                ),
            )
        }
        _ => return None,
    };
    info.route = route;
    if method != Method::GET && method != Method::HEAD {
        return Some(Err(ApiError::unsupported(&format!("{method}"))));
    }
    Some(Ok(resp))
}

fn plain(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
    head: bool,
) -> Response<Body> {
    let body = body.into();
    let len = body.len();
    let mut r = Response::new(if head { empty() } else { full(body) });
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// Splits a request path into its endpoint and the raw name, reference and digest segments (not
/// yet validated).
pub fn parse_path(path: &str) -> Endpoint<'_> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Endpoint::Unknown;
    };
    if rest.is_empty() || rest == "/" {
        return Endpoint::Base;
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Endpoint::Unknown;
    };
    if rest == "_catalog" {
        return Endpoint::Catalog;
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Endpoint::Tags(name);
    }
    if rest.contains("/blobs/uploads") {
        return Endpoint::Upload;
    }
    for (sep, kind) in [("/manifests/", 0), ("/blobs/", 1), ("/referrers/", 2)] {
        if let Some(i) = rest.rfind(sep) {
            let (name, r) = (&rest[..i], &rest[i + sep.len()..]);
            return match kind {
                0 => Endpoint::Manifest(name, r),
                1 => Endpoint::Blob(name, r),
                _ => Endpoint::Referrers(name, r),
            };
        }
    }
    Endpoint::Unknown
}

/// Query parameters regcache reads.
#[derive(Debug, Default)]
pub struct Query {
    pub ns: Option<String>,
    pub n: Option<String>,
    pub last: Option<String>,
    pub artifact_type: Option<String>,
}

/// Decodes `%XX` escapes and `+`; `None` for a bad escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The parameters regcache reads from a query string (others, and undecodable values, ignored).
pub fn parse_query(q: Option<&str>) -> Query {
    let mut out = Query::default();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(v) = percent_decode(v) else { continue };
        match k {
            "ns" => out.ns = Some(v),
            "n" => out.n = Some(v),
            "last" => out.last = Some(v),
            "artifactType" => out.artifact_type = Some(v),
            _ => {}
        }
    }
    out
}

/// The `n` of a listing: a number from 0 to `max` (`limits.max_page`).
pub fn parse_n(n: Option<&str>, max: usize) -> Result<Option<usize>, ApiError> {
    match n {
        None => Ok(None),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n <= max && s.bytes().all(|c| c.is_ascii_digit()) => Ok(Some(n)),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "PAGINATION_NUMBER_INVALID",
                format!("n must be a number from 0 to {max} (limits.max_page)"),
            )),
        },
    }
}

/// A `bytes=` range, resolved against a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    From(u64),
    FromTo(u64, u64),
    Suffix(u64),
}

/// Parses a single `Range: bytes=…`; `None` means "ignore it and send everything" (absent,
/// malformed or multi-range, as RFC 9110 allows).
pub fn parse_range(h: Option<&HeaderValue>) -> Option<RangeSpec> {
    let s = h?.to_str().ok()?.trim();
    let spec = s.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, false) => b.parse().ok().map(RangeSpec::Suffix),
        (false, true) => a.parse().ok().map(RangeSpec::From),
        (false, false) => {
            let (x, y) = (a.parse().ok()?, b.parse().ok()?);
            (x <= y).then_some(RangeSpec::FromTo(x, y))
        }
        (true, true) => None,
    }
}

impl RangeSpec {
    /// Inclusive byte positions within `size`, or `None` when unsatisfiable.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            RangeSpec::From(a) if a < size => Some((a, size - 1)),
            RangeSpec::FromTo(a, b) if a < size => Some((a, b.min(size - 1))),
            RangeSpec::Suffix(n) if n > 0 && size > 0 => Some((size - n.min(size), size - 1)),
            _ => None,
        }
    }
}

/// Per-request facts for the access log and the headers every answer gets.
#[derive(Clone, Default)]
pub struct LogInfo {
    pub outcome: Option<Outcome>,
    pub route: &'static str,
    /// The `ns` query parameter, once it has routed the request to an upstream.
    pub namespace: Option<String>,
    /// Set for a request from a peer (`[peers]`) whose token was right.
    pub peer: Option<crate::http::peer::PeerCall>,
}

/// Response header naming the `ns` a request was routed by (the distribution spec's registry
/// proxying).
pub const NAMESPACE_HEADER: &str = "oci-namespace";

/// Response header naming the cache outcome (`hit`, `miss`, `stale`, …).
pub const CACHE_HEADER: &str = "x-regcache-cache";

/// Path prefix of the operator endpoints (gc, verify, pins): loopback clients only.
pub const ADMIN_PREFIX: &str = "/_regcache/";

/// Header every operator request must carry (`regcache gc`, `verify`, `pin` and `prefetch --pin`
/// send it). A web page cannot add a custom header to a cross-origin request without a CORS
/// preflight, which regcache never grants.
pub const OPERATOR_HEADER: &str = "x-regcache-operator";

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "UNSUPPORTED", msg)
}

/// The operator endpoints used by `regcache gc`, `verify` and `pin` while a server runs.
async fn admin(
    app: &Arc<App>,
    peer: std::net::SocketAddr,
    req: &Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "DENIED",
            "operator endpoints answer loopback clients only",
        ));
    }
    operator_request(req.headers())?;
    let path = &req.uri().path()[ADMIN_PREFIX.len()..];
    let q: std::collections::HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((k.to_owned(), percent_decode(v)?))
        })
        .collect();
    let internal = |e: &dyn std::fmt::Display| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", e.to_string())
    };
    let method = req.method();
    match (method.as_str(), path) {
        ("POST", "gc") => {
            let target = match q.get("target") {
                Some(t) => Some(crate::config::parse_size(t).map_err(bad_request)?),
                None => None,
            };
            let report = app.collect(target).await.map_err(|e| internal(&e))?;
            let body = serde_json::json!({
                "evicted": report,
                "used_bytes": app.cache.store.used_bytes(),
            });
            Ok(json_response(&body, false, "application/json"))
        }
        // A check re-reads the whole store: a POST, so that no page can make a browser start one.
        ("POST", "verify") => {
            let opts = crate::store::verify::Options {
                hash: q.get("hash").is_none_or(|v| v != "false"),
                sample: q.get("sample").and_then(|n| n.parse().ok()),
                repair: q.get("repair").is_some_and(|v| v == "true"),
            };
            let store = Arc::clone(&app.cache.store);
            let report = tokio::task::spawn_blocking(move || {
                crate::store::verify::check(&store, opts, true, &mut ())
            })
            .await
            .map_err(|e| internal(&e))?
            .map_err(|e| internal(&e))?;
            let body = serde_json::to_value(&report).map_err(|e| internal(&e))?;
            Ok(json_response(&body, false, "application/json"))
        }
        ("GET", "pins") => {
            let pins = app
                .routing()
                .pin_names(&app.cache.store)
                .map_err(|e| internal(&e))?;
            Ok(json_response(
                &serde_json::json!({ "pins": pins }),
                false,
                "application/json",
            ))
        }
        ("POST" | "DELETE", "pins") => {
            let image = q
                .get("image")
                .ok_or_else(|| bad_request("the image parameter is required"))?;
            let r = crate::oci::reference::ImageRef::parse(image)?;
            let route = app.route(&r.name, None)?;
            let reference = r.reference();
            if method == Method::POST {
                // Through the cache, so that an image not cached yet is fetched; one that does
                // not exist (or cannot be had now) is not pinned.
                app.cache
                    .manifest(&route, &reference, Accept::ALL)
                    .await
                    .map_err(|e| {
                        let e = cache_error(e, Object::Manifest);
                        ApiError {
                            message: format!("cannot pin {image}: {}", e.message),
                            ..e
                        }
                    })?;
            }
            let reference = reference.to_string();
            let store = &app.cache.store;
            let changed = if method == Method::POST {
                store.pin(&route.key(), &reference).map(|()| true)
            } else {
                store.unpin(&route.key(), &reference)
            }
            .map_err(|e| internal(&e))?;
            let body = serde_json::json!({ "image": image, "changed": changed });
            Ok(json_response(&body, false, "application/json"))
        }
        (_, "gc" | "verify" | "pins") => {
            let allow = if path == "pins" {
                "GET, POST, DELETE"
            } else {
                "POST"
            };
            let mut resp = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                format!("{method} {}: use {allow}", req.uri().path()),
            )
            .into_response(method == Method::HEAD);
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            Ok(resp)
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            format!("no such operator endpoint: {method} {}", req.uri().path()),
        )),
    }
}

/// Refuses an operator request that a web page could have made a browser send: one with an
/// `Origin` header (every cross-origin request and every browser `POST` has one), one without
/// [`OPERATOR_HEADER`] (which a page can add only after a preflight), and one whose `Host` is a
/// DNS name (a page on a name rebound to 127.0.0.1 is same-origin and may add headers to a `GET`,
/// but its `Host` still names it).
fn operator_request(headers: &HeaderMap) -> Result<(), ApiError> {
    let denied = |m: String| ApiError::new(StatusCode::FORBIDDEN, "DENIED", m);
    if headers.contains_key(header::ORIGIN) {
        return Err(denied(
            "operator endpoints refuse requests with an Origin header (sent by web pages)".into(),
        ));
    }
    if !headers.contains_key(OPERATOR_HEADER) {
        return Err(denied(format!(
            "operator requests need the header {OPERATOR_HEADER} (regcache gc, verify and pin \
             send it)"
        )));
    }
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !address_host(host) {
            return Err(denied(format!(
                "operator requests must name the server by address (127.0.0.1, [::1]) or \
                 localhost, not Host {host:?}"
            )));
        }
    }
    Ok(())
}

/// Whether a `Host` header is an IP address or `localhost` (any port): no DNS name that a web
/// page could have pointed at this machine.
fn address_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Handles one request (never fails: errors become OCI error responses).
pub async fn handle(
    app: Arc<App>,
    peer: std::net::SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let head = method == Method::HEAD;
    let mut info = LogInfo {
        route: route_label(&path),
        ..LogInfo::default()
    };
    let mut user = None;
    let result = match check_access(&app, peer, &req, &mut user, &mut info.peer).await {
        Err((e, limit)) => {
            app.metrics
                .limit_rejections
                .get_or_create(&vec![("limit", limit.to_owned())])
                .inc();
            Err(e)
        }
        Ok(()) if path.starts_with(ADMIN_PREFIX) => admin(&app, peer, &req).await,
        Ok(()) => match crate::http::peer::refuse_self(info.peer) {
            Some(e) => Err(e),
            None => route_request(&app, &req, &mut info).await,
        },
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => e.into_response(head),
    };
    if let Some(o) = info.outcome {
        // How the cache answered: lets `regcache prefetch` (and operators) see hits.
        resp.headers_mut()
            .insert(CACHE_HEADER, HeaderValue::from_static(o.as_str()));
    }
    if let Some(ns) = &info.namespace {
        // Errors included: a 404 for a request routed by `ns` is that registry's answer.
        set_header(resp.headers_mut(), NAMESPACE_HEADER, ns);
    }
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    crate::http::peer::answered(&app, info.peer, &mut resp, bytes, head);
    let m = &app.metrics;
    m.requests
        .get_or_create(&vec![
            ("route", info.route.to_owned()),
            ("status", resp.status().as_u16().to_string()),
        ])
        .inc();
    if let Some(o) = info.outcome {
        m.cache_outcomes
            .get_or_create(&vec![("outcome", o.as_str().to_owned())])
            .inc();
    }
    if !head && resp.status().is_success() {
        m.bytes_served.inc_by(bytes);
    }
    tracing::info!(
        target: "regcache::access",
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        bytes = if head { 0 } else { bytes },
        ms = start.elapsed().as_secs_f64() * 1000.0,
        cache = info.outcome.map_or("-", Outcome::as_str),
        user = user.as_deref().unwrap_or("-"),
        "request"
    );
    Ok(resp)
}

/// The `route` label of a path, for metrics, before the request is checked.
fn route_label(path: &str) -> &'static str {
    match path {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        p if p.starts_with(ADMIN_PREFIX) => "admin",
        p => parse_path(p).label(),
    }
}

/// The checks every request passes before it is looked at: the request target's length, the
/// client's address, a peer request's token (`from_peer`: set when right), and (with
/// `access.htpasswd`) the credentials of any other, except on `/healthz` and `/readyz`. The
/// error comes with the name of the limit, for the metrics.
async fn check_access(
    app: &Arc<App>,
    peer: std::net::SocketAddr,
    req: &Request<hyper::body::Incoming>,
    user: &mut Option<String>,
    from_peer: &mut Option<crate::http::peer::PeerCall>,
) -> Result<(), (ApiError, &'static str)> {
    let routing = app.routing();
    let limits = &routing.config.limits;
    let access = &routing.config.access;
    let target_len = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path().len(), |pq| pq.as_str().len());
    if target_len > limits.max_uri_length {
        return Err((
            ApiError::new(
                StatusCode::URI_TOO_LONG,
                "UNSUPPORTED",
                format!(
                    "the request target is {target_len} bytes; the limit is {} (limits.max_uri_length)",
                    limits.max_uri_length
                ),
            ),
            "max_uri_length",
        ));
    }
    if !crate::http::access::address_allowed(&access.allow, peer.ip()) {
        return Err((
            ApiError::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!("client address {} is not allowed (access.allow)", peer.ip()),
            ),
            "access_allow",
        ));
    }
    if let Some(call) = crate::http::peer::recognise(app, peer, req)? {
        // The fleet's token stands in for client credentials.
        (*user, *from_peer) = (Some("peer".into()), Some(call));
        return Ok(());
    }
    let path = req.uri().path();
    let open = matches!(path, "/healthz" | "/readyz") || path.starts_with(ADMIN_PREFIX);
    if let (Some(htpasswd), false) = (&access.htpasswd, open) {
        let given = req.headers().get(header::AUTHORIZATION);
        match app
            .auth
            .check(htpasswd, given.map(HeaderValue::as_bytes), peer.ip())
            .await
        {
            Verdict::Allowed(u) => *user = Some(u),
            // 429, not 401: the credentials were not checked, so "wrong password" would not be
            // true. Clients treat both as a failed pull.
            Verdict::Limited { retry_after } => {
                let secs =
                    (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1);
                return Err((
                    ApiError {
                        retry_after: Some(format!("{secs}")),
                        ..ApiError::new(
                            StatusCode::TOO_MANY_REQUESTS,
                            "TOOMANYREQUESTS",
                            format!(
                                "too many failed logins from this address; the credentials were \
                                 not checked; retry in {secs} s"
                            ),
                        )
                    },
                    "auth_rate",
                ));
            }
            Verdict::Refused => {
                let message = if given.is_some() {
                    "wrong user name or password"
                } else {
                    "this mirror needs a user name and password"
                };
                return Err((
                    ApiError {
                        challenge: true,
                        ..ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
                    },
                    "auth",
                ));
            }
        }
    }
    Ok(())
}

async fn route_request(
    app: &Arc<App>,
    req: &Request<hyper::body::Incoming>,
    info: &mut LogInfo,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path();
    let method = req.method();
    let head = method == Method::HEAD;
    if let Some(resp) = ops_endpoint(app, path, method, info) {
        return resp;
    }
    let endpoint = parse_path(path);
    if method != Method::GET && method != Method::HEAD {
        return Err(match endpoint {
            Endpoint::Unknown => ApiError::new(
                StatusCode::NOT_FOUND,
                "UNSUPPORTED",
                format!("no such endpoint: {path}"),
            ),
            Endpoint::Upload => ApiError::unsupported("uploads"),
            _ => ApiError::unsupported(&format!("{method}")),
        });
    }
    let query = parse_query(req.uri().query());
    match endpoint {
        Endpoint::Base => {
            // Always answered locally: clients call this before every pull.
            let mut resp = Response::new(if head { empty() } else { full("{}") });
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(2));
            h.insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            Ok(resp)
        }
        Endpoint::Catalog => catalog(app, &query, head),
        Endpoint::Manifest(name, r) => {
            let route = app.route(name, query.ns.as_deref())?;
            info.namespace.clone_from(&query.ns);
            let reference = Reference::parse(r)?;
            let accept = Accept::parse(
                req.headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .map(HeaderValue::as_bytes),
            );
            let (m, checked_at) =
                crate::http::peer::manifest(app, &route, &reference, accept, info.peer)
                    .await
                    .map_err(|e| cache_error(e, Object::Manifest))?;
            info.outcome = Some(m.outcome);
            let mut resp = Response::new(if head { empty() } else { full(m.bytes.clone()) });
            let h = resp.headers_mut();
            set_header(h, header::CONTENT_TYPE, &m.media_type);
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
            set_header(h, "docker-content-digest", &m.digest.to_string());
            set_header(h, header::ETAG, &format!("\"{}\"", m.digest));
            crate::http::peer::checked_at(h, checked_at);
            if m.outcome == Outcome::Stale {
                h.insert(
                    header::WARNING,
                    HeaderValue::from_static("110 regcache \"Response is Stale\""),
                );
            }
            Ok(resp)
        }
        Endpoint::Blob(name, d) => {
            let route = app.route(name, query.ns.as_deref())?;
            info.namespace.clone_from(&query.ns);
            let digest: Digest = d.parse()?;
            let lane = req.extensions().get::<crate::http::sendfile::LaneRef>();
            blob(app, &route, &digest, req.headers(), lane, head, info).await
        }
        Endpoint::Upload => Err(ApiError::unsupported("uploads")),
        Endpoint::Tags(name) => tags(app, name, &query, head, info).await,
        Endpoint::Referrers(name, d) => {
            let route = app.route(name, query.ns.as_deref())?;
            info.namespace.clone_from(&query.ns);
            let digest: Digest = d.parse()?;
            referrers(app, &route, &digest, query.artifact_type.as_deref(), head).await
        }
        Endpoint::Unknown => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            format!("no such endpoint: {path}"),
        )),
    }
}

fn set_header(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

async fn blob(
    app: &Arc<App>,
    route: &Route,
    digest: &Digest,
    headers: &HeaderMap,
    lane: Option<&crate::http::sendfile::LaneRef>,
    head: bool,
    info: &mut LogInfo,
) -> Result<Response<Body>, ApiError> {
    let range = parse_range(headers.get(header::RANGE));
    // A peer gets the bytes, never a redirect to the bucket.
    if !head && info.peer.is_none() {
        let redirect = app
            .cache
            .blob_redirect(route, digest)
            .await
            .map_err(|e| cache_error(e, Object::Blob))?;
        if let Some(url) = redirect {
            info.outcome = Some(cache::Outcome::Shared);
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            set_header(resp.headers_mut(), header::LOCATION, url.as_str());
            set_header(
                resp.headers_mut(),
                "docker-content-digest",
                &digest.to_string(),
            );
            return Ok(resp);
        }
    }
    let asker = info.peer.map(|p| p.asker).unwrap_or_default();
    let b = app
        .cache
        .blob_for(route, digest, !head, asker)
        .await
        .map_err(|e| cache_error(e, Object::Blob))?;
    info.outcome = Some(b.outcome);
    let mut size = b.size;
    if let (Some(_), None, BlobSource::Fill(f)) = (range, size, &b.source) {
        // A range needs the total size; this upstream did not announce it.
        size = Some(
            f.wait_done()
                .await
                .map_err(|e| cache_error(e, Object::Blob))?,
        );
    }
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    set_header(h, "docker-content-digest", &digest.to_string());
    set_header(h, header::ETAG, &format!("\"{digest}\""));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let (start, end) = match (range, size) {
        (Some(r), Some(total)) => match r.resolve(total) {
            Some((a, z)) => {
                *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                set_header(
                    resp.headers_mut(),
                    header::CONTENT_RANGE,
                    &format!("bytes {a}-{z}/{total}"),
                );
                (a, z)
            }
            None => {
                let mut e = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "BLOB_UNKNOWN",
                    format!("range not satisfiable for a blob of {total} bytes"),
                )
                .into_response(head);
                set_header(
                    e.headers_mut(),
                    header::CONTENT_RANGE,
                    &format!("bytes */{total}"),
                );
                return Ok(e);
            }
        },
        (_, Some(total)) => (0, total.wrapping_sub(1)),
        (_, None) => (0, u64::MAX),
    };
    let h = resp.headers_mut();
    if let Some(total) = size {
        let len = if total == 0 { 0 } else { end - start + 1 };
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if head || size == Some(0) {
        return Ok(resp);
    }
    *resp.body_mut() = match b.source {
        BlobSource::File(file, hold) => match lane {
            Some(lane) => {
                let source = crate::http::sendfile::Source {
                    file,
                    hold: Some(hold),
                };
                let s = body::stream_sendfile(Arc::clone(&lane.0), source, start, end)
                    .map(|c| c.map(Frame::data));
                BodyExt::boxed(StreamBody::new(s))
            }
            None => {
                let s = body::stream_file(file, hold, start, end).map(|c| c.map(Frame::data));
                BodyExt::boxed(StreamBody::new(s))
            }
        },
        BlobSource::Fill(reader) => {
            let lane = lane.map(|l| Arc::clone(&l.0));
            channel_body(body::stream_fill(reader, lane, start, end))
        }
        BlobSource::Empty => empty(),
    };
    Ok(resp)
}

fn json_response(
    value: &serde_json::Value,
    head: bool,
    content_type: &'static str,
) -> Response<Body> {
    let body = value.to_string();
    let len = body.len();
    let mut resp = Response::new(if head { empty() } else { full(body) });
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// One page of a sorted list, after `last`, at most `n` long, and whether more follow.
pub fn page(items: Vec<String>, n: Option<usize>, last: Option<&str>) -> (Vec<String>, bool) {
    let mut items: Vec<String> = match last {
        Some(l) => items.into_iter().filter(|t| t.as_str() > l).collect(),
        None => items,
    };
    match n {
        Some(n) if items.len() > n => {
            items.truncate(n);
            (items, true)
        }
        _ => (items, false),
    }
}

fn link_header(
    resp: &mut Response<Body>,
    path: &str,
    n: Option<usize>,
    last: &str,
    ns: Option<&str>,
) {
    let mut q = format!("last={}", url_encode(last));
    if let Some(n) = n {
        q = format!("n={n}&{q}");
    }
    if let Some(ns) = ns {
        q = format!("{q}&ns={}", url_encode(ns));
    }
    set_header(
        resp.headers_mut(),
        header::LINK,
        &format!("<{path}?{q}>; rel=\"next\""),
    );
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn catalog(app: &Arc<App>, q: &Query, head: bool) -> Result<Response<Body>, ApiError> {
    let routing = app.routing();
    let n = parse_n(q.n.as_deref(), routing.config.limits.max_page)?;
    let mut names: Vec<String> = app
        .cache
        .store
        .repos()
        .map_err(|e| cache_error(e.into(), Object::Repository))?
        .into_iter()
        .filter(|(u, r)| routing.repo_listed(u, r))
        .map(|(u, r)| routing.catalog_name(&u, &r))
        .collect();
    names.sort();
    names.dedup();
    let (names, more) = page(names, n, q.last.as_deref());
    let last = names.last().cloned();
    let mut resp = json_response(
        &serde_json::json!({ "repositories": names }),
        head,
        "application/json",
    );
    if let (true, Some(l)) = (more, last) {
        link_header(&mut resp, "/v2/_catalog", n, &l, None);
    }
    Ok(resp)
}

async fn tags(
    app: &Arc<App>,
    name: &str,
    q: &Query,
    head: bool,
    info: &mut LogInfo,
) -> Result<Response<Body>, ApiError> {
    let routing = app.routing();
    let route = routing.route(name, q.ns.as_deref())?;
    info.namespace.clone_from(&q.ns);
    let n = parse_n(q.n.as_deref(), routing.config.limits.max_page)?;
    let mut upstream_query = Vec::new();
    if let Some(n) = n {
        upstream_query.push(format!("n={n}"));
    }
    if let Some(l) = &q.last {
        upstream_query.push(format!("last={}", url_encode(l)));
    }
    let mut up_path = format!("/v2/{}/tags/list", route.repo);
    if !upstream_query.is_empty() {
        up_path = format!("{up_path}?{}", upstream_query.join("&"));
    }
    #[derive(serde::Deserialize)]
    struct TagList {
        tags: Option<Vec<String>>,
    }
    let (tags, more) = match route.upstream.get_json(&route.repo, &up_path).await {
        Ok((body, link)) => {
            let list: TagList = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "UNKNOWN",
                    format!("upstream tag list is not valid JSON: {e}"),
                )
            })?;
            let mut tags = list.tags.unwrap_or_default();
            // Apply n and last ourselves too, in case the upstream ignored them.
            tags.sort();
            let (tags, more) = page(tags, n, q.last.as_deref());
            (tags, more || link.is_some())
        }
        Err(e) if e.is_unavailable() => {
            tracing::warn!(upstream = route.upstream.name(), error = %e, "upstream cannot list tags; listing cached tags");
            let cached = app
                .cache
                .store
                .tags(&route.key())
                .map_err(|e| cache_error(e.into(), Object::Repository))?;
            if cached.is_empty() {
                return Err(upstream_error(&e, Object::Repository));
            }
            page(cached, n, q.last.as_deref())
        }
        Err(e) => return Err(upstream_error(&e, Object::Repository)),
    };
    let last = tags.last().cloned();
    let mut resp = json_response(
        &serde_json::json!({ "name": name, "tags": tags }),
        head,
        "application/json",
    );
    if let (true, Some(l)) = (more, last) {
        link_header(
            &mut resp,
            &format!("/v2/{name}/tags/list"),
            n,
            &l,
            q.ns.as_deref(),
        );
    }
    Ok(resp)
}

async fn referrers(
    app: &Arc<App>,
    route: &Route,
    subject: &Digest,
    artifact_type: Option<&str>,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    let mut descriptors: Vec<serde_json::Value> = Vec::new();
    let path = format!("/v2/{}/referrers/{subject}", route.repo);
    match route.upstream.get_json(&route.repo, &path).await {
        Ok((body, _)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "UNKNOWN",
                    format!("upstream referrers answer is not JSON: {e}"),
                )
            })?;
            if let Some(list) = v.get("manifests").and_then(|m| m.as_array()) {
                descriptors.extend(list.iter().cloned());
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "upstream has no referrers API; using the tag schema and the cache");
            // The spec's fallback: an index tagged `<alg>-<hex>` lists the referrers.
            let tag = format!("{}-{}", subject.algorithm().as_str(), subject.hex());
            if let Ok(Reference::Tag(t)) = Reference::parse(&tag) {
                if let Ok(m) = app
                    .cache
                    .manifest(route, &Reference::Tag(t), Accept::ALL)
                    .await
                {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.bytes) {
                        if let Some(list) = v.get("manifests").and_then(|m| m.as_array()) {
                            descriptors.extend(list.iter().cloned());
                        }
                    }
                }
            }
        }
    }
    let cached = app
        .cache
        .store
        .referrers(&route.key(), subject)
        .map_err(|e| cache_error(e.into(), Object::Manifest))?;
    for c in cached {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&c) {
            if !descriptors
                .iter()
                .any(|d| d.get("digest") == v.get("digest"))
            {
                descriptors.push(v);
            }
        }
    }
    if let Some(at) = artifact_type {
        descriptors.retain(|d| d.get("artifactType").and_then(|a| a.as_str()) == Some(at));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": descriptors,
    });
    let mut resp = json_response(&index, head, media::OCI_INDEX);
    if artifact_type.is_some() {
        resp.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}

impl App {
    /// Picks the upstream and repository for a request's name.
    pub fn route(&self, raw_name: &str, ns: Option<&str>) -> Result<Route, ApiError> {
        self.routing().route(raw_name, ns)
    }
}

impl crate::app::Routing {
    /// Picks the upstream and repository for a request's name.
    pub fn route(&self, raw_name: &str, ns: Option<&str>) -> Result<Route, ApiError> {
        let unknown_host = |h: &str| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                format!("no upstream is configured for registry host {h:?}"),
            )
        };
        let (upstream, name) = if let Some(ns) = ns {
            let up = self.upstream_for_host(ns).ok_or_else(|| unknown_host(ns))?;
            // A mirror with a path may also repeat the host: accept it once.
            let name = match raw_name.split_once('/') {
                Some((first, rest))
                    if up
                        .config
                        .hosts
                        .iter()
                        .any(|h| h.eq_ignore_ascii_case(first)) =>
                {
                    rest
                }
                _ => raw_name,
            };
            (up, name)
        } else {
            match raw_name.split_once('/') {
                Some((first, rest)) if looks_like_host(first) => (
                    self.upstream_for_host(first)
                        .ok_or_else(|| unknown_host(first))?,
                    rest,
                ),
                _ => (self.default_upstream(), raw_name),
            }
        };
        let mut repo: RepoName = name.parse()?;
        if upstream.config.docker_hub_names {
            repo = repo.docker_hub_normalised();
        }
        let c = &upstream.config;
        if let Err(why) =
            crate::http::access::repo_allowed(&c.allow_repos, &c.deny_repos, repo.as_str())
        {
            let key = match why {
                crate::http::access::RepoDenied::Denied(_) => "deny_repos",
                crate::http::access::RepoDenied::NotAllowed => "allow_repos",
            };
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "DENIED",
                format!(
                    "repository {repo} is not served by this mirror (upstreams.{}.{key})",
                    c.name
                ),
            ));
        }
        Ok(Route { upstream, repo })
    }

    /// Whether the catalog lists a cached repository: not when its upstream's `allow_repos` or
    /// `deny_repos` now refuse it.
    pub fn repo_listed(&self, upstream: &str, repo: &str) -> bool {
        match self.upstreams().iter().find(|u| u.name() == upstream) {
            Some(u) => {
                crate::http::access::repo_allowed(&u.config.allow_repos, &u.config.deny_repos, repo)
                    .is_ok()
            }
            None => true,
        }
    }
}

/// Whether a leading path segment names a registry host (`ghcr.io`, `localhost:5000`,
/// `127.0.0.1:5000`): DNS labels with at least one dot (or `localhost`), and an optional port.
pub fn looks_like_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let labels: Vec<&str> = host.split('.').collect();
    (labels.len() > 1 || port.is_some())
        && host.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_on_the_last_operation() {
        assert!(matches!(parse_path("/v2/"), Endpoint::Base));
        assert!(matches!(parse_path("/v2"), Endpoint::Base));
        assert!(matches!(parse_path("/v2/_catalog"), Endpoint::Catalog));
        assert!(matches!(
            parse_path("/v2/a/b/manifests/latest"),
            Endpoint::Manifest("a/b", "latest")
        ));
        assert!(matches!(
            parse_path("/v2/a/manifests/x/manifests/y"),
            Endpoint::Manifest("a/manifests/x", "y")
        ));
        assert!(matches!(
            parse_path("/v2/a/blobs/sha256:x"),
            Endpoint::Blob("a", "sha256:x")
        ));
        assert!(matches!(
            parse_path("/v2/a/blobs/uploads/"),
            Endpoint::Upload
        ));
        assert!(matches!(parse_path("/v2/a/tags/list"), Endpoint::Tags("a")));
        assert!(matches!(
            parse_path("/v2/a/referrers/sha256:x"),
            Endpoint::Referrers("a", "sha256:x")
        ));
        assert!(matches!(parse_path("/v3/a"), Endpoint::Unknown));
        assert!(matches!(parse_path("/v2x"), Endpoint::Unknown));
    }

    #[test]
    fn ranges_parse_and_resolve() {
        let r = |s: &str| parse_range(Some(&HeaderValue::from_str(s).expect("header")));
        assert_eq!(r("bytes=0-9"), Some(RangeSpec::FromTo(0, 9)));
        assert_eq!(r("bytes=5-"), Some(RangeSpec::From(5)));
        assert_eq!(r("bytes=-3"), Some(RangeSpec::Suffix(3)));
        assert_eq!(r("bytes=9-0"), None);
        assert_eq!(r("bytes=0-1,3-4"), None);
        assert_eq!(r("items=0-1"), None);
        assert_eq!(RangeSpec::FromTo(0, 99).resolve(10), Some((0, 9)));
        assert_eq!(RangeSpec::From(10).resolve(10), None);
        assert_eq!(RangeSpec::Suffix(30).resolve(10), Some((0, 9)));
        assert_eq!(RangeSpec::Suffix(0).resolve(10), None);
    }

    #[test]
    fn query_and_paging() {
        let q = parse_query(Some("ns=docker.io&n=2&last=a%2Bb"));
        assert_eq!(q.ns.as_deref(), Some("docker.io"));
        assert_eq!(q.last.as_deref(), Some("a b").map(|_| "a+b"));
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            page(items.clone(), Some(2), None),
            (vec!["a".into(), "b".into()], true)
        );
        assert_eq!(
            page(items.clone(), Some(2), Some("b")),
            (vec!["c".into(), "d".into()], false)
        );
        assert_eq!(page(items, None, Some("d")), (vec![], false));
        assert!(parse_n(Some("x"), MAX_PAGE).is_err());
        assert!(parse_n(Some("100000"), MAX_PAGE).is_err());
        assert!(parse_n(Some("+5"), MAX_PAGE).is_err());
        assert_eq!(parse_n(Some("5"), 5).ok(), Some(Some(5)));
        assert!(parse_n(Some("6"), 5).is_err());
    }

    #[test]
    fn operator_requests_name_the_server_by_address() {
        for ok in [
            "127.0.0.1:5000",
            "127.0.0.1",
            "[::1]:5000",
            "[::1]",
            "localhost:5000",
            "LOCALHOST",
            "0.0.0.0:5000",
        ] {
            assert!(address_host(ok), "{ok}");
        }
        for bad in [
            "rebind.example:5000",
            "rebind.example",
            "[::1",
            "",
            "127.0.0.1.nip.io:80",
        ] {
            assert!(!address_host(bad), "{bad}");
        }
        let mut h = HeaderMap::new();
        assert!(operator_request(&h).is_err(), "no operator header");
        h.insert(OPERATOR_HEADER, HeaderValue::from_static("1"));
        assert!(operator_request(&h).is_ok());
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:5000"));
        assert!(operator_request(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(operator_request(&h).is_err(), "an Origin");
        h.remove(header::ORIGIN);
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        assert!(operator_request(&h).is_err(), "a DNS name");
    }

    #[test]
    fn hosts_are_recognised() {
        assert!(looks_like_host("ghcr.io"));
        assert!(looks_like_host("127.0.0.1:5000"));
        assert!(looks_like_host("localhost"));
        assert!(!looks_like_host("library"));
        assert!(!looks_like_host(".."));
        assert!(!looks_like_host("."));
        assert!(!looks_like_host("a."));
        assert!(!looks_like_host(".a"));
        assert!(!looks_like_host("a:"));
        assert!(!looks_like_host("a:x"));
        assert!(looks_like_host("registry:5000"));
    }
}

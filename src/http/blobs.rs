//! `GET`/`HEAD /v2/<name>/blobs/<digest>`: a redirect to the shared bucket when it has the blob,
//! else the blob from the cache (a stored file, zero-copy on plain connections, or a fill in
//! progress), with single `Range` requests.

use std::sync::Arc;

use futures_util::{stream, StreamExt};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

use crate::app::App;
use crate::cache::{BlobSource, Outcome, Route};
use crate::http::body::{self, BodyChunk};
use crate::http::error::{ApiError, Code, Object};
use crate::http::response::{empty, set_header, Body};
use crate::http::sendfile::LaneRef;
use crate::http::trace::LogInfo;
use crate::oci::reference::Digest;

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

pub(crate) fn channel_body(rx: mpsc::Receiver<BodyChunk>) -> Body {
    let s = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (c.map(Frame::data), rx))
    });
    BodyExt::boxed(StreamBody::new(s))
}

/// Answers a blob request routed to `route`. `lane` is the connection's sendfile lane (plain
/// connections only).
pub async fn blob(
    app: &Arc<App>,
    route: &Route,
    digest: &Digest,
    headers: &HeaderMap,
    lane: Option<&LaneRef>,
    head: bool,
    info: &mut LogInfo,
) -> Result<Response<Body>, ApiError> {
    if head && only_if_cached(headers) {
        return blob_if_cached(app, route, digest, info);
    }
    let range = parse_range(headers.get(header::RANGE));
    if !head {
        let redirect = app
            .cache
            .blob_redirect(route, digest)
            .await
            .map_err(|e| ApiError::from_cache(e, Object::Blob))?;
        if let Some(url) = redirect {
            info.set_outcome(Outcome::Shared);
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
    let b = app
        .cache
        .blob(route, digest, !head)
        .await
        .map_err(|e| ApiError::from_cache(e, Object::Blob))?;
    info.set_outcome(b.outcome);
    let mut size = b.size;
    if let (Some(_), None, BlobSource::Fill(f)) = (range, size, &b.source) {
        // A range needs the total size; this upstream did not announce it.
        size = Some(
            f.wait_done()
                .await
                .map_err(|e| ApiError::from_cache(e, Object::Blob))?,
        );
    }
    let mut resp = blob_response(digest);
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
                    Code::RangeNotSatisfiable,
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

/// Whether the request carries `Cache-Control: only-if-cached` (RFC 9111, 5.2.1.7).
fn only_if_cached(headers: &HeaderMap) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("only-if-cached"))
        })
    })
}

/// A blob `HEAD` with `Cache-Control: only-if-cached`, answered from this server alone: no
/// upstream, no bucket, no fill started (`regcache prefetch` asks so until a blob is committed).
/// `200 hit`: recorded in the store (fsynced and in the database) and linked to the repository;
/// `200 coalesced`: a fill is fetching or committing it; `504`, with `passthrough` for a fill on
/// a full disk that serves it from memory: not stored, and not being stored.
fn blob_if_cached(
    app: &Arc<App>,
    route: &Route,
    digest: &Digest,
    info: &mut LogInfo,
) -> Result<Response<Body>, ApiError> {
    let key = route.key();
    let linked = || -> Result<Option<u64>, ApiError> {
        match app.cache.store.lookup_blob(&key, digest) {
            Ok(found) => Ok(found.and_then(|(size, linked)| linked.then_some(size))),
            Err(e) => Err(ApiError::from_cache(e.into(), Object::Blob)),
        }
    };
    // The store again after the fills: a commit records the blob before its fill leaves them.
    let (outcome, size) = match linked()? {
        Some(size) => (Some(Outcome::Hit), Some(size)),
        None => match app.cache.filling(route, digest) {
            Some(true) => (Some(Outcome::Coalesced), None),
            Some(false) => (Some(Outcome::Passthrough), None),
            None => {
                let size = linked()?;
                (size.map(|_| Outcome::Hit), size)
            }
        },
    };
    if let Some(o) = outcome {
        info.set_outcome(o);
    }
    if !matches!(outcome, Some(Outcome::Hit | Outcome::Coalesced)) {
        return Err(ApiError::new(
            Code::NotCached,
            "not stored here (Cache-Control: only-if-cached)",
        ));
    }
    let mut resp = blob_response(digest);
    if let Some(size) = size {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(resp)
}

/// A blob answer without its length and body: type, digest, `ETag`, `Accept-Ranges`.
fn blob_response(digest: &Digest) -> Response<Body> {
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    set_header(h, "docker-content-digest", &digest.to_string());
    set_header(h, header::ETAG, &format!("\"{digest}\""));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

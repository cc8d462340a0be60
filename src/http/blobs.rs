//! `GET`/`HEAD /v2/<name>/blobs/<digest>`: a redirect to the shared bucket when it has the blob,
//! else the blob from the cache (a stored file, zero-copy on plain connections, or a fill in
//! progress), with `Range` requests: one range, or several as `multipart/byteranges` (RFC 9110
//! §14), answered as nginx answers them for a static file.

use std::sync::Arc;

use bytes::Bytes;
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

/// Most ranges one request is answered with: a `Range` with more satisfiable ranges than this is
/// ignored and the whole blob sent with `200`, as nginx does past its `max_ranges`.
/// containers/storage merges the chunks of a zstd:chunked partial pull down to at most 1024
/// (`maxNumberMissingChunks`) before it asks, so such a pull never meets the cap.
pub const MAX_RANGES: usize = 1024;

/// Parses `Range: bytes=…` into its ranges, in the order given; `None` means "ignore it and send
/// everything": absent, another unit, or malformed (RFC 9110 §14.2 lets a server ignore an invalid
/// `Range`).
pub fn parse_ranges(h: Option<&HeaderValue>) -> Option<Vec<RangeSpec>> {
    let s = h?.to_str().ok()?.trim();
    let (unit, set) = s.split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    // A list (RFC 9110 §5.6.1): whitespace around the commas, empty elements ignored.
    let specs = set
        .split(',')
        .map(|e| e.trim_matches([' ', '\t']))
        .filter(|e| !e.is_empty())
        .map(parse_spec)
        .collect::<Option<Vec<_>>>()?;
    (!specs.is_empty()).then_some(specs)
}

/// One `first-last`, `first-` or `-suffix`.
fn parse_spec(spec: &str) -> Option<RangeSpec> {
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        // Digits only: `parse` would also take a `+`.
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (a, b) = spec.split_once('-')?;
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => number(b).map(RangeSpec::Suffix),
        (false, true) => number(a).map(RangeSpec::From),
        (false, false) => {
            let (x, y) = (number(a)?, number(b)?);
            (x <= y).then_some(RangeSpec::FromTo(x, y))
        }
        (true, true) => None,
    }
}

/// What a `Range` asks of a blob.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// The whole blob (`200`): no `Range`, or one this server ignores.
    Whole,
    /// These inclusive ranges, in the order asked (`206`; `multipart/byteranges` from two on).
    Parts(Vec<(u64, u64)>),
    /// No range is satisfiable (`416`).
    Unsatisfiable,
}

/// Resolves `ranges` against a blob of `size` bytes, as nginx does (the oracle of the tests):
/// unsatisfiable ranges are left out, the others kept in the order asked, overlapping or not. More
/// than [`MAX_RANGES`] of them, or more bytes than the blob holds (overlaps no client needs, and a
/// way to make a server send a blob many times over), and the `Range` is ignored.
pub fn plan(ranges: &[RangeSpec], size: u64) -> Plan {
    let parts: Vec<(u64, u64)> = ranges.iter().filter_map(|r| r.resolve(size)).collect();
    let bytes: u128 = parts.iter().map(|(a, z)| u128::from(z - a) + 1).sum();
    if parts.is_empty() {
        Plan::Unsatisfiable
    } else if parts.len() > MAX_RANGES || bytes > u128::from(size) {
        Plan::Whole
    } else {
        Plan::Parts(parts)
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
    let ranges =
        parse_ranges(headers.get(header::RANGE)).filter(|_| if_range_holds(headers, digest));
    // A peer gets the bytes, never a redirect to the bucket.
    if !head && info.peer.is_none() {
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
        .blob_for(
            route,
            digest,
            !head,
            info.peer.map(|p| p.asker).unwrap_or_default(),
        )
        .await
        .map_err(|e| ApiError::from_cache(e, Object::Blob))?;
    info.set_outcome(b.outcome);
    let mut size = b.size;
    if let (Some(_), None, BlobSource::Fill(f)) = (&ranges, size, &b.source) {
        // A range needs the total size; this upstream did not announce it.
        size = Some(
            f.wait_done()
                .await
                .map_err(|e| ApiError::from_cache(e, Object::Blob))?,
        );
    }
    let asked = match (&ranges, size) {
        (Some(ranges), Some(total)) => plan(ranges, total),
        _ => Plan::Whole,
    };
    let mut resp = blob_response(digest);
    let (start, end) = match (asked, size) {
        (Plan::Parts(parts), Some(total)) => match parts[..] {
            [(a, z)] => {
                *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                set_header(
                    resp.headers_mut(),
                    header::CONTENT_RANGE,
                    &format!("bytes {a}-{z}/{total}"),
                );
                (a, z)
            }
            _ => return Ok(multipart(resp, &parts, total, b.source, lane, head)),
        },
        (Plan::Unsatisfiable, Some(total)) => {
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

/// Whether `If-Range` lets the `Range` apply (RFC 9110 §13.1.5): absent, or this blob's entity tag
/// (compared strongly). A date never matches: a blob answer has no `Last-Modified`.
fn if_range_holds(headers: &HeaderMap, digest: &Digest) -> bool {
    headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == format!("\"{digest}\"").as_bytes())
}

/// A boundary that no blob can be made to contain: 128 bits of SipHash keyed with std's random
/// per-process keys (`RandomState`, seeded by the OS and changed at every call).
fn boundary() -> String {
    use std::hash::BuildHasher as _;
    let keys = std::collections::hash_map::RandomState::new();
    format!("{:016x}{:016x}", keys.hash_one(0u8), keys.hash_one(1u8))
}

/// The `206 multipart/byteranges` answer (RFC 9110 §14.6) with `parts` of a blob of `total` bytes
/// from `source`, laid out as nginx lays it out: before each part, a CRLF, the delimiter, its
/// `Content-Type` and `Content-Range`, a blank line; after the last, the close delimiter. Its length
/// is known beforehand, so it has a `Content-Length`. A stored file's parts go out with sendfile on
/// a plain connection; a fill's as the fill writes them.
fn multipart(
    mut resp: Response<Body>,
    parts: &[(u64, u64)],
    total: u64,
    source: BlobSource,
    lane: Option<&LaneRef>,
    head: bool,
) -> Response<Body> {
    let b = boundary();
    let parts: Vec<body::Part> = parts
        .iter()
        .map(|&(start, end)| body::Part {
            head: Bytes::from(format!(
                "\r\n--{b}\r\nContent-Type: application/octet-stream\r\n\
                 Content-Range: bytes {start}-{end}/{total}\r\n\r\n"
            )),
            start,
            end,
        })
        .collect();
    let tail = Bytes::from(format!("\r\n--{b}--\r\n"));
    let len = parts
        .iter()
        .map(|p| p.head.len() as u64 + (p.end - p.start + 1))
        .sum::<u64>()
        + tail.len() as u64;
    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    let h = resp.headers_mut();
    set_header(
        h,
        header::CONTENT_TYPE,
        &format!("multipart/byteranges; boundary={b}"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if head {
        return resp;
    }
    let lane = lane.map(|l| Arc::clone(&l.0));
    *resp.body_mut() = match source {
        BlobSource::File(file, hold) => {
            let source = crate::http::sendfile::Source {
                file,
                hold: Some(hold),
            };
            let s = body::stream_file_parts(source, lane, parts, tail).map(|c| c.map(Frame::data));
            BodyExt::boxed(StreamBody::new(s))
        }
        BlobSource::Fill(reader) => {
            channel_body(body::stream_fill_parts(reader, lane, total, parts, tail))
        }
        BlobSource::Empty => empty(),
    };
    resp
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
        let r = |s: &str| parse_ranges(Some(&HeaderValue::from_str(s).expect("header")));
        let one = |s: &str| r(s).map(|v| v[..].to_vec());
        assert_eq!(one("bytes=0-9"), Some(vec![RangeSpec::FromTo(0, 9)]));
        assert_eq!(one("bytes=5-"), Some(vec![RangeSpec::From(5)]));
        assert_eq!(one("bytes=-3"), Some(vec![RangeSpec::Suffix(3)]));
        assert_eq!(
            one("Bytes=-3"),
            Some(vec![RangeSpec::Suffix(3)]),
            "units are case-insensitive"
        );
        assert_eq!(one("bytes=9-0"), None);
        assert_eq!(one("bytes=+1-2"), None, "digits only");
        assert_eq!(one("bytes=-"), None);
        assert_eq!(one("items=0-1"), None);
        assert_eq!(one("bytes="), None);
        assert_eq!(one("bytes=,"), None);
        assert_eq!(
            one("bytes=0-1,3-4"),
            Some(vec![RangeSpec::FromTo(0, 1), RangeSpec::FromTo(3, 4)])
        );
        assert_eq!(
            one("bytes=10-, ,\t-5 ,0-0"),
            Some(vec![
                RangeSpec::From(10),
                RangeSpec::Suffix(5),
                RangeSpec::FromTo(0, 0)
            ]),
            "whitespace and empty list elements"
        );
        assert_eq!(one("bytes=0-1,9-0"), None, "one invalid range: all ignored");
        assert_eq!(RangeSpec::FromTo(0, 99).resolve(10), Some((0, 9)));
        assert_eq!(RangeSpec::From(10).resolve(10), None);
        assert_eq!(RangeSpec::Suffix(30).resolve(10), Some((0, 9)));
        assert_eq!(RangeSpec::Suffix(0).resolve(10), None);
    }

    #[test]
    fn plans_keep_order_and_overlaps_and_drop_what_nginx_drops() {
        let p = |s: &str, size: u64| {
            let h = HeaderValue::from_str(s).expect("header");
            plan(&parse_ranges(Some(&h)).expect("ranges"), size)
        };
        assert_eq!(
            p("bytes=50-59,0-9,5-14,-5", 100),
            Plan::Parts(vec![(50, 59), (0, 9), (5, 14), (95, 99)])
        );
        assert_eq!(
            p("bytes=0-9,100-,200-300", 100),
            Plan::Parts(vec![(0, 9)]),
            "unsatisfiable ranges are left out"
        );
        assert_eq!(p("bytes=100-,-0", 100), Plan::Unsatisfiable);
        assert_eq!(p("bytes=0-", 0), Plan::Unsatisfiable);
        assert_eq!(
            p("bytes=0-,0-", 100),
            Plan::Whole,
            "more bytes than the blob"
        );
        assert_eq!(
            p("bytes=0-49,50-99", 100),
            Plan::Parts(vec![(0, 49), (50, 99)])
        );
        let many = |n: u64| {
            let specs: Vec<String> = (0..n).map(|i| format!("{i}-{i}")).collect();
            format!("bytes={}", specs.join(","))
        };
        let cap = MAX_RANGES as u64;
        assert!(matches!(p(&many(cap), 10_000), Plan::Parts(v) if v.len() == MAX_RANGES));
        assert_eq!(p(&many(cap + 1), 10_000), Plan::Whole, "over the cap");
        // Unsatisfiable ranges do not count towards the cap (nginx's `max_ranges` neither).
        let with_extra = format!("{},20000-,30000-", many(cap));
        assert!(matches!(p(&with_extra, 10_000), Plan::Parts(v) if v.len() == MAX_RANGES));
    }

    #[test]
    fn if_range_applies_the_range_only_for_the_blobs_own_etag() {
        let d: Digest = format!("sha256:{}", "ab".repeat(32))
            .parse()
            .expect("digest");
        let with = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(header::IF_RANGE, HeaderValue::from_str(v).expect("header"));
            }
            if_range_holds(&h, &d)
        };
        assert!(with(None));
        assert!(with(Some(&format!("\"{d}\""))));
        assert!(
            !with(Some(&format!("W/\"{d}\""))),
            "a weak tag never matches"
        );
        assert!(!with(Some("\"other\"")));
        assert!(
            !with(Some("Sat, 01 Jan 2000 00:00:00 GMT")),
            "no Last-Modified to match"
        );
    }

    #[test]
    fn boundaries_differ() {
        let (a, b) = (boundary(), boundary());
        assert!(a.len() == 32 && a != b, "{a} {b}");
    }
}

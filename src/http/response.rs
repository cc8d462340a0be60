//! Building answers: the body type every handler returns, and the helpers for small bodies and
//! headers that the handlers share.

use std::io;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// A response body: bytes, or placeholders for file ranges on a sendfile lane.
pub type Body = BoxBody<Bytes, io::Error>;

pub fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Sets a header, or leaves it out when `value` cannot be a header value.
pub fn set_header(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// An answer with `status` and `body` of `content_type` and its length (no body for a `HEAD`).
pub fn plain(
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

/// A `200` with `value` as JSON of `content_type` (no body for a `HEAD`).
pub fn json_response(
    value: &serde_json::Value,
    head: bool,
    content_type: &'static str,
) -> Response<Body> {
    plain(StatusCode::OK, value.to_string(), content_type, head)
}

//! OCI errors: the one list of error codes regcache answers with (each with its HTTP status), the
//! one renderer of the `{"errors":[…]}` body and its headers (also for the server's raw `503` to a
//! connection over `limits.max_connections`), and the mapping of cache and upstream failures to
//! them. Internal causes are logged here, once, and never leak to the client.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use crate::cache::CacheError;
use crate::http::response::{empty, full, Body};
use crate::oci::reference::ParseError;
use crate::upstream::UpstreamError;

/// What went wrong, as the client is told: an OCI error code and the status that goes with it.
///
/// Some OCI codes appear with more than one status (`UNSUPPORTED`, `UNKNOWN`, `BLOB_UNKNOWN`);
/// each of those has one variant per status, so that a variant always renders the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `400 NAME_INVALID`: a repository name outside the grammar.
    NameInvalid,
    /// `400 TAG_INVALID`.
    TagInvalid,
    /// `400 DIGEST_INVALID`: a malformed digest or an unsupported algorithm.
    DigestInvalid,
    /// `400 PAGINATION_NUMBER_INVALID`: an `n` that is not a number up to `limits.max_page`.
    PaginationNumberInvalid,
    /// `400 UNSUPPORTED`: a parameter regcache cannot use.
    BadRequest,
    /// `401 UNAUTHORIZED`.
    Unauthorized,
    /// `403 DENIED`.
    Denied,
    /// `404 MANIFEST_UNKNOWN`.
    ManifestUnknown,
    /// `404 BLOB_UNKNOWN`.
    BlobUnknown,
    /// `404 NAME_UNKNOWN`: a repository, or a registry host, regcache does not know.
    NameUnknown,
    /// `404 UNSUPPORTED`: no such endpoint.
    NoSuchEndpoint,
    /// `405 UNSUPPORTED` (with `Allow`): regcache is a read-only mirror.
    MethodNotAllowed,
    /// `414 UNSUPPORTED`: the request target is over `limits.max_uri_length`.
    UriTooLong,
    /// `416 BLOB_UNKNOWN` (with `Content-Range: bytes */SIZE`).
    RangeNotSatisfiable,
    /// `429 TOOMANYREQUESTS`.
    TooManyRequests,
    /// `500 UNKNOWN`: regcache's own failure (the cause is in its log).
    Internal,
    /// `502 UNKNOWN`: the upstream sent something regcache refuses to pass on.
    BadGateway,
    /// `503 UNAVAILABLE`: the upstream, or regcache, cannot answer now; retry.
    Unavailable,
    /// `508 UNSUPPORTED`: a peer request that came from this server itself (`[peers]`).
    LoopDetected,
    /// `504 UNAVAILABLE`: not stored here, for a request that allows no other source
    /// (`Cache-Control: only-if-cached`, RFC 9111 5.2.1.7).
    NotCached,
}

impl Code {
    /// The OCI error code (`errors[].code`).
    pub fn as_str(self) -> &'static str {
        match self {
            Code::NameInvalid => "NAME_INVALID",
            Code::TagInvalid => "TAG_INVALID",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::BlobUnknown | Code::RangeNotSatisfiable => "BLOB_UNKNOWN",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::BadRequest
            | Code::NoSuchEndpoint
            | Code::MethodNotAllowed
            | Code::UriTooLong
            | Code::LoopDetected => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::Internal | Code::BadGateway => "UNKNOWN",
            Code::Unavailable | Code::NotCached => "UNAVAILABLE",
        }
    }

    /// The HTTP status the code is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::NameInvalid
            | Code::TagInvalid
            | Code::DigestInvalid
            | Code::PaginationNumberInvalid
            | Code::BadRequest => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Denied => StatusCode::FORBIDDEN,
            Code::ManifestUnknown
            | Code::BlobUnknown
            | Code::NameUnknown
            | Code::NoSuchEndpoint => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::UriTooLong => StatusCode::URI_TOO_LONG,
            Code::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::BadGateway => StatusCode::BAD_GATEWAY,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::NotCached => StatusCode::GATEWAY_TIMEOUT,
            Code::LoopDetected => StatusCode::LOOP_DETECTED,
        }
    }
}

/// An error answered to a client as OCI error JSON.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// `Retry-After`, in seconds or as an HTTP date (an upstream's, passed on).
    pub retry_after: Option<String>,
    /// Ask for Basic credentials (`WWW-Authenticate`), with a 401.
    pub challenge: bool,
    /// The methods named in `Allow` with a 405 (`GET, HEAD` unless set).
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
            challenge: false,
            allow: None,
        }
    }

    /// The same error with a `Retry-After`.
    pub fn retry_after(self, retry_after: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(retry_after.into()),
            ..self
        }
    }

    /// A method other than `GET` and `HEAD` on the registry API.
    pub fn unsupported(what: &str) -> ApiError {
        ApiError::new(
            Code::MethodNotAllowed,
            format!("{what}: regcache is a read-only mirror"),
        )
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The error JSON (`{"errors":[{"code","detail","message"}]}`).
    fn body(&self) -> String {
        serde_json::json!({
            "errors": [{"code": self.code.as_str(), "message": self.message, "detail": null}]
        })
        .to_string()
    }

    /// The headers that go with the body: type, length and those the code calls for.
    fn headers(&self, body_len: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
        if let Some(v) = self
            .retry_after
            .as_deref()
            .and_then(|r| HeaderValue::from_str(r).ok())
        {
            h.insert(header::RETRY_AFTER, v);
        }
        if self.code == Code::MethodNotAllowed {
            h.insert(
                header::ALLOW,
                HeaderValue::from_static(self.allow.unwrap_or("GET, HEAD")),
            );
        }
        if self.challenge {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"regcache\""),
            );
        }
        h
    }

    /// The answer to a request (without its body for a `HEAD`).
    pub fn into_response(self, head: bool) -> Response<Body> {
        let body = self.body();
        let headers = self.headers(body.len());
        let mut resp = Response::new(if head { empty() } else { full(body) });
        *resp.headers_mut() = headers;
        *resp.status_mut() = self.status();
        resp
    }

    /// The whole HTTP/1.1 answer as bytes, with `Connection: close`: for a connection the server
    /// answers without reading its request (over `limits.max_connections`).
    pub fn to_http1_closing(&self) -> Bytes {
        let body = self.body();
        let status = self.status();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or("")
        );
        for (name, value) in &self.headers(body.len()) {
            out.push_str(name.as_str());
            out.push_str(": ");
            out.push_str(&String::from_utf8_lossy(value.as_bytes()));
            out.push_str("\r\n");
        }
        out.push_str("connection: close\r\n\r\n");
        out.push_str(&body);
        Bytes::from(out)
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        let code = match e {
            ParseError::Name(_) => Code::NameInvalid,
            ParseError::Tag(_) => Code::TagInvalid,
            ParseError::Digest(_) | ParseError::Algorithm(_) => Code::DigestInvalid,
        };
        ApiError::new(code, e.to_string())
    }
}

/// What kind of object a request was about, to pick the right "unknown" code.
#[derive(Clone, Copy)]
pub enum Object {
    Manifest,
    Blob,
    Repository,
}

/// `e` with its causes, as one line (`a: b: c`), for the log.
fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // A variant that prints its cause already (`#[error("store: {0}")]`) is not repeated.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

impl ApiError {
    /// What the client is told when the cache could not answer about `object`.
    pub fn from_cache(e: CacheError, object: Object) -> ApiError {
        match &e {
            CacheError::Upstream(u) => ApiError::from_upstream(u, object),
            CacheError::NotAcceptable(why) => ApiError::new(Code::ManifestUnknown, why.to_string()),
            CacheError::NotStored(why) => match object {
                Object::Blob => ApiError::new(Code::BlobUnknown, *why),
                _ => ApiError::new(Code::ManifestUnknown, *why),
            },
            CacheError::DigestMismatch { .. } | CacheError::SizeMismatch { .. } => {
                tracing::error!(
                    error = %chain(&e),
                    "upstream sent content that failed verification"
                );
                ApiError::new(Code::BadGateway, e.to_string())
            }
            CacheError::Busy(msg) => {
                ApiError::new(Code::Unavailable, msg.to_string()).retry_after("5")
            }
            CacheError::Store(_) | CacheError::Internal(_) => {
                tracing::error!(error = %chain(&e), "internal error");
                ApiError::new(Code::Internal, "internal error; see the regcache log")
            }
        }
    }

    /// What the client is told when the upstream could not answer about `object`.
    pub fn from_upstream(u: &UpstreamError, object: Object) -> ApiError {
        match u {
            UpstreamError::Status { status: 404, .. } => match object {
                Object::Manifest => {
                    ApiError::new(Code::ManifestUnknown, "manifest unknown to the upstream")
                }
                Object::Blob => ApiError::new(Code::BlobUnknown, "blob unknown to the upstream"),
                Object::Repository => {
                    ApiError::new(Code::NameUnknown, "repository unknown to the upstream")
                }
            },
            UpstreamError::Status { status: 401, .. } => ApiError::new(
                Code::Unauthorized,
                "the upstream refused regcache's credentials for this repository",
            ),
            UpstreamError::Status { status: 403, .. } => ApiError::new(
                Code::Denied,
                "the upstream denied access to this repository",
            ),
            UpstreamError::Status {
                status: 429,
                retry_after,
                ..
            } => ApiError::new(Code::TooManyRequests, u.to_string())
                .retry_after(retry_after.clone().unwrap_or_else(|| "30".into())),
            // The upstream's Retry-After still holds: the time left of it.
            UpstreamError::RetryAfter { wait, .. } => {
                ApiError::new(Code::TooManyRequests, u.to_string())
                    .retry_after(crate::upstream::whole_seconds(*wait).to_string())
            }
            UpstreamError::Invalid { .. } => {
                tracing::warn!(error = %chain(u), "refused an invalid upstream response");
                ApiError::new(Code::BadGateway, u.to_string())
            }
            // Unreachable, timed out, 5xx, a token service that gave no token, anything else: the
            // upstream is unavailable. Never a 404, which would tell the client the image does not
            // exist.
            _ => ApiError::new(Code::Unavailable, u.to_string()).retry_after("10"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_answer_is_the_response_as_bytes() {
        let e = ApiError::new(Code::Unavailable, "too many \"connections\"").retry_after("1");
        let raw = e.to_http1_closing();
        let text = std::str::from_utf8(&raw).expect("UTF-8");
        let body = concat!(
            r#"{"errors":[{"code":"UNAVAILABLE","detail":null,"#,
            r#""message":"too many \"connections\""}]}"#
        );
        assert_eq!(
            text,
            format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        );
        let resp = e.into_response(false);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            resp.headers()[header::CONTENT_LENGTH],
            body.len().to_string().as_str()
        );
    }

    #[test]
    fn a_405_names_the_allowed_methods() {
        let resp = ApiError::unsupported("PUT").into_response(true);
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD");
        let e = ApiError {
            allow: Some("POST"),
            ..ApiError::new(Code::MethodNotAllowed, "use POST")
        };
        assert_eq!(e.into_response(false).headers()[header::ALLOW], "POST");
    }

    #[test]
    fn an_unavailable_upstream_is_never_a_404() {
        let u = UpstreamError::Status {
            upstream: "docker".into(),
            status: 502,
            path: "/v2/x/manifests/y".into(),
            retry_after: None,
        };
        for object in [Object::Manifest, Object::Blob, Object::Repository] {
            let e = ApiError::from_upstream(&u, object);
            assert_eq!(
                (e.code, e.retry_after.as_deref()),
                (Code::Unavailable, Some("10"))
            );
        }
    }
}

//! Plain S3 requests for the tests that look into a bucket behind regcache's back (moto's and
//! Garage's): AWS SigV4-signed HTTP/1.1 on loopback, with object_store's signer, so that the tests
//! see exactly what the server answers (no client retries, no client-side checks).
//!
//! [`S3Client`] lists, reads and writes objects, and [`conditional_writes`] asks a server whether it
//! honours `If-None-Match: *` on `PutObject` and on `CompleteMultipartUpload`: the engine table in
//! docs/FLEET.md cites the fixture tests that call it.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::{HttpRequest, HttpRequestBody};

use super::registry::{parse_raw_response, send_request, RawResponse};

/// One request on a loopback address (`Connection: close`), the response read whole (chunked bodies
/// decoded; no body for `HEAD`); `None` when the connection or the response fails.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<RawResponse> {
    let length = body.len().to_string();
    let mut headers = headers.to_vec();
    if !body.is_empty() || method == "PUT" || method == "POST" {
        headers.push(("Content-Length", &length));
    }
    let mut stream = send_request(
        addr,
        method,
        target,
        &headers,
        body,
        Duration::from_secs(60),
    )?;
    let mut response = Vec::new();
    // A server may close right after a HEAD's headers: whatever arrived is what counts.
    if stream.read_to_end(&mut response).is_err() && response.is_empty() {
        return None;
    }
    let mut r = parse_raw_response(&response)?;
    let chunked = r
        .headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if method == "HEAD" {
        r.body.clear();
    } else if chunked {
        r.body = dechunk(&r.body)?;
    }
    Some(r)
}

/// Decodes a complete `Transfer-Encoding: chunked` body; `None` if it is cut short.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if raw.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            write!(out, "%{b:02X}").expect("writing to a String cannot fail");
        }
    }
    out
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The text of every `<tag>…</tag>` in `xml`, in order.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        found.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    found
}

/// An S3 API endpoint on loopback and the credentials it takes.
#[derive(Clone, Debug)]
pub struct S3Client {
    pub addr: SocketAddr,
    pub region: String,
    pub key_id: String,
    pub secret: String,
    /// The server's log, whose end a failed call prints.
    pub log: Option<PathBuf>,
}

impl S3Client {
    /// `METHOD target` signed with SigV4 (every header given is signed, the body's SHA-256 too);
    /// `None` when the server does not answer.
    pub fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Option<RawResponse> {
        let mut req = HttpRequest::new(HttpRequestBody::from(body.to_vec()));
        *req.method_mut() = method.parse().expect("an HTTP method");
        *req.uri_mut() = format!("http://{}{target}", self.addr)
            .parse()
            .unwrap_or_else(|e| panic!("request target {target:?}: {e}"));
        for (name, value) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                http::HeaderValue::from_str(value).expect("a header value"),
            );
        }
        let credential = AwsCredential {
            key_id: self.key_id.clone(),
            secret_key: self.secret.clone(),
            token: None,
        };
        AwsAuthorizer::new(&credential, "s3", &self.region).authorize(&mut req, None);
        // `send_request` writes `Host` itself, the same `127.0.0.1:PORT` that was signed.
        let signed: Vec<(String, String)> = req
            .headers()
            .iter()
            .filter(|(n, _)| *n != http::header::HOST)
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    v.to_str().expect("an ASCII header").to_owned(),
                )
            })
            .collect();
        let signed: Vec<(&str, &str)> = signed
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        request(self.addr, method, target, &signed, body)
    }

    /// [`S3Client::send`] for the tests' own reads and writes; panics when the server does not
    /// answer. An answer of 500 or above is retried a few times first (moto, a Python server,
    /// sometimes fails a request that races a write with a 500; a Garage node that just rejoined may
    /// answer 503 for a moment), so never call it to observe an outage.
    fn call(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        let mut last = None;
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            match self.send(method, target, headers, body) {
                Some(r) if r.status < 500 => return r,
                other => last = other,
            }
        }
        let log = self
            .log
            .as_ref()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default();
        let tail: String = {
            let mut chars: Vec<char> = log.chars().rev().take(8000).collect();
            chars.reverse();
            chars.into_iter().collect()
        };
        panic!(
            "S3 {method} {target} on {}: {}\n--- server log (end) ---\n{tail}",
            self.addr,
            last.map_or_else(
                || "no response".to_owned(),
                |r| format!("status {}: {}", r.status, String::from_utf8_lossy(&r.body))
            )
        )
    }

    /// Creates bucket `name` (a valid bucket name, e.g. `regcache-test`).
    pub fn create_bucket(&self, name: &str) {
        let r = self.call("PUT", &format!("/{name}"), &[], b"");
        assert_eq!(
            r.status,
            200,
            "create bucket {name} on {}: {}",
            self.addr,
            String::from_utf8_lossy(&r.body)
        );
    }

    /// Every object of `bucket` whose key starts with `prefix`: (key, size), in key order.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut target = format!(
                "/{bucket}?list-type=2&max-keys=1000&prefix={}",
                encode(prefix).replace('/', "%2F")
            );
            if let Some(t) = &token {
                write!(
                    target,
                    "&continuation-token={}",
                    encode(t).replace('/', "%2F")
                )
                .expect("writing to a String cannot fail");
            }
            let r = self.call("GET", &target, &[], b"");
            let xml = String::from_utf8_lossy(&r.body).into_owned();
            assert_eq!(r.status, 200, "list {bucket} {prefix:?}: {xml}");
            for contents in elements(&xml, "Contents") {
                let key = elements(contents, "Key")
                    .first()
                    .map(|k| xml_unescape(k))
                    .unwrap_or_else(|| panic!("<Contents> without <Key>: {contents}"));
                let size = elements(contents, "Size")
                    .first()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or_else(|| panic!("<Contents> without <Size>: {contents}"));
                out.push((key, size));
            }
            let truncated = elements(&xml, "IsTruncated").first() == Some(&"true");
            token = elements(&xml, "NextContinuationToken")
                .first()
                .map(|t| xml_unescape(t));
            if !truncated || token.is_none() {
                break;
            }
        }
        out.sort();
        out
    }

    /// Stores `data` at `bucket`/`key` (unconditionally).
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        // With no Content-Type, moto's web layer may read the body as a form and store nothing.
        let r = self.call(
            "PUT",
            &format!("/{bucket}/{}", encode(key)),
            &[("Content-Type", "application/octet-stream")],
            data,
        );
        assert_eq!(
            r.status,
            200,
            "PUT {bucket}/{key}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }

    /// The bytes of `bucket`/`key`, or `None` when there is no such object.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let r = self.call("GET", &format!("/{bucket}/{}", encode(key)), &[], b"");
        match r.status {
            200 => Some(r.body),
            404 => None,
            s => panic!(
                "GET {bucket}/{key}: status {s}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }
}

/// What a server does with a "create only" write (`If-None-Match: *`) over an existing object.
#[derive(Debug, PartialEq, Eq)]
pub struct ConditionalWrites {
    /// `PutObject`: refused with `412 Precondition Failed`, the object kept.
    pub put_refused: bool,
    /// `CompleteMultipartUpload`: refused with `412`, the object kept.
    pub multipart_completion_refused: bool,
}

/// Writes `bucket`/`key` (which must not exist), then tries to write it again with
/// `If-None-Match: *`, once with `PutObject` and once by completing a one-part multipart upload,
/// and reads back what the object holds after each. Panics on any answer other than the two an S3
/// server may give (`200`: written over, `412`: refused) or when the object disagrees with it.
pub fn conditional_writes(s3: &S3Client, bucket: &str, key: &str) -> ConditionalWrites {
    let target = format!("/{bucket}/{}", encode(key));
    let create_only = [
        ("Content-Type", "application/octet-stream"),
        ("If-None-Match", "*"),
    ];
    let first = s3.call("PUT", &target, &create_only, b"first");
    assert_eq!(
        first.status,
        200,
        "the first create-only PUT of {key}: {}",
        String::from_utf8_lossy(&first.body)
    );

    let second = s3.call("PUT", &target, &create_only, b"second");
    let put_refused = refused_or_written(s3, bucket, key, &second, b"first", b"second", "PUT");

    let started = s3.call("POST", &format!("{target}?uploads"), &[], b"");
    let xml = String::from_utf8_lossy(&started.body).into_owned();
    assert_eq!(started.status, 200, "CreateMultipartUpload: {xml}");
    let upload_id = elements(&xml, "UploadId")
        .first()
        .map(|id| xml_unescape(id))
        .unwrap_or_else(|| panic!("CreateMultipartUpload without <UploadId>: {xml}"));
    let upload = encode(&upload_id);
    let part = s3.call(
        "PUT",
        &format!("{target}?partNumber=1&uploadId={upload}"),
        &[],
        b"third",
    );
    assert_eq!(
        part.status,
        200,
        "UploadPart: {}",
        String::from_utf8_lossy(&part.body)
    );
    let etag = part
        .header("etag")
        .unwrap_or_else(|| panic!("UploadPart without an ETag: {:?}", part.headers))
        .to_owned();
    let complete = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part>\
         </CompleteMultipartUpload>"
    );
    let completed = s3.call(
        "POST",
        &format!("{target}?uploadId={upload}"),
        &[("If-None-Match", "*")],
        complete.as_bytes(),
    );
    let kept: &[u8] = if put_refused { b"first" } else { b"second" };
    let multipart_completion_refused = refused_or_written(
        s3,
        bucket,
        key,
        &completed,
        kept,
        b"third",
        "CompleteMultipartUpload",
    );
    if multipart_completion_refused {
        // Leave no parts behind (the server is dropped with the test anyway).
        let _ = s3.send("DELETE", &format!("{target}?uploadId={upload}"), &[], b"");
    }
    ConditionalWrites {
        put_refused,
        multipart_completion_refused,
    }
}

/// Whether `answer` refused a create-only write (`412`, `bucket`/`key` still `kept`) rather than
/// making it (`200`, `key` now `written`).
fn refused_or_written(
    s3: &S3Client,
    bucket: &str,
    key: &str,
    answer: &RawResponse,
    kept: &[u8],
    written: &[u8],
    what: &str,
) -> bool {
    let body = String::from_utf8_lossy(&answer.body).into_owned();
    // A CompleteMultipartUpload may fail with 200 and an <Error> body.
    let refused = match answer.status {
        200 if !body.contains("<Error>") => false,
        412 => true,
        200 if body.contains("PreconditionFailed") => true,
        s => panic!("create-only {what} over {key}: status {s}: {body}"),
    };
    let now = s3.get(bucket, key);
    let want = if refused { kept } else { written };
    assert_eq!(
        now.as_deref(),
        Some(want),
        "after a create-only {what} over {key} answered {} ({body}), the object holds {:?}",
        answer.status,
        now.as_deref().map(String::from_utf8_lossy)
    );
    refused
}

//! Test HTTP replies: status, headers and body read whole, with helpers for assertion messages.

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use futures_util::StreamExt as _;

use super::media::accept_all;
use super::regcache::client;

/// A response read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Status, headers and (the start of) the body, for assertion messages.
    pub fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(600)]).into_owned();
        format!(
            "status {} headers {:?} body ({} bytes) {body:?}",
            self.status,
            self.headers,
            self.body.len()
        )
    }

    pub fn json(&self, what: &str) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {}", self.describe()))
    }
}

pub async fn send(req: reqwest::RequestBuilder, what: &str) -> Reply {
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("{what}: reading the body failed (status {status}): {e}"));
    Reply {
        status,
        headers,
        body,
    }
}

/// `GET url` as docker, containerd and podman send it: naming all four manifest types in
/// `Accept` (a client naming none would be refused OCI manifests, as by distribution).
pub async fn get(url: &str) -> Reply {
    send(
        client().get(url).header("accept", accept_all()),
        &format!("GET {url}"),
    )
    .await
}

/// Reads a response body as a stream: the bytes that arrived and the error that ended it, if any.
pub async fn read_streamed(resp: reqwest::Response) -> (Vec<u8>, Option<String>) {
    let mut got = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => got.extend_from_slice(&b),
            Err(e) => return (got, Some(format!("{e:?}"))),
        }
    }
    (got, None)
}

/// A GET whose body must not arrive complete: `(status, bytes received, stream error)`.
pub async fn get_streamed(url: &str) -> (StatusCode, Vec<u8>, Option<String>) {
    let resp = client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let (got, err) = read_streamed(resp).await;
    (status, got, err)
}

/// Parses a raw HTTP/1.1 response (head and body as received; no chunked decoding).
pub fn parse_reply(buf: &[u8], what: &str) -> Reply {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{what}: no header end in {:?}",
                String::from_utf8_lossy(buf)
            )
        });
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what}: bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            ) {
                headers.append(k, v);
            }
        }
    }
    Reply {
        status: StatusCode::from_u16(status).unwrap_or_else(|e| panic!("{what}: {status}: {e}")),
        headers,
        body: Bytes::copy_from_slice(&buf[split + 4..]),
    }
}

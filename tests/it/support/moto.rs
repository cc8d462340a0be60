//! An S3-compatible server on loopback for the shared bucket tier: moto's `moto_server` (PyPI
//! `moto[server]`, installed by `tests/setup-deps.sh` in the venv `/opt/regcache-moto`).
//!
//! [`Moto::start`] runs `moto_server -H 127.0.0.1 -p <free port>` and waits until it answers; the
//! child is killed when the [`Moto`] is dropped. [`Moto::stop`] makes its port refuse connections (an
//! outage) and [`Moto::restart`] brings it back on the same port. moto keeps everything in memory:
//! a restarted server is empty except for the buckets [`Moto::create_bucket`] made, which it creates
//! again.
//!
//! The tests read the bucket with plain HTTP ([`request`]): moto accepts any credentials, but wants an
//! `Authorization` header on every request; an unsigned AWS4 one ([`AUTH`]) does.

use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;

use super::clients::{command, require};
use super::daemon::{home_dir, Daemon};
use super::process::free_port;
use super::registry::{parse_raw_response, send_request, RawResponse};

/// Where `tests/setup-deps.sh` installs moto.
pub const MOTO_SERVER: &str = "/opt/regcache-moto/bin/moto_server";
/// An `Authorization` header moto accepts (it checks no signature).
pub const AUTH: &str = "AWS4-HMAC-SHA256 Credential=test/20261126/us-east-1/s3/aws4_request, \
                        SignedHeaders=host, Signature=x";
/// What regcache is configured with (`access_key_id` and `secret_access_key`): moto takes any.
pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "test";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `moto_server` on 127.0.0.1.
pub struct Moto {
    child: Daemon,
    port: u16,
    buckets: Vec<String>,
    home: TempDir,
}

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

impl Moto {
    /// Starts moto on a free loopback port and waits until it answers.
    pub fn start() -> Moto {
        assert!(
            Path::new(MOTO_SERVER).is_file(),
            "{MOTO_SERVER} is missing: the bucket tests need moto (PyPI moto[server]); \
             run `bash tests/setup-deps.sh` (as root) to install it"
        );
        let mut moto = Moto {
            child: Daemon::default(),
            port: 0,
            buckets: Vec::new(),
            home: home_dir("regcache-moto-"),
        };
        // Free ports are picked then released: another process may take one meanwhile, so retry.
        let mut why = String::new();
        for _ in 0..3 {
            moto.port = free_port();
            match moto.spawn_and_wait() {
                Ok(()) => return moto,
                Err(e) => why = e,
            }
        }
        panic!(
            "moto did not start: {why}\n--- moto log ---\n{}",
            moto.logs()
        );
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.home.path().join("moto.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the moto log");
        let log2 = log.try_clone().expect("clone the moto log handle");
        // setpriv --pdeathsig: moto dies with the test process even if a panic skips Drop.
        let mut cmd = command(&require("setpriv", "util-linux"));
        cmd.args(["--pdeathsig", "KILL", "--", MOTO_SERVER])
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let addr = self.addr();
        self.child.wait_ready(
            cmd.spawn().expect("spawn moto_server"),
            READY_TIMEOUT,
            Duration::from_millis(100),
            "GET / answers 200",
            || {
                request(addr, "GET", "/", &[("Authorization", AUTH)], b"")
                    .is_some_and(|r| r.status == 200)
            },
        )
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, what goes in `[store.s3] endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// A signed-looking request to moto; panics when moto does not answer. moto (a Python server)
    /// sometimes fails a request that races a write with a 500: such answers are retried a few times.
    fn call(&self, method: &str, target: &str, body: &[u8]) -> RawResponse {
        let mut last = None;
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            match request(
                self.addr(),
                method,
                target,
                &[("Authorization", AUTH)],
                body,
            ) {
                Some(r) if r.status < 500 => return r,
                other => last = other,
            }
        }
        panic!(
            "moto {method} {target}: {}\n--- moto log (end) ---\n{}",
            last.map_or_else(
                || "no response".to_owned(),
                |r| format!("status {}: {}", r.status, String::from_utf8_lossy(&r.body))
            ),
            self.logs()
                .chars()
                .rev()
                .take(8000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<String>()
        )
    }

    /// Creates bucket `name` (a valid bucket name, e.g. `regcache-test`).
    pub fn create_bucket(&mut self, name: &str) {
        let r = self.call("PUT", &format!("/{name}"), b"");
        assert_eq!(
            r.status,
            200,
            "moto: create bucket {name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if !self.buckets.iter().any(|b| b == name) {
            self.buckets.push(name.to_owned());
        }
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
            let r = self.call("GET", &target, b"");
            let xml = String::from_utf8_lossy(&r.body).into_owned();
            assert_eq!(r.status, 200, "moto: list {bucket} {prefix:?}: {xml}");
            for contents in elements(&xml, "Contents") {
                let key = elements(contents, "Key")
                    .first()
                    .map(|k| xml_unescape(k))
                    .unwrap_or_else(|| panic!("moto: <Contents> without <Key>: {contents}"));
                let size = elements(contents, "Size")
                    .first()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or_else(|| panic!("moto: <Contents> without <Size>: {contents}"));
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

    /// Stores `data` at `bucket`/`key`.
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        // With no Content-Type, moto's web layer may read the body as a form and store nothing.
        let r = request(
            self.addr(),
            "PUT",
            &format!("/{bucket}/{}", encode(key)),
            &[
                ("Authorization", AUTH),
                ("Content-Type", "application/octet-stream"),
            ],
            data,
        )
        .unwrap_or_else(|| panic!("moto PUT {bucket}/{key}: no response"));
        assert_eq!(
            r.status,
            200,
            "moto: PUT {bucket}/{key}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }

    /// The bytes of `bucket`/`key`, or `None` when there is no such object.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let r = self.call("GET", &format!("/{bucket}/{}", encode(key)), b"");
        match r.status {
            200 => Some(r.body),
            404 => None,
            s => panic!(
                "moto: GET {bucket}/{key}: status {s}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }

    /// Kills moto (SIGKILL) and reaps it; its port then refuses connections. No-op when stopped.
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts it again on the same port; it is empty (moto keeps data in memory) but for the buckets
    /// made by [`Moto::create_bucket`], created again.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.spawn_and_wait() {
            panic!(
                "moto did not restart: {why}\n--- moto log ---\n{}",
                self.logs()
            );
        }
        for b in self.buckets.clone() {
            self.create_bucket(&b);
        }
    }

    /// Everything moto wrote so far (its request log included).
    pub fn logs(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moto_stores_lists_and_survives_a_restart_empty() {
        let mut moto = Moto::start();
        moto.create_bucket("regcache-fixture");
        let mut want = Vec::new();
        for i in 0..5u8 {
            let key = format!("p/repos/127.0.0.1:5000/a/b/_tags/t{i}");
            moto.put("regcache-fixture", &key, &vec![i; usize::from(i) * 1000]);
            want.push((key, u64::from(i) * 1000));
        }
        moto.put("regcache-fixture", "other/x", b"x");
        assert_eq!(moto.list("regcache-fixture", "p/"), want);
        assert_eq!(moto.list("regcache-fixture", "").len(), 6);
        assert_eq!(
            moto.get("regcache-fixture", &want[3].0),
            Some(vec![3u8; 3000])
        );
        assert_eq!(moto.get("regcache-fixture", "p/missing"), None);

        let addr = moto.addr();
        moto.stop();
        assert!(
            request(addr, "GET", "/", &[], b"").is_none(),
            "stopped moto answers"
        );
        moto.restart();
        assert_eq!(moto.addr(), addr);
        assert!(moto.list("regcache-fixture", "").is_empty());
    }
}

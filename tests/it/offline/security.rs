//! Hostile clients and hostile upstreams: each test tries one attack on a running regcache and
//! asserts the outcome (a clear refusal, nothing stored, nothing touched, others still served).
//!
//! Hostile upstreams that a well-behaved HTTP server cannot imitate (a body longer than its
//! `Content-Length`, endless redirects, JSON nested a million levels deep) are played by
//! [`RawUpstream`], a few lines of raw TCP that answer whatever bytes a test hands them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::support::fake::{sha256_digest, FakeUpstream};
use crate::support::media::OCI_MANIFEST;
use crate::support::regcache::{client, config_for, error_code, stored, Regcache};
use crate::support::reply::{get, get_streamed, parse_reply, send, Reply};

// ---- helpers ------------------------------------------------------------------------------------

/// A client that opens a new connection for every request (connection limits are counted).
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

fn assert_oci(r: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!(r.status.as_u16(), status, "{what}: {}", r.describe());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}: not JSON: {}",
        r.describe()
    );
    assert_eq!(error_code(&r.body), code, "{what}: {}", r.describe());
}

/// Sends raw bytes as a request and reads the whole answer (the connection is closed by the
/// request's `Connection: close`).
async fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let what = String::from_utf8_lossy(&request[..request.len().min(120)]).into_owned();
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    s.write_all(request)
        .await
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => {}
        // A reset after the answer was sent still leaves the answer readable.
        Ok(Err(e)) if !buf.is_empty() => eprintln!("{what}: read ended with {e}"),
        Ok(Err(e)) => panic!("{what}: read: {e}"),
        Err(_) => panic!("{what}: no complete answer in 10 s"),
    }
    parse_reply(&buf, &what)
}

async fn raw_get(addr: SocketAddr, target: &str) -> Reply {
    raw(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// `len` deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Bytes {
    let mut g = Rng::new(seed);
    Bytes::from((0..len).map(|_| g.next() as u8).collect::<Vec<u8>>())
}

/// A tiny deterministic generator (xorshift64), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// The body of `/metrics`.
async fn metrics(rc: &Regcache) -> String {
    let r = get(&format!("{}/metrics", rc.url())).await;
    assert_eq!(r.status, StatusCode::OK, "metrics: {}", r.describe());
    String::from_utf8_lossy(&r.body).into_owned()
}

/// The value of a metric line starting with `prefix` (name and labels), or 0.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---- a raw, hostile upstream --------------------------------------------------------------------

/// One request as [`RawUpstream`] saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: String,
}

type Answer = Arc<dyn Fn(&str, &str) -> Vec<u8> + Send + Sync>;

/// An upstream that answers each request with the bytes its handler returns (method, target),
/// then closes the connection. It does not care about HTTP's rules; that is the point.
struct RawUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    async fn start(answer: impl Fn(&str, &str) -> Vec<u8> + Send + Sync + 'static) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer: Answer = Arc::new(answer);
        let seen2 = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let (answer, seen) = (Arc::clone(&answer), Arc::clone(&seen2));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 << 10 {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let mut first = head.lines().next().unwrap_or_default().split(' ');
                    let method = first.next().unwrap_or_default().to_owned();
                    let target = first.next().unwrap_or_default().to_owned();
                    seen.lock().expect("seen").push(Seen {
                        method: method.clone(),
                        target: target.clone(),
                        headers: head.clone(),
                    });
                    let out = answer(&method, &target);
                    let _ = s.write_all(&out).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        RawUpstream { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

/// A raw HTTP/1.1 answer; `Connection: close` is added.
fn http(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// `body` in chunked transfer coding.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(1000) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

// ---- hostile clients: parsers and traversal -----------------------------------------------------

/// Every file under `dir`, with its size, relative to `dir`.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    out.push((p.strip_prefix(dir).unwrap_or(&p).to_owned(), 0));
                    stack.push(p);
                }
                _ => {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    out.push((p.strip_prefix(dir).unwrap_or(&p).to_owned(), len));
                }
            }
        }
    }
    out.sort();
    out
}

/// A hostile request target: traversal pieces, encodings, NUL, odd lengths, in every position.
fn hostile_target(g: &mut Rng) -> String {
    const PIECES: &[&str] = &[
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        "%2e",
        "..%2f",
        "%2f",
        "%2F",
        "%00",
        "%5c",
        "\\",
        "//",
        "a",
        "b",
        "library",
        "alpine",
        "etc",
        "passwd",
        "tmp",
        "blobs",
        "manifests",
        "tags",
        "list",
        "sha256:",
        "sha512:",
        "0",
        "ff",
        "A",
        "_",
        "-",
        "~",
        ":",
        "@",
        "%25",
        "%2e%2e%2f",
        "....",
        ".%2e",
        "%c0%ae",
        "%u002e",
        "ghcr.io",
        "localhost:5000",
        "x.y",
    ];
    let hex: String = (0..64)
        .map(|_| b"0123456789abcdef"[g.below(16)] as char)
        .collect();
    let segs = 1 + g.below(6);
    let mut name: Vec<String> = (0..segs)
        .map(|_| {
            let n = 1 + g.below(3);
            (0..n).map(|_| g.pick(PIECES)).collect::<String>()
        })
        .collect();
    if g.below(10) == 0 {
        name.push("a".repeat(200 + g.below(100)));
    }
    let name = name.join("/");
    let tail = match g.below(6) {
        0 => format!("manifests/{}", g.pick(PIECES)),
        1 => format!("manifests/{}{}", g.pick(PIECES), g.pick(PIECES)),
        2 => format!("blobs/sha256:{hex}"),
        3 => format!("blobs/{}{hex}", g.pick(PIECES)),
        4 => "tags/list".to_owned(),
        _ => format!("manifests/{}", "t".repeat(120 + g.below(20))),
    };
    let query = match g.below(5) {
        0 => format!("?ns={}", g.pick(PIECES)),
        1 => format!(
            "?n={}&last={}",
            g.pick(&["-1", "x", "99999999999999999999", "5"]),
            g.pick(PIECES)
        ),
        _ => String::new(),
    };
    format!("/v2/{name}/{tail}{query}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_attempts_are_refused_and_touch_nothing_outside_the_data_dir() {
    let fake = FakeUpstream::start().await;
    let parent = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let data = parent.path().join("data");
    let outside = parent.path().join("outside");
    std::fs::create_dir_all(outside.join("etc")).expect("mkdir");
    std::fs::write(outside.join("etc/passwd"), "sentinel\n").expect("sentinel");
    std::fs::write(outside.join("secret"), "do not touch\n").expect("sentinel");
    let rc = Regcache::start_in(&data, &config_for(&fake.url(), "", ""));
    let before_outside = tree(&outside);
    let before_data = tree(&data);

    let hex = "0".repeat(64);
    let long_name = "a".repeat(256);
    let long_tag = "t".repeat(129);
    let fixed: Vec<(String, &str)> = vec![
        ("/v2/../outside/etc/manifests/passwd".into(), "NAME_INVALID"),
        (
            "/v2/%2e%2e/%2e%2e/outside/manifests/x".into(),
            "NAME_INVALID",
        ),
        (
            "/v2/a/..%2f..%2foutside/blobs/sha256:x".into(),
            "NAME_INVALID",
        ),
        ("/v2/a%2f..%2f..%2foutside/tags/list".into(), "NAME_INVALID"),
        ("/v2/a%00b/manifests/latest".into(), "NAME_INVALID"),
        ("/v2/a/.%2e/b/manifests/latest".into(), "NAME_INVALID"),
        (format!("/v2/{long_name}/manifests/latest"), "NAME_INVALID"),
        (format!("/v2/a/manifests/{long_tag}"), "TAG_INVALID"),
        ("/v2/a/manifests/..".into(), "TAG_INVALID"),
        ("/v2/a/manifests/%2e%2e".into(), "TAG_INVALID"),
        ("/v2/a/manifests/v1%00".into(), "TAG_INVALID"),
        (
            "/v2/a/blobs/sha256:..%2f..%2f..%2foutside%2fsecret".into(),
            "DIGEST_INVALID",
        ),
        (format!("/v2/a/blobs/sha256:{hex}%00"), "DIGEST_INVALID"),
        (format!("/v2/a/blobs/sha256:{hex}0"), "DIGEST_INVALID"),
        (
            format!("/v2/a/blobs/sha256:../{}", &hex[3..]),
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/a/manifests/sha256:..%2f{}", &hex[5..]),
            "DIGEST_INVALID",
        ),
        (format!("/v2/a/referrers/sha256:{hex}/.."), "DIGEST_INVALID"),
    ];
    for (target, code) in &fixed {
        let r = raw_get(rc.addr(), target).await;
        assert_oci(&r, 400, code, target);
    }

    let mut g = Rng::new(8);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..1500 {
        let target = hostile_target(&mut g);
        let r = raw_get(rc.addr(), &target).await;
        let s = r.status.as_u16();
        *statuses.entry(s).or_insert(0) += 1;
        assert!(
            matches!(s, 400 | 403 | 404 | 414),
            "request {i} {target}: expected a 4xx refusal: {}",
            r.describe()
        );
        if !r.body.is_empty() {
            let code = error_code(&r.body);
            if s == 400 {
                assert!(
                    matches!(
                        code.as_str(),
                        "NAME_INVALID"
                            | "TAG_INVALID"
                            | "DIGEST_INVALID"
                            | "PAGINATION_NUMBER_INVALID"
                    ),
                    "{target}: {}",
                    r.describe()
                );
            }
        }
    }
    eprintln!("statuses of the generated requests: {statuses:?}");
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > 700,
        "most hostile targets are refused as invalid: {statuses:?}"
    );

    // Nothing outside the data directory changed, nothing new appeared next to it, and the
    // data directory holds only what regcache always creates.
    assert_eq!(tree(&outside), before_outside, "outside the data dir");
    let mut siblings: Vec<_> = std::fs::read_dir(parent.path())
        .expect("read parent")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    siblings.sort();
    assert_eq!(siblings, vec!["data".to_string(), "outside".to_string()]);
    let after: Vec<_> = tree(&data)
        .into_iter()
        .filter(|(p, _)| !before_data.iter().any(|(q, _)| q == p))
        .collect();
    assert!(
        after
            .iter()
            .all(|(p, _)| p.starts_with("tmp") || p.starts_with("blobs")),
        "new files in the data dir: {after:?}"
    );
    for f in fake.requests() {
        assert!(
            !f.path.contains("..") && !f.path.contains('%') && !f.path.contains('\0'),
            "an invalid name reached the upstream: {f:?}"
        );
    }
    let r = get(&format!("{}/v2/", rc.url())).await;
    assert_eq!(r.status, StatusCode::OK, "still serving: {}", r.describe());
}

// ---- hostile clients: limits --------------------------------------------------------------------

/// Opens a connection and sends the start of a request that never ends.
async fn slow_start(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: slow\r\n")
        .await
        .expect("write");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_do_not_stop_others_and_are_cut_off() {
    let fake = FakeUpstream::start().await;
    let (mdigest, _) = fake.add_image("team/app", "v1", Bytes::from_static(b"layer"));
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "",
        "[limits]\nmax_connections = 64\nheader_read_timeout = \"3s\"\n",
    ));
    let addr = rc.addr();
    let mut slow = Vec::new();
    for _ in 0..40 {
        slow.push(slow_start(addr).await);
    }
    let opened = Instant::now();
    // Keep trickling header lines into every slow connection.
    let trickle = tokio::spawn(async move {
        let mut conns = slow;
        for i in 0..40 {
            for c in conns.iter_mut() {
                let _ = c.write_all(format!("x-slow-{i}: 1\r\n").as_bytes()).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        conns
    });
    let c = fresh_client();
    for i in 0..10 {
        let t = Instant::now();
        let r = send(
            c.get(format!("{}/v2/team/app/manifests/v1", rc.url())),
            "manifest",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.describe());
        assert_eq!(r.header("docker-content-digest"), Some(mdigest.as_str()));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "request {i} took {:?} while slow clients were connected",
            t.elapsed()
        );
    }
    let conns = trickle.await.expect("trickle task");
    // Every slow client was cut off after header_read_timeout (3 s), however it trickled.
    let elapsed = opened.elapsed();
    assert!(elapsed >= Duration::from_secs(3), "premise: {elapsed:?}");
    for (i, mut c) in conns.into_iter().enumerate() {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(false);
        assert!(
            closed,
            "slow connection {i} is still open after {:?}",
            opened.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503_and_service_resumes() {
    let fake = FakeUpstream::start().await;
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "",
        "[limits]\nmax_connections = 8\nheader_read_timeout = \"2s\"\n",
    ));
    let addr = rc.addr();
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = raw_get(addr, "/v2/").await;
    assert_oci(&r, 503, "UNAVAILABLE", "over max_connections");
    assert_eq!(r.header("retry-after"), Some("1"), "{}", r.describe());
    assert!(
        String::from_utf8_lossy(&r.body).contains("max_connections"),
        "{}",
        r.describe()
    );
    // The idle connections are closed after header_read_timeout; then clients are served again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = raw_get(addr, "/v2/").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "after the idle ones left: {}",
        r.describe()
    );
    drop(idle);
    let m = metrics(&rc).await;
    assert!(
        metric(
            &m,
            "regcache_limit_rejections_total{limit=\"max_connections\"}"
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_targets_get_431_and_414() {
    let fake = FakeUpstream::start().await;
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "",
        "[limits]\nmax_header_size = \"4KiB\"\nmax_uri_length = 1024\n",
    ));
    let addr = rc.addr();
    let big = "x".repeat(5000);
    let r = raw(
        addr,
        format!("GET /v2/ HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status.as_u16(), 431, "{}", r.describe());
    let long = format!("/v2/a/tags/list?last={}", "y".repeat(1100));
    let r = raw_get(addr, &long).await;
    assert_oci(&r, 414, "UNSUPPORTED", "long target");
    let r = raw_get(addr, &format!("/v2/{}/manifests/x", "a/".repeat(600))).await;
    assert_oci(&r, 414, "UNSUPPORTED", "long path");
    assert_eq!(fake.request_count(), 0, "{:?}", fake.requests());
    let r = raw_get(addr, "/v2/").await;
    assert_eq!(r.status, StatusCode::OK, "still serving: {}", r.describe());
    let m = metrics(&rc).await;
    assert!(
        metric(
            &m,
            "regcache_limit_rejections_total{limit=\"max_uri_length\"}"
        ) >= 2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_fills_over_the_limit_wait_then_get_503_with_retry_after() {
    let fake = FakeUpstream::start().await;
    let a = noise(100_000, 1);
    let b = noise(50_000, 2);
    let da = fake.add_blob("team/a", a.clone());
    let db = fake.add_blob("team/b", b.clone());
    fake.set_slow_blobs(10_000, Duration::from_millis(150));
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "",
        "[limits]\nmax_fills = 1\nfill_wait = \"300ms\"\n",
    ));
    let url_a = format!("{}/v2/team/a/blobs/{da}", rc.url());
    let url_b = format!("{}/v2/team/b/blobs/{db}", rc.url());
    let first = tokio::spawn({
        let u = url_a.clone();
        async move { get(&u).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.blob_gets(&da) == 0 {
        assert!(Instant::now() < deadline, "the first fill never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A second client of the same blob joins the running fill: no slot needed.
    let joined = tokio::spawn({
        let u = url_a.clone();
        async move { get(&u).await }
    });
    let t = Instant::now();
    let r = get(&url_b).await;
    assert_oci(&r, 503, "UNAVAILABLE", "fill over the limit");
    assert!(r.header("retry-after").is_some(), "{}", r.describe());
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "waited fill_wait first: {:?}",
        t.elapsed()
    );
    assert!(
        String::from_utf8_lossy(&r.body).contains("max_fills"),
        "{}",
        r.describe()
    );
    assert_eq!(
        fake.blob_gets(&db),
        0,
        "no upstream fetch for the refused fill"
    );
    for (what, h) in [("first", first), ("joined", joined)] {
        let r = h.await.expect("client task");
        assert!(
            r.status == StatusCode::OK && r.body == a,
            "{what}: {}",
            r.describe()
        );
    }
    assert_eq!(fake.blob_gets(&da), 1, "one fill served both clients");
    let r = get(&url_b).await;
    assert!(
        r.status == StatusCode::OK && r.body == b,
        "after: {}",
        r.describe()
    );
    let m = metrics(&rc).await;
    assert!(
        metric(&m, "regcache_limit_rejections_total{limit=\"max_fills\"}") >= 1.0,
        "{m}"
    );

    // With a longer wait, the second fill queues and is served once the first ends.
    let c = noise(60_000, 3);
    let d = noise(60_000, 4);
    let dc = fake.add_blob("team/c", c.clone());
    let dd = fake.add_blob("team/d", d.clone());
    let patient = Regcache::start(&config_for(
        &fake.url(),
        "",
        "[limits]\nmax_fills = 1\nfill_wait = \"20s\"\n",
    ));
    let (url_c, url_d) = (
        format!("{}/v2/team/c/blobs/{dc}", patient.url()),
        format!("{}/v2/team/d/blobs/{dd}", patient.url()),
    );
    let (rc_, rd) = tokio::join!(get(&url_c), get(&url_d));
    assert!(
        rc_.status == StatusCode::OK && rc_.body == c,
        "{}",
        rc_.describe()
    );
    assert!(
        rd.status == StatusCode::OK && rd.body == d,
        "{}",
        rd.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_size_is_bounded_by_max_page() {
    let fake = FakeUpstream::start().await;
    for i in 0..10 {
        fake.add_image(
            "team/many",
            &format!("t{i}"),
            Bytes::from(format!("layer{i}")),
        );
    }
    let rc = Regcache::start(&config_for(&fake.url(), "", "[limits]\nmax_page = 5\n"));
    let r = get(&format!("{}/v2/team/many/tags/list?n=6", rc.url())).await;
    assert_oci(&r, 400, "PAGINATION_NUMBER_INVALID", "n over max_page");
    let r = get(&format!("{}/v2/_catalog?n=6", rc.url())).await;
    assert_oci(
        &r,
        400,
        "PAGINATION_NUMBER_INVALID",
        "catalog n over max_page",
    );
    let r = get(&format!("{}/v2/team/many/tags/list?n=5", rc.url())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["tags"].as_array().map(Vec::len), Some(5), "{v}");
    assert!(r.header("link").is_some(), "{}", r.describe());
}

// ---- access control -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_the_allow_list_get_403_denied() {
    let fake = FakeUpstream::start().await;
    fake.add_image("team/app", "v1", Bytes::from_static(b"layer"));
    let closed = "[access]\nallow = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\n";
    let rc = Regcache::start(&config_for(&fake.url(), "", closed));
    for path in [
        "/v2/",
        "/v2/team/app/manifests/v1",
        "/healthz",
        "/metrics",
        "/v2/_catalog",
    ] {
        let r = get(&format!("{}{path}", rc.url())).await;
        assert_oci(&r, 403, "DENIED", path);
        assert!(
            String::from_utf8_lossy(&r.body).contains("access.allow"),
            "{path}: {}",
            r.describe()
        );
    }
    assert_eq!(fake.request_count(), 0, "{:?}", fake.requests());
    // The list is applied live on reload.
    let open = "[access]\nallow = [\"10.0.0.0/8\", \"127.0.0.0/8\"]\n";
    let cfg = regcache::config::Config::parse(
        &config_for(&fake.url(), "", open),
        "reload",
        &Default::default(),
    )
    .expect("config");
    rc.app.reload(cfg).expect("reload");
    let r = get(&format!("{}/v2/team/app/manifests/v1", rc.url())).await;
    assert_eq!(r.status, StatusCode::OK, "after reload: {}", r.describe());
}

fn write_htpasswd(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    write_htpasswd_with_cost(dir, users, 4)
}

/// An htpasswd file in `dir` with bcrypt hashes of cost `cost`.
fn write_htpasswd_with_cost(dir: &Path, users: &[(&str, &str)], cost: u32) -> PathBuf {
    let path = dir.join("htpasswd");
    let text: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, cost).expect("bcrypt")))
        .collect();
    std::fs::write(&path, text).expect("write htpasswd");
    path
}

/// regcache for `upstream_url`, with `[access] htpasswd` set to `htpasswd`.
fn behind_htpasswd(upstream_url: &str, htpasswd: &Path) -> Regcache {
    Regcache::start(&config_for(
        upstream_url,
        "",
        &format!(
            "[access]\nhtpasswd = {:?}\n",
            htpasswd.display().to_string()
        ),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_guards_everything_but_health_probes() {
    let fake = FakeUpstream::start().await;
    let (mdigest, ldigest) = fake.add_image("team/app", "v1", Bytes::from_static(b"layer"));
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let htpasswd = write_htpasswd(dir.path(), &[("alice", "s3cret-pw"), ("bob", "other")]);
    let rc = behind_htpasswd(&fake.url(), &htpasswd);
    let u = rc.url();
    let c = client();

    let challenge = |r: &Reply, what: &str| {
        assert_oci(r, 401, "UNAUTHORIZED", what);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"regcache\""),
            "{what}: {}",
            r.describe()
        );
    };
    // /v2/ itself answers 401 with the challenge: that is where docker learns it must log in.
    challenge(
        &get(&format!("{u}/v2/")).await,
        "GET /v2/ without credentials",
    );
    let head = send(c.head(format!("{u}/v2/")), "HEAD /v2/").await;
    assert_eq!(head.status, StatusCode::UNAUTHORIZED, "{}", head.describe());
    assert!(head.header("www-authenticate").is_some());
    for (what, req) in [
        (
            "no credentials",
            c.get(format!("{u}/v2/team/app/manifests/v1")),
        ),
        (
            "wrong password",
            c.get(format!("{u}/v2/team/app/manifests/v1"))
                .basic_auth("alice", Some("wrong")),
        ),
        (
            "unknown user",
            c.get(format!("{u}/v2/team/app/manifests/v1"))
                .basic_auth("mallory", Some("s3cret-pw")),
        ),
        (
            "another user's password",
            c.get(format!("{u}/v2/team/app/manifests/v1"))
                .basic_auth("bob", Some("s3cret-pw")),
        ),
        (
            "bearer instead of basic",
            c.get(format!("{u}/v2/team/app/manifests/v1"))
                .bearer_auth("s3cret-pw"),
        ),
        (
            "garbage",
            c.get(format!("{u}/v2/team/app/manifests/v1"))
                .header("authorization", "Basic !!!not-base64"),
        ),
        ("metrics", c.get(format!("{u}/metrics"))),
        ("catalog", c.get(format!("{u}/v2/_catalog"))),
    ] {
        let r = send(req, what).await;
        challenge(&r, what);
        assert!(
            !String::from_utf8_lossy(&r.body).contains("s3cret-pw"),
            "{what}: the answer echoes the password"
        );
    }
    assert_eq!(
        fake.request_count(),
        0,
        "unauthenticated requests never reach the upstream: {:?}",
        fake.requests()
    );
    for path in ["/healthz", "/readyz"] {
        let r = get(&format!("{u}{path}")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{path} stays open: {}",
            r.describe()
        );
    }
    let authed = |path: &str| {
        c.get(format!("{u}{path}"))
            .basic_auth("alice", Some("s3cret-pw"))
    };
    let r = send(authed("/v2/"), "/v2/ with credentials").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    let r = send(authed("/v2/team/app/manifests/v1"), "manifest").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(r.header("docker-content-digest"), Some(mdigest.as_str()));
    let r = send(authed(&format!("/v2/team/app/blobs/{ldigest}")), "blob").await;
    assert!(
        r.status == StatusCode::OK && &r.body[..] == b"layer",
        "{}",
        r.describe()
    );
    let r = send(authed("/metrics"), "metrics with credentials").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    let m = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        metric(&m, "regcache_limit_rejections_total{limit=\"auth\"}") >= 8.0,
        "{m}"
    );
    // The upstream never sees the client's credentials.
    for f in fake.requests() {
        assert!(
            f.header("authorization").is_none(),
            "client credentials were forwarded upstream: {f:?}"
        );
    }
    // Many requests with the right password cost one bcrypt check, not one each.
    let t = Instant::now();
    for _ in 0..50 {
        let r = send(authed("/v2/"), "repeat").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

// ---- operator endpoints -------------------------------------------------------------------------

/// The header `regcache gc`, `verify` and `pin` send to the operator endpoints.
const OPERATOR: (&str, &str) = ("x-regcache-operator", "1");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_refuse_what_a_web_page_can_send_and_change_nothing() {
    let fake = FakeUpstream::start().await;
    let (_, layer) = fake.add_image("team/app", "v1", Bytes::from(vec![7u8; 64 << 10]));
    let rc = Regcache::start(&config_for(&fake.url(), "", ""));
    let u = rc.url();
    let c = client();
    let r = send(
        c.get(format!("{u}/v2/team/app/manifests/v1"))
            .header("accept", OCI_MANIFEST),
        "manifest",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    let r = send(c.get(format!("{u}/v2/team/app/blobs/{layer}")), "blob").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    // The fill commits right after the last byte is sent: wait for it.
    for _ in 0..100 {
        if stored(&rc, &layer) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stored(&rc, &layer), "the layer is stored");
    let used = rc.app.cache.store.used_bytes();
    let pins = || {
        rc.app
            .routing()
            .pin_names(&rc.app.cache.store)
            .expect("pin names")
    };

    // What a page on any site can make the browser send without a CORS preflight: a form POST
    // (or a plain GET, an <img>), with the page's Origin and no custom header.
    let targets = [
        (http::Method::POST, "/_regcache/gc?target=0"),
        (http::Method::GET, "/_regcache/verify?repair=true"),
        (http::Method::POST, "/_regcache/verify?repair=true"),
        (http::Method::POST, "/_regcache/pins?image=team/app:v1"),
        (http::Method::GET, "/_regcache/pins"),
    ];
    // (what, Origin, with the operator header): each a request a page can make a browser send,
    // or one that an Origin header gives away.
    let shapes = [
        ("as a form from a page", Some("http://evil.example"), false),
        ("as a form from a sandboxed page", Some("null"), false),
        ("without an Origin or the operator header", None, false),
        (
            "with the operator header and an Origin",
            Some("http://evil.example"),
            true,
        ),
    ];
    for (method, path) in &targets {
        for (shape, origin, operator) in shapes {
            let what = format!("{method} {path} {shape}");
            let mut req = c
                .request(method.clone(), format!("{u}{path}"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("a=b");
            if let Some(o) = origin {
                req = req.header("origin", o);
            }
            if operator {
                req = req.header(OPERATOR.0, OPERATOR.1);
            }
            assert_oci(&send(req, &what).await, 403, "DENIED", &what);
        }
    }
    // A preflight is never granted.
    let r = send(
        c.request(http::Method::OPTIONS, format!("{u}/_regcache/gc"))
            .header("origin", "http://evil.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", OPERATOR.0),
        "preflight",
    )
    .await;
    assert!(
        !r.status.is_success() && r.header("access-control-allow-origin").is_none(),
        "preflight: {}",
        r.describe()
    );
    // DNS rebinding: a page whose name now resolves to 127.0.0.1 is same-origin, may send any
    // header on a GET, and sends no Origin. Its Host header names the page's host.
    let r = raw(
        rc.addr(),
        format!(
            "GET /_regcache/pins HTTP/1.1\r\nHost: rebind.example:{}\r\n{}: {}\r\n\
             Connection: close\r\n\r\n",
            rc.addr().port(),
            OPERATOR.0,
            OPERATOR.1
        )
        .as_bytes(),
    )
    .await;
    assert_oci(&r, 403, "DENIED", "GET /_regcache/pins with a foreign Host");

    assert_eq!(
        rc.app.cache.store.used_bytes(),
        used,
        "nothing was evicted by the refused requests"
    );
    assert!(pins().is_empty(), "nothing was pinned: {:?}", pins());
    let r = send(
        c.get(format!("{u}/v2/team/app/blobs/{layer}")),
        "blob again",
    )
    .await;
    assert_eq!(
        r.header("x-regcache-cache"),
        Some("hit"),
        "still cached: {}",
        r.describe()
    );

    // What the commands send works: POST (DELETE) with the header, no Origin.
    let op = |method: http::Method, path: &str| {
        c.request(method, format!("{u}{path}"))
            .header(OPERATOR.0, OPERATOR.1)
    };
    let r = send(
        op(http::Method::GET, "/_regcache/verify"),
        "GET verify with the header",
    )
    .await;
    assert_oci(
        &r,
        405,
        "UNSUPPORTED",
        "GET /_regcache/verify (it is a POST)",
    );
    assert_eq!(r.header("allow"), Some("POST"), "{}", r.describe());
    let r = send(
        op(http::Method::POST, "/_regcache/verify?repair=true"),
        "verify",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "verify: {}", r.describe());
    let r = send(
        op(http::Method::POST, "/_regcache/pins?image=team/app:v1"),
        "pin",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "pin: {}", r.describe());
    assert_eq!(pins(), vec!["team/app:v1".to_string()]);
    let r = send(op(http::Method::GET, "/_regcache/pins"), "pins").await;
    assert_eq!(r.status, StatusCode::OK, "pins: {}", r.describe());
    let r = send(
        op(http::Method::DELETE, "/_regcache/pins?image=team/app:v1"),
        "unpin",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "unpin: {}", r.describe());
    let r = send(op(http::Method::POST, "/_regcache/gc?target=0"), "gc").await;
    assert_eq!(r.status, StatusCode::OK, "gc: {}", r.describe());
    assert_eq!(
        rc.app.cache.store.used_bytes(),
        0,
        "gc with the header evicts"
    );
}

/// A client that connects from `source` (any 127.0.0.0/8 address: one per simulated machine).
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(source.parse::<std::net::IpAddr>().expect("source address"))
        .timeout(Duration::from_secs(120))
        .build()
        .expect("reqwest client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_flood_neither_delays_nor_locks_out_valid_users() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    // Cost 8: each check takes real time, so that checks queue up behind each other.
    let users = [
        ("alice", "alice-pw"),
        ("bob", "bob-pw"),
        ("carol", "carol-pw"),
    ];
    let rc = behind_htpasswd(
        &fake.url(),
        &write_htpasswd_with_cost(dir.path(), &users, 8),
    );
    let u = rc.url();
    let checks = |m: &str| metric(m, "regcache_auth_bcrypt_checks_total");
    let login = |from: &str, user: &str, pw: &str| {
        let req = client_from(from)
            .get(format!("{u}/v2/"))
            .basic_auth(user, Some(pw));
        async move { send(req, "login").await }
    };

    // alice logged in before the flood: her verified credentials are remembered.
    let r = login("127.0.0.2", "alice", "alice-pw").await;
    assert_eq!(r.status, StatusCode::OK, "alice: {}", r.describe());
    let before = checks(&rc.app.metrics.render());
    assert_eq!(before, 1.0, "one bcrypt check for alice");

    // The flood: 20 machines, 30 different wrong passwords each, all at once, for carol.
    let answered_401 = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = Vec::new();
    for m in 0..20u8 {
        let c = client_from(&format!("127.0.1.{}", m + 1));
        for i in 0..30 {
            let req = c
                .get(format!("{u}/v2/"))
                .basic_auth("carol", Some(format!("guess-{m}-{i}")));
            let answered_401 = Arc::clone(&answered_401);
            flood.push(tokio::spawn(async move {
                let r = send(req, "flood").await;
                if r.status == StatusCode::UNAUTHORIZED {
                    answered_401.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                r
            }));
        }
    }
    // Once the flood's first wrong passwords have been checked, bob (whose credentials were never
    // checked) logs in from his own machine.
    let start = Instant::now();
    while answered_401.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the flood never got a 401"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = login("127.0.2.1", "bob", "bob-pw").await;
    let checked_before_bob = answered_401.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        r.status,
        StatusCode::OK,
        "bob during the flood: {}",
        r.describe()
    );

    let mut refused_401 = 0;
    let mut limited = Vec::new();
    for t in flood {
        let r = t.await.expect("flood task");
        match r.status {
            StatusCode::UNAUTHORIZED => refused_401 += 1,
            StatusCode::TOO_MANY_REQUESTS => limited.push(r),
            other => panic!("a wrong password got {other}: {}", r.describe()),
        }
    }
    // The flood's bcrypt work is bounded before it is done: the first guess of each machine
    // (which looked as clean as bob's), carol's budget of failures, and what the limits earned
    // back meanwhile. So bob can wait behind that much at most, never behind the whole flood.
    let bound = 20 + regcache::http::auth::USER_FAILURES as usize + 2;
    assert!(
        checked_before_bob <= bound && refused_401 <= bound,
        "bob waited behind the flood: {checked_before_bob} of the flood's {refused_401} checked \
         guesses were answered before him (at most {bound} should have been checked at all)"
    );
    let m = rc.app.metrics.render();
    assert_eq!(
        checks(&m) - before,
        refused_401 as f64 + 1.0,
        "one bcrypt check per 401 answered to the flood, plus bob's; none for the 429s: {m}"
    );
    assert_eq!(limited.len(), 600 - refused_401);
    let r = &limited[0];
    assert_oci(r, 429, "TOOMANYREQUESTS", "a guess over the limit");
    assert!(
        r.header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|s| s >= 1),
        "{}",
        r.describe()
    );
    assert_eq!(
        metric(&m, "regcache_limit_rejections_total{limit=\"auth_rate\"}"),
        limited.len() as f64,
        "{m}"
    );

    // alice is still remembered: no new bcrypt check.
    let r = login("127.0.0.2", "alice", "alice-pw").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "alice after the flood: {}",
        r.describe()
    );
    let after = checks(&rc.app.metrics.render());
    assert_eq!(after, checks(&m), "alice's credentials stayed cached");

    // From a flooding machine, nothing more is checked for carol until the failures have aged...
    let r = login("127.0.1.1", "carol", "carol-pw").await;
    assert_oci(&r, 429, "TOOMANYREQUESTS", "carol from a flooding machine");
    // ...but carol is not locked out: her right password from a machine that did not flood is
    // checked, whatever the flood against her name.
    let r = login("127.0.2.2", "carol", "carol-pw").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "carol from her machine: {}",
        r.describe()
    );
}

#[test]
fn htpasswd_with_other_hash_kinds_is_a_config_error_naming_the_line() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let path = dir.path().join("htpasswd");
    std::fs::write(
        &path,
        format!(
            "alice:{}\nbob:$apr1$Vb9SVjXl$8uqxUnHeEHOqrcRLQSyJ5/\n",
            bcrypt::hash("x", 4).expect("bcrypt")
        ),
    )
    .expect("write");
    let text = format!("[access]\nhtpasswd = {:?}\n", path.display().to_string());
    let e = regcache::config::Config::parse(&text, "t", &Default::default())
        .expect_err("md5 hash refused");
    let e = e.to_string();
    assert!(
        e.contains("line 2") && e.contains("bcrypt") && e.contains("bob"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_patterns_refuse_without_contacting_the_upstream() {
    let fake = FakeUpstream::start().await;
    let layer = Bytes::from_static(b"layer");
    let mut digests = std::collections::HashMap::new();
    for repo in [
        "library/alpine",
        "library/deep/x",
        "org/a/b",
        "org/secret/x",
        "other/x",
    ] {
        digests.insert(repo, fake.add_image(repo, "v1", layer.clone()));
    }
    let keys = "allow_repos = [\"library/*\", \"org/**\"]\ndeny_repos = [\"org/secret/**\"]\n";
    let rc = Regcache::start(&config_for(&fake.url(), keys, ""));
    let u = rc.url();
    for (path, repo) in [("alpine", "library/alpine"), ("org/a/b", "org/a/b")] {
        let r = get(&format!("{u}/v2/{path}/manifests/v1")).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.describe());
        let (m, l) = &digests[repo];
        assert_eq!(r.header("docker-content-digest"), Some(m.as_str()));
        let r = get(&format!("{u}/v2/{path}/blobs/{l}")).await;
        assert_eq!(r.status, StatusCode::OK, "{path} blob: {}", r.describe());
    }
    let before = fake.request_count();
    for repo in ["library/deep/x", "org/secret/x", "other/x"] {
        let (m, l) = &digests[repo];
        for path in [
            format!("/v2/{repo}/manifests/v1"),
            format!("/v2/{repo}/manifests/{m}"),
            format!("/v2/{repo}/blobs/{l}"),
            format!("/v2/{repo}/tags/list"),
            format!("/v2/{repo}/referrers/{m}"),
            format!("/v2/{repo}/manifests/v1?ns=docker.io"),
        ] {
            let r = get(&format!("{u}{path}")).await;
            assert_oci(&r, 403, "DENIED", &path);
        }
    }
    assert_eq!(
        fake.request_count(),
        before,
        "refused repositories never reach the upstream: {:?}",
        &fake.requests()[before..]
    );
    let r = get(&format!("{u}/v2/_catalog")).await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(
        v["repositories"],
        serde_json::json!(["library/alpine", "org/a/b"])
    );

    // Deny library/** on reload: what is cached for it is no longer served, nor listed.
    let keys = "allow_repos = [\"library/*\", \"org/**\"]\ndeny_repos = [\"library/**\"]\n";
    let cfg = regcache::config::Config::parse(
        &config_for(&fake.url(), keys, ""),
        "reload",
        &Default::default(),
    )
    .expect("config");
    rc.app.reload(cfg).expect("reload");
    let (m, l) = &digests["library/alpine"];
    for path in [
        "/v2/alpine/manifests/v1".to_string(),
        format!("/v2/library/alpine/manifests/{m}"),
        format!("/v2/library/alpine/blobs/{l}"),
    ] {
        let r = get(&format!("{u}{path}")).await;
        assert_oci(&r, 403, "DENIED", &format!("after reload: {path}"));
    }
    let r = get(&format!("{u}/v2/_catalog")).await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["repositories"], serde_json::json!(["org/a/b"]));
}

// ---- hostile upstreams --------------------------------------------------------------------------

fn nested_manifest(depth: usize) -> Bytes {
    let mut s = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"layers\":[],\"annotations\":{{\"x\":"
    );
    s.push_str(&"[".repeat(depth));
    s.push_str(&"]".repeat(depth));
    s.push_str("}}");
    Bytes::from(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_manifest_json_is_refused_without_crashing() {
    let fake = FakeUpstream::start().await;
    let ok = fake.add_manifest("team/deep", Some("fine"), OCI_MANIFEST, nested_manifest(50));
    let deep = fake.add_manifest(
        "team/deep",
        Some("deep"),
        OCI_MANIFEST,
        nested_manifest(100),
    );
    // A million levels: enough to overflow any recursive parser's stack.
    let bomb = Bytes::from(format!(
        "{}{}",
        "[".repeat(1_000_000),
        "]".repeat(1_000_000)
    ));
    let bomb_digest = fake.add_manifest("team/deep", Some("bomb"), OCI_MANIFEST, bomb);
    let rc = Regcache::with_upstream(&fake.url());
    let u = rc.url();
    let r = get(&format!("{u}/v2/team/deep/manifests/fine")).await;
    assert_eq!(r.status, StatusCode::OK, "52 levels: {}", r.describe());
    assert!(stored(&rc, &ok));
    for (tag, digest) in [("deep", &deep), ("bomb", &bomb_digest)] {
        for reference in [tag, digest.as_str()] {
            let r = get(&format!("{u}/v2/team/deep/manifests/{reference}")).await;
            assert_oci(&r, 502, "UNKNOWN", reference);
            assert!(
                String::from_utf8_lossy(&r.body).contains("levels deep"),
                "{}",
                r.describe()
            );
        }
        assert!(!stored(&rc, digest), "{tag} is not stored");
    }
    let m = metrics(&rc).await;
    assert!(
        metric(
            &m,
            "regcache_upstream_errors_total{upstream=\"docker\",kind=\"invalid\"}"
        ) >= 4.0,
        "reported in the metrics: {m}"
    );
    let r = get(&format!("{u}/v2/")).await;
    assert_eq!(r.status, StatusCode::OK, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_bodies_that_disagree_with_their_length_or_digest_are_never_stored() {
    let data = noise(5_000, 9);
    let digest = sha256_digest(&data);
    let mut extra = data.to_vec();
    extra.extend_from_slice(b"...and more bytes the digest does not cover");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "longer than the digest, Content-Length matching the longer body",
            http(
                "200 OK",
                &[("content-length", extra.len().to_string())],
                &extra,
            ),
        ),
        (
            "shorter than the digest, Content-Length matching the shorter body",
            http(
                "200 OK",
                &[("content-length", "4000".into())],
                &data[..4000],
            ),
        ),
        (
            "longer than the digest, chunked with no length",
            http(
                "200 OK",
                &[("transfer-encoding", "chunked".into())],
                &chunked(&extra),
            ),
        ),
        (
            "cut short of its Content-Length, and a resume answered 200 from the start",
            http(
                "200 OK",
                &[("content-length", data.len().to_string())],
                &data[..2500],
            ),
        ),
        (
            "the right length with other bytes",
            http(
                "200 OK",
                &[("content-length", data.len().to_string())],
                &noise(5_000, 10),
            ),
        ),
    ];
    for (what, answer) in cases {
        let upstream = RawUpstream::start(move |_, _| answer.clone()).await;
        let rc = Regcache::with_upstream(&upstream.url());
        let url = format!("{}/v2/team/blob/blobs/{digest}", rc.url());
        let (status, body, err) = get_streamed(&url).await;
        assert!(
            status.is_server_error() || err.is_some(),
            "{what}: the client got a complete answer {status} of {} bytes",
            body.len()
        );
        assert!(
            body[..] != data[..] || err.is_some(),
            "{what}: the body completed"
        );
        assert!(!stored(&rc, &digest), "{what}: stored");
        let m = metrics(&rc).await;
        assert!(
            metric(&m, "regcache_fills_failed_total") >= 1.0,
            "{what}: the failure is reported: {m}"
        );
        // It is asked again next time: nothing bad was remembered.
        let n = upstream.seen().len();
        let _ = get_streamed(&url).await;
        assert!(upstream.seen().len() > n, "{what}: fetched again");
    }
    // Bytes after the Content-Length are not part of the body: the blob is exactly its digest.
    let mut trailing = http(
        "200 OK",
        &[("content-length", data.len().to_string())],
        &data,
    );
    trailing.extend_from_slice(b"GARBAGE AFTER THE BODY");
    let upstream = RawUpstream::start(move |_, _| trailing.clone()).await;
    let rc = Regcache::with_upstream(&upstream.url());
    let r = get(&format!("{}/v2/team/blob/blobs/{digest}", rc.url())).await;
    assert!(
        r.status == StatusCode::OK && r.body == data,
        "{}",
        r.describe()
    );
    // The commit may finish just after the client got its last byte.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stored(&rc, &digest) {
        assert!(
            Instant::now() < deadline,
            "the verified blob was never stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_and_listings_that_lie_are_refused_and_not_cached() {
    let real = Bytes::from(format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"layers\":[]}}"
    ));
    let real_digest = sha256_digest(&real);
    let other = Bytes::from(format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"layers\":[],\"x\":1}}"
    ));
    let other_digest = sha256_digest(&other);
    let deep_tags = format!(
        "{{\"name\":\"x\",\"tags\":{}{}}}",
        "[".repeat(500),
        "]".repeat(500)
    );
    let (real2, other2) = (real.clone(), other.clone());
    let upstream = RawUpstream::start(move |_, target| {
        if target.contains("/manifests/lying-header") {
            // The body is the real manifest, the header names another digest.
            http(
                "200 OK",
                &[
                    ("content-type", OCI_MANIFEST.into()),
                    ("docker-content-digest", other_digest.clone()),
                    ("content-length", real2.len().to_string()),
                ],
                &real2,
            )
        } else if target.contains("/manifests/") {
            // Whatever is asked for, another manifest comes back.
            http(
                "200 OK",
                &[
                    ("content-type", OCI_MANIFEST.into()),
                    ("content-length", other2.len().to_string()),
                ],
                &other2,
            )
        } else if target.contains("/tags/list") {
            http(
                "200 OK",
                &[
                    ("content-type", "application/json".into()),
                    ("content-length", deep_tags.len().to_string()),
                ],
                deep_tags.as_bytes(),
            )
        } else {
            http("404 Not Found", &[("content-length", "0".into())], b"")
        }
    })
    .await;
    let rc = Regcache::with_upstream(&upstream.url());
    let u = rc.url();
    let r = get(&format!("{u}/v2/team/app/manifests/{real_digest}")).await;
    assert_oci(&r, 502, "UNKNOWN", "body not matching the requested digest");
    let r = get(&format!("{u}/v2/team/app/manifests/lying-header")).await;
    assert_oci(&r, 502, "UNKNOWN", "Docker-Content-Digest that lies");
    assert!(!stored(&rc, &real_digest) && !stored(&rc, &sha256_digest(&other)));
    let r = get(&format!("{u}/v2/team/app/tags/list")).await;
    assert_oci(&r, 502, "UNKNOWN", "tag list nested 500 levels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_internal_addresses_or_other_schemes_are_not_followed() {
    let origin = FakeUpstream::start().await;
    let storage = FakeUpstream::start().await;
    let layer = noise(20_000, 12);
    let (_, ldigest) = origin.add_image("team/redir", "v1", layer.clone());
    storage.add_blob("bucket", layer.clone());
    let rc = Regcache::with_upstream(&origin.url());
    let url = format!("{}/v2/team/redir/blobs/{ldigest}", rc.url());
    // 0.0.0.0 reaches this machine on Linux: a classic way around a "no loopback" rule.
    let port = storage.addr().port();
    for (target, what) in [
        (format!("http://0.0.0.0:{port}"), "0.0.0.0"),
        (format!("http://[::]:{port}"), "[::]"),
        ("file:///etc".to_string(), "file:"),
        (format!("ftp://127.0.0.1:{port}"), "ftp:"),
    ] {
        origin.set_blob_redirect(Some(target.clone()));
        let r = get(&url).await;
        assert_oci(&r, 502, "UNKNOWN", what);
        assert!(
            String::from_utf8_lossy(&r.body).contains("refused to follow"),
            "{what}: {}",
            r.describe()
        );
    }
    assert_eq!(storage.request_count(), 0, "{:?}", storage.requests());
    assert!(!stored(&rc, &ldigest));
    assert!(
        origin_is_up(&rc).await,
        "a refused redirect does not mark the upstream down"
    );

    // Same kind of address as the upstream (loopback): followed.
    origin.set_blob_redirect(Some(storage.url()));
    let r = get(&url).await;
    assert!(
        r.status == StatusCode::OK && r.body == layer,
        "{}",
        r.describe()
    );

    // The operator can opt out.
    let storage2 = FakeUpstream::start().await;
    let data2 = noise(10_000, 13);
    let (_, d2) = origin.add_image("team/redir2", "v1", data2.clone());
    storage2.add_blob("bucket", data2.clone());
    origin.set_blob_redirect(Some(format!("http://0.0.0.0:{}", storage2.addr().port())));
    let lax = Regcache::start(&config_for(
        &origin.url(),
        "allow_private_redirects = true",
        "",
    ));
    let r = get(&format!("{}/v2/team/redir2/blobs/{d2}", lax.url())).await;
    assert!(
        r.status == StatusCode::OK && r.body == data2,
        "opted out: {}",
        r.describe()
    );
    assert_eq!(storage2.blob_gets(&d2), 1);
}

async fn origin_is_up(rc: &Regcache) -> bool {
    let r = get(&format!("{}/readyz", rc.url())).await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("readyz json");
    v["upstreams"][0]["up"].as_bool().unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_redirects_stop_after_ten() {
    let data = noise(1000, 14);
    let digest = sha256_digest(&data);
    let upstream = RawUpstream::start(|_, target| {
        let n: u32 = target
            .rsplit_once("hop=")
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or(0);
        let path = target.split('?').next().unwrap_or(target);
        http(
            "302 Found",
            &[
                ("location", format!("{path}?hop={}", n + 1)),
                ("content-length", "0".into()),
            ],
            b"",
        )
    })
    .await;
    let rc = Regcache::with_upstream(&upstream.url());
    let r = get(&format!("{}/v2/team/loop/blobs/{digest}", rc.url())).await;
    assert_oci(&r, 502, "UNKNOWN", "redirect loop");
    let hops = upstream
        .seen()
        .iter()
        .filter(|s| s.method == "GET" && s.target.contains("/blobs/"))
        .count();
    assert!(
        (10..=11).contains(&hops),
        "followed {hops} redirects: {:?}",
        upstream.seen()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_realm_on_an_internal_address_is_not_called() {
    let bait = FakeUpstream::start().await;
    let port = bait.addr().port();
    let upstream = RawUpstream::start(move |_, _| {
        http(
            "401 Unauthorized",
            &[
                (
                    "www-authenticate",
                    format!("Bearer realm=\"http://0.0.0.0:{port}/token\",service=\"x\""),
                ),
                ("content-length", "0".into()),
            ],
            b"",
        )
    })
    .await;
    let rc = Regcache::start(&config_for(
        &upstream.url(),
        "username = \"robot\"\npassword = \"never-sent-anywhere\"",
        "",
    ));
    let r = get(&format!("{}/v2/team/app/manifests/v1", rc.url())).await;
    assert_oci(&r, 502, "UNKNOWN", "realm on 0.0.0.0");
    assert!(
        String::from_utf8_lossy(&r.body).contains("Bearer realm"),
        "{}",
        r.describe()
    );
    assert_eq!(bait.request_count(), 0, "{:?}", bait.requests());
    for s in upstream.seen() {
        assert!(
            !s.headers.to_ascii_lowercase().contains("authorization:"),
            "credentials sent to the upstream that asked for a token: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_layer_urls_are_never_fetched() {
    let fake = FakeUpstream::start().await;
    let foreign = FakeUpstream::start().await;
    let data = noise(3000, 15);
    let digest = sha256_digest(&data);
    foreign.add_blob("foreign", data.clone());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2
        },
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": digest,
            "size": data.len(),
            "urls": [
                format!("{}/redirected/{digest}", foreign.url()),
                "http://169.254.169.254/latest/meta-data/",
            ],
        }],
    });
    let body = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
    fake.add_manifest(
        "team/win",
        Some("v1"),
        "application/vnd.docker.distribution.manifest.v2+json",
        body.clone(),
    );
    let rc = Regcache::with_upstream(&fake.url());
    let u = rc.url();
    let r = get(&format!("{u}/v2/team/win/manifests/v1")).await;
    assert!(
        r.status == StatusCode::OK && r.body == body,
        "{}",
        r.describe()
    );
    // The blob is asked for by digest, from the upstream only.
    let r = get(&format!("{u}/v2/team/win/blobs/{digest}")).await;
    assert_oci(
        &r,
        404,
        "BLOB_UNKNOWN",
        "foreign layer the upstream does not have",
    );
    let r = send(
        client().head(format!("{u}/v2/team/win/blobs/{digest}")),
        "HEAD",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.describe());
    fake.add_blob("team/win", data.clone());
    let r = get(&format!("{u}/v2/team/win/blobs/{digest}")).await;
    assert!(
        r.status == StatusCode::OK && r.body == data,
        "{}",
        r.describe()
    );
    assert_eq!(
        foreign.request_count(),
        0,
        "the URL in the manifest was fetched: {:?}",
        foreign.requests()
    );
}

// ---- secrets ------------------------------------------------------------------------------------

/// A `regcache serve` child with extra environment; its stderr goes to `log`.
struct Child {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for Child {
    /// Stops it as systemd would: SIGTERM (which also writes out the access-log lines the shards
    /// batch), then SIGKILL if it is still running after 20 s.
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_serve(config: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    let port = crate::support::process::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let log = std::fs::File::create(log).expect("log file");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"));
    cmd.args(["serve", "--config"])
        .arg(config)
        .arg("--listen")
        .arg(addr.to_string())
        .env_remove("REGCACHE_CONFIG")
        .env("REGCACHE_LOG", "trace")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    for (k, v) in crate::support::registry::PROXY_ENV.iter().chain(env) {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn regcache");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "regcache did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Child { child, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_logs_metrics_or_answers() {
    use std::os::unix::fs::PermissionsExt as _;
    const INLINE: &str = "inline-Pw-7f3a9c";
    const FROM_FILE: &str = "file-Pw-1b2c3d";
    const FROM_ENV: &str = "env-Pw-9e8d7c";
    const CLIENT: &str = "client-Pw-5a5a5a";
    let hub = FakeUpstream::start().await;
    let filed = FakeUpstream::start().await;
    let envd = FakeUpstream::start().await;
    let mut pulls = Vec::new();
    for (fake, host, pw) in [
        (&hub, "", INLINE),
        (&filed, "file.example/", FROM_FILE),
        (&envd, "env.example/", FROM_ENV),
    ] {
        let (m, l) = fake.add_image("team/app", "v1", noise(2000, pw.len() as u64));
        fake.set_basic_auth(Some(("robot", pw)));
        pulls.push((host, m, l));
    }
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let pw_file = dir.path().join("password");
    std::fs::write(&pw_file, format!("{FROM_FILE}\n")).expect("write");
    std::fs::set_permissions(&pw_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let htpasswd = write_htpasswd(dir.path(), &[("alice", CLIENT)]);
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\ndefault_upstream = \"hub\"\n\
             [access]\nhtpasswd = {htpasswd:?}\n\
             [upstreams.hub]\nurl = \"{hub}\"\nusername = \"robot\"\npassword = \"{INLINE}\"\n\
             [upstreams.filed]\nurl = \"{filed}\"\nhosts = [\"file.example\"]\nusername = \"robot\"\npassword_file = {pw_file:?}\n\
             [upstreams.envd]\nurl = \"{envd}\"\nhosts = [\"env.example\"]\nusername = \"robot\"\npassword_env = \"REGCACHE_TEST_UPSTREAM_PW\"\n",
            data = dir.path().join("data").display().to_string(),
            htpasswd = htpasswd.display().to_string(),
            hub = hub.url(),
            filed = filed.url(),
            envd = envd.url(),
            pw_file = pw_file.display().to_string(),
        ),
    )
    .expect("write config");
    // Readable by everyone, with a password inside: worth a warning.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let log = dir.path().join("regcache.log");
    let child = spawn_serve(&config, &log, &[("REGCACHE_TEST_UPSTREAM_PW", FROM_ENV)]);
    let base = format!("http://{}", child.addr);
    let c = client();
    let authed = |path: String| {
        c.get(format!("{base}{path}"))
            .basic_auth("alice", Some(CLIENT))
    };

    let mut answers = String::new();
    for (host, m, l) in &pulls {
        let r = send(
            authed(format!("/v2/{host}team/app/manifests/v1")),
            "manifest",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{host}: {}", r.describe());
        assert_eq!(r.header("docker-content-digest"), Some(m.as_str()));
        let r = send(authed(format!("/v2/{host}team/app/blobs/{l}")), "blob").await;
        assert_eq!(r.status, StatusCode::OK, "{host} blob: {}", r.describe());
    }
    // Now make every upstream refuse regcache's credentials, and collect the error answers.
    for fake in [&hub, &filed, &envd] {
        fake.set_basic_auth(Some(("robot", "changed")));
    }
    for (host, _, _) in &pulls {
        let r = send(
            authed(format!("/v2/{host}team/app/manifests/v2")),
            "refused",
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{host}: {}",
            r.describe()
        );
        answers.push_str(&r.describe());
        let r = send(authed(format!("/v2/{host}team/app/tags/list")), "tags").await;
        answers.push_str(&r.describe());
    }
    for path in ["/metrics", "/readyz", "/v2/_catalog", "/v2/"] {
        let r = send(authed(path.to_string()), path).await;
        answers.push_str(&r.describe());
    }
    let r = send(
        c.get(format!("{base}/v2/"))
            .basic_auth("alice", Some("not-the-password")),
        "wrong client password",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    answers.push_str(&r.describe());
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["check-config"])
        .arg(&config)
        .env("REGCACHE_TEST_UPSTREAM_PW", FROM_ENV)
        .output()
        .expect("check-config");
    assert!(check.status.success(), "check-config: {check:?}");
    answers.push_str(&String::from_utf8_lossy(&check.stdout));
    answers.push_str(&String::from_utf8_lossy(&check.stderr));
    drop(child);
    let log_text = std::fs::read_to_string(&log).expect("read log");
    assert!(
        log_text.contains("regcache.toml") && log_text.contains("can read it"),
        "the start-up log warns about the config file's mode:\n{log_text}"
    );
    assert!(
        log_text.contains("request"),
        "premise: the access log is there"
    );
    use base64::Engine as _;
    for secret in [INLINE, FROM_FILE, FROM_ENV, CLIENT] {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("robot:{secret}"));
        let b64_client =
            base64::engine::general_purpose::STANDARD.encode(format!("alice:{secret}"));
        for (what, text) in [("log", &log_text), ("answers and check-config", &answers)] {
            for needle in [secret, b64.as_str(), b64_client.as_str()] {
                assert!(
                    !text.contains(needle),
                    "{what} holds a secret ({needle}); {} bytes",
                    text.len()
                );
            }
        }
    }
    // Premise: each upstream really received its password from regcache.
    for (fake, pw) in [(&hub, INLINE), (&filed, FROM_FILE), (&envd, FROM_ENV)] {
        let want = base64::engine::general_purpose::STANDARD.encode(format!("robot:{pw}"));
        assert!(
            fake.requests()
                .iter()
                .any(|r| r.header("authorization") == Some(&format!("Basic {want}"))),
            "upstream never got {pw}"
        );
    }
}

//! Multi-range blob requests (`Range: bytes=0-99,5000-5999`, what zstd:chunked partial pulls send),
//! with nginx as the oracle: nginx serves the same blob as a static file, both servers get the same
//! requests, and their answers are parsed and compared part by part (status, number of parts, each
//! part's `Content-Type`, `Content-Range` and bytes). regcache answers from a blob it has not
//! fetched yet (cold: the request starts the fill), from a fill in progress (the fake upstream
//! trickles the blob) and from the stored file (warm, with `sendfile` on a plain connection).
//!
//! nginx runs with `max_ranges 1024`, regcache's cap (`http::blobs::MAX_RANGES`), and types every
//! file `application/octet-stream` (`default_type`), regcache's blob type. Where regcache differs
//! from nginx on purpose (a malformed `Range`, which nginx answers `416` and regcache ignores, as
//! RFC 9110 allows both) no shape here asks for it; docs/API.md lists those differences.
//!
//! A zstd:chunked partial pull with podman, cold and warm, is shown too: skopeo 1.9 pushes an
//! image with `--dest-compress-format zstd:chunked` to docker-registry, and Debian 12's podman
//! 4.3.1 (containers/image 5.23) pulls it through regcache with the `overlay` storage driver and
//! `pull_options = {enable_partial_images = "true"}` (containers/storage pulls partially into
//! `overlay` only; each podman command runs in a private mount namespace). It asks for each layer's
//! table of contents (one range), then for the chunks it lacks (many ranges in one request), and
//! says `Retrieved partial blob` for each layer. That test needs docker-registry, skopeo, podman,
//! runc and root, besides nginx for the oracle.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt as _;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use crate::pull::sendfile_bytes;
use crate::support::clients::{registries_conf, Podman};
use crate::support::fake::{sha256_digest, FakeUpstream};
use crate::support::images::pseudo_random;
use crate::support::nginx::FileServer;
use crate::support::process::metric;
use crate::support::regcache::{client, stored, Regcache};
use crate::support::registry::{fixtures_dir, http_get, inspect_raw, skopeo, Registry};

/// The blobs' size: more than one sendfile chunk (2 MiB), not a round number.
const SIZE: usize = (3 << 20) + 12_345;
/// regcache's documented cap on the ranges of one request (`http::blobs::MAX_RANGES`).
const MAX_RANGES: usize = 1024;

/// Whether a request carries `If-Range`, and with what.
#[derive(Clone, Copy, Debug)]
enum IfRange {
    None,
    /// The `ETag` each server gave for the blob (they differ: nginx's is mtime and size).
    OwnEtag,
    /// An entity tag that is not the blob's.
    OtherEtag,
}

/// One request shape: a name for messages, the `Range` value and `If-Range`.
struct Shape {
    name: &'static str,
    range: String,
    if_range: IfRange,
}

fn shape(name: &'static str, range: impl Into<String>) -> Shape {
    Shape {
        name,
        range: range.into(),
        if_range: IfRange::None,
    }
}

/// `n` one-byte ranges, two bytes apart, ascending: a zstd:chunked pull's many small chunks.
fn many(n: usize) -> String {
    let specs: Vec<String> = (0..n).map(|i| format!("{0}-{0}", i * 2 + 7)).collect();
    format!("bytes={}", specs.join(","))
}

fn shapes() -> Vec<Shape> {
    let last = SIZE - 1;
    vec![
        shape("disjoint", "bytes=0-99,5000-5999"),
        shape(
            "disjoint, sendfile-sized",
            "bytes=10-1048585,2097152-3145727",
        ),
        shape("overlapping", "bytes=0-9999,5000-14999"),
        shape("out of order", "bytes=200000-200999,0-99,100000-100099"),
        shape("suffix among others", "bytes=5000-5999,-100"),
        shape("open-ended and first byte", "bytes=3000000-,0-0"),
        shape(
            "up to the last byte",
            format!("bytes={}-{last},0-9", last - 9),
        ),
        shape(
            "one unsatisfiable among satisfiable",
            format!("bytes=0-99,{SIZE}-,5000-5099"),
        ),
        shape(
            "one satisfiable left: a plain 206",
            format!("bytes=0-99,{}-", SIZE + 10),
        ),
        shape(
            "all unsatisfiable",
            format!("bytes={SIZE}-,{}-{}", SIZE + 5, SIZE + 99),
        ),
        shape("at the cap", many(MAX_RANGES)),
        shape("over the cap: the whole blob", many(MAX_RANGES + 1)),
        shape("more bytes than the blob: the whole blob", "bytes=0-,0-"),
        shape("single range", "bytes=100-199"),
        shape("whitespace around the commas", "bytes=0-9 , 20-29"),
        Shape {
            if_range: IfRange::OwnEtag,
            ..shape("If-Range with the blob's ETag", "bytes=0-99,5000-5999")
        },
        Shape {
            if_range: IfRange::OtherEtag,
            ..shape("If-Range with another ETag", "bytes=0-99,5000-5999")
        },
    ]
}

/// One part of a `multipart/byteranges` answer.
#[derive(Debug, PartialEq, Eq)]
struct Part {
    content_type: String,
    content_range: String,
    len: usize,
    /// sha256 of the part's bytes (compared instead of the bytes, printed short).
    digest: String,
}

/// An answer as a client sees it, without what may differ between two servers (the boundary,
/// `Date`, `Server`, `ETag`).
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// `200` with a body of `len` bytes; `blob` says whether it is the blob.
    Whole { len: usize, blob: bool },
    /// `206` with one range: its `Content-Type`, `Content-Range` and bytes.
    Single(Part),
    /// `206 multipart/byteranges`: its parts in order.
    Multi(Vec<Part>),
    /// `416` with its `Content-Range`.
    Unsatisfiable { content_range: Option<String> },
    /// Anything else.
    Other(String),
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The bytes a `Content-Range: bytes a-b/total` names, checked against the blob.
fn part(content_type: String, content_range: String, bytes: &[u8], blob: &[u8]) -> Part {
    let want = content_range
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(r, total)| {
            let (a, b) = r.split_once('-')?;
            let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
            (total == blob.len().to_string() && a <= b && b < blob.len()).then(|| &blob[a..=b])
        });
    assert!(
        want == Some(bytes),
        "a part's bytes are not the blob's bytes its Content-Range {content_range:?} names \
         ({} bytes)",
        bytes.len()
    );
    Part {
        content_type,
        content_range,
        len: bytes.len(),
        digest: sha256_digest(bytes)[7..19].to_owned(),
    }
}

/// Parses a `multipart/byteranges` body strictly: an optional CRLF, then for each part the
/// delimiter, its header lines, a blank line and exactly the bytes its `Content-Range` names, then
/// the close delimiter.
fn parse_multipart(body: &[u8], boundary: &str, blob: &[u8]) -> Result<Vec<Part>, String> {
    let delimiter = format!("--{boundary}");
    let mut pos = if body.starts_with(b"\r\n") { 2 } else { 0 };
    let mut parts = Vec::new();
    loop {
        if !body[pos..].starts_with(delimiter.as_bytes()) {
            return Err(format!(
                "no delimiter at byte {pos} (after {} parts)",
                parts.len()
            ));
        }
        pos += delimiter.len();
        if body[pos..].starts_with(b"--") {
            let rest = &body[pos + 2..];
            return match rest {
                b"" | b"\r\n" => Ok(parts),
                _ => Err(format!("{} bytes after the close delimiter", rest.len())),
            };
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err(format!("no CRLF after the delimiter at byte {pos}"));
        }
        pos += 2;
        let end = body[pos..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("part {} has no end of headers", parts.len()))?;
        let head = String::from_utf8_lossy(&body[pos..pos + end]).into_owned();
        pos += end + 4;
        let (mut content_type, mut content_range) = (String::new(), String::new());
        for line in head.split("\r\n") {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("a part's header line is not a header: {line:?}"))?;
            match name.to_ascii_lowercase().as_str() {
                "content-type" => content_type = value.trim().to_owned(),
                "content-range" => content_range = value.trim().to_owned(),
                _ => {}
            }
        }
        let len = content_range
            .strip_prefix("bytes ")
            .and_then(|r| r.split_once('/'))
            .and_then(|(r, _)| r.split_once('-'))
            .and_then(|(a, b)| Some(b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?))
            .ok_or_else(|| format!("part {} Content-Range {content_range:?}", parts.len()))?;
        if body.len() < pos + len + 2 || &body[pos + len..pos + len + 2] != b"\r\n" {
            return Err(format!(
                "part {} ({content_range}) is not followed by CRLF after {len} bytes",
                parts.len()
            ));
        }
        parts.push(part(
            content_type,
            content_range,
            &body[pos..pos + len],
            blob,
        ));
        pos += len + 2;
    }
}

/// What a client makes of `status`, `headers` and `body`.
fn answer(status: StatusCode, headers: &HeaderMap, body: &[u8], blob: &[u8]) -> Answer {
    let content_type = header(headers, "content-type").unwrap_or_default();
    match status.as_u16() {
        200 => Answer::Whole {
            len: body.len(),
            blob: body == blob,
        },
        206 => match content_type.strip_prefix("multipart/byteranges; boundary=") {
            Some(boundary) => match parse_multipart(body, boundary.trim_matches('"'), blob) {
                Ok(parts) => Answer::Multi(parts),
                Err(e) => Answer::Other(format!("a multipart body that does not parse: {e}")),
            },
            None => Answer::Single(part(
                content_type,
                header(headers, "content-range").unwrap_or_default(),
                body,
                blob,
            )),
        },
        416 => Answer::Unsatisfiable {
            content_range: header(headers, "content-range"),
        },
        s => Answer::Other(format!("status {s}, headers {headers:?}")),
    }
}

/// A short form of an answer for messages (an answer with 1024 parts prints 1024 lines).
fn brief(a: &Answer) -> String {
    match a {
        Answer::Multi(parts) if parts.len() > 6 => format!(
            "Multi({} parts: {:?} … {:?})",
            parts.len(),
            &parts[..3],
            &parts[parts.len() - 3..]
        ),
        a => format!("{a:?}"),
    }
}

/// The server's `ETag` for `url` (from a `HEAD`).
async fn etag(url: &str) -> String {
    let resp = client().head(url).send().await.expect("HEAD for the ETag");
    header(resp.headers(), "etag").unwrap_or_else(|| panic!("HEAD {url}: no ETag"))
}

/// Sends `s` to `url`; `at_head` runs when the answer's head has arrived (before its body).
async fn ask(url: &str, s: &Shape, at_head: impl FnOnce()) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut req = client().get(url).header("range", &s.range);
    match s.if_range {
        IfRange::None => {}
        IfRange::OwnEtag => req = req.header("if-range", etag(url).await),
        IfRange::OtherEtag => req = req.header("if-range", "\"not-this-blob\""),
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: GET {url}: {e}", s.name));
    at_head();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap_or_else(|e| {
            panic!(
                "{}: GET {url}: the body broke after {} bytes (status {status}, headers \
                 {headers:?}): {e}",
                s.name,
                body.len()
            )
        });
        body.extend_from_slice(&chunk);
    }
    (status, headers, body)
}

/// Asserts that regcache's answer to `s` is nginx's.
fn assert_same(what: &str, s: &Shape, nginx: &Answer, regcache: &Answer) {
    assert!(
        nginx == regcache,
        "{what}, {} (Range: {:.120}, If-Range: {:?}):\n  nginx:    {}\n  regcache: {}",
        s.name,
        s.range,
        s.if_range,
        brief(nginx),
        brief(regcache)
    );
}

/// nginx serving `dir` as the oracle, with regcache's cap.
fn oracle(dir: &Path) -> FileServer {
    FileServer::start(dir, &format!("max_ranges {MAX_RANGES};"))
}

/// The paths of blob `digest` at nginx (a file named by its hex) and at regcache.
fn paths(digest: &str) -> (String, String) {
    (
        format!("/{}", &digest[7..]),
        format!("/v2/ranges/blob/blobs/{digest}"),
    )
}

fn wait_stored(rc: &Regcache, digest: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !stored(rc, digest) {
        assert!(
            std::time::Instant::now() < deadline,
            "the blob {digest} was not stored within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_range_answers_are_nginxs_cold_during_a_fill_and_warm() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("nginx root");
    let fake = FakeUpstream::start().await;
    let rc = Regcache::with_upstream(&fake.url());
    let shapes = shapes();

    // Cold: each shape on a blob of its own that regcache has not seen; the request starts the fill.
    let mut cold = Vec::new();
    for i in 0..shapes.len() {
        let blob = pseudo_random(SIZE, 100 + i as u64);
        let digest = fake.add_blob("ranges/blob", blob.clone());
        std::fs::write(dir.path().join(&digest[7..]), &blob).expect("write the nginx copy");
        cold.push((blob, digest));
    }
    let nginx = oracle(dir.path());
    for (s, (blob, digest)) in shapes.iter().zip(&cold) {
        let (at_nginx, at_regcache) = paths(digest);
        let (st, h, b) = ask(&format!("{}{at_nginx}", nginx.url()), s, || ()).await;
        let want = answer(st, &h, &b, blob);
        let (st, h, b) = ask(&format!("{}{at_regcache}", rc.url()), s, || ()).await;
        assert_same("cold", s, &want, &answer(st, &h, &b, blob));
    }

    // During a fill: the upstream trickles a new blob (16 KiB every 10 ms, so the fill takes over
    // 2 s); the first shape starts the fill, and the others join it while it runs.
    let blob = pseudo_random(SIZE, 7);
    let digest = fake.add_blob("ranges/blob", blob.clone());
    std::fs::write(dir.path().join(&digest[7..]), &blob).expect("write the nginx copy");
    let (at_nginx, at_regcache) = paths(&digest);
    let (nginx_url, rc_url) = (
        format!("{}{at_nginx}", nginx.url()),
        format!("{}{at_regcache}", rc.url()),
    );
    fake.set_slow_blobs(16 << 10, Duration::from_millis(10));
    fake.reset_counters();

    // The first parts reach the client as their bytes arrive, long before the blob's end.
    let first = &shapes[0];
    let resp = client()
        .get(&rc_url)
        .header("range", &first.range)
        .send()
        .await
        .expect("the first multi-range GET");
    let content_type = header(resp.headers(), "content-type").unwrap_or_default();
    assert_eq!(
        resp.status(),
        StatusCode::PARTIAL_CONTENT,
        "a cold multi-range GET: headers {:?}",
        resp.headers()
    );
    let boundary = content_type
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("a multi-range answer of type {content_type:?}"))
        .to_owned();
    let second_part = format!("--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 5000-5999/{SIZE}\r\n\r\n");
    let (mut got, mut stream) = (Vec::new(), resp.bytes_stream());
    let mut sent_when_two_parts = None;
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.expect("the first multi-range body"));
        // Both parts are here once the second one's 1000 bytes follow its head.
        let at = got
            .windows(second_part.len())
            .position(|w| w == second_part.as_bytes());
        if at.is_some_and(|at| got.len() >= at + second_part.len() + 1000) {
            sent_when_two_parts = Some(fake.blob_bytes_sent());
            break;
        }
    }
    let sent_when_two_parts =
        sent_when_two_parts.expect("the body holds the second part with its 1000 bytes");
    assert!(
        sent_when_two_parts < SIZE as u64,
        "both parts (bytes 0-99 and 5000-5999) reached the client only after the upstream had sent \
         {sent_when_two_parts} of {SIZE} bytes: parts must stream as the fill writes their bytes"
    );

    // Every other shape joins the fill while it runs: all their answers' heads arrive before the
    // upstream has sent the whole blob.
    let (mut joined, mut heads) = (Vec::new(), Vec::new());
    for s in &shapes[1..] {
        let (url, range, if_range, name) = (rc_url.clone(), s.range.clone(), s.if_range, s.name);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        heads.push(rx);
        joined.push(tokio::spawn(async move {
            let s = Shape {
                name,
                range,
                if_range,
            };
            ask(&url, &s, move || {
                let _ = tx.send(());
            })
            .await
        }));
    }
    for h in heads {
        // A request that failed before its head panics in its task, reported below.
        let _ = h.await;
    }
    let sent_at_heads = fake.blob_bytes_sent();

    // The first body ends (its close delimiter) only once the fill has verified the blob.
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.expect("the first multi-range body"));
    }
    let sent_at_end = fake.blob_bytes_sent();
    let want = {
        let (st, h, b) = ask(&nginx_url, first, || ()).await;
        answer(st, &h, &b, &blob)
    };
    let mut headers = HeaderMap::new();
    headers.insert("content-type", content_type.parse().expect("header value"));
    assert_same(
        "first request, starting the fill",
        first,
        &want,
        &answer(StatusCode::PARTIAL_CONTENT, &headers, &got, &blob),
    );
    assert_eq!(
        sent_at_end, SIZE as u64,
        "the first body was complete before the upstream had sent the whole blob"
    );

    let mut during = Vec::new();
    for j in joined {
        during.push(j.await.expect("a request during the fill"));
    }
    assert!(
        sent_at_heads < SIZE as u64,
        "the requests were meant to join the fill while it ran, but the upstream had sent \
         {sent_at_heads} of {SIZE} bytes when their answers' heads had all arrived"
    );
    assert_eq!(
        fake.blob_gets(&digest),
        1,
        "every request during the fill shares its one upstream GET"
    );
    for (s, (st, h, b)) in shapes[1..].iter().zip(during) {
        let (nst, nh, nb) = ask(&nginx_url, s, || ()).await;
        assert_same(
            "during the fill",
            s,
            &answer(nst, &nh, &nb, &blob),
            &answer(st, &h, &b, &blob),
        );
    }

    // Warm: the stored file, on plain connections (parts of a stored file go out with sendfile).
    fake.set_slow_blobs(0, Duration::ZERO);
    wait_stored(&rc, &digest);
    let mut sendfile_checked = 0;
    for s in &shapes {
        let before = sendfile_bytes(&rc);
        let (nst, nh, nb) = ask(&nginx_url, s, || ()).await;
        let want = answer(nst, &nh, &nb, &blob);
        let (st, h, b) = ask(&rc_url, s, || ()).await;
        let got = answer(st, &h, &b, &blob);
        assert_same("warm", s, &want, &got);
        if let Answer::Multi(parts) = &got {
            let part_bytes: usize = parts.iter().map(|p| p.len).sum();
            let by_sendfile = sendfile_bytes(&rc) - before;
            if part_bytes >= 1 << 20 {
                assert!(
                    by_sendfile >= 0.75 * part_bytes as f64 && by_sendfile <= b.len() as f64,
                    "warm, {}: {by_sendfile} of the parts' {part_bytes} bytes went by sendfile",
                    s.name
                );
                sendfile_checked += 1;
            }
        }
    }
    assert!(sendfile_checked > 0, "no warm shape has a MiB of parts");
    assert_eq!(
        fake.blob_gets(&digest),
        1,
        "warm answers come from the store, not the upstream"
    );
}

/// `regcache_requests_total` of blob requests answered with `status`.
fn blob_answers(rc: &Regcache, status: u16) -> f64 {
    let m = http_get(rc.addr(), "/metrics", &[]).expect("GET /metrics");
    metric(
        &String::from_utf8_lossy(&m.body),
        &format!("regcache_requests_total{{route=\"blob\",status=\"{status}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn podman_pulls_a_zstd_chunked_image_partially_through_regcache_cold_and_warm() {
    let upstream = Registry::start_empty();
    let layout = fixtures_dir().join("small");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-compress-format",
        "zstd:chunked",
        &format!("oci:{}:latest", layout.display()),
        &format!("docker://{}/chunked/image:latest", upstream.host_port()),
    ]);
    let raw = inspect_raw(&upstream.host_port(), "chunked/image:latest");
    let manifest: serde_json::Value = serde_json::from_slice(&raw).expect("manifest JSON");
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            assert!(
                l["annotations"]["io.containers.zstd-chunked.manifest-position"].is_string(),
                "premise: skopeo wrote a zstd:chunked layer: {l}"
            );
            l["digest"].as_str().expect("layer digest").to_owned()
        })
        .collect();
    let busybox = sha256_digest(&std::fs::read("/bin/busybox").expect("read /bin/busybox"));
    let rc = Regcache::with_upstream(&upstream.url());
    let location = rc.host_port();

    for what in ["cold", "warm"] {
        let (ok_before, partial_before) = (blob_answers(&rc, 200), blob_answers(&rc, 206));
        let podman = Podman::with_partial_pulls(&registries_conf(&location));
        let log = podman.pull_via(&location, &["docker.io/chunked/image:latest"]);
        for l in &layers {
            assert!(
                log.contains(&format!("Retrieved partial blob {l}")),
                "{what}: podman did not pull layer {l} partially:\n{log}"
            );
        }
        // The config is one plain GET; every request for a layer (its table of contents, then
        // its chunks, many ranges at once) is answered 206. The unchanged regcache answered the
        // multi-range requests 200 with the whole layer, which podman then split itself.
        let ok = blob_answers(&rc, 200) - ok_before;
        let partial = blob_answers(&rc, 206) - partial_before;
        assert!(
            ok == 1.0 && partial >= 2.0 * layers.len() as f64,
            "{what}: regcache answered {ok} blob requests with 200 and {partial} with 206, for \
             the config and {} zstd:chunked layers pulled partially",
            layers.len()
        );
        // The files put together from the chunks are the image's.
        let out = podman.podman_ok(&[
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "docker.io/chunked/image:latest",
            "/bin/busybox",
            "sha256sum",
            "/bin/busybox",
        ]);
        let sum = String::from_utf8_lossy(&out.stdout);
        assert!(
            sum.starts_with(&busybox[7..]),
            "{what}: /bin/busybox in the container hashes to {sum:?}, the image's is {busybox}"
        );
    }
}

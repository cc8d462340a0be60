//! Fault injection and protocol edge cases, against the in-process fake upstream.
//!
//! Each test starts its own fake upstream(s) and its own regcache, so the tests are independent
//! and can run in parallel. Counters of the fake (`hits`, `blob_gets`, `requests`, …) are how the
//! tests see what regcache asked the upstream.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::StatusCode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::fake::{sha256_digest, FakeUpstream, RequestRecord, TokenAnswer};
use crate::support::images::pseudo_random;
use crate::support::media::OCI_MANIFEST;
use crate::support::regcache::{client, config_for, error_code, stored, Regcache};
use crate::support::reply::{get, parse_reply, read_streamed, send, Reply};

// ---- helpers ------------------------------------------------------------------------------------

/// The body is OCI error JSON: `{"errors": [{"code": "...", "message": "...", ...}, ...]}`.
fn assert_error_json(r: &Reply, what: &str) {
    let v = r.json(what);
    let errors = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no errors array: {}", r.describe()));
    assert!(!errors.is_empty(), "{what}: empty errors: {}", r.describe());
    for e in errors {
        assert!(
            e["code"].is_string() && e["message"].is_string(),
            "{what}: error without code/message: {}",
            r.describe()
        );
    }
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}: error is not labelled JSON: {}",
        r.describe()
    );
}

fn assert_oci_error(r: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!(
        r.status.as_u16(),
        status,
        "{what}: wrong status: {}",
        r.describe()
    );
    assert_error_json(r, what);
    assert_eq!(
        error_code(&r.body),
        code,
        "{what}: wrong code: {}",
        r.describe()
    );
}

/// Sends `method path` byte for byte (no URL normalisation, unlike reqwest) and reads the reply.
async fn raw_request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let what = format!("raw {method} {path}");
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: no complete answer in 10 s"))
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    parse_reply(&buf, &what)
}

/// The requests recorded by `fake` from index `since` on.
fn requests_since(fake: &FakeUpstream, since: usize) -> Vec<RequestRecord> {
    fake.requests().into_iter().skip(since).collect()
}

fn summary(reqs: &[RequestRecord]) -> Vec<String> {
    reqs.iter()
        .map(|r| match &r.query {
            Some(q) => format!("{} {}?{q}", r.method, r.path),
            None => format!("{} {}", r.method, r.path),
        })
        .collect()
}

/// `fake` has had no request since index `n`; else the message is `what` and those requests.
fn assert_no_requests_since(fake: &FakeUpstream, n: usize, what: &str) {
    assert_eq!(
        fake.request_count(),
        n,
        "{what}{:?}",
        summary(&requests_since(fake, n))
    );
}

/// Whether the blob is committed within a few seconds: clients get their last byte once the
/// digest is verified, and the commit (fsync, rename, database) follows.
fn stored_soon(rc: &Regcache, digest: &str) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if stored(rc, digest) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Milliseconds into the current wall-clock second.
fn subsec_millis() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_millis()
}

/// Sleeps until the wall clock is between `from_ms` and `to_ms` milliseconds into a second.
async fn wait_for_subsecond(from_ms: u32, to_ms: u32) {
    loop {
        let ms = subsec_millis();
        if (from_ms..to_ms).contains(&ms) {
            return;
        }
        let wait = if ms < from_ms {
            from_ms - ms
        } else {
            1000 - ms + from_ms
        };
        tokio::time::sleep(Duration::from_millis(u64::from(wait))).await;
    }
}

/// An OCI manifest that references nothing (fine for the manifest paths regcache serves), with
/// `annotations`.
fn empty_manifest(annotations: serde_json::Value) -> Bytes {
    oci_manifest(serde_json::json!([]), annotations)
}

/// An OCI manifest with an empty config, the descriptors `layers` and `annotations`.
fn oci_manifest(layers: serde_json::Value, annotations: serde_json::Value) -> Bytes {
    let v = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2
        },
        "layers": layers,
        "annotations": annotations,
    });
    Bytes::from(serde_json::to_vec(&v).expect("serialize manifest"))
}

/// A small OCI manifest that references nothing (fine for the manifest paths regcache serves).
fn tiny_manifest(note: &str) -> Bytes {
    empty_manifest(serde_json::json!({ "note": note }))
}

/// The config digest of an OCI manifest body.
fn config_digest(manifest: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(manifest).expect("manifest is JSON");
    v["config"]["digest"]
        .as_str()
        .expect("manifest has config.digest")
        .to_owned()
}

// ---- 1. single flight of a large blob -----------------------------------------------------------

/// What one streaming client saw.
struct ClientRun {
    status: StatusCode,
    first_byte: Option<Instant>,
    finished: Instant,
    len: usize,
    /// Offset of the first chunk that differs from the expected bytes.
    mismatch_at: Option<usize>,
    error: Option<String>,
}

/// GETs `url` and compares the body with `want` as it streams in (comparing every byte with the
/// source is equivalent to, and much cheaper than, hashing 16 copies of 100 MiB in a debug build).
async fn stream_and_compare(url: String, want: Bytes) -> ClientRun {
    let resp = client()
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let mut stream = resp.bytes_stream();
    let (mut first_byte, mut len, mut mismatch_at, mut error) = (None, 0usize, None, None);
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                if chunk.is_empty() {
                    continue;
                }
                first_byte.get_or_insert_with(Instant::now);
                let end = len + chunk.len();
                if mismatch_at.is_none() && (end > want.len() || want[len..end] != chunk[..]) {
                    mismatch_at = Some(len);
                }
                len = end;
            }
            Err(e) => {
                error = Some(format!("{e:?}"));
                break;
            }
        }
    }
    ClientRun {
        status,
        first_byte,
        finished: Instant::now(),
        len,
        mismatch_at,
        error,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_fill_is_fetched_once_for_16_concurrent_clients() {
    const SIZE: usize = 100 << 20;
    const CLIENTS: usize = 16;
    let fake = FakeUpstream::start().await;
    let data = pseudo_random(SIZE, 1);
    // add_blob hashes the data: the sha256 of the bytes every client is compared with.
    let digest = fake.add_blob("big/layer", data.clone());
    // 1 MiB every 15 ms: the fill takes at least 1.5 s.
    fake.set_slow_blobs(1 << 20, Duration::from_millis(15));
    let rc = Regcache::with_upstream(&fake.url());
    let url = format!("{}/v2/big/layer/blobs/{digest}", rc.url());

    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(stream_and_compare(url.clone(), data.clone())))
        .collect();

    // One more client joins mid-fill with a Range.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.blob_bytes_sent() < 8 << 20 {
        assert!(
            Instant::now() < deadline,
            "the fill did not reach 8 MiB in 30 s (sent {} bytes, blob GETs {})",
            fake.blob_bytes_sent(),
            fake.blob_gets(&digest)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ranged = client()
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .expect("ranged GET mid-fill");
    let sent_at_range_headers = fake.blob_bytes_sent();
    assert!(
        sent_at_range_headers < SIZE as u64,
        "the ranged client was meant to join mid-fill, but the upstream had sent everything"
    );
    let ranged_status = ranged.status();
    let ranged_headers = ranged.headers().clone();
    let (ranged_body, ranged_err) = read_streamed(ranged).await;

    let mut runs = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        runs.push((i, c.await.expect("client task panicked")));
    }
    let elapsed = started.elapsed();
    let counters = format!(
        "blob_gets {}, blob_bytes_sent {}, upstream requests {:?}, elapsed {elapsed:?}",
        fake.blob_gets(&digest),
        fake.blob_bytes_sent(),
        summary(&fake.requests())
    );

    for (i, r) in &runs {
        assert!(
            r.status == StatusCode::OK
                && r.error.is_none()
                && r.mismatch_at.is_none()
                && r.len == SIZE,
            "client {i}: status {}, {} of {SIZE} bytes, first mismatch at {:?}, error {:?}; {counters}",
            r.status,
            r.len,
            r.mismatch_at,
            r.error
        );
    }
    assert_eq!(
        fake.blob_gets(&digest),
        1,
        "one upstream GET for 17 clients; {counters}"
    );
    assert_eq!(
        fake.blob_bytes_sent(),
        SIZE as u64,
        "the blob crossed the upstream link exactly once; {counters}"
    );
    let earliest_finish = runs
        .iter()
        .map(|(_, r)| r.finished)
        .min()
        .expect("16 clients");
    for (i, r) in &runs {
        let first = r.first_byte.expect("client got bytes");
        assert!(
            first < earliest_finish,
            "client {i} got its first byte {:?} after start, but the earliest client finished at \
             {:?}: clients must stream while the fill runs; {counters}",
            first - started,
            earliest_finish - started
        );
    }
    assert!(
        earliest_finish - started > Duration::from_secs(1),
        "premise: the fill should take over 1 s, took {:?}",
        earliest_finish - started
    );

    assert_eq!(
        ranged_status,
        StatusCode::PARTIAL_CONTENT,
        "ranged client: headers {ranged_headers:?}, error {ranged_err:?}"
    );
    assert_eq!(
        ranged_headers
            .get("content-range")
            .and_then(|v| v.to_str().ok()),
        Some(format!("bytes 1000-1999/{SIZE}").as_str()),
        "ranged client headers {ranged_headers:?}"
    );
    assert!(
        ranged_err.is_none() && ranged_body[..] == data[1000..2000],
        "ranged client: {} bytes, error {ranged_err:?}, equal to the slice: {}",
        ranged_body.len(),
        ranged_body[..] == data[1000..2000]
    );
    assert!(
        stored_soon(&rc, &digest),
        "the blob is committed after the fill"
    );
}

// ---- 2. token auth ------------------------------------------------------------------------------

/// A regcache in front of `fake` with the credentials `u`/`p`.
fn with_credentials(fake: &FakeUpstream) -> Regcache {
    Regcache::start(&config_for(
        &fake.url(),
        "username = \"u\"\npassword = \"p\"",
        "",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_pulls_work_and_tokens_are_reused() {
    let fake = FakeUpstream::start().await;
    let layer = pseudo_random(70_000, 2);
    let (mdigest, ldigest) = fake.add_image("team/app", "v1", layer.clone());
    fake.set_token_auth(true);
    let rc = Regcache::with_upstream(&fake.url());
    let base = format!("{}/v2/team/app", rc.url());

    let m = get(&format!("{base}/manifests/v1")).await;
    assert_eq!(m.status, StatusCode::OK, "manifest: {}", m.describe());
    assert_eq!(sha256_digest(&m.body), mdigest);
    assert_eq!(m.header("docker-content-digest"), Some(mdigest.as_str()));
    let after_manifest = fake.token_requests();
    assert_eq!(
        after_manifest,
        1,
        "one token for the first pull; upstream saw {:?}",
        summary(&fake.requests())
    );

    let cdigest = config_digest(&m.body);
    for d in [&ldigest, &cdigest] {
        let b = get(&format!("{base}/blobs/{d}")).await;
        assert_eq!(b.status, StatusCode::OK, "blob {d}: {}", b.describe());
        assert_eq!(sha256_digest(&b.body), *d, "blob {d} content");
    }
    assert_eq!(fake.blob_gets(&ldigest), 1, "the layer was fetched once");
    assert_eq!(
        fake.token_requests(),
        after_manifest,
        "the token for repository:team/app:pull is reused for both blob GETs; upstream saw {:?}",
        summary(&fake.requests())
    );
    // Every registry request after the first challenge carried the bearer token.
    let reqs = fake.requests();
    let unauthenticated: Vec<_> = reqs
        .iter()
        .skip(1)
        .filter(|r| r.path.starts_with("/v2/"))
        .filter(|r| {
            !r.header("authorization")
                .is_some_and(|a| a.starts_with("Bearer "))
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        unauthenticated.is_empty(),
        "requests without a token after the first: {unauthenticated:?}; all: {:?}",
        summary(&reqs)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_with_basic_credentials_works_and_without_them_is_unauthorized() {
    let fake = FakeUpstream::start().await;
    let layer = pseudo_random(10_000, 3);
    let (mdigest, ldigest) = fake.add_image("team/private", "v1", layer.clone());
    fake.set_token_auth(true);
    fake.set_basic_auth(Some(("u", "p")));

    let rc = with_credentials(&fake);
    let base = format!("{}/v2/team/private", rc.url());
    let m = get(&format!("{base}/manifests/v1")).await;
    assert_eq!(
        m.status,
        StatusCode::OK,
        "with credentials: {}; upstream saw {:?}",
        m.describe(),
        summary(&fake.requests())
    );
    assert_eq!(sha256_digest(&m.body), mdigest);
    let b = get(&format!("{base}/blobs/{ldigest}")).await;
    assert_eq!(b.status, StatusCode::OK, "blob: {}", b.describe());
    assert_eq!(b.body, layer);
    let token_reqs: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/token")
        .collect();
    assert!(
        !token_reqs.is_empty()
            && token_reqs.iter().all(|r| r
                .header("authorization")
                .is_some_and(|a| a.starts_with("Basic "))),
        "token requests carry the Basic credentials: {token_reqs:?}"
    );

    let anon = Regcache::with_upstream(&fake.url());
    let base = format!("{}/v2/team/private", anon.url());
    let m = get(&format!("{base}/manifests/v1")).await;
    assert_oci_error(&m, 401, "UNAUTHORIZED", "manifest without credentials");
    let b = get(&format!("{base}/blobs/{ldigest}")).await;
    assert_oci_error(&b, 401, "UNAUTHORIZED", "blob without credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_upstream_token_is_renewed_on_401() {
    let fake = FakeUpstream::start().await;
    let layer = pseudo_random(5_000, 21);
    let (_, ldigest) = fake.add_image("team/ttl", "v1", layer.clone());
    fake.set_token_auth(true);
    fake.set_token_ttl(1);
    let rc = Regcache::with_upstream(&fake.url());
    let base = format!("{}/v2/team/ttl", rc.url());
    let m = get(&format!("{base}/manifests/v1")).await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.describe());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let b = get(&format!("{base}/blobs/{ldigest}")).await;
    assert_eq!(
        b.status,
        StatusCode::OK,
        "after the token expired: {}; upstream saw {:?}",
        b.describe(),
        summary(&fake.requests())
    );
    assert_eq!(b.body, layer);
    assert_eq!(
        fake.token_requests(),
        2,
        "a new token after the first expired: {:?}",
        summary(&fake.requests())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_upstream_works_with_credentials_and_is_unauthorized_without() {
    let fake = FakeUpstream::start().await;
    let layer = pseudo_random(5_000, 22);
    let (mdigest, ldigest) = fake.add_image("team/basic", "v1", layer.clone());
    fake.set_basic_auth(Some(("u", "p")));
    let rc = with_credentials(&fake);
    let base = format!("{}/v2/team/basic", rc.url());
    let m = get(&format!("{base}/manifests/v1")).await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.describe());
    assert_eq!(sha256_digest(&m.body), mdigest);
    let b = get(&format!("{base}/blobs/{ldigest}")).await;
    assert_eq!(b.status, StatusCode::OK, "{}", b.describe());
    assert_eq!(b.body, layer);
    assert_eq!(fake.token_requests(), 0);

    let anon = Regcache::with_upstream(&fake.url());
    let r = get(&format!("{}/v2/team/basic/manifests/v1", anon.url())).await;
    assert_oci_error(
        &r,
        401,
        "UNAUTHORIZED",
        "Basic upstream without credentials",
    );
}

/// The ways a token service can fail other than by refusing the credentials, as the fake's switch.
const BROKEN_TOKEN_SERVICES: [(&str, TokenAnswer); 5] = [
    ("404", TokenAnswer::Status(404)),
    ("500", TokenAnswer::Status(500)),
    ("no answer", TokenAnswer::Stall),
    ("200 without a token", TokenAnswer::NoToken),
    ("200 with a body that is not JSON", TokenAnswer::Garbage),
];

/// `503 UNAVAILABLE` with a `Retry-After`: what a client gets when the upstream cannot answer.
fn assert_unavailable(r: &Reply, what: &str) {
    assert_oci_error(r, 503, "UNAVAILABLE", what);
    assert!(
        r.header("retry-after").is_some(),
        "{what}: no Retry-After: {}",
        r.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_token_service_is_an_unavailable_upstream_never_a_missing_image() {
    for (how, answer) in BROKEN_TOKEN_SERVICES {
        let what = |s: &str| format!("token service answering {how}: {s}");
        let fake = FakeUpstream::start().await;
        let (mdigest, ldigest) = fake.add_image("team/app", "v1", pseudo_random(20_000, 31));
        let (_, new_layer) = fake.add_image("team/app", "v2", pseudo_random(20_000, 32));
        fake.add_image("team/other", "v1", pseudo_random(1_000, 33));
        fake.set_token_auth(true);
        // Tags are revalidated at every request (freshness 0 s), a token request that gets no
        // answer is given up after 500 ms, and the circuit stays closed so that every request
        // meets the token service itself (the breaker has its own test in outage.rs).
        let config = config_for(
            &fake.url(),
            "freshness = \"0s\"\nheader_timeout = \"500ms\"\nfailure_threshold = 1000",
            "",
        );
        let mut rc = Regcache::start(&config);
        let m = get(&format!("{}/v2/team/app/manifests/v1", rc.url())).await;
        assert_eq!(m.status, StatusCode::OK, "{}", what(&m.describe()));
        for d in [&ldigest, &config_digest(&m.body)] {
            let b = get(&format!("{}/v2/team/app/blobs/{d}", rc.url())).await;
            assert_eq!(b.status, StatusCode::OK, "{}", what(&b.describe()));
        }
        // The upstream has the same image in team/copy, which regcache has not seen.
        fake.add_manifest("team/copy", Some("v1"), OCI_MANIFEST, m.body.clone());
        fake.add_blob("team/copy", pseudo_random(20_000, 31));

        // A restart forgets the tokens (they are kept in memory only).
        let dir = rc.take_dir().expect("the data directory");
        rc.stop();
        drop(rc);
        let rc = Regcache::start_in(dir.path(), &config);
        fake.set_token_answer(answer);
        let tokens_before = fake.token_requests();
        let u = rc.url();

        let r = get(&format!("{u}/v2/team/app/manifests/v1")).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            what(&format!("cached tag: {}", r.describe()))
        );
        assert_eq!(sha256_digest(&r.body), mdigest, "{}", what("cached tag"));
        assert_eq!(
            r.header("x-regcache-cache"),
            Some("stale"),
            "{}",
            what(&r.describe())
        );
        assert!(
            r.header("warning").is_some_and(|w| w.starts_with("110 ")),
            "{}",
            what(&format!(
                "cached tag without Warning: 110: {}",
                r.describe()
            ))
        );
        let b = get(&format!("{u}/v2/team/app/blobs/{ldigest}")).await;
        assert_eq!(b.status, StatusCode::OK, "{}", what(&b.describe()));
        assert_eq!(
            b.header("x-regcache-cache"),
            Some("hit"),
            "{}",
            what("blob")
        );
        let t = get(&format!("{u}/v2/team/app/tags/list")).await;
        assert_eq!(t.status, StatusCode::OK, "{}", what(&t.describe()));
        assert_eq!(
            t.json("tags")["tags"],
            serde_json::json!(["v1"]),
            "{}",
            what("the cached tags are listed")
        );
        let r = get(&format!("{u}/v2/team/app/referrers/{mdigest}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", what(&r.describe()));

        for (path, object) in [
            ("team/app/manifests/v2".to_owned(), "uncached tag"),
            (format!("team/app/blobs/{new_layer}"), "uncached blob"),
            (
                format!("team/copy/manifests/{mdigest}"),
                "manifest stored for another repository",
            ),
            (
                format!("team/copy/blobs/{ldigest}"),
                "blob stored for another repository",
            ),
            (
                "team/other/tags/list".to_owned(),
                "tags of an uncached repository",
            ),
        ] {
            let r = get(&format!("{u}/v2/{path}")).await;
            assert_unavailable(&r, &what(&format!("{object} ({path})")));
        }
        let r = send(
            client().head(format!("{u}/v2/team/app/blobs/{new_layer}")),
            "HEAD uncached blob",
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            what(&format!("HEAD of an uncached blob: {}", r.describe()))
        );
        assert!(
            fake.token_requests() > tokens_before,
            "{}",
            what("the token service was never asked")
        );
        let m = rc.app.metrics.render();
        assert!(
            m.lines().any(|l| l
                .strip_prefix("regcache_upstream_errors_total{upstream=\"docker\",kind=\"token\"} ")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)),
            "{}",
            what(&format!("not counted as kind=\"token\":\n{m}"))
        );
    }
}

// ---- 3. and 4. broken blob bodies ---------------------------------------------------------------

/// A fake upstream with a 300 000-byte blob (`seed`) in `repo`, a regcache in front of it, and
/// the blob's URL on regcache: `(fake, data, digest, rc, url)`.
async fn blob_behind_regcache(
    repo: &str,
    seed: u64,
) -> (FakeUpstream, Bytes, String, Regcache, String) {
    let fake = FakeUpstream::start().await;
    let data = pseudo_random(300_000, seed);
    let digest = fake.add_blob(repo, data.clone());
    let rc = Regcache::with_upstream(&fake.url());
    let url = format!("{}/v2/{repo}/blobs/{digest}", rc.url());
    (fake, data, digest, rc, url)
}

/// `r` is a 200 carrying exactly `data`.
fn assert_whole(r: &Reply, data: &Bytes, what: &str) {
    assert_eq!(r.status, StatusCode::OK, "{what}: {}", r.describe());
    assert!(
        r.body == data,
        "{what}: {} bytes, equal {}",
        r.body.len(),
        r.body == data
    );
}

/// GETs a blob whose fill must fail: either an OCI error before the body, or a body that breaks
/// (never a complete body of the right length with wrong bytes). Returns a description.
async fn get_failing_blob(url: &str, data: &Bytes, what: &str) -> String {
    let resp = client()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: GET {url}: {e}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    if status != StatusCode::OK {
        let body = resp.bytes().await.unwrap_or_default();
        let r = Reply {
            status,
            headers,
            body,
        };
        assert!(
            r.status.is_server_error(),
            "{what}: a failed fill may answer 5xx, not {}",
            r.describe()
        );
        assert_error_json(&r, what);
        return format!("answered {}", r.describe());
    }
    let (got, err) = read_streamed(resp).await;
    assert!(
        err.is_some() || got.len() < data.len(),
        "{what}: the client got a complete {}-byte body (equal to the real blob: {}) from a failed \
         fill; headers {headers:?}",
        got.len(),
        got[..] == data[..]
    );
    assert!(
        got.len() < data.len(),
        "{what}: the body ended in an error but carried all {} bytes (equal: {})",
        got.len(),
        got[..] == data[..]
    );
    format!("body cut after {} bytes: {err:?}", got.len())
}

/// GETs the blob of [`blob_behind_regcache`] while the fake serves it corrupt (`what` says how
/// else it misbehaves): the body fails and nothing is stored. Then, with the fault gone, the blob
/// is fetched again, served whole and stored.
async fn corrupt_fill_fails_then_the_blob_is_fetched_again(
    (fake, data, digest, rc, url): (&FakeUpstream, &Bytes, &str, &Regcache, &str),
    what: &str,
) {
    fake.set_corrupt_blobs(true);
    let outcome = get_failing_blob(url, data, what).await;
    assert_eq!(fake.blob_gets(digest), 1, "{outcome}");
    assert!(
        !stored(rc, digest),
        "{what}: a corrupt blob must not be stored ({outcome})"
    );

    fake.set_corrupt_blobs(false);
    let r = get(url).await;
    assert_whole(&r, data, "after the fault");
    assert_eq!(
        fake.blob_gets(digest),
        2,
        "the blob is fetched again after the corrupt fill ({outcome})"
    );
    assert!(stored_soon(rc, digest), "the good blob is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_aborts_the_client_body_and_is_not_stored() {
    let (fake, data, digest, rc, url) = blob_behind_regcache("team/corrupt", 4).await;
    corrupt_fill_fails_then_the_blob_is_fetched_again(
        (&fake, &data, &digest, &rc, &url),
        "corrupt blob",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_blob_is_resumed_then_aborted_and_not_stored() {
    let (fake, data, digest, rc, url) = blob_behind_regcache("team/short", 5).await;

    fake.set_short_blobs(true);
    let outcome = get_failing_blob(&url, &data, "short blob").await;
    let reqs = fake.requests();
    let blob_path = format!("/v2/team/short/blobs/{digest}");
    let ranges: Vec<String> = reqs
        .iter()
        .filter(|r| r.method == "GET" && r.path == blob_path)
        .filter_map(|r| r.header("range").map(str::to_owned))
        .collect();
    assert!(
        ranges
            .iter()
            .any(|r| range_start(r).is_some_and(|n| n > 0 && n <= 150_000)),
        "regcache resumes from where the cut left it (at most half of 300000) with a Range; \
         ranges {ranges:?}, requests {:?}; {outcome}",
        summary(&reqs)
    );
    assert!(
        fake.blob_gets(&digest) >= 2,
        "at least one resume: blob_gets {}; {outcome}",
        fake.blob_gets(&digest)
    );
    assert!(
        !stored(&rc, &digest),
        "a short blob must not be stored ({outcome})"
    );

    fake.set_short_blobs(false);
    let before = fake.blob_gets(&digest);
    let r = get(&url).await;
    assert_whole(&r, &data, "after the fault");
    assert_eq!(fake.blob_gets(&digest), before + 1, "fetched again");
    assert!(stored_soon(&rc, &digest), "the good blob is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_of_unannounced_size_never_reaches_the_client_whole() {
    let (fake, data, digest, rc, url) = blob_behind_regcache("team/chunked", 57).await;

    // No Content-Length: the client cannot tell the last byte from the others, so regcache must
    // keep at least one back until the digest has been checked. Trickled, so that the client has
    // caught up with the fill when the last (wrong) chunk arrives.
    fake.set_unannounced_size(true);
    fake.set_slow_blobs(64 << 10, Duration::from_millis(20));
    corrupt_fill_fails_then_the_blob_is_fetched_again(
        (&fake, &data, &digest, &rc, &url),
        "corrupt blob of unannounced size",
    )
    .await;
}

/// `N` of a `bytes=N-` Range header.
fn range_start(range: &str) -> Option<u64> {
    range
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}

/// The `Range` headers of the requests `fake` received, in order.
fn ranges_asked(fake: &FakeUpstream) -> Vec<String> {
    fake.requests()
        .iter()
        .filter_map(|r| r.header("range").map(str::to_owned))
        .collect()
}

/// GETs `url` while the first upstream response for `digest` is cut after half the body (50 ms
/// after the last byte sent); the switch is off again before regcache asks for the rest. Returns
/// the status, the body and the error that ended it.
async fn get_with_the_first_upstream_answer_cut(
    fake: &FakeUpstream,
    digest: &str,
    url: &str,
) -> (StatusCode, (Vec<u8>, Option<String>)) {
    fake.set_short_blobs(true);
    let client_get = tokio::spawn({
        let url = url.to_owned();
        async move {
            let resp = client()
                .get(&url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            (resp.status(), read_streamed(resp).await)
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.blob_gets(digest) == 0 {
        assert!(Instant::now() < deadline, "regcache never fetched the blob");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    fake.set_short_blobs(false);
    client_get.await.expect("client task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_cut_once_is_resumed_with_range_and_served_whole() {
    let (fake, data, digest, rc, url) = blob_behind_regcache("team/flaky", 55).await;

    let (status, (body, err)) = get_with_the_first_upstream_answer_cut(&fake, &digest, &url).await;
    let reqs = summary(&fake.requests());
    assert!(
        status == StatusCode::OK && err.is_none() && body[..] == data[..],
        "status {status}, {} bytes (equal {}), error {err:?}; upstream saw {reqs:?}",
        body.len(),
        body[..] == data[..]
    );
    assert_eq!(
        fake.blob_gets(&digest),
        2,
        "one resume; upstream saw {reqs:?}"
    );
    let ranges = ranges_asked(&fake);
    assert_eq!(
        ranges,
        vec!["bytes=150000-".to_string()],
        "resumed from the cut; upstream saw {reqs:?}"
    );
    assert!(stored_soon(&rc, &digest), "the resumed blob is stored");
    let n = fake.request_count();
    let r = get(&url).await;
    assert!(
        r.status == StatusCode::OK && r.body == data,
        "{}",
        r.describe()
    );
    assert_eq!(fake.request_count(), n, "served from the store");
}

/// How many fills regcache counted as failed for `reason` (`digest`, `upstream`, …).
fn fills_failed(rc: &Regcache, reason: &str) -> f64 {
    let text = rc.app.metrics.render();
    crate::support::process::metric(
        &text,
        &format!("regcache_fills_failed_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_answered_from_the_wrong_offset_is_refused_and_nothing_wrong_is_sent() {
    let (fake, data, digest, rc, url) = blob_behind_regcache("team/offset", 56).await;

    // The first response is cut after half the body; the resume is answered 206 from offset 0
    // (with a Content-Range that says so) instead of from where regcache asked.
    fake.set_wrong_content_range(true);
    let (status, (body, err)) = get_with_the_first_upstream_answer_cut(&fake, &digest, &url).await;
    let reqs = summary(&fake.requests());
    let ranges = ranges_asked(&fake);
    assert_eq!(
        ranges,
        vec!["bytes=150000-".to_string()],
        "one resume, from the cut; upstream saw {reqs:?}"
    );
    let first_wrong = body.iter().zip(data.iter()).position(|(a, b)| a != b);
    assert!(
        status == StatusCode::OK && err.is_some() && body.len() < data.len(),
        "the body must end in an error before it is complete: status {status}, {} bytes, error \
         {err:?}",
        body.len()
    );
    assert_eq!(
        first_wrong,
        None,
        "bytes from the misplaced 206 reached the client ({} bytes received)",
        body.len()
    );
    assert_eq!(
        (fills_failed(&rc, "upstream"), fills_failed(&rc, "digest")),
        (1.0, 0.0),
        "the 206 is refused as an upstream error when it arrives, not appended and caught by the \
         digest check; upstream saw {reqs:?}"
    );
    let text = rc.app.metrics.render();
    assert_eq!(
        crate::support::process::metric(
            &text,
            "regcache_upstream_errors_total{upstream=\"docker\",kind=\"invalid\"}"
        ),
        Some(1.0),
        "the refused 206 is counted as an invalid upstream answer:\n{text}"
    );
    assert!(!stored(&rc, &digest), "nothing stored");

    fake.set_wrong_content_range(false);
    let r = get(&url).await;
    assert_whole(&r, &data, "after the fault");
    assert!(stored_soon(&rc, &digest), "the good blob is stored");
}

// ---- 5. lying digest header ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_manifest_digest_header_is_502_and_not_cached() {
    let fake = FakeUpstream::start().await;
    let (mdigest, _) = fake.add_image("team/liar", "v1", Bytes::from_static(b"layer"));
    let rc = Regcache::with_upstream(&fake.url());
    let base = format!("{}/v2/team/liar/manifests", rc.url());

    fake.set_lying_digest_header(true);
    let r = get(&format!("{base}/v1")).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_GATEWAY,
        "by tag: {}",
        r.describe()
    );
    assert_error_json(&r, "lying digest by tag");
    let r = get(&format!("{base}/{mdigest}")).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_GATEWAY,
        "by digest: {}",
        r.describe()
    );
    assert_error_json(&r, "lying digest by digest");
    assert!(!stored(&rc, &mdigest), "nothing stored after the lies");

    fake.set_lying_digest_header(false);
    let before = fake.hits("GET", "/v2/team/liar/manifests/v1");
    let r = get(&format!("{base}/v1")).await;
    assert_eq!(r.status, StatusCode::OK, "after the lie: {}", r.describe());
    assert_eq!(r.header("docker-content-digest"), Some(mdigest.as_str()));
    assert_eq!(sha256_digest(&r.body), mdigest);
    assert_eq!(
        fake.hits("GET", "/v2/team/liar/manifests/v1"),
        before + 1,
        "asked the upstream again: {:?}",
        summary(&fake.requests())
    );
}

// ---- 6. cross-repository ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_cached_for_one_repo_needs_upstream_confirmation_for_another() {
    let fake = FakeUpstream::start().await;
    let data = pseudo_random(50_000, 6);
    let digest = fake.add_blob("a/one", data.clone());
    let rc = Regcache::with_upstream(&fake.url());

    let r = get(&format!("{}/v2/a/one/blobs/{digest}", rc.url())).await;
    assert_eq!(r.status, StatusCode::OK, "a/one: {}", r.describe());
    assert_eq!(fake.blob_gets(&digest), 1);

    let two = format!("{}/v2/a/two/blobs/{digest}", rc.url());
    let two_path = format!("/v2/a/two/blobs/{digest}");
    let r = get(&two).await;
    assert_oci_error(&r, 404, "BLOB_UNKNOWN", "a/two before the upstream has it");
    assert_eq!(
        fake.hits("HEAD", &two_path),
        1,
        "regcache asked whether a/two has it: {:?}",
        summary(&fake.requests())
    );
    let head = send(client().head(&two), "HEAD a/two").await;
    assert_eq!(head.status, StatusCode::NOT_FOUND, "{}", head.describe());

    fake.add_blob("a/two", data.clone());
    let before_heads = fake.hits("HEAD", &two_path);
    let r = get(&two).await;
    assert_eq!(r.status, StatusCode::OK, "a/two after: {}", r.describe());
    assert!(r.body == data, "a/two content ({} bytes)", r.body.len());
    assert_eq!(
        fake.blob_gets(&digest),
        1,
        "no second blob GET: {:?}",
        summary(&fake.requests())
    );
    assert_eq!(fake.hits("GET", &two_path), 0);
    assert_eq!(
        fake.hits("HEAD", &two_path),
        before_heads + 1,
        "one HEAD confirmed it"
    );
    // Confirmed once: now a plain hit.
    let n = fake.request_count();
    let r = get(&two).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_no_requests_since(&fake, n, "linked now: ");
}

/// A manifest that names `layer` (as its only layer, with an empty config).
fn manifest_naming(layer: &str, len: usize) -> Bytes {
    oci_manifest(
        serde_json::json!([{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": len }]),
        serde_json::json!({}),
    )
}

// The fake upstream, not docker-registry: the real registry refuses to store a manifest that names
// a blob the repository lacks, and that manifest is the whole point here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_naming_a_blob_does_not_open_it_to_its_repository_without_the_upstream() {
    let fake = FakeUpstream::start().await;
    let data = pseudo_random(30_000, 7);
    let digest = fake.add_blob("t/private", data.clone());
    let claim = manifest_naming(&digest, data.len());
    fake.add_manifest("t/evil", Some("v1"), OCI_MANIFEST, claim.clone());
    fake.add_manifest("t/late", Some("v1"), OCI_MANIFEST, claim.clone());
    let rc = Regcache::with_upstream(&fake.url());
    let u = rc.url();

    let r = get(&format!("{u}/v2/t/private/blobs/{digest}")).await;
    assert_eq!(r.status, StatusCode::OK, "t/private: {}", r.describe());
    let evil = format!("{u}/v2/t/evil/blobs/{digest}");
    let evil_path = format!("/v2/t/evil/blobs/{digest}");
    let r = get(&evil).await;
    assert_oci_error(&r, 404, "BLOB_UNKNOWN", "t/evil, before its manifest");

    // t/evil's manifest names the digest: a claim, which the upstream still refuses.
    for repo in ["t/evil", "t/late"] {
        let m = get(&format!("{u}/v2/{repo}/manifests/v1")).await;
        assert_eq!(
            m.status,
            StatusCode::OK,
            "{repo} manifest: {}",
            m.describe()
        );
    }
    let heads = fake.hits("HEAD", &evil_path);
    let r = get(&evil).await;
    assert_oci_error(
        &r,
        404,
        "BLOB_UNKNOWN",
        "t/evil, whose manifest names the blob that the upstream refuses it",
    );
    assert_eq!(
        fake.hits("HEAD", &evil_path),
        heads + 1,
        "regcache asked the upstream: {:?}",
        summary(&fake.requests())
    );
    let r = send(client().head(&evil), "HEAD t/evil").await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "HEAD t/evil: {}",
        r.describe()
    );
    assert_eq!(fake.blob_gets(&digest), 1, "only t/private's fill");

    // Once the upstream has it for t/evil, one HEAD confirms it and the link is kept.
    fake.add_blob("t/evil", data.clone());
    let r = get(&evil).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "t/evil, confirmed: {}",
        r.describe()
    );
    assert!(r.body == data, "t/evil content ({} bytes)", r.body.len());
    assert_eq!(r.header("x-regcache-cache"), Some("revalidated"));

    // During an outage only the confirmed link serves: t/late's manifest names the digest too,
    // but the upstream never confirmed it for t/late.
    fake.set_status(Some(503));
    let r = get(&evil).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "t/evil during the outage: {}",
        r.describe()
    );
    assert_eq!(r.header("x-regcache-cache"), Some("hit"));
    let r = get(&format!("{u}/v2/t/late/blobs/{digest}")).await;
    assert_unavailable(
        &r,
        "t/late during the outage: named by its manifest, never confirmed",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_cached_for_one_repo_needs_upstream_confirmation_for_another() {
    let fake = FakeUpstream::start().await;
    let body = tiny_manifest("shared");
    let digest = fake.add_manifest("a/one", Some("v1"), OCI_MANIFEST, body.clone());
    let rc = Regcache::with_upstream(&fake.url());
    let r = get(&format!("{}/v2/a/one/manifests/v1", rc.url())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());

    let two = format!("{}/v2/a/two/manifests/{digest}", rc.url());
    let r = get(&two).await;
    assert_oci_error(
        &r,
        404,
        "MANIFEST_UNKNOWN",
        "a/two before the upstream has it",
    );
    fake.add_manifest("a/two", None, OCI_MANIFEST, body.clone());
    let r = get(&two).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(r.body, body);
    assert_eq!(
        fake.hits("GET", &format!("/v2/a/two/manifests/{digest}")),
        0,
        "confirmed with HEAD only: {:?}",
        summary(&fake.requests())
    );
}

// ---- 7. OCI errors ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_oci_errors() {
    let fake = FakeUpstream::start().await;
    let rc = Regcache::with_upstream(&fake.url());
    let u = rc.url();
    let hex64 = "0".repeat(64);

    for (path, code) in [
        ("/v2/a/blobs/sha256:xyz".to_string(), "DIGEST_INVALID"),
        (
            format!("/v2/a/blobs/md5:{}", "0".repeat(32)),
            "DIGEST_INVALID",
        ),
        ("/v2/a/manifests/sha256:xyz".to_string(), "DIGEST_INVALID"),
        (
            format!("/v2/a/manifests/md5:{}", "0".repeat(32)),
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/a/blobs/sha256:{}", "A".repeat(64)),
            "DIGEST_INVALID",
        ),
        ("/v2/UPPER/manifests/x".to_string(), "NAME_INVALID"),
        ("/v2/a/UPPER/blobs/sha256:xyz".to_string(), "NAME_INVALID"),
    ] {
        let r = get(&format!("{u}{path}")).await;
        assert_oci_error(&r, 400, code, &path);
    }

    // Traversal, sent raw: reqwest would normalise `..` and `%2e%2e` away.
    for path in [
        "/v2/a/manifests/..",
        "/v2/a/manifests/%2e%2e",
        "/v2/a/manifests/..%2f..%2fetc%2fpasswd",
        "/v2/a/blobs/..",
        "/v2/a/blobs/sha256:..%2f..%2fetc",
        "/v2/a/%2e%2e/b/manifests/x",
        "/v2/a/..%2f..%2fb/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "/v2/%2e%2e/tags/list",
    ] {
        let r = raw_request(rc.addr(), "GET", path).await;
        assert_eq!(r.status.as_u16(), 400, "{path}: {}", r.describe());
        assert_error_json(&r, path);
    }
    assert_eq!(
        fake.request_count(),
        0,
        "malformed requests never reach the upstream: {:?}",
        summary(&fake.requests())
    );

    let c = client();
    for (req, what) in [
        (
            c.put(format!("{u}/v2/a/manifests/latest"))
                .header("content-type", OCI_MANIFEST)
                .body(tiny_manifest("push").to_vec()),
            "PUT manifest",
        ),
        (
            c.delete(format!("{u}/v2/a/manifests/sha256:{hex64}")),
            "DELETE manifest",
        ),
        (
            c.delete(format!("{u}/v2/a/blobs/sha256:{hex64}")),
            "DELETE blob",
        ),
        (c.post(format!("{u}/v2/a/blobs/uploads/")), "POST upload"),
        (
            c.patch(format!("{u}/v2/a/blobs/uploads/1234")),
            "PATCH upload",
        ),
    ] {
        let r = send(req, what).await;
        assert_oci_error(&r, 405, "UNSUPPORTED", what);
    }

    for (path, what) in [
        (
            "/v2/a/manifests/x?ns=unknown.example".to_string(),
            "unknown ns",
        ),
        (
            "/v2/unknown.example/a/manifests/x".to_string(),
            "unknown host segment",
        ),
        (
            format!("/v2/unknown.example/a/blobs/sha256:{hex64}"),
            "unknown host segment (blob)",
        ),
    ] {
        let r = get(&format!("{u}{path}")).await;
        assert_oci_error(&r, 404, "NAME_UNKNOWN", what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_in_the_leading_name_component_are_name_invalid() {
    let fake = FakeUpstream::start().await;
    let rc = Regcache::with_upstream(&fake.url());
    // `..` and `.` hold a dot, but are path traversal, not registry hosts.
    for path in [
        "/v2/../a/manifests/x",
        "/v2/../../etc/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "/v2/./a/manifests/x",
        "/v2/%2e%2e/a/manifests/x",
    ] {
        let r = raw_request(rc.addr(), "GET", path).await;
        assert_oci_error(&r, 400, "NAME_INVALID", path);
    }
    assert_eq!(fake.request_count(), 0, "{:?}", summary(&fake.requests()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_map_to_oci_errors() {
    let fake = FakeUpstream::start().await;
    let rc = Regcache::with_upstream(&fake.url());
    let u = rc.url();
    let hex64 = "1".repeat(64);

    let r = get(&format!("{u}/v2/team/none/manifests/latest")).await;
    assert_oci_error(&r, 404, "MANIFEST_UNKNOWN", "missing manifest");
    let r = get(&format!("{u}/v2/team/none/manifests/sha256:{hex64}")).await;
    assert_oci_error(&r, 404, "MANIFEST_UNKNOWN", "missing manifest by digest");
    let r = get(&format!("{u}/v2/team/none/blobs/sha256:{hex64}")).await;
    assert_oci_error(&r, 404, "BLOB_UNKNOWN", "missing blob");
    let r = send(
        client().head(format!("{u}/v2/team/none/blobs/sha256:{hex64}")),
        "HEAD missing blob",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.describe());

    // A 429's Retry-After holds every request back (offline::quota): 1 s, waited out before
    // the next request, so that each of them is answered by the upstream.
    fake.set_status(Some(429));
    fake.set_retry_after(Some("1"));
    let r = get(&format!("{u}/v2/team/limited/manifests/latest")).await;
    assert_oci_error(&r, 429, "TOOMANYREQUESTS", "upstream 429");
    assert_eq!(
        r.header("retry-after"),
        Some("1"),
        "429 passes the upstream's Retry-After on: {}",
        r.describe()
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let asked = fake.request_count();
    let r = get(&format!("{u}/v2/team/limited/blobs/sha256:{hex64}")).await;
    assert_oci_error(&r, 429, "TOOMANYREQUESTS", "upstream 429 (blob)");
    assert!(
        fake.request_count() > asked,
        "the blob's 429 came from the upstream"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;

    for status in [503, 500, 502] {
        fake.set_status(Some(status));
        let r = get(&format!("{u}/v2/team/down/manifests/latest")).await;
        assert_oci_error(
            &r,
            503,
            "UNAVAILABLE",
            &format!("upstream {status} (manifest)"),
        );
        let r = get(&format!("{u}/v2/team/down/blobs/sha256:{hex64}")).await;
        assert_oci_error(&r, 503, "UNAVAILABLE", &format!("upstream {status} (blob)"));
    }
    fake.set_status(None);

    // Unreachable upstream: 503, never 404.
    let dead_url = fake.url();
    drop(fake);
    let r = get(&format!("{u}/v2/team/gone/manifests/latest")).await;
    assert_oci_error(&r, 503, "UNAVAILABLE", &format!("upstream {dead_url} gone"));
}

// ---- 8. routing ---------------------------------------------------------------------------------

/// A regcache with the default upstream `hub` (library/x, library/y, library/z, tag `latest`) and
/// `[upstreams.other]` (repo, repo2, tag `v1`) reachable as `other.example`.
struct TwoUpstreams {
    hub: FakeUpstream,
    other: FakeUpstream,
    rc: Regcache,
    layer: Bytes,
    layer_digest: String,
}

async fn two_upstreams() -> TwoUpstreams {
    let hub = FakeUpstream::start().await;
    let other = FakeUpstream::start().await;
    for r in ["library/x", "library/y", "library/z"] {
        hub.add_manifest(r, Some("latest"), OCI_MANIFEST, tiny_manifest(r));
    }
    let layer = Bytes::from_static(b"other layer");
    other.add_image("repo", "v1", layer.clone());
    let (_, layer_digest) = other.add_image("repo2", "v1", layer.clone());
    let rc = Regcache::start(&config_for(
        &hub.url(),
        "",
        &format!(
            "[upstreams.other]\nurl = \"{}\"\nhosts = [\"other.example\"]\n",
            other.url()
        ),
    ));
    TwoUpstreams {
        hub,
        other,
        rc,
        layer,
        layer_digest,
    }
}

/// GETs each `(path, upstream_path)` of `routes` on regcache at `u`: it answers 200 and reaches
/// `upstream_path` once on `upstream` (the `which` upstream).
async fn expect_routes(u: &str, upstream: &FakeUpstream, which: &str, routes: &[(&str, &str)]) {
    for (path, upstream_path) in routes {
        let r = get(&format!("{u}{path}")).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.describe());
        assert_eq!(
            upstream.hits("GET", upstream_path),
            1,
            "{path} reaches {upstream_path} on the {which} upstream: {:?}",
            summary(&upstream.requests())
        );
    }
}

/// Pulls every manifest of [`two_upstreams`] through each way of naming an upstream.
async fn pull_through_every_route(t: &TwoUpstreams) {
    let (hub, other, u) = (&t.hub, &t.other, t.rc.url());
    expect_routes(
        &u,
        hub,
        "default",
        &[
            ("/v2/x/manifests/latest", "/v2/library/x/manifests/latest"),
            (
                "/v2/y/manifests/latest?ns=docker.io",
                "/v2/library/y/manifests/latest",
            ),
            (
                "/v2/docker.io/library/z/manifests/latest",
                "/v2/library/z/manifests/latest",
            ),
        ],
    )
    .await;
    assert_eq!(other.request_count(), 0, "{:?}", summary(&other.requests()));

    expect_routes(
        &u,
        other,
        "other",
        &[
            (
                "/v2/repo/manifests/v1?ns=other.example",
                "/v2/repo/manifests/v1",
            ),
            (
                "/v2/other.example/repo2/manifests/v1",
                "/v2/repo2/manifests/v1",
            ),
        ],
    )
    .await;
    let d = &t.layer_digest;
    let r = get(&format!("{u}/v2/other.example/repo2/blobs/{d}")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "blob via host segment: {}",
        r.describe()
    );
    assert_eq!(r.body, t.layer);
    assert_eq!(other.blob_gets(d), 1);
    let hub_saw: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("repo"))
        .collect();
    assert!(
        hub_saw.is_empty(),
        "hub saw other's repos: {:?}",
        summary(&hub_saw)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_route_by_ns_host_segment_and_default_upstream() {
    let t = two_upstreams().await;
    pull_through_every_route(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lists_default_repos_bare_and_others_under_their_configured_host() {
    let t = two_upstreams().await;
    pull_through_every_route(&t).await;
    let r = get(&format!("{}/v2/_catalog", t.rc.url())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    let v = r.json("catalog");
    assert_eq!(
        v["repositories"],
        serde_json::json!([
            "library/x",
            "library/y",
            "library/z",
            "other.example/repo",
            "other.example/repo2"
        ]),
        "catalog (other upstream: url {}, hosts [\"other.example\"]): {}",
        t.other.url(),
        r.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_paginates_with_link() {
    let t = two_upstreams().await;
    let u = t.rc.url();
    for r in ["x", "y", "z"] {
        let r = get(&format!("{u}/v2/{r}/manifests/latest")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    }
    let r = get(&format!("{u}/v2/_catalog?n=2")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(
        r.json("catalog page 1")["repositories"],
        serde_json::json!(["library/x", "library/y"]),
        "{}",
        r.describe()
    );
    let link = r
        .header("link")
        .unwrap_or_else(|| panic!("no Link on a partial page: {}", r.describe()))
        .to_owned();
    let target = link
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .filter(|(_, rest)| rest.contains("rel=\"next\""))
        .map(|(t, _)| t.to_owned())
        .unwrap_or_else(|| panic!("Link is not <url>; rel=\"next\": {link:?}"));
    assert!(target.starts_with("/v2/_catalog?"), "{link:?}");
    let r = get(&format!("{u}{target}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(
        r.json("catalog page 2")["repositories"],
        serde_json::json!(["library/z"]),
        "{}",
        r.describe()
    );
    assert!(r.header("link").is_none(), "last page: {}", r.describe());
    let r = get(&format!("{u}/v2/_catalog?n=x")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.describe());
    assert_error_json(&r, "catalog n=x");
}

// ---- 9. tag revalidation ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_revalidated_with_head_after_freshness() {
    let fake = FakeUpstream::start().await;
    let first = fake.add_manifest(
        "team/fresh",
        Some("t"),
        OCI_MANIFEST,
        tiny_manifest("first"),
    );
    let rc = Regcache::start(&config_for(&fake.url(), "freshness = \"1s\"", ""));
    let url = format!("{}/v2/team/fresh/manifests/t", rc.url());

    // Start early in a wall-clock second, so that "within 1 s" is not at a second boundary.
    wait_for_subsecond(0, 150).await;
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(r.header("docker-content-digest"), Some(first.as_str()));
    let n = fake.request_count();
    let fetched = Instant::now();

    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(r.header("docker-content-digest"), Some(first.as_str()));
    assert!(
        fetched.elapsed() < Duration::from_millis(500),
        "premise: the second GET was quick"
    );
    assert_no_requests_since(&fake, n, "fresh tag: no upstream request; got ");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let n = fake.request_count();
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(r.header("docker-content-digest"), Some(first.as_str()));
    let reqs = summary(&requests_since(&fake, n));
    assert_eq!(
        reqs,
        vec!["HEAD /v2/team/fresh/manifests/t".to_string()],
        "stale tag, unchanged upstream: one HEAD and no GET"
    );

    let second = fake.add_manifest("team/fresh", None, OCI_MANIFEST, tiny_manifest("second"));
    fake.set_tag("team/fresh", "t", &second);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let n = fake.request_count();
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(
        r.header("docker-content-digest"),
        Some(second.as_str()),
        "the moved tag is served; upstream saw {:?}",
        summary(&requests_since(&fake, n))
    );
    assert_eq!(sha256_digest(&r.body), second);

    // By digest, cached: no upstream contact at all, however old.
    let n = fake.request_count();
    for d in [&first, &second] {
        let r = get(&format!("{}/v2/team/fresh/manifests/{d}", rc.url())).await;
        assert_eq!(r.status, StatusCode::OK, "{d}: {}", r.describe());
        assert_eq!(sha256_digest(&r.body), *d);
    }
    assert_no_requests_since(&fake, n, "cached digests need no upstream: ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_freshness_is_not_cut_short_at_a_wall_clock_second_boundary() {
    let fake = FakeUpstream::start().await;
    let d = fake.add_manifest("team/edge", Some("t"), OCI_MANIFEST, tiny_manifest("edge"));
    let rc = Regcache::start(&config_for(&fake.url(), "freshness = \"1s\"", ""));
    let url = format!("{}/v2/team/edge/manifests/t", rc.url());

    // Fetch late in a wall-clock second, then ask again 300 ms later (in the next second).
    wait_for_subsecond(850, 950).await;
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(r.header("docker-content-digest"), Some(d.as_str()));
    let fetched = Instant::now();
    let n = fake.request_count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(&url).await;
    let elapsed = fetched.elapsed();
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert!(elapsed < Duration::from_millis(800), "premise: {elapsed:?}");
    assert_no_requests_since(
        &fake,
        n,
        &format!("freshness = 1s, but {elapsed:?} after the fetch the tag was revalidated: "),
    );
}

// ---- 10. manifest size limit --------------------------------------------------------------------

/// An OCI manifest of at least `size` bytes (padded with an annotation).
fn big_manifest(size: usize) -> Bytes {
    empty_manifest(serde_json::json!({ "padding": "x".repeat(size) }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_over_max_manifest_size_is_refused_and_not_cached() {
    let fake = FakeUpstream::start().await;
    let big = big_manifest((4 << 20) + 1024);
    let digest = fake.add_manifest("team/huge", Some("big"), OCI_MANIFEST, big.clone());
    let upstream_path = "/v2/team/huge/manifests/big";

    let rc = Regcache::with_upstream(&fake.url());
    let url = format!("{}/v2/team/huge/manifests/big", rc.url());
    for attempt in 1..=2 {
        let r = get(&url).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_GATEWAY,
            "attempt {attempt}: over 4 MiB: {}",
            r.describe()
        );
        assert_error_json(&r, "oversized manifest");
        assert_eq!(
            fake.hits("GET", upstream_path),
            attempt,
            "not cached: each attempt asks the upstream"
        );
    }
    let r = get(&format!("{}/v2/team/huge/manifests/{digest}", rc.url())).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_GATEWAY,
        "by digest: {}",
        r.describe()
    );
    assert!(
        !stored(&rc, &digest),
        "the oversized manifest is not stored"
    );
    drop(rc);

    let roomy = Regcache::start(&format!(
        "max_manifest_size = \"8MiB\"\n{}",
        config_for(&fake.url(), "", "")
    ));
    let r = get(&format!("{}/v2/team/huge/manifests/big", roomy.url())).await;
    assert_eq!(r.status, StatusCode::OK, "8 MiB limit: {}", r.describe());
    assert!(r.body == big, "8 MiB limit: {} bytes", r.body.len());

    let small = tiny_manifest(&"y".repeat(2000));
    fake.add_manifest("team/small", Some("s"), OCI_MANIFEST, small.clone());
    let tight = Regcache::start(&format!(
        "max_manifest_size = \"1KiB\"\n{}",
        config_for(&fake.url(), "", "")
    ));
    let r = get(&format!("{}/v2/team/small/manifests/s", tight.url())).await;
    assert_eq!(
        r.status,
        StatusCode::BAD_GATEWAY,
        "1 KiB limit, {}-byte manifest: {}",
        small.len(),
        r.describe()
    );
    assert_error_json(&r, "1 KiB limit");
    let r = get(&format!("{}/v2/team/small/manifests/s", roomy.url())).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "default-ish limit: {}",
        r.describe()
    );
}

// ---- 11. redirects ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_redirect_to_another_host_works_without_leaking_the_token() {
    let origin = FakeUpstream::start().await;
    let storage = FakeUpstream::start().await;
    let layer = pseudo_random(200_000, 11);
    let (mdigest, ldigest) = origin.add_image("team/redir", "v1", layer.clone());
    storage.add_blob("storage/bucket", layer.clone());
    origin.set_token_auth(true);
    origin.set_blob_redirect(Some(storage.url()));
    let rc = Regcache::with_upstream(&origin.url());
    let base = format!("{}/v2/team/redir", rc.url());

    let m = get(&format!("{base}/manifests/v1")).await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.describe());
    assert_eq!(sha256_digest(&m.body), mdigest);
    let b = get(&format!("{base}/blobs/{ldigest}")).await;
    assert_eq!(
        b.status,
        StatusCode::OK,
        "{}; origin saw {:?}; storage saw {:?}",
        b.describe(),
        summary(&origin.requests()),
        summary(&storage.requests())
    );
    assert!(b.body == layer, "redirected blob: {} bytes", b.body.len());
    assert_eq!(storage.blob_gets(&ldigest), 1);
    assert_eq!(origin.blob_gets(&ldigest), 0);

    let blob_path = format!("/v2/team/redir/blobs/{ldigest}");
    let origin_blob_reqs: Vec<_> = origin
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == blob_path)
        .collect();
    assert!(
        origin_blob_reqs.iter().any(|r| r
            .header("authorization")
            .is_some_and(|a| a.starts_with("Bearer "))),
        "premise: the origin got the blob GET with a token: {origin_blob_reqs:?}"
    );
    let storage_reqs = storage.requests();
    assert!(!storage_reqs.is_empty(), "storage was used");
    let leaked: Vec<_> = storage_reqs
        .iter()
        .filter(|r| r.header("authorization").is_some())
        .collect();
    assert!(
        leaked.is_empty(),
        "the token must not follow a redirect to another host: {leaked:?}"
    );
}

// ---- 12. referrers ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_list_cached_referrers_and_filter_by_artifact_type() {
    let fake = FakeUpstream::start().await;
    let (subject, _) = fake.add_image("team/signed", "v1", Bytes::from_static(b"payload"));
    let rc = Regcache::with_upstream(&fake.url());
    let base = format!("{}/v2/team/signed", rc.url());
    let s = get(&format!("{base}/manifests/v1")).await;
    assert_eq!(s.status, StatusCode::OK, "subject: {}", s.describe());
    let subject_len = s.body.len();

    let referrer = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/x-test",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2
        },
        "layers": [{
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2
        }],
        "subject": { "mediaType": OCI_MANIFEST, "digest": subject, "size": subject_len },
        "annotations": { "org.example.kind": "signature" },
    });
    let referrer = Bytes::from(serde_json::to_vec(&referrer).expect("serialize referrer"));
    let rdigest = fake.add_manifest("team/signed", None, OCI_MANIFEST, referrer.clone());
    let r = get(&format!("{base}/manifests/{rdigest}")).await;
    assert_eq!(r.status, StatusCode::OK, "referrer: {}", r.describe());

    let r = get(&format!("{base}/referrers/{subject}")).await;
    assert_eq!(r.status, StatusCode::OK, "referrers: {}", r.describe());
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.oci.image.index.v1+json"),
        "{}",
        r.describe()
    );
    let v = r.json("referrers");
    assert_eq!(v["schemaVersion"], 2, "{v}");
    assert_eq!(
        v["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{v}"
    );
    assert_eq!(
        v["manifests"],
        serde_json::json!([{
            "mediaType": OCI_MANIFEST,
            "digest": rdigest,
            "size": referrer.len(),
            "artifactType": "application/x-test",
            "annotations": { "org.example.kind": "signature" },
        }]),
        "referrers index: {v}"
    );
    assert!(
        r.header("oci-filters-applied").is_none(),
        "{}",
        r.describe()
    );

    let r = get(&format!(
        "{base}/referrers/{subject}?artifactType=application/x-other"
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK, "filtered: {}", r.describe());
    assert_eq!(
        r.header("oci-filters-applied"),
        Some("artifactType"),
        "{}",
        r.describe()
    );
    let v = r.json("filtered referrers");
    assert_eq!(v["manifests"], serde_json::json!([]), "filtered out: {v}");

    let r = get(&format!(
        "{base}/referrers/{subject}?artifactType=application%2Fx-test"
    ))
    .await;
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let v = r.json("filtered referrers (match)");
    assert_eq!(
        v["manifests"][0]["digest"], rdigest,
        "kept by its own artifactType: {v}"
    );

    let r = get(&format!("{base}/referrers/sha256:xyz")).await;
    assert_oci_error(&r, 400, "DIGEST_INVALID", "referrers of a bad digest");
}

// ---- 13. tags list ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_paginates_with_link_to_regcache() {
    let fake = FakeUpstream::start().await;
    for t in ["a", "b", "c", "d", "e"] {
        fake.add_manifest("team/tags", Some(t), OCI_MANIFEST, tiny_manifest(t));
    }
    let rc = Regcache::with_upstream(&fake.url());

    let mut url = format!("{}/v2/team/tags/tags/list?n=2", rc.url());
    let mut pages = Vec::new();
    for _ in 0..5 {
        let r = get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{url}: {}", r.describe());
        let v = r.json("tags list");
        assert_eq!(v["name"], "team/tags", "{v}");
        let tags: Vec<String> = v["tags"]
            .as_array()
            .unwrap_or_else(|| panic!("no tags array: {v}"))
            .iter()
            .map(|t| t.as_str().expect("tag is a string").to_owned())
            .collect();
        pages.push(tags);
        let Some(link) = r.header("link") else {
            break;
        };
        let target = link
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .filter(|(_, rest)| rest.contains("rel=\"next\""))
            .map(|(t, _)| t.to_owned())
            .unwrap_or_else(|| panic!("Link is not <url>; rel=\"next\": {link:?}"));
        url = if target.starts_with('/') {
            assert!(
                target.starts_with("/v2/team/tags/tags/list?"),
                "Link points into regcache's API: {link:?}"
            );
            format!("{}{target}", rc.url())
        } else {
            assert!(
                target.starts_with(&format!("{}/v2/team/tags/tags/list?", rc.url())),
                "Link points at regcache, not the upstream: {link:?}"
            );
            target
        };
    }
    assert_eq!(
        pages,
        vec![
            vec!["a".to_string(), "b".into()],
            vec!["c".into(), "d".into()],
            vec!["e".into()]
        ],
        "pages; upstream saw {:?}",
        summary(&fake.requests())
    );

    for n in ["abc", "-1", "100000", "2x"] {
        let r = get(&format!("{}/v2/team/tags/tags/list?n={n}", rc.url())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "n={n}: {}", r.describe());
        assert_error_json(&r, &format!("n={n}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_of_unannounced_size_reaches_a_slow_reader_whole() {
    const SIZE: usize = 8 << 20;
    let fake = FakeUpstream::start().await;
    let data = pseudo_random(SIZE, 77);
    let digest = fake.add_blob("team/nolength", data.clone());
    // No Content-Length from the upstream: regcache streams the fill chunked, and the reader is
    // slower than the fill, so the fill is done long before the reader has everything.
    fake.set_unannounced_size(true);
    let rc = Regcache::with_upstream(&fake.url());
    let url = format!("{}/v2/team/nolength/blobs/{digest}", rc.url());
    let mut resp = client().get(&url).send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.content_length(),
        None,
        "no size announced, so none passed on"
    );
    let mut body = Vec::new();
    let mut err = None;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                body.extend_from_slice(&c);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(None) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert!(
        err.is_none() && body[..] == data[..],
        "{} of {SIZE} bytes, error {err:?}",
        body.len()
    );
    assert_eq!(fake.blob_gets(&digest), 1);
}

// ---- 14. HEAD answers without Content-Length ----------------------------------------------------

/// `r` is a `200` blob `HEAD` answer with cache outcome `outcome` and `Content-Length` `length`.
fn assert_blob_head(r: &Reply, outcome: &str, length: Option<usize>, what: &str) {
    let length = length.map(|n| n.to_string());
    assert_eq!(
        (
            r.status,
            r.header("x-regcache-cache"),
            r.header("content-length")
        ),
        (StatusCode::OK, Some(outcome), length.as_deref()),
        "{what}: {}",
        r.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_heads_never_invent_a_length_the_upstream_head_did_not_give() {
    let fake = FakeUpstream::start().await;
    let filled = pseudo_random(20_000, 140);
    let busy = pseudo_random(1 << 20, 141);
    let data = pseudo_random(30_000, 142);
    let filled_digest = fake.add_blob("team/filled", filled.clone());
    let busy_digest = fake.add_blob("team/busy", busy);
    let digest = fake.add_blob("team/nolen", data.clone());
    fake.set_head_without_length(true);
    let rc = Regcache::start(&config_for(&fake.url(), "", "[limits]\nmax_fills = 1\n"));

    // A free fill slot: a HEAD starts the fill, whose GET announces the size.
    let r = send(
        client().head(format!("{}/v2/team/filled/blobs/{filled_digest}", rc.url())),
        "HEAD that starts a fill",
    )
    .await;
    assert_blob_head(
        &r,
        "miss",
        Some(filled.len()),
        "the size the fill's GET announced",
    );
    assert_eq!(
        fake.hits("HEAD", &format!("/v2/team/filled/blobs/{filled_digest}")),
        0,
        "the fill asked with GET, not HEAD: {:?}",
        summary(&fake.requests())
    );

    // The one slot held by a fill that trickles for minutes: a HEAD of another uncached blob is
    // passed through to the upstream's HEAD.
    fake.set_slow_blobs(1_000, Duration::from_millis(200));
    let slow = tokio::spawn({
        let u = format!("{}/v2/team/busy/blobs/{busy_digest}", rc.url());
        async move { get(&u).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.blob_gets(&busy_digest) == 0 {
        assert!(Instant::now() < deadline, "the slow fill never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let url = format!("{}/v2/team/nolen/blobs/{digest}", rc.url());
    let r = send(client().head(&url), "HEAD, upstream HEAD without length").await;
    assert_blob_head(
        &r,
        "passthrough",
        None,
        "the fill slot is taken, so the upstream's HEAD answers; it gave no size, so regcache gives none",
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(digest.as_str()),
        "{}",
        r.describe()
    );
    let head_path = format!("/v2/team/nolen/blobs/{digest}");
    assert_eq!(
        fake.hits("HEAD", &head_path),
        1,
        "{:?}",
        summary(&fake.requests())
    );
    assert_eq!(
        fake.blob_gets(&digest),
        0,
        "a HEAD passed through fetches nothing"
    );

    fake.set_head_without_length(false);
    let r = send(client().head(&url), "HEAD, upstream HEAD with length").await;
    assert_blob_head(
        &r,
        "passthrough",
        Some(data.len()),
        "the upstream's size is passed on",
    );
    slow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_is_revalidated_by_digest_when_the_upstream_head_has_no_length() {
    let fake = FakeUpstream::start().await;
    let first_body = tiny_manifest("first");
    let first = fake.add_manifest("team/nolen", Some("t"), OCI_MANIFEST, first_body.clone());
    fake.set_head_without_length(true);
    // Every request revalidates: no waiting for freshness to run out.
    let rc = Regcache::start(&config_for(&fake.url(), "freshness = \"0s\"", ""));
    let url = format!("{}/v2/team/nolen/manifests/t", rc.url());
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.describe());
    assert_eq!(
        r.header("x-regcache-cache"),
        Some("miss"),
        "{}",
        r.describe()
    );

    let n = fake.request_count();
    let r = send(
        client().head(&url).header(
            "accept",
            regcache::oci::media::Accept::ALL
                .header_value()
                .unwrap_or_default(),
        ),
        "HEAD of the cached tag",
    )
    .await;
    assert_eq!(
        summary(&requests_since(&fake, n)),
        vec!["HEAD /v2/team/nolen/manifests/t".to_string()],
        "revalidated with one HEAD, no GET"
    );
    assert_eq!(
        (r.status, r.header("x-regcache-cache")),
        (StatusCode::OK, Some("revalidated")),
        "the digest header alone revalidates: {}",
        r.describe()
    );
    assert_eq!(
        r.header("content-length"),
        Some(first_body.len().to_string().as_str()),
        "the length of the manifest regcache holds: {}",
        r.describe()
    );
    assert_eq!(r.header("docker-content-digest"), Some(first.as_str()));

    let second = fake.add_manifest("team/nolen", None, OCI_MANIFEST, tiny_manifest("second"));
    fake.set_tag("team/nolen", "t", &second);
    let n = fake.request_count();
    let r = get(&url).await;
    assert_eq!(
        (r.status, r.header("docker-content-digest")),
        (StatusCode::OK, Some(second.as_str())),
        "the moved tag is served; upstream saw {:?}: {}",
        summary(&requests_since(&fake, n)),
        r.describe()
    );
    assert_eq!(sha256_digest(&r.body), second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_of_another_repository_is_confirmed_by_heads_without_length() {
    let fake = FakeUpstream::start().await;
    let data = pseudo_random(40_000, 142);
    let blob = fake.add_blob("a/one", data.clone());
    let body = tiny_manifest("shared, no length");
    let manifest = fake.add_manifest("a/one", Some("v1"), OCI_MANIFEST, body.clone());
    let rc = Regcache::with_upstream(&fake.url());
    let u = rc.url();
    for path in [format!("blobs/{blob}"), "manifests/v1".to_owned()] {
        let r = get(&format!("{u}/v2/a/one/{path}")).await;
        assert_eq!(r.status, StatusCode::OK, "a/one {path}: {}", r.describe());
    }
    fake.add_blob("a/two", data.clone());
    fake.add_manifest("a/two", None, OCI_MANIFEST, body.clone());
    fake.set_head_without_length(true);

    for (path, want) in [
        (format!("blobs/{blob}"), &data),
        (format!("manifests/{manifest}"), &body),
    ] {
        let n = fake.request_count();
        let r = get(&format!("{u}/v2/a/two/{path}")).await;
        assert!(
            r.status == StatusCode::OK && r.body == *want,
            "a/two {path}, confirmed by a HEAD without length: {}",
            r.describe()
        );
        assert_eq!(
            summary(&requests_since(&fake, n)),
            vec![format!("HEAD /v2/a/two/{path}")],
            "one HEAD confirmed it, nothing fetched again"
        );
    }
}

//! Pull-through against a real upstream (Debian's docker-registry) with a real client (skopeo).

use std::path::Path;
use std::time::Instant;

use sha2::{Digest as _, Sha256};

use crate::support::images::assert_same_copy;
use crate::support::media::accept_all;
use crate::support::media::{DOCKER_LIST, OCI_INDEX};
use crate::support::nginx::Nginx;
use crate::support::process::metric;
use crate::support::regcache::{client, Regcache};
use crate::support::registry::{
    copy_to_dir, http_get, inspect_raw, read_response, sha256_digest, Registry, Seeded,
    SEEDED_IMAGES,
};
use crate::support::reply::{send, Reply};

fn copy_ok(host_port: &str, image: &str, dest: &Path, all: bool) {
    let out = copy_to_dir(host_port, image, dest, all);
    assert!(
        out.status.success(),
        "skopeo copy of {image} from {host_port} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn skopeo_pulls_every_format_byte_identical_then_by_digest_with_upstream_stopped() {
    let mut upstream = Registry::start_seeded();
    let rc = Regcache::with_upstream(&upstream.url());
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let mut pulled = Vec::new();
    for (i, (repo, tag, media_type)) in SEEDED_IMAGES.iter().enumerate() {
        let image = format!("{repo}:{tag}");
        let want = inspect_raw(&upstream.host_port(), &image);
        let got = inspect_raw(&rc.host_port(), &image);
        assert!(
            want == got,
            "{image}: manifest bytes through regcache differ from the upstream's"
        );
        let digest = sha256_digest(&want);

        let resp = http_get(
            rc.addr(),
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Accept", accept_all())],
        )
        .expect("GET manifest");
        assert_eq!(resp.status, 200, "{image}");
        assert_eq!(
            resp.header("content-type"),
            Some(*media_type),
            "{image}: media type"
        );
        assert_eq!(
            resp.header("docker-content-digest"),
            Some(digest.as_str()),
            "{image}"
        );
        assert_eq!(
            resp.header("content-length"),
            Some(want.len().to_string().as_str())
        );

        let all = *media_type == OCI_INDEX || *media_type == DOCKER_LIST;
        let from_upstream = work.path().join(format!("up-{i}"));
        let through = work.path().join(format!("rc-{i}"));
        copy_ok(&upstream.host_port(), &image, &from_upstream, all);
        copy_ok(&rc.host_port(), &image, &through, all);
        assert_same_copy(&from_upstream, &through, &image);
        pulled.push((repo.to_string(), digest, all, from_upstream));
    }

    upstream.stop();
    for (i, (repo, digest, all, reference_copy)) in pulled.iter().enumerate() {
        let image = format!("{repo}@{digest}");
        let again = work.path().join(format!("down-{i}"));
        copy_ok(&rc.host_port(), &image, &again, *all);
        assert_same_copy(
            reference_copy,
            &again,
            &format!("{image} with the upstream stopped"),
        );
    }
}

#[test]
fn docker_hub_names_ns_and_host_segments_reach_the_default_upstream() {
    let upstream = Registry::start_seeded();
    let rc = Regcache::with_upstream(&upstream.url());
    let want = sha256_digest(&inspect_raw(&upstream.host_port(), Seeded::BUSYBOX));
    let paths = [
        "/v2/busybox/manifests/latest".to_string(),
        "/v2/library/busybox/manifests/latest?ns=docker.io".to_string(),
        "/v2/busybox/manifests/latest?ns=docker.io".to_string(),
        "/v2/docker.io/library/busybox/manifests/latest".to_string(),
        format!(
            "/v2/{}/library/busybox/manifests/latest",
            upstream.host_port()
        ),
    ];
    for path in &paths {
        let resp = http_get(rc.addr(), path, &[("Accept", accept_all())]).expect("GET");
        assert_eq!(
            resp.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(
            resp.header("docker-content-digest"),
            Some(want.as_str()),
            "{path}"
        );
    }
    // skopeo with an unqualified Docker Hub name.
    let got = inspect_raw(&rc.host_port(), "busybox:latest");
    assert_eq!(sha256_digest(&got), want);
    let resp = http_get(rc.addr(), "/v2/_catalog", &[]).expect("catalog");
    let body = String::from_utf8_lossy(&resp.body);
    assert!(body.contains("\"library/busybox\""), "catalog: {body}");
}

/// The distribution spec's registry proxying: a registry that scopes a request by the `ns` query
/// parameter returns that value in `OCI-Namespace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_scoped_by_ns_answer_oci_namespace_and_no_others_do() {
    let upstream = Registry::start_seeded();
    let rc = Regcache::with_upstream(&upstream.url());
    let raw = inspect_raw(&upstream.host_port(), Seeded::SMALL_OCI);
    let manifest = sha256_digest(&raw);
    let m: serde_json::Value = serde_json::from_slice(&raw).expect("manifest JSON");
    let layer = m["layers"][0]["digest"]
        .as_str()
        .expect("small/oci has a layer")
        .to_owned();
    let u = rc.url();
    let (head, get) = (reqwest::Method::HEAD, reqwest::Method::GET);
    async fn ask(u: &str, method: &reqwest::Method, path: &str) -> Reply {
        let req = client()
            .request(method.clone(), format!("{u}{path}"))
            .header("accept", accept_all());
        send(req, &format!("{method} {path}")).await
    }
    // (method, path, status, OCI-Namespace): scoped by ns, then not.
    let ns = Some("docker.io");
    let cases = [
        (
            &get,
            "/v2/small/oci/manifests/latest?ns=docker.io".to_owned(),
            200,
            ns,
        ),
        (
            &head,
            "/v2/small/oci/manifests/latest?ns=docker.io".to_owned(),
            200,
            ns,
        ),
        (
            &get,
            format!("/v2/small/oci/manifests/{manifest}?ns=docker.io"),
            200,
            ns,
        ),
        (
            &get,
            format!("/v2/small/oci/blobs/{layer}?ns=docker.io"),
            200,
            ns,
        ),
        (
            &head,
            format!("/v2/small/oci/blobs/{layer}?ns=docker.io"),
            200,
            ns,
        ),
        (
            &get,
            "/v2/small/oci/tags/list?ns=docker.io".to_owned(),
            200,
            ns,
        ),
        // Scoped by ns too, though the upstream has no such tag.
        (
            &get,
            "/v2/small/oci/manifests/nope?ns=docker.io".to_owned(),
            404,
            ns,
        ),
        (&get, "/v2/small/oci/manifests/latest".to_owned(), 200, None),
        (
            &get,
            "/v2/docker.io/small/oci/manifests/latest".to_owned(),
            200,
            None,
        ),
        (&head, format!("/v2/small/oci/blobs/{layer}"), 200, None),
        (&get, "/v2/?ns=docker.io".to_owned(), 200, None),
        // An ns naming no configured upstream scopes nothing.
        (
            &get,
            "/v2/small/oci/manifests/latest?ns=quay.io".to_owned(),
            404,
            None,
        ),
    ];
    for (method, path, status, namespace) in &cases {
        let r = ask(&u, method, path).await;
        assert_eq!(
            r.status.as_u16(),
            *status,
            "{method} {path}: {}",
            r.describe()
        );
        assert_eq!(
            r.header("oci-namespace"),
            *namespace,
            "{method} {path}: OCI-Namespace only when ns routed it: {}",
            r.describe()
        );
    }
}

/// The largest layer of the big image and its size.
fn big_layer(upstream: &Registry) -> (String, u64) {
    let raw = inspect_raw(&upstream.host_port(), Seeded::BIG);
    let m: serde_json::Value = serde_json::from_slice(&raw).expect("manifest JSON");
    m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().expect("digest").to_owned(),
                l["size"].as_u64().expect("size"),
            )
        })
        .max_by_key(|(_, s)| *s)
        .expect("a layer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_cold_clients_on_a_100_mib_layer_cost_one_upstream_fetch() {
    let upstream = Registry::start_seeded();
    let rc = Regcache::with_upstream(&upstream.url());
    let (digest, size) = big_layer(&upstream);
    assert!(size > 100 << 20, "the big layer is only {size} bytes");
    let url = format!("{}/v2/big/image/blobs/{digest}", rc.url());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (c, url) = (client(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut resp = c.get(&url).send().await.expect("GET blob");
            assert_eq!(resp.status(), 200);
            let mut h = Sha256::new();
            let mut n = 0u64;
            let mut first = None;
            while let Some(chunk) = resp.chunk().await.expect("blob body") {
                first.get_or_insert_with(Instant::now);
                n += chunk.len() as u64;
                h.update(&chunk);
            }
            (
                format!("sha256:{:x}", h.finalize()),
                n,
                first,
                Instant::now(),
            )
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.expect("client task"));
    }
    // That first bytes reach clients before the fill completes is pinned by the fake-upstream
    // test (a slow body makes it deterministic); on loopback this fill takes well under a second.
    for (got, n, first, _) in &results {
        assert_eq!(got, &digest, "a client got wrong bytes");
        assert_eq!(*n, size, "a client got a short body");
        assert!(first.is_some(), "a client got no bytes");
    }
    let log = upstream.access_log();
    let gets = log
        .lines()
        .filter(|l| l.contains(&format!("\"GET /v2/big/image/blobs/{digest}")))
        .count();
    assert_eq!(gets, 1, "the upstream served the blob {gets} times:\n{log}");
}

/// An `https` upstream that speaks HTTP/2 (nginx in front of docker-registry) is spoken to in
/// HTTP/2, chosen by ALPN; one that speaks only HTTP/1.1 over TLS, and a plain `http` one, in
/// HTTP/1.1. The largest seeded layer streams whole through the HTTP/2 connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_spoken_to_in_http2_by_alpn_and_plain_ones_in_http11() {
    let upstream = Registry::start_seeded();
    let nginx = Nginx::start_in_front_of(upstream.addr());
    let ca = nginx.ca_file();
    let (h2, tls11, plain) = (nginx.h2_url(), nginx.https11_url(), nginx.http_url());
    // freshness 0: every tag request revalidates with a HEAD, over HTTP/2 too.
    let rc = Regcache::start(&format!(
        "[upstreams.docker]\nurl = \"{h2}\"\nca_file = \"{ca}\"\nfreshness = \"0s\"\n\
         [upstreams.tls11]\nurl = \"{tls11}\"\nca_file = \"{ca}\"\nhosts = [\"tls11.example\"]\n\
         [upstreams.plain]\nurl = \"{plain}\"\nhosts = [\"plain.example\"]\n",
        ca = ca.display()
    ));
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let want = sha256_digest(&inspect_raw(&upstream.host_port(), Seeded::SMALL_OCI));
    let direct = work.path().join("direct");
    copy_ok(&upstream.host_port(), Seeded::SMALL_OCI, &direct, false);
    for (i, image) in [
        Seeded::SMALL_OCI.to_owned(),
        Seeded::SMALL_OCI.to_owned(),
        format!("small/oci@{want}"),
    ]
    .iter()
    .enumerate()
    {
        let through = work.path().join(format!("h2-{i}"));
        copy_ok(&rc.host_port(), image, &through, false);
        assert_same_copy(
            &direct,
            &through,
            &format!("{image} through an HTTP/2 upstream"),
        );
    }

    let (digest, size) = big_layer(&upstream);
    let mut resp = client()
        .get(format!("{}/v2/big/image/blobs/{digest}", rc.url()))
        .send()
        .await
        .expect("GET the big layer");
    assert_eq!(resp.status(), 200, "big layer through the HTTP/2 upstream");
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await.expect("big layer body") {
        n += chunk.len() as u64;
        h.update(&chunk);
    }
    assert_eq!(
        (format!("sha256:{:x}", h.finalize()), n),
        (digest.clone(), size),
        "the big layer's bytes through the HTTP/2 upstream"
    );

    for host in ["tls11.example", "plain.example"] {
        let path = format!("/v2/small/oci/manifests/latest?ns={host}");
        let r = http_get(rc.addr(), &path, &[("Accept", accept_all())]).expect("GET manifest");
        assert_eq!(
            (r.status, r.header("docker-content-digest")),
            (200, Some(want.as_str())),
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }

    let log = nginx.access_log();
    let h2_lines = nginx.log_lines_of(&h2);
    for needle in [
        "HEAD /v2/small/oci/manifests/latest ".to_owned(),
        format!("GET /v2/big/image/blobs/{digest} 200 {size}"),
    ] {
        assert!(
            h2_lines.iter().any(|l| l.contains(&needle)),
            "regcache sent {needle:?} to the HTTP/2 port {h2}; nginx logged:\n{log}"
        );
    }
    for (url, lines, protocol) in [
        (&h2, h2_lines, "HTTP/2.0"),
        (&tls11, nginx.log_lines_of(&tls11), "HTTP/1.1"),
        (&plain, nginx.log_lines_of(&plain), "HTTP/1.1"),
    ] {
        assert!(
            !lines.is_empty() && lines.iter().all(|l| l.split(' ').nth(1) == Some(protocol)),
            "every request regcache sent to {url} is {protocol}; nginx logged:\n{log}"
        );
    }
}

pub(crate) fn sendfile_bytes(rc: &Regcache) -> f64 {
    let m = http_get(rc.addr(), "/metrics", &[]).expect("GET /metrics");
    metric(
        &String::from_utf8_lossy(&m.body),
        "regcache_sendfile_bytes_total",
    )
    .expect("regcache_sendfile_bytes_total in /metrics")
}

#[test]
fn warm_blobs_are_sent_with_sendfile_byte_exact_on_one_keep_alive_connection() {
    use std::io::Write as _;
    let upstream = Registry::start_seeded();
    let rc = Regcache::with_upstream(&upstream.url());
    let raw = inspect_raw(&upstream.host_port(), Seeded::BIG);
    let m: serde_json::Value = serde_json::from_slice(&raw).expect("manifest JSON");
    let big = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .max_by_key(|l| l["size"].as_u64())
        .and_then(|l| l["digest"].as_str())
        .expect("a layer")
        .to_owned();
    let config = m["config"]["digest"].as_str().expect("config").to_owned();
    let path = format!("/v2/big/image/blobs/{big}");

    // Cold: the body follows the fill; what is already written to the temporary file goes out
    // with sendfile too.
    let before = sendfile_bytes(&rc);
    let cold = http_get(rc.addr(), &path, &[]).expect("cold GET");
    assert_eq!(cold.status, 200);
    assert_eq!(sha256_digest(&cold.body), big, "cold body");
    let full = cold.body;
    assert!(
        full.len() > 3 << 20,
        "the big layer is {} bytes",
        full.len()
    );
    let cold_sent = sendfile_bytes(&rc) - before;
    assert!(
        cold_sent > 0.0 && cold_sent <= full.len() as f64,
        "the cold GET sent {cold_sent} of {} bytes with sendfile",
        full.len()
    );
    // The commit (fsync, then rename) ends before the warm part: pages locked for writeback
    // fail the page-cache probe, and those chunks would rightly be read instead.
    let stored = rc
        .data_dir()
        .join("blobs/sha256")
        .join(&big[7..9])
        .join(&big[7..]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !stored.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the blob was not committed in 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = sendfile_bytes(&rc);

    // Warm, all on one connection: whole blob, HEAD, a range across chunk edges, a small
    // blob, the whole blob again. Any lane out of step would corrupt or cut a later answer.
    let mut s = std::net::TcpStream::connect(rc.addr()).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let (a, z) = (1_000_000usize, 3_200_000usize);
    let requests = [
        ("GET", path.clone(), String::new()),
        ("HEAD", path.clone(), String::new()),
        ("GET", path.clone(), format!("Range: bytes={a}-{z}\r\n")),
        (
            "GET",
            format!("/v2/big/image/blobs/{config}"),
            String::new(),
        ),
        ("GET", path.clone(), String::new()),
    ];
    let (mut served, mut config_len) = (0, 0);
    for (i, (method, target, extra)) in requests.iter().enumerate() {
        let what = format!("request {i}: {method} {target} {extra}");
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n",
            rc.addr()
        )
        .expect("send request");
        let r = read_response(&mut s, *method == "HEAD", &what);
        served += r.body.len();
        match i {
            0 | 4 => {
                assert_eq!(r.status, 200, "{what}");
                assert!(r.body == full, "{what}: body differs from the blob");
            }
            1 => {
                assert_eq!(r.status, 200, "{what}");
                assert_eq!(
                    r.header("content-length"),
                    Some(full.len().to_string().as_str())
                );
            }
            2 => {
                assert_eq!(r.status, 206, "{what}");
                assert!(r.body == full[a..=z], "{what}: range body differs");
            }
            _ => {
                assert_eq!(r.status, 200, "{what}");
                assert_eq!(sha256_digest(&r.body), config, "{what}");
                config_len = r.body.len();
            }
        }
    }
    // Cached pages go out with sendfile. Not necessarily every chunk: a page the kernel has
    // locked for a moment (or reclaimed) fails the probe, and that chunk is read instead.
    let warm = sendfile_bytes(&rc) - before;
    let warm_bytes = served as f64;
    assert_eq!(served, 2 * full.len() + (z + 1 - a) + config_len);
    assert!(
        warm >= 0.75 * warm_bytes && warm <= warm_bytes,
        "warm answers sent {warm} of their {warm_bytes} bytes with sendfile"
    );

    // Pages dropped from the page cache: those chunks are read on the blocking pool instead (no
    // sendfile that would wait for the disk on a runtime thread), and the bytes are still exact.
    let file = std::fs::File::open(&stored).expect("open the stored blob");
    file.sync_all().expect("sync");
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    let before = sendfile_bytes(&rc);
    write!(s, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", rc.addr()).expect("send request");
    let r = read_response(&mut s, false, "GET after dropping the page cache");
    assert_eq!(r.status, 200);
    assert!(r.body == full, "body after dropping the page cache differs");
    let after = sendfile_bytes(&rc) - before;
    assert!(
        after < full.len() as f64,
        "with the pages dropped, {after} of {} bytes still went by sendfile",
        full.len()
    );
}

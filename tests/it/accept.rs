//! Manifest content negotiation: what each client `Accept` set gets for a manifest through
//! regcache, compared with what the real upstream (docker-registry 2.8) answers it directly:
//! status, media type and digest, by tag and by digest, cold and warm, and with the upstream
//! stopped. The cases only the in-process fake can show are in `offline::accept`.

use std::io::Read as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::media::{
    DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED as SCHEMA1, OCI_INDEX, OCI_MANIFEST,
};
use crate::support::regcache::{config_for, error_code, Regcache};
use crate::support::registry::{copy_to_dir, parse_raw_response, send_request, Registry};

/// One image of each manifest type, by tag.
const IMAGES: [&str; 4] = [
    "small/oci:latest",
    "small/docker:latest",
    "multi/oci:latest",
    "multi/docker:latest",
];

/// The `Accept` sets clients send, each as a name and its header lines.
fn accept_sets() -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("no Accept header", vec![]),
        ("only Docker schema 2", vec![DOCKER_MANIFEST.into()]),
        (
            "schema 2 + manifest list",
            vec![format!("{DOCKER_MANIFEST}, {DOCKER_LIST}")],
        ),
        ("only OCI manifest", vec![OCI_MANIFEST.into()]),
        (
            "OCI manifest + OCI index",
            vec![format!("{OCI_MANIFEST},{OCI_INDEX}")],
        ),
        (
            "all four, one line each",
            vec![
                OCI_MANIFEST.into(),
                OCI_INDEX.into(),
                DOCKER_MANIFEST.into(),
                DOCKER_LIST.into(),
            ],
        ),
        ("*/*", vec!["*/*".into()]),
        (
            "q-values, even q=0 (distribution ignores them)",
            vec![format!("{DOCKER_MANIFEST};q=0.9, {OCI_INDEX}; q=0")],
        ),
        (
            "schema 1 + schema 2 + list, one line each",
            vec![SCHEMA1.into(), DOCKER_MANIFEST.into(), DOCKER_LIST.into()],
        ),
        (
            "upper case, with a parameter",
            vec![format!(
                "{}; charset=utf-8",
                DOCKER_MANIFEST.to_ascii_uppercase()
            )],
        ),
    ]
}

/// The parts of a manifest answer that must agree between the upstream and regcache.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    /// Content-Type without parameters (only for a 200).
    media_type: Option<String>,
    digest: Option<String>,
    /// The OCI error code (only for an error to a `GET`).
    code: Option<String>,
}

/// `METHOD path` with `accept` as one header line each; the answer and the body.
fn ask(addr: SocketAddr, method: &str, path: &str, accept: &[String]) -> (Answer, Vec<u8>) {
    let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("Accept", a.as_str())).collect();
    let mut stream = send_request(addr, method, path, &headers, b"", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("{method} {path} on {addr}: no connection"));
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"));
    let resp = parse_raw_response(&raw)
        .unwrap_or_else(|| panic!("{method} {path} on {addr}: no HTTP answer"));
    let ok = resp.status == 200;
    let answer = Answer {
        status: resp.status,
        media_type: resp
            .header("content-type")
            .filter(|_| ok)
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_owned()),
        digest: resp
            .header("docker-content-digest")
            .filter(|_| ok)
            .map(str::to_owned),
        code: (!ok && method == "GET" && !resp.body.is_empty()).then(|| error_code(&resp.body)),
    };
    (answer, resp.body)
}

/// `/v2/<repo>/manifests/<reference>` of `repo:tag` or `repo@digest`.
fn manifest_path(image: &str) -> String {
    let (repo, reference) = image
        .split_once('@')
        .or_else(|| image.split_once(':'))
        .unwrap_or_else(|| panic!("{image} has no tag or digest"));
    format!("/v2/{repo}/manifests/{reference}")
}

/// Manifest `GET`s regcache sent the upstream so far (its access log names the user agent).
fn upstream_manifest_gets(upstream: &Registry) -> usize {
    upstream
        .access_log()
        .lines()
        .filter(|l| {
            l.contains("\"GET /v2/") && l.contains("/manifests/") && l.contains("regcache/")
        })
        .count()
}

/// Asks the upstream and regcache the same question (`GET` and `HEAD`) and checks that the
/// answers agree; for a `GET` answered 200, also the body (a schema 1 body is signed anew at each
/// request: only its digest is stable). Returns the upstream's `GET` answer.
fn assert_same_answer(
    upstream: &Registry,
    rc: &Regcache,
    image: &str,
    (set, accept): &(&str, Vec<String>),
    when: &str,
) -> Answer {
    let path = manifest_path(image);
    let (want, want_body) = ask(upstream.addr(), "GET", &path, accept);
    let (got, got_body) = ask(rc.addr(), "GET", &path, accept);
    assert_eq!(
        got, want,
        "{when}: GET {image} with {set}: regcache answered {got:?}, the upstream {want:?}"
    );
    if want.status == 200 && want.media_type.as_deref() != Some(SCHEMA1) {
        assert!(
            got_body == want_body,
            "{when}: GET {image} with {set}: regcache sent other bytes than the upstream"
        );
    }
    let (want_head, _) = ask(upstream.addr(), "HEAD", &path, accept);
    let (got_head, _) = ask(rc.addr(), "HEAD", &path, accept);
    assert_eq!(
        got_head, want_head,
        "{when}: HEAD {image} with {set}: regcache answered {got_head:?}, the upstream \
         {want_head:?}"
    );
    want
}

pub(crate) fn full_accept() -> Vec<String> {
    accept_sets()
        .into_iter()
        .find(|(name, _)| name.starts_with("all four"))
        .expect("the full Accept set")
        .1
}

#[test]
fn every_accept_set_gets_the_upstreams_answer_by_tag_cold_then_warm_without_upstream_gets() {
    let upstream = Registry::start_seeded();
    let rc = Regcache::start(&config_for(&upstream.url(), "freshness = \"1h\"", ""));
    // Cold: no client with the full Accept asked for these tags yet.
    for image in IMAGES {
        for set in &accept_sets() {
            assert_same_answer(&upstream, &rc, image, set, "cold");
        }
    }
    // Warm: a full-Accept pull (docker, containerd, podman, skopeo) cached each tag first.
    let rc = Regcache::start(&config_for(&upstream.url(), "freshness = \"1h\"", ""));
    for image in IMAGES {
        let (a, _) = ask(rc.addr(), "GET", &manifest_path(image), &full_accept());
        assert_eq!(a.status, 200, "full-Accept GET {image} through regcache");
    }
    let mut cacheable = Vec::new();
    for image in IMAGES {
        for set in &accept_sets() {
            let want = assert_same_answer(&upstream, &rc, image, set, "warm");
            if want.status == 200 && want.media_type.as_deref() != Some(SCHEMA1) {
                cacheable.push((image, set.clone()));
            }
        }
    }
    // Asked once more, every answer regcache could store comes from its store.
    for (image, set) in &cacheable {
        let before = upstream_manifest_gets(&upstream);
        let (got, _) = ask(rc.addr(), "GET", &manifest_path(image), &set.1);
        assert_eq!(got.status, 200, "GET {image} with {} once more", set.0);
        assert_eq!(
            upstream_manifest_gets(&upstream),
            before,
            "GET {image} with {}, answered before and still fresh, cost an upstream GET",
            set.0
        );
    }
}

#[test]
fn every_accept_set_gets_the_upstreams_answer_by_digest_cold_then_warm() {
    let upstream = Registry::start_seeded();
    // The digests of each image and of the children of its index or list.
    let mut digests = Vec::new();
    for image in IMAGES {
        let repo = image.split(':').next().expect("repo");
        let (a, body) = ask(
            upstream.addr(),
            "GET",
            &manifest_path(image),
            &full_accept(),
        );
        let digest = a.digest.expect("the upstream names the digest");
        digests.push(format!("{repo}@{digest}"));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
        for child in v["manifests"].as_array().into_iter().flatten() {
            let d = child["digest"].as_str().expect("child digest");
            digests.push(format!("{repo}@{d}"));
        }
    }
    let rc = Regcache::with_upstream(&upstream.url());
    for image in &digests {
        for set in &accept_sets() {
            assert_same_answer(&upstream, &rc, image, set, "cold, by digest");
        }
    }
    let rc = Regcache::with_upstream(&upstream.url());
    for image in &digests {
        let (a, _) = ask(rc.addr(), "GET", &manifest_path(image), &full_accept());
        assert_eq!(a.status, 200, "full-Accept GET {image} through regcache");
    }
    for image in &digests {
        for set in &accept_sets() {
            assert_same_answer(&upstream, &rc, image, set, "warm, by digest");
        }
    }
}

#[test]
fn with_the_upstream_stopped_each_accept_set_gets_the_upstreams_answer_or_503_never_another_type() {
    let mut upstream = Registry::start_seeded();
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    // `asked` saw every Accept set once; `pulled` only full-Accept pulls of every platform.
    let asked = Regcache::with_upstream(&upstream.url());
    let pulled = Regcache::with_upstream(&upstream.url());
    let mut expected = Vec::new();
    for (i, image) in IMAGES.iter().enumerate() {
        let out = copy_to_dir(
            &pulled.host_port(),
            image,
            &work.path().join(i.to_string()),
            true,
        );
        assert!(
            out.status.success(),
            "skopeo copy --all {image} through regcache: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for set in accept_sets() {
            let want = assert_same_answer(&upstream, &asked, image, &set, "upstream up");
            expected.push((*image, set, want));
        }
    }
    upstream.stop();
    for (name, rc) in [("asked every set", &asked), ("full-Accept pulls", &pulled)] {
        for (image, (set, accept), want) in &expected {
            let (got, body) = ask(rc.addr(), "GET", &manifest_path(image), accept);
            if got == *want {
                continue;
            }
            // Only a schema 1 conversion, which needs the upstream's signing key, may fail.
            assert!(
                got.status == 503 && want.media_type.as_deref() == Some(SCHEMA1),
                "upstream stopped, regcache that {name}: GET {image} with {set} answered \
                 {got:?} ({}), the upstream answered {want:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}

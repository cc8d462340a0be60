//! What pulls through regcache cost the upstream, counted in the access log of the real upstream
//! (docker-registry 2.8): cached tags cost no manifest `GET` and at most one `HEAD` per tag per
//! freshness window, however many pulls; a cold multi-platform pull costs one `GET` per manifest
//! the client needed. Docker Hub counts manifest `GET`s against its pull quota (not `HEAD`s), so
//! these are the pulls a quota pays for. The rate-limit headers, `Retry-After` and
//! `quota_reserve` need answers a real registry does not give: `offline::quota`.

use std::time::{Duration, Instant};

use crate::support::media::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::support::regcache::{client, config_for, Regcache};
use crate::support::registry::{
    copy_to_dir, inspect_raw, read_response, send_request, sha256_digest, Registry, Seeded,
};

/// The `Accept` docker sends for a pull: all four manifest types.
fn accept_all() -> String {
    format!("{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}")
}

/// The manifest requests regcache sent the upstream (its user agent names it), as `METHOD
/// path` lines, in order.
fn upstream_manifest_requests(upstream: &Registry) -> Vec<String> {
    upstream
        .access_log()
        .lines()
        .filter(|l| l.contains("/manifests/") && l.contains("regcache/"))
        .filter_map(|l| {
            let request = l.split('"').nth(1)?;
            let mut words = request.split(' ');
            Some(format!("{} {}", words.next()?, words.next()?))
        })
        .collect()
}

/// [`upstream_manifest_requests`] once the access log has stopped growing (the registry writes a
/// line after its answer).
fn settled_requests(upstream: &Registry) -> Vec<String> {
    let mut last = upstream_manifest_requests(upstream);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = upstream_manifest_requests(upstream);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Tags `small/oci:t00` … `t19` on the upstream, each the manifest of `small/oci:latest` (a
/// `PUT` of its bytes: the blobs are in the repository already).
fn push_tags(upstream: &Registry, count: usize) -> Vec<String> {
    let body = inspect_raw(&upstream.host_port(), Seeded::SMALL_OCI);
    (0..count)
        .map(|i| {
            let tag = format!("t{i:02}");
            let target = format!("/v2/small/oci/manifests/{tag}");
            let len = body.len().to_string();
            let mut s = send_request(
                upstream.addr(),
                "PUT",
                &target,
                &[("Content-Type", OCI_MANIFEST), ("Content-Length", &len)],
                &body,
                Duration::from_secs(10),
            )
            .unwrap_or_else(|| panic!("PUT {target}"));
            let r = read_response(&mut s, false, &format!("PUT {target}"));
            assert_eq!(
                r.status,
                201,
                "PUT {target}: {}",
                String::from_utf8_lossy(&r.body)
            );
            tag
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pulls_of_twenty_cached_tags_cost_no_manifest_get_and_one_head_per_tag_per_window(
) {
    const TAGS: usize = 20;
    const PULLS: usize = 1000;
    const ROUNDS: usize = PULLS / TAGS;
    let freshness = Duration::from_secs(1);
    let upstream = Registry::start_seeded();
    let tags = push_tags(&upstream, TAGS);
    let rc = Regcache::start(&config_for(&upstream.url(), "freshness = \"1s\"", ""));
    let c = client();
    let pull = |tag: &str| {
        let url = format!("{}/v2/small/oci/manifests/{tag}", rc.url());
        let req = c.get(url).header("accept", accept_all());
        async move {
            let r = req.send().await.expect("pull");
            assert_eq!(r.status(), 200, "{:?}", r.headers());
            r.bytes().await.expect("manifest body");
        }
    };

    // Cold: each tag's manifest is fetched once.
    let start = Instant::now();
    for t in &tags {
        pull(t).await;
    }
    let cold = settled_requests(&upstream);
    assert_eq!(cold.len(), TAGS, "one GET per tag to cache them: {cold:#?}");
    assert!(cold.iter().all(|r| r.starts_with("GET ")), "{cold:#?}");

    // Warm: 1,000 pulls, round after round over the 20 tags, across several freshness windows.
    for _ in 0..ROUNDS {
        for t in &tags {
            pull(t).await;
        }
        tokio::time::sleep(Duration::from_millis(70)).await;
    }
    let elapsed = start.elapsed();
    let warm: Vec<String> = settled_requests(&upstream).split_off(TAGS);
    let gets: Vec<&String> = warm.iter().filter(|r| r.starts_with("GET ")).collect();
    assert!(
        gets.is_empty(),
        "{PULLS} pulls of cached tags cost manifest GETs: {gets:#?}"
    );
    // A tag is confirmed at most once per window since it was cached.
    let windows = (elapsed.as_secs_f64() / freshness.as_secs_f64()).ceil() as usize;
    for t in &tags {
        let line = format!("HEAD /v2/small/oci/manifests/{t}");
        let heads = warm.iter().filter(|r| **r == line).count();
        assert!(
            heads <= windows,
            "{t}: {heads} HEADs in {elapsed:?}, {windows} windows of {freshness:?}"
        );
        assert!(
            heads >= 2,
            "{t}: {heads} HEADs: the pulls must cross windows ({elapsed:?})"
        );
    }
    assert!(
        warm.iter().all(|r| r.starts_with("HEAD ")),
        "only HEADs: {warm:#?}"
    );
    eprintln!(
        "{PULLS} pulls of {TAGS} cached tags in {elapsed:?} ({windows} windows): {} HEADs, 0 GETs upstream",
        warm.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_multi_platform_pull_costs_one_get_per_manifest_the_client_needed() {
    let upstream = Registry::start_seeded();
    let rc = Regcache::start(&config_for(&upstream.url(), "", ""));
    for image in [Seeded::MULTI_OCI, Seeded::MULTI_DOCKER] {
        let before = settled_requests(&upstream).len();
        let dest = tempfile::tempdir().expect("skopeo destination");
        let host_port = rc.host_port();
        let dir = dest.path().join("image");
        let out = tokio::task::spawn_blocking(move || copy_to_dir(&host_port, image, &dir, false))
            .await
            .expect("skopeo thread");
        assert!(
            out.status.success(),
            "skopeo copy {image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The platform manifest the client took (skopeo's dir: keeps it as manifest.json).
        let child = std::fs::read(dest.path().join("image/manifest.json")).expect("manifest.json");
        let (repo, tag) = image.split_once(':').expect("repo:tag");
        let asked = settled_requests(&upstream).split_off(before);
        assert_eq!(
            asked,
            vec![
                format!("GET /v2/{repo}/manifests/{tag}"),
                format!("GET /v2/{repo}/manifests/{}", sha256_digest(&child)),
            ],
            "{image}: the index (or list) and this platform's manifest, once each"
        );
    }
}

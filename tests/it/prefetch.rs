//! `regcache prefetch` against a real upstream and a running regcache: Dockerfiles, lists,
//! multi-platform images, pins, idempotence, exit codes; then the prefetched images are pulled
//! with the upstream black-holed; its exit 0 means durable (a kill -9 at that instant loses
//! nothing), and on a full store it says which image is not. What needs no real upstream and no
//! root is in `offline::prefetch`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::durability::SmallDisk;
use crate::support::fake::FakeUpstream;
use crate::support::images::pseudo_random;
use crate::support::net::BlackHole;
use crate::support::process::{free_port, Process};
use crate::support::regcache::{config_for, Regcache};
use crate::support::registry::{copy_to_dir, http_get, Registry, Seeded};

/// The `image` of each entry of a `--json` summary.
pub(crate) fn summary_images(summary: &serde_json::Value) -> Vec<&str> {
    summary["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter_map(|i| i["image"].as_str())
        .collect()
}

pub(crate) fn prefetch(server: &str, args: &[&str]) -> Output {
    let mut all = vec!["prefetch", "--server", server];
    all.extend_from_slice(args);
    Process::run_to_end(&all)
}

/// `prefetch ARGS` through `server`, on the blocking pool (the fake upstream runs on this
/// runtime).
async fn prefetch_blocking(server: &str, args: &[&str]) -> std::process::Output {
    let server = server.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        prefetch(&server, &args)
    })
    .await
    .expect("prefetch thread")
}

/// `prefetch ARGS` through `server` when it must exit 1 because an image is not durable (`why`);
/// its `--json` summary and its stderr.
pub(crate) async fn prefetch_not_durable(
    server: &str,
    args: &[&str],
    why: &str,
) -> (serde_json::Value, String) {
    let out = prefetch_blocking(server, args).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{why}: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not a JSON summary ({e}): {stderr}"));
    assert_eq!(summary["ok"], false, "{summary}");
    (summary, stderr)
}

/// Checks that `image` is reported `not_durable` for the blob `digest` alone, for `cause`, in
/// the `--json` summary and on its stderr line.
pub(crate) fn assert_blob_not_durable(
    (summary, stderr): &(serde_json::Value, String),
    image: &str,
    digest: &str,
    cause: &str,
) {
    let entry = summary["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["image"] == image)
        .unwrap_or_else(|| panic!("{image} missing: {summary}"));
    assert_eq!(entry["status"], "not_durable", "{summary}");
    assert_eq!(entry["durable"], false, "{summary}");
    let uncommitted = entry["uncommitted"].as_array().expect("uncommitted");
    assert_eq!(uncommitted.len(), 1, "that blob alone: {summary}");
    assert_eq!(uncommitted[0]["kind"], "blob", "{summary}");
    assert_eq!(uncommitted[0]["digest"], digest, "{summary}");
    assert_eq!(uncommitted[0]["cause"], cause, "{summary}");
    assert!(
        stderr.contains(&format!("NOT DURABLE {image}: blob {digest}")),
        "the line names the image and the blob: {stderr}"
    );
}

/// `prefetch` of the images of `dockerfile` and of the list file `list`, with `extra` arguments.
fn prefetch_files(server: &str, dockerfile: &Path, list: &Path, extra: &[&str]) -> Output {
    let dockerfile = dockerfile.display().to_string();
    let list = list.display().to_string();
    let mut args = vec!["--dockerfile", &dockerfile, "-f", &list];
    args.extend_from_slice(extra);
    prefetch(server, &args)
}

#[test]
fn prefetched_images_are_pulled_with_the_upstream_black_holed_and_a_second_run_moves_nothing() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let mut upstream = Registry::start_seeded();
    let rc = Regcache::start(&config_for(
        &upstream.url(),
        "freshness = \"1s\"\nconnect_timeout = \"2s\"\nheader_timeout = \"2s\"",
        "",
    ));
    let server = rc.url();
    let dockerfile = work.path().join("Dockerfile");
    std::fs::write(
        &dockerfile,
        "# build stage\nARG BASE=small/oci\nARG TAG\nFROM ${BASE}:${TAG:-latest} AS build\n\
         RUN make \\\n    && make install\n\
         FROM --platform=linux/arm64 multi/oci AS runtime\n\
         COPY --from=build /out /out\nCOPY --from=library/busybox:latest /bin/busybox /bin/\n\
         FROM scratch\nFROM runtime\n",
    )
    .expect("Dockerfile");
    let list = work.path().join("images.txt");
    std::fs::write(
        &list,
        "# images the services pull\nsmall/docker:latest\n\nbig/image  # the large one\n",
    )
    .expect("list");

    let out = prefetch_files(&server, &dockerfile, &list, &["--pin", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(summary["ok"], true, "{summary}");
    let images = summary_images(&summary);
    for want in [
        "small/oci:latest",
        "multi/oci:latest",
        "library/busybox:latest",
        "small/docker:latest",
        "big/image:latest",
    ] {
        assert!(images.contains(&want), "{want} missing from {images:?}");
    }
    let multi = summary["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["image"] == "multi/oci:latest")
        .expect("multi");
    assert_eq!(
        multi["platforms"],
        serde_json::json!(["linux/arm64"]),
        "the FROM --platform is honoured: {multi}"
    );
    assert!(
        summary["fetched_bytes"].as_u64().unwrap_or(0) > 100 << 20,
        "{summary}"
    );

    let out = prefetch(&server, &["multi/docker", "--all-platforms", "--pin"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cached  multi/docker:latest"),
        "plain lines when not a terminal"
    );

    // Idempotent: nothing moves the second time.
    let out = prefetch_files(&server, &dockerfile, &list, &["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(again["fetched_bytes"], 0, "{again}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already cached"));

    let pins = http_get(
        rc.addr(),
        "/_regcache/pins",
        &[("x-regcache-operator", "1")],
    )
    .expect("pins");
    let pins = String::from_utf8_lossy(&pins.body);
    assert!(
        pins.contains("big/image:latest") && pins.contains("multi/docker:latest"),
        "{pins}"
    );

    // The outage: every prefetched image still pulls.
    let up_addr = upstream.addr();
    upstream.stop();
    let _hole = BlackHole::start(up_addr);
    std::thread::sleep(Duration::from_millis(1100));
    for (i, (image, all)) in [
        ("small/oci:latest", false),
        ("library/busybox:latest", false),
        ("small/docker:latest", false),
        ("big/image:latest", false),
        ("multi/docker:latest", true),
    ]
    .iter()
    .enumerate()
    {
        let out = copy_to_dir(
            &rc.host_port(),
            image,
            &work.path().join(format!("pull-{i}")),
            *all,
        );
        assert!(
            out.status.success(),
            "{image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = crate::support::registry::skopeo_try(&[
        "copy",
        "--src-tls-verify=false",
        "--override-arch",
        "arm64",
        &format!("docker://{}/multi/oci:latest", rc.host_port()),
        &format!("dir:{}", work.path().join("arm64").display()),
    ]);
    assert!(
        out.status.success(),
        "arm64 of multi/oci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prefetch_exit_codes_bad_references_and_failures() {
    let upstream = Registry::start_seeded();
    let rc = Regcache::with_upstream(&upstream.url());
    let server = rc.url();
    let before = rc.app.metrics.render();
    let out = prefetch(&server, &["small/oci:latest", "Bad/Name"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Bad/Name"));
    let out = prefetch(&server, &["-f", "/nonexistent/list.txt"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/list.txt"));
    let out = prefetch(&server, &["small/oci", "--platform", "linux"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        rc.app
            .metrics
            .render()
            .matches("route=\"manifest\"")
            .count(),
        before.matches("route=\"manifest\"").count(),
        "nothing fetched before a usage error"
    );

    let out = prefetch(&server, &["small/oci:latest", "does/not-exist:1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("does/not-exist:1") && stderr.contains("MANIFEST_UNKNOWN"),
        "{stderr}"
    );
    assert!(stderr.contains("cached  small/oci:latest"), "{stderr}");

    let out = prefetch(&server, &["multi/oci", "--platform", "linux/s390x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("linux/s390x"));

    let out = prefetch(&server, &["--dry-run", "alpine:3.20", "ghcr.io/org/app@sha256:0000000000000000000000000000000000000000000000000000000000000000"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would fetch alpine:3.20") && text.contains("ghcr.io/org/app@sha256:"),
        "{text}"
    );
}

#[test]
fn prefetch_sends_credentials_to_an_htpasswd_protected_regcache() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let upstream = Registry::start_seeded();
    let htpasswd = work.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("ci:{}\n", bcrypt::hash("build-pw", 4).expect("bcrypt")),
    )
    .expect("htpasswd");
    let rc = Regcache::start(&config_for(
        &upstream.url(),
        "",
        &format!(
            "[access]\nhtpasswd = {:?}\n",
            htpasswd.display().to_string()
        ),
    ));
    let out = prefetch(&rc.url(), &["small/oci:latest"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "without credentials the server refuses"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = prefetch(&rc.url(), &["small/oci:latest", "--auth", "ci:build-pw"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = prefetch(&rc.url(), &["small/oci:latest", "--auth", "no-colon"]);
    assert_eq!(out.status.code(), Some(2));
}

/// `prefetch --all-platforms --json [extra] IMAGES` through `server`; its `--json` summary, after
/// checking that it exited 0, and its stderr.
fn prefetch_all_platforms(
    server: &str,
    images: &[&str],
    extra: &[&str],
) -> (serde_json::Value, String) {
    let mut args = vec!["--all-platforms", "--json"];
    args.extend_from_slice(extra);
    args.extend_from_slice(images);
    let out = prefetch(server, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "prefetch: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not a JSON summary ({e}): {stderr}"));
    (summary, stderr)
}

#[test]
fn images_prefetched_survive_a_kill9_the_instant_prefetch_exits_and_pull_with_the_upstream_refusing(
) {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let mut upstream = Registry::start_seeded();
    let config = work.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[upstreams.docker]\nurl = \"{}\"\nconnect_timeout = \"2s\"\nheader_timeout = \"2s\"\n",
            work.path().join("data").display().to_string(),
            upstream.url()
        ),
    )
    .expect("write config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut rc = Process::start(&config, addr, &work.path().join("regcache.log"));

    // `prefetch` of the largest image (a 110 MiB layer) runs as a child process to its end; the
    // server is killed the instant it exits.
    let (summary, stderr) =
        prefetch_all_platforms(&format!("http://{addr}"), &[Seeded::BIG], &["--pin"]);
    rc.kill9();
    assert_eq!(summary["ok"], true, "{summary}\n{stderr}");

    upstream.stop(); // nothing listens on its port any more: connections are refused
    rc.restart();
    let images = summary["images"].as_array().expect("images");
    assert_eq!(images.len(), 1, "{summary}");
    for (i, image) in images.iter().enumerate() {
        let by_tag = image["image"].as_str().expect("image").to_owned();
        let repo = by_tag.split(':').next().expect("repo:tag");
        let digest = image["digest"].as_str().expect("digest");
        let by_digest = format!("{repo}@{digest}");
        // An index is pulled with every platform, as it was prefetched.
        let all = !image["platforms"].as_array().expect("platforms").is_empty();
        for (j, reference) in [&by_tag, &by_digest].into_iter().enumerate() {
            let out = copy_to_dir(
                &addr.to_string(),
                reference,
                &work.path().join(format!("pull-{i}-{j}")),
                all,
            );
            assert!(
                out.status.success(),
                "{reference} was prefetched (exit 0) but does not pull after a kill -9 at that \
                 instant: {}\n--- regcache log ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                rc.log_text()
            );
        }
    }
    let pins = http_get(addr, "/_regcache/pins", &[("x-regcache-operator", "1")]).expect("pins");
    let pins = String::from_utf8_lossy(&pins.body);
    assert!(
        pins.contains(Seeded::BIG),
        "the pin of {} did not survive the kill -9: {pins}",
        Seeded::BIG
    );
}

#[test]
fn a_second_prefetch_right_after_the_first_finds_every_image_cached_and_gets_no_blob_upstream() {
    let upstream = Registry::start_seeded();
    let rc = Regcache::with_upstream(&upstream.url());
    let blob_gets = || -> Vec<String> {
        upstream
            .access_log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/"))
            .map(str::to_owned)
            .collect()
    };
    // The largest image, an OCI index (every platform) and a Docker schema 2 image.
    let images = [Seeded::BIG, Seeded::MULTI_OCI, Seeded::SMALL_DOCKER];
    let (first, _) = prefetch_all_platforms(&rc.url(), &images, &[]);
    assert_eq!(first["ok"], true, "{first}");
    let before = blob_gets();
    let (again, stderr) = prefetch_all_platforms(&rc.url(), &images, &[]);
    let moved: Vec<&serde_json::Value> = again["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter(|i| i["already_cached"] != true)
        .collect();
    assert!(
        moved.is_empty(),
        "the first run had committed everything, yet the second moved these again: {moved:?}"
    );
    assert_eq!(again["fetched_bytes"], 0, "{again}");
    assert!(
        stderr.contains("all 3 images were already cached"),
        "{stderr}"
    );
    let after = blob_gets();
    assert_eq!(
        after.len(),
        before.len(),
        "the second run made the server fetch blobs from the upstream: {:?}",
        &after[before.len().min(after.len())..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_store_prefetch_exits_1_naming_the_image_served_without_caching() {
    let fake = FakeUpstream::start().await;
    let (_, small_layer) = fake.add_image("team/small", "1.0", pseudo_random(64 << 10, 22));
    let (_, big_layer) = fake.add_image("team/big", "1.0", pseudo_random(16 << 20, 21));
    let disk = SmallDisk::mount("6m");
    let rc = Regcache::start_in(disk.path(), &config_for(&fake.url(), "", ""));

    // What fits is stored: the small image first, alone, so that the big one cannot fill the
    // disk while the small one's layer is still being written.
    let out = prefetch_blocking(&rc.url(), &["--json", "team/small:1.0"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "what fits is stored: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let small = &summary["images"][0];
    assert_eq!(small["status"], "cached", "what fits is stored: {summary}");
    assert_eq!(small["durable"], true, "{summary}");

    let reported = prefetch_not_durable(
        &rc.url(),
        &["--json", "team/small:1.0", "team/big:1.0"],
        "a layer served without caching is not prefetched",
    )
    .await;
    assert_blob_not_durable(&reported, "team/big:1.0", &big_layer, "store_full");
    let (summary, stderr) = &reported;
    assert!(stderr.contains("store is full"), "{stderr}");
    let small = &summary["images"][0];
    assert_eq!(small["status"], "cached", "what was stored stays: {summary}");
    assert_eq!(small["durable"], true, "{summary}");
    assert_eq!(fake.blob_gets(&small_layer), 1);
    assert_eq!(
        fake.blob_gets(&big_layer),
        1,
        "confirming the commit must not make the server fetch the layer again"
    );
}

#[test]
fn blobs_a_server_redirects_to_its_shared_bucket_count_as_stored_there() {
    let upstream = Registry::start_seeded();
    let moto = crate::bucket::Store::start(crate::bucket::Engine::Moto);
    let config = |extra: &str| {
        config_for(
            &upstream.url(),
            "freshness = \"10m\"",
            &crate::bucket::s3_table(&moto, None, extra),
        )
    };
    let a = Regcache::start(&config(""));
    let b = Regcache::start(&config("redirect = true"));
    let (filled, _) = prefetch_all_platforms(&a.url(), &[Seeded::SMALL_OCI], &[]);
    assert_eq!(filled["ok"], true, "{filled}");
    // A uploads what it committed to the bucket in the background.
    let manifest: serde_json::Value = serde_json::from_slice(
        &crate::support::registry::inspect_raw(&upstream.host_port(), Seeded::SMALL_OCI),
    )
    .expect("manifest JSON");
    let blobs: Vec<String> = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().expect("layers"))
        .map(|d| d["digest"].as_str().expect("digest").to_owned())
        .collect();
    let uploaded = std::time::Instant::now();
    loop {
        let keys: Vec<String> = moto
            .list(crate::bucket::BUCKET, "blobs/")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let missing: Vec<&String> = blobs
            .iter()
            .filter(|d| {
                !keys
                    .iter()
                    .any(|k| k.ends_with(d.trim_start_matches("sha256:")))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            uploaded.elapsed() < Duration::from_secs(30),
            "A never uploaded {missing:?}; the bucket holds {keys:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // B sends the prefetcher to the bucket for the blobs, and stores none of them itself.
    let (summary, stderr) = prefetch_all_platforms(&b.url(), &[Seeded::SMALL_OCI], &[]);
    assert_eq!(
        summary["images"][0]["status"], "cached",
        "{summary}\n{stderr}"
    );
    assert_eq!(summary["images"][0]["durable"], true, "{summary}");
    for d in &blobs {
        assert!(
            !crate::support::regcache::stored(&b, d),
            "B stored {d}: its blobs were not redirected to the bucket"
        );
    }
}

//! `regcache prefetch` against a real upstream and a running regcache: Dockerfiles, lists,
//! multi-platform images, pins, idempotence, exit codes; then the prefetched images are pulled
//! with the upstream black-holed. What needs no real upstream is in `offline::prefetch`.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use crate::support::net::BlackHole;
use crate::support::process::Process;
use crate::support::regcache::{config_for, Regcache};
use crate::support::registry::{copy_to_dir, http_get, Registry};

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

//! `regcache prefetch` against the in-process fake upstream and without a server: one image
//! spelled five ways, a blob whose commit fails, the Dockerfile corpus (`--dry-run`), the JSON
//! error object.

use std::path::Path;

use crate::prefetch::{assert_blob_not_durable, prefetch, prefetch_not_durable, summary_images};
use crate::support::regcache::Regcache;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetches_an_image_once_however_its_reference_is_spelled() {
    let fake = crate::support::fake::FakeUpstream::start().await;
    let layer = bytes::Bytes::from(vec![5u8; 1 << 20]);
    let (manifest, layer_digest) = fake.add_image("library/busybox", "1.36", layer);
    let rc = Regcache::with_upstream(&fake.url());
    let server = rc.url();
    let spellings = [
        "busybox:1.36".to_owned(),
        "docker.io/library/busybox:1.36".to_owned(),
        "index.docker.io/busybox:1.36".to_owned(),
        format!("busybox:1.36@{manifest}"),
        format!("docker.io/library/busybox@{manifest}"),
    ];
    let mut args: Vec<&str> = vec!["--json"];
    args.extend(spellings.iter().map(String::as_str));
    let out = tokio::task::spawn_blocking({
        let (server, args): (String, Vec<String>) =
            (server.clone(), args.iter().map(|a| a.to_string()).collect());
        move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            prefetch(&server, &args)
        }
    })
    .await
    .expect("prefetch thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let images = summary_images(&summary);
    assert_eq!(
        images,
        vec!["busybox:1.36", spellings[3].as_str()],
        "one entry per image, named by its first spelling: {summary}"
    );
    // The layer and the config blob, each counted once.
    let image_bytes = summary["images"][0]["bytes"].as_u64().expect("bytes");
    assert!(image_bytes > 1 << 20, "{summary}");
    assert_eq!(
        summary["fetched_bytes"].as_u64(),
        Some(image_bytes),
        "each blob crosses to the prefetcher once: {summary}"
    );
    assert_eq!(
        fake.blob_gets(&layer_digest),
        1,
        "the upstream sent the layer once"
    );
    // Bodies regcache sent: each blob once, whatever the number of spellings (the HEADs that
    // confirm their commits move none), and the manifest by tag and by digest.
    let manifest_len = crate::support::regcache::client()
        .get(format!(
            "{}/v2/library/busybox/manifests/{manifest}",
            fake.url()
        ))
        .send()
        .await
        .expect("manifest from the fake")
        .bytes()
        .await
        .expect("manifest body")
        .len() as u64;
    let served =
        crate::support::process::metric(&rc.app.metrics.render(), "regcache_served_bytes_total");
    assert_eq!(
        served,
        Some((image_bytes + 2 * manifest_len) as f64),
        "body bytes regcache served: the blobs once, the manifest twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_whose_commit_fails_makes_prefetch_exit_1_naming_the_image_without_refetching_it() {
    let fake = crate::support::fake::FakeUpstream::start().await;
    let layer = crate::support::images::pseudo_random(2 << 20, 20);
    let (manifest, layer_digest) = fake.add_image("team/app", "1.0", layer);
    let rc = Regcache::with_upstream(&fake.url());
    // A file where the layer's directory goes: the server streams and verifies the layer, then
    // its commit (the rename into blobs/sha256/<xx>/) fails.
    let hex = layer_digest.trim_start_matches("sha256:");
    assert!(
        !manifest.starts_with(&format!("sha256:{}", &hex[..2])),
        "the manifest must be stored: pick other layer bytes"
    );
    let blocker = rc.data_dir().join("blobs/sha256").join(&hex[..2]);
    std::fs::create_dir_all(blocker.parent().expect("parent")).expect("blobs/sha256");
    std::fs::write(&blocker, b"not a directory").expect("blocking file");

    let reported = prefetch_not_durable(
        &rc.url(),
        &["--json", "team/app:1.0"],
        "a blob the server did not commit is not prefetched",
    )
    .await;
    assert_blob_not_durable(&reported, "team/app:1.0", &layer_digest, "not_stored");
    assert_eq!(
        fake.blob_gets(&layer_digest),
        1,
        "confirming the commit must not make the server fetch the layer again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_head_only_if_cached_is_answered_from_the_store_alone() {
    let fake = crate::support::fake::FakeUpstream::start().await;
    let layer = crate::support::images::pseudo_random(256 << 10, 23);
    let (_, layer_digest) = fake.add_image("team/app", "1.0", layer);
    let rc = Regcache::with_upstream(&fake.url());
    let c = crate::support::regcache::client();
    let url = format!("{}/v2/team/app/blobs/{layer_digest}", rc.url());
    let head = || {
        c.head(&url)
            .header("cache-control", "max-age=0, only-if-cached")
            .send()
    };

    let before = head().await.expect("HEAD");
    assert_eq!(before.status(), 504, "not stored: {:?}", before.headers());
    assert_eq!(
        fake.request_count(),
        0,
        "only-if-cached neither asks the upstream nor starts a fill: {:?}",
        fake.requests()
    );
    let body = c
        .get(&url)
        .send()
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("body");
    assert_eq!(body.len(), 256 << 10);
    // The body's last byte comes before the commit: `coalesced` until it is recorded.
    let mut answers = Vec::new();
    let after = loop {
        let r = head().await.expect("HEAD");
        let outcome = r.headers()[regcache::http::CACHE_HEADER]
            .to_str()
            .expect("outcome")
            .to_owned();
        answers.push((r.status(), outcome.clone()));
        if outcome != "coalesced" {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(after.status(), 200, "{answers:?}");
    assert_eq!(
        after.headers()[regcache::http::CACHE_HEADER],
        "hit",
        "{answers:?}"
    );
    assert_eq!(
        after.headers()["content-length"],
        (256 << 10).to_string().as_str()
    );
    assert_eq!(fake.blob_gets(&layer_digest), 1);
}

/// The Dockerfiles of `tests/fixtures/dockerfiles`, each with the exact images it must yield.
fn dockerfile_corpus() -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dockerfiles");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("the Dockerfile corpus")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "Dockerfile"))
        .map(|p| {
            let expected = p.with_extension("images");
            (p, expected)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5, "corpus: {out:?}");
    out
}

/// `image platform,platform` lines, platforms sorted, lines sorted.
fn normalised(lines: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = lines
        .into_iter()
        .map(|l| {
            let (image, platforms) = l.split_once(' ').unwrap_or((&l, ""));
            let mut p: Vec<&str> = platforms
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect();
            p.sort();
            p.dedup();
            format!("{image} {}", p.join(","))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn dockerfile_corpus_yields_exactly_the_expected_images() {
    let build = regcache::cmd::prefetch::Platform::host().to_string();
    let mut failures = Vec::new();
    for (dockerfile, expected) in dockerfile_corpus() {
        let text = std::fs::read_to_string(&expected)
            .unwrap_or_else(|e| panic!("{}: {e}", expected.display()));
        let mut args: Vec<String> = vec![
            "--dry-run".into(),
            "--json".into(),
            "--dockerfile".into(),
            dockerfile.display().to_string(),
        ];
        let mut want = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match line.strip_prefix("# prefetch:") {
                Some(extra) => args.extend(extra.split_whitespace().map(str::to_owned)),
                None => want.push(line.replace("{build}", &build)),
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = prefetch("http://127.0.0.1:9", &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.code() != Some(0) {
            failures.push(format!(
                "{}: exit {:?}: {}",
                dockerfile.display(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
            continue;
        }
        let got: Vec<String> = stdout
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", dockerfile.display()));
                format!(
                    "{} {}",
                    v["image"].as_str().unwrap_or("?"),
                    v["platforms"].as_str().unwrap_or("?").replace(' ', "")
                )
            })
            .collect();
        let (got, want) = (normalised(got), normalised(want));
        if got != want {
            failures.push(format!(
                "{}:\n  expected {want:#?}\n  got      {got:#?}",
                dockerfile.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn prefetch_json_usage_errors_print_a_json_error_object() {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let dockerfile = dir.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM alpine\nRUN <<EOF\nnever ends\n").expect("Dockerfile");
    let path = dockerfile.display().to_string();
    for (args, what) in [
        (vec!["--json", "Bad/Name"], "Bad/Name"),
        (vec!["--json", "--dockerfile", &path], "heredoc"),
        (vec!["--json", "--dry-run", "--platform", "linux"], "linux"),
        (
            vec!["--json", "alpine", "--concurrency", "0"],
            "concurrency",
        ),
        (vec!["--json", "alpine", "--no-such-flag"], "--no-such-flag"),
    ] {
        let out = prefetch("http://127.0.0.1:9", &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!("{args:?}: stdout is not one JSON object ({e}): {stdout:?}")
        });
        assert_eq!(v["ok"], false, "{args:?}: {v}");
        assert_eq!(v["exit_code"], 2, "{args:?}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(what)),
            "{args:?}: the error names {what:?}: {v}"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(what),
            "{args:?}: stderr too"
        );
    }
}

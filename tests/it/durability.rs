//! Durability and the storage lifecycle: kill -9 at random moments, verify, disk full, size cap
//! with eviction, pins, gc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::support::fake::FakeUpstream;
use crate::support::process::{free_port, Process};
use crate::support::regcache::{client, config_for, Regcache};
use crate::support::registry::{copy_to_dir, http_get, inspect_raw, Registry, Seeded};

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Every blob digest of an image (config and layers) and its manifest digest.
fn image_digests(host_port: &str, image: &str) -> (String, Vec<String>) {
    let raw = inspect_raw(host_port, image);
    let m: serde_json::Value = serde_json::from_slice(&raw).expect("manifest JSON");
    let mut blobs = vec![m["config"]["digest"].as_str().expect("config").to_owned()];
    for l in m["layers"].as_array().expect("layers") {
        blobs.push(l["digest"].as_str().expect("layer digest").to_owned());
    }
    (sha256(&raw), blobs)
}

/// GETs a blob and checks the outcome: complete correct bytes, or a clean error. Returns whether
/// the bytes came.
fn blob_is_correct_or_clean_error(addr: SocketAddr, repo: &str, digest: &str) -> bool {
    match http_get(addr, &format!("/v2/{repo}/blobs/{digest}"), &[]) {
        None => false, // connection cut: a clean error for a client (short read)
        Some(r) if r.status == 200 => {
            let expected: usize = r
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .expect("200 without Content-Length");
            if r.body.len() < expected {
                return false; // short body: the client sees an incomplete response
            }
            assert_eq!(
                sha256(&r.body),
                digest,
                "a complete 200 body with wrong bytes"
            );
            true
        }
        Some(r) => {
            assert!(r.status >= 400, "unexpected status {}", r.status);
            let v: serde_json::Value = serde_json::from_slice(&r.body).expect("OCI error JSON");
            assert!(
                v["errors"][0]["code"].is_string(),
                "error without an OCI code: {v}"
            );
            false
        }
    }
}

fn write_config(path: &Path, data: &Path, upstream: &str, store: &str) {
    std::fs::write(
        path,
        format!(
            "data_dir = \"{}\"\n[upstreams.docker]\nurl = \"{upstream}\"\n[store]\n{store}\n",
            data.display()
        ),
    )
    .expect("write config");
}

/// A work directory, a seeded upstream registry, and in the work directory regcache's data
/// directory and config file (written with `store`), plus a free address for regcache:
/// `(work, upstream, data, config, addr)`.
fn seeded_setup(store: &str) -> (tempfile::TempDir, Registry, PathBuf, PathBuf, SocketAddr) {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let upstream = Registry::start_seeded();
    let data = work.path().join("data");
    let config = work.path().join("rc.toml");
    write_config(&config, &data, &upstream.url(), store);
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    (work, upstream, data, config, addr)
}

/// Where the store under `root` keeps the blob `digest`.
fn blob_file(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    root.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// The command exited successfully, else its stderr is the message.
fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn verify_offline(config: &Path) -> std::process::Output {
    Process::run_to_end(&["verify", "--config", &config.display().to_string()])
}

#[test]
fn kill9_at_random_moments_never_serves_wrong_bytes_and_verify_finds_the_store_consistent() {
    // A cap below the big image's size makes eviction part of the mix.
    let (work, upstream, _data, config, addr) =
        seeded_setup("max_size = \"100MiB\"\ngc_interval = \"100ms\"");
    let mut rc = Process::start(&config, addr, &work.path().join("rc.log"));
    let (_, small_blobs) = image_digests(&upstream.host_port(), Seeded::SMALL_OCI);
    let (_, big_blobs) = image_digests(&upstream.host_port(), Seeded::BIG);

    // A deterministic sequence of kill moments between 20 ms and 1.5 s.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut served = 0;
    for round in 0..24 {
        let dest = work.path().join(format!("pull-{round}"));
        let image = if round % 2 == 0 {
            Seeded::BIG
        } else {
            Seeded::MULTI_OCI
        };
        let host = addr.to_string();
        let puller = std::thread::spawn(move || copy_to_dir(&host, image, &dest, true));
        std::thread::sleep(Duration::from_millis(20 + next() % 1500));
        rc.kill9();
        let _ = puller.join();
        rc.restart();
        for d in &small_blobs {
            served += usize::from(blob_is_correct_or_clean_error(addr, "small/oci", d));
        }
        if round % 6 == 5 {
            for d in &big_blobs {
                served += usize::from(blob_is_correct_or_clean_error(addr, "big/image", d));
            }
        }
    }
    assert!(served > 0, "no blob was ever served completely");

    // The recovery at start restored the invariants: online and offline checks agree.
    std::thread::sleep(Duration::from_millis(500));
    let online = Process::run_to_end(&["verify", "--server", &format!("http://{addr}")]);
    assert_eq!(
        online.status.code(),
        Some(0),
        "online verify: {}{}",
        String::from_utf8_lossy(&online.stdout),
        String::from_utf8_lossy(&online.stderr)
    );
    rc.signal("TERM");
    assert_eq!(
        rc.wait_exit(Duration::from_secs(20)),
        Some(0),
        "SIGTERM exits 0"
    );
    let offline = verify_offline(&config);
    assert_eq!(
        offline.status.code(),
        Some(0),
        "offline verify: {}{}",
        String::from_utf8_lossy(&offline.stdout),
        String::from_utf8_lossy(&offline.stderr)
    );
}

#[test]
fn verify_reports_corruption_and_repair_makes_it_fetched_again() {
    let (work, upstream, data, config, addr) = seeded_setup("");
    let mut rc = Process::start(&config, addr, &work.path().join("rc.log"));
    let out = copy_to_dir(
        &addr.to_string(),
        Seeded::SMALL_OCI,
        &work.path().join("p"),
        false,
    );
    assert_success(&out);
    let (_, blobs) = image_digests(&upstream.host_port(), Seeded::SMALL_OCI);
    rc.kill9();

    let layer = blobs.last().expect("a layer").clone();
    let path = blob_file(&data, &layer);
    let mut bytes = std::fs::read(&path).expect("stored layer");
    bytes[10] ^= 0xff;
    std::fs::write(&path, &bytes).expect("corrupt the layer");

    let found = verify_offline(&config);
    let stdout = String::from_utf8_lossy(&found.stdout);
    assert_eq!(
        found.status.code(),
        Some(3),
        "verify must exit 3 on problems: {stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("digest\t") && l.contains(&layer)),
        "{stdout}"
    );

    let repaired = Process::run_to_end(&[
        "verify",
        "--repair",
        "--config",
        &config.display().to_string(),
    ]);
    assert_eq!(
        repaired.status.code(),
        Some(3),
        "the repair run still reports what it fixed"
    );
    assert!(!path.exists(), "the corrupt file is removed");
    let clean = verify_offline(&config);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );

    rc.restart();
    assert!(
        blob_is_correct_or_clean_error(addr, "small/oci", &layer),
        "fetched again"
    );
}

/// A size-limited tmpfs mounted for one test, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("mount point");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount (the disk-full test needs root)");
        assert!(
            st.success(),
            "mount -t tmpfs failed: the disk-full test needs root"
        );
        SmallDisk { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn grow(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .expect("remount");
        assert!(st.success(), "remount failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_streams_through_without_caching_and_caching_resumes_with_space() {
    let upstream = Registry::start_seeded();
    let disk = SmallDisk::mount("40m");
    let rc = Regcache::start_in(disk.path(), &config_for(&upstream.url(), "", ""));
    let c = client();
    let (small_manifest, small_blobs) = image_digests(&upstream.host_port(), Seeded::SMALL_OCI);
    for d in &small_blobs {
        let r = c
            .get(format!("{}/v2/small/oci/blobs/{d}", rc.url()))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.expect("body")), *d);
    }
    let r = c
        .get(format!(
            "{}/v2/small/oci/manifests/{small_manifest}",
            rc.url()
        ))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(r.status(), 200);

    let (_, big_blobs) = image_digests(&upstream.host_port(), Seeded::BIG);
    let big = big_blobs
        .iter()
        .max_by_key(|d| d.len())
        .expect("layer")
        .clone();
    let big = big_blobs
        .iter()
        .find(|d| **d != big_blobs[0] && !small_blobs.contains(d))
        .cloned()
        .unwrap_or(big);
    let r = c
        .get(format!("{}/v2/big/image/blobs/{big}", rc.url()))
        .send()
        .await
        .expect("GET big");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("the client still gets every byte");
    assert!(body.len() > 100 << 20, "big layer is {} bytes", body.len());
    assert_eq!(
        sha256(&body),
        big,
        "bytes streamed through a full disk are correct"
    );

    let ready = c
        .get(format!("{}/readyz", rc.url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "a full store still serves: ready");
    let ready: serde_json::Value =
        serde_json::from_slice(&ready.bytes().await.expect("body")).expect("JSON");
    assert_eq!(ready["store_full"], true, "{ready}");
    let m = rc.app.metrics.render();
    assert!(m.contains("regcache_store_full 1"), "{m}");
    let big_file = blob_file(disk.path(), &big);
    assert!(!big_file.exists(), "nothing partial committed");
    assert!(
        std::fs::read_dir(disk.path().join("tmp"))
            .expect("tmp")
            .next()
            .is_none(),
        "no temp file left"
    );
    // Existing content keeps being served.
    for d in &small_blobs {
        let r = c
            .get(format!("{}/v2/small/oci/blobs/{d}", rc.url()))
            .send()
            .await
            .expect("GET");
        assert_eq!(sha256(&r.bytes().await.expect("body")), *d);
    }

    disk.grow("400m");
    let r = c
        .get(format!("{}/v2/big/image/blobs/{big}", rc.url()))
        .send()
        .await
        .expect("GET big again");
    assert_eq!(sha256(&r.bytes().await.expect("body")), big);
    let t = Instant::now();
    while !big_file.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "caching did not resume with space"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !rc.app.cache.store.is_full(),
        "the full flag clears once a commit succeeds"
    );
}

/// The body of `GET /v2/app/img{i}/blobs/{layer}` on `rc` (`what` names the request).
async fn get_img_blob(
    c: &reqwest::Client,
    rc: &Regcache,
    i: usize,
    layer: &str,
    what: &str,
) -> Bytes {
    c.get(format!("{}/v2/app/img{i}/blobs/{layer}", rc.url()))
        .send()
        .await
        .expect(what)
        .bytes()
        .await
        .expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_cap_evicts_least_recently_used_images_but_never_pinned_ones() {
    let fake = FakeUpstream::start().await;
    let mut images = Vec::new();
    for i in 0..4u8 {
        let layer = Bytes::from(vec![i; 8 << 20]);
        images.push(fake.add_image(&format!("app/img{i}"), "v1", layer));
    }
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "",
        "[store]\nmax_size = \"20MiB\"\nlow_water = 90\ngc_interval = \"100ms\"",
    ));
    let c = client();
    let r = c
        .post(format!("{}/_regcache/pins?image=app/img0:v1", rc.url()))
        .header("x-regcache-operator", "1")
        .send()
        .await
        .expect("pin");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    for (i, (_, layer)) in images.iter().enumerate() {
        let r = c
            .get(format!("{}/v2/app/img{i}/manifests/v1", rc.url()))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("manifest");
        assert_eq!(r.status(), 200);
        let body = get_img_blob(&c, &rc, i, layer, "blob").await;
        assert_eq!(body.len(), 8 << 20);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let t = Instant::now();
    while rc.app.cache.store.used_bytes() > 20 << 20 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still {} bytes",
            rc.app.cache.store.used_bytes()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = rc.app.metrics.render();
    assert!(!m.contains("regcache_evicted_bytes_total 0\n"), "{m}");
    // The pinned image is whole; the oldest unpinned one (img1) was evicted with its tag.
    let before = fake.blob_gets(&images[0].1);
    let body = get_img_blob(&c, &rc, 0, &images[0].1, "pinned blob").await;
    assert_eq!(body.len(), 8 << 20);
    assert_eq!(
        fake.blob_gets(&images[0].1),
        before,
        "the pinned image was served from the cache"
    );
    let before = fake.blob_gets(&images[1].1);
    let body = get_img_blob(&c, &rc, 1, &images[1].1, "evicted blob").await;
    assert_eq!(body.len(), 8 << 20);
    assert_eq!(
        fake.blob_gets(&images[1].1),
        before + 1,
        "the evicted image is fetched again"
    );
    let pins = c
        .get(format!("{}/_regcache/pins", rc.url()))
        .header("x-regcache-operator", "1")
        .send()
        .await
        .expect("pins");
    let pins = pins.text().await.expect("pins body");
    assert!(pins.contains("app/img0:v1"), "{pins}");
}

#[test]
fn gc_and_pin_commands_work_offline_and_against_a_running_server() {
    let (work, _upstream, _data, config, addr) = seeded_setup("");
    let cfg = config.display().to_string();
    let listen = addr.to_string();
    let mut rc = Process::start(&config, addr, &work.path().join("rc.log"));
    for (i, image) in [Seeded::SMALL_OCI, Seeded::MULTI_DOCKER].iter().enumerate() {
        let out = copy_to_dir(&listen, image, &work.path().join(format!("p{i}")), true);
        assert_success(&out);
    }
    // Against the running server (it holds the data directory).
    let out = Process::run_to_end(&[
        "pin",
        "add",
        "small/oci:latest",
        "--config",
        &cfg,
        "--listen",
        &listen,
    ]);
    assert_success(&out);
    let out = Process::run_to_end(&["pin", "list", "--config", &cfg, "--listen", &listen]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("small/oci:latest"),
        "{out:?}"
    );
    let out = Process::run_to_end(&[
        "gc",
        "--config",
        &cfg,
        "--listen",
        &listen,
        "--max-size",
        "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("freed "),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rc.kill9();

    // Offline, on the data directory.
    let out = Process::run_to_end(&["pin", "list", "--config", &cfg]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("small/oci:latest"),
        "{out:?}"
    );
    let out = Process::run_to_end(&["pin", "rm", "small/oci:latest", "--config", &cfg]);
    assert_success(&out);
    let out = Process::run_to_end(&["gc", "--config", &cfg, "--max-size", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("the store now holds 0 B"),
        "{text}"
    );
    let out = verify_offline(&config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

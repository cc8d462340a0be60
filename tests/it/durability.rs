//! Durability and the storage lifecycle: kill -9 at random moments, verify, disk full (a tmpfs
//! mount, so root), gc and pins offline. The size cap's eviction is in `offline::durability`.

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
pub(crate) fn blob_file(root: &Path, digest: &str) -> PathBuf {
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
pub(crate) struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    pub(crate) fn mount(size: &str) -> SmallDisk {
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
    pub(crate) fn path(&self) -> &Path {
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

// ---- disk full: memory and space held by fills -------------------------------------------------

/// What one slow client saw: status, bytes received, where they first differed from the blob,
/// and the error that ended the body, if any.
struct SlowRead {
    status: u16,
    len: usize,
    mismatch_at: Option<usize>,
    error: Option<String>,
}

/// GETs `url` and reads the body at about `rate` bytes per second, comparing it with `want` as
/// it comes; `progress` counts the bytes received so far.
async fn read_slowly(
    url: String,
    want: Bytes,
    rate: u64,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> SlowRead {
    let mut resp = client().get(&url).send().await.expect("GET");
    let status = resp.status().as_u16();
    let (mut len, mut mismatch_at, mut error) = (0usize, None, None);
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let end = len + c.len();
                if mismatch_at.is_none() && (end > want.len() || want[len..end] != c[..]) {
                    mismatch_at = Some(len);
                }
                len = end;
                progress.store(len, std::sync::atomic::Ordering::SeqCst);
                let pause = Duration::from_secs_f64(c.len() as f64 / rate as f64);
                tokio::time::sleep(pause).await;
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(format!("{e:?}"));
                break;
            }
        }
    }
    SlowRead {
        status,
        len,
        mismatch_at,
        error,
    }
}

/// `VmHWM` (peak resident set) and `VmRSS` of process `pid`, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_fills_share_one_memory_budget_and_slow_clients_get_every_byte() {
    const SIZE: usize = 128 << 20;
    const BUDGET: u64 = 32 << 20;
    const CLIENTS: usize = 4;
    // What regcache holds besides the fills' memory, over what it held at start (buffers on their
    // way to clients and to the hash, the allocator's slack): a fixed margin.
    const MARGIN: u64 = 64 << 20;
    let disk = SmallDisk::mount("24m");
    let fake = FakeUpstream::start().await;
    let data = crate::support::images::pseudo_random(SIZE, 93);
    let digest = fake.add_blob("app/huge", data.clone());
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = work.path().join("rc.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[limits]\nfill_memory = \"{BUDGET}\"\n[upstreams.docker]\nurl = \
             \"{}\"\n",
            disk.path().join("d").display(),
            fake.url()
        ),
    )
    .expect("config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let rc =
        tokio::task::block_in_place(|| Process::start(&config, addr, &work.path().join("log")));
    let (start_hwm, _) = memory_of(rc.pid());
    let url = format!("http://{addr}/v2/app/huge/blobs/{digest}");

    // Slow clients, each starting once the one before has 16 MiB: every one of them finds the
    // disk full and the fills before it holding memory.
    let mut clients = Vec::new();
    let mut peak_rss = 0;
    for i in 0..CLIENTS {
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        clients.push(tokio::spawn(read_slowly(
            url.clone(),
            data.clone(),
            24 << 20,
            std::sync::Arc::clone(&progress),
        )));
        if i + 1 < CLIENTS {
            while progress.load(std::sync::atomic::Ordering::SeqCst) < 16 << 20 {
                peak_rss = peak_rss.max(memory_of(rc.pid()).1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    while !clients.iter().all(|c| c.is_finished()) {
        peak_rss = peak_rss.max(memory_of(rc.pid()).1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (hwm, _) = memory_of(rc.pid());
    eprintln!(
        "regcache: peak RSS {} MiB (sampled {} MiB, {} MiB at start)",
        hwm >> 20,
        peak_rss >> 20,
        start_hwm >> 20
    );
    for (i, c) in clients.into_iter().enumerate() {
        let r = c.await.expect("client task");
        assert!(
            r.status == 200 && r.len == SIZE && r.mismatch_at.is_none() && r.error.is_none(),
            "client {i}: status {}, {} of {SIZE} bytes, first wrong byte at {:?}, error {:?}\n{}",
            r.status,
            r.len,
            r.mismatch_at,
            r.error,
            rc.log_text()
        );
    }
    assert!(
        hwm <= start_hwm + BUDGET + MARGIN,
        "regcache's peak RSS was {} MiB (sampled peak {} MiB, {} MiB at start) with a {} MiB \
         fill_memory budget and {CLIENTS} slow clients of a {} MiB blob on a full disk",
        hwm >> 20,
        peak_rss >> 20,
        start_hwm >> 20,
        BUDGET >> 20,
        SIZE >> 20
    );
    drop(rc);
    drop(disk);
}

/// Bytes in use on the filesystem that holds `dir` (`stat -f`).
fn used_on(dir: &Path) -> u64 {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%b %a %S"])
        .arg(dir)
        .output()
        .expect("stat -f");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|n| n.parse().expect("stat -f number"))
        .collect();
    (v[0] - v[1]) * v[2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_fill_gives_its_disk_space_back_once_its_readers_are_past_it() {
    const SIZE: usize = 64 << 20;
    let disk = SmallDisk::mount("24m");
    let fake = FakeUpstream::start().await;
    let data = crate::support::images::pseudo_random(SIZE, 94);
    let digest = fake.add_blob("app/spill", data.clone());
    // No memory for joiners: the fill streams the blob through to its one client.
    let rc = Regcache::start_in(
        disk.path(),
        &config_for(&fake.url(), "", "[limits]\nfill_memory = 0\n"),
    );
    let before = used_on(disk.path());
    let mut resp = client()
        .get(format!("{}/v2/app/spill/blobs/{digest}", rc.url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    while body.len() < 32 << 20 {
        let c = resp.chunk().await.expect("chunk").expect("more bytes");
        body.extend_from_slice(&c);
    }
    // The client is past the part of the blob that went to disk before it filled up: nothing
    // needs those bytes any more.
    let t = Instant::now();
    loop {
        let used = used_on(disk.path());
        if used <= before + (2 << 20) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} MiB still used on the store's filesystem ({} MiB before the fill) while the only \
             client of a disk-full fill is {} MiB into the blob; tmp/ holds {:?}",
            used >> 20,
            before >> 20,
            body.len() >> 20,
            std::fs::read_dir(disk.path().join("tmp"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while let Some(c) = resp.chunk().await.expect("the rest of the body") {
        body.extend_from_slice(&c);
    }
    assert!(
        body.len() == SIZE && body[..] == data[..],
        "{} bytes, equal {}",
        body.len(),
        body[..] == data[..]
    );
    assert!(rc.app.cache.store.is_full(), "the store is marked full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asking_for_a_blob_held_in_memory_on_a_full_disk_joins_it() {
    const SIZE: usize = 48 << 20;
    let disk = SmallDisk::mount("24m");
    let fake = FakeUpstream::start().await;
    let data = crate::support::images::pseudo_random(SIZE, 95);
    let digest = fake.add_blob("app/shared", data.clone());
    let rc = Regcache::start_in(disk.path(), &config_for(&fake.url(), "", ""));
    let url = format!("{}/v2/app/shared/blobs/{digest}", rc.url());
    let c = client();
    let mut first = c.get(&url).send().await.expect("GET 1");
    assert_eq!(first.status(), 200);
    let mut one = first.chunk().await.expect("chunk").expect("bytes").to_vec();
    // The fill has fetched, verified and finished (the first client is still reading).
    let t = Instant::now();
    while !rc
        .app
        .metrics
        .render()
        .contains("regcache_fill_duration_seconds_count{upstream=\"docker\"} 1")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the fill never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        rc.app.cache.store.is_full(),
        "the disk filled up during the fill"
    );
    let second = c.get(&url).send().await.expect("GET 2");
    assert_eq!(second.status(), 200);
    assert_eq!(
        second
            .headers()
            .get("x-regcache-cache")
            .and_then(|v| v.to_str().ok()),
        Some("coalesced"),
        "the second client joins the fill held in memory"
    );
    let two = second.bytes().await.expect("body 2");
    while let Some(c) = first.chunk().await.expect("body 1") {
        one.extend_from_slice(&c);
    }
    assert!(one[..] == data[..], "client 1: {} bytes", one.len());
    assert!(two[..] == data[..], "client 2: {} bytes", two.len());
    assert_eq!(fake.blob_gets(&digest), 1, "one upstream fetch for both");
}

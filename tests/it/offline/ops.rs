//! Running it like infrastructure, with nothing but the binary: health probes, graceful SIGTERM,
//! JSON logs, the shards, systemd's readiness and watchdog, the cloud-init document, and the
//! operator commands against a running server.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::fake::FakeUpstream;
use crate::support::process::{free_port, Process};
use crate::support::regcache::{client, Regcache};
use crate::support::registry::http_get;

#[test]
fn health_command_exits_0_when_ready_and_1_when_not() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = offline_config(work.path(), "");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut rc = Process::start(&config, addr, &work.path().join("log"));
    let cfg = config.display().to_string();
    let listen = addr.to_string();
    let ok = Process::run_to_end(&["health", "--config", &cfg, "--listen", &listen]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"ready\":true"));
    rc.kill9();
    let down = Process::run_to_end(&[
        "health",
        "--url",
        &format!("http://{addr}"),
        "--timeout",
        "2s",
    ]);
    assert_eq!(
        down.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// A fake upstream serving one blob of `app/slow` at 256 KiB per 100 ms, and a regcache in front
/// of it with a 20 s shutdown grace (and `extra` config before its `[upstreams]`).
struct SlowBlob {
    rc: Process,
    addr: SocketAddr,
    /// The blob's digest.
    digest: String,
    _fake: FakeUpstream,
    _work: tempfile::TempDir,
}

impl SlowBlob {
    async fn start(layer: Bytes, extra: &str) -> SlowBlob {
        let fake = FakeUpstream::start().await;
        let (_, digest) = fake.add_image("app/slow", "v1", layer);
        fake.set_slow_blobs(256 << 10, Duration::from_millis(100)); // 4 MiB in about 1.6 s
        let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
        let config = work.path().join("rc.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nshutdown_grace = \"20s\"\n{extra}[upstreams.docker]\nurl = \"{}\"\n",
                work.path().join("d").display(),
                fake.url()
            ),
        )
        .expect("config");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = work.path().join("log");
        let rc = tokio::task::block_in_place(|| Process::start(&config, addr, &log));
        SlowBlob {
            rc,
            addr,
            digest,
            _fake: fake,
            _work: work,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_download_finish_then_exits_0_and_logs_json() {
    let layer = Bytes::from(vec![7u8; 4 << 20]);
    let mut slow = SlowBlob::start(layer, "[log]\nformat = \"json\"\n").await;
    let (addr, digest, rc) = (slow.addr, slow.digest.clone(), &mut slow.rc);
    let c = crate::support::regcache::client();
    let mut resp = c
        .get(format!("http://{addr}/v2/app/slow/blobs/{digest}"))
        .send()
        .await
        .expect("GET slow blob");
    assert_eq!(resp.status(), 200);
    let first = resp
        .chunk()
        .await
        .expect("first chunk")
        .expect("some bytes");
    rc.signal("TERM");
    let mut n = first.len();
    while let Some(chunk) = resp
        .chunk()
        .await
        .expect("the in-flight body must complete")
    {
        n += chunk.len();
    }
    assert_eq!(n, 4 << 20);
    let code = tokio::task::block_in_place(|| rc.wait_exit(Duration::from_secs(25)));
    assert_eq!(code, Some(0), "{}", rc.log_text());
    let text = rc.log_text();
    let request_line = text
        .lines()
        .find(|l| l.contains("\"path\":\"/v2/app/slow/blobs/"))
        .unwrap_or_else(|| panic!("no JSON access log line for the blob:\n{text}"));
    let v: serde_json::Value = serde_json::from_str(request_line).expect("JSON log line");
    assert_eq!(v["fields"]["status"], 200, "{v}");
    assert_eq!(v["fields"]["cache"], "miss", "{v}");
    assert!(
        !text.contains("Bearer ") && !text.to_lowercase().contains("authorization: "),
        "no secrets in logs"
    );
}

/// The shard parts of shutdown: a fill lives on the shard of the client that started it, and a
/// client on another shard that joined it must still get every byte when the first client leaves
/// during the drain (its shard then has nothing left to drain, but must keep the fill running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_on_one_shard_keeps_feeding_a_client_on_another_through_shutdown() {
    let layer = Bytes::from((0..4 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut slow = SlowBlob::start(layer.clone(), "").await;
    let (addr, digest, rc) = (slow.addr, slow.digest.clone(), &mut slow.rc);
    let url = format!("http://{addr}/v2/app/slow/blobs/{digest}");
    // Two clients, two connections: the second goes to the other shard (the least loaded).
    let (starter, joiner) = (
        crate::support::regcache::client(),
        crate::support::regcache::client(),
    );
    let mut first = starter
        .get(&url)
        .send()
        .await
        .expect("GET (starts the fill)");
    let head = first.chunk().await.expect("chunk").expect("some bytes");
    let mut second = joiner.get(&url).send().await.expect("GET (joins the fill)");
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let mut got = second
        .chunk()
        .await
        .expect("chunk")
        .expect("some bytes")
        .to_vec();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus > 1 {
        let text = crate::support::regcache::client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let busy = text
            .lines()
            .filter(|l| l.starts_with("regcache_shard_connections{"))
            .filter(|l| !l.ends_with(" 0"))
            .count();
        assert!(
            busy >= 2,
            "the two clients are on different shards:\n{text}"
        );
    }
    rc.signal("TERM");
    // The client that started the fill leaves: its shard has drained.
    assert!(!head.is_empty());
    drop(first);
    drop(starter);
    while let Some(chunk) = second
        .chunk()
        .await
        .expect("the joined body must complete during the drain")
    {
        got.extend_from_slice(&chunk);
    }
    assert!(
        got == layer,
        "the joined body: {} bytes, exact: false",
        got.len()
    );
    let code = tokio::task::block_in_place(|| rc.wait_exit(Duration::from_secs(25)));
    assert_eq!(code, Some(0), "{}", rc.log_text());
}

/// The `content: |` block of `path` in a cloud-init document (6-space indented lines).
pub(crate) fn cloud_init_file(doc: &str, path: &str) -> String {
    let mut lines = doc
        .lines()
        .skip_while(|l| !l.trim_end().ends_with(&format!("path: {path}")));
    lines
        .next()
        .unwrap_or_else(|| panic!("{path} is not in the cloud-init document"));
    let mut lines = lines.skip_while(|l| !l.trim().starts_with("content: |"));
    lines
        .next()
        .unwrap_or_else(|| panic!("{path} has no content block"));
    let mut out = String::new();
    for l in lines {
        if !l.is_empty() && !l.starts_with("      ") {
            break;
        }
        out.push_str(l.get(6..).unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn cloud_init_installs_the_same_unit_and_a_valid_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc =
        std::fs::read_to_string(root.join("deploy/cloud-init/regcache.yaml")).expect("cloud-init");
    let unit = std::fs::read_to_string(root.join("deploy/systemd/regcache.service")).expect("unit");
    assert_eq!(
        cloud_init_file(&doc, "/etc/systemd/system/regcache.service").trim_end(),
        unit.trim_end(),
        "the cloud-init unit must be deploy/systemd/regcache.service"
    );
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = work.path().join("config.toml");
    std::fs::write(&config, cloud_init_file(&doc, "/etc/regcache/config.toml")).expect("config");
    let out = Process::run_to_end(&["check-config", &config.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = cloud_init_file(&doc, "/etc/regcache/prefetch.txt");
    std::fs::write(work.path().join("list"), list).expect("list");
    let out = Process::run_to_end(&[
        "prefetch",
        "--dry-run",
        "-f",
        &work.path().join("list").display().to_string(),
        "--server",
        "http://127.0.0.1:9",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn connections_are_served_by_one_shard_thread_per_cpu_under_one_connection_limit() {
    let (_work, addr, mut rc) = start_offline("[limits]\nmax_connections = 3\n");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tasks = std::fs::read_dir(format!("/proc/{}/task", rc.pid())).expect("task list");
    let shards = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("rc-shard-"))
        .count();
    assert_eq!(shards, cpus, "one shard thread per CPU");

    // The limit holds across shards: 3 idle keep-alive connections fill it, the 4th gets 503. The
    // first sees itself alone, so no start-up probe holds a place.
    let mut held = vec![alone(addr, cpus)];
    for i in 1..3 {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        std::io::Write::write_all(&mut s, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(&mut s, &mut buf).expect("answer");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "connection {i}: {}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    let over = http_get(addr, "/v2/", &[]).expect("an answer over the limit");
    assert_eq!(
        over.status, 503,
        "the 4th connection, over max_connections = 3"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(addr, "/v2/", &[]) {
            Some(r) if r.status == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "no 200 after the held connections closed: {:?}",
                other.map(|r| r.status)
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stops_cleanly(&mut rc);
}

#[test]
fn a_burst_of_connections_is_spread_evenly_over_the_shards() {
    let (_work, addr, mut rc) = start_offline("");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // First a connection that sees itself alone: the shards are then balanced on the burst alone.
    let mut probe = alone(addr, cpus);
    // Like wrk or a fleet of pullers starting at once: all connect before any sends a request, so
    // one shard's wake-up finds them all waiting to be accepted.
    let mut held: Vec<std::net::TcpStream> = (1..4 * cpus)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    for (i, s) in held.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        std::io::Write::write_all(s, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(s, &mut buf).expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "connection {i}");
    }
    let per_shard = shard_loads(&mut probe, cpus);
    assert_eq!(
        per_shard.iter().sum::<u64>(),
        4 * cpus as u64,
        "{per_shard:?}"
    );
    let (least, most) = (per_shard.iter().min(), per_shard.iter().max());
    assert!(
        most.zip(least).is_some_and(|(m, l)| m - l <= 1),
        "connections per shard: {per_shard:?}"
    );
    drop(held);
    stops_cleanly(&mut rc);
}

/// A keep-alive connection to regcache on `addr` once it is the only one open (the start-up
/// probes of [`Process::start`] may still be closing).
fn alone(addr: SocketAddr, shards: usize) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        if shard_loads(&mut s, shards).iter().sum::<u64>() == 1 {
            return s;
        }
        assert!(Instant::now() < deadline, "other connections stay open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `regcache_shard_connections` of each of the `shards`, asked on the keep-alive connection `s`.
fn shard_loads(s: &mut std::net::TcpStream, shards: usize) -> Vec<u64> {
    std::io::Write::write_all(s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut text = Vec::new();
    let mut buf = [0u8; 65536];
    while !text.ends_with(b"# EOF\n") {
        let n = std::io::Read::read(s, &mut buf).expect("metrics");
        assert!(n > 0, "metrics cut short");
        text.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    (0..shards)
        .map(|i| {
            let prefix = format!("regcache_shard_connections{{shard=\"{i}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix}in\n{text}"))
        })
        .collect()
}

#[test]
fn systemd_gets_ready_then_watchdog_pings_while_the_shards_run() {
    use std::os::unix::net::UnixDatagram;
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = offline_config(work.path(), "");
    let notify = work.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &addr.to_string()])
        .env_remove("REGCACHE_CONFIG")
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000")
        .envs(crate::support::registry::PROXY_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn regcache");
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        messages.first().is_some_and(|m| m.contains("READY=1")),
        "READY=1 first: {messages:?}"
    );
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 4,
        "a ping every 0.5 s while the shards run; got {pings} in 4 s: {messages:?}"
    );
}

/// A config in `dir` for a server with no reachable upstream (port 9), plus `extra` TOML.
/// regcache started on `offline_config(extra)`: its work directory, address and process.
fn start_offline(extra: &str) -> (tempfile::TempDir, SocketAddr, Process) {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = offline_config(work.path(), extra);
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let rc = Process::start(&config, addr, &work.path().join("log"));
    (work, addr, rc)
}

/// SIGTERM, then the process must exit 0 within 20 s.
fn stops_cleanly(rc: &mut Process) {
    rc.signal("TERM");
    assert_eq!(
        rc.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        rc.log_text()
    );
}

fn offline_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("rc.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n{extra}[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n",
            dir.join("d").display()
        ),
    )
    .expect("config");
    config
}

/// Runs the regcache binary with `args` off the async runtime.
async fn command(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Process::run_to_end(&args)
    })
    .await
    .expect("command thread")
}

fn describe(out: &std::process::Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_verify_repair_and_pin_commands_work_against_a_running_server() {
    let fake = FakeUpstream::start().await;
    let (_, layer) = fake.add_image("team/app", "v1", Bytes::from(vec![3u8; 32 << 10]));
    let rc = Regcache::with_upstream(&fake.url());
    let url = rc.url();
    let c = client();
    for path in [
        "/v2/team/app/manifests/v1".to_owned(),
        format!("/v2/team/app/blobs/{layer}"),
    ] {
        let r = c
            .get(format!("{url}{path}"))
            .header("accept", crate::support::media::OCI_MANIFEST)
            .send()
            .await
            .expect(&path);
        assert_eq!(r.status(), 200, "{path}");
        r.bytes().await.expect("body");
    }
    let digest: regcache::oci::reference::Digest = layer.parse().expect("digest");
    let stored = || {
        rc.app
            .cache
            .store
            .blob_size(&digest)
            .expect("blob_size")
            .is_some()
    };
    let start = Instant::now();
    while !stored() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "layer never stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = command(&["pin", "add", "team/app:v1", "--server", &url]).await;
    assert!(out.status.success(), "pin add: {}", describe(&out));
    let out = command(&["pin", "list", "--server", &url]).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("team/app:v1"),
        "pin list: {}",
        describe(&out)
    );
    let out = command(&["verify", "--server", &url]).await;
    assert_eq!(out.status.code(), Some(0), "verify: {}", describe(&out));

    // A corrupt layer: `verify --repair` through the server removes it.
    let hex = digest.hex();
    let file = rc.data_dir().join("blobs/sha256").join(&hex[..2]).join(hex);
    let mut bytes = std::fs::read(&file).expect("stored layer");
    bytes[0] ^= 0xff;
    std::fs::write(&file, &bytes).expect("corrupt the layer");
    let out = command(&["verify", "--repair", "--server", &url]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "verify --repair: {}",
        describe(&out)
    );
    assert!(
        !stored(),
        "the corrupt layer was dropped: {}",
        describe(&out)
    );

    let out = command(&["pin", "rm", "team/app:v1", "--server", &url]).await;
    assert!(out.status.success(), "pin rm: {}", describe(&out));
    let out = command(&["gc", "--max-size", "1", "--server", &url]).await;
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("freed "),
        "gc: {}",
        describe(&out)
    );
    assert_eq!(rc.app.cache.store.used_bytes(), 0, "gc evicted everything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_add_resolves_the_image_and_refuses_one_that_does_not_exist() {
    let fake = FakeUpstream::start().await;
    fake.add_image("team/app", "v1", Bytes::from_static(b"layer"));
    fake.add_image("team/other", "v2", Bytes::from_static(b"other layer"));
    let mut rc = Regcache::with_upstream(&fake.url());
    let url = rc.url();
    let pins = |rc: &Regcache| {
        rc.app
            .routing()
            .pin_names(&rc.app.cache.store)
            .expect("pin names")
    };

    // Against a running server: resolved through the cache, so an uncached image is fetched.
    let out = command(&["pin", "add", "library/nothing:nope", "--server", &url]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr.contains("cannot pin library/nothing:nope") && stderr.contains("MANIFEST_UNKNOWN"),
        "the error names the image and why: {}",
        describe(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("pinned"),
        "{}",
        describe(&out)
    );
    assert!(pins(&rc).is_empty(), "nothing pinned: {:?}", pins(&rc));
    let out = command(&["pin", "add", "team/app:v1", "--server", &url]).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pinned team/app:v1"
    );
    assert_eq!(pins(&rc), vec!["team/app:v1".to_string()]);
    assert_eq!(
        fake.hits("GET", "/v2/team/app/manifests/v1"),
        1,
        "pinning fetched the manifest through the cache: {:?}",
        fake.requests()
    );
    let out = command(&["pin", "list", "--server", &url]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "team/app:v1",
        "{}",
        describe(&out)
    );

    // Offline, on the data directory: only what is stored can be pinned.
    let _keep = rc.take_dir();
    let dir = rc.data_dir().to_owned();
    // Dropping the server releases the store's lock.
    drop(rc);
    let config = dir.join("offline.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[upstreams.docker]\nurl = \"{}\"\n",
            dir.display().to_string(),
            fake.url()
        ),
    )
    .expect("config");
    let cfg = config.display().to_string();
    let out = command(&["pin", "add", "team/other:v2", "--config", &cfg]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr.contains("cannot pin team/other:v2") && stderr.contains("not stored"),
        "offline, an image that is not stored cannot be fetched, and the error says so: {}",
        describe(&out)
    );
    let out = command(&["pin", "add", "team/app:v1", "--config", &cfg]).await;
    assert!(out.status.success(), "a stored image: {}", describe(&out));
    let out = command(&["pin", "list", "--config", &cfg]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "team/app:v1",
        "{}",
        describe(&out)
    );
}

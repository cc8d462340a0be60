//! Running it like infrastructure, with nothing but the binary: health probes, graceful SIGTERM,
//! JSON logs, the shards, systemd's readiness and watchdog, the cloud-init document, and the
//! operator commands against a running server.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::fake::FakeUpstream;
use crate::support::fleet::{fleet_port, peers_toml, rank, token_file, wait_peers_up};
use crate::support::process::{free_port, metric, Process};
use crate::support::regcache::{client, Regcache};
use crate::support::registry::{http_get, read_head, read_response, send_request, sha256_digest};

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
/// of it with a 20 s shutdown grace (and `extra` config before its `[upstreams]`, `env` in its
/// environment).
struct SlowBlob {
    rc: Process,
    addr: SocketAddr,
    /// The blob's digest.
    digest: String,
    _fake: FakeUpstream,
    _work: tempfile::TempDir,
}

impl SlowBlob {
    async fn start(layer: Bytes, extra: &str, env: &[(&str, &str)]) -> SlowBlob {
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
        let rc = tokio::task::block_in_place(|| Process::start_with_env(&config, addr, &log, env));
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
    let mut slow = SlowBlob::start(layer, "[log]\nformat = \"json\"\n", &[]).await;
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

/// The shard parts of shutdown: a client on another shard than the one whose client started a
/// fill must still get every byte when the first client leaves during the drain (its shard then
/// has nothing left to drain and stops; the fill, on the background runtime, must go on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_on_one_shard_keeps_feeding_a_client_on_another_through_shutdown() {
    let layer = Bytes::from((0..4 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut slow = SlowBlob::start(layer.clone(), "", &[]).await;
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

/// What happened, in the order it happened, noted from several threads.
#[derive(Clone, Default)]
struct Events(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Events {
    fn note(&self, what: String) {
        self.0.lock().expect("events").push(what);
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().expect("events").clone()
    }
}

/// A keep-alive connection to a regcache that runs with the test hooks, and the shard serving it.
struct ShardConn {
    stream: std::net::TcpStream,
    shard: String,
}

impl ShardConn {
    /// Connects, and learns the shard from the answer to `GET /v2/` (`x-regcache-shard`).
    fn open(addr: SocketAddr) -> ShardConn {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut c = ShardConn {
            stream,
            shard: String::new(),
        };
        c.send("GET", "/v2/", "");
        let r = read_response(&mut c.stream, false, "GET /v2/");
        c.shard = r
            .header("x-regcache-shard")
            .unwrap_or_else(|| {
                panic!(
                    "no x-regcache-shard with the test hooks on: {:?}",
                    r.headers
                )
            })
            .to_owned();
        c
    }

    fn send(&mut self, method: &str, path: &str, headers: &str) {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
        std::io::Write::write_all(&mut self.stream, request.as_bytes()).expect("send a request");
    }

    /// Sends the stall order for `shard` (its thread blocks for `ms`) and returns once that
    /// shard is blocked (the answer's head comes then, its body once the shard runs again). The
    /// thread returned notes `shard N ran again` in `events` when the answer ends.
    fn stall(mut self, shard: &str, ms: u64, events: &Events) -> std::thread::JoinHandle<()> {
        self.send(
            "POST",
            &format!("/_regcache/test/stall?shard={shard}&ms={ms}"),
            "x-regcache-operator: 1\r\n",
        );
        let r = read_head(&mut self.stream, "the stall order");
        assert_eq!(r.status, 200, "the stall order: {:?}", r.headers);
        let (events, shard) = (events.clone(), shard.to_owned());
        std::thread::spawn(move || {
            let mut rest = Vec::new();
            let mut buf = [0u8; 1024];
            while !rest.ends_with(b"0\r\n\r\n") {
                let n =
                    std::io::Read::read(&mut self.stream, &mut buf).expect("the end of the stall");
                assert!(n > 0, "the stall's answer was cut short");
                rest.extend_from_slice(&buf[..n]);
            }
            events.note(format!("shard {shard} ran again"));
        })
    }

    /// At least `on_a` connections on one shard (A) and `on_b` on another (B). A new connection
    /// goes to the least loaded shard, so a few suffice.
    fn on_two_shards(
        addr: SocketAddr,
        on_a: usize,
        on_b: usize,
    ) -> (Vec<ShardConn>, Vec<ShardConn>) {
        type ByShard = std::collections::BTreeMap<String, Vec<ShardConn>>;
        let pick = |by_shard: &ByShard| {
            by_shard
                .iter()
                .filter(|(_, c)| c.len() >= on_a)
                .find_map(|(a, _)| {
                    let b = by_shard.iter().find(|(b, c)| *b != a && c.len() >= on_b)?;
                    Some((a.clone(), b.0.clone()))
                })
        };
        let mut by_shard = ByShard::new();
        let mut picked = None;
        for _ in 0..32 {
            let c = ShardConn::open(addr);
            by_shard.entry(c.shard.clone()).or_default().push(c);
            picked = pick(&by_shard);
            if picked.is_some() {
                break;
            }
        }
        let Some((a, b)) = picked else {
            panic!(
                "connections landed on shards {:?} only: this test needs regcache to run at \
                 least two shards (one per CPU; the machine has {:?})",
                by_shard.keys().collect::<Vec<_>>(),
                std::thread::available_parallelism()
            )
        };
        let mut take = |s: &str| by_shard.remove(s).unwrap_or_default();
        (take(&a), take(&b))
    }
}

/// Fills and upstream connections are not tied to the shard whose client started them: while
/// that shard's thread is blocked (the stall test hook), a client on another shard gets a tag
/// list from the upstream (over the pooled connection a client of the stalled shard opened) and
/// every byte of the blob the stalled shard's client started to fill, verified, before the stalled
/// shard runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_another_shard_gets_its_blob_while_the_shard_that_started_the_fill_is_stalled()
{
    let layer = Bytes::from((0..4 << 20).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    let slow = SlowBlob::start(layer, "", &[("REGCACHE_TEST_HOOKS", "1")]).await;
    let (addr, digest) = (slow.addr, slow.digest.clone());
    let (blob, tags) = (
        format!("/v2/app/slow/blobs/{digest}"),
        "/v2/app/slow/tags/list",
    );
    tokio::task::spawn_blocking(move || {
        // Two connections on shard A (the client that starts the fill, one that lists tags) and
        // two on shard B (the stall order, the client that joins).
        let (mut on_a, mut on_b) = ShardConn::on_two_shards(addr, 2, 2);
        let (mut starter, mut lister) = (on_a.remove(0), on_a.remove(0));
        let (stall, mut joiner) = (on_b.remove(0), on_b.remove(0));
        let (a, b) = (starter.shard.clone(), joiner.shard.clone());
        // Client 1 starts the fill on shard A; the upstream trickles it for about 1.6 s.
        starter.send("GET", &blob, "");
        let r = read_head(&mut starter.stream, "client 1's GET");
        assert_eq!(r.status, 200, "client 1's GET: {:?}", r.headers);
        // A tag list asked on shard A leaves an idle upstream connection in the pool.
        lister.send("GET", tags, "");
        let r = read_response(&mut lister.stream, false, "the tag list on shard A");
        assert_eq!(r.status, 200, "the tag list on shard A: {:?}", r.headers);
        // Shard A's thread blocks for longer than the whole fill takes.
        let events = Events::default();
        let stalled = stall.stall(&a, 6000, &events);
        // Client 2, on shard B, while shard A is blocked: a tag list, then the blob (joining the
        // fill).
        joiner.send("GET", tags, "");
        let r = read_response(&mut joiner.stream, false, "client 2's tag list");
        assert_eq!(r.status, 200, "client 2's tag list: {:?}", r.headers);
        events.note(format!("client 2 on shard {b} got the tag list"));
        joiner.send("GET", &blob, "");
        let r = read_response(&mut joiner.stream, false, "client 2's GET");
        assert_eq!(r.status, 200, "client 2's GET: {:?}", r.headers);
        let got = sha256_digest(&r.body);
        // `coalesced`: it joined the fill, still running (a `hit` would come after it).
        let outcome = r.header("x-regcache-cache").unwrap_or("none").to_owned();
        events.note(format!("client 2 on shard {b} got the blob ({outcome})"));
        stalled.join().expect("the stall's answer");
        assert_eq!(got, digest, "client 2's {} bytes", r.body.len());
        assert_eq!(
            events.all(),
            [
                format!("client 2 on shard {b} got the tag list"),
                format!("client 2 on shard {b} got the blob (coalesced)"),
                format!("shard {a} ran again"),
            ],
            "client 2 must get its answers while the shard that started the fill is stalled"
        );
        drop((on_a, on_b, starter, lister));
    })
    .await
    .expect("the test's client thread");
    let mut rc = slow.rc;
    stops_cleanly(&mut rc);
}

/// Requests to peers are not tied to the shard that started them either: blob `HEAD`s on shard A
/// during an outage, each answered by asking the peer that holds the blob from shard A's
/// handlers, leave pooled connections to that peer; while shard A's thread is blocked, clients on
/// shard B get their blobs from the peer (fills that take those pooled connections), whole and
/// verified, before shard A runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_another_shard_get_blobs_from_a_peer_while_the_shard_that_asked_the_peer_is_stalled(
) {
    const BLOBS: usize = 3;
    let fake = FakeUpstream::start().await;
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("fleet dir");
    let port = fleet_port(2);
    let urls: Vec<String> = (1..=2)
        .map(|i| format!("http://127.0.0.{i}:{port}"))
        .collect();
    // Blobs that the second server (B) ranks first for: B fills them from the upstream itself.
    let digests: Vec<String> = (0u32..)
        .map(|seed| {
            Bytes::from(
                (0..1u32 << 20)
                    .map(|i| ((i + seed) % 251) as u8)
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|l| rank(&urls, &sha256_digest(l))[0] == 1)
        .take(BLOBS)
        .map(|l| fake.add_blob("app/peered", l))
        .collect();
    let config = dir.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[upstreams.docker]\nurl = \"{}\"\nfailure_threshold = 1\n{}",
            fake.url(),
            peers_toml(&urls, &token_file(dir.path()))
        ),
    )
    .expect("config");
    let start = |i: u8, env: &[(&str, &str)]| {
        let data = dir.path().join(format!("data-{i}")).display().to_string();
        Process::start_full(
            &config,
            SocketAddr::from(([127, 0, 0, i], port)),
            &dir.path().join(format!("regcache-{i}.log")),
            &["--data-dir".to_owned(), data],
            env,
        )
    };
    let (server_a, server_b) = tokio::task::block_in_place(|| {
        let servers = (start(1, &[("REGCACHE_TEST_HOOKS", "1")]), start(2, &[]));
        wait_peers_up(&servers.0, Duration::from_secs(40));
        wait_peers_up(&servers.1, Duration::from_secs(40));
        servers
    });
    let (a, b) = (server_a.addr, server_b.addr);
    let paths: Vec<String> = digests
        .iter()
        .map(|d| format!("/v2/app/peered/blobs/{d}"))
        .collect();
    tokio::task::block_in_place(|| {
        // B stores the blobs while the upstream answers.
        for path in &paths {
            let r = http_get(b, path, &[]).expect("B's GET");
            assert_eq!(r.status, 200, "B's GET: {:?}", r.headers);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let mut s = send_request(b, "HEAD", path, &[], b"", Duration::from_secs(10))
                    .expect("B's HEAD");
                if read_head(&mut s, "B's HEAD").header("x-regcache-cache") == Some("hit") {
                    break;
                }
                assert!(Instant::now() < deadline, "B did not commit {path}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    // The upstream goes down. A's first failure opens its breaker (`failure_threshold = 1`): A's
    // peer tier then asks the peers what they hold.
    fake.set_status(Some(503));
    let up = tokio::task::block_in_place(|| {
        http_get(a, "/v2/app/peered/tags/list", &[]).expect("A's tag list");
        metric(
            &server_a.metrics(),
            "regcache_upstream_up{upstream=\"docker\"}",
        )
    });
    assert_eq!(up, Some(0.0), "A's upstream is marked down");
    let (events, shard_a, shard_b) = tokio::task::spawn_blocking(move || {
        // On shard A, one connection per blob (the HEADs that ask the peer); on shard B, the
        // stall order and one client per blob.
        let (mut on_a, mut on_b) = ShardConn::on_two_shards(a, BLOBS, BLOBS + 1);
        let (shard_a, shard_b) = (on_a[0].shard.clone(), on_b[0].shard.clone());
        // The HEADs at once on shard A: each asks B from shard A's thread, so beyond the
        // connection to B the pool may have idle, it opens more from there.
        for (c, path) in on_a.iter_mut().zip(&paths) {
            c.send("HEAD", path, "");
        }
        for c in &mut on_a {
            let r = read_response(&mut c.stream, true, "a HEAD on shard A");
            assert_eq!(
                (r.status, r.header("x-regcache-cache")),
                (200, Some("shared")),
                "a HEAD on shard A, answered by the peer: {:?}",
                r.headers
            );
        }
        // Shard A's thread blocks for longer than the peer's answers take. Then the clients on
        // shard B ask at once: their fills take pooled connections to B, as many as they need.
        let events = Events::default();
        let stalled = on_b.remove(0).stall(&shard_a, 6000, &events);
        for (c, path) in on_b.iter_mut().zip(&paths) {
            c.send("GET", path, "");
        }
        for (i, (c, d)) in on_b.iter_mut().zip(&digests).enumerate() {
            let r = read_response(&mut c.stream, false, "a GET on shard B");
            let outcome = r.header("x-regcache-cache").unwrap_or("none").to_owned();
            events.note(format!(
                "client {i} on shard {shard_b} got {} ({outcome}, {} bytes, verified: {})",
                r.status,
                r.body.len(),
                sha256_digest(&r.body) == *d
            ));
        }
        stalled.join().expect("the stall's answer");
        (events.all(), shard_a, shard_b)
    })
    .await
    .expect("the test's client thread");
    let mut want: Vec<String> = (0..BLOBS)
        .map(|i| {
            format!("client {i} on shard {shard_b} got 200 (shared, 1048576 bytes, verified: true)")
        })
        .collect();
    want.push(format!("shard {shard_a} ran again"));
    assert_eq!(
        events,
        want,
        "the clients on shard B must get their blobs from the peer while shard A is stalled\n{}",
        server_a.log_text()
    );
    drop(server_b);
}

/// Without `REGCACHE_TEST_HOOKS=1` the test hooks do not exist: responses name no shard, and the
/// stall order is an unknown operator endpoint, which blocks nothing.
#[test]
fn without_the_test_hooks_variable_there_is_no_stall_endpoint_and_no_shard_header() {
    assert!(
        std::env::var_os("REGCACHE_TEST_HOOKS").is_none(),
        "run the tests without REGCACHE_TEST_HOOKS in their environment"
    );
    let rc = Regcache::with_upstream("http://127.0.0.1:9");
    let mut s = std::net::TcpStream::connect(rc.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::io::Write::write_all(
        &mut s,
        b"POST /_regcache/test/stall?shard=0&ms=60000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          x-regcache-operator: 1\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    )
    .expect("send");
    let stall = read_response(&mut s, false, "the stall order");
    let v2 = read_response(&mut s, false, "GET /v2/ after it");
    assert_eq!(
        (stall.status, v2.status),
        (404, 200),
        "the stall order: {}",
        String::from_utf8_lossy(&stall.body)
    );
    for r in [&stall, &v2] {
        assert!(
            r.header("x-regcache-shard").is_none(),
            "a shard header without the test hooks: {:?}",
            r.headers
        );
    }
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
    let sysusers =
        std::fs::read_to_string(root.join("deploy/systemd/regcache.sysusers")).expect("sysusers");
    assert_eq!(
        cloud_init_file(&doc, "/etc/sysusers.d/regcache.conf").trim_end(),
        sysusers.trim_end(),
        "the cloud-init sysusers file must be deploy/systemd/regcache.sysusers"
    );
    let at = |needle: &str| {
        doc.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} is not in the cloud-init runcmd"))
    };
    assert!(
        at("systemd-sysusers") < at("systemctl enable --now regcache.service")
            && at("chgrp regcache /etc/regcache/config.toml")
                < at("systemctl enable --now regcache.service"),
        "the user exists and can read the config before the service starts"
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
    // The server answers as soon as one shard runs; the others may still be starting, so count
    // until they are all there (or give up after a while and report what was seen).
    let count_shards = || {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", rc.pid())).expect("task list");
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("rc-shard-"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut shards = count_shards();
    while shards < cpus && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        shards = count_shards();
    }
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

/// regcache (the binary) with `fake` as its default upstream, and `extra` config before its
/// `[upstreams]`: its work directory, address and process.
fn start_in_front_of(fake: &FakeUpstream, extra: &str) -> (tempfile::TempDir, SocketAddr, Process) {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = work.path().join("rc.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n{extra}[upstreams.docker]\nurl = \"{}\"\n",
            work.path().join("d").display(),
            fake.url()
        ),
    )
    .expect("config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = work.path().join("log");
    let rc = tokio::task::block_in_place(|| Process::start(&config, addr, &log));
    (work, addr, rc)
}

/// The JSON access lines (`regcache::access`) in `text` whose path is `path`, in order.
fn access_lines(text: &str, path: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "regcache::access" && v["fields"]["path"] == path)
        .collect()
}

/// Waits (20 s at most) until `rc` has logged `count` access lines for `path`, and returns them.
/// A shard writes its access lines in batches, every 250 ms.
async fn await_access_lines(rc: &Process, path: &str, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = access_lines(&rc.log_text(), path);
        if lines.len() >= count || Instant::now() > deadline {
            assert_eq!(
                lines.len(),
                count,
                "access lines for {path}:\n{}",
                rc.log_text()
            );
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// regcache with JSON logs in front of `fake`: its work directory, address and process.
fn start_json_logged(fake: &FakeUpstream) -> (tempfile::TempDir, SocketAddr, Process) {
    start_in_front_of(fake, "[log]\nformat = \"json\"\n")
}

/// The access line is written when the body ends, with the bytes that went out: a client that
/// hangs up after part of a warm blob is logged with fewer bytes than the blob and `hung_up`, and
/// the `served_bytes_total` metric counts only what was sent. Every answer carries its request
/// id, which its access line names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_blob_is_logged_with_the_bytes_it_was_sent() {
    const SIZE: usize = 48 << 20;
    let layer = Bytes::from((0..SIZE).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let fake = FakeUpstream::start().await;
    let (_, digest) = fake.add_image("app/big", "v1", layer);
    let (_work, addr, rc) = start_json_logged(&fake);
    let path = format!("/v2/app/big/blobs/{digest}");

    // The whole blob once: it is cached and logged complete.
    let whole = client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("GET the blob");
    assert_eq!(whole.status(), 200);
    let id = whole
        .headers()
        .get("x-regcache-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no x-regcache-request-id: {:?}", whole.headers()));
    let body = whole.bytes().await.expect("the whole blob");
    assert_eq!(body.len(), SIZE);

    // Again, from the store, on a raw connection that goes after 1 MiB.
    let got = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        write!(s, "GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").expect("send request");
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < 1 << 20 {
            match s.read(&mut buf).expect("read the answer") {
                0 => panic!("the server closed after {got} bytes"),
                n => got += n,
            }
        }
        // Unread bytes are waiting: closing now resets the connection.
        drop(s);
        got
    })
    .await
    .expect("reader");
    assert!(got >= 1 << 20);

    let path = format!("/v2/app/big/blobs/{digest}");
    let lines = await_access_lines(&rc, &path, 2).await;
    // Shards write their batches independently: tell the two lines apart by their ids.
    let by_id = |want: bool| {
        lines
            .iter()
            .map(|l| &l["fields"])
            .find(|f| (f["request_id"].to_string().trim_matches('"') == id) == want)
            .unwrap_or_else(|| panic!("no access line with id {id} ({want}):\n{lines:?}"))
    };
    let (first, second) = (by_id(true), by_id(false));
    assert_eq!(
        (first["status"].as_u64(), first["bytes"].as_u64()),
        (Some(200), Some(SIZE as u64)),
        "the whole blob: {first}"
    );
    assert_eq!(
        (first["complete"].as_bool(), first["hung_up"].as_bool()),
        (Some(true), Some(false)),
        "the whole blob: {first}"
    );
    let sent = second["bytes"].as_u64().unwrap_or(0);
    assert!(
        sent > 0 && sent < SIZE as u64,
        "the hung-up answer logs the bytes it was sent, not the blob's {SIZE}: {second}"
    );
    assert_eq!(
        (
            second["status"].as_u64(),
            second["complete"].as_bool(),
            second["hung_up"].as_bool()
        ),
        (Some(200), Some(false), Some(true)),
        "the hung-up answer: {second}"
    );
    assert_ne!(
        first["request_id"], second["request_id"],
        "each request has its own id"
    );
    let served = tokio::task::block_in_place(|| rc.metrics());
    let served = crate::support::process::metric(&served, "regcache_served_bytes_total")
        .expect("served_bytes_total");
    assert!(
        served >= (SIZE as u64 + sent) as f64 && served < 2.0 * SIZE as f64,
        "served_bytes_total counts the bytes sent ({} + {sent}), got {served}",
        SIZE
    );
}

/// A client that hangs up while its answer is still being fetched is logged too: status 499 (as
/// nginx logs it), no bytes, `hung_up`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_before_its_answer_is_logged_as_499() {
    let fake = FakeUpstream::start().await;
    fake.add_image("app/slow", "v1", Bytes::from_static(b"layer"));
    let (_work, addr, rc) = start_json_logged(&fake);
    fake.set_manifest_gate(true);
    let path = "/v2/app/slow/manifests/v1";
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send request");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.hits("GET", path) == 0 {
        assert!(
            Instant::now() < deadline,
            "regcache never asked the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The upstream holds the manifest: the client goes before regcache can answer.
    drop(s);
    let lines = await_access_lines(&rc, path, 1).await;
    let f = &lines[0]["fields"];
    assert_eq!(
        (
            f["status"].as_u64(),
            f["bytes"].as_u64(),
            f["complete"].as_bool(),
            f["hung_up"].as_bool()
        ),
        (Some(499), Some(0), Some(false), Some(true)),
        "{f}"
    );
    fake.set_manifest_gate(false);
}

/// Every path under `dir` with its content (directories as `None`), sorted.
fn tree_of(dir: &Path) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                out.push((p.clone(), None));
                todo.push(p);
            } else {
                out.push((p.clone(), Some(std::fs::read(&p).expect("read"))));
            }
        }
    }
    out.sort();
    out
}

/// `regcache ARGS` run in `cwd`: (exit code, stderr). A process still running after 20 s (a
/// `serve` that started) is killed, and the test fails.
pub(crate) fn run_in(cwd: &Path, args: &[&str]) -> (Option<i32>, String) {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("stderr dir");
    let stderr_path = work.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(args)
        .current_dir(cwd)
        .env_remove("REGCACHE_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("run regcache");
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "regcache {args:?} still running after 20 s: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code(),
        std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    )
}

#[test]
fn an_empty_relative_or_system_data_dir_is_refused_and_the_working_directory_is_untouched() {
    // The reported case: data_dir = "" made every command use the working directory, empty its
    // tmp/ and create blobs/, lock and meta.redb there.
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let cwd = work.path().join("cwd");
    std::fs::create_dir_all(cwd.join("tmp")).expect("mkdir");
    std::fs::write(cwd.join("tmp/some-file"), "someone's file\n").expect("write");
    let before = tree_of(&cwd);
    for value in ["", ".", "data", "/", "/etc", "/usr", "/tmp", "/var/lib"] {
        let config = work.path().join("rc.toml");
        std::fs::write(
            &config,
            format!("data_dir = {value:?}\n[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n"),
        )
        .expect("config");
        let config = config.display().to_string();
        for args in [
            vec!["check-config", config.as_str()],
            vec!["pin", "list", "--config", config.as_str()],
            vec!["gc", "--config", config.as_str()],
        ] {
            let (code, err) = run_in(&cwd, &args);
            assert!(
                code == Some(2) && err.contains("data_dir"),
                "data_dir = {value:?}, {args:?}: exit {code:?}, stderr: {err}"
            );
        }
        // The flag gets the same checks (clap itself refuses an empty value).
        let (code, err) = run_in(&cwd, &["check-config", "--data-dir", value]);
        assert!(
            code == Some(2) && (err.contains("data_dir") || err.contains("--data-dir")),
            "--data-dir {value:?}: exit {code:?}, stderr: {err}"
        );
    }
    assert_eq!(
        tree_of(&cwd),
        before,
        "the working directory must be untouched"
    );
}

#[test]
fn a_data_dir_holding_files_regcache_did_not_create_is_refused_and_left_untouched() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let data = work.path().join("d");
    std::fs::create_dir_all(data.join("tmp")).expect("mkdir");
    std::fs::write(data.join("tmp/some-file"), "someone's file\n").expect("write");
    std::fs::write(data.join("report.pdf"), "not a blob\n").expect("write");
    let before = tree_of(&data);
    let config = offline_config(work.path(), "").display().to_string();
    for args in [
        vec![
            "serve",
            "--config",
            config.as_str(),
            "--listen",
            "127.0.0.1:0",
        ],
        vec!["pin", "list", "--config", config.as_str()],
        vec!["verify", "--repair", "--config", config.as_str()],
    ] {
        let (code, err) = run_in(work.path(), &args);
        assert!(
            code == Some(1) && err.contains("regcache-data-dir") && err.contains("report.pdf"),
            "{args:?}: exit {code:?}, stderr: {err}"
        );
    }
    assert_eq!(tree_of(&data), before, "the directory must be untouched");
}

#[test]
fn a_store_of_an_earlier_regcache_killed_mid_run_is_adopted_and_marked() {
    let (work, _addr, mut rc) = start_offline("");
    let data = work.path().join("d");
    rc.kill9();
    // What a regcache from before the marker leaves when killed: its store without the marker
    // (and a database that redb must recover), with a fill in tmp/.
    std::fs::remove_file(data.join("regcache-data-dir")).expect("unmark");
    std::fs::write(data.join("tmp/fill-1-2-3"), "half a blob").expect("leftover");
    rc.restart();
    assert!(
        data.join("regcache-data-dir").is_file(),
        "the marker must be written: {}",
        rc.log_text()
    );
    assert!(
        !data.join("tmp/fill-1-2-3").exists(),
        "leftover fill removed"
    );
    assert!(
        rc.log_text().contains("earlier regcache"),
        "the adoption is logged: {}",
        rc.log_text()
    );
    stops_cleanly(&mut rc);
}

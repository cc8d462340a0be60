//! The fleet (`[peers]`): real regcache processes on 127.0.0.1, 127.0.0.2, … (one shared config
//! file, as a script starts them), the real docker-registry upstream (behind a counting proxy where
//! the test counts or paces what the upstream sends), skopeo and dockerd. A fake peer stands in for
//! the faults a real one cannot show: black-holed, or answering wrong bytes.
//!
//! Timings (first byte, the peer timeout) are figures for the benchmark; the tests assert counts
//! and the order of events.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::support::clients::Dockerd;
use crate::support::fleet::{
    fleet_port, peer_headers, peer_states, peers_toml, rank, timed_get, token_file, wait_peers_up,
    FakePeer, Fetched, Fleet, PeerMode,
};
use crate::support::media::accept_all;
use crate::support::net::BlackHole;
use crate::support::process::{metric, Process};
use crate::support::proxy::CountingProxy;
use crate::support::registry::{
    copy_to_dir, http_get, inspect_raw, sha256_digest, Registry, Seeded,
};

/// The blobs (digest, size) of an image's manifest (config and layers) on the upstream; for an
/// index or list, of every child.
fn image_blobs(upstream: &Registry, repo: &str, reference: &str) -> Vec<(String, u64)> {
    let body = upstream_manifest(upstream, repo, reference);
    let m: serde_json::Value = serde_json::from_slice(&body).expect("manifest JSON");
    if let Some(children) = m["manifests"].as_array() {
        return children
            .iter()
            .flat_map(|c| image_blobs(upstream, repo, c["digest"].as_str().expect("child")))
            .collect();
    }
    let mut blobs = vec![(
        m["config"]["digest"].as_str().expect("config").to_owned(),
        m["config"]["size"].as_u64().expect("config size"),
    )];
    for l in m["layers"].as_array().expect("layers") {
        blobs.push((
            l["digest"].as_str().expect("layer").to_owned(),
            l["size"].as_u64().expect("layer size"),
        ));
    }
    blobs
}

/// The bytes of manifest `repo:reference` on the upstream, for a client accepting every type.
fn upstream_manifest(upstream: &Registry, repo: &str, reference: &str) -> Vec<u8> {
    let r = http_get(
        upstream.addr(),
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Accept", accept_all())],
    )
    .unwrap_or_else(|| panic!("GET {repo}:{reference} from the upstream"));
    assert_eq!(r.status, 200, "{repo}:{reference} on the upstream");
    r.body
}

/// Bytes the upstream's access log shows it sent in answer to `GET`s of blob `digest`.
fn upstream_blob_bytes(upstream: &Registry, digest: &str) -> u64 {
    upstream
        .access_log()
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
        // `"GET /v2/… HTTP/1.1" 200 561 "" "regcache/0.1.0"`: status, then bytes.
        .filter_map(|l| l.split_once("HTTP/1.1\" ").map(|(_, rest)| rest.to_owned()))
        .filter_map(|rest| rest.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn fleet_herd_the_upstream_sends_each_blob_once_and_every_client_streams_before_the_owner_is_done()
{
    let upstream = Registry::start_seeded();
    // 40 MB/s: the big layer takes seconds to come in, long enough to watch the clients stream.
    let proxy = CountingProxy::start(upstream.addr(), Some(40_000_000));
    let fleet = Fleet::start(4, &proxy.url(), "header_timeout = \"30s\"\n");
    fleet.wait_formed();
    let (repo, tag) = Seeded::BIG.split_once(':').expect("repo:tag");
    let blobs = image_blobs(&upstream, repo, tag);
    let (big, big_size) = blobs
        .iter()
        .max_by_key(|(_, size)| *size)
        .cloned()
        .expect("a layer");

    // One client per server, all at the same moment: the manifest, then every blob at once.
    let barrier = Arc::new(Barrier::new(fleet.servers.len()));
    let results: Vec<Vec<(String, Fetched)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..fleet.servers.len())
            .map(|i| {
                let (barrier, blobs, addr) = (Arc::clone(&barrier), &blobs, fleet.addr(i));
                s.spawn(move || {
                    barrier.wait();
                    let m = http_get(
                        addr,
                        &format!("/v2/{repo}/manifests/{tag}"),
                        &[("Accept", accept_all())],
                    )
                    .expect("GET the manifest");
                    assert_eq!(m.status, 200, "server {i}: the manifest");
                    std::thread::scope(|s2| {
                        let gets: Vec<_> = blobs
                            .iter()
                            .map(|(d, _)| {
                                s2.spawn(move || {
                                    let path = format!("/v2/{repo}/blobs/{d}");
                                    (d.clone(), timed_get(addr, &path, &[], None))
                                })
                            })
                            .collect();
                        gets.into_iter()
                            .map(|g| g.join().expect("blob GET thread"))
                            .collect()
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });

    for (i, fetched) in results.iter().enumerate() {
        for (d, f) in fetched {
            let size = blobs.iter().find(|(b, _)| b == d).map(|(_, s)| *s);
            assert!(
                f.status == 200 && f.digest == *d && Some(f.len) == size,
                "server {i}: blob {d}: status {}, {} bytes hashing to {} (want {size:?} bytes)\n{}",
                f.status,
                f.len,
                f.digest,
                fleet.logs()
            );
        }
    }
    for (d, size) in &blobs {
        let sent = upstream_blob_bytes(&upstream, d);
        assert_eq!(
            sent,
            *size,
            "the upstream sent blob {d} ({size} bytes) {sent} bytes for 4 servers, not once\n{}",
            upstream.access_log()
        );
    }
    // Every client had its first byte of the big layer before its last byte reached the owner.
    let upstream_done = proxy.last_down().expect("the upstream sent something");
    let owner = fleet.ranked(&big)[0];
    for (i, fetched) in results.iter().enumerate() {
        let (_, f) = fetched
            .iter()
            .find(|(d, _)| *d == big)
            .expect("the big layer");
        let first = f.first_byte.expect("a first byte");
        assert!(
            first < upstream_done,
            "server {i} (owner: {owner}): its client's first byte of the {big_size}-byte layer \
             came {:?} after the upstream's last byte",
            first.duration_since(upstream_done)
        );
    }
    // Where the bytes came from: the owner filled from the upstream, the others from the owner.
    for (i, s) in fleet.servers.iter().enumerate() {
        let m = s.metrics();
        let source = if i == owner { "upstream" } else { "peer" };
        let n = metric(&m, &format!("regcache_fills_total{{source=\"{source}\"}}")).unwrap_or(0.0);
        assert!(
            n >= 1.0,
            "server {i}: no blob answer from the {source}:\n{m}"
        );
    }
    let sent = metric(
        &fleet.servers[owner].metrics(),
        "regcache_peer_sent_bytes_total",
    );
    assert!(
        sent.is_some_and(|b| b >= 3.0 * big_size as f64),
        "the owner answered its 3 peers {sent:?} bytes"
    );
}

#[test]
fn owner_killed_mid_fill_the_other_servers_clients_still_get_the_right_bytes() {
    let upstream = Registry::start_seeded();
    let proxy = CountingProxy::start(upstream.addr(), Some(30_000_000));
    let mut fleet = Fleet::start(3, &proxy.url(), "header_timeout = \"30s\"\n");
    fleet.wait_formed();
    let (repo, tag) = Seeded::BIG.split_once(':').expect("repo:tag");
    let (big, size) = image_blobs(&upstream, repo, tag)
        .into_iter()
        .max_by_key(|(_, s)| *s)
        .expect("a layer");
    let owner = fleet.ranked(&big)[0];
    let others: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    let progress: Vec<AtomicU64> = others.iter().map(|_| AtomicU64::new(0)).collect();
    let path = format!("/v2/{repo}/blobs/{big}");
    let fetched: Vec<Fetched> = std::thread::scope(|s| {
        let handles: Vec<_> = others
            .iter()
            .zip(&progress)
            .map(|(&i, p)| {
                let (addr, path) = (fleet.addr(i), &path);
                s.spawn(move || timed_get(addr, path, &[], Some(p)))
            })
            .collect();
        // Mid-fill: every client streams from the owner's fill; then the owner dies.
        let t = Instant::now();
        while progress.iter().any(|p| p.load(Ordering::Relaxed) < 8 << 20) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the clients did not start streaming\n{}",
                fleet.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fleet.servers[owner].kill9();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    for (f, i) in fetched.iter().zip(&others) {
        assert!(
            f.status == 200 && f.len == size && f.digest == big,
            "server {i}'s client after the owner ({owner}) died: status {}, {} of {size} bytes, \
             hashing to {}\n{}",
            f.status,
            f.len,
            f.digest,
            fleet.logs()
        );
    }
    // The owner is down for the survivors, and the blob is stored there, verified.
    for &i in &others {
        let states = peer_states(&fleet.servers[i]);
        assert!(
            states
                .iter()
                .any(|(u, up, _)| *u == format!("{}/", fleet.urls[owner]) && !up),
            "server {i} still counts the dead owner up: {states:?}"
        );
        let held = http_get(
            fleet.addr(i),
            &format!("/v2/{repo}/blobs/{big}"),
            &peer_headers(true),
        )
        .map(|r| r.status);
        assert_eq!(
            held,
            Some(200),
            "server {i} holds the blob after the resume"
        );
        let log = fleet.servers[i].log_text();
        assert!(
            log.contains("resuming with Range") && log.contains("peer down"),
            "server {i}'s fill went on from the next tier when the owner's stream broke:\n{log}"
        );
    }
}

/// (repository, digest) of small blobs of the seeded images (each blob once).
fn small_blobs(upstream: &Registry) -> Vec<(String, String, u64)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for image in [
        Seeded::SMALL_OCI,
        Seeded::SMALL_DOCKER,
        Seeded::MULTI_OCI,
        Seeded::MULTI_DOCKER,
    ] {
        let (repo, tag) = image.split_once(':').expect("repo:tag");
        for (d, size) in image_blobs(upstream, repo, tag) {
            if seen.insert(d.clone()) {
                out.push((repo.to_owned(), d, size));
            }
        }
    }
    out
}

/// A port for a server on 127.0.0.1 and a fake peer on 127.0.0.2 where the fake ranks first for at
/// least `want` of `blobs`; those blobs.
fn port_where_the_fake_owns(
    blobs: &[(String, String, u64)],
    want: usize,
) -> (u16, Vec<String>, Vec<(String, String, u64)>) {
    for _ in 0..100 {
        let port = fleet_port(2);
        let urls = vec![
            format!("http://127.0.0.1:{port}"),
            format!("http://127.0.0.2:{port}"),
        ];
        let owned: Vec<_> = blobs
            .iter()
            .filter(|(_, d, _)| rank(&urls, d)[0] == 1)
            .cloned()
            .collect();
        if owned.len() >= want {
            return (port, urls, owned);
        }
    }
    panic!(
        "no port where 127.0.0.2 owns {want} of {} blobs",
        blobs.len()
    );
}

/// One regcache on `urls[0]` with a peer on `urls[1]`, upstream `upstream_url`.
fn server_with_peer(dir: &std::path::Path, urls: &[String], upstream_url: &str) -> Process {
    let token = token_file(dir);
    let config = dir.join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "[upstreams.docker]\nurl = \"{upstream_url}\"\n{}",
            peers_toml(urls, &token)
        ),
    )
    .expect("write config");
    let addr: SocketAddr = urls[0].trim_start_matches("http://").parse().expect("addr");
    let args = vec![
        "--data-dir".to_owned(),
        dir.join("data").display().to_string(),
    ];
    Process::start_with(&config, addr, &dir.join("regcache.log"), &args)
}

#[test]
fn a_black_holed_peer_is_asked_once_then_skipped_until_its_probe_succeeds() {
    let upstream = Registry::start_seeded();
    let (port, urls, owned) = port_where_the_fake_owns(&small_blobs(&upstream), 3);
    let fake = FakePeer::start(
        SocketAddr::from(([127, 0, 0, 2], port)),
        PeerMode::Answering,
    );
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let rc = server_with_peer(dir.path(), &urls, &upstream.url());
    wait_peers_up(&rc, Duration::from_secs(20));

    let get = |(repo, d, size): &(String, String, u64)| {
        let f = timed_get(rc.addr, &format!("/v2/{repo}/blobs/{d}"), &[], None);
        assert!(
            f.status == 200 && f.digest == *d && f.len == *size,
            "{repo}@{d}: {f:?}\n{}",
            rc.log_text()
        );
    };
    // Black-holed while it counts as up: the first blob it owns asks it once, then it is down.
    fake.set_mode(PeerMode::BlackHole);
    get(&owned[0]);
    assert_eq!(
        fake.requests_for(&owned[0].1).len(),
        1,
        "asked once for the first blob"
    );
    let states = peer_states(&rc);
    assert!(
        states
            .iter()
            .any(|(u, up, _)| u.starts_with(&urls[1]) && !up),
        "the black hole counts as down: {states:?}"
    );
    // The next blob it owns is not asked of it.
    get(&owned[1]);
    assert!(
        fake.requests_for(&owned[1].1).is_empty(),
        "a down peer was asked: {:?}",
        fake.requests_for("/blobs/")
    );
    let timeouts = metric(
        &rc.metrics(),
        &format!(
            "regcache_peer_requests_total{{peer=\"{}/\",result=\"timeout\"}}",
            urls[1]
        ),
    );
    assert_eq!(
        timeouts,
        Some(1.0),
        "one request to the black hole timed out"
    );
    // Once its probe succeeds, it is asked again (it answers 503 here, and then 503 to the
    // question whether it holds the blob: the blob comes from the upstream, and the peer stays up).
    fake.set_mode(PeerMode::Answering);
    wait_peers_up(&rc, Duration::from_secs(30));
    get(&owned[2]);
    let gets: Vec<_> = fake
        .requests_for(&owned[2].1)
        .into_iter()
        .filter(|r| r.starts_with("GET "))
        .collect();
    assert_eq!(
        gets.len(),
        1,
        "the peer is asked again once its probe succeeded: {:?}",
        fake.requests_for(&owned[2].1)
    );
    assert!(
        rc.log_text().contains("peer down") && rc.log_text().contains("peer back"),
        "the log says when ownership moved:\n{}",
        rc.log_text()
    );
}

#[test]
fn a_peer_that_answers_wrong_bytes_is_never_served_complete_nor_committed_nor_asked_again() {
    let upstream = Registry::start_seeded();
    let (port, urls, owned) = port_where_the_fake_owns(&small_blobs(&upstream), 1);
    let (repo, d, size) = owned[0].clone();
    let real = http_get(upstream.addr(), &format!("/v2/{repo}/blobs/{d}"), &[])
        .expect("the blob from the upstream")
        .body;
    let mut wrong = real.clone();
    let mid = wrong.len() / 2;
    wrong[mid] ^= 0xff;
    let fake = FakePeer::start(
        SocketAddr::from(([127, 0, 0, 2], port)),
        PeerMode::Answering,
    );
    fake.tamper(&d, wrong);
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let rc = server_with_peer(dir.path(), &urls, &upstream.url());
    wait_peers_up(&rc, Duration::from_secs(20));

    let path = format!("/v2/{repo}/blobs/{d}");
    let first = timed_get(rc.addr, &path, &[], None);
    assert_eq!(fake.requests_for(&d).len(), 1, "the owner was asked");
    assert!(
        first.len < size,
        "a client got all {size} bytes of a copy that fails verification: {first:?}"
    );
    let failed = metric(
        &rc.metrics(),
        "regcache_fills_failed_total{reason=\"digest\"}",
    );
    assert_eq!(failed, Some(1.0), "the fill failed its verification");
    let held = http_get(rc.addr, &path, &peer_headers(true)).map(|r| r.status);
    assert_eq!(held, Some(404), "the wrong copy was committed");

    let second = timed_get(rc.addr, &path, &[], None);
    assert!(
        second.status == 200 && second.digest == d && second.len == size,
        "the retry: {second:?}\n{}",
        rc.log_text()
    );
    assert_eq!(
        second.header("x-regcache-cache"),
        Some("miss"),
        "from the upstream"
    );
    assert_eq!(
        fake.requests_for(&d).len(),
        1,
        "the peer that sent wrong bytes was asked again for them"
    );
}

/// An image of the drill: by tag, by digest, and whether it is an index.
struct Pulled {
    repo: &'static str,
    tag: &'static str,
    digest: String,
    manifest: Vec<u8>,
    all: bool,
}

#[test]
fn postmortem_drill_servers_that_never_pulled_get_every_image_from_their_peers_after_kill9_with_the_upstream_black_holed(
) {
    let mut upstream = Registry::start_seeded();
    let upstream_addr = upstream.addr();
    let mut fleet = Fleet::start(
        4,
        &upstream.url(),
        "freshness = \"1s\"\nconnect_timeout = \"1s\"\nheader_timeout = \"2s\"\nidle_timeout = \"5s\"\n",
    );
    fleet.wait_formed();
    let (a, b, c, d) = (0, 1, 2, 3);
    let pulled = |repo: &'static str, tag: &'static str, all: bool| {
        let manifest = inspect_raw(&upstream.host_port(), &format!("{repo}:{tag}"));
        Pulled {
            repo,
            tag,
            digest: sha256_digest(&manifest),
            manifest,
            all,
        }
    };
    let images = [
        pulled("small/oci", "latest", false),
        pulled("multi/docker", "latest", true),
        pulled("library/busybox", "latest", false),
    ];
    // A pulls two images, B the third.
    for (server, image) in [(a, &images[0]), (a, &images[1]), (b, &images[2])] {
        let out = copy_to_dir(
            &fleet.addr(server).to_string(),
            &format!("{}:{}", image.repo, image.tag),
            &fleet
                .dir
                .path()
                .join(format!("warm-{}", image.repo.replace('/', "-"))),
            image.all,
        );
        assert!(
            out.status.success(),
            "warming {}: {}",
            image.repo,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The upstream goes dark (accepts, never answers); every server is killed and restarted.
    upstream.stop();
    let hole = BlackHole::start(upstream_addr);
    for s in &mut fleet.servers {
        s.kill9();
    }
    for s in &mut fleet.servers {
        s.restart();
    }
    fleet.wait_formed();
    std::thread::sleep(Duration::from_millis(1100)); // every peer's tag record is now stale

    // C and D never pulled anything. A tag comes from the peers' records, stale.
    for server in [c, d] {
        let image = &images[0];
        let r = http_get(
            fleet.addr(server),
            &format!("/v2/{}/manifests/{}", image.repo, image.tag),
            &[("Accept", accept_all())],
        )
        .expect("GET by tag");
        assert_eq!(
            r.status,
            200,
            "server {server}: {}:{} by tag\n{}",
            image.repo,
            image.tag,
            fleet.logs()
        );
        assert_eq!(
            r.body, image.manifest,
            "server {server}: the manifest's bytes"
        );
        assert!(
            r.header("warning").is_some_and(|w| w.starts_with("110")),
            "server {server}: a tag from the peers' records is served stale: {:?}",
            r.headers
        );
    }
    // skopeo, by tag and by digest, on C and D.
    for server in [c, d] {
        for image in &images {
            for reference in [
                format!("{}:{}", image.repo, image.tag),
                format!("{}@{}", image.repo, image.digest),
            ] {
                let dest = fleet.dir.path().join(format!(
                    "skopeo-{server}-{}",
                    reference.replace(['/', ':', '@'], "-")
                ));
                let out = copy_to_dir(
                    &fleet.addr(server).to_string(),
                    &reference,
                    &dest,
                    image.all,
                );
                assert!(
                    out.status.success(),
                    "server {server}: skopeo copy {reference}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    fleet.logs()
                );
                assert_eq!(
                    inspect_raw(&fleet.addr(server).to_string(), &reference),
                    image.manifest,
                    "server {server}: {reference}'s manifest"
                );
            }
        }
    }
    // dockerd with the server as its registry mirror, by tag and by digest.
    for server in [c, d] {
        let docker = Dockerd::start(&fleet.addr(server).to_string());
        for image in &images {
            let name = image.repo.trim_start_matches("library/");
            for reference in [
                format!("{name}:{}", image.tag),
                format!("{name}@{}", image.digest),
            ] {
                let out = docker.docker(&["pull", &reference]);
                assert!(
                    out.status.success(),
                    "server {server}: docker pull {reference}: {}\n--- dockerd ---\n{}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    docker.log_text(),
                    fleet.logs()
                );
            }
        }
        assert!(
            !docker.log_text().contains("Attempting next endpoint"),
            "server {server}: dockerd fell back from the mirror:\n{}",
            docker.log_text()
        );
    }
    assert!(
        hole.accepted() > 0,
        "the black hole was asked (the upstream was really down)"
    );
    // Nothing came from the upstream after the restart: every answer of C and D was the fleet's.
    for server in [c, d] {
        let m = fleet.servers[server].metrics();
        // Every source is exported at 0 from the start.
        assert_eq!(
            metric(&m, "regcache_fills_total{source=\"upstream\"}"),
            Some(0.0),
            "server {server} filled from the upstream:\n{m}"
        );
        assert!(
            metric(&m, "regcache_fills_total{source=\"peer\"}").is_some_and(|n| n >= 1.0),
            "server {server} filled nothing from its peers:\n{m}"
        );
    }
}

#[test]
fn two_servers_missing_the_same_blob_during_an_outage_answer_each_other_at_once() {
    // The upstream refuses connections; one failure opens each server's breaker.
    let dead = SocketAddr::from(([127, 0, 0, 1], crate::support::process::free_port()));
    let fleet = Fleet::start(2, &format!("http://{dead}"), "failure_threshold = 1\n");
    fleet.wait_formed();
    let blob = |n: u8| format!("/v2/team/app/blobs/{}", sha256_digest(&[n; 64]));
    for i in 0..2 {
        let f = timed_get(fleet.addr(i), &blob(i as u8), &[], None);
        assert_eq!(f.status, 503, "server {i}: the upstream is down");
    }
    // Both miss the same blob at the same moment: each asks the other who holds it, while its
    // own fill is still looking for a source. Neither may wait for the other's fill.
    let barrier = Barrier::new(2);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let (barrier, path, addr) = (&barrier, blob(9), fleet.addr(i));
                s.spawn(move || {
                    barrier.wait();
                    timed_get(addr, &path, &[], None).status
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    assert_eq!(statuses, [503, 503], "nobody holds it: 503 on both");
    for (i, s) in fleet.servers.iter().enumerate() {
        let states = peer_states(s);
        assert!(
            states.iter().all(|(_, up, _)| *up),
            "server {i} marked its peer down for answering late: {states:?}\n{}",
            fleet.logs()
        );
        let m = s.metrics();
        assert!(
            !m.contains("result=\"timeout\""),
            "server {i}: a peer request timed out:\n{m}"
        );
    }
}

#[test]
fn a_blob_the_upstream_does_not_have_is_asked_of_it_once_through_the_owner() {
    let upstream = Registry::start_seeded();
    let fleet = Fleet::start(2, &upstream.url(), "");
    fleet.wait_formed();
    let missing = sha256_digest(b"no such layer");
    let asker = fleet.ranked(&missing)[1];
    let f = timed_get(
        fleet.addr(asker),
        &format!("/v2/small/oci/blobs/{missing}"),
        &[],
        None,
    );
    assert_eq!(f.status, 404, "the owner's upstream said 404: {f:?}");
    let asked: Vec<_> = upstream
        .access_log()
        .lines()
        .filter(|l| l.contains(&missing))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        asked.len(),
        1,
        "the owner's 404 is the answer; the upstream is not asked again: {asked:?}"
    );
}

#[test]
fn during_an_outage_the_most_recently_confirmed_tag_record_of_the_fleet_wins() {
    let mut upstream = Registry::start_seeded();
    let fleet = Fleet::start(
        3,
        &upstream.url(),
        "freshness = \"1s\"\nconnect_timeout = \"1s\"\nheader_timeout = \"2s\"\n",
    );
    fleet.wait_formed();
    let (a, b, c) = (0, 1, 2);
    let by_tag = "/v2/small/docker/manifests/latest";
    let get_tag = |server: usize| {
        http_get(fleet.addr(server), by_tag, &[("Accept", accept_all())]).expect("GET by tag")
    };
    // A confirms the tag at one digest; then the tag moves upstream, and B confirms the new one.
    let old = get_tag(a);
    assert_eq!(old.status, 200);
    let host = upstream.host_port();
    crate::support::registry::skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{host}/small/oci:latest"),
        &format!("docker://{host}/small/docker:latest"),
    ]);
    std::thread::sleep(Duration::from_millis(50));
    let new = get_tag(b);
    assert_eq!(new.status, 200);
    let (old_d, new_d) = (sha256_digest(&old.body), sha256_digest(&new.body));
    assert_ne!(old_d, new_d, "the tag moved upstream");

    // The upstream goes dark. C never pulled the tag; A holds the older record.
    let addr = upstream.addr();
    upstream.stop();
    let _hole = BlackHole::start(addr);
    std::thread::sleep(Duration::from_millis(1100)); // both records are past `freshness`
    for server in [c, a] {
        let r = get_tag(server);
        assert_eq!(r.status, 200, "server {server}\n{}", fleet.logs());
        assert_eq!(
            sha256_digest(&r.body),
            new_d,
            "server {server}: B's record ({new_d}) was confirmed after A's ({old_d})"
        );
        assert!(
            r.header("warning").is_some_and(|w| w.starts_with("110")),
            "server {server}: served stale: {:?}",
            r.headers
        );
    }
}

/// An image as a client pulls it, read from the upstream: the manifest by tag, each child of an
/// index by digest, and every blob (digest).
struct Held {
    repo: &'static str,
    tag: &'static str,
    manifest: Vec<u8>,
    children: Vec<(String, Vec<u8>)>,
    blobs: Vec<String>,
}

impl Held {
    fn read(upstream: &Registry, repo: &'static str, tag: &'static str) -> Held {
        let get = |reference: &str| upstream_manifest(upstream, repo, reference);
        let manifest = get(tag);
        let m: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
        let children: Vec<(String, Vec<u8>)> = m["manifests"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|c| {
                        let d = c["digest"].as_str().expect("child digest").to_owned();
                        let body = get(&d);
                        (d, body)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut blobs: Vec<String> = image_blobs(upstream, repo, tag)
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        blobs.dedup();
        Held {
            repo,
            tag,
            manifest,
            children,
            blobs,
        }
    }

    /// Pulls the image from `server` as a client does (the manifest by tag, the children by
    /// digest, then each blob in turn); what went wrong, if anything.
    fn pull(&self, server: SocketAddr) -> Vec<String> {
        let mut wrong = Vec::new();
        let mut check = |path: String, ok: &dyn Fn(&[u8]) -> bool| match http_get(
            server,
            &path,
            &[("Accept", accept_all())],
        ) {
            Some(r) if r.status == 200 && ok(&r.body) => {}
            Some(r) => wrong.push(format!(
                "{path}: {} ({} bytes{})",
                r.status,
                r.body.len(),
                if r.status == 200 { ", wrong bytes" } else { "" }
            )),
            None => wrong.push(format!("{path}: no answer")),
        };
        let (repo, tag) = (self.repo, self.tag);
        check(format!("/v2/{repo}/manifests/{tag}"), &|b| {
            b == self.manifest.as_slice()
        });
        for (d, body) in &self.children {
            check(format!("/v2/{repo}/manifests/{d}"), &|b| {
                b == body.as_slice()
            });
        }
        for d in &self.blobs {
            check(format!("/v2/{repo}/blobs/{d}"), &|b| sha256_digest(b) == *d);
        }
        wrong
    }
}

#[test]
fn with_the_upstream_black_holed_every_image_any_server_holds_is_pullable_on_every_server() {
    // The bench's fleet outage phase: each server pulls one image; the small images share their
    // config and layer blobs, so most blobs a server is asked for it holds for another
    // repository. The upstream then accepts connections and never answers (its header_timeout
    // applies, shortened here from 30 s to keep the test short); the breaker opens after the
    // default 3 failures, while requests wait on it.
    let mut upstream = Registry::start_seeded();
    let upstream_addr = upstream.addr();
    let fleet = Fleet::start(
        4,
        &upstream.url(),
        "freshness = \"10m\"\nconnect_timeout = \"1s\"\nheader_timeout = \"2s\"\n",
    );
    fleet.wait_formed();
    let images = [
        Held::read(&upstream, "small/oci", "latest"),
        Held::read(&upstream, "small/docker", "latest"),
        Held::read(&upstream, "library/busybox", "latest"),
        Held::read(&upstream, "multi/oci", "latest"),
    ];
    for (server, image) in images.iter().enumerate() {
        let wrong = image.pull(fleet.addr(server));
        assert!(
            wrong.is_empty(),
            "server {server} pulling {} with the upstream up: {wrong:?}\n{}",
            image.repo,
            fleet.logs()
        );
    }

    upstream.stop();
    let hole = BlackHole::start(upstream_addr);
    let mut failed = Vec::new();
    for server in 0..fleet.servers.len() {
        for image in &images {
            for w in image.pull(fleet.addr(server)) {
                failed.push(format!("server {server}, {}: {w}", image.repo));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "images held by some server that another could not pull from its peers:\n{}\n{}",
        failed.join("\n"),
        fleet.logs()
    );
    assert!(
        hole.accepted() > 0,
        "the black hole was asked (the upstream was really down)"
    );
}

#[test]
fn an_owner_whose_upstream_fails_sends_the_asking_server_to_the_holders_before_its_own_upstream() {
    let mut upstream = Registry::start_seeded();
    let upstream_addr = upstream.addr();
    let mut fleet = Fleet::start(3, &upstream.url(), "header_timeout = \"2s\"\n");
    fleet.wait_formed();
    let image = Held::read(&upstream, "small/oci", "latest");
    let blob = image.blobs[0].clone();
    let ranked = fleet.ranked(&blob);
    let (owner, holder, asker) = (ranked[0], ranked[1], ranked[2]);
    // The holder pulls the image while the blob's owner is down, so that only it holds the blob.
    fleet.servers[owner].kill9();
    let wrong = image.pull(fleet.addr(holder));
    assert!(wrong.is_empty(), "the holder's pull: {wrong:?}");
    fleet.servers[owner].restart();
    fleet.wait_formed();

    // The upstream goes dark. The asker's breaker is closed: it asks the owner, which waits for
    // its upstream and answers 503; the holder gives the blob.
    upstream.stop();
    let _hole = BlackHole::start(upstream_addr);
    let r = http_get(
        fleet.addr(asker),
        &format!("/v2/small/oci/blobs/{blob}"),
        &[],
    )
    .expect("GET the blob");
    assert_eq!(r.status, 200, "{}", fleet.logs());
    assert_eq!(sha256_digest(&r.body), blob, "the blob's bytes");
    let m = fleet.servers[asker].metrics();
    assert_eq!(
        metric(
            &m,
            "regcache_upstream_errors_total{upstream=\"docker\",kind=\"timeout\"}"
        )
        .unwrap_or(0.0),
        0.0,
        "after the owner's 503 the asker asked its own upstream before the holder:\n{m}"
    );
    let owner_m = fleet.servers[owner].metrics();
    assert!(
        metric(
            &owner_m,
            "regcache_upstream_errors_total{upstream=\"docker\",kind=\"timeout\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "the owner's upstream was asked and timed out:\n{owner_m}"
    );
}

//! Outage survival: the drill that replays the motivating outage, the circuit breaker, and
//! restart hygiene.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::etcd::Etcd;
use crate::support::fake::FakeUpstream;
use crate::support::net::Acceptor;
use crate::support::process::{free_port, metric, Process};
use crate::support::regcache::{client, config_for, Regcache};
use crate::support::registry::{
    copy_to_dir, http_get, inspect_raw, sha256_digest, Registry, DOCKER_LIST, OCI_INDEX,
    SEEDED_IMAGES,
};

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// What the upstream's port does during an outage.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Accepts connections and never answers.
    BlackHole,
    /// Nothing listens: connections are refused.
    Refused,
    /// Answers every request with 503.
    Unavailable,
}

/// A server on the upstream's port that misbehaves as `fault` says, until dropped.
struct FaultyUpstream {
    _acceptor: Option<Acceptor>,
}

impl FaultyUpstream {
    fn start(addr: SocketAddr, fault: Fault) -> FaultyUpstream {
        if let Fault::Refused = fault {
            return FaultyUpstream { _acceptor: None };
        }
        let mut held: Vec<TcpStream> = Vec::new();
        let acceptor = Acceptor::bind(addr, move |mut s| match fault {
            Fault::BlackHole => held.push(s),
            _ => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                );
            }
        });
        FaultyUpstream {
            _acceptor: Some(acceptor),
        }
    }
}

/// One image to pull in the drill: reference by tag, reference by digest, and whether it is an index.
struct Warmed {
    by_tag: String,
    by_digest: String,
    all: bool,
}

#[test]
fn outage_drill_serves_every_warmed_image_after_kill9_with_upstream_and_config_store_down() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let mut upstream = Registry::start_seeded();
    let mut etcd = Etcd::start();
    // The remote layer shortens the freshness window, so every tag is past it during the outage;
    // that it is in force after the restart shows the last good remote copy was used.
    etcd.put(
        "regcache/config",
        "[upstreams.docker]\nfreshness = \"1s\"\n",
    );
    let data = work.path().join("data");
    let config = work.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[upstreams.docker]\nurl = \"{}\"\nfreshness = \"1h\"\nconnect_timeout = \"2s\"\nheader_timeout = \"2s\"\nidle_timeout = \"5s\"\n\
             [config_store]\nkind = \"etcd\"\nurl = \"{}\"\nkey = \"regcache/config\"\npoll_interval = \"200ms\"\n",
            data.display(),
            upstream.url(),
            etcd.url()
        ),
    )
    .expect("write config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut rc = Process::start(&config, addr, &work.path().join("regcache.log"));
    let last_good = data.join("config-store.last-good.toml");
    let t = Instant::now();
    while !last_good.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        last_good.exists(),
        "remote config never applied:\n{}",
        rc.log_text()
    );

    // Warm the cache through regcache: single- and multi-arch, Docker and OCI.
    let mut warmed = Vec::new();
    for (i, (repo, tag, mt)) in SEEDED_IMAGES.iter().enumerate() {
        let all = *mt == OCI_INDEX || *mt == DOCKER_LIST;
        let by_tag = format!("{repo}:{tag}");
        let out = copy_to_dir(
            &addr.to_string(),
            &by_tag,
            &work.path().join(format!("warm-{i}")),
            all,
        );
        assert!(
            out.status.success(),
            "warming {by_tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = sha256_digest(&inspect_raw(&addr.to_string(), &by_tag));
        warmed.push(Warmed {
            by_tag,
            by_digest: format!("{repo}@{digest}"),
            all,
        });
    }
    let upstream_addr = upstream.addr();
    upstream.stop();
    etcd.stop();

    for fault in [Fault::BlackHole, Fault::Refused, Fault::Unavailable] {
        let _faulty = FaultyUpstream::start(upstream_addr, fault);
        rc.kill9();
        rc.restart();
        std::thread::sleep(Duration::from_millis(1100)); // every tag is now past its window

        // Manifests by tag, timed one by one: none may wait longer than the connect timeout
        // (2 s) plus a margin; stale answers carry Warning: 110.
        std::thread::scope(|s| {
            let handles: Vec<_> = warmed
                .iter()
                .map(|w| {
                    s.spawn(move || {
                        let (repo, tag) = w.by_tag.split_once(':').expect("repo:tag");
                        let t = Instant::now();
                        let r = http_get(
                            addr,
                            &format!("/v2/{repo}/manifests/{tag}"),
                            &[("Accept", ACCEPT_ALL)],
                        )
                        .expect("GET manifest");
                        (
                            w.by_tag.clone(),
                            r.status,
                            r.header("warning").map(str::to_owned),
                            t.elapsed(),
                        )
                    })
                })
                .collect();
            for h in handles {
                let (image, status, warning, took) = h.join().expect("request thread");
                assert_eq!(status, 200, "{fault:?}: {image} by tag");
                assert!(
                    warning.as_deref().is_some_and(|w| w.starts_with("110")),
                    "{fault:?}: {image} should be served stale with Warning: 110, got {warning:?}"
                );
                assert!(
                    took < Duration::from_secs(3),
                    "{fault:?}: {image} took {took:?}"
                );
            }
        });

        // Full pulls with skopeo, by tag and by digest, many at once.
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for (i, w) in warmed.iter().enumerate() {
                for (j, reference) in [&w.by_tag, &w.by_digest].into_iter().enumerate() {
                    let dest = work.path().join(format!("{fault:?}-{i}-{j}"));
                    let host = addr.to_string();
                    handles.push(s.spawn(move || {
                        let out = copy_to_dir(&host, reference, &dest, w.all);
                        (reference.clone(), out)
                    }));
                }
            }
            for h in handles {
                let (reference, out) = h.join().expect("skopeo thread");
                assert!(
                    out.status.success(),
                    "{fault:?}: pulling {reference} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        });

        // A tag never cached is a 503 (the image may exist), never a 404.
        let r = http_get(addr, "/v2/never/cached/manifests/latest", &[]).expect("GET uncached");
        assert_eq!(
            r.status,
            503,
            "{fault:?}: {}",
            String::from_utf8_lossy(&r.body)
        );

        let m = rc.metrics();
        assert_eq!(
            metric(&m, "regcache_upstream_up{upstream=\"docker\"}"),
            Some(0.0),
            "{fault:?}: the upstream should be reported down:\n{m}"
        );
        let stale = metric(&m, "regcache_cache_outcomes_total{outcome=\"stale\"}").unwrap_or(0.0);
        assert!(
            stale >= warmed.len() as f64,
            "{fault:?}: stale answers {stale}:\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_failures_then_a_background_probe_closes_it() {
    let fake = FakeUpstream::start().await;
    fake.add_image("app/x", "v1", bytes::Bytes::from_static(b"layer"));
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "freshness = \"1ms\"\nfailure_threshold = 2\nprobe_max_interval = \"1s\"",
        "",
    ));
    let c = client();
    let url = format!("{}/v2/app/x/manifests/v1", rc.url());
    let get = |c: &reqwest::Client| c.get(&url).header("accept", ACCEPT_ALL).send();
    assert_eq!(get(&c).await.expect("warm").status(), 200);

    fake.set_status(Some(503));
    for _ in 0..2 {
        let r = get(&c).await.expect("stale GET");
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().get("warning").is_some(),
            "stale answer without Warning"
        );
    }
    // Now down: answers come from the cache without asking the upstream.
    let before = fake.request_count();
    for _ in 0..5 {
        assert_eq!(get(&c).await.expect("GET while down").status(), 200);
    }
    let m = c
        .get(format!("{}/metrics", rc.url()))
        .send()
        .await
        .expect("metrics");
    let m = m.text().await.expect("metrics text");
    assert_eq!(
        metric(&m, "regcache_upstream_up{upstream=\"docker\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(
        fake.request_count() <= before + 1,
        "while down, clients should not wait for the upstream: {} requests",
        fake.request_count() - before
    );
    let r = c
        .get(format!("{}/v2/app/missing/manifests/v1", rc.url()))
        .send()
        .await
        .expect("miss while down");
    assert_eq!(r.status(), 503, "a miss while down is 503");

    fake.set_status(None);
    let t = Instant::now();
    loop {
        let m = c
            .get(format!("{}/readyz", rc.url()))
            .send()
            .await
            .expect("readyz");
        let body = m.text().await.expect("readyz body");
        if body.contains("\"up\":true") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the probe never closed the circuit: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = get(&c).await.expect("GET after recovery");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("warning").is_none(),
        "fresh answer after recovery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_never_holds_a_cached_tag_longer_than_the_connect_timeout() {
    let fake = FakeUpstream::start().await;
    fake.add_image("app/y", "v1", bytes::Bytes::from_static(b"layer"));
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "freshness = \"1ms\"\nconnect_timeout = \"1s\"\nheader_timeout = \"10s\"",
        "",
    ));
    let c = client();
    let url = format!("{}/v2/app/y/manifests/v1", rc.url());
    assert_eq!(c.get(&url).send().await.expect("warm").status(), 200);
    fake.set_stall(true);
    let t = Instant::now();
    let r = c.get(&url).send().await.expect("GET while stalled");
    assert_eq!(r.status(), 200);
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
    assert!(r.headers().get("warning").is_some());
}

#[test]
fn a_data_directory_in_use_is_refused_naming_the_pid_and_leftovers_are_cleaned() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let data = work.path().join("data");
    let config = work.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n",
            data.display()
        ),
    )
    .expect("config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut first = Process::start(&config, addr, &work.path().join("1.log"));
    // A fill that a killed regcache left in its own data directory.
    first.kill9();
    let leftover = data.join("tmp").join("fill-1-2-3");
    std::fs::write(&leftover, b"half a blob").expect("leftover");
    first.restart();
    assert!(
        !leftover.exists(),
        "a temporary file left by a killed process must be removed at start"
    );

    let other = free_port().to_string();
    let out = Process::run_to_end(&[
        "serve",
        "--config",
        &config.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{other}"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("in use") && err.contains(&first.pid().to_string()),
        "{err}"
    );

    // Same address, other data directory: a clear message about the address.
    let out = Process::run_to_end(&[
        "serve",
        "--listen",
        &addr.to_string(),
        "--data-dir",
        &work.path().join("data2").display().to_string(),
        "--upstream",
        "http://127.0.0.1:9",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already in use"), "{err}");

    // A lock left by a killed regcache is taken over.
    first.kill9();
    first.restart();
}

#[test]
fn starts_and_answers_v2_with_no_upstream_at_all() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = work.path().join("c.toml");
    // An upstream name that cannot resolve (no DNS here) and nothing listening anywhere.
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[upstreams.docker]\nurl = \"https://registry.invalid\"\n",
            work.path().join("data").display()
        ),
    )
    .expect("config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let t = Instant::now();
    let rc = Process::start(&config, addr, &work.path().join("log"));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "start took {:?}",
        t.elapsed()
    );
    let r = http_get(addr, "/v2/", &[]).expect("GET /v2/");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    let r = http_get(addr, "/v2/library/alpine/manifests/latest", &[]).expect("GET");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    drop(rc);
}

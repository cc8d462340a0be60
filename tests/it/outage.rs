//! Outage survival: the drill that replays the motivating outage, against a real upstream and
//! etcd. The circuit breaker and restart hygiene are in `offline::outage`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::etcd::Etcd;
use crate::support::media::{accept_all, DOCKER_LIST, OCI_INDEX};
use crate::support::net::Acceptor;
use crate::support::process::{free_port, metric, Process};
use crate::support::registry::{
    copy_to_dir, http_get, inspect_raw, sha256_digest, Registry, SEEDED_IMAGES,
};

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
                            &[("Accept", accept_all())],
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

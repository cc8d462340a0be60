//! Outage survival against the in-process fake upstream: the circuit breaker and its probe, a
//! stalled upstream, and restart hygiene.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::fake::{FakeUpstream, TokenAnswer};
use crate::support::media::accept_all;
use crate::support::process::{free_port, metric, Process};
use crate::support::regcache::{client, config_for, Regcache};
use crate::support::registry::http_get;

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
    let get = |c: &reqwest::Client| c.get(&url).header("accept", accept_all()).send();
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
async fn a_broken_token_service_opens_the_circuit_and_probes_keep_it_open_until_it_answers() {
    let fake = FakeUpstream::start().await;
    let (mdigest, _) = fake.add_image("app/t", "v1", bytes::Bytes::from_static(b"layer"));
    fake.set_token_auth(true);
    fake.set_token_answer(TokenAnswer::Status(404));
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "failure_threshold = 2\nprobe_max_interval = \"1s\"",
        "",
    ));
    let upstream = Arc::clone(&rc.app.routing().upstreams()[0]);
    let c = client();
    let url = format!("{}/v2/app/t/manifests/v1", rc.url());
    for i in 0..2 {
        let r = c.get(&url).send().await.expect("GET");
        let status = r.status();
        let body = r.text().await.expect("body");
        assert_eq!(
            status,
            503,
            "request {i} with a token service answering 404: {body}; upstream saw {:?}",
            fake.requests()
        );
    }
    assert!(
        !upstream.is_up(),
        "two token failures in a row (failure_threshold = 2) mark the upstream down"
    );

    // The probe asks the token service too (a registry answering 401 is not usable without it),
    // so the circuit stays open: a second probe happens only after the first one failed.
    let t = Instant::now();
    while fake.hits("GET", "/v2/") < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no second probe: {:?}",
            fake.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !upstream.is_up(),
        "a probe closed the circuit although the token service still answers 404: {:?}",
        fake.requests()
    );
    let reqs = fake.requests();
    let probes: Vec<usize> = (0..reqs.len())
        .filter(|i| reqs[*i].method == "GET" && reqs[*i].path == "/v2/")
        .collect();
    assert!(
        reqs.get(probes[0] + 1).is_some_and(|r| r.path == "/token"),
        "the first probe did not ask the token service: {reqs:?}"
    );

    fake.set_token_answer(TokenAnswer::Token);
    let t = Instant::now();
    while !upstream.is_up() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the probe never closed the circuit once tokens came back: {:?}",
            fake.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = c.get(&url).send().await.expect("GET after recovery");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(mdigest.as_str())
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

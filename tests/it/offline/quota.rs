//! Upstream quota against the in-process fake upstream: its rate-limit headers
//! (`ratelimit-limit`, `ratelimit-remaining`, `docker-ratelimit-source`) in the metrics, `/readyz`
//! and regcache's own answers; a `429`'s `Retry-After` holding every request back; the
//! `quota_reserve` that stops revalidation until the quota's window has passed; and
//! `regcache prefetch --on-quota`. Requests are counted at the fake.

use std::time::Duration;

use bytes::Bytes;

use crate::prefetch::prefetch;
use crate::support::fake::FakeUpstream;
use crate::support::process::metric;
use crate::support::regcache::{config_for, error_code, Regcache};
use crate::support::reply::{get, Reply};

const SOURCE: &str = "192.0.2.7";

/// `GET /readyz`, the first upstream's entry.
async fn readyz_upstream(rc: &Regcache) -> serde_json::Value {
    let r = get(&format!("{}/readyz", rc.url())).await;
    r.json("readyz")["upstreams"][0].clone()
}

/// `GET /v2/<repo>/manifests/<reference>` through `rc`.
async fn manifest(rc: &Regcache, repo: &str, reference: &str) -> Reply {
    get(&format!("{}/v2/{repo}/manifests/{reference}", rc.url())).await
}

fn assert_status(r: &Reply, status: u16, what: &str) {
    assert_eq!(r.status.as_u16(), status, "{what}: {}", r.describe());
}

/// A quota report (`/readyz`'s `ratelimit`, prefetch's `quota`): a limit of 100 in 21600 s,
/// counted for [`SOURCE`], with `remaining` left, and when it was said.
fn assert_quota(q: &serde_json::Value, remaining: u64) {
    let expected = serde_json::json!({
        "limit": 100, "remaining": remaining, "window_seconds": 21600, "source": SOURCE,
        "observed_at": q["observed_at"],
    });
    assert_eq!(q, &expected);
    assert!(
        q["observed_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{q}"
    );
}

/// The requests the fake received from index `since` on, as `METHOD path` lines.
fn since(fake: &FakeUpstream, since: usize) -> Vec<String> {
    fake.requests()
        .into_iter()
        .skip(since)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_rate_limit_headers_reach_the_metrics_and_readyz_from_gets_and_heads() {
    let fake = FakeUpstream::start().await;
    fake.add_image("team/app", "1.0", Bytes::from_static(b"layer"));
    fake.set_ratelimit(Some((100, 80, 21600, SOURCE)));
    // Freshness 0: every tag request is revalidated with a HEAD.
    let rc = Regcache::start(&config_for(&fake.url(), "freshness = \"0s\"", ""));
    assert!(
        readyz_upstream(&rc).await["ratelimit"].is_null(),
        "nothing known before the upstream answered"
    );

    let r = manifest(&rc, "team/app", "1.0").await;
    assert_status(&r, 200, "the first pull");
    let m = rc.app.metrics.render();
    let value = |name: &str| metric(&m, &format!("{name}{{upstream=\"docker\"}}"));
    assert_eq!(
        (
            value("regcache_upstream_ratelimit_limit"),
            value("regcache_upstream_ratelimit_remaining"),
            value("regcache_upstream_ratelimit_window_seconds"),
        ),
        (Some(100.0), Some(79.0), Some(21600.0)),
        "the GET spent one pull:\n{m}"
    );
    assert_quota(&readyz_upstream(&rc).await["ratelimit"], 79);

    // The quota moved meanwhile (another client of the upstream); the revalidation's HEAD says so.
    fake.set_ratelimit(Some((100, 42, 21600, SOURCE)));
    let asked = fake.request_count();
    let r = manifest(&rc, "team/app", "1.0").await;
    assert_status(&r, 200, "the second pull");
    assert_eq!(
        r.header("x-regcache-cache"),
        Some("revalidated"),
        "{}",
        r.describe()
    );
    assert_eq!(
        since(&fake, asked),
        vec!["HEAD /v2/team/app/manifests/1.0"],
        "a HEAD, which spends no pull"
    );
    let m = rc.app.metrics.render();
    assert_eq!(
        metric(
            &m,
            "regcache_upstream_ratelimit_remaining{upstream=\"docker\"}"
        ),
        Some(42.0),
        "read from the HEAD's answer:\n{m}"
    );
    assert_eq!(readyz_upstream(&rc).await["ratelimit"]["remaining"], 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_went_upstream_carry_its_rate_limit_headers_and_hits_do_not() {
    let fake = FakeUpstream::start().await;
    let (_, layer) = fake.add_image("team/app", "1.0", Bytes::from_static(b"layer bytes"));
    fake.set_ratelimit(Some((100, 80, 21600, SOURCE)));
    let rc = Regcache::with_upstream(&fake.url());

    let r = manifest(&rc, "team/app", "1.0").await;
    assert_status(&r, 200, "a miss");
    assert_eq!(r.header("x-regcache-cache"), Some("miss"));
    assert_eq!(
        (
            r.header("ratelimit-limit"),
            r.header("ratelimit-remaining"),
            r.header("docker-ratelimit-source")
        ),
        (Some("100;w=21600"), Some("79;w=21600"), Some(SOURCE)),
        "the upstream's headers, as it sent them: {}",
        r.describe()
    );
    let blob = get(&format!("{}/v2/team/app/blobs/{layer}", rc.url())).await;
    assert_status(&blob, 200, "a blob miss");
    assert_eq!(blob.header("x-regcache-cache"), Some("miss"));
    assert_eq!(blob.header("ratelimit-remaining"), Some("79;w=21600"));

    let asked = fake.request_count();
    let hit = manifest(&rc, "team/app", "1.0").await;
    assert_eq!(
        hit.header("x-regcache-cache"),
        Some("hit"),
        "{}",
        hit.describe()
    );
    let blob = get(&format!("{}/v2/team/app/blobs/{layer}", rc.url())).await;
    assert_eq!(blob.header("x-regcache-cache"), Some("hit"));
    assert_eq!(fake.request_count(), asked, "{:?}", since(&fake, asked));
    for r in [&hit, &blob] {
        for h in [
            "ratelimit-limit",
            "ratelimit-remaining",
            "docker-ratelimit-source",
        ] {
            assert_eq!(
                r.header(h),
                None,
                "a hit did not go upstream: {}",
                r.describe()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_sends_nothing_upstream_until_it_has_passed() {
    let fake = FakeUpstream::start().await;
    fake.add_image("team/app", "1.0", Bytes::from_static(b"layer"));
    fake.add_image("team/app", "2.0", Bytes::from_static(b"other layer"));
    // Freshness 0: every request for the cached tag wants a HEAD upstream. Threshold 1: the 429
    // also opens the breaker, whose probe (0.5 s later) must wait for the hold too.
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "freshness = \"0s\"\nfailure_threshold = 1",
        "",
    ));
    let cached = manifest(&rc, "team/app", "1.0").await;
    assert_status(&cached, 200, "caching the tag");
    let digest = cached.header("docker-content-digest").map(str::to_owned);

    fake.set_status(Some(429));
    fake.set_retry_after(Some("4"));
    let r = manifest(&rc, "team/app", "1.0").await;
    assert_status(&r, 200, "the revalidation that got the 429");
    assert_eq!(
        r.header("x-regcache-cache"),
        Some("stale"),
        "{}",
        r.describe()
    );
    let asked = fake.request_count();
    assert_eq!(
        since(&fake, asked - 1),
        vec!["HEAD /v2/team/app/manifests/1.0"]
    );

    // During the hold: the cached tag is served stale, a miss gets 429 with the time left.
    let r = manifest(&rc, "team/app", "1.0").await;
    assert_status(&r, 200, "a cached tag during the hold");
    assert_eq!(
        r.header("x-regcache-cache"),
        Some("stale"),
        "{}",
        r.describe()
    );
    assert_eq!(r.header("docker-content-digest").map(str::to_owned), digest);
    assert!(
        r.header("warning").is_some_and(|w| w.starts_with("110 ")),
        "{}",
        r.describe()
    );
    let miss = manifest(&rc, "team/app", "2.0").await;
    assert_status(&miss, 429, "a miss during the hold");
    assert_eq!(error_code(&miss.body), "TOOMANYREQUESTS");
    let secs: u64 = miss
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After in seconds: {}", miss.describe()));
    assert!((1..=4).contains(&secs), "the time left of the hold: {secs}");
    let blob = get(&format!(
        "{}/v2/team/app/blobs/sha256:{}",
        rc.url(),
        "1".repeat(64)
    ))
    .await;
    assert_status(&blob, 429, "a blob miss during the hold");
    // Past the breaker's first probe (0.5 s after it opened).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let up = readyz_upstream(&rc).await;
    assert!(
        up["retry_after_seconds"].as_u64().is_some_and(|s| s >= 1),
        "everything above happened during the hold: {up}"
    );
    assert_eq!(
        since(&fake, asked),
        Vec::<String>::new(),
        "nothing reached the upstream during the hold, not even the breaker's probe"
    );

    // Once it has passed, the upstream is asked again.
    fake.set_status(None);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let up = readyz_upstream(&rc).await;
        if up["retry_after_seconds"].is_null() && up["up"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hold never ended or the probe never closed the circuit: {up}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reqs = since(&fake, asked);
    assert_eq!(
        reqs.first().map(String::as_str),
        Some("GET /v2/"),
        "the probe went first, after the hold: {reqs:?}"
    );
    let r = manifest(&rc, "team/app", "1.0").await;
    assert_eq!(
        r.header("x-regcache-cache"),
        Some("revalidated"),
        "{}",
        r.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_quota_reserve_tags_are_served_without_revalidation_until_the_window_has_passed() {
    const WINDOW: u64 = 4;
    let fake = FakeUpstream::start().await;
    fake.add_image("team/app", "1.0", Bytes::from_static(b"layer"));
    fake.add_image("team/other", "1.0", Bytes::from_static(b"other layer"));
    fake.set_ratelimit(Some((100, 10, WINDOW, SOURCE)));
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "freshness = \"0s\"\nquota_reserve = 5",
        "",
    ));
    let first = manifest(&rc, "team/app", "1.0").await;
    assert_status(&first, 200, "caching the tag");
    let old = first.header("docker-content-digest").map(str::to_owned);

    // Above the reserve, every request revalidates.
    let asked = fake.request_count();
    let r = manifest(&rc, "team/app", "1.0").await;
    assert_eq!(r.header("x-regcache-cache"), Some("revalidated"));
    assert_eq!(since(&fake, asked), vec!["HEAD /v2/team/app/manifests/1.0"]);

    // This HEAD's answer says the quota is down to the reserve.
    fake.set_ratelimit(Some((100, 5, WINDOW, SOURCE)));
    let r = manifest(&rc, "team/app", "1.0").await;
    assert_eq!(r.header("x-regcache-cache"), Some("revalidated"));
    // The tag moves upstream: regcache does not see it while it keeps the reserve.
    let (moved, _) = fake.add_image("team/app", "1.0", Bytes::from_static(b"new layer"));
    let asked = fake.request_count();
    for i in 0..3 {
        let r = manifest(&rc, "team/app", "1.0").await;
        assert_status(&r, 200, &format!("pull {i} at the reserve"));
        assert_eq!(
            r.header("x-regcache-cache"),
            Some("stale"),
            "{}",
            r.describe()
        );
        assert!(r.header("warning").is_some_and(|w| w.starts_with("110 ")));
        assert_eq!(r.header("docker-content-digest").map(str::to_owned), old);
    }
    assert_eq!(
        since(&fake, asked),
        Vec::<String>::new(),
        "no revalidation at the reserve"
    );
    assert_eq!(readyz_upstream(&rc).await["ratelimit"]["remaining"], 5);
    // A miss still goes upstream (and its answer starts the window again).
    let r = manifest(&rc, "team/other", "1.0").await;
    assert_eq!(
        r.header("x-regcache-cache"),
        Some("miss"),
        "{}",
        r.describe()
    );
    assert_eq!(
        since(&fake, asked),
        vec!["GET /v2/team/other/manifests/1.0"]
    );

    // The window passes (and the upstream's quota filled up meanwhile).
    fake.set_ratelimit(Some((100, 50, WINDOW, SOURCE)));
    tokio::time::sleep(Duration::from_millis(WINDOW * 1000 + 300)).await;
    let asked = fake.request_count();
    let r = manifest(&rc, "team/app", "1.0").await;
    assert_status(&r, 200, "the first pull after the window");
    assert_eq!(
        r.header("docker-content-digest"),
        Some(moved.as_str()),
        "revalidated again: the moved tag is seen"
    );
    assert_eq!(
        since(&fake, asked),
        vec![
            "HEAD /v2/team/app/manifests/1.0",
            "GET /v2/team/app/manifests/1.0"
        ]
    );
    let asked = fake.request_count();
    let r = manifest(&rc, "team/app", "1.0").await;
    assert_eq!(
        r.header("x-regcache-cache"),
        Some("revalidated"),
        "{}",
        r.describe()
    );
    assert_eq!(since(&fake, asked), vec!["HEAD /v2/team/app/manifests/1.0"]);
}

/// Starts a regcache at `fake` whose `quota_reserve` is `reserve`, and writes the same
/// configuration to a file for `prefetch -c` (which reads the reserve from it).
fn with_reserve(fake: &FakeUpstream, reserve: u64) -> (Regcache, tempfile::TempDir, String) {
    let config = config_for(&fake.url(), &format!("quota_reserve = {reserve}"), "");
    let rc = Regcache::start(&config);
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("config dir");
    let path = dir.path().join("regcache.toml");
    std::fs::write(&path, &config).expect("write config");
    (rc, dir, path.display().to_string())
}

/// `prefetch ARGS` through `server` on the blocking pool (the fake runs on this runtime).
async fn run_prefetch(server: &str, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let server = server.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        prefetch(&server, &args)
    })
    .await
    .expect("prefetch thread");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not a JSON summary ({e}): {stderr}"));
    (out.status.code(), summary, stderr)
}

fn image<'a>(summary: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    summary["images"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["image"] == name))
        .unwrap_or_else(|| panic!("{name} missing: {summary}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_prints_the_remaining_quota_the_server_passed_on() {
    let fake = FakeUpstream::start().await;
    fake.add_image("team/app", "1.0", Bytes::from_static(b"layer"));
    fake.set_ratelimit(Some((100, 80, 21600, SOURCE)));
    let (rc, _dir, config) = with_reserve(&fake, 0);
    let (code, summary, stderr) =
        run_prefetch(&rc.url(), &["-c", &config, "--json", "team/app:1.0"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "upstream docker: 79 of 100 pulls left in its 21600 s window (counted for {SOURCE})"
        )),
        "{stderr}"
    );
    assert_quota(&summary["quota"]["docker"], 79);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_on_quota_stop_exits_1_before_spending_the_reserve() {
    let fake = FakeUpstream::start().await;
    for repo in ["team/a", "team/b", "team/c"] {
        fake.add_image(repo, "1", Bytes::from(format!("layer of {repo}")));
    }
    // a leaves 6, b leaves 5: at the reserve, c must not be fetched.
    fake.set_ratelimit(Some((100, 7, 21600, SOURCE)));
    let (rc, _dir, config) = with_reserve(&fake, 5);
    let (code, summary, stderr) = run_prefetch(
        &rc.url(),
        &[
            "-c",
            &config,
            "--json",
            "--concurrency",
            "1",
            "team/a:1",
            "team/b:1",
            "team/c:1",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "stopping before spending the quota reserve: upstream docker has 5 of 100 pulls left"
        ) && stderr.contains("at or under its quota_reserve (5)"),
        "a clear message: {stderr}"
    );
    for done in ["team/a:1", "team/b:1"] {
        assert_eq!(image(&summary, done)["status"], "cached", "{summary}");
    }
    let c = image(&summary, "team/c:1");
    assert_eq!(c["status"], "failed", "{summary}");
    assert!(
        c["reason"]
            .as_str()
            .is_some_and(|r| r.contains("quota_reserve")),
        "{summary}"
    );
    assert_eq!(
        fake.hits("GET", "/v2/team/c/manifests/1"),
        0,
        "c was not pulled"
    );
    assert_eq!(fake.ratelimit_remaining(), Some(5), "the reserve is intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_on_quota_wait_waits_for_the_window_at_most_max_wait() {
    let fake = FakeUpstream::start().await;
    for repo in ["team/a", "team/b", "team/c", "team/d", "team/e", "team/f"] {
        fake.add_image(repo, "1", Bytes::from(format!("layer of {repo}")));
    }
    let (rc, _dir, config) = with_reserve(&fake, 5);
    let run = |max_wait: &str, images: [&str; 3]| {
        let mut a = vec![
            "-c".to_owned(),
            config.clone(),
            "--json".into(),
            "--concurrency".into(),
            "1".into(),
            "--on-quota".into(),
            "wait".into(),
            "--max-wait".into(),
            max_wait.into(),
        ];
        a.extend(images.iter().map(|i| i.to_string()));
        let url = rc.url();
        async move {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            run_prefetch(&url, &a).await
        }
    };
    // The first image leaves 6, the second 5: at the reserve, in a window of 2 s.
    fake.set_ratelimit(Some((100, 7, 2, SOURCE)));
    // A window longer than --max-wait: no wait, the run stops.
    let (code, summary, stderr) = run("1s", ["team/a:1", "team/b:1", "team/c:1"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        image(&summary, "team/c:1")["reason"]
            .as_str()
            .is_some_and(|r| r.contains("longer than --max-wait (1 s)")),
        "{summary}"
    );
    assert_eq!(fake.hits("GET", "/v2/team/c/manifests/1"), 0);
    assert!(!stderr.contains("waiting"), "{stderr}");

    // Within --max-wait: it waits for the window, then fetches the third image.
    fake.set_ratelimit(Some((100, 7, 2, SOURCE)));
    let (code, summary, stderr) = run("1m", ["team/d:1", "team/e:1", "team/f:1"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let waited = stderr
        .find("waiting 2 s for its window to pass")
        .unwrap_or_else(|| panic!("it says it waits: {stderr}"));
    let f_done = stderr
        .find("cached  team/f:1")
        .unwrap_or_else(|| panic!("f fetched: {stderr}"));
    assert!(waited < f_done, "it waited before f: {stderr}");
    assert_eq!(image(&summary, "team/f:1")["status"], "cached", "{summary}");
    assert_eq!(fake.hits("GET", "/v2/team/f/manifests/1"), 1);
}

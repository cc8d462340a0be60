//! The operator's view without anything installed: `GET /_regcache/status` (its schema, its access
//! rules, a black-holed upstream shown `down` with the tags it served stale), and `regcache
//! status` (its output, `--json` and exit codes), against the in-process fake upstream behind a
//! relay that can turn into a black hole.

use crate::support::fake::FakeUpstream;
use crate::support::media::accept_all;
use crate::support::net::Relay;
use crate::support::process::{free_port, Process};
use crate::support::regcache::{client, config_for, stored, Regcache};

/// Upstream keys that mark the upstream down at its first unanswered revalidation, which a black
/// hole holds for one second.
const DOWN_AT_ONCE: &str =
    "freshness = \"1ms\"\nfailure_threshold = 1\nconnect_timeout = \"1s\"\nprobe_max_interval = \"1s\"";

/// The fake upstream with `app/x:v1`, behind a relay, and regcache in front of the relay.
async fn behind_relay(extra: &str) -> (FakeUpstream, Relay, Regcache) {
    let fake = FakeUpstream::start().await;
    fake.add_image("app/x", "v1", bytes::Bytes::from_static(b"layer of x"));
    let relay = Relay::start(fake.addr());
    let rc = Regcache::start(&config_for(
        &format!("http://{}", relay.addr()),
        DOWN_AT_ONCE,
        extra,
    ));
    (fake, relay, rc)
}

/// [`behind_relay`] with `[access] htpasswd` admitting `ops` with the password `ops-pw` (the
/// directory holds the file).
async fn behind_htpasswd() -> (tempfile::TempDir, FakeUpstream, Relay, Regcache) {
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("ops:{}\n", bcrypt::hash("ops-pw", 4).expect("bcrypt")),
    )
    .expect("write htpasswd");
    let (fake, relay, rc) =
        behind_relay(&format!("[access]\nhtpasswd = \"{}\"", htpasswd.display())).await;
    (dir, fake, relay, rc)
}

/// `GET /_regcache/status` as JSON, checking the headers every answer of it has.
pub(crate) async fn status_json(url: &str) -> serde_json::Value {
    let r = client()
        .get(format!("{url}/_regcache/status"))
        .send()
        .await
        .expect("GET /_regcache/status");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store"),
        "the status is the state now: never cached"
    );
    let text = r.text().await.expect("status body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status is not JSON ({e}): {text}"))
}

/// Gets the blob `d` of `app/x` twice: a miss, then, once the fill committed it, a hit.
async fn get_blob_twice(rc: &Regcache, d: &str, layer: &[u8]) {
    for i in 0..2 {
        let r = client()
            .get(format!("{}/v2/app/x/blobs/{d}", rc.url()))
            .send()
            .await
            .expect("GET blob");
        assert_eq!(r.bytes().await.expect("blob body"), layer);
        // The answer ends before the commit: a request before it would join the fill.
        let t = std::time::Instant::now();
        while i == 0 && !stored(rc, d) {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "never committed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Pulls `app/x:v1`'s manifest once the upstream is black-holed, then waits until its
/// revalidation (which goes on in the background past `revalidate_budget`) failed and marked the
/// upstream down; whether the answer was stale.
async fn stale_until_down(rc: &Regcache) -> bool {
    let stale = pull_tag(rc).await;
    let upstream = std::sync::Arc::clone(&rc.app.routing().upstreams()[0]);
    let t = std::time::Instant::now();
    while upstream.is_up() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "the revalidation through the black hole never marked the upstream down"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stale
}

/// Pulls `app/x:v1`'s manifest; whether the answer was stale.
async fn pull_tag(rc: &Regcache) -> bool {
    let r = client()
        .get(format!("{}/v2/app/x/manifests/v1", rc.url()))
        .header("accept", accept_all())
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(r.status(), 200);
    r.headers().get("warning").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_a_black_holed_upstream_as_down_since_when_and_the_tags_it_served_stale() {
    let (_fake, relay, rc) = behind_relay("").await;
    assert!(!pull_tag(&rc).await, "the first pull is fresh");
    let s = status_json(&rc.url()).await;
    let up = &s["upstreams"][0];
    assert_eq!(up["name"], "docker", "{s}");
    assert_eq!(up["state"], "up", "{s}");
    assert_eq!(up["down_since"], serde_json::Value::Null, "{s}");
    assert_eq!(up["stale_last_hour"]["answers"], 0, "{s}");
    assert_eq!(s["healthy"], true, "{s}");

    relay.set_black_hole(true);
    assert!(
        stale_until_down(&rc).await,
        "the tag is served stale while the upstream is black-holed"
    );
    let s = status_json(&rc.url()).await;
    let up = &s["upstreams"][0];
    assert_eq!(up["state"], "down", "a black-holed upstream is `down`: {s}");
    let now = regcache::store::now_secs();
    let since = up["down_since"].as_u64().unwrap_or_else(|| panic!("{s}"));
    assert!(
        since <= now && since + 60 > now,
        "down since {since}, now {now}: {s}"
    );
    assert_eq!(up["stale_last_hour"]["answers"], 1, "{s}");
    assert_eq!(up["stale_last_hour"]["complete"], true, "{s}");
    assert_eq!(up["stale_last_hour"]["tags"][0]["tag"], "app/x:v1", "{s}");
    assert_eq!(up["stale_last_hour"]["tags"][0]["answers"], 1, "{s}");
    assert_eq!(s["healthy"], false, "a down upstream is not healthy: {s}");
    assert_eq!(
        s["traffic"]["outcomes"]["stale"], 1,
        "the stale answer is counted in the traffic too: {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_json_has_every_documented_field_with_its_type() {
    let (fake, _relay, rc) = behind_relay("").await;
    let layer = bytes::Bytes::from_static(b"a blob served twice");
    let d = fake.add_blob("app/x", layer.clone());
    get_blob_twice(&rc, &d, &layer).await;
    let s = status_json(&rc.url()).await;
    let kind = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(n) if n.is_u64() => "uint",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    };
    // docs/API.md, "GET /_regcache/status".
    for (path, want) in [
        ("/version", "string"),
        ("/started_at", "uint"),
        ("/uptime_seconds", "uint"),
        ("/healthy", "bool"),
        ("/upstreams/0/name", "string"),
        ("/upstreams/0/url", "string"),
        ("/upstreams/0/state", "string"),
        ("/upstreams/0/down_since", "null"),
        ("/upstreams/0/down_for_seconds", "null"),
        ("/upstreams/0/ratelimit", "null"),
        ("/upstreams/0/stale_last_hour/answers", "uint"),
        ("/upstreams/0/stale_last_hour/complete", "bool"),
        ("/upstreams/0/stale_last_hour/tags", "array"),
        ("/store/ready", "bool"),
        ("/store/error", "null"),
        ("/store/used_bytes", "uint"),
        ("/store/free_bytes", "uint"),
        ("/store/full", "bool"),
        ("/store/max_size", "null"),
        ("/bucket", "null"),
        ("/peers", "array"),
        ("/traffic/outcomes/hit", "uint"),
        ("/traffic/outcomes/miss", "uint"),
        ("/traffic/answers", "uint"),
        ("/traffic/hits", "uint"),
        ("/traffic/hit_ratio", "number"),
        ("/traffic/served_bytes", "uint"),
        ("/traffic/fetched_bytes", "uint"),
        ("/traffic/fetched_bytes_by_upstream/docker", "uint"),
        ("/traffic/saved_bytes", "uint"),
    ] {
        let v = s
            .pointer(path)
            .unwrap_or_else(|| panic!("no {path} in the status: {s}"));
        assert_eq!(kind(v), want, "{path} = {v} in {s}");
    }
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    let t = &s["traffic"];
    assert_eq!(
        (
            t["outcomes"]["miss"].as_u64(),
            t["outcomes"]["hit"].as_u64()
        ),
        (Some(1), Some(1)),
        "one fill, then one hit: {s}"
    );
    assert_eq!(t["hit_ratio"].as_f64(), Some(0.5), "{s}");
    let len = layer.len() as u64;
    assert_eq!(t["fetched_bytes"].as_u64(), Some(len), "fetched once: {s}");
    assert!(
        t["served_bytes"].as_u64() >= Some(2 * len),
        "served twice: {s}"
    );
    assert_eq!(
        t["saved_bytes"].as_u64(),
        Some(t["served_bytes"].as_u64().unwrap_or(0) - len),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_is_under_the_api_access_rules_not_the_operator_ones() {
    let (_dir, _fake, _relay, rc) = behind_htpasswd().await;
    let url = format!("{}/_regcache/status", rc.url());
    let c = client();
    let r = c.get(&url).send().await.expect("GET status");
    assert_eq!(
        r.status(),
        401,
        "without credentials, like the API (the loopback operator endpoints need none)"
    );
    let r = c
        .get(&url)
        .basic_auth("ops", Some("ops-pw"))
        .send()
        .await
        .expect("GET status with credentials");
    assert_eq!(
        r.status(),
        200,
        "with credentials and without the operator header, like the API"
    );
    let r = c
        .post(&url)
        .basic_auth("ops", Some("ops-pw"))
        .send()
        .await
        .expect("POST status");
    assert_eq!(
        r.status(),
        405,
        "the status changes nothing: GET and HEAD only"
    );
}

/// Runs `regcache ARGS` to its end, off the async runtime.
async fn regcache_cli(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Process::run_to_end(&args)
    })
    .await
    .expect("run regcache")
}

fn out(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regcache_status_shows_a_black_holed_upstream_as_down_and_exits_1() {
    let (_fake, relay, rc) = behind_relay("").await;
    pull_tag(&rc).await;
    let url = rc.url();
    let healthy = regcache_cli(&["status", "--server", &url]).await;
    assert_eq!(healthy.status.code(), Some(0), "{}", out(&healthy));
    let text = String::from_utf8_lossy(&healthy.stdout);
    assert!(text.lines().nth(1) == Some("healthy"), "{}", out(&healthy));
    assert!(
        text.contains(&format!("upstream docker (http://{}/): up", relay.addr())),
        "{}",
        out(&healthy)
    );

    relay.set_black_hole(true);
    assert!(stale_until_down(&rc).await, "served stale");
    let down = regcache_cli(&["status", "--server", &url]).await;
    assert_eq!(
        down.status.code(),
        Some(1),
        "a down upstream is not healthy: {}",
        out(&down)
    );
    let text = String::from_utf8_lossy(&down.stdout);
    assert!(
        text.contains("NOT HEALTHY: upstream docker is down"),
        "{}",
        out(&down)
    );
    assert!(
        text.contains(&format!(
            "upstream docker (http://{}/): down since ",
            relay.addr()
        )),
        "{}",
        out(&down)
    );
    assert!(
        text.contains("  served stale in the last hour: 1 answer\n    app/x:v1: 1 answer, last "),
        "{}",
        out(&down)
    );

    let json = regcache_cli(&["status", "--json", "--server", &url]).await;
    assert_eq!(json.status.code(), Some(1), "{}", out(&json));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| panic!("--json prints one JSON document ({e}): {}", out(&json)));
    assert_eq!(v["upstreams"][0]["state"], "down", "{v}");
    assert_eq!(v["healthy"], false, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regcache_status_exit_codes_match_health() {
    // No server at all: 1, like `health` without an answer.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let status = regcache_cli(&["status", "--server", &nobody, "--timeout", "2s"]).await;
    let health = regcache_cli(&["health", "--server", &nobody, "--timeout", "2s"]).await;
    assert_eq!(status.status.code(), Some(1), "{}", out(&status));
    assert_eq!(health.status.code(), Some(1), "{}", out(&health));
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("/_regcache/status: no answer"),
        "{}",
        out(&status)
    );
    assert!(status.stdout.is_empty(), "{}", out(&status));

    // Usage errors: 2.
    let bad = regcache_cli(&["status", "--server", &nobody, "--auth", "no-colon"]).await;
    assert_eq!(bad.status.code(), Some(2), "{}", out(&bad));
    let both = regcache_cli(&["health", "--server", &nobody, "--url", &nobody]).await;
    assert_eq!(
        both.status.code(),
        Some(2),
        "--url is --server's old name: not both: {}",
        out(&both)
    );

    // A server behind htpasswd: credentials as prefetch takes them.
    let (_dir, _fake, _relay, rc) = behind_htpasswd().await;
    let url = rc.url();
    let refused = regcache_cli(&["status", "--server", &url]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", out(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--auth USER:PASSWORD"),
        "the message says how to give credentials: {}",
        out(&refused)
    );
    let ok = regcache_cli(&["status", "--server", &url, "--auth", "ops:ops-pw"]).await;
    assert_eq!(ok.status.code(), Some(0), "{}", out(&ok));
    // `health --url` still works (a hidden alias), and `health --server` is the same.
    for flag in ["--url", "--server"] {
        let h = regcache_cli(&["health", flag, &url]).await;
        assert_eq!(h.status.code(), Some(0), "health {flag}: {}", out(&h));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_gets_the_status_page_at_the_root_under_the_api_access_rules() {
    let (_dir, _fake, _relay, rc) = behind_htpasswd().await;
    let c = client();
    let root = format!("{}/", rc.url());
    let html = "text/html,application/xhtml+xml,*/*;q=0.8";
    let r = c
        .get(&root)
        .header("accept", html)
        .send()
        .await
        .expect("GET / without credentials");
    assert_eq!(r.status(), 401, "the page is behind htpasswd like the API");
    let r = c
        .get(&root)
        .header("accept", html)
        .basic_auth("ops", Some("ops-pw"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(r.status(), 200);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(
        header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(
        header("content-security-policy").is_some_and(|p| p.starts_with("default-src 'none'")),
        "nothing but the inline style may load: {:?}",
        header("content-security-policy")
    );
    let page = r.text().await.expect("page");
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(
        !page.contains("<script") && !page.contains("src=") && !page.contains("<link"),
        "no script and no external asset: {page}"
    );
    assert!(
        page.contains("<td>docker</td>") && page.contains("<td class=\"up\">up</td>"),
        "{page}"
    );
    let r = c
        .get(&root)
        .header("accept", "application/json")
        .basic_auth("ops", Some("ops-pw"))
        .send()
        .await
        .expect("GET / as JSON");
    assert_eq!(r.status(), 404, "only a browser's Accept gets the page");
}

/// `/metrics` text.
async fn metrics_text(rc: &Regcache) -> String {
    client()
        .get(format!("{}/metrics", rc.url()))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_operators_expect_exist_from_the_start_and_count_by_route_and_outcome() {
    let (fake, relay, rc) = behind_relay("").await;
    let m = metrics_text(&rc).await;
    let build = format!(
        "regcache_build_info{{version=\"{}\",os=\"{}\",arch=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    let mut at_start = vec![
        build,
        "regcache_upstream_fetched_bytes_total{upstream=\"docker\"} 0".to_owned(),
    ];
    for reason in ["upstream", "digest", "size", "store", "internal", "busy"] {
        at_start.push(format!(
            "regcache_fills_failed_total{{reason=\"{reason}\"}} 0"
        ));
    }
    for source in ["store", "peer", "bucket", "upstream"] {
        at_start.push(format!("regcache_fills_total{{source=\"{source}\"}} 0"));
    }
    for outcome in [
        "hit",
        "miss",
        "stale",
        "revalidated",
        "coalesced",
        "passthrough",
        "shared",
    ] {
        at_start.push(format!(
            "regcache_cache_outcomes_total{{outcome=\"{outcome}\"}} 0"
        ));
    }
    for line in &at_start {
        assert!(
            m.lines().any(|l| l == line),
            "no `{line}` before any request:\n{m}"
        );
    }
    assert!(
        !m.lines().any(|l| l.starts_with("regcache_bucket_up")),
        "without [store.s3] there is no bucket to be up or down (an alert on 0 would fire):\n{m}"
    );

    let layer = bytes::Bytes::from_static(b"a blob for the histogram");
    let d = fake.add_blob("app/x", layer.clone());
    get_blob_twice(&rc, &d, &layer).await;
    let c = client();
    pull_tag(&rc).await;
    let r = c
        .get(format!("{}/v2/app/none/manifests/v1", rc.url()))
        .header("accept", accept_all())
        .send()
        .await
        .expect("GET unknown manifest");
    assert_eq!(r.status(), 404);
    relay.set_black_hole(true);
    assert!(pull_tag(&rc).await, "stale");
    let m = metrics_text(&rc).await;
    let count = |route: &str, outcome: &str| {
        crate::support::process::metric(
            &m,
            &format!(
                "regcache_request_duration_seconds_count{{route=\"{route}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(count("blob", "miss"), Some(1.0), "{m}");
    assert_eq!(count("blob", "hit"), Some(1.0), "{m}");
    assert_eq!(count("manifest", "miss"), Some(1.0), "{m}");
    assert_eq!(count("manifest", "error"), Some(1.0), "{m}");
    assert_eq!(count("manifest", "stale"), Some(1.0), "{m}");
    assert_eq!(
        crate::support::process::metric(
            &m,
            "regcache_upstream_fetched_bytes_total{upstream=\"docker\"}"
        ),
        Some(layer.len() as f64),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_the_quota_the_upstream_announced() {
    let (fake, _relay, rc) = behind_relay("").await;
    let s = status_json(&rc.url()).await;
    assert_eq!(
        s["upstreams"][0]["ratelimit"],
        serde_json::Value::Null,
        "no quota before the upstream announced one: {s}"
    );
    fake.set_ratelimit(Some((100, 42, 21600, "203.0.113.7")));
    pull_tag(&rc).await;
    let left = fake.ratelimit_remaining().expect("the fake's quota");
    let s = status_json(&rc.url()).await;
    let q = &s["upstreams"][0]["ratelimit"];
    assert_eq!(q["limit"], 100, "{s}");
    assert_eq!(q["remaining"], left, "as the last answer said: {s}");
    assert_eq!(q["window_seconds"], 21600, "{s}");
    assert_eq!(q["source"], "203.0.113.7", "{s}");
    let text = regcache_cli(&["status", "--server", &rc.url()]).await;
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains(&format!("  rate limit: {left} of 100 left, window 6h\n")),
        "{}",
        out(&text)
    );
}

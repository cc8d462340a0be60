//! Stale-while-revalidate (`revalidate_budget`): a cached tag past its freshness is answered from
//! the cache once the budget has passed, whatever the upstream does (stalled, refusing, answering
//! `503`, slow), also as the first request after a restart; the revalidation goes on in the
//! background, once per tag, and a tag that moved upstream is served new from the first request
//! after it. Against the in-process fake upstream (a stall, a slow answer and a forced `503` are
//! faults a real registry cannot show).
//!
//! The tests assert the order of events, never durations: the stale answer arrived before the
//! upstream answered (the fake's count of manifest answers), before the revalidation's `HEAD`
//! timed out (`regcache_upstream_errors_total`), and the next request came after the background
//! revalidation ended (`regcache_background_revalidations_total`).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::fake::FakeUpstream;
use crate::support::media::accept_all;
use crate::support::process::metric;
use crate::support::regcache::{client, config_for, Regcache};

const REPO: &str = "app/web";
const PATH: &str = "/v2/app/web/manifests/v1";
/// Every request for the tag after the first revalidates it; the budget is the default's.
const KEYS: &str = "freshness = \"1ms\"\nrevalidate_budget = \"250ms\"\n";
/// How long a slow upstream takes for each manifest answer.
const SLOW: Duration = Duration::from_secs(2);

/// What a manifest answer said.
#[derive(Debug)]
struct Answer {
    status: u16,
    digest: Option<String>,
    warning: Option<String>,
    outcome: Option<String>,
}

impl Answer {
    fn is_stale(&self) -> bool {
        self.outcome.as_deref() == Some("stale")
            && self
                .warning
                .as_deref()
                .is_some_and(|w| w.starts_with("110 "))
    }
}

/// `a` is the cached manifest `digest`, served stale (`Warning: 110`); `when` says which request.
fn assert_stale(a: &Answer, digest: &str, when: &str) {
    assert!(
        a.status == 200 && a.digest.as_deref() == Some(digest) && a.is_stale(),
        "{when}: expected the cached digest {digest}, stale, got {a:?}"
    );
}

async fn get_tag(rc: &Regcache) -> Answer {
    let r = client()
        .get(format!("{}{PATH}", rc.url()))
        .header("accept", accept_all())
        .send()
        .await
        .expect("GET the tag");
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Answer {
        status: r.status().as_u16(),
        digest: h("docker-content-digest"),
        warning: h("warning"),
        outcome: h("x-regcache-cache"),
    }
}

/// A fake upstream with the tag, and a regcache (`keys` for its upstream) that has cached it.
async fn cached(keys: &str) -> (FakeUpstream, Regcache, String) {
    let fake = FakeUpstream::start().await;
    let (digest, _) = fake.add_image(REPO, "v1", Bytes::from_static(b"layer"));
    let rc = Regcache::start(&config_for(&fake.url(), keys, ""));
    let warm = get_tag(&rc).await;
    assert_eq!(
        (warm.status, warm.digest.as_deref()),
        (200, Some(digest.as_str())),
        "{warm:?}"
    );
    (fake, rc, digest)
}

/// `rc` stopped and started again on its data directory with `keys`.
fn restarted(mut rc: Regcache, upstream: &str, keys: &str) -> (Regcache, tempfile::TempDir) {
    let dir = rc.take_dir().expect("the data directory");
    rc.stop();
    drop(rc);
    let rc = Regcache::start_in(dir.path(), &config_for(upstream, keys, ""));
    (rc, dir)
}

/// The value of a `regcache_…` sample of `rc`, by its name and labels.
fn sample(rc: &Regcache, name_and_labels: &str) -> Option<f64> {
    metric(&rc.app.cache.metrics.render(), name_and_labels)
}

fn background(rc: &Regcache, result: &str) -> Option<f64> {
    sample(
        rc,
        &format!(
            "regcache_background_revalidations_total{{upstream=\"docker\",result=\"{result}\"}}"
        ),
    )
}

/// Waits until the background revalidations that ended with `result` reach `n`.
async fn await_background(rc: &Regcache, result: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while background(rc, result) < Some(n) {
        assert!(
            Instant::now() < deadline,
            "no {n} background revalidation(s) ended {result:?}:\n{}",
            rc.app.cache.metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_gets_a_cached_tag_served_stale_before_its_head_times_out_also_after_a_restart(
) {
    // The HEAD is given 20 s (connect_timeout) before it counts as a timeout: far more than
    // this test takes, so that every stale answer below comes while it is still outstanding.
    let keys = format!("{KEYS}connect_timeout = \"20s\"\n");
    let (fake, rc, digest) = cached(&keys).await;
    fake.set_stall(true);
    let timeouts = "regcache_upstream_errors_total{upstream=\"docker\",kind=\"timeout\"}";
    for i in 0..4 {
        let a = get_tag(&rc).await;
        assert_stale(
            &a,
            &digest,
            &format!("request {i} while the upstream is stalled"),
        );
        // The series is exported at 0 from the start: no timeout is counted yet.
        assert_eq!(
            sample(&rc, timeouts),
            Some(0.0),
            "request {i} was answered only after the HEAD timed out"
        );
    }
    assert_eq!(
        (fake.hits("HEAD", PATH), fake.manifest_answers()),
        (1, 1),
        "one HEAD for the four stale answers (the revalidation is one flight per tag), never \
         answered (the one answer is the warming GET)"
    );

    // Restarted during the outage: the first request is answered the same way.
    let (rc, _dir) = restarted(rc, &fake.url(), &keys);
    let a = get_tag(&rc).await;
    assert_stale(&a, &digest, "the first request after the restart");
    assert_eq!(
        sample(&rc, timeouts),
        Some(0.0),
        "answered after the HEAD timed out"
    );
    assert_eq!(
        (fake.hits("HEAD", PATH), fake.manifest_answers()),
        (2, 1),
        "the restarted server sent its own HEAD, still unanswered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusing_connections_gets_a_cached_tag_served_stale_also_after_a_restart() {
    let (fake, rc, digest) = cached(KEYS).await;
    let (url, addr) = (fake.url(), fake.addr());
    drop(fake);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the fake's port stays open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = "regcache_upstream_errors_total{upstream=\"docker\",kind=\"unreachable\"}";
    let a = get_tag(&rc).await;
    assert_stale(&a, &digest, "while the upstream refuses connections");
    assert!(
        sample(&rc, refused).is_some_and(|n| n >= 1.0),
        "the upstream was asked, and refused, before the stale answer"
    );
    assert_eq!(
        background(&rc, "failed"),
        None,
        "a refusal comes within the budget: nothing goes on in the background"
    );

    let (rc, _dir) = restarted(rc, &url, KEYS);
    let a = get_tag(&rc).await;
    assert_stale(&a, &digest, "the first request after the restart");
    assert!(
        sample(&rc, refused).is_some_and(|n| n >= 1.0),
        "the restarted server asked the upstream, which refused, before the stale answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_503_gets_a_cached_tag_served_stale_however_slowly_it_answers() {
    // Each 503 counts as a failure: with a threshold of 10 the breaker stays closed throughout,
    // so every request below really sends its HEAD.
    let keys = format!("{KEYS}failure_threshold = 10\n");
    let (fake, rc, digest) = cached(&keys).await;
    fake.set_status(Some(503));
    let a = get_tag(&rc).await;
    assert_stale(&a, &digest, "a quick 503");
    assert_eq!(fake.manifest_answers(), 2, "the 503 came before the answer");

    // The same 503, after 2 s: the cached tag is served before it comes.
    fake.set_answer_delay(SLOW);
    let a = get_tag(&rc).await;
    assert_stale(&a, &digest, "a slow 503");
    assert_eq!(
        (fake.hits("HEAD", PATH), fake.manifest_answers()),
        (2, 2),
        "the stale answer came before the upstream answered the second HEAD"
    );
    await_background(&rc, "failed", 1.0).await;
    assert_eq!(fake.manifest_answers(), 3);

    let (rc, _dir) = restarted(rc, &fake.url(), &keys);
    let a = get_tag(&rc).await;
    assert_stale(&a, &digest, "the first request after the restart");
    assert_eq!(
        (fake.hits("HEAD", PATH), fake.manifest_answers()),
        (3, 3),
        "after the restart, the stale answer came before the upstream answered its HEAD"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_gets_a_cached_tag_served_stale_and_a_moved_tag_new_once_revalidated_in_the_background(
) {
    let (fake, rc, old) = cached(KEYS).await;
    fake.set_answer_delay(SLOW);
    let a = get_tag(&rc).await;
    assert_stale(&a, &old, "while the upstream is slow");
    assert_eq!(
        (fake.hits("HEAD", PATH), fake.manifest_answers()),
        (1, 1),
        "the stale answer came before the upstream answered the HEAD"
    );
    await_background(&rc, "unchanged", 1.0).await;

    // The tag moves upstream. The next request is still answered with the cached digest, before
    // the upstream answers; once the background revalidation has stored the new manifest, the
    // first request after it gets the new digest (the upstream is as slow as ever: it comes from
    // the store).
    let (new, _) = fake.add_image(REPO, "v1", Bytes::from_static(b"another layer"));
    let answered = fake.manifest_answers();
    let a = get_tag(&rc).await;
    assert_stale(&a, &old, "before the background revalidation ended");
    assert_eq!(
        fake.manifest_answers(),
        answered,
        "answered before the upstream"
    );
    await_background(&rc, "updated", 1.0).await;
    assert_eq!(
        (fake.hits("HEAD", PATH), fake.hits("GET", PATH)),
        (2, 2),
        "the background revalidation sent a HEAD, then fetched the new manifest"
    );
    let answered = fake.manifest_answers();
    let a = get_tag(&rc).await;
    assert_eq!(
        (a.status, a.digest.as_deref()),
        (200, Some(new.as_str())),
        "the first request after the background revalidation: {a:?}"
    );
    assert_eq!(
        fake.manifest_answers(),
        answered,
        "answered before the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_revalidate_budget_off_a_cached_tag_waits_for_a_slow_upstream() {
    let (fake, rc, digest) = cached("freshness = \"1ms\"\nrevalidate_budget = \"off\"\n").await;
    fake.set_answer_delay(SLOW);
    let a = get_tag(&rc).await;
    assert_eq!(
        (
            a.digest.as_deref(),
            a.outcome.as_deref(),
            a.warning.as_deref()
        ),
        (Some(digest.as_str()), Some("revalidated"), None),
        "{a:?}"
    );
    assert_eq!(
        (fake.hits("HEAD", PATH), fake.manifest_answers()),
        (1, 2),
        "the answer came after the upstream answered the HEAD"
    );
    assert_eq!(background(&rc, "unchanged"), None);
}

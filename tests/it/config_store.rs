//! The remote config store overlay (etcd v3 gateway, consul KV) and SIGHUP reload, against the
//! real binary: routing changes live, invalid configurations are ignored, the last good remote
//! copy lets regcache start while the store is down.
//!
//! The default upstream is a real seeded `docker-registry`; the upstream added by the overlay is
//! the in-process fake, which alone has `extra/only:latest`. Routing is observed through
//! `?ns=<host>`: a host no upstream claims answers `404 NAME_UNKNOWN`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tempfile::TempDir;

use crate::support::consul::FakeConsul;
use crate::support::etcd::Etcd;
use crate::support::fake::FakeUpstream;
use crate::support::media::accept_all;
use crate::support::process::{free_port, Process};
use crate::support::registry::{http_get, Registry};

pub(crate) const KEY: &str = "regcache/config";
const LAST_GOOD: &str = "config-store.last-good.toml";
/// A repository only the overlay's upstream (the fake) has.
const EXTRA_REPO: &str = "extra/only";
/// A manifest the default upstream (the seeded registry) has.
const DEFAULT_MANIFEST: &str = "/v2/small/oci/manifests/latest";

// ---- helpers ------------------------------------------------------------------------------------

/// A runtime hosting the in-process fakes while the test itself is plain blocking code.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime for the fakes")
}

/// A temp directory holding regcache's config file, data directory and log.
pub(crate) struct Env {
    _dir: TempDir,
    pub(crate) config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
}

impl Env {
    pub(crate) fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("regcache-config-store-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("create a temp dir for regcache");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create the data dir");
        Env {
            config: dir.path().join("regcache.toml"),
            log: dir.path().join("regcache.log"),
            data_dir,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            _dir: dir,
        }
    }

    fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("write the regcache config file");
    }

    /// Writes [`local_config`] for this environment's data directory.
    pub(crate) fn write_local(&self, default_url: &str, docker_keys: &str, store: &str) {
        self.write_config(&local_config(
            default_url,
            docker_keys,
            &self.data_dir,
            store,
        ));
    }

    fn last_good(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join(LAST_GOOD)).ok()
    }

    /// Starts the binary and returns it with how long it took to be ready.
    fn start(&self) -> (Process, Duration) {
        let t = Instant::now();
        let p = Process::start(&self.config, self.addr, &self.log);
        (p, t.elapsed())
    }
}

/// The local file: the seeded registry as the default upstream (with `docker_keys`), then
/// `store` (a `[config_store]` table, or nothing).
fn local_config(default_url: &str, docker_keys: &str, data_dir: &Path, store: &str) -> String {
    format!(
        "data_dir = {:?}\n\n[upstreams.docker]\nurl = \"{default_url}\"\n{docker_keys}\n\n{store}",
        data_dir.display().to_string()
    )
}

/// A `[config_store]` table.
pub(crate) fn store_with(kind: &str, url: &str, key: &str, poll: &str, timeout: &str) -> String {
    format!(
        "[config_store]\nkind = \"{kind}\"\nurl = \"{url}\"\nkey = \"{key}\"\n\
         poll_interval = \"{poll}\"\ntimeout = \"{timeout}\"\n"
    )
}

/// A `[config_store]` table for [`KEY`] with a 1 s timeout.
fn store(kind: &str, url: &str, poll: &str) -> String {
    store_with(kind, url, KEY, poll, "1s")
}

/// The remote overlay: an upstream `extra` at `url` claiming `host`.
fn overlay(url: &str, host: &str) -> String {
    format!("[upstreams.extra]\nurl = \"{url}\"\nhosts = [\"{host}\"]\nfreshness = \"1m\"\n")
}

/// A fake upstream with [`EXTRA_REPO`]`:latest`.
fn extra_upstream(rt: &tokio::runtime::Runtime) -> FakeUpstream {
    let fake = rt.block_on(FakeUpstream::start());
    fake.add_image(
        EXTRA_REPO,
        "latest",
        Bytes::from_static(b"the only layer of the extra upstream"),
    );
    fake
}

fn extra_path(host: &str) -> String {
    format!("/v2/{EXTRA_REPO}/manifests/latest?ns={host}")
}

/// Status and OCI error code (if the body is one) of `GET path`; `None` when it fails.
fn get(p: &Process, path: &str) -> Option<(u16, Option<String>)> {
    let r = http_get(p.addr, path, &[("Accept", accept_all())])?;
    let code = serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned));
    Some((r.status, code))
}

/// Polls `GET path` until it answers `status` (and `code`, if given) or `within` passes.
fn wait_for(p: &Process, path: &str, status: u16, code: Option<&str>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Some((s, c)) = get(p, path) {
            if s == status && (code.is_none() || c.as_deref() == code) {
                return true;
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that `GET path` answers `status` (and `code`) within `within`, else panics with `what`,
/// the last answer and the regcache log.
fn expect_route(
    p: &Process,
    path: &str,
    status: u16,
    code: Option<&str>,
    within: Duration,
    what: &str,
) {
    if !wait_for(p, path, status, code, within) {
        panic!(
            "{what}: GET {path} should answer {status} {code:?} within {within:?}, last answer \
             {:?}\n--- regcache log ---\n{}",
            get(p, path),
            p.log_text()
        );
    }
}

/// Length of the log now: later checks look only at what was written after this mark.
fn log_mark(p: &Process) -> usize {
    p.log_text().len()
}

/// Waits until the log written after `mark` contains every one of `needles`.
fn expect_log(p: &Process, mark: usize, needles: &[&str], within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let log = p.log_text();
        let since = log.get(mark..).unwrap_or("");
        if needles.iter().all(|n| since.contains(n)) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: the log should say {needles:?} within {within:?}\n--- regcache log ---\n{log}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the last good copy in `env`'s data dir holds exactly `text`.
fn expect_last_good(p: &Process, env: &Env, text: &str, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while env.last_good().as_deref() != Some(text) {
        if Instant::now() > deadline {
            panic!(
                "{what}: {LAST_GOOD} should hold {text:?}, it holds {:?}\n--- regcache log ---\n{}",
                env.last_good(),
                p.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts one immediate answer to `GET path` (no waiting).
fn expect_now(p: &Process, path: &str, status: u16, code: Option<&str>, what: &str) {
    let got = get(p, path);
    let ok = got
        .as_ref()
        .is_some_and(|(s, c)| *s == status && (code.is_none() || c.as_deref() == code));
    assert!(
        ok,
        "{what}: GET {path} should answer {status} {code:?} at once, got {got:?}\n--- regcache log ---\n{}",
        p.log_text()
    );
}

/// Asserts that the overlay's [`EXTRA_REPO`] is served through `host` within `within`.
fn expect_served(p: &Process, host: &str, within: Duration, what: &str) {
    expect_route(p, &extra_path(host), 200, None, within, what);
}

/// Asserts that the overlay's [`EXTRA_REPO`] is served through `host` at once.
fn expect_served_now(p: &Process, host: &str, what: &str) {
    expect_now(p, &extra_path(host), 200, None, what);
}

/// Asserts that no upstream claims `host`, at once.
fn expect_unknown_now(p: &Process, host: &str, what: &str) {
    expect_now(p, &extra_path(host), 404, Some("NAME_UNKNOWN"), what);
}

/// Asserts that the default upstream serves [`DEFAULT_MANIFEST`] at once.
fn expect_default_now(p: &Process, what: &str) {
    expect_now(p, DEFAULT_MANIFEST, 200, None, what);
}

// ---- etcd ---------------------------------------------------------------------------------------

#[test]
fn etcd_overlay_is_applied_live_and_kept_as_last_good() {
    let registry = Registry::start_seeded();
    let rt = runtime();
    let fake = extra_upstream(&rt);
    let etcd = Etcd::start();
    let env = Env::new();
    env.write_local(&registry.url(), "", &store("etcd", &etcd.url(), "200ms"));
    let first = overlay(&fake.url(), "extra.example");
    etcd.put(KEY, &first);
    let (p, _) = env.start();

    expect_served(
        &p,
        "extra.example",
        Duration::from_secs(5),
        "the etcd overlay's upstream is routed without a restart",
    );
    expect_default_now(
        &p,
        "the local file's default upstream still serves under the overlay",
    );
    expect_last_good(
        &p,
        &env,
        &first,
        Duration::from_secs(2),
        "the applied remote text is kept as the last good copy",
    );

    // An overlay with an unknown key is refused whole: routing and the last good copy stay.
    let mark = log_mark(&p);
    etcd.put(KEY, &format!("{first}bogus_key = 1\n"));
    expect_log(
        &p,
        mark,
        &["invalid remote config ignored", "bogus_key"],
        Duration::from_secs(5),
        "an overlay with an unknown key is logged as ignored",
    );
    expect_served_now(
        &p,
        "extra.example",
        "after an invalid overlay the previous routing is in force",
    );
    // And so is one with a URL regcache cannot use.
    let mark = log_mark(&p);
    etcd.put(KEY, &overlay("ftp://127.0.0.1:1", "broken.example"));
    expect_log(
        &p,
        mark,
        &["invalid remote config ignored", "http or https"],
        Duration::from_secs(5),
        "an overlay with a bad URL is logged as ignored",
    );
    expect_served_now(
        &p,
        "extra.example",
        "after a second invalid overlay the previous routing is in force",
    );
    expect_unknown_now(
        &p,
        "broken.example",
        "nothing of the invalid overlay is applied",
    );
    assert_eq!(
        env.last_good().as_deref(),
        Some(first.as_str()),
        "an invalid overlay must not replace the last good copy\n--- regcache log ---\n{}",
        p.log_text()
    );

    // A changed valid overlay moves the upstream to another host name, live.
    let second = overlay(&fake.url(), "other.example");
    etcd.put(KEY, &second);
    expect_served(
        &p,
        "other.example",
        Duration::from_secs(5),
        "a changed overlay is applied live",
    );
    expect_unknown_now(
        &p,
        "extra.example",
        "the host the new overlay dropped is no longer routed",
    );
    expect_last_good(
        &p,
        &env,
        &second,
        Duration::from_secs(2),
        "the last good copy follows the applied overlay",
    );
}

#[test]
fn start_with_config_store_down_uses_last_good_copy() {
    let registry = Registry::start_seeded();
    let rt = runtime();
    let fake = extra_upstream(&rt);
    let mut etcd = Etcd::start();
    let env = Env::new();
    env.write_local(&registry.url(), "", &store("etcd", &etcd.url(), "200ms"));
    let text = overlay(&fake.url(), "extra.example");
    etcd.put(KEY, &text);
    let (mut p, _) = env.start();
    expect_served(
        &p,
        "extra.example",
        Duration::from_secs(5),
        "warm-up: the etcd overlay is applied",
    );
    expect_last_good(
        &p,
        &env,
        &text,
        Duration::from_secs(2),
        "warm-up: the last good copy is written",
    );

    // The store goes away, then regcache dies hard and starts again.
    etcd.stop();
    p.kill9();
    let t = Instant::now();
    p.restart();
    let ready = t.elapsed();
    assert!(
        ready < Duration::from_secs(3),
        "with the config store down regcache must not wait for it: ready after {ready:?}\n\
         --- regcache log ---\n{}",
        p.log_text()
    );
    expect_served_now(
        &p,
        "extra.example",
        "right after a restart with the store down, the last good copy's routing is in force",
    );
    expect_default_now(&p, "the default upstream serves after the restart");
    expect_log(
        &p,
        0,
        &["config store unreachable"],
        Duration::from_secs(3),
        "the unreachable store is reported",
    );
    expect_served_now(
        &p,
        "extra.example",
        "an unreachable store does not drop the last good copy's routing",
    );
    assert_eq!(
        env.last_good().as_deref(),
        Some(text.as_str()),
        "an unreachable store must not touch the last good copy"
    );
    drop(p);

    // A fresh data dir (no last good copy) with a store that accepts connections but never
    // answers: the local file alone is enough to start, at once.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a store that never answers");
    let hang_url = format!("http://{}", hang.local_addr().expect("local_addr"));
    let fresh = Env::new();
    fresh.write_local(&registry.url(), "", &store("etcd", &hang_url, "200ms"));
    let (p2, ready) = fresh.start();
    assert!(
        ready < Duration::from_secs(3),
        "with a hanging store and no last good copy regcache must start from the local file: \
         ready after {ready:?}\n--- regcache log ---\n{}",
        p2.log_text()
    );
    expect_default_now(
        &p2,
        "the local file's upstream serves with no store and no last good copy",
    );
    expect_unknown_now(
        &p2,
        "extra.example",
        "without a last good copy the overlay's host is unknown",
    );
    assert!(
        fresh.last_good().is_none(),
        "no last good copy may appear while the store never answered"
    );
}

// ---- consul -------------------------------------------------------------------------------------

#[test]
fn consul_blocking_queries_apply_changes() {
    let registry = Registry::start_seeded();
    let rt = runtime();
    let fake = extra_upstream(&rt);
    let consul = rt.block_on(FakeConsul::start());
    let env = Env::new();
    // Blocking queries wait up to poll_interval: changes must arrive well before it elapses.
    let poll = Duration::from_secs(3);
    env.write_local(&registry.url(), "", &store("consul", &consul.url(), "3s"));
    let first = overlay(&fake.url(), "extra.example");
    consul.put(KEY, &first);
    let (p, _) = env.start();

    expect_served(
        &p,
        "extra.example",
        Duration::from_secs(5),
        "the consul overlay's upstream is routed without a restart",
    );
    expect_last_good(
        &p,
        &env,
        &first,
        Duration::from_secs(2),
        "the consul value is kept as the last good copy",
    );
    // regcache now waits in a blocking query: few requests while nothing changes.
    std::thread::sleep(Duration::from_millis(300));
    let before = consul.requests();
    std::thread::sleep(Duration::from_millis(1500));
    let idle = consul.requests() - before;
    assert!(
        idle <= 2,
        "while the key does not change regcache should wait in blocking queries, not poll: \
         {idle} requests in 1.5 s\n--- regcache log ---\n{}",
        p.log_text()
    );
    assert!(
        consul.blocking_requests() >= 1,
        "regcache should send blocking queries (?index=) to consul\n--- regcache log ---\n{}",
        p.log_text()
    );

    // A change wakes the blocking query: applied well before poll_interval.
    let second = overlay(&fake.url(), "other.example");
    let t = Instant::now();
    consul.put(KEY, &second);
    expect_served(&p, "other.example", poll, "a consul change is applied live");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "a blocking query should return at the change, not after poll_interval ({poll:?}): \
         took {took:?}\n--- regcache log ---\n{}",
        p.log_text()
    );
    expect_unknown_now(
        &p,
        "extra.example",
        "the host the new consul value dropped is no longer routed",
    );
    expect_last_good(
        &p,
        &env,
        &second,
        Duration::from_secs(2),
        "the last good copy follows the consul value",
    );

    // Invalid value: ignored, routing and last good copy unchanged.
    let mark = log_mark(&p);
    consul.put(KEY, &format!("{second}not_a_key = true\n"));
    expect_log(
        &p,
        mark,
        &["invalid remote config ignored", "not_a_key"],
        Duration::from_secs(2),
        "an invalid consul value is logged as ignored",
    );
    expect_served_now(
        &p,
        "other.example",
        "after an invalid consul value the previous routing is in force",
    );
    assert_eq!(
        env.last_good().as_deref(),
        Some(second.as_str()),
        "an invalid consul value must not replace the last good copy"
    );

    // Consul goes down: regcache keeps serving with the configuration in force.
    let mark = log_mark(&p);
    consul.set_down(true);
    expect_log(
        &p,
        mark,
        &["config store unreachable"],
        Duration::from_secs(2) + poll,
        "consul going down is reported",
    );
    expect_served_now(
        &p,
        "other.example",
        "with consul down the overlay's routing stays",
    );
    expect_default_now(&p, "with consul down the default upstream serves");

    // A change made while it was down is picked up once it is back.
    let third = overlay(&fake.url(), "third.example");
    consul.put(KEY, &third);
    consul.set_down(false);
    expect_served(
        &p,
        "third.example",
        poll + Duration::from_secs(4),
        "the value written while consul was down is applied once it is back",
    );
    expect_log(
        &p,
        mark,
        &["config store reachable again"],
        Duration::from_secs(1),
        "consul coming back is reported",
    );
    expect_last_good(
        &p,
        &env,
        &third,
        Duration::from_secs(2),
        "the last good copy follows the value read after the outage",
    );
}

// ---- SIGHUP -------------------------------------------------------------------------------------

#[test]
fn sighup_reloads_the_local_file_and_refuses_invalid_edits() {
    let registry = Registry::start_seeded();
    let env = Env::new();
    env.write_local(&registry.url(), "", "");
    let (p, _) = env.start();
    let added = "/v2/small/oci/manifests/latest?ns=added.example";
    expect_now(
        &p,
        added,
        404,
        Some("NAME_UNKNOWN"),
        "before the edit no upstream claims added.example",
    );

    env.write_local(&registry.url(), "hosts = [\"added.example\"]", "");
    let mark = log_mark(&p);
    p.signal("HUP");
    expect_route(
        &p,
        added,
        200,
        None,
        Duration::from_secs(3),
        "SIGHUP applies the edited local file",
    );
    expect_log(
        &p,
        mark,
        &["SIGHUP", "configuration applied"],
        Duration::from_secs(1),
        "the reload is logged",
    );

    // An invalid edit is refused whole; the configuration in force stays.
    env.write_local(
        &registry.url(),
        "hosts = [\"added.example\", \"second.example\"]\nfreshnes = \"1s\"",
        "",
    );
    let mark = log_mark(&p);
    p.signal("HUP");
    expect_log(
        &p,
        mark,
        &["invalid configuration ignored", "freshnes"],
        Duration::from_secs(3),
        "SIGHUP with an invalid file logs the error",
    );
    expect_now(
        &p,
        added,
        200,
        None,
        "after an invalid edit the previous routing is in force",
    );
    expect_default_now(&p, "after an invalid edit the default upstream serves");
    expect_now(
        &p,
        "/v2/small/oci/manifests/latest?ns=second.example",
        404,
        Some("NAME_UNKNOWN"),
        "nothing of the invalid edit is applied",
    );
}

// ---- defects found while writing the above (these fail until src/ is fixed) ---------------------

/// Consul adds up to `wait/16` of jitter to every blocking query (documented: "This adds up to
/// wait / 16 additional time to the maximum duration"), but regcache gives a blocking query only
/// `poll_interval + timeout`. With the defaults' proportions scaled down (production: a 5 min
/// poll_interval gives up to 18.75 s of jitter against a 2 s timeout) the query is cut before
/// consul answers: regcache logs the store as unreachable, forgets the index and sleeps a whole
/// poll_interval, so changes arrive late.
#[test]
fn consul_blocking_query_timeout_allows_for_consul_wait_jitter() {
    let registry = Registry::start_seeded();
    let rt = runtime();
    let fake = extra_upstream(&rt);
    let consul = rt.block_on(FakeConsul::start());
    consul.set_max_jitter(true);
    let env = Env::new();
    // wait 4 s + jitter 250 ms, against a client bound of 4 s + 100 ms.
    env.write_local(
        &registry.url(),
        "",
        &store_with("consul", &consul.url(), KEY, "4s", "100ms"),
    );
    consul.put(KEY, &overlay(&fake.url(), "extra.example"));
    let (p, _) = env.start();
    expect_served(
        &p,
        "extra.example",
        Duration::from_secs(3),
        "warm-up: the consul overlay is applied",
    );
    // Let the first blocking query run its full course (wait + jitter), with some margin.
    std::thread::sleep(Duration::from_millis(5000));
    let log = p.log_text();
    assert!(
        !log.contains("config store unreachable"),
        "a blocking query that consul answers after wait + wait/16 (its documented jitter) must \
         not be cut: src/config_store.rs read_consul bounds it by poll_interval + timeout only\n\
         --- regcache log ---\n{log}"
    );
    let t = Instant::now();
    consul.put(KEY, &overlay(&fake.url(), "other.example"));
    expect_served(
        &p,
        "other.example",
        Duration::from_secs(2),
        "a change after a quiet blocking query is applied at once",
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// SIGHUP with an edited `[config_store]` (here another key) is applied as "configuration
/// applied", yet the watcher keeps following the store, key and poll settings it was started with
/// and nothing says so: `App::reload` warns only about `listen` and `data_dir`. Either follow the
/// new store or report that the change takes effect at the next restart.
#[test]
fn sighup_changing_the_config_store_is_applied_or_reported() {
    let registry = Registry::start_seeded();
    let rt = runtime();
    let fake = extra_upstream(&rt);
    let etcd = Etcd::start();
    let other_key = "regcache/other";
    etcd.put(KEY, &overlay(&fake.url(), "extra.example"));
    etcd.put(other_key, &overlay(&fake.url(), "other.example"));
    let env = Env::new();
    env.write_local(&registry.url(), "", &store("etcd", &etcd.url(), "200ms"));
    let (p, _) = env.start();
    expect_served(
        &p,
        "extra.example",
        Duration::from_secs(5),
        "warm-up: the overlay of the first key is applied",
    );

    env.write_local(
        &registry.url(),
        "",
        &store_with("etcd", &etcd.url(), other_key, "200ms", "1s"),
    );
    let mark = log_mark(&p);
    p.signal("HUP");
    expect_log(
        &p,
        mark,
        &["SIGHUP"],
        Duration::from_secs(2),
        "the HUP is received",
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let followed = get(&p, &extra_path("other.example")).is_some_and(|(s, _)| s == 200);
        let log = p.log_text();
        let since = log.get(mark..).unwrap_or("");
        let reported = since.contains("config_store") && since.contains("restart");
        if followed || reported {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after SIGHUP with config_store.key changed to {other_key:?}, regcache neither \
             follows the new key (?ns=other.example: {:?}) nor logs that config_store changes \
             need a restart\n--- regcache log ---\n{log}",
            get(&p, &extra_path("other.example"))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- where the last good copy lives, and the size bound -----------------------------------------

#[test]
fn the_last_good_copy_stays_in_the_local_files_data_dir_when_the_overlay_moves_data_dir() {
    let registry = Registry::start_seeded();
    let rt = runtime();
    let fake = extra_upstream(&rt);
    let etcd = Etcd::start();
    let env = Env::new();
    env.write_local(&registry.url(), "", &store("etcd", &etcd.url(), "200ms"));
    // The overlay moves the store to another directory (at the next start).
    let moved = env.data_dir.with_file_name("moved");
    let moving = |host: &str| {
        format!(
            "data_dir = {:?}\n{}",
            moved.display().to_string(),
            overlay(&fake.url(), host)
        )
    };
    let first = moving("extra.example");
    etcd.put(KEY, &first);
    let (mut p, _) = env.start();
    expect_last_good(
        &p,
        &env,
        &first,
        Duration::from_secs(5),
        "the first overlay is kept in the local file's data_dir",
    );
    // Started again with that copy, the store is in `moved`: a change must still be kept where
    // the next start reads it, the local file's data_dir.
    p.restart();
    expect_served_now(&p, "extra.example", "the last good copy applies at start");
    let second = moving("other.example");
    etcd.put(KEY, &second);
    expect_served(
        &p,
        "other.example",
        Duration::from_secs(5),
        "the changed overlay is applied",
    );
    expect_last_good(
        &p,
        &env,
        &second,
        Duration::from_secs(2),
        "the changed overlay is kept in the local file's data_dir, where the next start reads it",
    );
    assert!(
        !moved.join(LAST_GOOD).exists(),
        "no copy in the overlay's data_dir, which no start reads\n--- regcache log ---\n{}",
        p.log_text()
    );
}

/// The overlay for `host`, made larger than the 1 MiB bound by a comment.
fn oversized_overlay(url: &str, host: &str) -> String {
    format!("{}# {}\n", overlay(url, host), "x".repeat(1 << 20))
}

/// With `first` applied from a store at `url`, `put(oversized)` must be refused whole and
/// reported, and a later value within the bound applied again.
fn expect_oversized_value_refused(
    kind: &str,
    url: &str,
    fake: &FakeUpstream,
    put: &dyn Fn(&str),
    registry: &Registry,
) {
    let env = Env::new();
    let poll = if kind == "consul" { "3s" } else { "200ms" };
    env.write_local(&registry.url(), "", &store(kind, url, poll));
    let first = overlay(&fake.url(), "extra.example");
    put(&first);
    let (p, _) = env.start();
    expect_served(
        &p,
        "extra.example",
        Duration::from_secs(5),
        "warm-up: the first overlay is applied",
    );
    expect_last_good(&p, &env, &first, Duration::from_secs(2), "warm-up");

    let mark = log_mark(&p);
    put(&oversized_overlay(&fake.url(), "other.example"));
    expect_log(
        &p,
        mark,
        &["too large", "1048576"],
        Duration::from_secs(5),
        &format!("a value over 1 MiB from {kind} is reported"),
    );
    expect_unknown_now(
        &p,
        "other.example",
        "nothing of the oversized value is applied",
    );
    expect_served_now(&p, "extra.example", "the configuration in force is kept");
    assert_eq!(
        env.last_good().as_deref(),
        Some(first.as_str()),
        "the last good copy is kept\n--- regcache log ---\n{}",
        p.log_text()
    );

    put(&overlay(&fake.url(), "other.example"));
    expect_served(
        &p,
        "other.example",
        Duration::from_secs(5),
        "a value within the bound is applied again",
    );
}

#[test]
fn an_etcd_value_over_1_mib_is_refused_and_the_configuration_in_force_kept() {
    let registry = Registry::start_seeded();
    let rt = runtime();
    let fake = extra_upstream(&rt);
    // etcd refuses a put over --max-request-bytes (1.5 MiB by default); an operator may raise it.
    let etcd = Etcd::start_with_max_request_bytes(4 << 20);
    expect_oversized_value_refused("etcd", &etcd.url(), &fake, &|v| etcd.put(KEY, v), &registry);
}

#[test]
fn a_consul_value_over_1_mib_is_refused_and_the_configuration_in_force_kept() {
    let registry = Registry::start_seeded();
    let rt = runtime();
    let fake = extra_upstream(&rt);
    // consul refuses values over kv_max_value_size (512 KiB by default); an operator may raise it.
    let consul = rt.block_on(FakeConsul::start());
    expect_oversized_value_refused(
        "consul",
        &consul.url(),
        &fake,
        &|v| consul.put(KEY, v),
        &registry,
    );
}

//! The shared bucket tier (`[store.s3]`) against real S3-compatible servers and a real upstream
//! (Debian's docker-registry), with skopeo as the client; a fake upstream where a fill must be slow;
//! and tiered mirrors (a regcache whose upstream is another regcache).
//!
//! Every bucket test runs on each [`Engine`]: `bucket::moto::NAME` on moto (one process, an S3 mock)
//! and `bucket::garage::NAME` on a three-node Garage cluster (a distributed store; it ignores
//! `If-None-Match: *`, and some tests kill its nodes).
//!
//! Bucket layout (below `<prefix>/` when a prefix is set): `blobs/sha256/<hex>`,
//! `manifests/sha256/<hex>`, `repos/<upstream host:port>/<repo>/_manifests/sha256/<hex>` and
//! `…/_layers/sha256/<hex>` (empty) and `repos/<upstream host:port>/<repo>/_tags/<tag>` (JSON
//! `{"digest", "checked_at_ms"}`). Uploads run shortly after a fill completes, so the tests poll the
//! bucket.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::clients::{self, command, require, run};
use crate::support::fake::FakeUpstream;
use crate::support::garage::Garage;
use crate::support::images::{assert_same_copy, pseudo_random};
use crate::support::media::{accept_all, OCI_MANIFEST};
use crate::support::moto::Moto;
use crate::support::net::{BlackHole, Relay};
use crate::support::process::{free_port, Process};
use crate::support::regcache::{config_for, Regcache};
use crate::support::registry::{
    inspect_raw, send_request, sha256_digest, RawResponse, Registry, Seeded,
};
use crate::support::s3::{request, S3Client};

pub(crate) const BUCKET: &str = "regcache-test";
/// How long an asynchronous upload may take to show in the bucket.
const UPLOAD_WAIT: Duration = Duration::from_secs(30);
/// How long one pull may take while the bucket is down.
const PULL_BOUND: Duration = Duration::from_secs(60);
/// The response header naming the cache outcome.
const CACHE: &str = "x-regcache-cache";

// ---- the object stores ----------------------------------------------------------------------------

/// The S3-compatible servers the bucket tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Engine {
    Moto,
    Garage,
}

/// A running object store holding [`BUCKET`].
pub(crate) enum Store {
    Moto(Moto),
    Garage(Garage),
}

impl Store {
    /// Starts `engine` and creates [`BUCKET`].
    pub(crate) fn start(engine: Engine) -> Store {
        match engine {
            Engine::Moto => {
                let mut moto = Moto::start();
                moto.create_bucket(BUCKET);
                Store::Moto(moto)
            }
            Engine::Garage => {
                let garage = Garage::start();
                garage.create_bucket(BUCKET);
                Store::Garage(garage)
            }
        }
    }

    /// The S3 endpoint a regcache is given: moto's, or Garage node `node`'s (each node serves the
    /// whole cluster).
    fn addr(&self, node: usize) -> SocketAddr {
        match self {
            Store::Moto(m) => m.addr(),
            Store::Garage(g) => g.addr(node),
        }
    }

    /// `http://` [`Store::addr`]
    fn url(&self, node: usize) -> String {
        format!("http://{}", self.addr(node))
    }

    /// What the tests read and write the bucket with: moto, or the first Garage node running.
    fn client(&self) -> S3Client {
        match self {
            Store::Moto(m) => m.client(),
            Store::Garage(g) => {
                let running = g.running();
                let node = *running
                    .first()
                    .expect("a Garage node runs to read the bucket through");
                g.client(node)
            }
        }
    }

    pub(crate) fn list(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        self.client().list(bucket, prefix)
    }

    fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        self.client().get(bucket, key)
    }

    fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        self.client().put(bucket, key, data)
    }
}

/// The ways the tests take the bucket away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    /// moto stopped and its port black-holed: connections are accepted and never answered, so
    /// every bucket call can only end by its timeout.
    BlackHoled,
    /// Nothing listens at the endpoint.
    Refusing,
    /// Two Garage nodes of three killed: the node regcache talks to answers every call with 503
    /// ("could not reach quorum") at once.
    QuorumLost,
}

impl std::fmt::Display for Outage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outage::BlackHoled => "black-holed",
            Outage::Refusing => "refusing",
            Outage::QuorumLost => "without-quorum",
        })
    }
}

/// Each test named here runs once per engine, as `moto::NAME` and `garage::NAME`.
macro_rules! on_every_engine {
    ($($name:ident),+ $(,)?) => {
        mod moto {
            $( #[test] fn $name() { super::$name(super::Engine::Moto); } )+
        }
        mod garage {
            $( #[test] fn $name() { super::$name(super::Engine::Garage); } )+
        }
    };
}

on_every_engine!(
    two_servers_share_one_bucket_and_survive_the_upstream_outage,
    bucket_outage_local_tier_serves_and_misses_stream_through,
    killed_fill_leaves_no_visible_object,
    what_a_server_killed_before_its_uploads_committed_reaches_the_bucket_after_its_restart,
    concurrent_fills_through_two_servers_store_one_correct_copy,
    presigned_redirect_serves_bucket_blobs,
    tag_freshness_is_shared_through_the_bucket,
    corrupt_bucket_copy_is_never_served_and_the_upstream_takes_over,
    any_server_serves_a_blob_the_bucket_links_to_the_repository,
    the_bucket_serves_a_blob_to_a_repository_only_once_the_upstream_confirmed_it_there,
);

// ---- helpers --------------------------------------------------------------------------------------

/// A `[store.s3]` table for [`BUCKET`] through the store's endpoint `node` (see [`Store::addr`]),
/// with `prefix` if given, plus `extra` keys.
fn s3_table_at(store: &Store, node: usize, prefix: Option<&str>, extra: &str) -> String {
    s3_table_via(store, &store.url(node), prefix, extra)
}

/// [`s3_table_at`] with the endpoint `url` (a relay in front of the store).
fn s3_table_via(store: &Store, url: &str, prefix: Option<&str>, extra: &str) -> String {
    let s3 = store.client();
    let mut t = format!(
        "[store.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{url}\"\nregion = \"{}\"\n\
         access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
         virtual_hosted_style = false\ntimeout = \"5s\"\n",
        s3.region, s3.key_id, s3.secret,
    );
    if let Some(p) = prefix {
        t.push_str(&format!("prefix = \"{p}\"\n"));
    }
    t.push_str(extra);
    t.push('\n');
    t
}

/// [`s3_table_at`] the first endpoint.
pub(crate) fn s3_table(store: &Store, prefix: Option<&str>, extra: &str) -> String {
    s3_table_at(store, 0, prefix, extra)
}

/// What most tests start from: a work dir, a seeded upstream, and `engine` with [`BUCKET`] made.
fn work_upstream_and_bucket(engine: Engine) -> (tempfile::TempDir, Registry, Store) {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    (work, Registry::start_seeded(), Store::start(engine))
}

/// A regcache config for `upstream` (tags fresh for 10 minutes) with [`s3_table`].
fn shared_config(upstream: &Registry, store: &Store, prefix: Option<&str>, extra: &str) -> String {
    config_for(
        &upstream.url(),
        "freshness = \"10m\"",
        &s3_table(store, prefix, extra),
    )
}

/// `<prefix>/` or nothing: what every key of the layout starts with.
fn key_root(prefix: Option<&str>) -> String {
    prefix.map_or_else(String::new, |p| format!("{p}/"))
}

fn hex_of(digest: &str) -> &str {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"))
}

fn sha256_hex(data: &[u8]) -> String {
    hex_of(&sha256_digest(data)).to_owned()
}

/// What one tagged image of the upstream is made of.
struct Image {
    repo: String,
    tag: String,
    /// `repo:tag`
    name: String,
    /// The tagged manifest (or index).
    digest: String,
    /// Every manifest: the tagged one, and the children of an index.
    manifests: Vec<String>,
    /// Every blob (configs and layers) with its size.
    blobs: BTreeMap<String, u64>,
    /// Whether it is an index (skopeo copy --all).
    all: bool,
}

impl Image {
    fn of(upstream: &Registry, name: &str) -> Image {
        let (repo, tag) = name.split_once(':').expect("repo:tag");
        let raw = inspect_raw(&upstream.host_port(), name);
        let digest = sha256_digest(&raw);
        let doc: serde_json::Value = serde_json::from_slice(&raw).expect("manifest JSON");
        let mut manifests = vec![digest.clone()];
        let mut blobs = BTreeMap::new();
        let mut all = false;
        let mut add_blobs = |m: &serde_json::Value| {
            let config = &m["config"];
            for d in std::iter::once(config).chain(m["layers"].as_array().expect("layers")) {
                blobs.insert(
                    d["digest"].as_str().expect("descriptor digest").to_owned(),
                    d["size"].as_u64().expect("descriptor size"),
                );
            }
        };
        if let Some(children) = doc["manifests"].as_array() {
            all = true;
            for c in children {
                let child = c["digest"].as_str().expect("child digest").to_owned();
                let child_raw = inspect_raw(&upstream.host_port(), &format!("{repo}@{child}"));
                assert_eq!(sha256_digest(&child_raw), child);
                add_blobs(&serde_json::from_slice(&child_raw).expect("child JSON"));
                manifests.push(child);
            }
        } else {
            add_blobs(&doc);
        }
        Image {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
            name: name.to_owned(),
            digest,
            manifests,
            blobs,
            all,
        }
    }

    /// [`Image::of`], and a copy of the image straight from the upstream into `dest`: the reference
    /// that copies through regcache are compared with.
    fn with_reference_copy(upstream: &Registry, name: &str, dest: &Path) -> Image {
        let img = Image::of(upstream, name);
        copy_ok(&upstream.host_port(), &img.name, dest, img.all);
        img
    }

    fn by_digest(&self) -> String {
        format!("{}@{}", self.repo, self.digest)
    }

    /// Every key the bucket holds for this image once a server pulled it from `upstream_id`.
    fn keys(&self, root: &str, upstream_id: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for b in self.blobs.keys() {
            keys.insert(format!("{root}blobs/sha256/{}", hex_of(b)));
            // Written after the blob: until it is there, other servers take the blob from the
            // upstream, not from the bucket.
            keys.insert(format!(
                "{root}repos/{upstream_id}/{}/_layers/sha256/{}",
                self.repo,
                hex_of(b)
            ));
        }
        for m in &self.manifests {
            keys.insert(format!("{root}manifests/sha256/{}", hex_of(m)));
            keys.insert(format!(
                "{root}repos/{upstream_id}/{}/_manifests/sha256/{}",
                self.repo,
                hex_of(m)
            ));
        }
        keys.insert(format!(
            "{root}repos/{upstream_id}/{}/_tags/{}",
            self.repo, self.tag
        ));
        keys
    }

    /// The largest blob (a layer).
    fn largest_blob(&self) -> (String, u64) {
        self.blobs
            .iter()
            .max_by_key(|(_, s)| **s)
            .map(|(d, s)| (d.clone(), *s))
            .expect("an image has blobs")
    }
}

/// Polls the bucket listing under `root` until it holds every key of `want`; returns the listing.
fn wait_for_keys(store: &Store, root: &str, want: &BTreeSet<String>) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + UPLOAD_WAIT;
    loop {
        let listing: BTreeMap<String, u64> = store.list(BUCKET, root).into_iter().collect();
        let missing: Vec<&String> = want.iter().filter(|k| !listing.contains_key(*k)).collect();
        if missing.is_empty() {
            return listing;
        }
        assert!(
            Instant::now() < deadline,
            "after {UPLOAD_WAIT:?} the bucket still lacks {missing:#?}\nit holds {:#?}",
            listing.keys().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every object under `<root>blobs/` and `<root>manifests/` is named `…/sha256/<hex>` and its bytes
/// hash to that name; blobs have the size `sizes` says, when it knows them.
fn check_content_addressed(store: &Store, root: &str, sizes: &BTreeMap<String, u64>) {
    for kind in ["blobs", "manifests"] {
        let under = format!("{root}{kind}/");
        for (key, size) in store.list(BUCKET, &under) {
            let hex = key
                .strip_prefix(&format!("{under}sha256/"))
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .unwrap_or_else(|| panic!("bucket key {key:?} is not {under}sha256/<hex>"));
            let bytes = store
                .get(BUCKET, &key)
                .unwrap_or_else(|| panic!("{key} is listed but cannot be read"));
            assert_eq!(bytes.len() as u64, size, "{key}: listed size vs bytes");
            assert_eq!(
                sha256_hex(&bytes),
                hex,
                "{key}: the object's bytes do not hash to its key"
            );
            if let Some(want) = sizes.get(&format!("sha256:{hex}")) {
                assert_eq!(size, *want, "{key}: size");
            }
        }
    }
}

/// `skopeo copy` of `image` from `host_port` into `dest`; panics with skopeo's output if it fails or
/// takes longer than twice [`PULL_BOUND`]. Returns how long it took.
fn copy_ok(host_port: &str, image: &str, dest: &Path, all: bool) -> Duration {
    let mut cmd = command(&require("skopeo", "skopeo"));
    cmd.args(["copy", "--src-tls-verify=false"]);
    if all {
        cmd.arg("--all");
    }
    cmd.arg(format!("docker://{host_port}/{image}"))
        .arg(format!("dir:{}", dest.display()));
    let t = Instant::now();
    let out = run(cmd, 2 * PULL_BOUND);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        clients::describe(
            &format!("skopeo copy of {image} from {host_port} (after {took:?})"),
            &out
        )
    );
    took
}

/// The sum of every sample of metric `name` (any labels), 0 when absent.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether metric `name` has a sample at all.
fn metric_present(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

fn get(addr: SocketAddr, path: &str) -> RawResponse {
    request(addr, "GET", path, &[("Accept", accept_all())], b"")
        .unwrap_or_else(|| panic!("GET {path} on {addr}: no response"))
}

fn head(addr: SocketAddr, path: &str) -> RawResponse {
    request(addr, "HEAD", path, &[("Accept", accept_all())], b"")
        .unwrap_or_else(|| panic!("HEAD {path} on {addr}: no response"))
}

/// A `GET` of `path` read to its end on a thread of its own; the counter has the bytes received so
/// far (headers included).
fn read_on_a_thread(
    addr: SocketAddr,
    path: String,
) -> (Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let reader = std::thread::spawn(move || {
        let mut s = send_request(addr, "GET", &path, &[], b"", Duration::from_secs(60))
            .expect("send GET to regcache");
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
        }
    });
    (received, reader)
}

fn describe(r: &RawResponse) -> String {
    format!(
        "status {} headers {:?} body {:?}",
        r.status,
        r.headers,
        String::from_utf8_lossy(&r.body[..r.body.len().min(400)])
    )
}

// ---- tests ----------------------------------------------------------------------------------------

fn two_servers_share_one_bucket_and_survive_the_upstream_outage(engine: Engine) {
    let (work, mut upstream, mut store) = work_upstream_and_bucket(engine);
    let prefix = Some("fleet");
    let root = key_root(prefix);
    // On Garage, A talks to node 0 and B to node 1.
    let a = Regcache::start(&shared_config(&upstream, &store, prefix, ""));
    let b = Regcache::start(&config_for(
        &upstream.url(),
        "freshness = \"10m\"",
        &s3_table_at(&store, 1, prefix, ""),
    ));

    let images = [
        Image::of(&upstream, Seeded::SMALL_OCI),
        Image::of(&upstream, Seeded::MULTI_DOCKER),
    ];
    let mut want = BTreeSet::new();
    let mut sizes = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        copy_ok(
            &upstream.host_port(),
            &img.name,
            &work.path().join(format!("ref-{i}")),
            img.all,
        );
        // Cold, through A: A fetches from the upstream and fills the bucket.
        copy_ok(
            &a.host_port(),
            &img.name,
            &work.path().join(format!("a-{i}")),
            img.all,
        );
        assert_same_copy(
            &work.path().join(format!("ref-{i}")),
            &work.path().join(format!("a-{i}")),
            &format!("{} through A", img.name),
        );
        want.extend(img.keys(&root, &upstream.host_port()));
        sizes.extend(img.blobs.clone());
        if let (0, Store::Garage(garage)) = (i, &mut store) {
            // A Garage node dies mid-run: A writes the next image, and B reads everything, through
            // the two nodes left.
            garage.kill(2);
        }
    }
    let listing = wait_for_keys(&store, &root, &want);
    check_content_addressed(&store, &root, &sizes);
    for img in &images {
        let tag_key = format!(
            "{root}repos/{}/{}/_tags/{}",
            upstream.host_port(),
            img.repo,
            img.tag
        );
        let record: serde_json::Value =
            serde_json::from_slice(&store.get(BUCKET, &tag_key).expect("tag record"))
                .unwrap_or_else(|e| panic!("{tag_key} is not JSON: {e}"));
        assert_eq!(record["digest"], img.digest.as_str(), "{tag_key}: {record}");
        assert!(
            record["checked_at_ms"].as_u64().is_some_and(|t| t > 0),
            "{tag_key}: {record}"
        );
        for m in &img.manifests {
            let link = format!(
                "{root}repos/{}/{}/_manifests/sha256/{}",
                upstream.host_port(),
                img.repo,
                hex_of(m)
            );
            assert_eq!(listing[&link], 0, "{link} should be an empty object");
        }
    }
    let am = a.app.metrics.render();
    assert!(
        metric_sum(&am, "regcache_bucket_written_bytes_total") > 0.0,
        "A wrote to the bucket but its metrics say otherwise:\n{am}"
    );

    // The upstream is black-holed: its port accepts connections and never answers.
    let upstream_addr = upstream.addr();
    upstream.stop();
    let hole = BlackHole::start(upstream_addr);

    // B never talked to the upstream, which is down now: everything comes from the bucket.
    let small = &images[0];
    let r = get(
        b.addr(),
        &format!("/v2/{}/manifests/{}", small.repo, small.tag),
    );
    assert_eq!(r.status, 200, "B: manifest by tag: {}", describe(&r));
    assert_eq!(
        r.header(CACHE),
        Some("shared"),
        "B: manifest by tag: {}",
        describe(&r)
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(small.digest.as_str())
    );
    assert_eq!(sha256_digest(&r.body), small.digest);
    let (layer, size) = small.largest_blob();
    let r = get(b.addr(), &format!("/v2/{}/blobs/{layer}", small.repo));
    assert_eq!(r.status, 200, "B: blob: {}", describe(&r));
    assert_eq!(r.header(CACHE), Some("shared"), "B: blob: {}", describe(&r));
    assert_eq!(r.body.len() as u64, size);
    assert_eq!(sha256_digest(&r.body), layer);
    let multi = &images[1];
    let child = &multi.manifests[1];
    let r = get(b.addr(), &format!("/v2/{}/manifests/{child}", multi.repo));
    assert_eq!(r.status, 200, "B: child manifest: {}", describe(&r));
    assert_eq!(
        r.header(CACHE),
        Some("shared"),
        "B: child manifest by digest: {}",
        describe(&r)
    );
    assert_eq!(sha256_digest(&r.body), *child);

    for (i, img) in images.iter().enumerate() {
        let reference = work.path().join(format!("ref-{i}"));
        let by_tag = work.path().join(format!("b-tag-{i}"));
        copy_ok(&b.host_port(), &img.name, &by_tag, img.all);
        assert_same_copy(
            &reference,
            &by_tag,
            &format!("{} by tag through B", img.name),
        );
        let by_digest = work.path().join(format!("b-digest-{i}"));
        copy_ok(&b.host_port(), &img.by_digest(), &by_digest, img.all);
        assert_same_copy(
            &reference,
            &by_digest,
            &format!("{} by digest through B", img.by_digest()),
        );
    }

    let bm = b.app.metrics.render();
    assert_eq!(
        metric_sum(&bm, "regcache_upstream_fetched_bytes_total"),
        0.0,
        "B fetched blob bytes from the upstream:\n{bm}"
    );
    assert_eq!(
        hole.accepted(),
        0,
        "B tried the upstream although the bucket held everything (tags within freshness)"
    );
    assert!(
        metric_sum(&bm, "regcache_bucket_read_bytes_total") >= size as f64,
        "B read (almost) nothing from the bucket:\n{bm}"
    );
    assert_eq!(
        metric_sum(&bm, "regcache_bucket_up"),
        1.0,
        "B's bucket should be up:\n{bm}"
    );
    if let Store::Garage(garage) = &store {
        assert_eq!(garage.running(), [0, 1], "the test ran with a node down");
    }
}

fn bucket_outage_local_tier_serves_and_misses_stream_through(engine: Engine) {
    let (work, upstream, mut store) = work_upstream_and_bucket(engine);
    // A short gc_interval: the maintenance loop is what retries the writes the bucket missed.
    let config = config_for(
        &upstream.url(),
        "freshness = \"10m\"",
        &format!(
            "[store]\ngc_interval = \"1s\"\n{}",
            s3_table(&store, None, "")
        ),
    );
    let mut a = Regcache::start(&config);
    let warm = Image::of(&upstream, Seeded::SMALL_OCI);
    let cold_big = Image::of(&upstream, Seeded::BIG);
    let cold_multi = Image::of(&upstream, Seeded::MULTI_OCI);
    for (name, img) in [("warm", &warm), ("big", &cold_big), ("multi", &cold_multi)] {
        copy_ok(
            &upstream.host_port(),
            &img.name,
            &work.path().join(format!("ref-{name}")),
            img.all,
        );
    }
    copy_ok(
        &a.host_port(),
        &warm.name,
        &work.path().join("a-warm"),
        false,
    );
    assert_same_copy(
        &work.path().join("ref-warm"),
        &work.path().join("a-warm"),
        "warming",
    );
    // The bucket works before the outage: the warm image reaches it.
    wait_for_keys(&store, "", &warm.keys("", &upstream.host_port()));
    let m = a.app.metrics.render();
    assert_eq!(metric_sum(&m, "regcache_bucket_up"), 1.0, "{m}");
    let fetched_before = metric_sum(&m, "regcache_upstream_fetched_bytes_total");

    // The bucket goes away. moto: first its port accepts connections and never answers (every
    // bucket call can only end by its timeout), then nothing listens there. Garage: first two nodes
    // of three die (the one A talks to answers every call with 503 at once), then the third.
    let (_, big_layer) = cold_big.largest_blob();
    let outages = match engine {
        Engine::Moto => [Outage::BlackHoled, Outage::Refusing],
        Engine::Garage => [Outage::QuorumLost, Outage::Refusing],
    };
    let mut hole = None;
    for (outage, cold, cold_name) in [
        (outages[0], &cold_big, "big"),
        (outages[1], &cold_multi, "multi"),
    ] {
        match (outage, &mut store) {
            (Outage::BlackHoled, Store::Moto(moto)) => {
                let addr = moto.addr();
                moto.stop();
                hole = Some(BlackHole::start(addr));
            }
            (Outage::Refusing, Store::Moto(moto)) => {
                moto.stop();
                drop(hole.take());
            }
            (Outage::QuorumLost, Store::Garage(garage)) => {
                garage.kill(1);
                garage.kill(2);
                let probe = garage
                    .client(0)
                    .send("GET", &format!("/{BUCKET}/probe"), &[], b"");
                assert_eq!(
                    probe.as_ref().map(|r| r.status),
                    Some(503),
                    "Garage with two nodes of three down should answer 503 at once"
                );
            }
            (Outage::Refusing, Store::Garage(garage)) => garage.kill(0),
            (outage, _) => panic!("no {outage:?} outage on {engine:?}"),
        }
        let took = copy_ok(
            &a.host_port(),
            &warm.name,
            &work.path().join(format!("{outage}-warm")),
            false,
        );
        assert!(
            took < PULL_BOUND,
            "a local hit took {took:?} with the bucket {outage}"
        );
        assert_same_copy(
            &work.path().join("ref-warm"),
            &work.path().join(format!("{outage}-warm")),
            &format!("warm image with the bucket {outage}"),
        );
        let t = Instant::now();
        let r = get(
            a.addr(),
            &format!("/v2/{}/manifests/{}", warm.repo, warm.tag),
        );
        assert_eq!(r.status, 200, "{}", describe(&r));
        assert_eq!(r.header(CACHE), Some("hit"), "{}", describe(&r));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a local manifest hit took {:?} with the bucket {outage}",
            t.elapsed()
        );
        let took = copy_ok(
            &a.host_port(),
            &cold.name,
            &work.path().join(format!("{outage}-{cold_name}")),
            cold.all,
        );
        assert!(
            took < PULL_BOUND,
            "a cold pull of {} took {took:?} with the bucket {outage}",
            cold.name
        );
        assert_same_copy(
            &work.path().join(format!("ref-{cold_name}")),
            &work.path().join(format!("{outage}-{cold_name}")),
            &format!("cold {} with the bucket {outage}", cold.name),
        );
        let m = a.app.metrics.render();
        assert!(
            metric_present(&m, "regcache_bucket_up"),
            "no regcache_bucket_up sample:\n{m}"
        );
        assert_eq!(
            metric_sum(&m, "regcache_bucket_up"),
            0.0,
            "the bucket is {outage} but regcache_bucket_up says otherwise:\n{m}"
        );
        // A bucket that is down does not make the server unready; /readyz says it is down.
        let r = get(a.addr(), "/readyz");
        assert_eq!(r.status, 200, "{}", describe(&r));
        let ready: serde_json::Value = serde_json::from_slice(&r.body).expect("readyz JSON");
        assert_eq!(ready["bucket"]["up"], false, "{ready}");
    }
    let m = a.app.metrics.render();
    assert!(
        metric_sum(&m, "regcache_upstream_fetched_bytes_total")
            >= fetched_before + big_layer as f64,
        "the cold big layer did not come from the upstream:\n{m}"
    );
    assert!(
        metric_sum(&m, "regcache_bucket_pending_writes") > 0.0,
        "what was fetched during the outage should wait for the bucket:\n{m}"
    );

    // The bucket comes back. What A fetched while it was away is written to it once it answers,
    // with no client asking. (moto comes back empty: blobs the warm image shares with them were
    // uploaded before the outage; a real bucket still holds them, this restarted moto does not, and
    // nothing is pending for them.)
    // A restarts while the bucket is still away: what it owes the bucket is in its database (the
    // outbox table), not only in memory.
    let dir = a.take_dir().expect("A's data directory");
    a.stop();
    drop(a);
    let a = Regcache::start_in(dir.path(), &config);
    let m = a.app.metrics.render();
    assert!(
        metric_sum(&m, "regcache_bucket_pending_writes") > 0.0,
        "the writes owed to the bucket did not survive A's restart:\n{m}"
    );
    match &mut store {
        Store::Moto(moto) => moto.restart(),
        Store::Garage(garage) => {
            // Node 0 alone has no quorum yet; with node 1 back the owed writes land, node 2 still
            // down.
            garage.restart(0);
            garage.restart(1);
        }
    }
    let mut want = cold_big.keys("", &upstream.host_port());
    want.extend(cold_multi.keys("", &upstream.host_port()));
    let before = warm.keys("", &upstream.host_port());
    want.retain(|k| !before.contains(k));
    let sizes = wait_for_keys(&store, "", &want);
    check_content_addressed(&store, "", &sizes);
    let m = a.app.metrics.render();
    assert_eq!(
        metric_sum(&m, "regcache_bucket_up"),
        1.0,
        "the bucket answers again:\n{m}"
    );
    // Written, so no longer owed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let owed = a.app.cache.store.outbox().expect("read the outbox");
        if owed.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} writes still recorded as owed to the bucket",
            owed.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn killed_fill_leaves_no_visible_object(engine: Engine) {
    const SIZE: usize = 12 << 20;
    let rt = tokio::runtime::Runtime::new().expect("runtime for the fake upstream");
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let fake = rt.block_on(FakeUpstream::start());
    let layer = pseudo_random(SIZE, 7);
    let (manifest, digest) = fake.add_image("kill/app", "v1", layer.clone());
    let store = Store::start(engine);
    let prefix = Some("killed");
    let root = key_root(prefix);
    let blob_key = format!("{root}blobs/sha256/{}", hex_of(&digest));

    let config = work.path().join("regcache.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n{}",
            work.path().join("data").display(),
            config_for(&fake.url(), "", &s3_table(&store, prefix, ""))
        ),
    )
    .expect("write config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut rc = Process::start(&config, addr, &work.path().join("regcache.log"));

    let r = get(addr, "/v2/kill/app/manifests/v1");
    assert_eq!(r.status, 200, "{}", describe(&r));
    assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(sha256_digest(&r.body), manifest);

    // 256 KiB every 100 ms: the 12 MiB fill takes about 5 s.
    fake.set_slow_blobs(256 << 10, Duration::from_millis(100));
    let (received, reader) = read_on_a_thread(addr, format!("/v2/kill/app/blobs/{digest}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(Ordering::SeqCst) < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "the client got only {} bytes in 30 s\n{}",
            received.load(Ordering::SeqCst),
            rc.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    rc.kill9();
    let sent_at_kill = fake.blob_bytes_sent();
    reader.join().expect("reader thread");
    assert!(
        sent_at_kill < SIZE as u64,
        "the fill was meant to be killed midway, but the upstream had sent all {sent_at_kill} bytes"
    );
    assert!(
        received.load(Ordering::SeqCst) < SIZE as u64,
        "the client got the whole blob before the kill"
    );
    for wait in [Duration::ZERO, Duration::from_secs(3)] {
        std::thread::sleep(wait);
        let blobs = store.list(BUCKET, &format!("{root}blobs/"));
        assert!(
            blobs.is_empty(),
            "a killed fill left objects in the bucket: {blobs:?}"
        );
    }

    fake.set_slow_blobs(0, Duration::ZERO);
    rc.restart();
    let r = get(addr, &format!("/v2/kill/app/blobs/{digest}"));
    assert_eq!(r.status, 200, "{}", describe(&r));
    assert_eq!(r.body.len(), SIZE, "GET after the restart: short body");
    assert_eq!(sha256_digest(&r.body), digest);
    let listing = wait_for_keys(&store, &root, &BTreeSet::from([blob_key.clone()]));
    assert_eq!(listing[&blob_key], SIZE as u64, "{blob_key}: size");
    let stored = store.get(BUCKET, &blob_key).expect("the blob object");
    assert!(
        stored == layer,
        "{blob_key}: the object differs from the blob"
    );
    check_content_addressed(&store, &root, &BTreeMap::from([(digest, SIZE as u64)]));
    drop(rc);
    drop(fake);
    drop(rt);
}

/// A server whose uploads were in flight when it was killed (SIGKILL right after the fill and the
/// manifest committed, the bucket black-holed so that no upload could have landed yet) writes them
/// once restarted: the blob and its repository link, the manifest, its link and the tag record,
/// with no client asking and without fetching the blob again.
fn what_a_server_killed_before_its_uploads_committed_reaches_the_bucket_after_its_restart(
    engine: Engine,
) {
    const SIZE: usize = 4 << 20;
    let rt = tokio::runtime::Runtime::new().expect("runtime for the fake upstream");
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let fake = rt.block_on(FakeUpstream::start());
    let layer = pseudo_random(SIZE, 13);
    let (manifest, digest) = fake.add_image("owed/app", "v1", layer.clone());
    let store = Store::start(engine);
    // regcache reaches the bucket through a relay, which the test turns into a black hole.
    let relay = Relay::start(store.addr(0));
    let prefix = Some("owed");
    let root = key_root(prefix);
    let upstream_id = fake.addr().to_string();
    let want = BTreeSet::from([
        format!("{root}blobs/sha256/{}", hex_of(&digest)),
        format!(
            "{root}repos/{upstream_id}/owed/app/_layers/sha256/{}",
            hex_of(&digest)
        ),
        format!("{root}manifests/sha256/{}", hex_of(&manifest)),
        format!(
            "{root}repos/{upstream_id}/owed/app/_manifests/sha256/{}",
            hex_of(&manifest)
        ),
        format!("{root}repos/{upstream_id}/owed/app/_tags/v1"),
    ]);

    let config = work.path().join("regcache.toml");
    // A short gc_interval: the maintenance loop is what retries the writes owed to the bucket.
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n{}",
            work.path().join("data").display(),
            config_for(
                &fake.url(),
                "",
                &format!(
                    "[store]\ngc_interval = \"1s\"\n{}",
                    s3_table_via(&store, &format!("http://{}", relay.addr()), prefix, "")
                )
            )
        ),
    )
    .expect("write config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut rc = Process::start(&config, addr, &work.path().join("regcache.log"));

    // The manifest and the blob are asked for at once, and held at the upstream (the manifest
    // behind its gate, the blob trickled) until regcache has asked the bucket all it asks before
    // it fetches; then the bucket becomes a black hole, before either is committed.
    fake.set_manifest_gate(true);
    fake.set_slow_blobs(256 << 10, Duration::from_millis(50));
    let manifest_get = std::thread::spawn(move || get(addr, "/v2/owed/app/manifests/v1"));
    let (received, blob_get) = read_on_a_thread(addr, format!("/v2/owed/app/blobs/{digest}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.hits("GET", "/v2/owed/app/manifests/v1") == 0
        || received.load(Ordering::SeqCst) < 64 << 10
    {
        assert!(
            Instant::now() < deadline,
            "after 30 s the upstream got {} manifest GETs and the blob client {} bytes\n{}",
            fake.hits("GET", "/v2/owed/app/manifests/v1"),
            received.load(Ordering::SeqCst),
            rc.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    relay.set_black_hole(true);
    fake.set_manifest_gate(false);
    let r = manifest_get.join().expect("manifest client thread");
    assert_eq!(r.status, 200, "{}", describe(&r));
    assert_eq!(sha256_digest(&r.body), manifest);
    // The manifest is stored before it is answered; the blob is committed once the store answers
    // `hit` for it, and the server is killed at that instant.
    let if_cached = format!("/v2/owed/app/blobs/{digest}");
    let mut outcomes = Vec::new();
    loop {
        let r = request(
            addr,
            "HEAD",
            &if_cached,
            &[("Cache-Control", "only-if-cached")],
            b"",
        )
        .expect("HEAD only-if-cached: no response");
        let outcome = r.header(CACHE).unwrap_or("-").to_owned();
        if outcome == "hit" {
            rc.kill9();
            break;
        }
        if outcomes.last() != Some(&outcome) {
            outcomes.push(outcome);
        }
        assert!(
            Instant::now() < deadline,
            "the blob was not committed within 30 s (outcomes: {outcomes:?})\n{}",
            rc.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    blob_get.join().expect("blob client thread");
    assert!(
        received.load(Ordering::SeqCst) as usize > SIZE,
        "the client got {} bytes of a {SIZE}-byte blob (with the headers)",
        received.load(Ordering::SeqCst)
    );
    let listing: Vec<String> = store
        .list(BUCKET, &root)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let landed: Vec<&String> = listing.iter().filter(|k| want.contains(*k)).collect();
    assert!(
        landed.is_empty(),
        "the bucket was black-holed, yet these writes landed before the kill: {landed:?}"
    );

    // The bucket answers again; the server restarts, and finishes what it owed.
    relay.set_black_hole(false);
    fake.set_slow_blobs(0, Duration::ZERO);
    rc.restart();
    let deadline = Instant::now() + UPLOAD_WAIT;
    loop {
        let listing: BTreeSet<String> = store
            .list(BUCKET, &root)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let missing: Vec<&String> = want.difference(&listing).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{UPLOAD_WAIT:?} after the restart the bucket still lacks {missing:#?}\n\
             it holds {listing:#?}\nregcache's log (access lines left out):\n{}",
            rc.log_text()
                .lines()
                .filter(|l| !l.contains("regcache::access"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    check_content_addressed(
        &store,
        &root,
        &BTreeMap::from([(digest.clone(), SIZE as u64)]),
    );
    assert_eq!(
        fake.blob_gets(&digest),
        1,
        "the restarted server fetched the blob from the upstream again"
    );
    drop(rc);
    drop(relay);
    drop(fake);
    drop(rt);
}

fn concurrent_fills_through_two_servers_store_one_correct_copy(engine: Engine) {
    const SIZE: usize = 16 << 20;
    let rt = tokio::runtime::Runtime::new().expect("runtime for the fake upstream");
    let fake = rt.block_on(FakeUpstream::start());
    let layer = pseudo_random(SIZE, 11);
    let (manifest, digest) = fake.add_image("race/app", "v1", layer.clone());
    let store = Store::start(engine);
    let config = config_for(&fake.url(), "", &s3_table(&store, None, ""));
    let a = Regcache::start(&config);
    let b = Regcache::start(&config);
    for rc in [&a, &b] {
        let r = get(rc.addr(), "/v2/race/app/manifests/v1");
        assert_eq!(r.status, 200, "{}", describe(&r));
        assert_eq!(sha256_digest(&r.body), manifest);
    }

    // 1 MiB every 50 ms: both fills are under way at the same time.
    fake.set_slow_blobs(1 << 20, Duration::from_millis(50));
    let barrier = Arc::new(Barrier::new(2));
    let path = format!("/v2/race/app/blobs/{digest}");
    let fetches: Vec<_> = [a.addr(), b.addr()]
        .into_iter()
        .map(|addr| {
            let (barrier, path) = (Arc::clone(&barrier), path.clone());
            std::thread::spawn(move || {
                barrier.wait();
                request(addr, "GET", &path, &[], b"")
            })
        })
        .collect();
    for (name, f) in ["A", "B"].iter().zip(fetches) {
        let r = f
            .join()
            .expect("client thread")
            .unwrap_or_else(|| panic!("{name}: GET blob: no response"));
        assert_eq!(r.status, 200, "{name}: {}", describe(&r));
        assert_eq!(r.body.len(), SIZE, "{name}: body length");
        assert!(r.body == layer, "{name}: wrong body");
    }

    // Neither found the blob in the bucket: both filled from the upstream at the same time.
    assert_eq!(
        fake.blob_gets(&digest),
        2,
        "the two fills were meant to race, each from the upstream"
    );
    let key = format!("blobs/sha256/{}", hex_of(&digest));
    wait_for_keys(&store, "", &BTreeSet::from([key.clone()]));
    // Let the slower server's upload land too, then look at what stays.
    std::thread::sleep(Duration::from_secs(5));
    let blobs = store.list(BUCKET, "blobs/");
    let matching: Vec<_> = blobs
        .iter()
        .filter(|(k, _)| k.contains(hex_of(&digest)))
        .collect();
    assert_eq!(
        matching,
        vec![&(key.clone(), SIZE as u64)],
        "the bucket should hold one copy of the blob: {blobs:?}"
    );
    let stored = store.get(BUCKET, &key).expect("the blob object");
    assert_eq!(sha256_digest(&stored), digest, "{key}: content");
    check_content_addressed(&store, "", &BTreeMap::from([(digest, SIZE as u64)]));
    drop(a);
    drop(b);
    drop(fake);
    drop(rt);
}

#[test]
fn tiered_mirror_head_fills_through_the_chain() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let mut upstream = Registry::start_seeded();
    let region = Regcache::start(&format!(
        "[upstreams.region]\nurl = \"{}\"\nfreshness = \"10m\"\n",
        upstream.url()
    ));
    let site = Regcache::start(&format!(
        "[upstreams.region]\nurl = \"{}\"\nfreshness = \"10m\"\n",
        region.url()
    ));
    let img = Image::with_reference_copy(&upstream, Seeded::SMALL_OCI, &work.path().join("ref"));

    let r = get(
        site.addr(),
        &format!("/v2/{}/manifests/{}", img.repo, img.tag),
    );
    assert_eq!(r.status, 200, "site: manifest: {}", describe(&r));
    assert_eq!(sha256_digest(&r.body), img.digest);

    // A cold HEAD through the site: answered, and a fill starts down the chain.
    for (blob, size) in &img.blobs {
        let r = head(site.addr(), &format!("/v2/{}/blobs/{blob}", img.repo));
        assert_eq!(r.status, 200, "site: HEAD {blob}: {}", describe(&r));
        assert_ne!(r.header(CACHE), Some("hit"), "site: {blob} was not cold");
        assert_eq!(
            r.header("content-length"),
            Some(size.to_string().as_str()),
            "site: HEAD {blob}"
        );
    }
    // Only the site is asked while the fill runs, so its hit can only come from that fill.
    let deadline = Instant::now() + UPLOAD_WAIT;
    for blob in img.blobs.keys() {
        loop {
            let r = head(site.addr(), &format!("/v2/{}/blobs/{blob}", img.repo));
            if r.status == 200 && r.header(CACHE) == Some("hit") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "site: {blob} is still not held after {UPLOAD_WAIT:?}: {}",
                describe(&r)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    upstream.stop();

    for blob in img.blobs.keys() {
        let path = format!("/v2/{}/blobs/{blob}", img.repo);
        for (name, rc) in [("region", &region), ("site", &site)] {
            let r = head(rc.addr(), &path);
            assert_eq!(
                (r.status, r.header(CACHE)),
                (200, Some("hit")),
                "{name}: HEAD {blob} with the upstream stopped: {}",
                describe(&r)
            );
        }
        let r = get(site.addr(), &path);
        assert_eq!(r.status, 200, "site: GET {blob}: {}", describe(&r));
        assert_eq!(sha256_digest(&r.body), *blob);
    }
    for (name, rc) in [("region", &region), ("site", &site)] {
        let dest = work.path().join(name);
        copy_ok(&rc.host_port(), &img.name, &dest, false);
        assert_same_copy(
            &work.path().join("ref"),
            &dest,
            &format!("{} through the {name} with the upstream stopped", img.name),
        );
    }
}

fn presigned_redirect_serves_bucket_blobs(engine: Engine) {
    let (work, mut upstream, store) = work_upstream_and_bucket(engine);
    let prefix = Some("presign");
    let root = key_root(prefix);
    let a = Regcache::start(&shared_config(&upstream, &store, prefix, ""));
    let b = Regcache::start(&shared_config(
        &upstream,
        &store,
        prefix,
        "redirect = true\nredirect_ttl = \"15m\"",
    ));
    let img = Image::with_reference_copy(&upstream, Seeded::SMALL_OCI, &work.path().join("ref"));
    copy_ok(&a.host_port(), &img.name, &work.path().join("a"), false);
    wait_for_keys(&store, &root, &img.keys(&root, &upstream.host_port()));
    upstream.stop();

    // A client asks for the manifest first: B finds it in the bucket.
    let r = get(b.addr(), &format!("/v2/{}/manifests/{}", img.repo, img.tag));
    assert_eq!(r.status, 200, "B: manifest: {}", describe(&r));
    assert_eq!(
        r.header(CACHE),
        Some("shared"),
        "B: manifest: {}",
        describe(&r)
    );
    assert_eq!(sha256_digest(&r.body), img.digest);
    let (layer, size) = img.largest_blob();
    let r = get(b.addr(), &format!("/v2/{}/blobs/{layer}", img.repo));
    assert_eq!(r.status, 307, "B: GET blob: {}", describe(&r));
    let location = r
        .header("location")
        .unwrap_or_else(|| panic!("307 without Location: {}", describe(&r)))
        .to_owned();
    let target = location
        .strip_prefix(&store.url(0))
        .filter(|t| t.starts_with('/'))
        .unwrap_or_else(|| {
            panic!(
                "Location {location:?} is not at the bucket endpoint {}",
                store.url(0)
            )
        });
    assert!(
        target.contains("X-Amz-Signature=") || target.contains("Signature="),
        "Location {location:?} is not a presigned URL"
    );
    // The presigned URL works on its own (no credentials of ours).
    let r = request(store.addr(0), "GET", target, &[], b"")
        .unwrap_or_else(|| panic!("GET {location}: no response"));
    assert_eq!(r.status, 200, "GET {location}: {}", describe(&r));
    assert_eq!(r.body.len() as u64, size);
    assert_eq!(sha256_digest(&r.body), layer);

    copy_ok(&b.host_port(), &img.name, &work.path().join("b"), false);
    assert_same_copy(
        &work.path().join("ref"),
        &work.path().join("b"),
        &format!("{} through B's redirects", img.name),
    );
    let m = b.app.metrics.render();
    assert_eq!(
        metric_sum(&m, "regcache_upstream_fetched_bytes_total"),
        0.0,
        "B fetched blob bytes from the upstream:\n{m}"
    );
}

fn tag_freshness_is_shared_through_the_bucket(engine: Engine) {
    let (_work, mut upstream, store) = work_upstream_and_bucket(engine);
    // Tags are fresh for 4 s: long enough for B to use A's record (and for the bucket writes to
    // land on a loaded machine), short enough to expire in the test.
    let config = config_for(
        &upstream.url(),
        "freshness = \"4s\"",
        &s3_table(&store, None, ""),
    );
    let a = Regcache::start(&config);
    let b = Regcache::start(&config);
    let (repo, tag) = ("small/oci", "latest");
    let path = format!("/v2/{repo}/manifests/{tag}");
    let key = format!("repos/{}/{repo}/_tags/{tag}", upstream.host_port());
    let record = |store: &Store| -> Option<serde_json::Value> {
        store
            .get(BUCKET, &key)
            .map(|body| serde_json::from_slice(&body).expect("tag record JSON"))
    };
    let wait_record = |newer_than: u64| -> serde_json::Value {
        let deadline = Instant::now() + UPLOAD_WAIT;
        loop {
            if let Some(r) = record(&store) {
                if r["checked_at_ms"].as_u64().unwrap_or(0) > newer_than {
                    return r;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no tag record newer than {newer_than} at {key}: {:?}",
                record(&store)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // A asks the upstream and shares the answer with its time.
    let r = get(a.addr(), &path);
    assert_eq!(r.status, 200, "A: {}", describe(&r));
    assert_eq!(r.header(CACHE), Some("miss"), "A: {}", describe(&r));
    let first = wait_record(0);
    let digest = first["digest"].as_str().expect("digest").to_owned();
    let t1 = first["checked_at_ms"].as_u64().expect("checked_at_ms");

    // B, within freshness of A's check, answers from the bucket without asking the upstream.
    let r = get(b.addr(), &path);
    assert_eq!(r.status, 200, "B: {}", describe(&r));
    assert_eq!(r.header(CACHE), Some("shared"), "B: {}", describe(&r));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));

    // Once the record is stale, B confirms with the upstream and shares the newer time.
    std::thread::sleep(Duration::from_millis(4200));
    let r = get(b.addr(), &path);
    assert_eq!(r.status, 200, "B after expiry: {}", describe(&r));
    assert_eq!(
        r.header(CACHE),
        Some("revalidated"),
        "B after expiry: {}",
        describe(&r)
    );
    let second = wait_record(t1);
    assert_eq!(second["digest"].as_str(), Some(digest.as_str()));

    // A's own record is stale now, but B's confirmation is fresh: A serves it without the
    // upstream, which is black-holed to prove it.
    let upstream_addr = upstream.addr();
    upstream.stop();
    let hole = BlackHole::start(upstream_addr);
    let r = get(a.addr(), &path);
    assert_eq!(r.status, 200, "A after B's check: {}", describe(&r));
    assert_eq!(
        r.header(CACHE),
        Some("shared"),
        "A after B's check: {}",
        describe(&r)
    );
    assert_eq!(hole.accepted(), 0, "A asked the upstream");
}

fn corrupt_bucket_copy_is_never_served_and_the_upstream_takes_over(engine: Engine) {
    let (work, upstream, store) = work_upstream_and_bucket(engine);
    let a = Regcache::start(&shared_config(&upstream, &store, None, ""));
    let b = Regcache::start(&shared_config(&upstream, &store, None, ""));
    let img = Image::with_reference_copy(&upstream, Seeded::SMALL_OCI, &work.path().join("ref"));
    copy_ok(&a.host_port(), &img.name, &work.path().join("a"), false);
    wait_for_keys(&store, "", &img.keys("", &upstream.host_port()));

    // Someone overwrites the layer in the bucket with other bytes of the same length.
    let (layer, size) = img.largest_blob();
    let key = format!("blobs/sha256/{}", hex_of(&layer));
    store.put(BUCKET, &key, &pseudo_random(size as usize, 99));

    let r = get(b.addr(), &format!("/v2/{}/manifests/{}", img.repo, img.tag));
    assert_eq!(r.status, 200, "B: manifest: {}", describe(&r));
    let path = format!("/v2/{}/blobs/{layer}", img.repo);
    // The first answer comes from the bad copy: the client never gets all of it (the last byte is
    // held until the digest is checked), so it cannot take it for the layer.
    let first = request(b.addr(), "GET", &path, &[], b"");
    if let Some(r) = &first {
        assert!(
            r.status != 200 || sha256_digest(&r.body) != layer,
            "the corrupt copy was served whole"
        );
        assert!(
            r.body.len() < size as usize,
            "{} of {size} bytes: the last byte must be held back",
            r.body.len()
        );
    }
    // The next request goes to the upstream and gets the right bytes.
    let r = get(b.addr(), &path);
    assert_eq!(r.status, 200, "B: second GET: {}", describe(&r));
    assert_eq!(
        r.header(CACHE),
        Some("miss"),
        "B: second GET: {}",
        describe(&r)
    );
    assert_eq!(
        sha256_digest(&r.body),
        layer,
        "B served the upstream's bytes"
    );
    let m = b.app.metrics.render();
    assert!(
        m.lines().any(
            |l| l.starts_with("regcache_bucket_errors_total{op=\"verify\"}") && !l.ends_with(" 0")
        ),
        "the bad copy is counted:\n{m}"
    );
    // B writes the verified bytes over the bad copy.
    let deadline = Instant::now() + UPLOAD_WAIT;
    while store.get(BUCKET, &key).map(|b| sha256_digest(&b)) != Some(layer.clone()) {
        assert!(
            Instant::now() < deadline,
            "the bad copy in the bucket was not replaced"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn any_server_serves_a_blob_the_bucket_links_to_the_repository(engine: Engine) {
    // Behind a load balancer a client may get the manifest from one server and the layers from
    // another that never saw that manifest.
    let (work, mut upstream, store) = work_upstream_and_bucket(engine);
    let a = Regcache::start(&shared_config(&upstream, &store, None, ""));
    let img = Image::with_reference_copy(&upstream, Seeded::SMALL_OCI, &work.path().join("ref"));
    copy_ok(&a.host_port(), &img.name, &work.path().join("a"), false);
    let (layer, _) = img.largest_blob();
    // The keys include the blob's `_layers` link.
    wait_for_keys(&store, "", &img.keys("", &upstream.host_port()));

    let upstream_addr = upstream.addr();
    upstream.stop();
    let hole = BlackHole::start(upstream_addr);
    let c = Regcache::start(&shared_config(&upstream, &store, None, ""));
    let path = format!("/v2/{}/blobs/{layer}", img.repo);
    let r = head(c.addr(), &path);
    assert_eq!(r.status, 200, "C: HEAD: {}", describe(&r));
    assert_eq!(r.header(CACHE), Some("shared"), "C: HEAD: {}", describe(&r));
    let r = get(c.addr(), &path);
    assert_eq!(r.status, 200, "C: GET: {}", describe(&r));
    assert_eq!(r.header(CACHE), Some("shared"), "C: GET: {}", describe(&r));
    assert_eq!(sha256_digest(&r.body), layer);
    // Another repository gets nothing from that link.
    let r = request(
        c.addr(),
        "GET",
        &format!("/v2/small/docker-other/blobs/{layer}"),
        &[],
        b"",
    );
    if let Some(r) = r {
        assert_ne!(r.status, 200, "served for a repository it is not linked to");
    }
    assert!(
        hole.accepted() > 0,
        "the other repository had to ask the upstream"
    );
}

// The fake upstream, not docker-registry: the real registry refuses to store a manifest that names
// a blob the repository lacks, and that manifest is the point here.
fn the_bucket_serves_a_blob_to_a_repository_only_once_the_upstream_confirmed_it_there(
    engine: Engine,
) {
    let rt = tokio::runtime::Runtime::new().expect("runtime for the fake upstream");
    let fake = rt.block_on(FakeUpstream::start());
    let data = pseudo_random(40_000, 17);
    let digest = fake.add_blob("t/private", data.clone());
    let hex = hex_of(&digest).to_owned();
    let claim = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
                "size": 2
            },
            "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": data.len() }],
        }))
        .expect("serialize manifest"),
    );
    for repo in ["t/evil", "t/late"] {
        fake.add_manifest(repo, Some("v1"), OCI_MANIFEST, claim.clone());
    }
    let store = Store::start(engine);
    let config = config_for(&fake.url(), "", &s3_table(&store, None, ""));
    let up = fake.host();
    let layers = |repo: &str| format!("repos/{up}/{repo}/_layers/sha256/{hex}");

    // A fills the blob for t/private: the bucket holds it, linked to t/private only.
    let a = Regcache::start(&config);
    let r = get(a.addr(), &format!("/v2/t/private/blobs/{digest}"));
    assert_eq!(r.status, 200, "A: t/private: {}", describe(&r));
    wait_for_keys(
        &store,
        "",
        &BTreeSet::from([format!("blobs/sha256/{hex}"), layers("t/private")]),
    );

    // B sees t/evil's and t/late's manifests, which name the digest: a claim the upstream refuses.
    let b = Regcache::start(&config);
    for repo in ["t/evil", "t/late"] {
        let r = get(b.addr(), &format!("/v2/{repo}/manifests/v1"));
        assert_eq!(r.status, 200, "B: {repo} manifest: {}", describe(&r));
    }
    let evil_path = format!("/v2/t/evil/blobs/{digest}");
    let r = get(b.addr(), &evil_path);
    assert_eq!(
        r.status,
        404,
        "B: t/evil, whose manifest names a blob the upstream refuses it, got it from the bucket: {}",
        describe(&r)
    );
    assert!(
        fake.hits("GET", &evil_path) > 0,
        "B asked the upstream: {:?}",
        fake.requests()
    );

    // The upstream has it for t/evil now: A (which stores it) confirms it with a HEAD and links
    // it in the bucket too.
    fake.add_blob("t/evil", data.clone());
    let r = get(a.addr(), &evil_path);
    assert_eq!(r.status, 200, "A: t/evil, confirmed: {}", describe(&r));
    assert_eq!(r.header(CACHE), Some("revalidated"), "A: {}", describe(&r));
    let mut want = BTreeSet::from([layers("t/evil")]);
    for repo in ["t/evil", "t/late"] {
        want.insert(format!("repos/{up}/{repo}/_tags/v1"));
    }
    wait_for_keys(&store, "", &want);

    // The upstream is down. C, which never saw any of it, serves t/evil's blob from the bucket
    // (the upstream confirmed that link), but not t/late's (only its manifest names it).
    fake.set_status(Some(503));
    let c = Regcache::start(&config);
    for repo in ["t/evil", "t/late"] {
        let r = get(c.addr(), &format!("/v2/{repo}/manifests/v1"));
        assert_eq!(r.status, 200, "C: {repo} manifest: {}", describe(&r));
    }
    let r = get(c.addr(), &evil_path);
    assert_eq!(
        r.status,
        200,
        "C: t/evil during the outage: {}",
        describe(&r)
    );
    assert_eq!(
        r.header(CACHE),
        Some("shared"),
        "C: t/evil: {}",
        describe(&r)
    );
    assert_eq!(sha256_digest(&r.body), digest);
    let r = get(c.addr(), &format!("/v2/t/late/blobs/{digest}"));
    assert_eq!(
        r.status,
        503,
        "C: t/late during the outage: named by its manifest, never confirmed: {}",
        describe(&r)
    );
}

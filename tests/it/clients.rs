//! The real clients regcache is for, end to end: dockerd (`registry-mirrors`), containerd's `ctr`
//! (`hosts.toml`, `?ns=docker.io`) and podman (`registries.conf` mirror, with and without a path
//! prefix), against a real upstream (docker-registry) — and the same pulls with the upstream
//! black-holed once the cache is warm — and dockerd through regcache over TLS, trusting it only by a
//! CA in its (private) `/etc/docker/certs.d`.
//!
//! Every client runs with a dead proxy for anything off loopback (see `support::clients`), so a
//! client's fallback to Docker Hub cannot succeed; each pull is also checked against regcache's own
//! metrics (requests it answered 200, bytes it served) and, where the client says so, its log.

use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::clients::{describe, registries_conf, Containerd, Dockerd, Podman};
use crate::support::media::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX};
use crate::support::net::{Acceptor, BlackHole};
use crate::support::process::metric;
use crate::support::regcache::{config_for, Regcache};
use crate::support::registry::{http_get, Registry};

/// What regcache has answered so far, from its Prometheus text.
#[derive(Clone, Copy, Debug)]
struct Served {
    manifests: f64,
    blobs: f64,
    bytes: f64,
    stale: f64,
}

fn served(rc: &Regcache) -> Served {
    let text = rc.app.metrics.render();
    let get = |prefix: &str| metric(&text, prefix).unwrap_or(0.0);
    Served {
        manifests: get(r#"regcache_requests_total{route="manifest",status="200"}"#),
        blobs: get(r#"regcache_requests_total{route="blob",status="200"}"#),
        bytes: get("regcache_served_bytes_total"),
        stale: get(r#"regcache_cache_outcomes_total{outcome="stale"}"#),
    }
}

/// Runs `pull`, then asserts that regcache answered at least `manifests` manifest requests and
/// `blobs` blob requests with 200 during it (and served bytes).
fn assert_mirror_served(
    rc: &Regcache,
    what: &str,
    manifests: f64,
    blobs: f64,
    pull: impl FnOnce(),
) {
    let before = served(rc);
    pull();
    let after = served(rc);
    assert!(
        after.manifests - before.manifests >= manifests,
        "{what}: regcache answered {} manifest requests, expected at least {manifests} (before {before:?}, after {after:?})",
        after.manifests - before.manifests
    );
    assert!(
        after.blobs - before.blobs >= blobs,
        "{what}: regcache answered {} blob requests, expected at least {blobs} (before {before:?}, after {after:?})",
        after.blobs - before.blobs
    );
    assert!(
        after.bytes > before.bytes,
        "{what}: regcache served no bytes (before {before:?}, after {after:?})"
    );
}

/// The digest the upstream gives `repo:reference` when asked for `accept`.
fn upstream_digest(upstream: &Registry, repo: &str, reference: &str, accept: &str) -> String {
    let r = http_get(
        upstream.addr(),
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Accept", accept)],
    )
    .unwrap_or_else(|| panic!("GET {repo}:{reference} from the upstream failed"));
    assert_eq!(r.status, 200, "upstream GET {repo}:{reference}");
    r.header("docker-content-digest")
        .unwrap_or_else(|| panic!("no Docker-Content-Digest for {repo}:{reference}"))
        .to_owned()
}

/// The child digests of a multi-arch image on the upstream: (index digest, amd64 child, arm64 child).
fn upstream_index(upstream: &Registry, repo: &str, accept: &str) -> (String, String, String) {
    let r = http_get(
        upstream.addr(),
        &format!("/v2/{repo}/manifests/latest"),
        &[("Accept", accept)],
    )
    .unwrap_or_else(|| panic!("GET {repo}:latest from the upstream failed"));
    let index: serde_json::Value = serde_json::from_slice(&r.body).expect("index is JSON");
    let child = |arch: &str| {
        index["manifests"]
            .as_array()
            .expect("index has manifests")
            .iter()
            .find(|m| m["platform"]["architecture"] == arch)
            .and_then(|m| m["digest"].as_str())
            .unwrap_or_else(|| panic!("{repo}: no {arch} child"))
            .to_owned()
    };
    (
        upstream_digest(upstream, repo, "latest", accept),
        child("amd64"),
        child("arm64"),
    )
}

/// Digests of the images the tests pull, read from the upstream before anything else.
struct Digests {
    busybox: String,
    multi_docker: (String, String, String),
    multi_oci: (String, String, String),
}

impl Digests {
    fn of(upstream: &Registry) -> Digests {
        Digests {
            busybox: upstream_digest(upstream, "library/busybox", "latest", DOCKER_MANIFEST),
            multi_docker: upstream_index(upstream, "multi/docker", DOCKER_LIST),
            multi_oci: upstream_index(upstream, "multi/oci", OCI_INDEX),
        }
    }
}

/// dockerd gives up on a mirror with this log line before it tries the next endpoint (Docker Hub).
const DOCKERD_FALLBACK: &str = "Attempting next endpoint";

/// `docker pull busybox`, served by regcache (`what` names it), gives the upstream's `digest`.
fn docker_pull_busybox(docker: &Dockerd, rc: &Regcache, what: &str, digest: &str) {
    assert_mirror_served(rc, what, 1.0, 2.0, || {
        let out = docker.docker_ok(&["pull", "busybox"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("docker.io/library/busybox:latest"),
            "docker pull busybox: {text}"
        );
    });
    assert_eq!(
        docker.inspect("busybox", "{{index .RepoDigests 0}}"),
        format!("busybox@{digest}"),
        "dockerd's busybox is not the upstream's"
    );
}

/// The dockerd pulls of these tests: `busybox` (unqualified Docker Hub name), the multi-arch Docker
/// manifest list by digest and then by tag, and the OCI index by tag, into a fresh dockerd. Each must
/// be served by regcache.
fn dockerd_pulls(docker: &Dockerd, rc: &Regcache, d: &Digests) {
    docker_pull_busybox(docker, rc, "docker pull busybox", &d.busybox);

    // by digest first: a dockerd that already knows a digest asks the mirror nothing for it
    let (list, _, _) = &d.multi_docker;
    let by_digest = format!("multi/docker@{list}");
    // the list and its amd64 child (a manifest by digest), and the image config
    assert_mirror_served(rc, &format!("docker pull {by_digest}"), 2.0, 1.0, || {
        docker.docker_ok(&["pull", &by_digest]);
    });
    assert_eq!(docker.inspect(&by_digest, "{{.Architecture}}"), "amd64");
    let repo_digests = docker.inspect(&by_digest, "{{json .RepoDigests}}");
    assert!(
        repo_digests.contains(&by_digest),
        "dockerd's {by_digest} has RepoDigests {repo_digests}"
    );
    assert_mirror_served(rc, "docker pull multi/docker", 1.0, 0.0, || {
        docker.docker_ok(&["pull", "multi/docker"]);
    });
    assert_eq!(
        docker.inspect("multi/docker:latest", "{{.Id}}"),
        docker.inspect(&by_digest, "{{.Id}}"),
        "multi/docker by tag and by digest differ"
    );

    // the OCI index by tag: the index and the amd64 child
    assert_mirror_served(rc, "docker pull multi/oci", 2.0, 0.0, || {
        docker.docker_ok(&["pull", "multi/oci:latest"]);
    });
    assert_eq!(
        docker.inspect("multi/oci:latest", "{{.Architecture}}"),
        "amd64"
    );

    let log = docker.log_text();
    assert!(
        !log.contains(DOCKERD_FALLBACK),
        "dockerd fell back from the mirror:\n{log}"
    );
}

/// The podman pulls of these tests, through the mirror at `location`: `busybox` (unqualified) and the
/// arm64 image of a multi-arch index by tag (`--arch arm64`).
fn podman_pulls(podman: &Podman, location: &str, rc: &Regcache, multi: &str, d: &Digests) {
    assert_mirror_served(
        rc,
        &format!("podman pull busybox via {location}"),
        1.0,
        2.0,
        || {
            podman.pull_via(location, &["busybox"]);
        },
    );
    assert_eq!(
        podman.inspect("docker.io/library/busybox:latest", "{{.Digest}}"),
        d.busybox,
        "podman's busybox is not the upstream's"
    );

    let (index, _, arm64) = if multi == "multi/oci" {
        &d.multi_oci
    } else {
        &d.multi_docker
    };
    let image = format!("docker.io/{multi}:latest");
    assert_mirror_served(
        rc,
        &format!("podman pull --arch arm64 {image} via {location}"),
        2.0,
        1.0,
        || {
            podman.pull_via(location, &["--arch", "arm64", &image]);
        },
    );
    assert_eq!(podman.inspect(&image, "{{.Architecture}}"), "arm64");
    let repo_digests = podman.inspect(&image, "{{json .RepoDigests}}");
    for digest in [index, arm64] {
        assert!(
            repo_digests.contains(&format!("docker.io/{multi}@{digest}")),
            "podman's {image} should carry the index and arm64 digests; RepoDigests {repo_digests}"
        );
    }
}

/// The line of `ctr images ls` for the image `reference` (`short` names it in the panic).
fn ctr_image_line(containerd: &Containerd, reference: &str, short: &str) -> String {
    let images = String::from_utf8_lossy(&containerd.ctr_ok(&["images", "ls"]).stdout).into_owned();
    images
        .lines()
        .find(|l| l.starts_with(reference))
        .unwrap_or_else(|| panic!("ctr images ls has no {short}:\n{images}"))
        .to_owned()
}

/// `ctr images pull` of `image` with the native snapshotter through the mirror in `hosts`, with
/// `flags` before the others.
fn ctr_pull(containerd: &Containerd, hosts: &str, flags: &[&str], image: &str) {
    let mut args = vec!["images", "pull"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--snapshotter", "native", "--hosts-dir", hosts, image]);
    containerd.ctr_ok(&args);
}

/// The upstream's access log `access` has the request path `wanted`.
fn assert_upstream_saw(access: &str, wanted: &str) {
    assert!(
        access.contains(wanted),
        "the upstream never saw {wanted}:\n{access}"
    );
}

#[test]
fn dockerd_with_registry_mirrors_pulls_hub_names_and_multi_arch_by_tag_and_digest() {
    let upstream = Registry::start_seeded();
    let digests = Digests::of(&upstream);
    let rc = Regcache::with_upstream(&upstream.url());
    let docker = Dockerd::start(&rc.host_port());

    dockerd_pulls(&docker, &rc, &digests);

    // regcache fetched what dockerd asked for from the upstream (nothing was there before)
    let access = upstream.access_log();
    for wanted in [
        "/v2/library/busybox/manifests/latest".to_owned(),
        format!("/v2/multi/docker/manifests/{}", digests.multi_docker.0),
        format!("/v2/multi/docker/manifests/{}", digests.multi_docker.1),
        "/v2/multi/oci/manifests/latest".to_owned(),
    ] {
        assert_upstream_saw(&access, &wanted);
    }
}

#[test]
fn containerd_ctr_pulls_through_hosts_toml_mirror_including_all_platforms() {
    let upstream = Registry::start_seeded();
    let digests = Digests::of(&upstream);
    let rc = Regcache::with_upstream(&upstream.url());
    let containerd = Containerd::start();
    let hosts = containerd.hosts_dir(&rc.host_port());
    let hosts = hosts.to_str().expect("hosts dir is UTF-8");

    // tag resolved with HEAD, manifest by digest, config and layer
    assert_mirror_served(&rc, "ctr pull busybox", 2.0, 2.0, || {
        ctr_pull(&containerd, hosts, &[], "docker.io/library/busybox:latest");
    });
    let line = ctr_image_line(&containerd, "docker.io/library/busybox:latest", "busybox");
    assert!(
        line.contains(&digests.busybox),
        "ctr's busybox is not the upstream's {}: {line}",
        digests.busybox
    );

    // the index, both children, both configs (the layer is busybox's, already there)
    let (index, amd64, arm64) = &digests.multi_oci;
    assert_mirror_served(&rc, "ctr pull --all-platforms multi/oci", 4.0, 2.0, || {
        ctr_pull(
            &containerd,
            hosts,
            &["--all-platforms"],
            "docker.io/multi/oci:latest",
        );
    });
    let line = ctr_image_line(&containerd, "docker.io/multi/oci:latest", "multi/oci");
    assert!(
        line.contains(index.as_str()) && line.contains("linux/amd64") && line.contains("linux/arm64"),
        "ctr's multi/oci should be the upstream's index {index} for linux/amd64 and linux/arm64: {line}"
    );
    let content =
        String::from_utf8_lossy(&containerd.ctr_ok(&["content", "ls", "-q"]).stdout).into_owned();
    for child in [amd64, arm64] {
        assert!(
            content.contains(child.as_str()),
            "ctr fetched no {child} (--all-platforms):\n{content}"
        );
    }
    // and the upstream saw regcache fetch both children
    let access = upstream.access_log();
    for child in [amd64, arm64] {
        let wanted = format!("/v2/multi/oci/manifests/{child}");
        assert_upstream_saw(&access, &wanted);
    }
}

#[test]
fn podman_pulls_through_registries_conf_mirror_with_and_without_path_prefix_and_arch_arm64() {
    let upstream = Registry::start_seeded();
    let digests = Digests::of(&upstream);
    let rc = Regcache::with_upstream(&upstream.url());

    let plain_location = rc.host_port();
    let plain = Podman::new(&registries_conf(&plain_location));
    podman_pulls(&plain, &plain_location, &rc, "multi/docker", &digests);

    // a path prefix in the mirror location: requests arrive as /v2/docker.io/<repo>/...
    let prefixed_location = format!("{}/docker.io", rc.host_port());
    let prefixed = Podman::new(&registries_conf(&prefixed_location));
    podman_pulls(&prefixed, &prefixed_location, &rc, "multi/oci", &digests);
}

/// [`dockerd_pulls`] into a fresh dockerd, then [`podman_pulls`] into fresh podmans through the
/// mirror at `plain_location` and at `prefixed_location`; returns the clients.
fn pull_with_every_client(
    rc: &Regcache,
    digests: &Digests,
    plain_location: &str,
    prefixed_location: &str,
) -> (Dockerd, Podman, Podman) {
    let docker = Dockerd::start(&rc.host_port());
    dockerd_pulls(&docker, rc, digests);
    let plain = Podman::new(&registries_conf(plain_location));
    podman_pulls(&plain, plain_location, rc, "multi/docker", digests);
    let prefixed = Podman::new(&registries_conf(prefixed_location));
    podman_pulls(&prefixed, prefixed_location, rc, "multi/oci", digests);
    (docker, plain, prefixed)
}

#[test]
fn dockerd_and_podman_pull_warmed_images_from_regcache_while_upstream_is_black_holed() {
    let mut upstream = Registry::start_seeded();
    let digests = Digests::of(&upstream);
    // Tags go stale after a second, so during the outage every tag costs an upstream attempt that
    // the black hole swallows (2 s at most) before regcache serves its cached copy.
    let rc = Regcache::start(&config_for(
        &upstream.url(),
        "freshness = \"1s\"\nconnect_timeout = \"2s\"\nheader_timeout = \"2s\"\nidle_timeout = \"5s\"",
        "",
    ));
    let plain_location = rc.host_port();
    let prefixed_location = format!("{}/docker.io", rc.host_port());

    // Warm the cache with the clients themselves.
    {
        let _clients = pull_with_every_client(&rc, &digests, &plain_location, &prefixed_location);
    }

    // The outage: the upstream's port accepts connections and never answers.
    let upstream_addr = upstream.addr();
    upstream.stop();
    let hole = BlackHole::start(upstream_addr);
    let before = served(&rc);
    std::thread::sleep(Duration::from_millis(1200)); // every cached tag is now past its freshness

    // Fresh client storage: every image must come from regcache again.
    let started = Instant::now();
    let _clients = pull_with_every_client(&rc, &digests, &plain_location, &prefixed_location);
    let took = started.elapsed();

    let after = served(&rc);
    assert!(
        after.stale > before.stale,
        "regcache served no stale tag during the outage (before {before:?}, after {after:?})"
    );
    assert!(
        hole.accepted() >= 1,
        "regcache never tried the black-holed upstream: the outage was not exercised"
    );
    assert!(
        took < Duration::from_secs(90),
        "the pulls during the outage took {took:?}"
    );
}

/// A plain TCP relay from `[::1]:PORT` to `to` (the in-process regcache listens on 127.0.0.1 only,
/// which dockerd never verifies TLS for); TLS stays end to end between the client and regcache.
/// Counts the connections it relayed.
struct Ipv6Front {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _acceptor: Acceptor,
}

impl Ipv6Front {
    fn start(to: SocketAddr) -> Ipv6Front {
        fn pipe(mut from: TcpStream, mut to: TcpStream) {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        }
        let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
            .expect("bind [::1]:0 (this test needs IPv6 on loopback)");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepted2 = Arc::clone(&accepted);
        let acceptor = Acceptor::serve(listener, move |client| {
            accepted2.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_nonblocking(false);
            let Ok(server) = TcpStream::connect(to) else {
                return;
            };
            if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                pipe(client, s2);
                pipe(server, c2);
            }
        });
        Ipv6Front {
            addr,
            accepted,
            _acceptor: acceptor,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// What Go's TLS client says about a certificate from a CA it does not trust.
const UNKNOWN_AUTHORITY: &str = "certificate signed by unknown authority";

#[test]
fn dockerd_pulls_through_an_https_mirror_trusting_a_ca_in_certs_d() {
    let started = Instant::now();
    let upstream = Registry::start_seeded();
    let busybox = upstream_digest(&upstream, "library/busybox", "latest", DOCKER_MANIFEST);
    let certs = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("certs dir");
    crate::support::certs::make_certs(certs.path(), "0x5005");
    let rc = Regcache::start(&config_for(
        &upstream.url(),
        "",
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"",
            certs.path().join("server.crt").display(),
            certs.path().join("server.key").display()
        ),
    ));
    // dockerd treats every 127.0.0.0/8 registry as insecure (certificate unchecked, certs.d unread):
    // the mirror is at [::1]:PORT, which it verifies like any other host.
    let front = Ipv6Front::start(rc.addr());
    let mirror = front.addr.to_string();
    assert!(mirror.starts_with("[::1]:"), "{mirror}");

    // Without the CA: dockerd reaches the mirror, rejects its certificate, falls back to Docker Hub
    // and dies on the dead proxy.
    {
        let docker = Dockerd::start_https(&mirror, None);
        let before = served(&rc);
        let out = docker.docker(&["pull", "busybox"]);
        let after = served(&rc);
        let log = docker.log_text();
        assert!(
            !out.status.success(),
            "docker pull busybox succeeded with an untrusted mirror certificate:\n{}\n--- dockerd log ---\n{log}",
            describe("docker pull busybox", &out)
        );
        assert!(
            log.lines()
                .any(|l| l.contains(&mirror) && l.contains(UNKNOWN_AUTHORITY)),
            "dockerd logged no `{UNKNOWN_AUTHORITY}` for the mirror {mirror}:\n{log}"
        );
        assert!(
            log.contains(DOCKERD_FALLBACK),
            "dockerd did not give up on the mirror:\n{log}"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:9"),
            "the pull should have failed on the dead proxy, after the mirror:\n{}",
            describe("docker pull busybox", &out)
        );
        assert!(
            front.accepted() >= 1,
            "dockerd never connected to the mirror:\n{log}"
        );
        assert!(
            after.manifests == before.manifests && after.blobs == before.blobs,
            "regcache served a pull it should never have seen (before {before:?}, after {after:?})"
        );
    }

    // With the CA in its private /etc/docker/certs.d/[::1]:PORT/ca.crt: pulled from the mirror.
    let docker = Dockerd::start_https(&mirror, Some(&certs.path().join("ca.crt")));
    docker_pull_busybox(&docker, &rc, "docker pull busybox over TLS", &busybox);
    let log = docker.log_text();
    assert!(
        !log.contains(DOCKERD_FALLBACK) && !log.contains(UNKNOWN_AUTHORITY),
        "dockerd did not use the mirror cleanly:\n{log}"
    );
    assert!(
        upstream
            .access_log()
            .contains("/v2/library/busybox/manifests/latest"),
        "regcache never fetched busybox from the upstream"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "the test took {took:?}");
}

//! Running it like infrastructure: TLS with reload, health probes, socket activation, graceful
//! SIGTERM, JSON logs, and the systemd unit.
//!
//! The unit cannot be run under systemd here: systemd is not PID 1 on these machines (tests run
//! in a container), so `systemctl start` is impossible. What is checked instead: the unit and its
//! cloud-init copy pass `systemd-analyze verify` and score at most 2.0 in `systemd-analyze
//! security`, the sysusers file creates the user, and `regcache serve` traced with strace while
//! it serves, reloads and stops makes only the system calls, socket families, `/proc` reads and
//! writes that the unit's sandbox allows.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::certs::{make_certs, make_certs_valid, openssl_time};
use crate::support::fake::FakeUpstream;
use crate::support::process::{free_port, Process};
use crate::support::registry::http_get;

/// The serial of the certificate a TLS server presents now.
fn served_serial(addr: SocketAddr) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -servername localhost </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A config serving HTTPS with `dir`'s `server.crt` and `server.key` (`extra` in `[tls]`).
fn tls_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("rc.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n",
            dir.join("data").display(),
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        ),
    )
    .expect("config");
    config
}

/// `regcache health --url https://ADDR` with `extra` flags.
fn health_tls(addr: SocketAddr, extra: &[&str]) -> std::process::Output {
    let url = format!("https://{addr}");
    let mut args = vec!["health", "--url", &url];
    args.extend_from_slice(extra);
    Process::run_to_end(&args)
}

/// Starts `regcache serve --config CONFIG` on `addr` with HTTPS (stderr to `log`) and waits
/// until it answers. Process::start waits on plain-HTTP /readyz, which a TLS listener does not
/// answer: this polls with the health command instead.
fn start_tls(config: &Path, addr: SocketAddr, log: &Path) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &addr.to_string()])
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn regcache");
    let t = Instant::now();
    while !health_tls(addr, &["--insecure"]).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not ready: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// A client trusting `dir`'s test CA, and a runtime to drive it.
fn tls_client(dir: &Path) -> (tokio::runtime::Runtime, reqwest::Client) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.crt")).expect("ca"))
        .expect("ca pem");
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(ca)
        .build()
        .expect("client");
    (rt, client)
}

#[test]
fn tls_listener_serves_https_and_reloads_its_certificate_on_sighup() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let dir = work.path();
    make_certs(dir, "0x1001");
    let config = tls_config(dir, "");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = start_tls(&config, addr, &dir.join("rc.log"));
    // Without --insecure the test CA is unknown to the health command: refused.
    assert!(
        !health_tls(addr, &[]).status.success(),
        "an untrusted certificate must fail the probe"
    );
    // A client that trusts the CA talks HTTPS.
    let (rt, client) = tls_client(dir);
    let status = rt
        .block_on(client.get(format!("https://{addr}/v2/")).send())
        .expect("GET /v2/ over TLS")
        .status();
    assert_eq!(status, 200);
    assert_eq!(served_serial(addr), "serial=1001");

    make_certs(dir, "0x2002");
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill -HUP");
    let t = Instant::now();
    while served_serial(addr) != "serial=2002" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "certificate not reloaded: {}",
            served_serial(addr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Seconds since the Unix epoch now.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[test]
fn an_expired_or_not_yet_valid_certificate_is_refused_at_start_with_its_dates() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let dir = work.path();
    let config = tls_config(dir, "");
    let config = config.display().to_string();
    for (not_before, not_after, want) in [
        (
            "20200101000000Z",
            "20200102000000Z",
            ["expired", "2020-01-02 00:00:00 UTC"],
        ),
        // Past 2049, X.509 writes GeneralizedTime instead of UTCTime.
        (
            "20990101000000Z",
            "20990102000000Z",
            ["not valid before", "2099-01-01 00:00:00 UTC"],
        ),
    ] {
        make_certs_valid(dir, "3003", not_before, not_after);
        for args in [
            vec!["check-config", config.as_str()],
            vec![
                "serve",
                "--config",
                config.as_str(),
                "--listen",
                "127.0.0.1:0",
            ],
        ] {
            let (code, err) = run_in(dir, &args);
            assert!(
                code == Some(2)
                    && want.iter().all(|w| err.contains(w))
                    && err.contains("server.crt"),
                "{not_before}..{not_after}, {args:?}: exit {code:?}, stderr: {err}"
            );
        }
    }
}

#[test]
fn sighup_with_an_expired_certificate_keeps_the_one_in_force_and_logs_an_error() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let dir = work.path();
    make_certs(dir, "0x1001");
    let config = tls_config(dir, "");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.join("rc.log");
    let mut child = start_tls(&config, addr, &log);
    assert_eq!(served_serial(addr), "serial=1001");

    make_certs_valid(dir, "2002", "20200101000000Z", "20200102000000Z");
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill -HUP");
    let t = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("ERROR") && text.contains("expired") {
            break text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no error about the expired certificate: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        !text.contains("TLS certificate reloaded"),
        "an expired certificate must not be reported as reloaded: {text}"
    );
    assert_eq!(
        served_serial(addr),
        "serial=1001",
        "the valid certificate stays in force: {text}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn certificate_expiry_is_exported_and_a_near_expiry_is_warned() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let dir = work.path();
    let now = unix_now();
    let not_after = now + 5 * 86_400;
    make_certs_valid(
        dir,
        "4004",
        &openssl_time(now - 3600),
        &openssl_time(not_after),
    );
    let config = tls_config(dir, "");
    let (code, err) = run_in(dir, &["check-config", &config.display().to_string()]);
    assert!(
        code == Some(0) && err.contains("warning") && err.contains("expires on"),
        "5 days left, under the 14 days default: exit {code:?}, stderr: {err}"
    );
    let quiet = tls_config(dir, "expiry_warning = \"2d\"");
    let (code, err) = run_in(dir, &["check-config", &quiet.display().to_string()]);
    assert!(
        code == Some(0) && !err.contains("expires on"),
        "5 days left, over expiry_warning = 2d: exit {code:?}, stderr: {err}"
    );

    let config = tls_config(dir, "");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.join("rc.log");
    let mut child = start_tls(&config, addr, &log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("WARN") && text.contains("expires on"),
        "the near expiry is logged at start: {text}"
    );
    let (rt, client) = tls_client(dir);
    let metrics = rt
        .block_on(async {
            client
                .get(format!("https://{addr}/metrics"))
                .send()
                .await?
                .text()
                .await
        })
        .expect("GET /metrics over TLS");
    let want = format!(
        "regcache_tls_certificate_expiry_timestamp_seconds{{cert=\"{}\"}} {not_after}",
        dir.join("server.crt").display()
    );
    assert!(
        metrics.lines().any(|l| l == want),
        "want the line {want:?} in:\n{metrics}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn health_command_exits_0_when_ready_and_1_when_not() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = offline_config(work.path(), "");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut rc = Process::start(&config, addr, &work.path().join("log"));
    let cfg = config.display().to_string();
    let listen = addr.to_string();
    let ok = Process::run_to_end(&["health", "--config", &cfg, "--listen", &listen]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"ready\":true"));
    rc.kill9();
    let down = Process::run_to_end(&[
        "health",
        "--url",
        &format!("http://{addr}"),
        "--timeout",
        "2s",
    ]);
    assert_eq!(
        down.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

#[test]
fn socket_activation_serves_on_the_inherited_listener() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let other = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Command::new("systemd-socket-activate")
        .args([
            "-l",
            &addr.to_string(),
            env!("CARGO_BIN_EXE_regcache"),
            "serve",
        ])
        .args(["--listen", &other.to_string()])
        .arg("--data-dir")
        .arg(work.path().join("d"))
        .args(["--upstream", "http://127.0.0.1:9"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd)");
    // The first connection starts regcache, which accepts it on the passed socket.
    let t = Instant::now();
    let resp = loop {
        if let Some(r) = http_get(addr, "/v2/", &[]) {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no answer on the activated socket"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(resp.status, 200);
    assert!(
        http_get(other, "/v2/", &[]).is_none(),
        "the configured listen address must not be bound"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A fake upstream serving one blob of `app/slow` at 256 KiB per 100 ms, and a regcache in front
/// of it with a 20 s shutdown grace (and `extra` config before its `[upstreams]`).
struct SlowBlob {
    rc: Process,
    addr: SocketAddr,
    /// The blob's digest.
    digest: String,
    _fake: FakeUpstream,
    _work: tempfile::TempDir,
}

impl SlowBlob {
    async fn start(layer: Bytes, extra: &str) -> SlowBlob {
        let fake = FakeUpstream::start().await;
        let (_, digest) = fake.add_image("app/slow", "v1", layer);
        fake.set_slow_blobs(256 << 10, Duration::from_millis(100)); // 4 MiB in about 1.6 s
        let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
        let config = work.path().join("rc.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nshutdown_grace = \"20s\"\n{extra}[upstreams.docker]\nurl = \"{}\"\n",
                work.path().join("d").display(),
                fake.url()
            ),
        )
        .expect("config");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = work.path().join("log");
        let rc = tokio::task::block_in_place(|| Process::start(&config, addr, &log));
        SlowBlob {
            rc,
            addr,
            digest,
            _fake: fake,
            _work: work,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_download_finish_then_exits_0_and_logs_json() {
    let layer = Bytes::from(vec![7u8; 4 << 20]);
    let mut slow = SlowBlob::start(layer, "[log]\nformat = \"json\"\n").await;
    let (addr, digest, rc) = (slow.addr, slow.digest.clone(), &mut slow.rc);
    let c = crate::support::regcache::client();
    let mut resp = c
        .get(format!("http://{addr}/v2/app/slow/blobs/{digest}"))
        .send()
        .await
        .expect("GET slow blob");
    assert_eq!(resp.status(), 200);
    let first = resp
        .chunk()
        .await
        .expect("first chunk")
        .expect("some bytes");
    rc.signal("TERM");
    let mut n = first.len();
    while let Some(chunk) = resp
        .chunk()
        .await
        .expect("the in-flight body must complete")
    {
        n += chunk.len();
    }
    assert_eq!(n, 4 << 20);
    let code = tokio::task::block_in_place(|| rc.wait_exit(Duration::from_secs(25)));
    assert_eq!(code, Some(0), "{}", rc.log_text());
    let text = rc.log_text();
    let request_line = text
        .lines()
        .find(|l| l.contains("\"path\":\"/v2/app/slow/blobs/"))
        .unwrap_or_else(|| panic!("no JSON access log line for the blob:\n{text}"));
    let v: serde_json::Value = serde_json::from_str(request_line).expect("JSON log line");
    assert_eq!(v["fields"]["status"], 200, "{v}");
    assert_eq!(v["fields"]["cache"], "miss", "{v}");
    assert!(
        !text.contains("Bearer ") && !text.to_lowercase().contains("authorization: "),
        "no secrets in logs"
    );
}

/// The shard parts of shutdown: a fill lives on the shard of the client that started it, and a
/// client on another shard that joined it must still get every byte when the first client leaves
/// during the drain (its shard then has nothing left to drain, but must keep the fill running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_on_one_shard_keeps_feeding_a_client_on_another_through_shutdown() {
    let layer = Bytes::from((0..4 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut slow = SlowBlob::start(layer.clone(), "").await;
    let (addr, digest, rc) = (slow.addr, slow.digest.clone(), &mut slow.rc);
    let url = format!("http://{addr}/v2/app/slow/blobs/{digest}");
    // Two clients, two connections: the second goes to the other shard (the least loaded).
    let (starter, joiner) = (
        crate::support::regcache::client(),
        crate::support::regcache::client(),
    );
    let mut first = starter
        .get(&url)
        .send()
        .await
        .expect("GET (starts the fill)");
    let head = first.chunk().await.expect("chunk").expect("some bytes");
    let mut second = joiner.get(&url).send().await.expect("GET (joins the fill)");
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let mut got = second
        .chunk()
        .await
        .expect("chunk")
        .expect("some bytes")
        .to_vec();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus > 1 {
        let text = crate::support::regcache::client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let busy = text
            .lines()
            .filter(|l| l.starts_with("regcache_shard_connections{"))
            .filter(|l| !l.ends_with(" 0"))
            .count();
        assert!(
            busy >= 2,
            "the two clients are on different shards:\n{text}"
        );
    }
    rc.signal("TERM");
    // The client that started the fill leaves: its shard has drained.
    assert!(!head.is_empty());
    drop(first);
    drop(starter);
    while let Some(chunk) = second
        .chunk()
        .await
        .expect("the joined body must complete during the drain")
    {
        got.extend_from_slice(&chunk);
    }
    assert!(
        got == layer,
        "the joined body: {} bytes, exact: false",
        got.len()
    );
    let code = tokio::task::block_in_place(|| rc.wait_exit(Duration::from_secs(25)));
    assert_eq!(code, Some(0), "{}", rc.log_text());
}

/// `deploy/systemd/regcache.service`, or the copy in the cloud-init document.
fn units() -> Vec<(&'static str, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/systemd/regcache.service")).expect("unit");
    let doc =
        std::fs::read_to_string(root.join("deploy/cloud-init/regcache.yaml")).expect("cloud-init");
    vec![
        ("deploy/systemd/regcache.service", unit),
        (
            "deploy/cloud-init/regcache.yaml",
            cloud_init_file(&doc, "/etc/systemd/system/regcache.service"),
        ),
    ]
}

#[test]
fn systemd_unit_and_its_cloud_init_copy_score_2_or_lower_in_systemd_analyze_security() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    for (origin, text) in units() {
        let path = work.path().join("regcache.service");
        std::fs::write(&path, text).expect("copy unit");
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian package systemd)");
        let report = String::from_utf8_lossy(&out.stdout);
        let overall = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("no overall exposure line");
        assert!(
            out.status.success(),
            "{origin}: exposure above 2.0 ({overall}):\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_sysusers_file_creates_the_user_the_unit_runs_as() {
    let root = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("root dir");
    let conf = root.path().join("etc/sysusers.d");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/regcache.sysusers"),
        conf.join("regcache.conf"),
    )
    .expect("copy");
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .output()
        .expect("systemd-sysusers (Debian package systemd)");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap_or_default();
    assert!(
        out.status.success()
            && passwd.lines().any(|l| l.starts_with("regcache:")
                && l.ends_with(":/var/lib/regcache:/usr/sbin/nologin"))
            && group.lines().any(|l| l.starts_with("regcache:")),
        "passwd: {passwd}\ngroup: {group}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (origin, unit) in units() {
        assert!(
            unit.lines().any(|l| l == "User=regcache")
                && unit.lines().any(|l| l == "Group=regcache"),
            "{origin} runs as the user the sysusers file makes"
        );
    }
}

/// Every system call in the `SystemCallFilter=` groups of `unit` (allow lists added, `~` lists
/// removed, in order), expanded with `systemd-analyze syscall-filter`.
fn allowed_syscalls(unit: &str) -> std::collections::BTreeSet<String> {
    fn expand(group: &str, out: &mut std::collections::BTreeSet<String>) {
        if !group.starts_with('@') {
            out.insert(group.to_owned());
            return;
        }
        let listing = Command::new("systemd-analyze")
            .args(["syscall-filter", "--no-pager", group])
            .output()
            .expect("systemd-analyze syscall-filter");
        let text = String::from_utf8_lossy(&listing.stdout).into_owned();
        for item in text.lines().skip(1).map(str::trim) {
            if !item.is_empty() && !item.starts_with('#') {
                expand(item, out);
            }
        }
    }
    let mut allowed = std::collections::BTreeSet::new();
    for line in unit.lines() {
        let Some(list) = line.strip_prefix("SystemCallFilter=") else {
            continue;
        };
        let (deny, list) = match list.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, list),
        };
        let mut set = std::collections::BTreeSet::new();
        for item in list.split_whitespace() {
            expand(item, &mut set);
        }
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed.extend(set);
        }
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regcache_serve_stays_within_the_sandbox_of_its_systemd_unit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/systemd/regcache.service")).expect("unit");
    let allowed = allowed_syscalls(&unit);
    assert!(
        allowed.contains("read") && !allowed.contains("setuid"),
        "{allowed:?}"
    );
    let families: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("RestrictAddressFamilies="))
        .expect("RestrictAddressFamilies= in the unit")
        .split_whitespace()
        .collect();

    let fake = FakeUpstream::start().await;
    let (_, digest) = fake.add_image("app/traced", "v1", Bytes::from(vec![7u8; 300 << 10]));
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let data = work.path().join("d");
    let config = work.path().join("rc.toml");
    // A host name, so that the resolver runs too.
    let upstream = fake.url().replace("127.0.0.1", "localhost");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[upstreams.docker]\nurl = \"{upstream}\"\n",
            data.display()
        ),
    )
    .expect("config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let trace = work.path().join("trace");
    let log = work.path().join("log");
    // sd_notify readiness and watchdog pings, as under systemd.
    let notify = work.path().join("notify.sock");
    let notified = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
    notified
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut child = Command::new("strace")
        .args(["-f", "-qq", "-s", "256", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_regcache"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &addr.to_string()])
        .env_remove("REGCACHE_CONFIG")
        .env("REGCACHE_LOG", "info")
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000")
        .envs(crate::support::registry::PROXY_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("strace (Debian package strace)");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    tokio::task::block_in_place(|| {
        let t = Instant::now();
        while http_get(addr, "/readyz", &[]).is_none_or(|r| r.status != 200) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "not ready: {}",
                log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut buf = [0u8; 64];
        for want in ["READY=1", "WATCHDOG=1"] {
            let n = notified.recv(&mut buf).expect("a notification");
            let got = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(got.contains(want), "{want}: got {got:?}");
        }
        // Signals go to regcache, not to strace: its PID starts the trace's first line.
        let pid: u32 = std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("regcache's PID in the trace");
        // A pull (manifest, then the blob: a fill, then a hit sent with sendfile), /metrics,
        // a reload and a stop.
        let accept = [("Accept", "application/vnd.oci.image.manifest.v1+json")];
        let m = http_get(addr, "/v2/app/traced/manifests/v1", &accept).expect("manifest");
        assert_eq!(m.status, 200, "{}", log_text());
        for _ in 0..2 {
            let b = http_get(addr, &format!("/v2/app/traced/blobs/{digest}"), &[]).expect("blob");
            assert_eq!(b.status, 200, "{}", log_text());
        }
        assert!(http_get(addr, "/metrics", &[]).is_some_and(|r| r.status == 200));
        for sig in ["HUP", "TERM"] {
            let mark = log_text().len();
            let status = Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
            let want = if sig == "HUP" {
                "configuration applied"
            } else {
                "SIGTERM"
            };
            let t = Instant::now();
            while !log_text().get(mark..).unwrap_or("").contains(want) {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "{sig}: {}",
                    log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let t = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no exit: {}",
                log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let trace = std::fs::read_to_string(&trace).expect("strace output");
    let mut denied = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for line in trace.lines() {
        // "PID name(args) = result", "PID name(args <unfinished ...>", "PID <... name resumed>".
        let call = line
            .split_once(' ')
            .map_or("", |(_, rest)| rest.trim_start());
        let Some((name, args)) = call.split_once('(') else {
            continue;
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        {
            continue;
        }
        if !allowed.contains(name) {
            denied.insert(name.to_owned());
        }
        let family = args.split([',', ')']).next().unwrap_or("");
        if (name == "socket" || name == "socketpair") && !families.contains(&family) {
            problems.push(format!(
                "a socket of family {family} (RestrictAddressFamilies): {line}"
            ));
        }
        let path = args.split('"').nth(1).unwrap_or("");
        // glibc's malloc reads this when it shrinks a heap, and takes a missing file as the
        // default (overcommit heuristics): hidden by ProcSubset=pid, it changes nothing unless
        // the host runs with vm.overcommit_memory = 2.
        let tolerated = path == "/proc/sys/vm/overcommit_memory";
        if let (Some(rest), false) = (path.strip_prefix("/proc/"), tolerated) {
            let next = rest.split('/').next().unwrap_or("");
            if next != "self" && next != "thread-self" && !next.bytes().all(|c| c.is_ascii_digit())
            {
                problems.push(format!(
                    "a /proc file outside the process's own (ProcSubset=pid): {line}"
                ));
            }
        }
        let writes = ["O_WRONLY", "O_RDWR", "O_CREAT"]
            .iter()
            .any(|f| args.contains(f))
            || [
                "mkdir",
                "mkdirat",
                "unlink",
                "unlinkat",
                "rename",
                "renameat",
                "renameat2",
            ]
            .contains(&name);
        if writes
            && path.starts_with('/')
            && !Path::new(path).starts_with(&data)
            && path != "/dev/null"
        {
            problems.push(format!(
                "a write outside the data directory (ProtectSystem=strict): {line}"
            ));
        }
    }
    assert!(
        denied.is_empty() && problems.is_empty(),
        "system calls outside the unit's SystemCallFilter: {denied:?}\n{}\n--- regcache log ---\n{}",
        problems.join("\n"),
        log_text()
    );
}

#[test]
fn systemd_unit_and_socket_pass_systemd_analyze_verify() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    for unit in ["regcache.service", "regcache.socket"] {
        // Point ExecStart at the binary under test: verify checks that it exists.
        let text = std::fs::read_to_string(root.join(unit))
            .expect("unit file")
            .replace("/usr/local/bin/regcache", env!("CARGO_BIN_EXE_regcache"));
        std::fs::write(work.path().join(unit), text).expect("copy unit");
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(work.path().join("regcache.service"))
        .arg(work.path().join("regcache.socket"))
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let relevant: Vec<&str> = stderr.lines().filter(|l| l.contains("regcache")).collect();
    assert!(
        out.status.success() && relevant.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// The `content: |` block of `path` in a cloud-init document (6-space indented lines).
fn cloud_init_file(doc: &str, path: &str) -> String {
    let mut lines = doc
        .lines()
        .skip_while(|l| !l.trim_end().ends_with(&format!("path: {path}")));
    lines
        .next()
        .unwrap_or_else(|| panic!("{path} is not in the cloud-init document"));
    let mut lines = lines.skip_while(|l| !l.trim().starts_with("content: |"));
    lines
        .next()
        .unwrap_or_else(|| panic!("{path} has no content block"));
    let mut out = String::new();
    for l in lines {
        if !l.is_empty() && !l.starts_with("      ") {
            break;
        }
        out.push_str(l.get(6..).unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn cloud_init_installs_the_same_unit_and_a_valid_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc =
        std::fs::read_to_string(root.join("deploy/cloud-init/regcache.yaml")).expect("cloud-init");
    let unit = std::fs::read_to_string(root.join("deploy/systemd/regcache.service")).expect("unit");
    assert_eq!(
        cloud_init_file(&doc, "/etc/systemd/system/regcache.service").trim_end(),
        unit.trim_end(),
        "the cloud-init unit must be deploy/systemd/regcache.service"
    );
    let sysusers =
        std::fs::read_to_string(root.join("deploy/systemd/regcache.sysusers")).expect("sysusers");
    assert_eq!(
        cloud_init_file(&doc, "/etc/sysusers.d/regcache.conf").trim_end(),
        sysusers.trim_end(),
        "the cloud-init sysusers file must be deploy/systemd/regcache.sysusers"
    );
    let at = |needle: &str| {
        doc.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} is not in the cloud-init runcmd"))
    };
    assert!(
        at("systemd-sysusers") < at("systemctl enable --now regcache.service")
            && at("chgrp regcache /etc/regcache/config.toml")
                < at("systemctl enable --now regcache.service"),
        "the user exists and can read the config before the service starts"
    );
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = work.path().join("config.toml");
    std::fs::write(&config, cloud_init_file(&doc, "/etc/regcache/config.toml")).expect("config");
    let out = Process::run_to_end(&["check-config", &config.display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = cloud_init_file(&doc, "/etc/regcache/prefetch.txt");
    std::fs::write(work.path().join("list"), list).expect("list");
    let out = Process::run_to_end(&[
        "prefetch",
        "--dry-run",
        "-f",
        &work.path().join("list").display().to_string(),
        "--server",
        "http://127.0.0.1:9",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn connections_are_served_by_one_shard_thread_per_cpu_under_one_connection_limit() {
    let (_work, addr, mut rc) = start_offline("[limits]\nmax_connections = 3\n");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tasks = std::fs::read_dir(format!("/proc/{}/task", rc.pid())).expect("task list");
    let shards = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("rc-shard-"))
        .count();
    assert_eq!(shards, cpus, "one shard thread per CPU");

    // The limit holds across shards: 3 idle keep-alive connections fill it, the 4th gets 503. The
    // first sees itself alone, so no start-up probe holds a place.
    let mut held = vec![alone(addr, cpus)];
    for i in 1..3 {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        std::io::Write::write_all(&mut s, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(&mut s, &mut buf).expect("answer");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "connection {i}: {}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    let over = http_get(addr, "/v2/", &[]).expect("an answer over the limit");
    assert_eq!(
        over.status, 503,
        "the 4th connection, over max_connections = 3"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(addr, "/v2/", &[]) {
            Some(r) if r.status == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "no 200 after the held connections closed: {:?}",
                other.map(|r| r.status)
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stops_cleanly(&mut rc);
}

#[test]
fn a_burst_of_connections_is_spread_evenly_over_the_shards() {
    let (_work, addr, mut rc) = start_offline("");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // First a connection that sees itself alone: the shards are then balanced on the burst alone.
    let mut probe = alone(addr, cpus);
    // Like wrk or a fleet of pullers starting at once: all connect before any sends a request, so
    // one shard's wake-up finds them all waiting to be accepted.
    let mut held: Vec<std::net::TcpStream> = (1..4 * cpus)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    for (i, s) in held.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        std::io::Write::write_all(s, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(s, &mut buf).expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "connection {i}");
    }
    let per_shard = shard_loads(&mut probe, cpus);
    assert_eq!(
        per_shard.iter().sum::<u64>(),
        4 * cpus as u64,
        "{per_shard:?}"
    );
    let (least, most) = (per_shard.iter().min(), per_shard.iter().max());
    assert!(
        most.zip(least).is_some_and(|(m, l)| m - l <= 1),
        "connections per shard: {per_shard:?}"
    );
    drop(held);
    stops_cleanly(&mut rc);
}

/// A keep-alive connection to regcache on `addr` once it is the only one open (the start-up
/// probes of [`Process::start`] may still be closing).
fn alone(addr: SocketAddr, shards: usize) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        if shard_loads(&mut s, shards).iter().sum::<u64>() == 1 {
            return s;
        }
        assert!(Instant::now() < deadline, "other connections stay open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `regcache_shard_connections` of each of the `shards`, asked on the keep-alive connection `s`.
fn shard_loads(s: &mut std::net::TcpStream, shards: usize) -> Vec<u64> {
    std::io::Write::write_all(s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut text = Vec::new();
    let mut buf = [0u8; 65536];
    while !text.ends_with(b"# EOF\n") {
        let n = std::io::Read::read(s, &mut buf).expect("metrics");
        assert!(n > 0, "metrics cut short");
        text.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    (0..shards)
        .map(|i| {
            let prefix = format!("regcache_shard_connections{{shard=\"{i}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix}in\n{text}"))
        })
        .collect()
}

#[test]
fn systemd_gets_ready_then_watchdog_pings_while_the_shards_run() {
    use std::os::unix::net::UnixDatagram;
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = offline_config(work.path(), "");
    let notify = work.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &addr.to_string()])
        .env_remove("REGCACHE_CONFIG")
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000")
        .envs(crate::support::registry::PROXY_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn regcache");
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        messages.first().is_some_and(|m| m.contains("READY=1")),
        "READY=1 first: {messages:?}"
    );
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 4,
        "a ping every 0.5 s while the shards run; got {pings} in 4 s: {messages:?}"
    );
}

/// A config in `dir` for a server with no reachable upstream (port 9), plus `extra` TOML.
/// regcache started on `offline_config(extra)`: its work directory, address and process.
fn start_offline(extra: &str) -> (tempfile::TempDir, SocketAddr, Process) {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let config = offline_config(work.path(), extra);
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let rc = Process::start(&config, addr, &work.path().join("log"));
    (work, addr, rc)
}

/// SIGTERM, then the process must exit 0 within 20 s.
fn stops_cleanly(rc: &mut Process) {
    rc.signal("TERM");
    assert_eq!(
        rc.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        rc.log_text()
    );
}

fn offline_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let config = dir.join("rc.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n{extra}[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n",
            dir.join("d").display()
        ),
    )
    .expect("config");
    config
}

/// Every path under `dir` with its content (directories as `None`), sorted.
fn tree_of(dir: &Path) -> Vec<(std::path::PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                out.push((p.clone(), None));
                todo.push(p);
            } else {
                out.push((p.clone(), Some(std::fs::read(&p).expect("read"))));
            }
        }
    }
    out.sort();
    out
}

/// `regcache ARGS` run in `cwd`: (exit code, stderr). A process still running after 20 s (a
/// `serve` that started) is killed, and the test fails.
fn run_in(cwd: &Path, args: &[&str]) -> (Option<i32>, String) {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("stderr dir");
    let stderr_path = work.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(args)
        .current_dir(cwd)
        .env_remove("REGCACHE_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("run regcache");
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "regcache {args:?} still running after 20 s: {}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code(),
        std::fs::read_to_string(&stderr_path).unwrap_or_default(),
    )
}

#[test]
fn an_empty_relative_or_system_data_dir_is_refused_and_the_working_directory_is_untouched() {
    // The reported case: data_dir = "" made every command use the working directory, empty its
    // tmp/ and create blobs/, lock and meta.redb there.
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let cwd = work.path().join("cwd");
    std::fs::create_dir_all(cwd.join("tmp")).expect("mkdir");
    std::fs::write(cwd.join("tmp/some-file"), "someone's file\n").expect("write");
    let before = tree_of(&cwd);
    for value in ["", ".", "data", "/", "/etc", "/usr", "/tmp", "/var/lib"] {
        let config = work.path().join("rc.toml");
        std::fs::write(
            &config,
            format!("data_dir = {value:?}\n[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n"),
        )
        .expect("config");
        let config = config.display().to_string();
        for args in [
            vec!["check-config", config.as_str()],
            vec!["pin", "list", "--config", config.as_str()],
            vec!["gc", "--config", config.as_str()],
        ] {
            let (code, err) = run_in(&cwd, &args);
            assert!(
                code == Some(2) && err.contains("data_dir"),
                "data_dir = {value:?}, {args:?}: exit {code:?}, stderr: {err}"
            );
        }
        // The flag gets the same checks (clap itself refuses an empty value).
        let (code, err) = run_in(&cwd, &["check-config", "--data-dir", value]);
        assert!(
            code == Some(2) && (err.contains("data_dir") || err.contains("--data-dir")),
            "--data-dir {value:?}: exit {code:?}, stderr: {err}"
        );
    }
    assert_eq!(
        tree_of(&cwd),
        before,
        "the working directory must be untouched"
    );
}

#[test]
fn a_data_dir_holding_files_regcache_did_not_create_is_refused_and_left_untouched() {
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let data = work.path().join("d");
    std::fs::create_dir_all(data.join("tmp")).expect("mkdir");
    std::fs::write(data.join("tmp/some-file"), "someone's file\n").expect("write");
    std::fs::write(data.join("report.pdf"), "not a blob\n").expect("write");
    let before = tree_of(&data);
    let config = offline_config(work.path(), "").display().to_string();
    for args in [
        vec![
            "serve",
            "--config",
            config.as_str(),
            "--listen",
            "127.0.0.1:0",
        ],
        vec!["pin", "list", "--config", config.as_str()],
        vec!["verify", "--repair", "--config", config.as_str()],
    ] {
        let (code, err) = run_in(work.path(), &args);
        assert!(
            code == Some(1) && err.contains("regcache-data-dir") && err.contains("report.pdf"),
            "{args:?}: exit {code:?}, stderr: {err}"
        );
    }
    assert_eq!(tree_of(&data), before, "the directory must be untouched");
}

#[test]
fn a_store_of_an_earlier_regcache_killed_mid_run_is_adopted_and_marked() {
    let (work, _addr, mut rc) = start_offline("");
    let data = work.path().join("d");
    rc.kill9();
    // What a regcache from before the marker leaves when killed: its store without the marker
    // (and a database that redb must recover), with a fill in tmp/.
    std::fs::remove_file(data.join("regcache-data-dir")).expect("unmark");
    std::fs::write(data.join("tmp/fill-1-2-3"), "half a blob").expect("leftover");
    rc.restart();
    assert!(
        data.join("regcache-data-dir").is_file(),
        "the marker must be written: {}",
        rc.log_text()
    );
    assert!(
        !data.join("tmp/fill-1-2-3").exists(),
        "leftover fill removed"
    );
    assert!(
        rc.log_text().contains("earlier regcache"),
        "the adoption is logged: {}",
        rc.log_text()
    );
    stops_cleanly(&mut rc);
}

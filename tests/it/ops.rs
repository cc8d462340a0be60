//! Running it like infrastructure, with the tools it meets there: TLS with reload (certificates
//! made and read with openssl), socket activation (systemd-socket-activate), and the systemd unit
//! (systemd-analyze). The rest of operations needs nothing installed: `offline::ops`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::offline::ops::{cloud_init_file, run_in};
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

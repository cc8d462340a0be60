//! Running it like infrastructure, with the tools it meets there: TLS with reload (certificates
//! made and read with openssl), socket activation (systemd-socket-activate), and the systemd unit
//! (systemd-analyze). The rest of operations needs nothing installed: `offline::ops`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::certs::make_certs;
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
    let config = dir.join("rc.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n",
            dir.join("data").display(),
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        ),
    )
    .expect("config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Process::start waits on plain-HTTP /readyz, which a TLS listener does not answer: poll
    // with the health command instead.
    let log = dir.join("rc.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_regcache"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &addr.to_string()])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn regcache");
    let health = |extra: &[&str]| {
        let mut args = vec!["health", "--url"];
        let url = format!("https://{addr}");
        args.push(&url);
        args.extend_from_slice(extra);
        Process::run_to_end(&args)
    };
    let t = Instant::now();
    while !health(&["--insecure"]).status.success() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Without --insecure the test CA is unknown to the health command: refused.
    assert!(
        !health(&[]).status.success(),
        "an untrusted certificate must fail the probe"
    );
    // A client that trusts the CA talks HTTPS.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.crt")).expect("ca"))
        .expect("ca pem");
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(ca)
        .build()
        .expect("client");
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

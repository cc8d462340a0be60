//! A real etcd (Debian's `etcd-server`, v3.4) on loopback for the config store tests.
//!
//! [`Etcd::start`] runs a one-member cluster named `default` with its own temp data directory and
//! free client and peer ports, and waits until `GET /health` says `{"health":"true"}`. Keys are
//! written and removed through etcd's v3 JSON gateway (`POST /v3/kv/put`, `/v3/kv/deleterange`,
//! keys and values base64), which is also what regcache reads (`/v3/kv/range`). The child is killed
//! when the [`Etcd`] is dropped. `tests/setup-deps.sh` installs `etcd-server`.

use std::fs;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use tempfile::TempDir;

use super::clients::command;
use super::daemon::{home_dir, Daemon};
use super::process::free_port;
use super::registry::{http_get, parse_raw_response, send_request};

const ETCD: &str = "/usr/bin/etcd";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running single-member etcd on 127.0.0.1.
pub struct Etcd {
    child: Daemon,
    client_port: u16,
    peer_port: u16,
    home: TempDir,
    /// `--max-request-bytes` when not etcd's default (1.5 MiB): the largest value a put may carry.
    max_request_bytes: Option<u64>,
}

/// `POST path` with a JSON body on a loopback address (`Connection: close`); the status and body,
/// or `None` when the connection or the response fails.
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> Option<(u16, String)> {
    let length = body.len().to_string();
    let headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", length.as_str()),
    ];
    let mut stream = send_request(
        addr,
        "POST",
        path,
        &headers,
        body.as_bytes(),
        Duration::from_secs(5),
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let r = parse_raw_response(&response)?;
    Some((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

impl Etcd {
    /// Starts etcd on free loopback ports with a fresh data directory, ready to serve.
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// [`Etcd::start`] with `--max-request-bytes BYTES`, so that values larger than etcd's
    /// default limit (1.5 MiB per request) can be stored, as an operator may configure.
    pub fn start_with_max_request_bytes(bytes: u64) -> Etcd {
        Etcd::start_with(Some(bytes))
    }

    fn start_with(max_request_bytes: Option<u64>) -> Etcd {
        assert!(
            Path::new(ETCD).is_file(),
            "{ETCD} is missing: install Debian's etcd-server (tests/setup-deps.sh)"
        );
        let mut etcd = Etcd {
            child: Daemon::default(),
            client_port: 0,
            peer_port: 0,
            home: home_dir("regcache-etcd-"),
            max_request_bytes,
        };
        // Free ports are picked then released: another process may take one meanwhile, so retry.
        let mut why = String::new();
        for _ in 0..3 {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            let _ = fs::remove_dir_all(etcd.data_dir());
            match etcd.spawn_and_wait() {
                Ok(()) => return etcd,
                Err(e) => why = e,
            }
        }
        panic!(
            "etcd did not start: {why}\n--- etcd log ---\n{}",
            etcd.logs()
        );
    }

    fn data_dir(&self) -> PathBuf {
        self.home.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.home.path().join("etcd.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the etcd log");
        let mut cmd = command(Path::new(ETCD));
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            .args(
                self.max_request_bytes
                    .map(|b| vec!["--max-request-bytes".to_owned(), b.to_string()])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let addr = self.addr();
        self.child.wait_ready(
            cmd.spawn().expect("spawn etcd"),
            READY_TIMEOUT,
            Duration::from_millis(50),
            "GET /health says true",
            || {
                http_get(addr, "/health", &[])
                    .is_some_and(|r| r.status == 200 && r.body.windows(6).any(|w| w == b"\"true\""))
            },
        )
    }

    /// The client address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// `http://127.0.0.1:PORT`, what goes in `[config_store] url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    fn post(&self, path: &str, body: &str) -> String {
        match http_post(self.addr(), path, body) {
            Some((200, reply)) => reply,
            other => panic!(
                "etcd POST {path} {body} failed: {other:?}\n--- etcd log ---\n{}",
                self.logs()
            ),
        }
    }

    /// Sets `key` to `value`.
    pub fn put(&self, key: &str, value: &str) {
        let body = serde_json::json!({ "key": b64(key), "value": b64(value) }).to_string();
        self.post("/v3/kv/put", &body);
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<String> {
        let body = serde_json::json!({ "key": b64(key) }).to_string();
        let reply: serde_json::Value =
            serde_json::from_str(&self.post("/v3/kv/range", &body)).expect("etcd range is JSON");
        let value = reply["kvs"][0]["value"].as_str()?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(value)
            .expect("etcd value is base64");
        Some(String::from_utf8(raw).expect("etcd value is UTF-8"))
    }

    /// Removes `key`.
    pub fn delete(&self, key: &str) {
        let body = serde_json::json!({ "key": b64(key) }).to_string();
        self.post("/v3/kv/deleterange", &body);
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Kills etcd (SIGKILL) and reaps it; its port then refuses connections. No-op when stopped.
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts it again on the same ports with the same data, and waits until healthy.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.spawn_and_wait() {
            panic!(
                "etcd did not restart: {why}\n--- etcd log ---\n{}",
                self.logs()
            );
        }
    }

    /// Everything etcd wrote to stderr so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

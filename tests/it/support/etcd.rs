//! A real etcd (Debian's `etcd-server`, v3.4) on loopback for the config store tests.
//!
//! [`Etcd::start`] runs a one-member cluster named `default` with its own temp data directory and
//! free client and peer ports, and waits until `GET /health` says `{"health":"true"}`. Keys are
//! written and removed through etcd's v3 JSON gateway (`POST /v3/kv/put`, `/v3/kv/deleterange`,
//! keys and values base64), which is also what regcache reads (`/v3/kv/range`). The child is killed
//! when the [`Etcd`] is dropped. `tests/setup-deps.sh` installs `etcd-server`.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tempfile::TempDir;

use super::process::free_port;
use super::registry::{http_get, PROXY_ENV};

const ETCD: &str = "/usr/bin/etcd";
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running single-member etcd on 127.0.0.1.
pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    home: TempDir,
}

/// `POST path` with a JSON body on a loopback address (`Connection: close`); the status and body,
/// or `None` when the connection or the response fails.
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> Option<(u16, String)> {
    assert!(addr.ip().is_loopback(), "http_post only talks to loopback");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

impl Etcd {
    /// Starts etcd on free loopback ports with a fresh data directory, ready to serve.
    pub fn start() -> Etcd {
        assert!(
            Path::new(ETCD).is_file(),
            "{ETCD} is missing: install Debian's etcd-server (tests/setup-deps.sh)"
        );
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(root).expect("create CARGO_TARGET_TMPDIR");
        let home = tempfile::Builder::new()
            .prefix("regcache-etcd-")
            .tempdir_in(root)
            .expect("create a temp dir for etcd");
        let mut etcd = Etcd {
            child: None,
            client_port: 0,
            peer_port: 0,
            home,
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
        let mut cmd = Command::new(ETCD);
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
            .envs(PROXY_ENV)
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("no_proxy")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn etcd"));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("etcd was just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("etcd exited during startup ({status})"));
            }
            let healthy = http_get(self.addr(), "/health", &[])
                .is_some_and(|r| r.status == 200 && r.body.windows(6).any(|w| w == b"\"true\""));
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("/health not true within {READY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills etcd (SIGKILL) and reaps it; its port then refuses connections. No-op when stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

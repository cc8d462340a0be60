//! A fleet of regcache processes on loopback (127.0.0.1, 127.0.0.2, … on one port, one shared
//! config file with `[peers]`, a data directory each), as a script would start one; a fake peer
//! for the faults a real one cannot show (black-holed, wrong bytes); and a blob `GET` that notes
//! when its first body byte arrived.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

use super::net::Acceptor;
use super::process::{free_port, Process};
use super::registry::{http_get, send_request};

/// The fleet's shared token.
pub const TOKEN: &str = "fleet-test-token-0123456789abcdef";

/// Servers of a fleet, each `regcache serve --config <shared> --listen 127.0.0.N:PORT
/// --data-dir <its own>`.
pub struct Fleet {
    pub servers: Vec<Process>,
    /// Each server's base URL as listed in `[peers] urls`.
    pub urls: Vec<String>,
    pub config: PathBuf,
    pub dir: TempDir,
}

/// A port free on 127.0.0.1 … 127.0.0.`n`.
pub fn fleet_port(n: usize) -> u16 {
    for _ in 0..50 {
        let port = free_port();
        let free = (1..=n)
            .all(|i| TcpListener::bind(SocketAddr::from(([127, 0, 0, i as u8], port))).is_ok());
        if free {
            return port;
        }
    }
    panic!("no port free on 127.0.0.1-{n}");
}

/// `[peers]` for `urls` with the token in `token_file`.
pub fn peers_toml(urls: &[String], token_file: &Path) -> String {
    let list: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[peers]\nurls = [{}]\ntoken_file = \"{}\"\nconnect_timeout = \"250ms\"\n",
        list.join(", "),
        token_file.display()
    )
}

/// Writes the fleet's token to `dir/peer-token`, readable by its owner only.
pub fn token_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("peer-token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write the peer token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

impl Fleet {
    /// `n` servers on 127.0.0.1 … 127.0.0.`n` and one port, with one default upstream at
    /// `upstream_url` (plus `upstream_keys`, TOML lines of its table), each ready.
    pub fn start(n: usize, upstream_url: &str, upstream_keys: &str) -> Fleet {
        Fleet::start_with(n, upstream_url, upstream_keys, "")
    }

    /// [`Fleet::start`] with `extra` TOML tables in the shared config (e.g. `[store.s3]`).
    pub fn start_with(n: usize, upstream_url: &str, upstream_keys: &str, extra: &str) -> Fleet {
        let dir = TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("fleet dir");
        let port = fleet_port(n);
        let urls: Vec<String> = (1..=n)
            .map(|i| format!("http://127.0.0.{i}:{port}"))
            .collect();
        let token = token_file(dir.path());
        let config = dir.path().join("regcache.toml");
        std::fs::write(
            &config,
            format!(
                "[upstreams.docker]\nurl = \"{upstream_url}\"\n{upstream_keys}\n{}{extra}\n",
                peers_toml(&urls, &token)
            ),
        )
        .expect("write the fleet's config");
        let servers = (1..=n)
            .map(|i| {
                let data = dir.path().join(format!("data-{i}"));
                let args = vec!["--data-dir".to_owned(), data.display().to_string()];
                let addr = SocketAddr::from(([127, 0, 0, i as u8], port));
                Process::start_with(
                    &config,
                    addr,
                    &dir.path().join(format!("regcache-{i}.log")),
                    &args,
                )
            })
            .collect();
        Fleet {
            servers,
            urls,
            config,
            dir,
        }
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.servers[i].addr
    }

    /// The servers in the order they rank for `digest`, the owner first.
    pub fn ranked(&self, digest: &str) -> Vec<usize> {
        rank(&self.urls, digest)
    }

    /// Waits until every server sees every other one up (`/readyz`).
    pub fn wait_formed(&self) {
        for s in &self.servers {
            wait_peers_up(s, Duration::from_secs(40));
        }
    }

    /// Every server's log, for assertion messages.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("--- {} ---\n{}", s.addr, s.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Indexes of `urls` in the order they rank for `digest` (the owner first), as regcache ranks
/// them.
pub fn rank(urls: &[String], digest: &str) -> Vec<usize> {
    let d: regcache::oci::reference::Digest = digest.parse().expect("digest");
    let mut order: Vec<(u64, usize)> = urls
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let url = reqwest::Url::parse(u).expect("url");
            (regcache::peers::score(url.as_str(), &d), i)
        })
        .collect();
    order.sort_by_key(|&(score, _)| std::cmp::Reverse(score));
    order.into_iter().map(|(_, i)| i).collect()
}

/// `/readyz`'s `peers`: (url, up, self) of each.
pub fn peer_states(server: &Process) -> Vec<(String, bool, bool)> {
    let Some(r) = http_get(server.addr, "/readyz", &[]) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    v["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["url"].as_str().unwrap_or("").to_owned(),
                        p["up"].as_bool().unwrap_or(false),
                        p["self"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `server` sees every listed peer up (or as itself).
pub fn wait_peers_up(server: &Process, within: Duration) {
    let start = Instant::now();
    loop {
        let states = peer_states(server);
        if !states.is_empty() && states.iter().all(|(_, up, me)| *up || *me) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{} does not see its peers up within {within:?}: {states:?}\n{}",
            server.addr,
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A blob `GET` read to its end.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Body bytes received.
    pub len: u64,
    /// The `Content-Length` announced.
    pub announced: Option<u64>,
    /// `sha256:<hex>` of the body received.
    pub digest: String,
    /// When the first body byte arrived.
    pub first_byte: Option<Instant>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from `addr` with `headers`, reading the body as it comes (counted in `progress`);
/// the body ends at its `Content-Length` or when the connection ends.
pub fn timed_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    progress: Option<&AtomicU64>,
) -> Fetched {
    let mut s = send_request(addr, "GET", path, headers, b"", Duration::from_secs(120))
        .unwrap_or_else(|| panic!("GET {path} from {addr}: cannot send"));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => panic!(
                "GET {path} from {addr}: no complete head: {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let announced = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok());
    let mut hash = Sha256::new();
    let mut len = 0u64;
    let mut first_byte = None;
    let mut buf = vec![0u8; 256 << 10];
    while announced.is_none_or(|a| len < a) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(Instant::now);
                hash.update(&buf[..n]);
                len += n as u64;
                if let Some(p) = progress {
                    p.store(len, Ordering::Relaxed);
                }
            }
        }
    }
    let digest = format!(
        "sha256:{}",
        hash.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    Fetched {
        status,
        headers,
        len,
        announced,
        digest,
        first_byte,
    }
}

/// The headers of a peer request: the token and the hop marker (and local-only).
pub fn peer_headers(local_only: bool) -> Vec<(&'static str, &'static str)> {
    let mut h = vec![("x-regcache-peer-token", TOKEN), ("x-regcache-hop", "1")];
    if local_only {
        h.push(("x-regcache-local-only", "1"));
    }
    h
}

/// How a [`FakePeer`] behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PeerMode {
    /// Answers probes (`GET /v2/`) as a peer; blob requests get `503`, or the wrong bytes of
    /// [`FakePeer::tamper`].
    Answering = 0,
    /// Reads every request and never answers (connections held).
    BlackHole = 1,
}

/// A peer that is not a regcache, on `addr`, for the faults a real one cannot show; it records
/// every request line (`METHOD path`).
pub struct FakePeer {
    mode: Arc<AtomicU8>,
    requests: Arc<Mutex<Vec<String>>>,
    tampered: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    _acceptor: Acceptor,
}

impl FakePeer {
    pub fn start(addr: SocketAddr, mode: PeerMode) -> FakePeer {
        let mode = Arc::new(AtomicU8::new(mode as u8));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let tampered: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let (m, r, t) = (
            Arc::clone(&mode),
            Arc::clone(&requests),
            Arc::clone(&tampered),
        );
        let acceptor = Acceptor::bind(addr, move |s| {
            let (m, r, t) = (Arc::clone(&m), Arc::clone(&r), Arc::clone(&t));
            std::thread::spawn(move || serve_fake(s, &m, &r, &t));
        });
        FakePeer {
            mode,
            requests,
            tampered,
            _acceptor: acceptor,
        }
    }

    pub fn set_mode(&self, mode: PeerMode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// Answers `GET` of blob `digest` with `bytes` (the wrong ones), as a peer would.
    pub fn tamper(&self, digest: &str, bytes: Vec<u8>) {
        self.tampered
            .lock()
            .expect("fake peer")
            .insert(digest.to_owned(), bytes);
    }

    /// The request lines received so far that contain `what`.
    pub fn requests_for(&self, what: &str) -> Vec<String> {
        self.requests
            .lock()
            .expect("fake peer")
            .iter()
            .filter(|l| l.contains(what))
            .cloned()
            .collect()
    }
}

/// One connection of a [`FakePeer`]: requests one after another (keep-alive).
fn serve_fake(
    mut s: TcpStream,
    mode: &AtomicU8,
    requests: &Mutex<Vec<String>>,
    tampered: &Mutex<HashMap<String, Vec<u8>>>,
) {
    let _ = s.set_nonblocking(false);
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let line = text.lines().next().unwrap_or("").to_owned();
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        requests
            .lock()
            .expect("fake peer")
            .push(format!("{method} {target}"));
        if mode.load(Ordering::Relaxed) == PeerMode::BlackHole as u8 {
            // Held open, never answered, until the peer gives up.
            let mut sink = [0u8; 1024];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            return;
        }
        let path = target.split('?').next().unwrap_or("");
        let digest = path.rsplit('/').next().unwrap_or("");
        let wrong = tampered.lock().expect("fake peer").get(digest).cloned();
        let (status, body) = match (path, wrong) {
            ("/v2/" | "/v2", _) => ("200 OK", b"{}".to_vec()),
            (p, Some(bytes)) if p.contains("/blobs/") => ("200 OK", bytes),
            _ => (
                "503 Service Unavailable",
                br#"{"errors":[{"code":"UNAVAILABLE","message":"fake","detail":null}]}"#.to_vec(),
            ),
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\nx-regcache-server-id: fake-peer\r\nContent-Length: {}\r\n\
             Content-Type: application/octet-stream\r\n\r\n",
            body.len()
        );
        let sent = s.write_all(reply.as_bytes()).is_ok()
            && (method == "HEAD" || s.write_all(&body).is_ok());
        if !sent {
            return;
        }
    }
}

//! In-process fake of consul's KV HTTP API (read side), for the config store tests.
//!
//! It binds `127.0.0.1:0` and serves HTTP/1.1 on tokio tasks of the runtime it was started on.
//! `GET /v1/kv/<key>` follows consul's documented semantics:
//!
//! - `200` with a JSON array of one entry `{"LockIndex","Key","Flags","Value","CreateIndex",
//!   "ModifyIndex"}`, `Value` base64 (`null` when empty); `?raw` answers the bare value instead.
//! - `404` with an empty body when the key does not exist.
//! - Every answer carries `X-Consul-Index`: the key's `ModifyIndex`, or when the key is absent the
//!   KV store's highest index (writes and deletions), as consul's state store does; never 0.
//! - Blocking queries: with `?index=N` (N > 0) the answer waits until that index is greater than
//!   N, or `wait` (a Go duration such as `500ms`, `5s`; default 5 min, at most 10 min) has passed,
//!   and then answers with the current value; `wait=0` means the default. `index=0` or no `index`
//!   answers at once. Like consul, the fake adds a random jitter of up to `wait/16` to the wait;
//!   [`FakeConsul::set_max_jitter`] makes it always the whole `wait/16` (consul's worst case).
//!
//! Keys are changed in-process with [`FakeConsul::put`] and [`FakeConsul::delete`], each a new
//! raft index as in consul. [`FakeConsul::set_down`] stops the listener and cuts every connection
//! (including blocked queries), then brings it back on the same port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Longest `wait` consul honours.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// `wait` when a blocking query gives none.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

struct Entry {
    value: Vec<u8>,
    create_index: u64,
    modify_index: u64,
}

struct Kv {
    /// Highest raft index of the KV store (writes and deletions).
    index: u64,
    entries: BTreeMap<String, Entry>,
}

struct State {
    kv: Mutex<Kv>,
    /// Carries `Kv::index`; blocked queries wait for it to change.
    changed: watch::Sender<u64>,
    requests: AtomicU64,
    blocking: AtomicU64,
    /// Always add the largest jitter (`wait/16`) instead of a random one.
    max_jitter: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fake consul agent serving the KV API; stops (cutting all its connections) when dropped.
pub struct FakeConsul {
    addr: SocketAddr,
    state: Arc<State>,
    runtime: tokio::runtime::Handle,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // The fake closes first, so its side of old connections sits in TIME_WAIT: allow the rebind.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl FakeConsul {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime until dropped.
    pub async fn start() -> FakeConsul {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("fake consul: bind");
        let addr = listener.local_addr().expect("fake consul: local_addr");
        let state = Arc::new(State {
            kv: Mutex::new(Kv {
                index: 1,
                entries: BTreeMap::new(),
            }),
            changed: watch::Sender::new(1),
            requests: AtomicU64::new(0),
            blocking: AtomicU64::new(0),
            max_jitter: AtomicBool::new(false),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        FakeConsul {
            addr,
            state,
            runtime: tokio::runtime::Handle::current(),
            task: Mutex::new(Some(task)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, what goes in `[config_store] url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets `key` to `value` (a new raft index; `CreateIndex` kept when the key existed).
    pub fn put(&self, key: &str, value: &str) {
        let index = {
            let mut kv = lock(&self.state.kv);
            kv.index += 1;
            let index = kv.index;
            let create_index = kv.entries.get(key).map_or(index, |e| e.create_index);
            kv.entries.insert(
                key.to_owned(),
                Entry {
                    value: value.as_bytes().to_vec(),
                    create_index,
                    modify_index: index,
                },
            );
            index
        };
        self.state.changed.send_replace(index);
    }

    /// Removes `key` (a new raft index, as a tombstone); deleting a missing key changes nothing.
    pub fn delete(&self, key: &str) {
        let index = {
            let mut kv = lock(&self.state.kv);
            if kv.entries.remove(key).is_none() {
                return;
            }
            kv.index += 1;
            kv.index
        };
        self.state.changed.send_replace(index);
    }

    /// `true`: stop listening (connections are refused) and cut every open connection, blocked
    /// queries included; returns once the port refuses. `false`: listen again on the same port.
    pub fn set_down(&self, down: bool) {
        let mut task = lock(&self.task);
        if down {
            if let Some(t) = task.take() {
                t.abort();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                assert!(
                    Instant::now() < deadline,
                    "fake consul still accepts connections after set_down(true)"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        } else if task.is_none() {
            let _guard = self.runtime.enter();
            let deadline = Instant::now() + Duration::from_secs(5);
            let listener = loop {
                match bind(self.addr) {
                    Ok(l) => break l,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("fake consul: cannot listen again on {}: {e}", self.addr),
                }
            };
            *task = Some(
                self.runtime
                    .spawn(accept_loop(listener, Arc::clone(&self.state))),
            );
        }
    }

    /// `true`: every blocking query waits `wait + wait/16` when nothing changes (consul's largest
    /// jitter); `false` (the default): `wait` plus a random jitter in `[0, wait/16)`, as consul.
    pub fn set_max_jitter(&self, on: bool) {
        self.state.max_jitter.store(on, Ordering::SeqCst);
    }

    /// HTTP requests received so far (all paths).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Blocking queries (`GET` with `index` > 0) received so far.
    pub fn blocking_requests(&self) -> u64 {
        self.state.blocking.load(Ordering::SeqCst)
    }

    /// The current `ModifyIndex` of `key`, if present.
    pub fn modify_index(&self, key: &str) -> Option<u64> {
        lock(&self.state.kv)
            .entries
            .get(key)
            .map(|e| e.modify_index)
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut conns = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let state = Arc::clone(&state);
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A Go `time.ParseDuration` subset: one or more `<number><unit>` with ns, us, µs, ms, s, m, h.
fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let n: f64 = rest[..num_end].parse().ok()?;
        let after = &rest[num_end..];
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let scale = match &after[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &after[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

/// A pseudo-random duration in `[0, max)` (consul's `RandomStagger`).
fn random_below(max: Duration) -> Duration {
    use std::hash::{BuildHasher as _, Hasher as _};
    let nanos = max.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    Duration::from_nanos(h.finish() % nanos)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reply(
    status: StatusCode,
    index: Option<u64>,
    ctype: &str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", ctype);
    if let Some(i) = index {
        b = b
            .header("x-consul-index", i.to_string())
            .header("x-consul-knownleader", "true")
            .header("x-consul-lastcontact", "0");
    }
    b.body(Full::new(Bytes::from(body)))
        .expect("fake consul: build response")
}

/// The query's index for `key`, and its entry as consul's JSON (`None` when absent).
fn lookup(state: &State, key: &str) -> (u64, Option<(serde_json::Value, Vec<u8>)>) {
    let kv = lock(&state.kv);
    match kv.entries.get(key) {
        Some(e) => {
            let value = if e.value.is_empty() {
                serde_json::Value::Null
            } else {
                base64::engine::general_purpose::STANDARD
                    .encode(&e.value)
                    .into()
            };
            let json = serde_json::json!({
                "LockIndex": 0,
                "Key": key,
                "Flags": 0,
                "Value": value,
                "CreateIndex": e.create_index,
                "ModifyIndex": e.modify_index,
            });
            (e.modify_index, Some((json, e.value.clone())))
        }
        None => (kv.index, None),
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let text = |status: StatusCode, msg: &str| {
        reply(
            status,
            None,
            "text/plain; charset=utf-8",
            msg.as_bytes().to_vec(),
        )
    };
    let Some(raw_key) = req.uri().path().strip_prefix("/v1/kv/") else {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    };
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed by this fake\n",
        );
    }
    let key = percent_decode(raw_key);
    let mut min_index = 0u64;
    let mut wait = DEFAULT_WAIT;
    let mut raw = false;
    for pair in req.uri().query().unwrap_or("").split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "index" => match value.parse() {
                Ok(i) => min_index = i,
                Err(_) => return text(StatusCode::BAD_REQUEST, "Invalid index\n"),
            },
            "wait" => match parse_go_duration(&percent_decode(value)) {
                // consul: a wait of 0 means the default; more than the maximum is capped.
                Some(d) if d.is_zero() => wait = DEFAULT_WAIT,
                Some(d) => wait = d.min(MAX_WAIT),
                None => return text(StatusCode::BAD_REQUEST, "Invalid wait time\n"),
            },
            "raw" => raw = true,
            _ => {}
        }
    }
    if min_index > 0 {
        state.blocking.fetch_add(1, Ordering::SeqCst);
        let jitter = if state.max_jitter.load(Ordering::SeqCst) {
            wait / 16
        } else {
            random_below(wait / 16)
        };
        let deadline = tokio::time::Instant::now() + wait + jitter;
        // Subscribe before looking, so that no change between the two is missed.
        let mut changes = state.changed.subscribe();
        loop {
            let (index, _) = lookup(&state, &key);
            if index > min_index {
                break;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => break,
            }
        }
    }
    match lookup(&state, &key) {
        (index, None) => reply(StatusCode::NOT_FOUND, Some(index), "text/plain", Vec::new()),
        (index, Some((_, value))) if raw => reply(
            StatusCode::OK,
            Some(index),
            "text/plain; charset=utf-8",
            value,
        ),
        (index, Some((json, _))) => reply(
            StatusCode::OK,
            Some(index),
            "application/json",
            serde_json::to_vec(&serde_json::Value::Array(vec![json]))
                .expect("fake consul: serialize entry"),
        ),
    }
}

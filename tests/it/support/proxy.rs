//! A counting TCP proxy on loopback, between regcache and its upstream: it counts what crossed the
//! wire in each direction, remembers when the last byte from the upstream went through, and can
//! slow the upstream's bytes down (so that a fill lasts long enough to watch it).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::net::Acceptor;

/// What crossed the proxy so far.
#[derive(Default)]
struct Counts {
    down: AtomicU64,
    up: AtomicU64,
    last_down: Mutex<Option<Instant>>,
}

/// A proxy on `127.0.0.1:PORT` to `target`, until dropped.
pub struct CountingProxy {
    addr: SocketAddr,
    counts: Arc<Counts>,
    _acceptor: Acceptor,
}

impl CountingProxy {
    /// Forwards every connection to `target`; the bytes from `target` at most `rate` bytes per
    /// second per connection, when given.
    pub fn start(target: SocketAddr, rate: Option<u64>) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let counts = Arc::new(Counts::default());
        let c2 = Arc::clone(&counts);
        let acceptor = Acceptor::serve(listener, move |client| {
            let _ = client.set_nonblocking(false);
            let Ok(server) = TcpStream::connect(target) else {
                return;
            };
            let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                return;
            };
            let (up, down) = (Arc::clone(&c2), Arc::clone(&c2));
            std::thread::spawn(move || pump(client, server2, &up, false, None));
            std::thread::spawn(move || pump(server, client2, &down, true, rate));
        });
        CountingProxy {
            addr,
            counts,
            _acceptor: acceptor,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes the upstream sent through the proxy so far.
    pub fn bytes_down(&self) -> u64 {
        self.counts.down.load(Ordering::Relaxed)
    }

    /// When the last byte from the upstream went through.
    pub fn last_down(&self) -> Option<Instant> {
        *self.counts.last_down.lock().expect("proxy counts")
    }
}

/// Copies `from` to `to` until either side closes, counting (and, `rate`, pacing) the bytes.
fn pump(mut from: TcpStream, mut to: TcpStream, counts: &Counts, down: bool, rate: Option<u64>) {
    let mut buf = vec![0u8; 64 << 10];
    // Pacing: never ahead of `rate` bytes per second since the current burst began (a pause of
    // a pooled connection between two requests starts a new one).
    let mut started = Instant::now();
    let mut last = started;
    let mut sent: u64 = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(rate) = rate {
            if last.elapsed() > Duration::from_millis(200) {
                (started, sent) = (Instant::now(), 0);
            }
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        last = Instant::now();
        sent += n as u64;
        if down {
            counts.down.fetch_add(n as u64, Ordering::Relaxed);
            *counts.last_down.lock().expect("proxy counts") = Some(Instant::now());
        } else {
            counts.up.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

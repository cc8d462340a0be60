//! Plain TCP servers on loopback for outages: an [`Acceptor`] that hands every connection to a
//! closure, the [`BlackHole`] built on it (accepts connections and never answers), and the
//! [`Relay`] that forwards to a server until it is switched into a black hole.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

/// Accepts connections on a listener, on a thread of its own, and hands each to `on_accept`, until
/// dropped. The closure (with whatever it keeps, such as held connections) is dropped with it.
pub struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Acceptor {
    /// Binds `addr` (panics when it cannot) and serves it.
    pub fn bind(addr: SocketAddr, on_accept: impl FnMut(TcpStream) + Send + 'static) -> Acceptor {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Acceptor::serve(listener, on_accept)
    }

    /// Serves a bound listener.
    pub fn serve(
        listener: TcpListener,
        mut on_accept: impl FnMut(TcpStream) + Send + 'static,
    ) -> Acceptor {
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => on_accept(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Acceptor {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A server on `addr` that accepts connections and never answers, until dropped; counts the
/// connections it swallowed.
pub struct BlackHole {
    accepted: Arc<AtomicUsize>,
    _acceptor: Acceptor,
}

impl BlackHole {
    pub fn start(addr: SocketAddr) -> BlackHole {
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepted2 = Arc::clone(&accepted);
        let mut held: Vec<TcpStream> = Vec::new();
        let acceptor = Acceptor::bind(addr, move |s| {
            accepted2.fetch_add(1, Ordering::Relaxed);
            held.push(s);
        });
        BlackHole {
            accepted,
            _acceptor: acceptor,
        }
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// A TCP relay on loopback to a server, that can be turned into a black hole and back. While it is
/// one, nothing more is forwarded on any connection, open or new: a connection it catches stays
/// open and unanswered for good (each of its bytes is swallowed), so a client's call through it,
/// pooled connection or not, can only end by the client's timeout. Turned back, new connections
/// are forwarded again.
pub struct Relay {
    addr: SocketAddr,
    holed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    _acceptor: Acceptor,
}

impl Relay {
    /// Forwards `127.0.0.1:<free port>` to `to`.
    pub fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("relay: local addr");
        let holed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (holed2, stop2) = (Arc::clone(&holed), Arc::clone(&stop));
        // Every socket stays open until the relay goes, so a swallowed one is never closed.
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let acceptor = Acceptor::serve(listener, move |client| {
            let _ = client.set_nonblocking(false);
            let server = if holed2.load(Ordering::SeqCst) {
                None
            } else {
                TcpStream::connect(to).ok()
            };
            let swallowed = Arc::new(AtomicBool::new(server.is_none()));
            {
                let mut keep = held.lock().unwrap_or_else(|p| p.into_inner());
                keep.extend(client.try_clone().ok());
                keep.extend(server.as_ref().and_then(|s| s.try_clone().ok()));
            }
            let pump = |from: &TcpStream, to: Option<&TcpStream>| {
                let from = from.try_clone().ok();
                let to = to.and_then(|t| t.try_clone().ok());
                let (holed, swallowed, stop) = (
                    Arc::clone(&holed2),
                    Arc::clone(&swallowed),
                    Arc::clone(&stop2),
                );
                std::thread::spawn(move || {
                    let Some(mut from) = from else { return };
                    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
                    let mut buf = vec![0u8; 64 << 10];
                    while !stop.load(Ordering::SeqCst) {
                        let n = match from.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock
                                        | std::io::ErrorKind::TimedOut
                                        | std::io::ErrorKind::Interrupted
                                ) =>
                            {
                                continue
                            }
                            Err(_) => break,
                        };
                        if holed.load(Ordering::SeqCst) {
                            swallowed.store(true, Ordering::SeqCst);
                        }
                        if swallowed.load(Ordering::SeqCst) {
                            continue;
                        }
                        match to.as_ref().map(|mut t| t.write_all(&buf[..n])) {
                            Some(Ok(())) => {}
                            _ => break,
                        }
                    }
                    // An end passed on, unless the connection was swallowed: that one stays open.
                    if !swallowed.load(Ordering::SeqCst) {
                        if let Some(t) = &to {
                            let _ = t.shutdown(std::net::Shutdown::Write);
                        }
                    }
                });
            };
            pump(&client, server.as_ref());
            if let Some(server) = &server {
                pump(server, Some(&client));
            }
        });
        Relay {
            addr,
            holed,
            stop,
            _acceptor: acceptor,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Turns the relay into a black hole (`true`) or back into a relay for new connections.
    pub fn set_black_hole(&self, on: bool) {
        self.holed.store(on, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

//! Plain TCP servers on loopback for outages: an [`Acceptor`] that hands every connection to a
//! closure, and the [`BlackHole`] built on it (accepts connections and never answers).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
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

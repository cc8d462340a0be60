//! regcache under test: an in-process server on 127.0.0.1:0, on its own runtime thread, so that
//! tests can be plain blocking code (skopeo, std HTTP) or async code alike.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

/// A running regcache.
pub struct Regcache {
    addr: SocketAddr,
    data_dir: PathBuf,
    _owned_dir: Option<TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub app: Arc<regcache::app::App>,
}

/// Config text for one default upstream at `upstream_url`, plus `extra` TOML appended.
pub fn config_for(upstream_url: &str, extra_upstream_keys: &str, extra: &str) -> String {
    format!("[upstreams.docker]\nurl = \"{upstream_url}\"\n{extra_upstream_keys}\n{extra}\n")
}

impl Regcache {
    /// Starts regcache with a fresh data directory and `config` (TOML text).
    pub fn start(config: &str) -> Regcache {
        let dir = TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("create regcache data dir");
        let path = dir.path().to_owned();
        let mut r = Regcache::start_in(&path, config);
        r._owned_dir = Some(dir);
        r
    }

    /// Starts regcache with one default upstream at `upstream_url`.
    pub fn with_upstream(upstream_url: &str) -> Regcache {
        Regcache::start(&config_for(upstream_url, "", ""))
    }

    /// Starts regcache on an existing data directory (for restarts).
    pub fn start_in(data_dir: &Path, config: &str) -> Regcache {
        let overrides = regcache::config::Overrides {
            data_dir: Some(data_dir.to_owned()),
            ..Default::default()
        };
        let cfg = regcache::config::Config::parse(config, "test config", &overrides)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{config}"));
        // The server's own runtime is also its background runtime (fills, upstream requests).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("regcache runtime");
        let app = regcache::app::App::open(cfg, rt.handle().clone()).expect("open regcache");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let app2 = Arc::clone(&app);
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind 127.0.0.1:0");
                addr_tx
                    .send(listener.local_addr().expect("local addr"))
                    .expect("send addr");
                let shutdown = async {
                    let _ = rx.await;
                };
                regcache::http::server::run(listener, app2, shutdown, Duration::from_secs(2))
                    .await
                    .expect("server run");
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("regcache did not bind");
        Regcache {
            addr,
            data_dir: data_dir.to_owned(),
            _owned_dir: None,
            shutdown: Some(tx),
            thread: Some(thread),
            app,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the server (drains for at most 2 s); the data directory stays.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Keeps the data directory alive beyond this server (for restart tests).
    pub fn take_dir(&mut self) -> Option<TempDir> {
        self._owned_dir.take()
    }
}

impl Drop for Regcache {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An async HTTP client for tests (no proxy: loopback only).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("reqwest client")
}

/// Whether `rc`'s store records the blob (or manifest) `digest`.
pub fn stored(rc: &Regcache, digest: &str) -> bool {
    let d: regcache::oci::reference::Digest = digest.parse().expect("test digest");
    rc.app
        .cache
        .store
        .blob_size(&d)
        .expect("store: blob_size")
        .is_some()
}

/// The OCI error code of an error response body.
pub fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "error body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no errors[0].code in {v}"))
        .to_owned()
}

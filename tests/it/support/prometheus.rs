//! A private Prometheus server on loopback (Debian package `prometheus`, whose own service is never
//! started: `tests/setup-deps.sh` masks it): `prometheus --config.file … --web.listen-address
//! 127.0.0.1:PORT --storage.tsdb.path <temp dir>`, killed when dropped, and its HTTP API
//! (`/api/v1/query`, label values).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::daemon::{home_dir, logged_child, Daemon};
use super::process::free_port;

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running Prometheus.
pub struct Prometheus {
    child: Daemon,
    port: u16,
    home: TempDir,
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

/// A scrape job of [`Prometheus::start`]: its name and targets (`HOST:PORT`).
pub struct Job<'a> {
    pub name: &'a str,
    pub targets: Vec<String>,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` every second, with `rule_files`, and waits until it is
    /// ready (`/-/ready`).
    pub fn start(jobs: &[Job<'_>], rule_files: &[PathBuf]) -> Prometheus {
        let prometheus = super::clients::require("prometheus", "prometheus");
        let home = home_dir("regcache-prometheus-");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n",
        );
        config.push_str("rule_files:\n");
        for f in rule_files {
            config.push_str(&format!("  - {}\n", f.display()));
        }
        config.push_str("scrape_configs:\n");
        for j in jobs {
            let targets: Vec<String> = j.targets.iter().map(|t| format!("'{t}'")).collect();
            config.push_str(&format!(
                "  - job_name: {}\n    static_configs:\n      - targets: [{}]\n",
                j.name,
                targets.join(", ")
            ));
        }
        let config_path = home.path().join("prometheus.yml");
        std::fs::write(&config_path, &config).expect("write prometheus.yml");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the Prometheus client");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("reqwest client");
        let mut p = Prometheus {
            child: Daemon::default(),
            port: 0,
            home,
            rt,
            client,
        };
        let mut why = String::new();
        // A free port is picked then released: another process may take it meanwhile, so retry.
        for _ in 0..3 {
            p.port = free_port();
            let data = p.home.path().join("data");
            let child = logged_child(&prometheus, &p.log_path())
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{}", p.port))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .spawn()
                .expect("spawn prometheus");
            let url = format!("{}/-/ready", p.url());
            let (rt, client) = (&p.rt, &p.client);
            let ready = || {
                // `send` starts its timeout at once: inside the runtime.
                rt.block_on(async { client.get(&url).send().await })
                    .is_ok_and(|r| r.status().is_success())
            };
            let mut child_slot = Daemon::default();
            match child_slot.wait_ready(
                child,
                READY_TIMEOUT,
                Duration::from_millis(100),
                "/-/ready answers 200",
                ready,
            ) {
                Ok(()) => {
                    p.child = child_slot;
                    return p;
                }
                Err(e) => why = e,
            }
        }
        panic!("prometheus did not start: {why}\n{}", p.logs());
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.home.path().join("prometheus.log")
    }

    /// Its log (stderr and stdout), for messages.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `GET path?query` of its HTTP API: the JSON answer, whatever its status (an error answer
    /// has `"status":"error"` and the reason).
    pub fn api(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        let url = format!("{}{path}", self.url());
        let text = self.rt.block_on(async {
            let r = self
                .client
                .get(&url)
                .query(query)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            r.text().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
        });
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}"))
    }

    /// `expr` evaluated now (`/api/v1/query`): the answer, `"status"` included.
    pub fn query(&self, expr: &str) -> serde_json::Value {
        self.api("/api/v1/query", &[("query", expr)])
    }

    /// The values of `label` among the series it holds (`/api/v1/label/<label>/values`), of the
    /// series `matcher` selects if given.
    pub fn label_values(&self, label: &str, matcher: Option<&str>) -> Vec<String> {
        let query: Vec<(&str, &str)> = matcher.map(|m| ("match[]", m)).into_iter().collect();
        let v = self.api(&format!("/api/v1/label/{label}/values"), &query);
        assert_eq!(v["status"], "success", "label values of {label}: {v}");
        v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `expr` has at least one sample, or panics after `within` with the last answer.
    pub fn wait_for(&self, expr: &str, within: Duration) {
        let t = Instant::now();
        loop {
            let v = self.query(expr);
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                return;
            }
            assert!(
                t.elapsed() < within,
                "`{expr}` has no sample after {within:?}: {v}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Where its data lives.
    pub fn home(&self) -> &Path {
        self.home.path()
    }
}

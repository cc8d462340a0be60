//! regcache as a real process (the built binary): for kill -9, signals, restarts and exit codes.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::registry::{http_get, PROXY_ENV};

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// A running `regcache serve`.
pub struct Process {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Environment variables set for the process, on top of the proxy ones.
    env: Vec<(String, String)>,
    /// More arguments of `serve` (e.g. `--data-dir`).
    args: Vec<String>,
}

impl Process {
    /// Starts `regcache serve --config CONFIG --listen ADDR` and waits until `/readyz` answers 200.
    /// The log (stderr) goes to `LOG`, appended across restarts.
    pub fn start(config: &Path, addr: SocketAddr, log: &Path) -> Process {
        Process::start_full(config, addr, log, &[], &[])
    }

    /// [`Process::start`] with these environment variables set too (kept across restarts).
    pub fn start_with_env(
        config: &Path,
        addr: SocketAddr,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Process {
        Process::start_full(config, addr, log, &[], env)
    }

    /// [`Process::start`] with more arguments of `serve` (kept for restarts).
    pub fn start_with(config: &Path, addr: SocketAddr, log: &Path, args: &[String]) -> Process {
        Process::start_full(config, addr, log, args, &[])
    }

    /// [`Process::start`] with more arguments of `serve` and more environment variables (both
    /// kept for restarts).
    pub fn start_full(
        config: &Path,
        addr: SocketAddr,
        log: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Process {
        let mut p = Process {
            child: None,
            addr,
            config: config.to_owned(),
            log: log.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            args: args.to_vec(),
        };
        p.spawn();
        p.wait_ready(Duration::from_secs(20));
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open regcache log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(&self.args)
            .env_remove("REGCACHE_CONFIG")
            .env("REGCACHE_LOG", "info,regcache::access=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in PROXY_ENV {
            cmd.env(k, v);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(cmd.spawn().expect("spawn regcache"));
    }

    /// Runs the binary with `args` to completion (e.g. a second `serve` that must fail).
    pub fn run_to_end(args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcache"));
        cmd.args(args)
            .env_remove("REGCACHE_CONFIG")
            .stdin(Stdio::null());
        for (k, v) in PROXY_ENV {
            cmd.env(k, v);
        }
        cmd.output().expect("run regcache")
    }

    pub fn wait_ready(&mut self, within: Duration) {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "regcache exited with {status} while starting:\n{}",
                        self.log_text()
                    );
                }
            }
            if http_get(self.addr, "/readyz", &[]).is_some_and(|r| r.status == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("regcache not ready after {within:?}:\n{}", self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL, then wait for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal by name (`HUP`, `TERM`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        while start.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("regcache did not exit within {within:?}");
    }

    /// Starts it again (same config, address and log) and waits until ready.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready(Duration::from_secs(20));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        let r = http_get(self.addr, "/metrics", &[]).expect("GET /metrics");
        String::from_utf8_lossy(&r.body).into_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value of a metric line that starts with `prefix` (name and labels), if present.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

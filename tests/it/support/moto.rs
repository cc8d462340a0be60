//! An S3-compatible server on loopback for the shared bucket tier: moto's `moto_server` (PyPI
//! `moto[server]`, installed by `tests/setup-deps.sh` in the venv `/opt/regcache-moto`).
//!
//! [`Moto::start`] runs `moto_server -H 127.0.0.1 -p <free port>` and waits until it answers; the
//! child is killed when the [`Moto`] is dropped. [`Moto::stop`] makes its port refuse connections (an
//! outage) and [`Moto::restart`] brings it back on the same port. moto keeps everything in memory:
//! a restarted server is empty except for the buckets [`Moto::create_bucket`] made, which it creates
//! again.
//!
//! The tests read the bucket with signed S3 requests ([`Moto::client`]); moto accepts any
//! credentials and checks no signature.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use super::daemon::{home_dir, logged_child, Daemon};
use super::process::free_port;
use super::s3::{request, S3Client};

/// Where `tests/setup-deps.sh` installs moto.
pub const MOTO_SERVER: &str = "/opt/regcache-moto/bin/moto_server";
/// An `Authorization` header moto accepts (it checks no signature).
const AUTH: &str = "AWS4-HMAC-SHA256 Credential=test/20261126/us-east-1/s3/aws4_request, \
                    SignedHeaders=host, Signature=x";
/// What regcache is configured with (`access_key_id` and `secret_access_key`): moto takes any.
pub const ACCESS_KEY: &str = "test";
pub const SECRET_KEY: &str = "test";
pub const REGION: &str = "us-east-1";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `moto_server` on 127.0.0.1.
pub struct Moto {
    child: Daemon,
    port: u16,
    buckets: Vec<String>,
    home: TempDir,
}

impl Moto {
    /// Starts moto on a free loopback port and waits until it answers.
    pub fn start() -> Moto {
        assert!(
            Path::new(MOTO_SERVER).is_file(),
            "{MOTO_SERVER} is missing: the bucket tests need moto (PyPI moto[server]); \
             run `bash tests/setup-deps.sh` (as root) to install it"
        );
        let mut moto = Moto {
            child: Daemon::default(),
            port: 0,
            buckets: Vec::new(),
            home: home_dir("regcache-moto-"),
        };
        // Free ports are picked then released: another process may take one meanwhile, so retry.
        let mut why = String::new();
        for _ in 0..3 {
            moto.port = free_port();
            match moto.spawn_and_wait() {
                Ok(()) => return moto,
                Err(e) => why = e,
            }
        }
        panic!(
            "moto did not start: {why}\n--- moto log ---\n{}",
            moto.logs()
        );
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.home.path().join("moto.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = logged_child(Path::new(MOTO_SERVER), &self.log_path());
        cmd.args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .env("PYTHONUNBUFFERED", "1");
        let addr = self.addr();
        self.child.wait_ready(
            cmd.spawn().expect("spawn moto_server"),
            READY_TIMEOUT,
            Duration::from_millis(100),
            "GET / answers 200",
            || {
                request(addr, "GET", "/", &[("Authorization", AUTH)], b"")
                    .is_some_and(|r| r.status == 200)
            },
        )
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, what goes in `[store.s3] endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// A client for moto's S3 API (what the tests read and write the bucket with).
    pub fn client(&self) -> S3Client {
        S3Client {
            addr: self.addr(),
            region: REGION.to_owned(),
            key_id: ACCESS_KEY.to_owned(),
            secret: SECRET_KEY.to_owned(),
            log: Some(self.log_path()),
        }
    }

    /// Creates bucket `name` (a valid bucket name, e.g. `regcache-test`).
    pub fn create_bucket(&mut self, name: &str) {
        self.client().create_bucket(name);
        if !self.buckets.iter().any(|b| b == name) {
            self.buckets.push(name.to_owned());
        }
    }

    /// Kills moto (SIGKILL) and reaps it; its port then refuses connections. No-op when stopped.
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts it again on the same port; it is empty (moto keeps data in memory) but for the buckets
    /// made by [`Moto::create_bucket`], created again.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.spawn_and_wait() {
            panic!(
                "moto did not restart: {why}\n--- moto log ---\n{}",
                self.logs()
            );
        }
        for b in self.buckets.clone() {
            self.create_bucket(&b);
        }
    }

    /// Everything moto wrote so far (its request log included).
    pub fn logs(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::s3::{conditional_writes, ConditionalWrites};

    #[test]
    fn moto_stores_lists_and_survives_a_restart_empty() {
        let mut moto = Moto::start();
        moto.create_bucket("regcache-fixture");
        let s3 = moto.client();
        let mut want = Vec::new();
        for i in 0..5u8 {
            let key = format!("p/repos/127.0.0.1:5000/a/b/_tags/t{i}");
            s3.put("regcache-fixture", &key, &vec![i; usize::from(i) * 1000]);
            want.push((key, u64::from(i) * 1000));
        }
        s3.put("regcache-fixture", "other/x", b"x");
        assert_eq!(s3.list("regcache-fixture", "p/"), want);
        assert_eq!(s3.list("regcache-fixture", "").len(), 6);
        assert_eq!(
            s3.get("regcache-fixture", &want[3].0),
            Some(vec![3u8; 3000])
        );
        assert_eq!(s3.get("regcache-fixture", "p/missing"), None);

        let addr = moto.addr();
        moto.stop();
        assert!(
            request(addr, "GET", "/", &[], b"").is_none(),
            "stopped moto answers"
        );
        moto.restart();
        assert_eq!(moto.addr(), addr);
        assert!(s3.list("regcache-fixture", "").is_empty());
    }

    /// docs/FLEET.md's engine table says so ("measured here").
    #[test]
    fn moto_refuses_create_only_writes_over_an_object() {
        let mut moto = Moto::start();
        moto.create_bucket("regcache-fixture");
        assert_eq!(
            conditional_writes(&moto.client(), "regcache-fixture", "blobs/sha256/x"),
            ConditionalWrites {
                put_refused: true,
                multipart_completion_refused: true,
            },
            "moto's answers to If-None-Match: * changed: update docs/FLEET.md"
        );
    }
}

//! A real distributed S3-compatible store on loopback for the shared bucket tier: a three-node
//! [Garage](https://garagehq.deuxfleurs.fr/) cluster (crates.io `garage` 2.5.0, AGPL, never vendored:
//! `tests/setup-deps.sh` installs it with `cargo install --root /opt/regcache-garage`).
//!
//! [`Garage::start`] runs three `garage server`s on 127.0.0.1 (free ports, a temp dir each, one shared
//! `rpc_secret`, `replication_factor = 3`, sqlite metadata), connects them (`garage node connect`),
//! gives each a role in zone `dc1` (`layout assign`, `layout apply`), imports the key the tests and
//! regcache use (`key import`) and waits until every node reports the cluster healthy (the admin
//! API's `GetClusterHealth`). Each node serves the S3 API on its own port; the cluster answers the
//! same on any of them. [`Garage::create_bucket`] makes a bucket the key may read, write and own.
//!
//! Faults: [`Garage::kill`] SIGKILLs a node and waits until the others see it gone (with one node of
//! three down reads and writes go on; with two down every S3 call answers 503 "could not reach
//! quorum"); [`Garage::restart`] starts it again on its ports and data and runs `garage node
//! connect` between it and every running node (the others would otherwise re-dial it only every
//! 30 s), then waits until they see each other. The children are killed when the [`Garage`] is
//! dropped, and with the test process (`setpriv --pdeathsig`).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::clients::{self, command, run};
use super::daemon::{home_dir, logged_child, Daemon};
use super::process::free_port;
use super::s3::{request, S3Client};

/// Where `tests/setup-deps.sh` installs Garage.
pub const GARAGE: &str = "/opt/regcache-garage/bin/garage";
/// The nodes of the cluster; every object is stored on all of them.
pub const NODES: usize = 3;
/// The S3 region Garage is configured with (SigV4 signatures name it).
pub const REGION: &str = "garage";
/// The key the tests and regcache use (`garage key import`).
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "5e1f0c0ffee5e1f0c0ffee5e1f0c0ffee5e1f0c0ffee5e1f0c0ffee5e1f0c0ff";
/// Shared by the nodes of one cluster (32 bytes, hex).
const RPC_SECRET: &str = "3a9f1c2b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
/// Bearer token of the nodes' admin API (health checks).
const ADMIN_TOKEN: &str = "regcache-tests-admin-token";

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// One `garage server`.
struct Node {
    child: Daemon,
    dir: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    admin_port: u16,
    /// `<full node id>@127.0.0.1:<rpc port>`, known once it ran.
    id: String,
    /// Started and not killed since.
    up: bool,
}

/// A running three-node Garage cluster on 127.0.0.1.
pub struct Garage {
    nodes: Vec<Node>,
    home: TempDir,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

impl Node {
    fn config(&self) -> PathBuf {
        self.dir.join("garage.toml")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("garage.log")
    }

    fn write_config(&self) {
        let dir = self.dir.display();
        fs::write(
            self.config(),
            format!(
                "metadata_dir = \"{dir}/meta\"\n\
                 data_dir = \"{dir}/data\"\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = {NODES}\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{RPC_SECRET}\"\n\
                 \n\
                 [s3_api]\n\
                 s3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 \n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n\
                 admin_token = \"{ADMIN_TOKEN}\"\n",
                rpc = self.rpc_port,
                s3 = self.s3_port,
                admin = self.admin_port,
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", self.config().display()));
    }

    /// Spawns `garage server` and waits until its admin API answers (with any status: before the
    /// layout is applied, `/health` says 503).
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = logged_child(Path::new(GARAGE), &self.log());
        cmd.arg("-c")
            .arg(self.config())
            .arg("server")
            .env("RUST_LOG", "garage=info,netapp=warn")
            .env("NO_COLOR", "1");
        let admin = loopback(self.admin_port);
        self.child.wait_ready(
            cmd.spawn().expect("spawn garage server"),
            READY_TIMEOUT,
            Duration::from_millis(50),
            "the admin API answers GET /health",
            || request(admin, "GET", "/health", &[], b"").is_some(),
        )?;
        self.up = true;
        Ok(())
    }

    fn kill(&mut self) {
        self.child.stop();
        self.up = false;
    }

    /// `GetClusterHealth` as this node sees it; `None` when it does not answer.
    fn health(&self) -> Option<serde_json::Value> {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let r = request(
            loopback(self.admin_port),
            "GET",
            "/v2/GetClusterHealth",
            &[("Authorization", &auth)],
            b"",
        )?;
        if r.status != 200 {
            return None;
        }
        serde_json::from_slice(&r.body).ok()
    }
}

impl Garage {
    /// Starts the three nodes, forms the cluster and imports [`KEY_ID`]; returns once every node
    /// reports it healthy.
    pub fn start() -> Garage {
        assert!(
            Path::new(GARAGE).is_file(),
            "{GARAGE} is missing: the bucket tests need Garage (crates.io garage 2.5.0); \
             run `bash tests/setup-deps.sh` (as root) to install it"
        );
        let home = home_dir("regcache-garage-");
        let mut garage = Garage {
            nodes: Vec::new(),
            home,
        };
        for i in 0..NODES {
            let dir = garage.home.path().join(format!("node{i}"));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            garage.nodes.push(Node {
                child: Daemon::default(),
                dir,
                rpc_port: 0,
                s3_port: 0,
                admin_port: 0,
                id: String::new(),
                up: false,
            });
            // Free ports are picked then released: another process may take one meanwhile, so retry.
            let mut why = String::new();
            let started = (0..3).any(|_| {
                let node = &mut garage.nodes[i];
                (node.rpc_port, node.s3_port, node.admin_port) =
                    (free_port(), free_port(), free_port());
                node.write_config();
                match node.spawn_and_wait() {
                    Ok(()) => true,
                    Err(e) => {
                        why = e;
                        false
                    }
                }
            });
            assert!(
                started,
                "garage node {i} did not start: {why}\n{}",
                garage.logs()
            );
            let id = garage.cli(i, &["node", "id", "-q"]);
            garage.nodes[i].id = id.trim().to_owned();
        }
        for i in 1..NODES {
            let id = garage.nodes[i].id.clone();
            garage.cli(0, &["node", "connect", &id]);
        }
        garage.wait_connected();
        let mut assign = vec!["layout", "assign", "-z", "dc1", "-c", "1G"];
        let ids: Vec<String> = garage
            .nodes
            .iter()
            .map(|n| n.id.split('@').next().unwrap_or_default().to_owned())
            .collect();
        assign.extend(ids.iter().map(String::as_str));
        garage.cli(0, &assign);
        garage.cli(0, &["layout", "apply", "--version", "1"]);
        garage.wait_health("reports the cluster healthy", |h| h["status"] == "healthy");
        garage.cli(
            0,
            &["key", "import", "--yes", "-n", "regcache", KEY_ID, SECRET],
        );
        garage
    }

    /// Runs `garage -c <node i's config> ARGS` to success; its stdout.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let mut cmd = command(Path::new(GARAGE));
        cmd.arg("-c")
            .arg(self.nodes[i].config())
            .args(args)
            .env("NO_COLOR", "1");
        let out = run(cmd, CLI_TIMEOUT);
        assert!(
            out.status.success(),
            "{}\n{}",
            clients::describe(&format!("garage {}", args.join(" ")), &out),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates bucket `name`, which [`KEY_ID`] may read, write and own, and waits until every
    /// running node serves it.
    pub fn create_bucket(&self, name: &str) {
        let i = self.running()[0];
        self.cli(i, &["bucket", "create", name]);
        self.cli(
            i,
            &[
                "bucket", "allow", "--read", "--write", "--owner", name, "--key", KEY_ID,
            ],
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        for j in self.running() {
            loop {
                let r = self
                    .client(j)
                    .send("GET", &format!("/{name}?list-type=2"), &[], b"");
                if r.as_ref().is_some_and(|r| r.status == 200) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {j} does not serve bucket {name}: {:?}\n{}",
                    r.map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned())),
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Node `i`'s S3 API, `127.0.0.1:PORT`.
    pub fn addr(&self, i: usize) -> SocketAddr {
        loopback(self.nodes[i].s3_port)
    }

    /// `http://127.0.0.1:PORT` of node `i`'s S3 API, what goes in `[store.s3] endpoint`.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.addr(i))
    }

    /// A client of node `i`'s S3 API with [`KEY_ID`].
    pub fn client(&self, i: usize) -> S3Client {
        S3Client {
            addr: self.addr(i),
            region: REGION.to_owned(),
            key_id: KEY_ID.to_owned(),
            secret: SECRET.to_owned(),
            log: Some(self.nodes[i].log()),
        }
    }

    /// The nodes running, in order.
    pub fn running(&self) -> Vec<usize> {
        (0..NODES).filter(|&i| self.nodes[i].up).collect()
    }

    /// SIGKILLs node `i` and waits until every other running node sees it gone.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
        self.wait_connected();
    }

    /// Starts node `i` again (same ports, same data), connects it and every running node to each
    /// other, and waits until they all see each other.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].kill();
        if let Err(why) = self.nodes[i].spawn_and_wait() {
            panic!("garage node {i} did not restart: {why}\n{}", self.logs());
        }
        for j in self.running() {
            if j != i {
                let (to_j, to_i) = (self.nodes[j].id.clone(), self.nodes[i].id.clone());
                self.cli(i, &["node", "connect", &to_j]);
                self.cli(j, &["node", "connect", &to_i]);
            }
        }
        self.wait_connected();
    }

    /// Waits until every running node is connected to all the running nodes and to no other.
    fn wait_connected(&self) {
        let running = self.running().len() as u64;
        // `connectedNodes` counts the node itself.
        self.wait_health(&format!("sees exactly the {running} running nodes"), |h| {
            h["connectedNodes"].as_u64() == Some(running)
        });
    }

    /// Waits until the admin API's `GetClusterHealth` satisfies `ok` on every running node; `what`
    /// says what that means, for the failure message.
    fn wait_health(&self, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for i in self.running() {
            loop {
                let health = self.nodes[i].health();
                if health.as_ref().is_some_and(&ok) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "garage node {i} never {what}: {health:?}\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The end of every node's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let log = fs::read_to_string(n.log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!("--- garage node {i} log (end) ---\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::s3::{conditional_writes, ConditionalWrites};

    const BUCKET: &str = "regcache-fixture";

    #[test]
    fn garage_cluster_serves_on_every_node_with_one_down_and_fails_fast_with_two() {
        let mut garage = Garage::start();
        garage.create_bucket(BUCKET);
        garage
            .client(0)
            .put(BUCKET, "a/x", b"written through node 0");
        for i in 0..NODES {
            assert_eq!(
                garage.client(i).get(BUCKET, "a/x").as_deref(),
                Some(&b"written through node 0"[..]),
                "node {i}"
            );
        }

        garage.kill(2);
        garage
            .client(1)
            .put(BUCKET, "a/y", b"written with node 2 down");
        assert_eq!(
            garage.client(0).get(BUCKET, "a/y").as_deref(),
            Some(&b"written with node 2 down"[..])
        );
        assert_eq!(garage.client(0).list(BUCKET, "a/").len(), 2);

        garage.kill(1);
        for (method, key, body) in [("GET", "a/x", &b""[..]), ("PUT", "a/z", b"z")] {
            let r = garage
                .client(0)
                .send(method, &format!("/{BUCKET}/{key}"), &[], body)
                .unwrap_or_else(|| panic!("{method} {key} with two nodes down: no answer"));
            assert_eq!(
                r.status,
                503,
                "{method} {key} with two nodes of three down: {}",
                String::from_utf8_lossy(&r.body)
            );
        }

        garage.restart(1);
        garage.restart(2);
        assert_eq!(garage.running(), vec![0, 1, 2]);
        for i in 0..NODES {
            assert_eq!(
                garage.client(i).list(BUCKET, "a/"),
                vec![("a/x".to_owned(), 22), ("a/y".to_owned(), 24)],
                "node {i} after the restarts"
            );
        }
    }

    /// docs/FLEET.md's engine table says so ("measured here").
    #[test]
    fn garage_writes_over_an_object_despite_if_none_match() {
        let garage = Garage::start();
        garage.create_bucket(BUCKET);
        assert_eq!(
            conditional_writes(&garage.client(0), BUCKET, "blobs/sha256/x"),
            ConditionalWrites {
                put_refused: false,
                multipart_completion_refused: false,
            },
            "Garage's answers to If-None-Match: * changed: update docs/FLEET.md"
        );
    }
}

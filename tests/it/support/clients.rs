//! The real clients regcache serves, each with private state: a `containerd` (driven with `ctr`), a
//! `dockerd` (on its own containerd) and `podman` (vfs storage). Everything lives in a temp dir of its
//! own under `$CARGO_TARGET_TMPDIR`; nothing touches `/var/lib/docker`, `/etc/docker`, a system
//! containerd or `/var/lib/containers`.
//!
//! - Every process gets [`PROXY_ENV`] (a dead proxy on loopback), so a client's fallback to the real
//!   registry dies on this machine: a pull that succeeds came from the mirror.
//! - The daemons run in a private mount namespace with a fresh tmpfs on `/run` (`unshare --mount`):
//!   dockerd cannot find a system containerd at `/run/containerd`, and what they create there
//!   (`/run/docker/plugins`, ...) vanishes with them. Their sockets are in their temp dirs. dockerd
//!   also gets a private `/etc/docker` (a dir of its own bind-mounted there), whose `certs.d` holds
//!   only the CA a test gives it.
//! - Daemons are stopped on drop (SIGTERM, then SIGKILL), by process id.
//! - Every client command runs with a timeout, so a hanging pull fails the test instead of hanging it.
//!
//! Tools come from Debian packages (`docker.io`, `containerd`, `runc`, `podman`, `fuse-overlayfs`);
//! `tests/setup-deps.sh` installs them. A missing tool panics, naming its package.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::registry::PROXY_ENV;

/// Lower-case proxy variables that could point a child somewhere else; removed from every child.
const LOWERCASE_PROXY_VARS: [&str; 4] = ["http_proxy", "https_proxy", "no_proxy", "all_proxy"];

/// How long a daemon may take to answer on its socket.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one client command (a pull) may take before the test fails.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a daemon gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// The Debian `docker.io` CLI (the one that matches its dockerd; another `docker` may be on PATH).
const DOCKER_CLI: &str = "/usr/bin/docker";

/// The path of `tool`, looked up in PATH and the sbin directories (dockerd and runc live in
/// `/usr/sbin`); panics naming the Debian package that provides it.
pub fn require(tool: &str, package: &str) -> PathBuf {
    let missing = || -> ! {
        panic!(
            "`{tool}` is not installed (Debian package {package}); run `bash tests/setup-deps.sh` (as root)"
        )
    };
    if tool.starts_with('/') {
        let path = PathBuf::from(tool);
        return if path.is_file() { path } else { missing() };
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from));
    dirs.iter()
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| missing())
}

/// A command for `program` with the dead-proxy environment and nothing that could override it.
pub fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.envs(PROXY_ENV);
    for var in LOWERCASE_PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove("ALL_PROXY");
    cmd
}

/// `program` run inside a private mount namespace with a fresh tmpfs on `/run` and, given
/// `etc_docker`, that directory bind-mounted over `/etc/docker` (so the daemon reads its own
/// `/etc/docker/certs.d`, and nobody else sees it); killed if the test process dies before it could
/// stop it (`setpriv --pdeathsig`; unshare, setpriv and sh all exec, so the daemon keeps the child's
/// process id).
fn in_private_run(program: &Path, etc_docker: Option<&Path>) -> Command {
    let unshare = require("unshare", "util-linux");
    let setpriv = require("setpriv", "util-linux");
    let mut cmd = command(&unshare);
    cmd.args(["--mount", "--propagation", "private", "--"])
        .arg(setpriv)
        .args(["--pdeathsig", "KILL", "--", "sh", "-c"]);
    const RUN: &str = "mount -n -t tmpfs -o mode=755 regcache-test-run /run";
    match etc_docker {
        None => {
            cmd.arg(format!(r#"{RUN} && exec "$0" "$@""#)).arg(program);
        }
        Some(dir) => {
            // the mount point must exist (the docker.io package ships it); it is never written
            assert!(
                Path::new("/etc/docker").is_dir(),
                "/etc/docker is missing (Debian package docker.io); run `bash tests/setup-deps.sh` (as root)"
            );
            cmd.arg(format!(
                r#"{RUN} && mount -n --bind "$1" /etc/docker && shift && exec "$0" "$@""#
            ))
            .arg(program)
            .arg(dir);
        }
    }
    cmd
}

/// A temp dir for one client's state: under the target dir, or under the system temp dir when the
/// target dir's path is too long for the unix sockets inside (108 bytes at most).
fn state_dir(prefix: &str) -> TempDir {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let root = if target.as_os_str().len() <= 60 {
        target.to_owned()
    } else {
        std::env::temp_dir()
    };
    fs::create_dir_all(&root).unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&root)
        .unwrap_or_else(|e| panic!("cannot create a temp dir for {prefix}: {e}"))
}

fn socket_path(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    assert!(
        path.as_os_str().len() < 100,
        "socket path {} is too long for a unix socket",
        path.display()
    );
    path
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The output of a finished command, for messages.
pub fn describe(what: &str, out: &Output) -> String {
    format!(
        "`{what}` exited with {}\n--- stderr ---\n{}\n--- stdout ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// Runs `cmd` to completion with no stdin and captured output; panics (with the output so far) if it
/// takes longer than `timeout`. Does not check the exit status.
pub fn run(mut cmd: Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    fn drain(
        pipe: Option<impl std::io::Read + Send + 'static>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait on a client command") {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{what} did not finish within {timeout:?} (killed)\n--- stderr ---\n{}\n--- stdout ---\n{}",
            String::from_utf8_lossy(&stderr),
            String::from_utf8_lossy(&stdout)
        ),
    }
}

/// A long-running child whose stdout and stderr go to a log file; stopped on drop.
struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Daemon {
        let file = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let file2 = file.try_clone().expect("clone a log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Daemon {
            name,
            child: Some(child),
            log,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `ready` until it is true; panics with the log if the daemon exits or time runs out.
    fn wait_until(&mut self, mut ready: impl FnMut() -> bool) {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "{} exited with {status} while starting:\n{}",
                        self.name,
                        self.log_text()
                    );
                }
            }
            if ready() {
                return;
            }
            if started.elapsed() > DAEMON_READY_TIMEOUT {
                self.stop();
                panic!(
                    "{} did not become ready within {DAEMON_READY_TIMEOUT:?}:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM (so that the daemon unmounts and cleans up), then SIGKILL after a grace period.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let started = Instant::now();
            while started.elapsed() < STOP_GRACE {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private `containerd` (root, state, sockets in a temp dir; CRI plugin off).
pub struct Containerd {
    daemon: Daemon,
    sock: PathBuf,
    ctr: PathBuf,
    dir: TempDir,
}

impl Containerd {
    pub fn start() -> Containerd {
        let containerd = require("containerd", "containerd");
        let ctr = require("ctr", "containerd");
        let dir = state_dir("ctrd-");
        let d = dir.path();
        let sock = socket_path(d, "c.sock");
        let config = d.join("config.toml");
        write(
            &config,
            &format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n\
                 [metrics]\n  address = \"\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = sock.display(),
                opt = d.join("opt").display(),
            ),
        );
        let mut cmd = in_private_run(&containerd, None);
        cmd.arg("--config").arg(&config);
        let mut daemon = Daemon::spawn("containerd", cmd, d.join("containerd.log"));
        let probe = || {
            let mut cmd = command(&ctr);
            cmd.arg("-a").arg(&sock).arg("version");
            sock.exists() && run(cmd, Duration::from_secs(10)).status.success()
        };
        daemon.wait_until(probe);
        Containerd {
            daemon,
            sock,
            ctr,
            dir,
        }
    }

    pub fn sock(&self) -> &Path {
        &self.sock
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// Writes `HOSTS/docker.io/hosts.toml` naming `mirror` (`127.0.0.1:PORT`) as a pull/resolve host
    /// in front of Docker Hub (the shape of `deploy/containerd/certs.d/docker.io/hosts.toml`); returns
    /// the directory to pass as `--hosts-dir`.
    pub fn hosts_dir(&self, mirror: &str) -> PathBuf {
        let hosts = self.dir.path().join("certs.d");
        write(
            &hosts.join("docker.io/hosts.toml"),
            &format!(
                "server = \"https://registry-1.docker.io\"\n\n\
                 [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        );
        hosts
    }

    /// `ctr -a SOCK ARGS`, whatever the outcome.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = command(&self.ctr);
        cmd.arg("-a").arg(&self.sock).args(args);
        run(cmd, CLIENT_TIMEOUT)
    }

    /// `ctr -a SOCK ARGS`; panics (with containerd's log) unless it succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> Output {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "{}\n--- containerd log ---\n{}",
            describe(&format!("ctr {}", args.join(" ")), &out),
            self.log_text()
        );
        out
    }
}

/// A private `dockerd` using one `registry-mirrors` entry, vfs storage, no bridge, no iptables, on a
/// private [`Containerd`], with a private `/etc/docker` (empty but for the `certs.d` it is given).
pub struct Dockerd {
    daemon: Daemon,
    containerd: Containerd,
    sock: PathBuf,
    cli: PathBuf,
    dir: TempDir,
}

impl Dockerd {
    /// Starts dockerd with `http://MIRROR` (`127.0.0.1:PORT`) as its registry mirror (and MIRROR in
    /// `insecure-registries`) and waits until it answers on its socket.
    pub fn start(mirror: &str) -> Dockerd {
        Dockerd::start_with(&format!("http://{mirror}"), Some(mirror), None)
    }

    /// Starts dockerd with `https://MIRROR` as its registry mirror, no `insecure-registries` entry,
    /// and, given `ca`, that CA as `/etc/docker/certs.d/MIRROR/ca.crt` in its mount namespace only.
    ///
    /// dockerd always treats 127.0.0.0/8 as insecure (TLS unverified, `certs.d` unread), so a mirror
    /// whose certificate should be checked must be elsewhere, e.g. `[::1]:PORT`.
    pub fn start_https(mirror: &str, ca: Option<&Path>) -> Dockerd {
        Dockerd::start_with(
            &format!("https://{mirror}"),
            None,
            ca.map(|ca| (mirror, ca)),
        )
    }

    fn start_with(mirror_url: &str, insecure: Option<&str>, ca: Option<(&str, &Path)>) -> Dockerd {
        let dockerd = require("dockerd", "docker.io");
        let cli = require(DOCKER_CLI, "docker.io");
        let containerd = Containerd::start();
        let dir = state_dir("dckd-");
        let d = dir.path();
        let sock = socket_path(d, "d.sock");
        let etc_docker = d.join("etc-docker");
        fs::create_dir_all(etc_docker.join("certs.d")).expect("create the private /etc/docker");
        if let Some((host, ca)) = ca {
            let pem = fs::read_to_string(ca)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", ca.display()));
            write(&etc_docker.join("certs.d").join(host).join("ca.crt"), &pem);
        }
        let config = d.join("daemon.json");
        let mut daemon_json = serde_json::json!({
            "registry-mirrors": [mirror_url],
            "storage-driver": "vfs",
            "iptables": false,
            "ip-masq": false,
            "bridge": "none",
            // dockerd 20.10 writes its trust key to /etc/docker/key.json unless told otherwise
            "deprecated-key-path": d.join("key.json"),
        });
        if let Some(insecure) = insecure {
            daemon_json["insecure-registries"] = serde_json::json!([insecure]);
        }
        write(&config, &daemon_json.to_string());
        fs::create_dir_all(d.join("cli")).expect("create the docker CLI config dir");
        let mut cmd = in_private_run(&dockerd, Some(&etc_docker));
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--containerd")
            .arg(containerd.sock())
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()));
        let mut daemon = Daemon::spawn("dockerd", cmd, d.join("dockerd.log"));
        let probe = || {
            sock.exists() && {
                let mut cmd = command(&cli);
                cmd.env("DOCKER_CONFIG", d.join("cli"))
                    .arg("-H")
                    .arg(format!("unix://{}", sock.display()))
                    .arg("version");
                run(cmd, Duration::from_secs(10)).status.success()
            }
        };
        daemon.wait_until(probe);
        Dockerd {
            daemon,
            containerd,
            sock,
            cli,
            dir,
        }
    }

    /// dockerd's log so far (its pulls log what they fetched and any fallback).
    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// `docker -H unix://SOCK ARGS`, whatever the outcome.
    pub fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = command(&self.cli);
        cmd.env("DOCKER_CONFIG", self.dir.path().join("cli"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args);
        run(cmd, CLIENT_TIMEOUT)
    }

    /// `docker ARGS`; panics (with dockerd's and containerd's logs) unless it succeeds.
    pub fn docker_ok(&self, args: &[&str]) -> Output {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "{}\n--- dockerd log ---\n{}\n--- containerd log ---\n{}",
            describe(&format!("docker {}", args.join(" ")), &out),
            self.log_text(),
            self.containerd.log_text()
        );
        out
    }

    /// `docker image inspect --format FORMAT IMAGE`, trimmed.
    pub fn inspect(&self, image: &str, format: &str) -> String {
        let out = self.docker_ok(&["image", "inspect", "--format", format, image]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// `registries.conf` text: Docker Hub (`docker.io`) pulled through the mirror at `location`
/// (`127.0.0.1:PORT` or `127.0.0.1:PORT/docker.io`), insecure (plain HTTP); the shape of
/// `deploy/podman/registries.conf`.
pub fn registries_conf(location: &str) -> String {
    format!(
        "unqualified-search-registries = [\"docker.io\"]\n\n\
         [[registry]]\nlocation = \"docker.io\"\n\n\
         [[registry.mirror]]\nlocation = \"{location}\"\ninsecure = true\n"
    )
}

/// `podman` with private storage (vfs), config, tmp and network config dirs: its own `--root`,
/// `--runroot`, `containers.conf`, `storage.conf` and `registries.conf` (`CONTAINERS_REGISTRIES_CONF`).
pub struct Podman {
    podman: PathBuf,
    dir: TempDir,
    /// Storage driver `overlay` with partial pulls ([`Podman::with_partial_pulls`]), else `vfs`.
    partial: bool,
}

impl Podman {
    /// A podman whose `registries.conf` is `registries` (see [`registries_conf`]), with empty storage.
    pub fn new(registries: &str) -> Podman {
        let podman = require("podman", "podman");
        let dir = state_dir("podm-");
        let d = dir.path();
        fs::create_dir_all(d.join("tmp")).expect("create podman's tmp dir");
        write(&d.join("registries.conf"), registries);
        write(&d.join("auth.json"), "{}\n"); // no credentials (not root's)
                                             // tmp_dir: libpod's state (default /run/libpod); file locks (not /dev/shm/libpod_lock);
                                             // no event log; the CNI backend with a private config dir (netavark, the default, keeps a
                                             // fixed /run/containers/networks when run as root).
        write(
            &d.join("containers.conf"),
            &format!(
                "[engine]\n\
                 tmp_dir = \"{tmp}\"\n\
                 image_copy_tmp_dir = \"{tmp}\"\n\
                 events_logger = \"none\"\n\
                 lock_type = \"file\"\n\
                 [network]\n\
                 network_backend = \"cni\"\n\
                 network_config_dir = \"{net}\"\n",
                tmp = d.join("tmp").display(),
                net = d.join("net").display(),
            ),
        );
        write(
            &d.join("storage.conf"),
            &format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                d.join("root").display(),
                d.join("run").display()
            ),
        );
        Podman {
            podman,
            dir,
            partial: false,
        }
    }

    /// A podman that pulls zstd:chunked layers partially, as [`Podman::new`] but with the `overlay`
    /// storage driver (the only one containers/storage pulls partially into) and
    /// `pull_options = {enable_partial_images = "true"}`; each command runs in a private mount
    /// namespace (`unshare --mount`), so its overlay mounts vanish with it.
    pub fn with_partial_pulls(registries: &str) -> Podman {
        let mut p = Podman::new(registries);
        let d = p.dir.path();
        write(
            &d.join("storage.conf"),
            &format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n\
                 [storage.options]\n\
                 pull_options = {{enable_partial_images = \"true\", use_hard_links = \"false\"}}\n",
                d.join("root").display(),
                d.join("run").display()
            ),
        );
        p.partial = true;
        p
    }

    /// `podman --root R --runroot RR --storage-driver vfs|overlay ARGS`, whatever the outcome.
    pub fn podman(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let mut cmd = if self.partial {
            let mut cmd = command(&require("unshare", "util-linux"));
            cmd.args(["--mount", "--propagation", "private", "--"])
                .arg(&self.podman);
            cmd
        } else {
            command(&self.podman)
        };
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("TMPDIR", d.join("tmp"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args([
                "--storage-driver",
                if self.partial { "overlay" } else { "vfs" },
            ])
            .args(args);
        run(cmd, CLIENT_TIMEOUT)
    }

    /// `podman ARGS`; panics unless it succeeds.
    pub fn podman_ok(&self, args: &[&str]) -> Output {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("podman {}", args.join(" ")), &out)
        );
        out
    }

    /// `podman --log-level=debug pull ARGS`; panics unless it succeeds and every registry podman
    /// tried was the mirror at `mirror_location` (no fallback to the primary location). Returns the
    /// debug log.
    pub fn pull_via(&self, mirror_location: &str, args: &[&str]) -> String {
        let mut all = vec!["--log-level=debug", "pull"];
        all.extend_from_slice(args);
        let out = self.podman_ok(&all);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let tried: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split_once("Trying to access \\\"").map(|(_, rest)| rest))
            .collect();
        assert!(
            !tried.is_empty(),
            "podman pull {args:?}: no `Trying to access` in its debug log:\n{log}"
        );
        for t in &tried {
            assert!(
                t.starts_with(&format!("{mirror_location}/")),
                "podman pull {args:?} went to {t} instead of the mirror {mirror_location}:\n{log}"
            );
        }
        log
    }

    /// `podman image inspect --format FORMAT IMAGE`, trimmed.
    pub fn inspect(&self, image: &str, format: &str) -> String {
        let out = self.podman_ok(&["image", "inspect", "--format", format, image]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

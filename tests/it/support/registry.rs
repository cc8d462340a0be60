//! Real upstream registry for the integration tests: `docker-registry` (distribution 2.8) on loopback,
//! seeded with offline-built images, plus thin `skopeo` wrappers.
//!
//! - [`fixtures_dir`] builds the OCI layouts of `tests/fixtures/build-images.sh` once per machine, under
//!   `$CARGO_TARGET_TMPDIR/regcache-fixtures/<hash of the script>` (a `flock` makes parallel tests and
//!   parallel test processes wait for one build).
//! - [`Registry::start_seeded`] gives each test its own upstream, a copy of a storage tree seeded once per
//!   machine by `tests/fixtures/seed.sh` with the images of [`SEEDED_IMAGES`]; the test may stop, restart
//!   or push to it freely.
//! - [`Registry::start_proxy`] runs `docker-registry` as a pull-through cache: the reference to compare
//!   regcache with. Note that distribution 2.8 refuses to *start* in proxy mode while its remote is down
//!   (it pings `REMOTE/v2/` at startup and panics).
//!
//! Everything binds 127.0.0.1, and every child process gets [`PROXY_ENV`]: a dead proxy for anything that
//! is not loopback. Tools come from Debian packages; `tests/setup-deps.sh` installs them.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

use super::daemon::{home_dir, Daemon};
use super::media::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use super::process::free_port;

/// Environment for every tool the tests run: a proxy that refuses everything, except loopback.
pub const PROXY_ENV: [(&str, &str); 3] = [
    ("HTTP_PROXY", "http://127.0.0.1:9"),
    ("HTTPS_PROXY", "http://127.0.0.1:9"),
    ("NO_PROXY", "127.0.0.1,localhost"),
];

/// Lower-case spellings that could otherwise point a child somewhere else; removed from every child.
const LOWERCASE_PROXY_VARS: [&str; 4] = ["http_proxy", "https_proxy", "no_proxy", "all_proxy"];

/// Names of the images [`Registry::start_seeded`] serves (`repo:tag`, usable with [`inspect_raw`]).
///
/// `small/*` and `library/busybox` are the same busybox image (one ~1 MiB gzip layer, linux/amd64);
/// `multi/*` list linux/amd64 and linux/arm64 children sharing that layer; `big/image` adds a second
/// layer of 110 MiB incompressible bytes (blob > 100 MiB). The umoci-built OCI manifests carry no
/// top-level `mediaType` field: the type is in the registry's `Content-Type` (see [`manifest_media_type`]).
pub struct Seeded;

impl Seeded {
    /// OCI image manifest.
    pub const SMALL_OCI: &'static str = "small/oci:latest";
    /// Docker schema 2 manifest of the same image.
    pub const SMALL_DOCKER: &'static str = "small/docker:latest";
    /// Docker schema 2, same image, under the name docker clients use for `busybox`.
    pub const BUSYBOX: &'static str = "library/busybox:latest";
    /// OCI image index over linux/amd64 and linux/arm64 OCI manifests.
    pub const MULTI_OCI: &'static str = "multi/oci:latest";
    /// Docker manifest list over linux/amd64 and linux/arm64 Docker schema 2 manifests.
    pub const MULTI_DOCKER: &'static str = "multi/docker:latest";
    /// OCI image manifest with a layer blob larger than 100 MiB.
    pub const BIG: &'static str = "big/image:latest";
    /// Size in bytes of the uncompressed random file in [`Seeded::BIG`]'s second layer.
    pub const BIG_FILE_BYTES: u64 = 115_343_360;
}

/// Every image of a seeded registry: (repository, tag, media type of the tagged manifest).
pub const SEEDED_IMAGES: &[(&str, &str, &str)] = &[
    ("small/oci", "latest", OCI_MANIFEST),
    ("small/docker", "latest", DOCKER_MANIFEST),
    ("library/busybox", "latest", DOCKER_MANIFEST),
    ("multi/oci", "latest", OCI_INDEX),
    ("multi/docker", "latest", DOCKER_LIST),
    ("big/image", "latest", OCI_MANIFEST),
];

const REQUIRED_TOOLS: [&str; 4] = ["docker-registry", "skopeo", "umoci", "flock"];
const READY_TIMEOUT: Duration = Duration::from_secs(20);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("regcache-fixtures")
}

fn script(name: &str) -> PathBuf {
    manifest_dir().join("tests/fixtures").join(name)
}

/// Removes cached `{kind}-<hash>` dirs (and lock files) of other script versions: each is 100+ MiB.
fn prune_stale(kind: &str, keep: &str) {
    let Ok(entries) = fs::read_dir(fixtures_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{kind}-")) && !name.starts_with(keep) {
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Panics, naming the tool, unless every external tool the harness runs is installed.
fn require_tools() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        for tool in REQUIRED_TOOLS {
            assert!(
                find_in_path(tool).is_some(),
                "`{tool}` is not installed (not on PATH); run `bash tests/setup-deps.sh` (as root) to install the test tools"
            );
        }
        assert!(
            Path::new("/bin/busybox").is_file(),
            "/bin/busybox is missing (Debian package busybox-static); run `bash tests/setup-deps.sh` (as root)"
        );
    });
}

/// A command with the dead-proxy environment and nothing that could override it.
fn tool(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.envs(PROXY_ENV);
    for var in LOWERCASE_PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

fn sha256_hex(data: &[u8]) -> String {
    let mut hex = String::with_capacity(64);
    for byte in Sha256::digest(data) {
        write!(hex, "{byte:02x}").expect("writing to a String cannot fail");
    }
    hex
}

fn read_script(name: &str) -> Vec<u8> {
    let path = script(name);
    fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn describe(cmd: &str, out: &Output) -> String {
    format!(
        "`{cmd}` failed ({}):\n--- stderr ---\n{}\n--- stdout ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// An exclusive `flock(1)` on a file, held by a helper process for as long as this value lives (and
/// released by the kernel if the test process dies).
struct FileLock {
    holder: Child,
    stdin: Option<ChildStdin>,
}

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        let mut holder = Command::new("flock")
            .arg(path)
            .args(["-c", "echo locked && exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `flock {}`: {e}", path.display()));
        let stdout = holder.stdout.take().expect("flock's stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("waiting for the lock {}: {e}", path.display()));
        assert_eq!(
            line.trim(),
            "locked",
            "`flock {}` exited without taking the lock",
            path.display()
        );
        let stdin = holder.stdin.take();
        FileLock { holder, stdin }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF: `cat` ends, flock exits and the lock is released
        let _ = self.holder.wait();
    }
}

/// The OCI layouts of `tests/fixtures/build-images.sh` (`small/`, `multi/`, `big/`), built once per
/// machine (cached by the hash of the script) and reused while `.done` exists.
pub fn fixtures_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        require_tools();
        let hash = sha256_hex(&read_script("build-images.sh"));
        let dir = fixtures_root().join(format!("layouts-{}", &hash[..16]));
        if dir.join(".done").is_file() {
            return dir;
        }
        let _lock =
            FileLock::acquire(&fixtures_root().join(format!("layouts-{}.lock", &hash[..16])));
        if !dir.join(".done").is_file() {
            prune_stale("layouts", &format!("layouts-{}", &hash[..16]));
            let started = Instant::now();
            let out = tool("bash")
                .arg(script("build-images.sh"))
                .arg(&dir)
                .stdin(Stdio::null())
                .output()
                .expect("cannot run bash tests/fixtures/build-images.sh");
            assert!(
                out.status.success(),
                "{}",
                describe("tests/fixtures/build-images.sh", &out)
            );
            eprintln!(
                "regcache-fixtures: built image layouts in {:.1?} at {}",
                started.elapsed(),
                dir.display()
            );
        }
        dir
    })
}

/// A storage tree seeded with [`SEEDED_IMAGES`]; built once per machine, never served directly.
fn seeded_template() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let layouts = fixtures_dir();
        let version = tool("docker-registry")
            .arg("--version")
            .output()
            .expect("cannot run docker-registry --version");
        let mut key = read_script("build-images.sh");
        key.extend(read_script("seed.sh"));
        key.extend(&version.stdout);
        let hash = sha256_hex(&key);
        let dir = fixtures_root().join(format!("seeded-{}", &hash[..16]));
        let storage = dir.join("storage");
        if dir.join(".done").is_file() {
            return storage;
        }
        let _lock =
            FileLock::acquire(&fixtures_root().join(format!("seeded-{}.lock", &hash[..16])));
        if !dir.join(".done").is_file() {
            prune_stale("seeded", &format!("seeded-{}", &hash[..16]));
            let started = Instant::now();
            if dir.exists() {
                fs::remove_dir_all(&dir)
                    .unwrap_or_else(|e| panic!("cannot clear {}: {e}", dir.display()));
            }
            fs::create_dir_all(&storage)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", storage.display()));
            let mut registry = Registry::launch(Home::Path(dir.clone()), None);
            let out = tool("bash")
                .arg(script("seed.sh"))
                .arg(layouts)
                .arg(registry.host_port())
                .stdin(Stdio::null())
                .output()
                .expect("cannot run bash tests/fixtures/seed.sh");
            registry.stop();
            assert!(
                out.status.success(),
                "{}\n--- template registry log ---\n{}",
                describe("tests/fixtures/seed.sh", &out),
                registry.logs()
            );
            fs::write(dir.join(".done"), b"seeded\n")
                .expect("cannot write the seeded template's .done");
            eprintln!(
                "regcache-fixtures: seeded a registry in {:.1?} at {}",
                started.elapsed(),
                dir.display()
            );
        }
        storage
    })
}

/// Where a registry keeps its config, logs and `storage/`.
enum Home {
    Temp(TempDir),
    Path(PathBuf),
}

impl Home {
    fn path(&self) -> &Path {
        match self {
            Home::Temp(t) => t.path(),
            Home::Path(p) => p,
        }
    }
}

/// A `docker-registry serve` child on 127.0.0.1 with its own storage; stopped on drop.
pub struct Registry {
    child: Daemon,
    port: u16,
    remote: Option<String>,
    home: Home,
}

fn new_home() -> TempDir {
    let home = home_dir("regcache-registry-");
    fs::create_dir_all(home.path().join("storage")).expect("cannot create registry storage dir");
    home
}

impl Registry {
    /// A registry with empty storage on a free port, ready to serve.
    pub fn start_empty() -> Registry {
        require_tools();
        Registry::launch(Home::Temp(new_home()), None)
    }

    /// A registry serving its own copy of the seeded storage ([`SEEDED_IMAGES`]), ready to serve.
    pub fn start_seeded() -> Registry {
        let template = seeded_template();
        let home = new_home();
        let storage = home.path().join("storage");
        fs::remove_dir(&storage).expect("cannot remove the fresh, empty storage dir");
        let out = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(template)
            .arg(&storage)
            .output()
            .expect("cannot run cp");
        assert!(
            out.status.success(),
            "{}",
            describe("cp -a <seeded template> <storage>", &out)
        );
        Registry::launch(Home::Temp(home), None)
    }

    /// `docker-registry` as a pull-through cache of `remote_url` (e.g. another [`Registry::url`]).
    /// The remote must be up: distribution 2.8 will not start in proxy mode otherwise.
    pub fn start_proxy(remote_url: &str) -> Registry {
        require_tools();
        Registry::launch(Home::Temp(new_home()), Some(remote_url.to_owned()))
    }

    /// Starts on a fresh port, retrying a few times if another process took the port in between.
    fn launch(home: Home, remote: Option<String>) -> Registry {
        let mut registry = Registry {
            child: Daemon::default(),
            port: 0,
            remote,
            home,
        };
        for attempt in 1..=5 {
            registry.port = free_port();
            let log_before = registry.logs().len();
            match registry.spawn_and_wait() {
                Ok(()) => return registry,
                Err(_)
                    if attempt < 5
                        && registry.logs()[log_before..].contains("address already in use") =>
                {
                    continue
                }
                Err(why) => registry.fail(&why),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    fn fail(&mut self, why: &str) -> ! {
        self.stop();
        panic!(
            "docker-registry on {} ({}): {why}\n--- registry stderr ({}) ---\n{}",
            self.host_port(),
            match &self.remote {
                Some(remote) => format!("proxy of {remote}"),
                None => "plain".to_owned(),
            },
            self.home.path().join("registry.log").display(),
            self.logs()
        );
    }

    fn write_config(&self) -> PathBuf {
        let home = self.home.path();
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: warn\n\
             storage:\n  filesystem:\n    rootdirectory: \"{storage}\"\n  delete:\n    enabled: false\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: regcache-test-secret\n",
            storage = home.join("storage").display(),
            port = self.port,
        );
        if let Some(remote) = &self.remote {
            writeln!(yaml, "proxy:\n  remoteurl: \"{remote}\"")
                .expect("writing to a String cannot fail");
        }
        let path = home.join("config.yml");
        fs::write(&path, yaml).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Spawns the child and waits for `GET /v2/` to answer 200; on failure, stops it and returns why.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let config = self.write_config();
        let open_log = |name: &str| {
            let path = self.home.path().join(name);
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
        };
        let child = tool("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(open_log("access.log"))
            .stderr(open_log("registry.log"))
            .spawn()
            .expect("cannot spawn docker-registry (run tests/setup-deps.sh)");
        let addr = self.addr();
        self.child.wait_ready(
            child,
            READY_TIMEOUT,
            Duration::from_millis(50),
            "GET /v2/ answers 200",
            || http_get(addr, "/v2/", &[]).map(|r| r.status) == Some(200),
        )
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.host_port())
    }

    /// `127.0.0.1:PORT`
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's storage root (`docker/registry/v2/...` below it).
    pub fn storage_dir(&self) -> PathBuf {
        self.home.path().join("storage")
    }

    /// Everything the registry wrote to stderr so far (all runs, in order).
    pub fn logs(&self) -> String {
        fs::read_to_string(self.home.path().join("registry.log")).unwrap_or_default()
    }

    /// The registry's access log so far (one combined-log-format line per request, all runs): handy
    /// for counting what a cache in front of it fetched.
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.home.path().join("access.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Kills the registry (SIGKILL) and reaps it; a no-op when it is not running.
    pub fn stop(&mut self) {
        self.child.stop();
    }

    /// Starts the registry again on the same port and storage (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.spawn_and_wait() {
            self.fail(&format!("restart on the same port failed: {why}"));
        }
    }
}

/// Runs `skopeo ARGS` with [`PROXY_ENV`]; panics with its stderr unless it succeeds.
pub fn skopeo(args: &[&str]) -> Output {
    let out = skopeo_try(args);
    assert!(
        out.status.success(),
        "{}",
        describe(&format!("skopeo {}", args.join(" ")), &out)
    );
    out
}

/// Runs `skopeo ARGS` with [`PROXY_ENV`], whatever the outcome.
pub fn skopeo_try(args: &[&str]) -> Output {
    require_tools();
    tool("skopeo")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run skopeo (run tests/setup-deps.sh)")
}

/// The manifest bytes exactly as served for `image` (`repo:tag` or `repo@digest`) by `host_port`;
/// panics if skopeo cannot fetch it. For an index or list this is the index itself.
pub fn inspect_raw(host_port: &str, image: &str) -> Vec<u8> {
    let reference = format!("docker://{host_port}/{image}");
    skopeo(&["inspect", "--raw", "--tls-verify=false", &reference]).stdout
}

/// `skopeo copy --src-tls-verify=false [--all] docker://host_port/image dir:dest`. Does NOT panic: check
/// `status` (tests of failure paths want the error).
pub fn copy_to_dir(host_port: &str, image: &str, dest: &Path, all: bool) -> Output {
    let src = format!("docker://{host_port}/{image}");
    let dst = format!("dir:{}", dest.display());
    let mut args = vec!["copy", "--src-tls-verify=false"];
    if all {
        args.push("--all");
    }
    args.push(&src);
    args.push(&dst);
    skopeo_try(&args)
}

/// `sha256:<hex>` of some bytes (a manifest's digest is that of its exact bytes).
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The media type of a manifest body: its `mediaType` field, or, when that optional field is absent
/// (umoci's OCI manifests), what its shape says (`manifests` → OCI index, `config` → OCI manifest).
pub fn manifest_media_type(raw: &[u8]) -> String {
    let doc: serde_json::Value = serde_json::from_slice(raw).unwrap_or_else(|e| {
        panic!(
            "manifest is not JSON ({e}): {}",
            String::from_utf8_lossy(raw)
        )
    });
    if let Some(mt) = doc.get("mediaType").and_then(|v| v.as_str()) {
        return mt.to_owned();
    }
    if doc.get("manifests").is_some() {
        OCI_INDEX.to_owned()
    } else if doc.get("config").is_some() {
        OCI_MANIFEST.to_owned()
    } else {
        panic!(
            "cannot tell the media type of manifest {}",
            String::from_utf8_lossy(raw)
        )
    }
}

/// A minimal HTTP/1.1 response: status, headers (names lower-cased), body.
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Connects to `addr` (loopback only; 2 s at most), sends `METHOD target` with `headers`,
/// `Connection: close` and `body` as is, and sets `read_timeout` for the answer; `None` when any of
/// that fails.
pub fn send_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    read_timeout: Duration,
) -> Option<TcpStream> {
    assert!(
        addr.ip().is_loopback(),
        "{method} {target}: the tests only talk to loopback, not {addr}"
    );
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(read_timeout)).ok()?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        write!(head, "{name}: {value}\r\n").expect("writing to a String cannot fail");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    Some(stream)
}

/// A raw HTTP/1.1 response split into status, headers (names lower-cased) and the body as received
/// (no chunked decoding); `None` without a whole head or a status.
pub fn parse_raw_response(response: &[u8]) -> Option<RawResponse> {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(RawResponse {
        status,
        headers,
        body: response[split + 4..].to_vec(),
    })
}

/// Reads a response's head off a keep-alive connection (its body stays to be read).
pub fn read_head(stream: &mut TcpStream, what: &str) -> RawResponse {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = stream
            .read(&mut byte)
            .unwrap_or_else(|e| panic!("{what}: reading the head: {e}"));
        assert!(n == 1, "{what}: connection closed inside the head");
        buf.push(byte[0]);
    }
    parse_raw_response(&buf).unwrap_or_else(|| panic!("{what}: no response head"))
}

/// Reads one response with a `Content-Length` body (none for `HEAD`) off a keep-alive connection.
pub fn read_response(stream: &mut TcpStream, head: bool, what: &str) -> RawResponse {
    let mut r = read_head(stream, what);
    let len: usize = r
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no Content-Length"));
    if !head {
        r.body = vec![0u8; len];
        stream
            .read_exact(&mut r.body)
            .unwrap_or_else(|e| panic!("{what}: reading {len} body bytes: {e}"));
    }
    r
}

/// Blocking `GET path` with `Connection: close` on a loopback address; `None` if the connection or the
/// response fails. Bodies are returned as sent (no chunked decoding), which suits the registry's
/// manifests (it sends `Content-Length`).
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Option<RawResponse> {
    let mut stream = send_request(addr, "GET", path, headers, b"", Duration::from_secs(10))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    parse_raw_response(&response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::media::accept_all;

    fn check_all_formats(registry: &Registry) {
        for &(repo, tag, media_type) in SEEDED_IMAGES {
            let image = format!("{repo}:{tag}");
            let raw = inspect_raw(&registry.host_port(), &image);
            assert_eq!(manifest_media_type(&raw), media_type, "body of {image}");
            let served = http_get(
                registry.addr(),
                &format!("/v2/{repo}/manifests/{tag}"),
                &[("Accept", accept_all())],
            )
            .unwrap_or_else(|| panic!("GET manifest {image} failed"));
            assert_eq!(served.status, 200, "GET manifest {image}");
            assert_eq!(
                served.header("content-type"),
                Some(media_type),
                "Content-Type of {image}"
            );
            assert_eq!(
                served.body, raw,
                "skopeo and plain GET see different bytes for {image}"
            );
            assert_eq!(
                served.header("docker-content-digest"),
                Some(sha256_digest(&raw).as_str()),
                "Docker-Content-Digest of {image}"
            );
        }
    }

    #[test]
    fn seeded_registry_serves_all_formats() {
        let mut upstream = Registry::start_seeded();
        check_all_formats(&upstream);

        // every child of both lists is there, and the multi-arch children really differ
        for image in [Seeded::MULTI_OCI, Seeded::MULTI_DOCKER] {
            let raw = inspect_raw(&upstream.host_port(), image);
            let index: serde_json::Value = serde_json::from_slice(&raw).expect("index is JSON");
            let children = index["manifests"].as_array().expect("index has manifests");
            let archs: Vec<&str> = children
                .iter()
                .map(|c| {
                    c["platform"]["architecture"]
                        .as_str()
                        .expect("child has a platform")
                })
                .collect();
            assert_eq!(archs, ["amd64", "arm64"], "{image}");
            assert_ne!(
                children[0]["digest"], children[1]["digest"],
                "{image}: children must differ"
            );
            let repo = image.split(':').next().expect("repo:tag");
            for child in children {
                let digest = child["digest"].as_str().expect("child digest");
                let bytes = inspect_raw(&upstream.host_port(), &format!("{repo}@{digest}"));
                assert_eq!(sha256_digest(&bytes), digest, "{image} child");
            }
        }

        // the big image has a layer blob over 100 MiB
        let big: serde_json::Value =
            serde_json::from_slice(&inspect_raw(&upstream.host_port(), Seeded::BIG))
                .expect("big manifest is JSON");
        let largest = big["layers"]
            .as_array()
            .expect("big has layers")
            .iter()
            .map(|l| l["size"].as_u64().expect("layer size"))
            .max()
            .expect("big has a layer");
        assert!(
            largest > 100 * 1024 * 1024,
            "big's largest layer is only {largest} bytes"
        );

        // stop / restart keep port and content; stop is idempotent
        let port = upstream.addr();
        upstream.stop();
        upstream.stop();
        assert!(
            http_get(port, "/v2/", &[]).is_none(),
            "stopped registry still answers"
        );
        upstream.restart();
        assert_eq!(upstream.addr(), port);
        check_all_formats(&upstream);

        // each seeded registry is independent, and an empty one is empty
        let other = Registry::start_seeded();
        assert_ne!(other.addr(), upstream.addr());
        let empty = Registry::start_empty();
        let missing = skopeo_try(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{}/{}", empty.host_port(), Seeded::SMALL_OCI),
        ]);
        assert!(
            !missing.status.success(),
            "empty registry serves {}",
            Seeded::SMALL_OCI
        );
    }

    #[test]
    fn seeded_registry_via_reference_proxy() {
        let upstream = Registry::start_seeded();
        let proxy = Registry::start_proxy(&upstream.url());
        let dest = tempfile::tempdir().expect("temp dir for skopeo copy");
        let out = copy_to_dir(
            &proxy.host_port(),
            Seeded::MULTI_DOCKER,
            &dest.path().join("multi"),
            true,
        );
        assert!(
            out.status.success(),
            "{}",
            describe("skopeo copy --all via proxy", &out)
        );
        assert_eq!(
            inspect_raw(&proxy.host_port(), Seeded::MULTI_DOCKER),
            inspect_raw(&upstream.host_port(), Seeded::MULTI_DOCKER),
            "proxy must serve the upstream's bytes"
        );
        assert!(
            upstream
                .access_log()
                .contains("GET /v2/multi/docker/manifests/latest"),
            "the proxy did not fetch from upstream:\n{}",
            upstream.access_log()
        );
    }
}

//! nginx (Debian package nginx) as a reverse proxy in front of an upstream, on three ports: HTTPS
//! with HTTP/2 (ALPN `h2` or `http/1.1`), HTTPS with HTTP/1.1 only (nginx refuses a handshake whose
//! ALPN offers no protocol it has), and plain HTTP/1.1. The first is what a registry behind a CDN or
//! a load balancer that speaks HTTP/2 looks like. Its access log records each request's port and
//! protocol.
//!
//! nginx runs in the foreground as one process (`daemon off`, `master_process off`) with a private
//! config, pid file, logs and temp paths in a temp dir of its own; it is killed on drop. The
//! certificate is made by [`make_certs`]: clients trust it with the temp dir's `ca.crt`.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use super::certs::make_certs;
use super::clients::{command, require};
use super::daemon::{home_dir, Daemon};
use super::process::free_port;

/// A running nginx proxying every path to one upstream.
pub struct Nginx {
    child: Daemon,
    home: TempDir,
    h2_port: u16,
    tls_port: u16,
    plain_port: u16,
}

impl Nginx {
    /// Starts nginx in front of `upstream` (`127.0.0.1:PORT`, plain HTTP) and waits until its ports
    /// accept connections.
    pub fn start_in_front_of(upstream: SocketAddr) -> Nginx {
        Nginx::start_in_front_of_with(upstream, "")
    }

    /// [`Nginx::start_in_front_of`] with `directives` added to its `location` (e.g. `add_header`
    /// lines, for the headers a registry such as Docker Hub adds to its answers).
    pub fn start_in_front_of_with(upstream: SocketAddr, directives: &str) -> Nginx {
        let home = home_dir("regcache-nginx-");
        let dir = home.path();
        make_certs(dir, "0x4004");
        let (h2_port, tls_port, plain_port) = (free_port(), free_port(), free_port());
        let d = dir.display();
        let http = format!(
            "\
               log_format regcache '$server_port $server_protocol $request_method $request_uri $status $body_bytes_sent';\n\
               access_log {d}/access.log regcache;\n\
               server {{\n\
                 listen 127.0.0.1:{h2_port} ssl http2;\n\
                 listen 127.0.0.1:{tls_port} ssl;\n\
                 listen 127.0.0.1:{plain_port};\n\
                 ssl_certificate {d}/server.crt;\n\
                 ssl_certificate_key {d}/server.key;\n\
                 client_max_body_size 0;\n\
                 location / {{\n\
                   proxy_pass http://{upstream};\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Host $http_host;\n\
                   proxy_buffering off;\n\
                   proxy_request_buffering off;\n\
                   {directives}\n\
                 }}\n\
               }}\n"
        );
        let ports = [h2_port, tls_port, plain_port];
        let up = || {
            ports.iter().all(|p| {
                let addr = SocketAddr::from(([127, 0, 0, 1], *p));
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        };
        Nginx {
            child: run(dir, &http, "all three ports accept connections", up),
            home,
            h2_port,
            tls_port,
            plain_port,
        }
    }

    /// `https://127.0.0.1:PORT`: TLS, HTTP/2 or HTTP/1.1 by ALPN.
    pub fn h2_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.h2_port)
    }

    /// `https://127.0.0.1:PORT`: TLS, HTTP/1.1 only.
    pub fn https11_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.tls_port)
    }

    /// `http://127.0.0.1:PORT`: plain HTTP/1.1.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.plain_port)
    }

    /// The access log's lines for requests to `url` (one of this nginx's URLs).
    pub fn log_lines_of(&self, url: &str) -> Vec<String> {
        let port = url.rsplit(':').next().unwrap_or_default().to_owned();
        self.access_log()
            .lines()
            .filter(|l| l.split(' ').next() == Some(port.as_str()))
            .map(str::to_owned)
            .collect()
    }

    /// The CA that signed the HTTPS certificate (for an upstream's `ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.home.path().join("ca.crt")
    }

    /// One line per request: `PORT PROTOCOL METHOD URI STATUS BYTES`, e.g.
    /// `40123 HTTP/2.0 GET /v2/ 200 2`.
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.home.path().join("access.log")).unwrap_or_default()
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.home.path().join("error.log")).unwrap_or_default()
    }
}

/// A running nginx serving the files of one directory over plain HTTP/1.1, as static files: the
/// reference server for `Range` requests (nginx's range filter, `max_ranges`, `multipart/byteranges`).
pub struct FileServer {
    child: Daemon,
    home: TempDir,
    port: u16,
}

impl FileServer {
    /// Starts nginx serving `root` on `127.0.0.1:PORT`, every file as `application/octet-stream`
    /// (regcache's blob type), with `directives` added to its `http` block (e.g. `max_ranges 64;`).
    pub fn start(root: &std::path::Path, directives: &str) -> FileServer {
        let home = home_dir("regcache-nginx-files-");
        let dir = home.path();
        let port = free_port();
        let (d, r) = (dir.display(), root.display());
        let http = format!(
            "\
               access_log {d}/access.log;\n\
               types {{ }}\n\
               default_type application/octet-stream;\n\
               sendfile on;\n\
               large_client_header_buffers 4 64k;\n\
               {directives}\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 root {r};\n\
               }}\n"
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let up = || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
        FileServer {
            child: run(dir, &http, "its port accepts connections", up),
            home,
            port,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Runs nginx in `dir` (its prefix, pid file, logs and temp paths), with `http` as the body of its
/// `http` block, and waits until `ready` holds; panics with its logs if it does not.
fn run(dir: &std::path::Path, http: &str, ready_when: &str, ready: impl FnMut() -> bool) -> Daemon {
    let nginx = require("nginx", "nginx");
    for tmp in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        fs::create_dir_all(dir.join("tmp").join(tmp)).expect("create an nginx temp dir");
    }
    let d = dir.display();
    let conf = format!(
        "daemon off;\n\
         master_process off;\n\
         worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
           client_body_temp_path {d}/tmp/body;\n\
           proxy_temp_path {d}/tmp/proxy;\n\
           fastcgi_temp_path {d}/tmp/fastcgi;\n\
           uwsgi_temp_path {d}/tmp/uwsgi;\n\
           scgi_temp_path {d}/tmp/scgi;\n\
         {http}\
         }}\n"
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).expect("write nginx.conf");
    let log = fs::File::create(dir.join("stderr.log")).expect("create nginx's stderr log");
    let child = command(&nginx)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf_path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("clone the log file"))
        .stderr(log)
        .spawn()
        .expect("spawn nginx");
    let mut daemon = Daemon::default();
    if let Err(why) = daemon.wait_ready(
        child,
        Duration::from_secs(20),
        Duration::from_millis(50),
        ready_when,
        ready,
    ) {
        panic!(
            "nginx: {why}\n--- error.log ---\n{}\n--- stderr ---\n{}",
            fs::read_to_string(dir.join("error.log")).unwrap_or_default(),
            fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
        );
    }
    daemon
}

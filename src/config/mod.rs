//! Configuration: the TOML file, its defaults, validation, and command-line overrides.
//!
//! The file is deserialized into raw types (`deny_unknown_fields`, so a misspelt key is an error
//! with its line), then [`RawConfig::validate`] turns it into a typed [`Config`]. Every key has a
//! default, so an empty file (or none) is a working configuration.

pub mod source;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::http::access::{AccessConfig, Cidr, Htpasswd, RepoPattern};

/// Docker Hub's registry endpoint, the default upstream.
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";
/// Names under which clients refer to Docker Hub.
pub const DOCKER_HUB_HOSTS: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
/// Data directory when none is configured (systemd's `StateDirectory` wins when set).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/regcache";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub const DEFAULT_UPSTREAM_NAME: &str = "docker";

/// A configuration problem, with the file's name and the line where TOML knows it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// A duration written as `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

/// A size written as `"4MiB"`, `"512KiB"`, `"10GB"`, `"123"` or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// An upstream URL: http or https, no query, no fragment, no credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl(pub reqwest::Url);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?} (expected e.g. \"30s\", \"5m\", \"250ms\")")
    })?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?} (use ms, s, m, h or d)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. \"4MiB\", \"10GB\")"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        u => {
            return Err(format!(
                "invalid size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

pub fn parse_upstream_url(s: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("URL {s:?} must use http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("URL {s:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "URL {s:?} must not hold credentials: use the upstream's username and password keys"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("URL {s:?} must not have a query or fragment"));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(format!(
            "URL {s:?} must be the registry's root (no path): requests go to <url>/v2/…"
        ));
    }
    Ok(url)
}

/// Deserializes a string (or an integer, where `int` accepts one) through `parse`.
struct StrOrInt<F>(F, &'static str);

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> de::Visitor<'de> for StrOrInt<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v < 0 {
            return Err(E::custom(format!("{v} is negative")));
        }
        (self.0)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt(
            |s: &str| parse_duration(s).map(DurationValue),
            "a duration such as \"30s\"",
        ))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt(
            |s: &str| parse_size(s).map(ByteSize),
            "a size such as \"4MiB\"",
        ))
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(StrOrInt(
            |s: &str| parse_upstream_url(s).map(UpstreamUrl),
            "an http(s) URL",
        ))
    }
}

/// The file as written: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<toml::Spanned<String>>,
    pub data_dir: Option<PathBuf>,
    pub default_upstream: Option<toml::Spanned<String>>,
    pub max_manifest_size: Option<ByteSize>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    pub config_store: Option<RawConfigStore>,
    #[serde(default)]
    pub store: RawStore,
    pub tls: Option<RawTls>,
    pub shutdown_grace: Option<DurationValue>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub access: RawAccess,
    pub peers: Option<RawPeers>,
}

/// `[limits]`: bounds on what one client (or all of them) can make regcache do.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub max_header_size: Option<ByteSize>,
    pub max_uri_length: Option<ByteSize>,
    pub header_read_timeout: Option<DurationValue>,
    pub max_fills: Option<usize>,
    pub fill_wait: Option<DurationValue>,
    pub fill_memory: Option<ByteSize>,
    pub max_page: Option<usize>,
}

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Open client connections; more are answered `503` and closed (restart to change).
    pub max_connections: usize,
    /// Largest request head (request line and headers); more gets `431`.
    pub max_header_size: usize,
    /// Longest request target (path and query); longer gets `414`.
    pub max_uri_length: usize,
    /// Time a client has to send a request's headers, and longest idle keep-alive.
    pub header_read_timeout: Duration,
    /// Blob fills from upstreams running at once.
    pub max_fills: usize,
    /// How long a request waits for a fill slot before `503`.
    pub fill_wait: Duration,
    /// Bytes that fills on a full disk may keep in memory, all together, so that later clients
    /// of the same blob can join them; past it a fill streams its blob through.
    pub fill_memory: u64,
    /// Largest `n` on tag lists and the catalog.
    pub max_page: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 4096,
            max_header_size: 32 << 10,
            max_uri_length: 8 << 10,
            header_read_timeout: Duration::from_secs(30),
            max_fills: 64,
            fill_wait: Duration::from_secs(30),
            fill_memory: 256 << 20,
            max_page: 10_000,
        }
    }
}

/// `[access]`: who may use the mirror.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    pub allow: Option<Vec<toml::Spanned<String>>>,
    pub htpasswd: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub expiry_warning: Option<DurationValue>,
}

/// Serve HTTPS with this certificate chain and key (PEM files, reloaded on SIGHUP).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Warn when the certificate ends within this time.
    pub expiry_warning: Duration,
}

/// Default of `tls.expiry_warning`.
pub const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub max_size: Option<ByteSize>,
    pub min_free: Option<ByteSize>,
    pub low_water: Option<u8>,
    pub gc_interval: Option<DurationValue>,
    pub s3: Option<RawS3>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    pub bucket: String,
    pub endpoint: Option<UpstreamUrl>,
    pub region: Option<String>,
    pub prefix: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub secret_access_key_env: Option<String>,
    pub virtual_hosted_style: Option<bool>,
    pub timeout: Option<DurationValue>,
    pub redirect: Option<bool>,
    pub redirect_ttl: Option<DurationValue>,
}

/// The shared S3-compatible bucket behind the local store (`[store.s3]`).
#[derive(Clone, PartialEq)]
pub struct S3Config {
    pub bucket: String,
    /// `None`: AWS S3 itself (the endpoint follows from the region).
    pub endpoint: Option<reqwest::Url>,
    pub region: String,
    /// Key prefix inside the bucket, without slashes at either end ("" for none).
    pub prefix: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub virtual_hosted_style: bool,
    /// Bound on one bucket request (a blob download is bounded per chunk instead).
    pub timeout: Duration,
    /// Answer GETs of blobs held by the bucket with a redirect to a presigned URL.
    pub redirect: bool,
    pub redirect_ttl: Duration,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint.as_ref().map(|u| u.as_str()))
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<hidden>"),
            )
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("timeout", &self.timeout)
            .field("redirect", &self.redirect)
            .field("redirect_ttl", &self.redirect_ttl)
            .finish()
    }
}

/// `[peers]`: the other regcache servers of a fleet, which fill from each other.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeers {
    pub urls: Vec<toml::Spanned<String>>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub connect_timeout: Option<DurationValue>,
}

/// The fleet (`[peers]`): the same list on every server, itself included.
#[derive(Clone, PartialEq)]
pub struct PeersConfig {
    /// Base URLs of the servers of the fleet (`http(s)://host:port/`), in the order written.
    pub urls: Vec<reqwest::Url>,
    /// The shared secret peer requests carry (`x-regcache-peer-token`).
    pub token: String,
    /// A peer that does not accept a connection (or answer a probe) within this is skipped.
    pub connect_timeout: Duration,
}

impl fmt::Debug for PeersConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeersConfig")
            .field(
                "urls",
                &self.urls.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            )
            .field("token", &"<hidden>")
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Size limits of the store and how often they are enforced.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// Evict least recently used content when the store holds more than this.
    pub max_size: Option<u64>,
    /// Evict when the filesystem has less than this free.
    pub min_free: Option<u64>,
    /// Percent of `max_size` to evict down to.
    pub low_water: u8,
    /// Time between two background checks of the limits (and access-time flushes).
    pub gc_interval: Duration,
    /// The shared bucket tier, when configured (`max_size` then caps the local tier).
    pub s3: Option<S3Config>,
}

/// Which remote config store holds the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigStoreKind {
    /// etcd v3, through its JSON gateway (`/v3/kv/range`).
    Etcd,
    /// Consul KV (`/v1/kv/<key>`, blocking queries).
    Consul,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfigStore {
    pub kind: ConfigStoreKind,
    pub url: UpstreamUrl,
    pub key: String,
    pub poll_interval: Option<DurationValue>,
    pub timeout: Option<DurationValue>,
}

/// Where the optional remote overlay lives. Never needed to start.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigStoreConfig {
    pub kind: ConfigStoreKind,
    pub url: reqwest::Url,
    pub key: String,
    /// etcd: time between two reads; consul: longest wait of a blocking query.
    pub poll_interval: Duration,
    /// Bound on one request to the store.
    pub timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: UpstreamUrl,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub freshness: Option<DurationValue>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub connect_timeout: Option<DurationValue>,
    pub header_timeout: Option<DurationValue>,
    pub idle_timeout: Option<DurationValue>,
    pub failure_threshold: Option<u32>,
    pub probe_max_interval: Option<DurationValue>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_repos: Vec<toml::Spanned<String>>,
    #[serde(default)]
    pub deny_repos: Vec<toml::Spanned<String>>,
    pub allow_private_redirects: Option<bool>,
}

/// Basic credentials for an upstream (also used to obtain Bearer tokens).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// One validated upstream registry.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: reqwest::Url,
    /// Host names clients use for this registry (`?ns=`, leading path segment).
    pub hosts: Vec<String>,
    /// Whether Docker Hub's `library/` rule applies to single-component names.
    pub docker_hub_names: bool,
    pub freshness: Duration,
    pub credentials: Option<Credentials>,
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Consecutive failures after which the upstream is marked down.
    pub failure_threshold: u32,
    /// Longest wait between two background probes of a down upstream.
    pub probe_max_interval: Duration,
    /// Extra CA certificates (PEM) trusted for this upstream, besides the system's and the
    /// built-in roots.
    pub ca_file: Option<PathBuf>,
    /// Repositories this upstream may be asked for (empty: all), as glob patterns.
    pub allow_repos: Vec<RepoPattern>,
    /// Repositories never asked for (wins over `allow_repos`).
    pub deny_repos: Vec<RepoPattern>,
    /// Follow redirects (and token realms) to loopback, private or link-local addresses even
    /// when the upstream itself is not on such an address.
    pub allow_private_redirects: bool,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub upstreams: Vec<UpstreamConfig>,
    /// Index into `upstreams` of the one answering requests with no host.
    pub default_upstream: usize,
    pub max_manifest_size: u64,
    pub log_level: String,
    pub log_format: LogFormat,
    pub config_store: Option<ConfigStoreConfig>,
    pub store: StoreConfig,
    pub tls: Option<TlsConfig>,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    pub limits: LimitsConfig,
    pub access: AccessConfig,
    /// The fleet this server fills from and serves (`[peers]`).
    pub peers: Option<PeersConfig>,
    /// Whether a password is written in the config text itself (for the file mode warning).
    pub inline_password: bool,
    /// Problems worth a warning that do not stop regcache (files others can read, …).
    pub warnings: Vec<String>,
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub upstream: Option<reqwest::Url>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string(), overrides)?;
        config.check_file_mode(path);
        Ok(config)
    }

    /// Adds a warning when the config file holds a password and its group or others can read
    /// it. Call it with the file the configuration was read from.
    pub fn check_file_mode(&mut self, path: &Path) {
        if self.inline_password {
            if let Some(w) = readable_by_others(path, 0o044, "holds a password or secret key") {
                self.warnings.push(w);
            }
        }
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        raw.validate(text, overrides)
            .map_err(|message| ConfigError::Invalid {
                origin: origin.to_owned(),
                message,
            })
    }

    /// The local file's text overlaid with a remote config store's TOML (tables merged key by
    /// key, the remote winning). The remote layer may not configure the config store itself.
    pub fn parse_layered(
        local: &str,
        local_origin: &str,
        remote: &str,
        remote_origin: &str,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        // The local file must be valid on its own: it is what starts regcache.
        Config::parse(local, local_origin, overrides)?;
        let invalid = |origin: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            message,
        };
        let mut base: toml::Table = toml::from_str(local)
            .map_err(|e| invalid(local_origin, e.to_string().trim_end().to_owned()))?;
        let top: toml::Table = toml::from_str(remote)
            .map_err(|e| invalid(remote_origin, e.to_string().trim_end().to_owned()))?;
        if top.contains_key("config_store") {
            return Err(invalid(
                remote_origin,
                "config_store can only be set in the local file".into(),
            ));
        }
        merge_tables(&mut base, top);
        let merged = toml::to_string(&base)
            .map_err(|e| invalid(remote_origin, format!("cannot merge: {e}")))?;
        Config::parse(
            &merged,
            &format!("{local_origin} overlaid with {remote_origin}"),
            overrides,
        )
    }

    /// The built-in configuration (no file), with overrides.
    pub fn defaults(overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::parse("", "(defaults)", overrides)
    }

    pub fn default_upstream(&self) -> &UpstreamConfig {
        &self.upstreams[self.default_upstream]
    }
}

/// Merges `top` into `base`: tables key by key, anything else replaced.
fn merge_tables(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge_tables(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A warning when `path` has any of the permission bits in `bits` (0o044: group or others can
/// read it; 0o004: others can).
pub fn readable_by_others(path: &Path, bits: u32, what: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mode = std::fs::metadata(path).ok()?.mode() & 0o777;
    (mode & bits != 0).then(|| {
        let who = if bits & 0o040 != 0 { "its group or other users" } else { "other users" };
        format!(
            "{} {what} and {who} can read it (mode {mode:04o}); restrict it, for example with chmod 600",
            path.display()
        )
    })
}

fn spanned_line(text: &str, s: &toml::Spanned<String>) -> usize {
    line_of(text, s.span().start)
}

/// Parses a list of repository patterns, naming the key and line of a bad one.
fn repo_patterns(
    text: &str,
    key: &str,
    list: &[toml::Spanned<String>],
) -> Result<Vec<RepoPattern>, String> {
    list.iter()
        .map(|p| {
            p.get_ref()
                .parse()
                .map_err(|e| format!("line {}: {key}: {e}", spanned_line(text, p)))
        })
        .collect()
}

/// Reads a secret from the environment variable named by `key` (`what` names the key in errors).
fn secret_from_env(what: &str, var: &str) -> Result<String, String> {
    if var.is_empty() || !var.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        return Err(format!(
            "{what}: {var:?} is not an environment variable name"
        ));
    }
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => Ok(p),
        Ok(_) => Err(format!("{what}: the environment variable {var} is empty")),
        Err(_) => Err(format!(
            "{what}: the environment variable {var} is not set (or not UTF-8)"
        )),
    }
}

fn validate_s3(raw: RawS3, inline_password: &mut bool) -> Result<S3Config, String> {
    let b = &raw.bucket;
    let valid_bucket = (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid_bucket {
        return Err(format!(
            "store.s3.bucket = {b:?} is not a bucket name (3 to 63 of a-z, 0-9, '-' and '.')"
        ));
    }
    if let Some(e) = &raw.endpoint {
        if e.0.query().is_some() || e.0.path() != "/" {
            return Err(format!(
                "store.s3.endpoint = {:?} must be a bare scheme://host[:port] URL",
                e.0.as_str()
            ));
        }
    }
    let region = raw.region.unwrap_or_else(|| "us-east-1".into());
    if region.is_empty()
        || !region
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
    {
        return Err(format!("store.s3.region = {region:?} is not a region name"));
    }
    let prefix = raw.prefix.unwrap_or_default().trim_matches('/').to_owned();
    if prefix.split('/').any(|s| s == "." || s == "..")
        || prefix.contains("//")
        || prefix.chars().any(|c| c.is_control())
    {
        return Err(format!("store.s3.prefix = {prefix:?} is not a key prefix"));
    }
    let secret = match (raw.secret_access_key, raw.secret_access_key_env) {
        (Some(_), Some(_)) => {
            return Err("store.s3: set one of secret_access_key and secret_access_key_env".into())
        }
        (Some(s), None) => {
            *inline_password = true;
            Some(s)
        }
        (None, Some(var)) => Some(secret_from_env("store.s3.secret_access_key_env", &var)?),
        (None, None) => None,
    };
    if secret.is_some() != raw.access_key_id.is_some() {
        return Err(
            "store.s3: access_key_id and a secret go together (set both, or neither to use \
             AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance's role)"
                .into(),
        );
    }
    let timeout = raw.timeout.map_or(Duration::from_secs(5), |d| d.0);
    if timeout < Duration::from_millis(10) {
        return Err("store.s3.timeout must be at least 10ms".into());
    }
    let redirect_ttl = raw.redirect_ttl.map_or(Duration::from_secs(900), |d| d.0);
    if redirect_ttl < Duration::from_secs(1) || redirect_ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err("store.s3.redirect_ttl must be from 1s to 7 days".into());
    }
    Ok(S3Config {
        bucket: raw.bucket,
        endpoint: raw.endpoint.map(|e| e.0),
        region,
        prefix,
        access_key_id: raw.access_key_id,
        secret_access_key: secret,
        virtual_hosted_style: raw.virtual_hosted_style.unwrap_or(false),
        timeout,
        redirect: raw.redirect.unwrap_or(false),
        redirect_ttl,
    })
}

fn validate_limits(raw: RawLimits) -> Result<LimitsConfig, String> {
    let d = LimitsConfig::default();
    let size = |v: Option<ByteSize>, default: usize| -> Result<usize, String> {
        match v {
            None => Ok(default),
            Some(b) => usize::try_from(b.0).map_err(|_| format!("{} is too large", b.0)),
        }
    };
    let limits = LimitsConfig {
        max_connections: raw.max_connections.unwrap_or(d.max_connections),
        max_header_size: size(raw.max_header_size, d.max_header_size)
            .map_err(|e| format!("limits.max_header_size: {e}"))?,
        max_uri_length: size(raw.max_uri_length, d.max_uri_length)
            .map_err(|e| format!("limits.max_uri_length: {e}"))?,
        header_read_timeout: raw
            .header_read_timeout
            .map_or(d.header_read_timeout, |v| v.0),
        max_fills: raw.max_fills.unwrap_or(d.max_fills),
        fill_wait: raw.fill_wait.map_or(d.fill_wait, |v| v.0),
        fill_memory: raw.fill_memory.map_or(d.fill_memory, |v| v.0),
        max_page: raw.max_page.unwrap_or(d.max_page),
    };
    if !(1..=1_000_000).contains(&limits.max_connections) {
        return Err("limits.max_connections must be from 1 to 1000000".into());
    }
    if !(1024..=(16 << 20)).contains(&limits.max_header_size) {
        return Err("limits.max_header_size must be from 1KiB to 16MiB".into());
    }
    if !(256..=65_534).contains(&limits.max_uri_length) {
        return Err("limits.max_uri_length must be from 256 to 65534 bytes".into());
    }
    if limits.header_read_timeout.is_zero()
        || limits.header_read_timeout > Duration::from_secs(3600)
    {
        return Err("limits.header_read_timeout must be more than 0 and at most 1h".into());
    }
    if !(1..=100_000).contains(&limits.max_fills) {
        return Err("limits.max_fills must be from 1 to 100000".into());
    }
    if limits.fill_wait > Duration::from_secs(3600) {
        return Err("limits.fill_wait must be at most 1h".into());
    }
    if limits.fill_memory > 1 << 40 {
        return Err("limits.fill_memory must be at most 1TiB".into());
    }
    if !(1..=1_000_000).contains(&limits.max_page) {
        return Err("limits.max_page must be from 1 to 1000000".into());
    }
    Ok(limits)
}

fn validate_access(
    text: &str,
    raw: RawAccess,
    warnings: &mut Vec<String>,
) -> Result<AccessConfig, String> {
    let allow = match raw.allow {
        None => Vec::new(),
        Some(list) if list.is_empty() => {
            return Err(
                "access.allow is empty, which would refuse every client: remove the key to allow                  every address"
                    .into(),
            )
        }
        Some(list) => list
            .iter()
            .map(|c| {
                c.get_ref()
                    .parse::<Cidr>()
                    .map_err(|e| format!("line {}: access.allow: {e}", spanned_line(text, c)))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let htpasswd = match raw.htpasswd {
        None => None,
        Some(path) => {
            let h = Htpasswd::load(&path).map_err(|e| format!("access.htpasswd: {e}"))?;
            if h.is_empty() {
                return Err(format!(
                    "access.htpasswd: {} has no users, which would refuse every client",
                    path.display()
                ));
            }
            if let Some(w) = readable_by_others(&path, 0o004, "holds password hashes") {
                warnings.push(w);
            }
            Some(std::sync::Arc::new(h))
        }
    };
    Ok(AccessConfig { allow, htpasswd })
}

/// `[peers]`: each URL a registry root with a host (and a port, written or the scheme's), no two
/// alike; exactly one source of the token, which must be readable, non-empty, and fit a header.
fn validate_peers(
    text: &str,
    raw: RawPeers,
    warnings: &mut Vec<String>,
) -> Result<PeersConfig, String> {
    if raw.urls.is_empty() {
        return Err(
            "peers.urls is empty: list every server of the fleet, this one included".into(),
        );
    }
    let mut urls: Vec<reqwest::Url> = Vec::new();
    for u in &raw.urls {
        let line = spanned_line(text, u);
        let url =
            parse_upstream_url(u.get_ref()).map_err(|e| format!("line {line}: peers.urls: {e}"))?;
        if url.port_or_known_default().is_none() {
            return Err(format!(
                "line {line}: peers.urls: {:?} has no port",
                u.get_ref()
            ));
        }
        if urls.contains(&url) {
            return Err(format!(
                "line {line}: peers.urls: {:?} is listed twice",
                u.get_ref()
            ));
        }
        urls.push(url);
    }
    let token =
        match (&raw.token_file, &raw.token_env) {
            (Some(_), Some(_)) => return Err("peers: set one of token_file and token_env".into()),
            (None, None) => return Err(
                "peers: a shared token is required (token_file or token_env): peers answer only \
                 requests that carry it"
                    .into(),
            ),
            (Some(file), None) => {
                let t = std::fs::read_to_string(file)
                    .map_err(|e| format!("peers.token_file: cannot read {}: {e}", file.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
                if let Some(w) = readable_by_others(file, 0o044, "holds the peer token") {
                    warnings.push(format!("peers.token_file: {w}"));
                }
                if t.is_empty() {
                    return Err(format!("peers.token_file: {} is empty", file.display()));
                }
                t
            }
            (None, Some(var)) => secret_from_env("peers.token_env", var)?,
        };
    if !token.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(
            "peers: the token must be printable ASCII without spaces (it travels in a header)"
                .into(),
        );
    }
    let connect_timeout = raw
        .connect_timeout
        .map_or(Duration::from_millis(250), |d| d.0);
    if connect_timeout < Duration::from_millis(1) || connect_timeout > Duration::from_secs(60) {
        return Err("peers.connect_timeout must be from 1ms to 60s".into());
    }
    Ok(PeersConfig {
        urls,
        token,
        connect_timeout,
    })
}

fn default_data_dir() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated; the first is ours.
        Some(v) if !v.is_empty() => {
            let s = v.to_string_lossy();
            PathBuf::from(s.split(':').next().unwrap_or(DEFAULT_DATA_DIR))
        }
        _ => PathBuf::from(DEFAULT_DATA_DIR),
    }
}

/// A data directory must be an absolute path without `..` that is not `/` or another system
/// directory: regcache creates files there and deletes some (`tmp/`, evicted blobs). Whether the
/// directory is regcache's is decided when the store opens it (`store::MARKER`).
fn check_data_dir(dir: &Path) -> Result<(), String> {
    use std::path::Component;
    let shown = format!("{:?}", dir.display().to_string());
    if dir.as_os_str().is_empty() {
        return Err(format!(
            "data_dir = {shown} is empty: set an absolute path such as \"{DEFAULT_DATA_DIR}\", or \
             remove the key to use the default"
        ));
    }
    if !dir.is_absolute() {
        return Err(format!(
            "data_dir = {shown} is relative: set an absolute path such as \"{DEFAULT_DATA_DIR}\""
        ));
    }
    if dir.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "data_dir = {shown} contains \"..\": write the directory's path without it"
        ));
    }
    if crate::store::is_system_directory(dir) {
        return Err(format!(
            "data_dir = {shown} is a system directory: regcache deletes files in its data \
             directory, so give it a directory of its own, such as \"{DEFAULT_DATA_DIR}\""
        ));
    }
    Ok(())
}

impl RawConfig {
    /// Checks everything serde could not, fills defaults and applies overrides.
    pub fn validate(self, text: &str, o: &Overrides) -> Result<Config, String> {
        let listen = match (&o.listen, &self.listen) {
            (Some(a), _) => *a,
            (None, Some(s)) => s.get_ref().parse().map_err(|e| {
                format!(
                    "line {}: listen = {:?} is not an address such as \"127.0.0.1:5000\": {e}",
                    line_of(text, s.span().start),
                    s.get_ref()
                )
            })?,
            (None, None) => DEFAULT_LISTEN.parse().map_err(|e| format!("{e}"))?,
        };
        let data_dir = o
            .data_dir
            .clone()
            .or(self.data_dir)
            .unwrap_or_else(default_data_dir);
        check_data_dir(&data_dir)?;
        let max_manifest_size = self.max_manifest_size.map_or(4 << 20, |b| b.0);
        if max_manifest_size == 0 {
            return Err("max_manifest_size must be more than 0".into());
        }

        let mut raw_upstreams = self.upstreams;
        let default_name = match &self.default_upstream {
            Some(s) => {
                if !raw_upstreams.contains_key(s.get_ref()) {
                    return Err(format!(
                        "line {}: default_upstream = {:?} names no [upstreams.{}] table",
                        line_of(text, s.span().start),
                        s.get_ref(),
                        s.get_ref()
                    ));
                }
                s.get_ref().clone()
            }
            None if raw_upstreams.len() == 1 => raw_upstreams
                .keys()
                .next()
                .cloned()
                .unwrap_or_else(|| DEFAULT_UPSTREAM_NAME.into()),
            None => DEFAULT_UPSTREAM_NAME.to_owned(),
        };
        if !raw_upstreams.contains_key(&default_name) {
            let url = parse_upstream_url(DOCKER_HUB_URL)?;
            raw_upstreams.insert(
                default_name.clone(),
                RawUpstream {
                    url: UpstreamUrl(url),
                    hosts: Vec::new(),
                    freshness: None,
                    username: None,
                    password: None,
                    password_file: None,
                    password_env: None,
                    connect_timeout: None,
                    header_timeout: None,
                    idle_timeout: None,
                    failure_threshold: None,
                    probe_max_interval: None,
                    ca_file: None,
                    allow_repos: Vec::new(),
                    deny_repos: Vec::new(),
                    allow_private_redirects: None,
                },
            );
        }
        if let (Some(url), Some(u)) = (&o.upstream, raw_upstreams.get_mut(&default_name)) {
            u.url = UpstreamUrl(url.clone());
        }
        // Docker Hub's names belong to the default upstream unless another claims them.
        let hub_claimed = raw_upstreams.values().any(|u| {
            u.hosts
                .iter()
                .any(|h| DOCKER_HUB_HOSTS.contains(&h.as_str()))
        });

        let mut warnings = Vec::new();
        let mut inline_password = false;
        let mut upstreams = Vec::new();
        let mut default_upstream = 0;
        let mut seen_hosts: BTreeMap<String, String> = BTreeMap::new();
        for (name, raw) in raw_upstreams {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                return Err(format!(
                    "[upstreams.{name}]: upstream names use letters, digits, '-' and '_'"
                ));
            }
            let mut hosts: Vec<String> = raw.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
            if let Some(h) = raw.url.0.host_str() {
                let with_port = match raw.url.0.port() {
                    Some(p) => format!("{h}:{p}"),
                    None => h.to_owned(),
                };
                hosts.push(with_port.to_ascii_lowercase());
            }
            if name == default_name && !hub_claimed {
                hosts.extend(DOCKER_HUB_HOSTS.iter().map(|h| h.to_string()));
            }
            // Configured hosts first (the first names the upstream in the catalog), no repeats.
            let mut seen = std::collections::HashSet::new();
            hosts.retain(|h| seen.insert(h.clone()));
            for h in &hosts {
                if h.is_empty() || h.contains('/') || h.contains(char::is_whitespace) {
                    return Err(format!("upstreams.{name}.hosts: {h:?} is not a host name"));
                }
                if let Some(other) = seen_hosts.insert(h.clone(), name.clone()) {
                    return Err(format!(
                        "upstreams.{name}.hosts: host {h:?} is already served by [upstreams.{other}]"
                    ));
                }
            }
            let sources = [
                raw.password.is_some(),
                raw.password_file.is_some(),
                raw.password_env.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if sources > 1 {
                return Err(format!(
                    "upstreams.{name}: set one of password, password_file and password_env"
                ));
            }
            if raw.username.is_some() != (sources == 1) {
                return Err(format!(
                    "upstreams.{name}: username needs one of password, password_file or \
                     password_env, and they need a username"
                ));
            }
            let password = if let Some(p) = raw.password {
                inline_password = true;
                Some(p)
            } else if let Some(file) = &raw.password_file {
                let p = std::fs::read_to_string(file)
                    .map_err(|e| {
                        format!(
                            "upstreams.{name}.password_file: cannot read {}: {e}",
                            file.display()
                        )
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
                if let Some(w) = readable_by_others(file, 0o044, "holds an upstream password") {
                    warnings.push(format!("upstreams.{name}.password_file: {w}"));
                }
                Some(p)
            } else if let Some(var) = &raw.password_env {
                Some(secret_from_env(
                    &format!("upstreams.{name}.password_env"),
                    var,
                )?)
            } else {
                None
            };
            let credentials = match (raw.username, password) {
                (Some(username), Some(password)) => Some(Credentials { username, password }),
                _ => None,
            };
            let allow_repos = repo_patterns(
                text,
                &format!("upstreams.{name}.allow_repos"),
                &raw.allow_repos,
            )?;
            let deny_repos = repo_patterns(
                text,
                &format!("upstreams.{name}.deny_repos"),
                &raw.deny_repos,
            )?;
            if name == default_name {
                default_upstream = upstreams.len();
            }
            let ca_file = match raw.ca_file {
                None => None,
                Some(path) => {
                    let pem = std::fs::read(&path).map_err(|e| {
                        format!(
                            "upstreams.{name}.ca_file: cannot read {}: {e}",
                            path.display()
                        )
                    })?;
                    match reqwest::Certificate::from_pem_bundle(&pem) {
                        Ok(c) if !c.is_empty() => Some(path),
                        Ok(_) => {
                            return Err(format!(
                                "upstreams.{name}.ca_file: no certificate in {}",
                                path.display()
                            ))
                        }
                        Err(e) => {
                            return Err(format!(
                                "upstreams.{name}.ca_file: invalid PEM in {}: {e}",
                                path.display()
                            ))
                        }
                    }
                }
            };
            let docker_hub_names = hosts.iter().any(|h| h == "docker.io");
            upstreams.push(UpstreamConfig {
                name,
                url: raw.url.0,
                hosts,
                docker_hub_names,
                freshness: raw.freshness.map_or(Duration::from_secs(60), |d| d.0),
                credentials,
                connect_timeout: raw.connect_timeout.map_or(Duration::from_secs(5), |d| d.0),
                header_timeout: raw.header_timeout.map_or(Duration::from_secs(30), |d| d.0),
                idle_timeout: raw.idle_timeout.map_or(Duration::from_secs(30), |d| d.0),
                failure_threshold: raw.failure_threshold.unwrap_or(3),
                probe_max_interval: raw
                    .probe_max_interval
                    .map_or(Duration::from_secs(30), |d| d.0),
                ca_file,
                allow_repos,
                deny_repos,
                allow_private_redirects: raw.allow_private_redirects.unwrap_or(false),
            });
        }
        for u in &upstreams {
            for (key, d) in [
                ("connect_timeout", u.connect_timeout),
                ("header_timeout", u.header_timeout),
                ("idle_timeout", u.idle_timeout),
                ("probe_max_interval", u.probe_max_interval),
            ] {
                if d.is_zero() {
                    return Err(format!("upstreams.{}.{key} must be more than 0", u.name));
                }
            }
            if u.failure_threshold == 0 {
                return Err(format!(
                    "upstreams.{}.failure_threshold must be at least 1",
                    u.name
                ));
            }
        }
        let log_level = o
            .log_level
            .clone()
            .or(self.log.level)
            .unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| format!("log.level = {log_level:?} is not a valid filter: {e}"))?;
        let config_store = match self.config_store {
            None => None,
            Some(cs) => {
                if cs.key.is_empty() || cs.key.contains(char::is_whitespace) {
                    return Err(format!("config_store.key {:?} is not a key", cs.key));
                }
                for (k, d) in [("poll_interval", cs.poll_interval), ("timeout", cs.timeout)] {
                    if d.is_some_and(|d| d.0 < Duration::from_millis(1)) {
                        return Err(format!("config_store.{k} must be at least 1ms"));
                    }
                }
                Some(ConfigStoreConfig {
                    kind: cs.kind,
                    url: cs.url.0,
                    key: cs.key.clone(),
                    poll_interval: cs.poll_interval.map_or(Duration::from_secs(5), |d| d.0),
                    timeout: cs.timeout.map_or(Duration::from_secs(2), |d| d.0),
                })
            }
        };
        let low_water = self.store.low_water.unwrap_or(90);
        if !(1..=100).contains(&low_water) {
            return Err(format!(
                "store.low_water = {low_water} must be a percentage from 1 to 100"
            ));
        }
        let gc_interval = self
            .store
            .gc_interval
            .map_or(Duration::from_secs(10), |d| d.0);
        if gc_interval.is_zero() {
            return Err("store.gc_interval must be more than 0".into());
        }
        let limits = validate_limits(self.limits)?;
        let access = validate_access(text, self.access, &mut warnings)?;
        let peers = match self.peers {
            None => None,
            Some(raw) => Some(validate_peers(text, raw, &mut warnings)?),
        };
        let s3 = match self.store.s3 {
            None => None,
            Some(raw) => Some(validate_s3(raw, &mut inline_password)?),
        };
        let store = StoreConfig {
            max_size: self.store.max_size.map(|b| b.0).filter(|b| *b > 0),
            min_free: self.store.min_free.map(|b| b.0).filter(|b| *b > 0),
            low_water,
            gc_interval,
            s3,
        };
        Ok(Config {
            listen,
            data_dir,
            upstreams,
            default_upstream,
            max_manifest_size,
            log_level,
            log_format: o.log_format.or(self.log.format).unwrap_or_default(),
            config_store,
            store,
            tls: match self.tls {
                None => None,
                Some(t) => {
                    // Read now, so that a bad file, or a certificate that clients would refuse
                    // (expired, not yet valid), is a configuration error (exit 2).
                    let loaded = crate::http::tls::CertReloader::new(&t.cert, &t.key)
                        .map_err(|e| format!("[tls]: {e:#}"))?;
                    let expiry_warning = t.expiry_warning.map_or(DEFAULT_EXPIRY_WARNING, |d| d.0);
                    warnings.extend(crate::http::tls::expiry_warning(
                        &t.cert,
                        loaded.not_after(),
                        crate::http::tls::unix_now(),
                        expiry_warning,
                    ));
                    Some(TlsConfig {
                        cert: t.cert,
                        key: t.key,
                        expiry_warning,
                    })
                }
            },
            shutdown_grace: self.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0),
            limits,
            access,
            peers,
            inline_password,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, "test.toml", &Overrides::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_config_has_working_defaults() {
        let c = parse("").expect("defaults");
        assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.upstreams.len(), 1);
        let d = c.default_upstream();
        assert_eq!(d.url.as_str(), "https://registry-1.docker.io/");
        assert!(d.hosts.iter().any(|h| h == "docker.io"));
        assert!(d.docker_hub_names);
        assert_eq!(d.freshness, Duration::from_secs(60));
        assert_eq!(c.max_manifest_size, 4 << 20);
    }

    #[test]
    fn data_dir_must_be_absolute_and_not_a_system_directory() {
        for bad in [
            "",
            ".",
            "data",
            "./data",
            "var/lib/regcache",
            "/",
            "//",
            "/etc",
            "/etc/",
            "/usr",
            "/usr/./",
            "/tmp",
            "/var",
            "/var/lib",
            "/var/tmp",
            "/home",
            "/root",
            "/bin",
            "/usr/local",
            "/var/lib/../../etc",
            "/srv/../tmp",
        ] {
            let e = parse(&format!("data_dir = {bad:?}\n")).expect_err(bad);
            assert!(
                e.contains("data_dir") && e.contains(&format!("{bad:?}")),
                "data_dir = {bad:?}: {e}"
            );
            // The flag gets the same checks as the file.
            let o = Overrides {
                data_dir: Some(PathBuf::from(bad)),
                ..Default::default()
            };
            let e = Config::parse("", "t", &o).expect_err(bad).to_string();
            assert!(e.contains("data_dir"), "--data-dir {bad:?}: {e}");
        }
        for good in [
            "/var/lib/regcache",
            "/srv/regcache/",
            "/data",
            "/tmp/regcache",
        ] {
            let c = parse(&format!("data_dir = {good:?}\n")).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.data_dir, PathBuf::from(good));
        }
    }

    #[test]
    fn upstream_flag_replaces_default_upstream_url() {
        let o = Overrides {
            upstream: Some(parse_upstream_url("http://127.0.0.1:5001").expect("url")),
            ..Default::default()
        };
        let c = Config::parse("", "t", &o).expect("valid");
        assert_eq!(c.default_upstream().url.as_str(), "http://127.0.0.1:5001/");
        assert!(c.default_upstream().hosts.iter().any(|h| h == "docker.io"));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = parse("listen = \"127.0.0.1:1\"\nlisten_addr = 3\n").expect_err("unknown key");
        assert!(e.contains("line 2") && e.contains("listen_addr"), "{e}");
        let e = parse("[upstreams.a]\nurl = \"https://x.io\"\nfreshnes = \"1s\"\n")
            .expect_err("unknown key");
        assert!(e.contains("line 3") && e.contains("freshnes"), "{e}");
    }

    #[test]
    fn bad_urls_sizes_and_durations_name_the_line() {
        let e = parse("[upstreams.a]\nurl = \"ftp://x.io\"\n").expect_err("bad scheme");
        assert!(e.contains("line 2") && e.contains("http or https"), "{e}");
        let e = parse("max_manifest_size = \"4 parsecs\"\n").expect_err("bad size");
        assert!(e.contains("line 1") && e.contains("size"), "{e}");
        let e = parse("[upstreams.a]\nurl = \"https://x.io\"\nfreshness = \"soon\"\n")
            .expect_err("bad duration");
        assert!(e.contains("line 3") && e.contains("duration"), "{e}");
        let e = parse("listen = \"localhost\"\n").expect_err("bad listen");
        assert!(e.contains("line 1") && e.contains("listen"), "{e}");
        let e = parse("default_upstream = \"nope\"\n").expect_err("bad default");
        assert!(e.contains("line 1") && e.contains("nope"), "{e}");
    }

    #[test]
    fn several_upstreams_with_hosts() {
        let c = parse(
            "default_upstream = \"hub\"\n\
             [upstreams.hub]\nurl = \"http://127.0.0.1:1\"\nfreshness = \"5m\"\n\
             [upstreams.ghcr]\nurl = \"https://ghcr.io\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .expect("valid");
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.default_upstream().name, "hub");
        assert_eq!(c.default_upstream().freshness, Duration::from_secs(300));
        let ghcr = c.upstreams.iter().find(|u| u.name == "ghcr").expect("ghcr");
        assert_eq!(ghcr.hosts, vec!["ghcr.io".to_string()]);
        assert!(!ghcr.docker_hub_names);
        assert!(format!("{:?}", ghcr.credentials).contains("redacted"));
        let e = parse(
            "[upstreams.a]\nurl = \"https://a.io\"\nhosts = [\"x.io\"]\n\
             [upstreams.b]\nurl = \"https://x.io\"\n",
        )
        .expect_err("duplicate host");
        assert!(e.contains("x.io"), "{e}");
    }

    #[test]
    fn remote_overlay_merges_tables_and_keeps_local_keys() {
        let local = "listen = \"127.0.0.1:7000\"\n[upstreams.docker]\nurl = \"http://127.0.0.1:1\"\nfreshness = \"10s\"\n\
                     [config_store]\nkind = \"etcd\"\nurl = \"http://127.0.0.1:2379\"\nkey = \"/regcache\"\n";
        let remote =
            "[upstreams.docker]\nfreshness = \"5m\"\n[upstreams.ghcr]\nurl = \"https://ghcr.io\"\n";
        let c = Config::parse_layered(local, "local", remote, "etcd", &Overrides::default())
            .expect("valid overlay");
        assert_eq!(c.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.default_upstream().url.as_str(), "http://127.0.0.1:1/");
        assert_eq!(c.default_upstream().freshness, Duration::from_secs(300));
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(
            c.config_store.as_ref().map(|s| s.key.as_str()),
            Some("/regcache")
        );
        let e = Config::parse_layered(
            local,
            "local",
            "[upstreams.docker]\nfreshness = 3\nbogus = 1\n",
            "etcd",
            &Overrides::default(),
        )
        .expect_err("unknown key in the overlay");
        assert!(
            e.to_string().contains("bogus") && e.to_string().contains("etcd"),
            "{e}"
        );
        let e = Config::parse_layered(
            local,
            "local",
            "[config_store]\nkey = \"x\"\n",
            "etcd",
            &Overrides::default(),
        )
        .expect_err("config_store from remote");
        assert!(e.to_string().contains("local file"), "{e}");
    }

    #[test]
    fn limits_have_defaults_and_bounds() {
        let c = parse("").expect("defaults");
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.limits.max_page, 10_000);
        let c = parse(
            "[limits]\nmax_connections = 10\nmax_header_size = \"8KiB\"\nmax_uri_length = 1024\n\
             header_read_timeout = \"2s\"\nmax_fills = 3\nfill_wait = 0\nfill_memory = \"64MiB\"\n\
             max_page = 50\n",
        )
        .expect("valid");
        assert_eq!(
            c.limits,
            LimitsConfig {
                max_connections: 10,
                max_header_size: 8192,
                max_uri_length: 1024,
                header_read_timeout: Duration::from_secs(2),
                max_fills: 3,
                fill_wait: Duration::ZERO,
                fill_memory: 64 << 20,
                max_page: 50,
            }
        );
        for (text, key) in [
            ("[limits]\nmax_connections = 0\n", "max_connections"),
            ("[limits]\nmax_header_size = 100\n", "max_header_size"),
            ("[limits]\nmax_uri_length = 100000\n", "max_uri_length"),
            ("[limits]\nheader_read_timeout = 0\n", "header_read_timeout"),
            ("[limits]\nmax_fills = 0\n", "max_fills"),
            ("[limits]\nfill_memory = \"2TiB\"\n", "fill_memory"),
            ("[limits]\nmax_page = 0\n", "max_page"),
            ("[limits]\nmax_conections = 1\n", "max_conections"),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }

    #[test]
    fn access_allow_list_and_htpasswd() {
        let c =
            parse("[access]\nallow = [\"127.0.0.0/8\", \"10.0.0.0/8\", \"::1\"]\n").expect("valid");
        assert_eq!(c.access.allow.len(), 3);
        let e = parse("[access]\nallow = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/40\",\n]\n")
            .expect_err("bad prefix");
        assert!(e.contains("line 4") && e.contains("access.allow"), "{e}");
        let e = parse("[access]\nallow = []\n").expect_err("empty");
        assert!(e.contains("access.allow is empty"), "{e}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).expect("hash");
        std::fs::write(&path, format!("alice:{hash}\n")).expect("write");
        set_mode(&path, 0o640);
        let text = format!("[access]\nhtpasswd = {:?}\n", path.display().to_string());
        let c = parse(&text).expect("valid htpasswd");
        assert_eq!(c.access.htpasswd.as_ref().map(|h| h.len()), Some(1));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(
            !format!("{c:?}").contains(&hash),
            "the hash never shows in Debug"
        );
        set_mode(&path, 0o644);
        let c = parse(&text).expect("valid htpasswd");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("other users can read")),
            "{:?}",
            c.warnings
        );
        std::fs::write(&path, "alice:$apr1$x$y\n").expect("write");
        let e = parse(&text).expect_err("md5 entry");
        assert!(e.contains("access.htpasswd") && e.contains("bcrypt"), "{e}");
        let e = parse("[access]\nhtpasswd = \"/nonexistent/htpasswd\"\n").expect_err("missing");
        assert!(e.contains("cannot read"), "{e}");
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn passwords_come_from_one_of_three_sources() {
        let base = "[upstreams.a]\nurl = \"https://a.io\"\nusername = \"u\"\n";
        let c = parse(&format!("{base}password_env = \"PATH\"\n")).expect("env");
        let creds = c.upstreams[0].credentials.as_ref().expect("credentials");
        assert_eq!(Some(creds.password.clone()), std::env::var("PATH").ok());
        assert!(!c.inline_password);
        let e = parse(&format!(
            "{base}password_env = \"REGCACHE_TEST_SURELY_UNSET_1234\"\n"
        ))
        .expect_err("unset");
        assert!(
            e.contains("upstreams.a.password_env") && e.contains("not set"),
            "{e}"
        );
        let e = parse(&format!("{base}password_env = \"A-B\"\n")).expect_err("bad name");
        assert!(e.contains("password_env"), "{e}");
        let e = parse(&format!(
            "{base}password = \"x\"\npassword_env = \"PATH\"\n"
        ))
        .expect_err("two sources");
        assert!(
            e.contains("one of password, password_file and password_env"),
            "{e}"
        );
        let e = parse("[upstreams.a]\nurl = \"https://a.io\"\npassword_env = \"PATH\"\n")
            .expect_err("no username");
        assert!(e.contains("username"), "{e}");

        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").expect("write");
        set_mode(&pw, 0o600);
        let text = format!("{base}password_file = {:?}\n", pw.display().to_string());
        let c = parse(&text).expect("file");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        set_mode(&pw, 0o644);
        let c = parse(&text).expect("file");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("password_file") && w.contains("can read it")),
            "{:?}",
            c.warnings
        );
        assert!(!c.warnings.iter().any(|w| w.contains("s3cret")));
    }

    #[test]
    fn config_file_with_a_password_readable_by_others_gets_a_warning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("regcache.toml");
        std::fs::write(
            &file,
            "[upstreams.a]\nurl = \"https://a.io\"\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .expect("write");
        set_mode(&file, 0o640);
        let c = Config::load(&file, &Overrides::default()).expect("valid");
        assert!(c.inline_password);
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("regcache.toml") && w.contains("group or other users")),
            "{:?}",
            c.warnings
        );
        assert!(!c.warnings.iter().any(|w| w.contains("hunter2")));
        set_mode(&file, 0o600);
        let c = Config::load(&file, &Overrides::default()).expect("valid");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        std::fs::write(&file, "[upstreams.a]\nurl = \"https://a.io\"\n").expect("write");
        set_mode(&file, 0o644);
        let c = Config::load(&file, &Overrides::default()).expect("valid");
        assert!(
            c.warnings.is_empty(),
            "no password, no warning: {:?}",
            c.warnings
        );
    }

    #[test]
    fn repo_patterns_and_redirect_opt_out() {
        let c = parse(
            "[upstreams.a]\nurl = \"https://a.io\"\nallow_repos = [\"library/*\", \"org/**\"]\n\
             deny_repos = [\"org/secret/**\"]\nallow_private_redirects = true\n",
        )
        .expect("valid");
        let u = &c.upstreams[0];
        assert_eq!(u.allow_repos.len(), 2);
        assert_eq!(u.deny_repos.len(), 1);
        assert!(u.allow_private_redirects);
        assert!(!parse("").expect("defaults").upstreams[0].allow_private_redirects);
        let e = parse("[upstreams.a]\nurl = \"https://a.io\"\nallow_repos = [\"Library/*\"]\n")
            .expect_err("uppercase");
        assert!(
            e.contains("line 3") && e.contains("upstreams.a.allow_repos"),
            "{e}"
        );
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("17"), Ok(17));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("2 weeks").is_err());
    }

    #[test]
    fn s3_store_settings_are_checked() {
        let base = "[store.s3]\nbucket = \"fleet-cache\"\n";
        let c = parse(base).expect("minimal");
        let s3 = c.store.s3.expect("s3 set");
        assert_eq!(s3.region, "us-east-1");
        assert_eq!(s3.prefix, "");
        assert_eq!(s3.timeout, Duration::from_secs(5));
        assert!(!s3.redirect && !s3.virtual_hosted_style);
        assert!(parse("").expect("defaults").store.s3.is_none());

        let c = parse(&format!(
            "{base}endpoint = \"http://127.0.0.1:9000\"\nprefix = \"/site-a/\"\n\
             access_key_id = \"AK\"\nsecret_access_key = \"SK\"\nredirect = true\n\
             redirect_ttl = \"1h\"\ntimeout = \"2s\"\n"
        ))
        .expect("full");
        let s3 = c.store.s3.as_ref().expect("s3 set");
        assert_eq!(s3.prefix, "site-a");
        assert_eq!(s3.redirect_ttl, Duration::from_secs(3600));
        assert!(
            c.inline_password,
            "an inline secret key counts as a password"
        );
        assert!(
            !format!("{s3:?}").contains("SK"),
            "the secret never reaches logs"
        );

        for (bad, want) in [
            ("[store.s3]\nbucket = \"Bad_Name\"\n", "store.s3.bucket"),
            ("[store.s3]\nbucket = \"ab\"\n", "store.s3.bucket"),
            (&format!("{base}endpoint = \"http://h:1/path\"\n"), "no path"),
            (&format!("{base}endpoint = \"ftp://h\"\n"), "endpoint"),
            (&format!("{base}prefix = \"a/../b\"\n"), "store.s3.prefix"),
            (&format!("{base}region = \"us east\"\n"), "store.s3.region"),
            (&format!("{base}access_key_id = \"AK\"\n"), "go together"),
            (
                &format!("{base}secret_access_key = \"a\"\nsecret_access_key_env = \"PATH\"\n"),
                "one of secret_access_key",
            ),
            (
                &format!("{base}access_key_id = \"AK\"\nsecret_access_key_env = \"REGCACHE_SURELY_UNSET_9\"\n"),
                "not set",
            ),
            (&format!("{base}timeout = \"1ms\"\n"), "store.s3.timeout"),
            (&format!("{base}redirect_ttl = \"30d\"\n"), "redirect_ttl"),
            (&format!("{base}bucket_name = \"x\"\n"), "bucket_name"),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn peers_need_urls_with_a_port_and_exactly_one_token_source() {
        let dir = tempfile::tempdir().expect("temp dir");
        let token = dir.path().join("peer-token");
        std::fs::write(&token, "s3cr3t-fleet-token\n").expect("write token");
        set_mode(&token, 0o600);
        let urls = "urls = [\"http://10.0.0.1:5000\", \"https://cache-2.internal\"]\n";
        let base = format!("[peers]\n{urls}token_file = \"{}\"\n", token.display());
        let c = parse(&base).expect("minimal [peers]");
        let p = c.peers.as_ref().expect("peers set");
        assert_eq!(
            p.token, "s3cr3t-fleet-token",
            "the file's final newline is not the token's"
        );
        assert_eq!(p.connect_timeout, Duration::from_millis(250));
        assert_eq!(
            p.urls.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            ["http://10.0.0.1:5000/", "https://cache-2.internal/"]
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(
            !format!("{p:?}").contains("s3cr3t"),
            "the token never reaches logs"
        );
        assert!(parse("").expect("defaults").peers.is_none());
        let c = parse(&format!(
            "[peers]\n{urls}token_env = \"PATH\"\nconnect_timeout = \"1s\"\n"
        ))
        .expect("token from the environment");
        let p = c.peers.expect("peers set");
        assert_eq!(p.token, std::env::var("PATH").expect("PATH"));
        assert_eq!(p.connect_timeout, Duration::from_secs(1));

        set_mode(&token, 0o644);
        let c = parse(&base).expect("valid, with a warning");
        assert!(
            c.warnings.iter().any(|w| w.contains("peers.token_file")),
            "{:?}",
            c.warnings
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let missing = dir.path().join("missing");
        for (bad, want) in [
            (format!("[peers]\n{urls}"), "token is required".to_owned()),
            (
                format!(
                    "[peers]\n{urls}token_file = \"{}\"\ntoken_env = \"PATH\"\n",
                    token.display()
                ),
                "one of token_file and token_env".to_owned(),
            ),
            (
                format!("[peers]\n{urls}token_file = \"{}\"\n", missing.display()),
                format!("cannot read {}", missing.display()),
            ),
            (
                format!("[peers]\n{urls}token_file = \"{}\"\n", empty.display()),
                "is empty".to_owned(),
            ),
            (
                format!("[peers]\n{urls}token_env = \"REGCACHE_SURELY_UNSET_9\"\n"),
                "not set".to_owned(),
            ),
            (
                "[peers]\nurls = []\ntoken_env = \"PATH\"\n".to_owned(),
                "peers.urls is empty".to_owned(),
            ),
            (
                "[peers]\ntoken_env = \"PATH\"\nurls = [\n  \"http://a:1\",\n  \"ftp://b:2\",\n]\n"
                    .to_owned(),
                "line 5: peers.urls".to_owned(),
            ),
            (
                "[peers]\ntoken_env = \"PATH\"\nurls = [\"http://a:1/mirror\"]\n".to_owned(),
                "no path".to_owned(),
            ),
            (
                "[peers]\ntoken_env = \"PATH\"\nurls = [\"http://a:1\", \"http://a:1/\"]\n"
                    .to_owned(),
                "listed twice".to_owned(),
            ),
            (
                format!("{base}connect_timeout = \"2m\"\n"),
                "peers.connect_timeout".to_owned(),
            ),
            (
                format!("{base}url = \"http://x:1\"\n"),
                "unknown field `url`".to_owned(),
            ),
        ] {
            let e = parse(&bad).expect_err(&bad);
            assert!(e.contains(&want), "{bad}: {e}");
        }
    }

    #[test]
    fn the_example_config_is_valid_and_so_is_its_s3_block() {
        let example = include_str!("../../config/regcache.toml");
        parse(example).expect("config/regcache.toml as shipped");
        // Uncomment the [store.s3] block, as an operator would.
        let mut text = String::new();
        let mut in_s3 = false;
        for line in example.lines() {
            if line.trim() == "# [store.s3]" {
                in_s3 = true;
            }
            if in_s3 && line.trim().is_empty() {
                in_s3 = false;
            }
            match line.strip_prefix("# ") {
                Some(rest) if in_s3 => text.push_str(rest),
                _ => text.push_str(line),
            }
            text.push('\n');
        }
        assert!(text.contains("\n[store.s3]\n"), "the block was found");
        // PATH is set in any test environment and stands for the secret here.
        let text = text.replace("REGCACHE_S3_SECRET", "PATH");
        let c = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let s3 = c.store.s3.expect("s3 configured");
        assert_eq!(s3.bucket, "regcache-fleet");
        assert_eq!(s3.prefix, "fleet-a");
        assert_eq!(s3.redirect_ttl, Duration::from_secs(900));
    }
}

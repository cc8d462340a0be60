//! Configuration: the TOML file (and the flags that override it) turned into a validated
//! [`Config`], and the sources it comes from ([`source`]: the local file, the etcd/consul overlay,
//! the last good copy).
//!
//! Three steps, each in its own place:
//! 1. the text is deserialized into the raw types of [`raw`] (`deny_unknown_fields`, so a
//!    misspelt key is an error with its line; units in [`units`]);
//! 2. each section's values are checked and its defaults filled, by its own file: the top-level
//!    keys here, [`upstreams`], [`log`], [`config_store`], [`store`] with [`s3`], [`limits`],
//!    [`access`], [`tls`], [`peers`], and `data_dir` in [`data_dir`]. Each section's typed config has a
//!    `Default` impl, or a `new` taking the keys its table must set, that is the one place its
//!    defaults are written. No file is read in this step;
//! 3. the files and environment variables the values name (passwords, `ca_file`, htpasswd, the
//!    `[tls]` pair, the peer token) are read, all in [`files`], once every value is valid.
//!
//! Every key has a default, so an empty file (or none) is a working configuration.

pub mod access;
pub mod config_store;
pub mod data_dir;
pub mod files;
pub mod limits;
pub mod log;
pub mod peers;
pub mod raw;
pub mod s3;
pub mod source;
pub mod store;
pub mod tls;
pub mod units;
pub mod upstreams;

#[cfg(test)]
pub(crate) mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use access::AccessConfig;
pub use config_store::{ConfigStoreConfig, ConfigStoreKind};
pub use data_dir::DEFAULT_DATA_DIR;
pub use limits::LimitsConfig;
pub use log::{LogConfig, LogFormat};
pub use peers::PeersConfig;
pub use s3::S3Config;
pub use store::StoreConfig;
pub use tls::TlsConfig;
pub use units::{parse_duration, parse_size, parse_upstream_url};
pub use upstreams::{
    Credentials, UpstreamConfig, DEFAULT_UPSTREAM_NAME, DOCKER_HUB_HOSTS, DOCKER_HUB_URL,
};

use files::Read;
use raw::RawConfig;

/// Default of `listen`.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5000);
/// Default of `max_manifest_size`.
pub const DEFAULT_MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Default of `shutdown_grace`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

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

/// The validated configuration the server runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub upstreams: Vec<UpstreamConfig>,
    /// Index into `upstreams` of the one answering requests with no host.
    pub default_upstream: usize,
    pub max_manifest_size: u64,
    pub log: LogConfig,
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

/// What validating the values finds besides the typed sections: the files and variables to read
/// next, and whether a secret is written in the text itself.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) reads: Vec<Read>,
    pub(crate) inline_secret: bool,
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
            if let Some(w) =
                files::readable_by_others(path, 0o044, "holds a password or secret key")
            {
                self.warnings.push(w);
            }
        }
    }

    /// Parses and validates config text, then reads the files it names; `origin` names the text
    /// in errors.
    pub fn parse(text: &str, origin: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (mut config, reads) = Config::parse_values(text, origin, overrides)?;
        files::read_all(&mut config, reads).map_err(|message| ConfigError::Invalid {
            origin: origin.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Parses config text and validates its values, reading no file: what [`Config::parse`]
    /// does before [`files::read_all`]. The configuration lacks what the reads bring (passwords
    /// from files and the environment, the htpasswd users, the S3 secret from the environment).
    pub fn parse_values(
        text: &str,
        origin: &str,
        overrides: &Overrides,
    ) -> Result<(Config, Vec<Read>), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            message,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_owned()))?;
        validate(raw, text, overrides).map_err(invalid)
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

/// Step 2: every section's values, its defaults filled and the flags applied; what is left to
/// read is returned with them.
fn validate(raw: RawConfig, text: &str, o: &Overrides) -> Result<(Config, Vec<Read>), String> {
    let listen = match (&o.listen, &raw.listen) {
        (Some(a), _) => *a,
        (None, Some(s)) => s.get_ref().parse().map_err(|e| {
            format!(
                "line {}: listen = {:?} is not an address such as \"127.0.0.1:5000\": {e}",
                raw::line(text, s),
                s.get_ref()
            )
        })?,
        (None, None) => DEFAULT_LISTEN,
    };
    let data_dir = o
        .data_dir
        .clone()
        .or(raw.data_dir)
        .unwrap_or_else(data_dir::default_data_dir);
    data_dir::check(&data_dir)?;
    let max_manifest_size = raw
        .max_manifest_size
        .map_or(DEFAULT_MAX_MANIFEST_SIZE, |b| b.0);
    if max_manifest_size == 0 {
        return Err("max_manifest_size must be more than 0".into());
    }
    let mut pending = Pending::default();
    let (upstreams, default_upstream) = upstreams::validate(
        raw.upstreams,
        raw.default_upstream.as_ref(),
        o.upstream.as_ref(),
        text,
        &mut pending,
    )?;
    let log = log::validate(raw.log, o)?;
    let config_store = raw.config_store.map(config_store::validate).transpose()?;
    let store = store::validate(raw.store, &mut pending)?;
    let limits = limits::validate(raw.limits)?;
    let access = access::validate(text, raw.access, &mut pending)?;
    let tls = raw.tls.map(|t| tls::validate(t, &mut pending));
    let peers = raw
        .peers
        .map(|p| peers::validate(text, p, &mut pending))
        .transpose()?;
    let config = Config {
        listen,
        data_dir,
        upstreams,
        default_upstream,
        max_manifest_size,
        log,
        config_store,
        store,
        tls,
        shutdown_grace: raw.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
        limits,
        access,
        peers,
        inline_password: pending.inline_secret,
        warnings: Vec::new(),
    };
    Ok((config, pending.reads))
}

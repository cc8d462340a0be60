//! The config file as written: serde types with every key optional (except those a table cannot
//! do without) and `deny_unknown_fields`, so that a misspelt key is an error naming its line.
//!
//! Nothing here has a default or checks a value beyond its type: each section's file turns its
//! raw table into its typed config.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::config::config_store::ConfigStoreKind;
use crate::config::log::LogFormat;
use crate::config::units::{ByteSize, DurationOrOff, DurationValue, UpstreamUrl};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<Spanned<String>>,
    pub data_dir: Option<PathBuf>,
    pub default_upstream: Option<Spanned<String>>,
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

/// `[peers]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeers {
    pub urls: Vec<Spanned<String>>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub connect_timeout: Option<DurationValue>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

/// `[upstreams.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: UpstreamUrl,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub freshness: Option<DurationValue>,
    pub revalidate_budget: Option<DurationOrOff>,
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
    pub allow_repos: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny_repos: Vec<Spanned<String>>,
    pub allow_private_redirects: Option<bool>,
    pub quota_reserve: Option<u64>,
}

impl RawUpstream {
    /// A table that sets `url` and nothing else: the implicit Docker Hub upstream.
    pub fn url_only(url: UpstreamUrl) -> RawUpstream {
        RawUpstream {
            url,
            hosts: Vec::new(),
            freshness: None,
            revalidate_budget: None,
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
            quota_reserve: None,
        }
    }
}

/// `[config_store]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfigStore {
    pub kind: ConfigStoreKind,
    pub url: UpstreamUrl,
    pub key: String,
    pub poll_interval: Option<DurationValue>,
    pub timeout: Option<DurationValue>,
}

/// `[store]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub max_size: Option<ByteSize>,
    pub min_free: Option<ByteSize>,
    pub low_water: Option<u8>,
    pub gc_interval: Option<DurationValue>,
    pub s3: Option<RawS3>,
}

/// `[store.s3]`.
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

/// `[tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub expiry_warning: Option<DurationValue>,
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

/// `[access]`: who may use the mirror.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    pub allow: Option<Vec<Spanned<String>>>,
    pub htpasswd: Option<PathBuf>,
}

/// The line of `text` that byte `offset` is on (from 1).
pub fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

/// The line of `text` a spanned value was read from.
pub fn line(text: &str, s: &Spanned<String>) -> usize {
    line_of(text, s.span().start)
}

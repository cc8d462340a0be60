//! `[config_store]`: where the optional remote overlay lives (etcd or consul), with its defaults.
//! Reading the store is [`source`](super::source)'s.

use std::time::Duration;

use serde::Deserialize;

use crate::config::raw::RawConfigStore;

/// Which remote config store holds the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigStoreKind {
    /// etcd v3, through its JSON gateway (`/v3/kv/range`).
    Etcd,
    /// Consul KV (`/v1/kv/<key>`, blocking queries).
    Consul,
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

impl ConfigStoreConfig {
    /// The store `kind` at `url` holding `key` (the keys a `[config_store]` table must set), every
    /// other key at its default: the one place those defaults are written.
    pub fn new(kind: ConfigStoreKind, url: reqwest::Url, key: String) -> ConfigStoreConfig {
        ConfigStoreConfig {
            kind,
            url,
            key,
            poll_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
        }
    }
}

pub(super) fn validate(raw: RawConfigStore) -> Result<ConfigStoreConfig, String> {
    if raw.key.is_empty() || raw.key.contains(char::is_whitespace) {
        return Err(format!("config_store.key {:?} is not a key", raw.key));
    }
    for (k, d) in [
        ("poll_interval", raw.poll_interval),
        ("timeout", raw.timeout),
    ] {
        if d.is_some_and(|d| d.0 < Duration::from_millis(1)) {
            return Err(format!("config_store.{k} must be at least 1ms"));
        }
    }
    let d = ConfigStoreConfig::new(raw.kind, raw.url.0, raw.key);
    Ok(ConfigStoreConfig {
        poll_interval: raw.poll_interval.map_or(d.poll_interval, |v| v.0),
        timeout: raw.timeout.map_or(d.timeout, |v| v.0),
        ..d
    })
}

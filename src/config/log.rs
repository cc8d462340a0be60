//! `[log]`: the log filter and format, with their defaults and the `--log-level` and
//! `--log-format` overrides.

use serde::Deserialize;

use crate::config::raw::RawLog;
use crate::config::Overrides;

/// How log lines are written on standard error.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Validated `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` filter (`REGCACHE_LOG` overrides it when the subscriber is set up).
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

pub(super) fn validate(raw: RawLog, o: &Overrides) -> Result<LogConfig, String> {
    let d = LogConfig::default();
    let level = o.log_level.clone().or(raw.level).unwrap_or(d.level);
    tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| format!("log.level = {level:?} is not a valid filter: {e}"))?;
    Ok(LogConfig {
        level,
        format: o.log_format.or(raw.format).unwrap_or(d.format),
    })
}

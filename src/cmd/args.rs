//! Flags that several subcommands share: the configuration flags ([`ConfigArgs`]), the running
//! server a client subcommand asks ([`ClientArgs`]: `--server URL`, the same on every one) and
//! how long and how trustingly a probe asks it ([`ProbeArgs`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::cmd::Exit;
use crate::config::{self, Config, LogFormat, Overrides};

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file (TOML). Without it, the built-in defaults are used.
    #[arg(long, short = 'c', env = "REGCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// URL of the default upstream, the one serving Docker Hub names and requests with no host.
    #[arg(long, value_parser = parse_url)]
    pub upstream: Option<reqwest::Url>,
    /// Log filter (overrides `log.level`; `REGCACHE_LOG` overrides both).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format (overrides `log.format`).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

fn parse_url(s: &str) -> Result<reqwest::Url, String> {
    config::parse_upstream_url(s)
}

impl ConfigArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            upstream: self.upstream.clone(),
            log_level: self.log_level.clone(),
            log_format: self.log_format,
        }
    }

    /// Loads `file`, else `--config` (or the defaults), with the flags applied.
    pub fn load(&self, file: Option<&PathBuf>) -> Result<Config, config::ConfigError> {
        match file.or(self.config.as_ref()) {
            Some(path) => Config::load(path, &self.overrides()),
            None => Config::defaults(&self.overrides()),
        }
    }

    /// [`ConfigArgs::load`] for a command that cannot start without it: a configuration error is
    /// printed and becomes the usage exit code.
    pub fn load_or_exit(&self) -> Result<Config, ExitCode> {
        self.load(None).map_err(|e| {
            eprintln!("regcache: {e}");
            Exit::Usage.into()
        })
    }
}

/// The running regcache a client subcommand (`health`, `status`, `gc`, `verify`, `pin`,
/// `prefetch`) asks: `--server URL` on every one of them, so that they all name it alike.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientArgs {
    /// URL of the running regcache (http[s]://HOST:PORT). Default: the configured listen address,
    /// https with [tls]; gc, verify and pin first try the data directory itself.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
}

impl ClientArgs {
    /// `--server` as given (without a trailing `/`), when given.
    pub fn given(&self) -> Option<String> {
        self.server
            .as_deref()
            .map(|u| u.trim_end_matches('/').to_owned())
    }

    /// `--server`, else the URL of the server `config` describes (its listen address); a
    /// configuration error is printed and becomes the usage exit code.
    pub fn url_or_configured(&self, config: &ConfigArgs) -> Result<String, ExitCode> {
        match self.given() {
            Some(url) => Ok(url),
            None => config
                .load_or_exit()
                .map(|c| crate::cmd::remote::configured_url(&c)),
        }
    }
}

/// How a probe of a running server (`health`, `status`) asks it.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration)]
    pub timeout: std::time::Duration,
    /// Accept any server certificate (a self-signed one on loopback).
    #[arg(long)]
    pub insecure: bool,
}

//! Flags that several subcommands share: the configuration flags ([`ConfigArgs`]) and the
//! running server to ask ([`ServerArg`]).

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

/// The running regcache a command asks. Shared so that every command that talks to a server
/// takes it the same way.
#[derive(Debug, Args)]
pub struct ServerArg {
    /// URL of the running regcache to ask (default: the configured listen address, used only
    /// when a server holds the data directory).
    #[arg(long)]
    pub server: Option<String>,
}

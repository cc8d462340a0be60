//! The command line: subcommands, flags, logging setup and exit codes.
//!
//! Exit codes: 0 success; 1 a runtime failure (store, network, listener); 2 a usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, LogFormat, Overrides};

/// Exit code for runtime failures.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for usage and configuration errors.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "regcache",
    version,
    about = "A pull-through image cache and registry mirror"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OCI distribution API, mirroring the configured upstreams.
    Serve(ServeArgs),
    /// Validate a config file (and flags) without starting; prints the effective settings.
    CheckConfig(CheckConfigArgs),
    /// Evict least recently used content down to the configured limits (or --max-size).
    Gc(crate::admin::GcArgs),
    /// Check the store: re-hash blobs, compare the database with the disk both ways.
    Verify(crate::admin::VerifyArgs),
    /// Pin images against eviction, unpin them, list pins.
    Pin(crate::admin::PinArgs),
}

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

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The config file to check.
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
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

    /// Loads the file (or the defaults) with the flags applied.
    pub fn load(&self, file: Option<&PathBuf>) -> Result<Config, config::ConfigError> {
        match file.or(self.config.as_ref()) {
            Some(path) => Config::load(path, &self.overrides()),
            None => Config::defaults(&self.overrides()),
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = std::env::var("REGCACHE_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => {
            let source = std::sync::Arc::new(crate::config_store::ConfigSource::new(
                args.config.config.clone(),
                args.config.overrides(),
            ));
            let config = match source.initial() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("regcache: {e}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            init_logging(&config.log_level, config.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("regcache: cannot start the async runtime: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            match rt.block_on(serve(config, source)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("regcache: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Gc(args) => crate::admin::gc(args),
        Command::Verify(args) => crate::admin::verify(args),
        Command::Pin(args) => crate::admin::pin(args),
        Command::CheckConfig(args) => match args.config.load(args.file.as_ref()) {
            Ok(c) => {
                println!("config OK");
                println!("listen = {}", c.listen);
                println!("data_dir = {}", c.data_dir.display());
                println!("max_manifest_size = {}", c.max_manifest_size);
                for (i, u) in c.upstreams.iter().enumerate() {
                    let default = if i == c.default_upstream {
                        " (default)"
                    } else {
                        ""
                    };
                    println!(
                        "upstream {}{default}: {} hosts={:?} freshness={}s auth={}",
                        u.name,
                        u.url,
                        u.hosts,
                        u.freshness.as_secs(),
                        if u.credentials.is_some() {
                            "basic/token with credentials"
                        } else {
                            "anonymous"
                        }
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("regcache: {e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received"),
                _ = i.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn serve(
    config: Config,
    source: std::sync::Arc<crate::config_store::ConfigSource>,
) -> anyhow::Result<()> {
    let listen = config.listen;
    let app = crate::server::App::open(config.clone())?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("cannot listen on {listen}: the address is already in use (another regcache or registry?)")
        } else {
            anyhow::anyhow!("cannot listen on {listen}: {e}")
        }
    })?;
    tracing::info!(
        listen = %listen,
        data_dir = %app.routing().config.data_dir.display(),
        default_upstream = %app.routing().config.default_upstream().url,
        "regcache serving"
    );
    crate::config_store::spawn_watchers(&app, &source, &config);
    crate::server::run(
        listener,
        app,
        shutdown_signal(),
        crate::server::DEFAULT_GRACE,
    )
    .await
}

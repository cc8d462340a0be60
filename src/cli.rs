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
    /// Ask a running regcache whether it is ready (for probes): exit 0 if so, 1 if not.
    Health(HealthArgs),
    /// Warm a running regcache with images (arguments, a list file, Dockerfiles).
    Prefetch(crate::prefetch::PrefetchArgs),
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Base URL of the server (default: from the config's listen address and tls).
    #[arg(long)]
    pub url: Option<String>,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration)]
    pub timeout: std::time::Duration,
    /// Accept any server certificate (a self-signed one on loopback).
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
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
        .with_writer(crate::logbuf::Stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Reports a command line that does not parse (clap's message, exit 2), or prints `--help` and
/// `--version` (exit 0). `prefetch --json` also gets its JSON error object on stdout.
pub fn parse_error(e: clap::Error) -> ExitCode {
    let _ = e.print();
    if !e.use_stderr() {
        return ExitCode::SUCCESS;
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "prefetch") && args.iter().any(|a| a == "--json") {
        let rendered = e.render().to_string();
        let first = rendered.lines().next().unwrap_or("invalid arguments");
        let msg = first.strip_prefix("error: ").unwrap_or(first);
        println!("{}", crate::prefetch::json_error(EXIT_USAGE, msg));
    }
    ExitCode::from(EXIT_USAGE)
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
            // Connections are served by the server's shards (one thread each); this runtime
            // keeps the signals, the maintenance loop and the config watchers.
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
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
        Command::Health(args) => health(args),
        Command::Prefetch(args) => crate::prefetch::run(args),
        Command::Verify(args) => crate::admin::verify(args),
        Command::Pin(args) => crate::admin::pin(args),
        Command::CheckConfig(args) => match args.config.load(args.file.as_ref()) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("regcache: warning: {w}");
                }
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
                if let Some(s3) = &c.store.s3 {
                    println!(
                        "store.s3: bucket {} at {} region {} prefix {:?} credentials {} redirect {}",
                        s3.bucket,
                        s3.endpoint.as_ref().map_or("AWS S3", |u| u.as_str()),
                        s3.region,
                        s3.prefix,
                        if s3.access_key_id.is_some() {
                            "from the config"
                        } else {
                            "from the environment"
                        },
                        s3.redirect
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
    let app = crate::server::App::open(config.clone())?;
    let (listener, listen) = listener(&config).await?;
    tracing::info!(
        listen = %listen,
        tls = app.tls.is_some(),
        data_dir = %app.routing().config.data_dir.display(),
        default_upstream = %app.routing().config.default_upstream().url,
        "regcache serving"
    );
    crate::config_store::spawn_watchers(&app, &source, &config);
    // systemd (Type=notify): ready once the listener is bound and the store is open.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let app = std::sync::Arc::clone(&app);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval / 2).await;
                // Pinged only while every shard serving connections still runs.
                if app.shards_responsive(interval / 2) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::error!("a connection shard has not run for {:?}; withholding the systemd watchdog ping", interval / 2);
                }
            }
        });
    }
    let shutdown = async {
        shutdown_signal().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    };
    crate::server::run(listener, app, shutdown, config.shutdown_grace).await
}

/// The listening socket: inherited from systemd (socket activation) or bound here.
async fn listener(
    config: &Config,
) -> anyhow::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let mut fds = listenfd::ListenFd::from_env();
    if let Some(std_listener) = fds
        .take_tcp_listener(0)
        .map_err(|e| anyhow::anyhow!("the socket passed by systemd is not a TCP listener: {e}"))?
    {
        std_listener.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(std_listener)?;
        let addr = l.local_addr()?;
        tracing::info!(%addr, "using the listening socket passed by systemd");
        return Ok((l, addr));
    }
    let listen = config.listen;
    let l = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("cannot listen on {listen}: the address is already in use (another regcache or registry?)")
        } else {
            anyhow::anyhow!("cannot listen on {listen}: {e}")
        }
    })?;
    Ok((l, listen))
}

/// `regcache health`: exit 0 when the server answers `/readyz` with 200.
fn health(args: HealthArgs) -> ExitCode {
    let url = match &args.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => match args.config.load(None) {
            Ok(c) => format!(
                "{}://{}",
                if c.tls.is_some() { "https" } else { "http" },
                c.listen
            ),
            Err(e) => {
                eprintln!("regcache: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regcache: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result: anyhow::Result<(u16, String)> = rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(args.timeout)
            .danger_accept_invalid_certs(args.insecure)
            .build()?;
        let resp = client.get(format!("{url}/readyz")).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.unwrap_or_default()))
    });
    match result {
        Ok((200, body)) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("regcache: not ready ({status}): {body}");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            eprintln!("regcache: {url}/readyz: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

//! `regcache serve`: loads the configuration, sets up logging, builds the background runtime
//! (fills, flights and every request to an upstream, the bucket or a peer run there), opens the
//! service, takes the listening socket (inherited from systemd or bound here), reports to systemd
//! (`sd_notify` readiness, watchdog, stopping) and serves until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::cmd::args::ConfigArgs;
use crate::cmd::Exit;
use crate::config::source::ConfigSource;
use crate::config::{Config, LogFormat};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(args: ServeArgs) -> ExitCode {
    let source = Arc::new(ConfigSource::new(
        args.config.config.clone(),
        args.config.overrides(),
    ));
    let config = match source.initial() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regcache: {e}");
            return Exit::Usage.into();
        }
    };
    init_logging(&config.log.level, config.log.format);
    // Connections are served by the server's shards (one thread each); this runtime keeps the
    // signals, the maintenance loop and the config watchers.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regcache: cannot start the async runtime: {e}");
            return Exit::Failure.into();
        }
    };
    let background = match background_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regcache: cannot start the background runtime: {e}");
            return Exit::Failure.into();
        }
    };
    let served = rt.block_on(serve(config, source, background.handle().clone()));
    // The server has drained: what still runs in the background (a fill no client waits for, an
    // upload to the bucket) is not waited for. The process is stopping; recovery at the next
    // start cleans up after a fill, and the outbox keeps the writes owed to the bucket. Shut down
    // here, outside any runtime, where a runtime may be dropped.
    background.shutdown_timeout(Duration::from_secs(1));
    match served {
        Ok(()) => Exit::Success.into(),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("regcache: {e:#}");
            Exit::Failure.into()
        }
    }
}

/// The background runtime that `App::open` is given: blob fills, manifest flights, writes to
/// the bucket, and every request to an upstream or the bucket with its pooled connection run
/// there, not on the connection shards, so that a stalled shard stalls only its own connections.
/// Two workers (one on a single CPU): the work there waits on the network and the disk, and its
/// hashing and writes go to the blocking pool.
fn background_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::http::server::shard_count().min(2))
        .thread_name("rc-fill")
        .enable_all()
        .build()
}

/// The log subscriber: `REGCACHE_LOG`, else `level` (else `info`), as text (coloured on a
/// terminal) or JSON lines, on standard error through the shards' batching writer.
/// Self-contained, so that it can move to `telemetry` as it is.
fn init_logging(level: &str, format: LogFormat) {
    let filter = std::env::var("REGCACHE_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::telemetry::logbuf::Stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
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
    source: Arc<ConfigSource>,
    background: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let app = crate::app::App::open(config.clone(), background)?;
    let (listener, listen) = listener(&config).await?;
    tracing::info!(
        listen = %listen,
        tls = app.tls.is_some(),
        data_dir = %app.routing().config.data_dir.display(),
        default_upstream = %app.routing().config.default_upstream().url,
        "regcache serving"
    );
    crate::app::watch::spawn_watchers(&app, &source, &config);
    // systemd (Type=notify): ready once the listener is bound and the store is open.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let app = Arc::clone(&app);
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
    crate::http::server::run(listener, app, shutdown, config.shutdown_grace).await
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

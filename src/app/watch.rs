//! The config watchers: SIGHUP re-reads the local file, and a task follows the config store; each
//! valid change is applied to the running service with [`App::reload`]. Reading the sources is
//! `config::source`'s.

use std::sync::{Arc, Mutex};

use crate::app::App;
use crate::config::source::{remote_origin, ConfigSource, FetchError, StoreClient};
use crate::config::{Config, ConfigStoreConfig};

/// Starts the background tasks that follow the configuration sources.
pub fn spawn_watchers(app: &Arc<App>, source: &Arc<ConfigSource>, config: &Config) {
    // Serialises build → reload → record, so SIGHUP and the watcher cannot interleave.
    let applying = Arc::new(Mutex::new(()));
    // Installed before returning, so that a SIGHUP right after start reloads (not kills).
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hup) => {
            tokio::spawn(reload_on_sighup(
                Arc::clone(app),
                Arc::clone(source),
                Arc::clone(&applying),
                hup,
            ));
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; reload disabled"),
    }
    if let Some(cs) = config.config_store.clone() {
        tokio::spawn(watch(Arc::clone(app), Arc::clone(source), applying, cs));
    }
}

/// Follows the config store for as long as the server runs, applying valid changes live.
async fn watch(
    app: Arc<App>,
    source: Arc<ConfigSource>,
    applying: Arc<Mutex<()>>,
    cs: ConfigStoreConfig,
) {
    let origin = remote_origin(&cs);
    let poll_interval = cs.poll_interval;
    let mut store = match StoreClient::new(cs) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the config store client; remote config disabled");
            return;
        }
    };
    let mut reachable = true;
    let mut too_large_reported = false;
    // Remote text last refused, so that it is reported once, not at every poll.
    let mut rejected = None;
    loop {
        match store.read().await {
            Err(e @ FetchError::TooLarge(_)) => {
                // Reported once, until the store answers a value within the bound.
                if !too_large_reported {
                    tracing::error!(store = %origin, error = %e, "remote config refused; the configuration in force is unchanged");
                    too_large_reported = true;
                }
            }
            Err(e @ FetchError::Unreachable(_)) => {
                if reachable {
                    tracing::warn!(store = %origin, error = %e, "config store unreachable; keeping the configuration in force");
                    reachable = false;
                }
            }
            Ok(text) => {
                too_large_reported = false;
                if !reachable {
                    tracing::info!(store = %origin, "config store reachable again");
                    reachable = true;
                }
                if text != source.remote() {
                    let _serial = applying.lock().unwrap_or_else(|p| p.into_inner());
                    apply(&app, &source, text, &origin, &mut rejected);
                }
            }
        }
        if !store.blocks() {
            tokio::time::sleep(poll_interval).await;
        }
    }
}

/// Applies the remote `text` (None: the overlay is gone) if the configuration it makes is valid,
/// and keeps it as the last good copy; an invalid one is reported once (`rejected`).
fn apply(
    app: &App,
    source: &ConfigSource,
    text: Option<String>,
    origin: &str,
    rejected: &mut Option<String>,
) {
    if text.is_some() && *rejected == text {
        return; // already reported
    }
    match source.build(text.as_deref()) {
        Ok(config) => {
            if let Err(e) = app.reload(config) {
                tracing::error!(store = %origin, error = %e, "cannot apply the remote config; ignored");
                return;
            }
            if let Err(e) = source.keep_last_good(text.as_deref()) {
                tracing::warn!(error = %e, "cannot keep the last good remote config");
            }
            tracing::info!(store = %origin, present = text.is_some(), "remote config applied");
            source.set_remote(text);
        }
        Err(e) => {
            tracing::error!(store = %origin, error = %e, "invalid remote config ignored; the configuration in force is unchanged");
            *rejected = text;
        }
    }
}

/// Re-reads the local file on SIGHUP and applies it (with the remote overlay) if valid.
async fn reload_on_sighup(
    app: Arc<App>,
    source: Arc<ConfigSource>,
    applying: Arc<Mutex<()>>,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let _serial = applying.lock().unwrap_or_else(|p| p.into_inner());
        match source.rebuild() {
            Ok(config) => {
                if let Err(e) = app.reload(config) {
                    tracing::error!(error = %e, "reload failed; the configuration in force is unchanged");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "invalid configuration ignored; the configuration in force is unchanged")
            }
        }
    }
}

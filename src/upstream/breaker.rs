//! The circuit breaker of an upstream: consecutive failures, "marked down", and the background
//! probe that closes the circuit again.
//!
//! While an upstream is marked down, requests fail at once ([`UpstreamError::MarkedDown`]) and
//! clients are served from the cache; one probe task asks the upstream at growing intervals.
//! While a `429`'s `Retry-After` holds (`ratelimit.rs`), requests fail at once too
//! ([`UpstreamError::RetryAfter`]), and the probe waits for the hold to pass.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::auth::challenge;
use super::{RateLimitStatus, Upstream, UpstreamError};
use crate::telemetry::metrics::Metrics;

/// First wait of the probe; it doubles up to `probe_max_interval`.
const FIRST_PROBE: Duration = Duration::from_millis(500);

/// Circuit breaker state of one upstream.
#[derive(Debug, Default)]
pub(super) struct Breaker {
    /// Consecutive failures while up.
    failures: u32,
    /// Set while the upstream is marked down.
    down_since: Option<Instant>,
}

impl Breaker {
    /// Counts an unavailable answer; true when this one marks the upstream down.
    fn failed(&mut self, threshold: u32) -> bool {
        self.failures += 1;
        if self.down_since.is_none() && self.failures >= threshold {
            self.down_since = Some(Instant::now());
            true
        } else {
            false
        }
    }

    /// Counts an answer; when the upstream was marked down, since when.
    fn answered(&mut self) -> Option<Instant> {
        self.failures = 0;
        self.down_since.take()
    }
}

/// What `/readyz` reports about an upstream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub url: String,
    pub up: bool,
    pub down_for_seconds: Option<u64>,
    /// Seconds a `429`'s `Retry-After` still holds every request back.
    pub retry_after_seconds: Option<u64>,
    /// What the upstream's last answer with rate-limit headers announced.
    pub ratelimit: Option<RateLimitStatus>,
}

impl Upstream {
    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the circuit is closed (the upstream is believed reachable).
    pub fn is_up(&self) -> bool {
        self.breaker().down_since.is_none()
    }

    pub fn status(&self) -> UpstreamStatus {
        let down = self.breaker().down_since;
        UpstreamStatus {
            name: self.name().to_owned(),
            url: self.config.url.to_string(),
            up: down.is_none(),
            down_for_seconds: down.map(|d| d.elapsed().as_secs()),
            retry_after_seconds: self.held_for().map(super::whole_seconds),
            ratelimit: self.ratelimit().map(|r| r.status()),
        }
    }

    /// Fails at once while the upstream is marked down, or while its `Retry-After` holds:
    /// clients are not made to wait for it, and it is sent nothing.
    pub(super) fn check_circuit(&self) -> Result<(), UpstreamError> {
        if let Some(wait) = self.held_for() {
            return Err(UpstreamError::RetryAfter {
                upstream: self.name().to_owned(),
                wait,
            });
        }
        match self.breaker().down_since {
            None => Ok(()),
            Some(since) => Err(UpstreamError::MarkedDown {
                upstream: self.name().to_owned(),
                down_for: since.elapsed(),
            }),
        }
    }

    /// Counts a failure; after `failure_threshold` in a row the upstream is marked down and one
    /// background probe starts.
    pub fn record_failure(&self, e: &UpstreamError) {
        self.metrics
            .upstream_errors
            .get_or_create(&vec![
                ("upstream", self.name().to_owned()),
                ("kind", e.kind().to_owned()),
            ])
            .inc();
        if !e.is_unavailable() {
            return;
        }
        if !self.breaker().failed(self.config.failure_threshold) {
            return;
        }
        tracing::warn!(upstream = self.name(), error = %e, "upstream marked down; serving from the cache and probing in the background");
        self.set_state(false);
        if let Some(me) = self.me.upgrade() {
            let weak = Arc::downgrade(&me);
            drop(me);
            self.runtime.spawn(probe_until_up(weak));
        }
    }

    /// Counts an answer of the upstream (any status): closes the circuit if it was open.
    pub(super) fn record_success(&self) {
        let Some(since) = self.breaker().answered() else {
            return;
        };
        tracing::info!(
            upstream = self.name(),
            down_s = since.elapsed().as_secs(),
            "upstream is back up"
        );
        self.set_state(true);
    }

    /// Exports a change of state (`regcache_upstream_up`, `…_state_changes_total`).
    fn set_state(&self, up: bool) {
        self.metrics
            .upstream_up
            .get_or_create(&Metrics::upstream(self.name()))
            .set(i64::from(up));
        self.metrics
            .upstream_state_changes
            .get_or_create(&vec![
                ("upstream", self.name().to_owned()),
                ("state", if up { "up" } else { "down" }.to_owned()),
            ])
            .inc();
    }

    /// One probe: `GET /v2/`. Any answer that is not 5xx or 429 means the upstream is back,
    /// except a `401` with a Bearer challenge: no request gets through without a token, so the
    /// challenge's token service is asked too, and must give a token or refuse the credentials
    /// (any failure that [`UpstreamError::is_unavailable`] counts keeps the circuit open).
    async fn probe(&self) -> bool {
        let req = self.client.get(self.url("/v2/"));
        let total = self.config.connect_timeout + self.config.header_timeout;
        let resp = match tokio::time::timeout(total, req.send()).await {
            Ok(Ok(resp)) => resp,
            _ => return false,
        };
        self.observe(resp.headers());
        let s = resp.status();
        if s == StatusCode::TOO_MANY_REQUESTS {
            if let Some(v) = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
            {
                self.hold(v);
            }
        }
        if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS {
            return false;
        }
        let bearer = match challenge(&resp) {
            Some(ch) if s == StatusCode::UNAUTHORIZED && ch.scheme == "bearer" => ch,
            _ => return true,
        };
        match tokio::time::timeout(total, self.request_token(&bearer, None)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => !e.is_unavailable(),
            Err(_) => false,
        }
    }
}

/// Probes a down upstream with exponential backoff until it answers, then closes the circuit.
async fn probe_until_up(upstream: Weak<Upstream>) {
    let mut backoff = FIRST_PROBE;
    loop {
        tokio::time::sleep(backoff).await;
        let Some(up) = upstream.upgrade() else { return };
        if up.is_up() {
            return;
        }
        if let Some(wait) = up.held_for() {
            // The upstream asked for nothing until then: not even a probe.
            drop(up);
            tokio::time::sleep(wait).await;
            continue;
        }
        if up.probe().await {
            up.record_success();
            return;
        }
        tracing::debug!(
            upstream = up.name(),
            next_probe_s = backoff.as_secs_f64() * 2.0,
            "upstream still down"
        );
        backoff = (backoff * 2).min(up.config.probe_max_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_circuit_opens_at_the_threshold_once_and_any_answer_closes_it() {
        let mut b = Breaker::default();
        assert!(!b.failed(3) && !b.failed(3), "below the threshold");
        assert!(b.failed(3), "the third failure in a row marks it down");
        assert!(!b.failed(3), "already down: marked once");
        assert!(b.answered().is_some(), "an answer closes the circuit");
        assert!(b.answered().is_none(), "closed already");
        assert!(!b.failed(3) && !b.failed(3), "the count started again");
    }
}

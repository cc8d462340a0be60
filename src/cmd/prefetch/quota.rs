//! The upstreams' pull quotas as the server's answers pass them on (`ratelimit-limit`,
//! `ratelimit-remaining`, `docker-ratelimit-source`): what `regcache prefetch` prints, and
//! `--on-quota`: before each image, stop the run when its upstream's quota is down to the
//! upstream's `quota_reserve` (so that a bulk warm-up never spends the pulls kept for images a
//! machine needs now), or wait for the quota's window to pass.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::upstream::{whole_seconds, RateLimitSnapshot, RateLimitStatus};

/// What `--on-quota` does when an upstream's quota is at its reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnQuota {
    /// Fail the images still to fetch from that upstream (exit 1).
    Stop,
    /// Sleep until the quota's window has passed (at most `--max-wait`), then go on.
    Wait,
}

/// `76 of 100 pulls left in its 21600 s window (counted for 192.0.2.1)`.
fn describe(s: &RateLimitSnapshot) -> String {
    let mut out = match (s.remaining, s.limit) {
        (Some(r), Some(l)) => format!("{r} of {l} pulls left"),
        (Some(r), None) => format!("{r} pulls left"),
        (None, Some(l)) => format!("a limit of {l} pulls"),
        (None, None) => "no quota announced".to_owned(),
    };
    if let Some(w) = s.window {
        out.push_str(&format!(" in its {} s window", w.as_secs()));
    }
    if let Some(source) = &s.source {
        out.push_str(&format!(" (counted for {source})"));
    }
    out
}

/// The quotas seen during one run, by upstream name, and what to do at a reserve.
pub(super) struct Quotas {
    on_quota: OnQuota,
    max_wait: Duration,
    seen: Mutex<BTreeMap<String, RateLimitSnapshot>>,
    /// Whether the stop was announced already (once per run).
    stopped: Mutex<bool>,
}

impl Quotas {
    pub fn new(on_quota: OnQuota, max_wait: Duration) -> Quotas {
        Quotas {
            on_quota,
            max_wait,
            seen: Mutex::new(BTreeMap::new()),
            stopped: Mutex::new(false),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RateLimitSnapshot>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes the rate-limit headers of a server's answer about `upstream`'s image, if it has
    /// them (answers that went upstream).
    pub fn note(&self, upstream: &str, headers: &HeaderMap) {
        if let Some(snapshot) = RateLimitSnapshot::from_headers(headers) {
            self.seen().insert(upstream.to_owned(), snapshot);
        }
    }

    /// Before an image of `upstream` (`reserve`: its `quota_reserve`): `Ok` to fetch it; `Err`
    /// with the reason when its quota is at the reserve, its window has not passed, and
    /// `--on-quota wait` cannot (or was not asked to) wait for it. Waiting prints a line.
    pub async fn before_pull(&self, upstream: &str, reserve: u64) -> Result<(), String> {
        let Some(seen) = self.seen().get(upstream).cloned() else {
            return Ok(());
        };
        if seen.remaining.is_none_or(|r| r > reserve) {
            return Ok(());
        }
        let left = seen.window_left();
        if seen.window.is_some() && left.is_none() {
            // The window it was counted in has passed: what is left is unknown until the next
            // answer says.
            return Ok(());
        }
        let what = format!(
            "upstream {upstream} has {}: at or under its quota_reserve ({reserve})",
            describe(&seen)
        );
        let ends = match left {
            Some(l) => format!("its window ends in {} s", whole_seconds(l)),
            None => "it announced no window to wait for".to_owned(),
        };
        match (self.on_quota, left) {
            (OnQuota::Wait, Some(wait)) if wait <= self.max_wait => {
                eprintln!(
                    "regcache prefetch: {what}; waiting {} s for its window to pass (--on-quota wait)",
                    whole_seconds(wait)
                );
                tokio::time::sleep(wait).await;
                // Counted afresh from the next answer (unless one came meanwhile).
                let mut seen = self.seen();
                if seen
                    .get(upstream)
                    .is_some_and(|s| s.window_left().is_none())
                {
                    seen.remove(upstream);
                }
                Ok(())
            }
            (OnQuota::Wait, _) => Err(format!(
                "not fetched: {what}, and {ends}, {}",
                match left {
                    Some(_) => format!("longer than --max-wait ({} s)", self.max_wait.as_secs()),
                    None => "so --on-quota wait cannot wait".to_owned(),
                }
            )),
            (OnQuota::Stop, _) => {
                let message = format!("not fetched: {what}; {ends} (--on-quota wait waits for it)");
                let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
                if !*stopped {
                    *stopped = true;
                    eprintln!(
                        "regcache prefetch: stopping before spending the quota reserve: {what}; \
                         {ends}"
                    );
                }
                Err(message)
            }
        }
    }

    /// One line per upstream whose quota the server passed on: `upstream docker: 76 of 100
    /// pulls left …`.
    pub fn lines(&self) -> Vec<String> {
        self.seen()
            .iter()
            .map(|(name, s)| format!("upstream {name}: {}", describe(s)))
            .collect()
    }

    /// The quotas for the `--json` summary, by upstream name (as `/readyz` shows them).
    pub fn json(&self) -> serde_json::Value {
        let by_name: BTreeMap<String, RateLimitStatus> = self
            .seen()
            .iter()
            .map(|(name, s)| (name.clone(), s.status()))
            .collect();
        serde_json::json!(by_name)
    }
}

//! An upstream's pull quota as its answers announce it (`ratelimit-limit`, `ratelimit-remaining`,
//! `docker-ratelimit-source`), the hold a `429` with `Retry-After` puts on every request to it,
//! and whether its quota is down to the configured `quota_reserve`.
//!
//! Docker Hub counts manifest `GET`s (not `HEAD`s) per client address or account in a sliding
//! window, and says so on every registry answer, `HEAD`s included: `ratelimit-limit: 100;w=21600`,
//! `ratelimit-remaining: 76;w=21600`. Each answer that carries one of the headers replaces the
//! upstream's [`RateLimitSnapshot`]; answers without them (blob storage, an unlimited account)
//! leave it as it was.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue};

use super::Upstream;
use crate::telemetry::metrics::Metrics;

/// The rate-limit headers regcache reads from its upstreams and passes on to its clients.
pub const RATELIMIT_HEADERS: [&str; 3] = [
    "ratelimit-limit",
    "ratelimit-remaining",
    "docker-ratelimit-source",
];

/// Longest hold a `Retry-After` puts on an upstream: a larger value (or a date further away) is
/// cut to this, so that a bogus answer cannot stop regcache from asking for days. Past it, one
/// request goes out, and a new `429` holds again.
pub const MAX_HOLD: Duration = Duration::from_secs(3600);

/// Longest quota window taken from a `w=` parameter (Docker Hub's is 6 hours): a larger one is
/// cut to this, so that a bogus answer cannot stop revalidation for days.
pub const MAX_WINDOW: Duration = Duration::from_secs(86_400);

/// One rate-limit header's value: a count, and the window it is counted in when announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaValue {
    pub count: u64,
    pub window: Option<Duration>,
}

/// Parses `N` or `N;w=SECONDS` (the IETF draft's `RateLimit-Limit`/`-Remaining` form, as Docker
/// Hub sends it). A list (`100, 100;w=21600`) gives the first member's count and the first
/// window any member names. `None` when the first member is not a number.
pub fn parse_quota(value: &str) -> Option<QuotaValue> {
    let mut members = value.split(',');
    let first = members.next()?;
    let count = first.split(';').next()?.trim();
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let count = count.parse::<u64>().ok()?;
    let window = value
        .split(',')
        .flat_map(|m| m.split(';').skip(1))
        .find_map(|param| {
            let (k, v) = param.split_once('=')?;
            if !k.trim().eq_ignore_ascii_case("w") {
                return None;
            }
            let v = v.trim().trim_matches('"');
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // All digits: only an overflow fails, and that is past the cap anyway.
            let secs = v.parse::<u64>().unwrap_or(u64::MAX);
            Some(Duration::from_secs(secs).min(MAX_WINDOW))
        })
        .filter(|w| !w.is_zero());
    Some(QuotaValue { count, window })
}

/// How long a `Retry-After` (delay in seconds, or an HTTP date) asks to wait from `now`, at most
/// [`MAX_HOLD`]. `None` when it is unreadable or asks for no wait (`0`, a date past).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: only an overflow fails, and that is past the cap anyway.
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).ok()?
    };
    Some(wait.min(MAX_HOLD)).filter(|w| !w.is_zero())
}

/// A wait as whole seconds, as `Retry-After` and messages give it: rounded up, at least 1.
pub fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// What an upstream's last answer with rate-limit headers announced.
#[derive(Debug, Clone)]
pub struct RateLimitSnapshot {
    /// Pulls allowed per window (`ratelimit-limit`).
    pub limit: Option<u64>,
    /// Pulls left in the window (`ratelimit-remaining`).
    pub remaining: Option<u64>,
    /// The window (`w=` of `ratelimit-remaining`, else of `ratelimit-limit`).
    pub window: Option<Duration>,
    /// Who the upstream counts the pulls of (`docker-ratelimit-source`: an address or account).
    pub source: Option<String>,
    /// When the answer arrived (wall clock, for reports).
    pub observed_at: SystemTime,
    /// When the answer arrived (monotonic, for the window).
    observed: Instant,
    /// The headers as the upstream sent them, passed on to clients.
    headers: Vec<(&'static str, HeaderValue)>,
}

/// [`RateLimitSnapshot`] as `/readyz` (and any status report) shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RateLimitStatus {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub window_seconds: Option<u64>,
    pub source: Option<String>,
    /// RFC 3339, UTC, in seconds.
    pub observed_at: String,
}

impl RateLimitSnapshot {
    /// The snapshot an answer's headers give; `None` when it carries none of
    /// [`RATELIMIT_HEADERS`].
    pub fn from_headers(h: &HeaderMap) -> Option<RateLimitSnapshot> {
        let headers: Vec<(&'static str, HeaderValue)> = RATELIMIT_HEADERS
            .iter()
            .filter_map(|name| h.get(*name).map(|v| (*name, v.clone())))
            .collect();
        if headers.is_empty() {
            return None;
        }
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let limit = text("ratelimit-limit").and_then(parse_quota);
        let remaining = text("ratelimit-remaining").and_then(parse_quota);
        let source = text("docker-ratelimit-source")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        Some(RateLimitSnapshot {
            limit: limit.map(|q| q.count),
            remaining: remaining.map(|q| q.count),
            window: remaining
                .and_then(|q| q.window)
                .or(limit.and_then(|q| q.window)),
            source,
            observed_at: SystemTime::now(),
            observed: Instant::now(),
            headers,
        })
    }

    pub fn status(&self) -> RateLimitStatus {
        RateLimitStatus {
            limit: self.limit,
            remaining: self.remaining,
            window_seconds: self.window.map(|w| w.as_secs()),
            source: self.source.clone(),
            observed_at: humantime::format_rfc3339_seconds(self.observed_at).to_string(),
        }
    }

    /// The rate-limit headers as the upstream sent them.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &HeaderValue)> {
        self.headers.iter().map(|(n, v)| (*n, v))
    }

    /// How much of the announced window is left since this answer (`None`: no window was
    /// announced, or it has passed).
    pub fn window_left(&self) -> Option<Duration> {
        self.window?
            .checked_sub(self.observed.elapsed())
            .filter(|d| !d.is_zero())
    }

    /// Whether the pulls left are at or under `reserve` (not 0) and the window announced with
    /// them has not passed.
    pub fn at_reserve(&self, reserve: u64) -> bool {
        reserve > 0 && self.remaining.is_some_and(|r| r <= reserve) && self.window_left().is_some()
    }
}

/// The rate-limit state of one upstream.
#[derive(Debug, Default)]
pub(super) struct RateLimit {
    snapshot: Option<RateLimitSnapshot>,
    /// No request goes to the upstream before this (a `429` with `Retry-After`).
    hold_until: Option<Instant>,
    /// Whether the quota was last seen at the reserve (logged when it becomes so).
    low: bool,
}

impl Upstream {
    fn rate_limit(&self) -> std::sync::MutexGuard<'_, RateLimit> {
        self.ratelimit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the upstream's last answer with rate-limit headers announced, if any did.
    pub fn ratelimit(&self) -> Option<RateLimitSnapshot> {
        self.rate_limit().snapshot.clone()
    }

    /// Reads the rate-limit headers of an answer (any status, `HEAD`s included) into the
    /// snapshot and the `regcache_upstream_ratelimit_*` gauges.
    pub(super) fn observe(&self, headers: &HeaderMap) {
        let Some(snapshot) = RateLimitSnapshot::from_headers(headers) else {
            return;
        };
        let labels = Metrics::upstream(self.name());
        let m = &self.metrics;
        let gauge = |v: Option<u64>| i64::try_from(v.unwrap_or(0)).unwrap_or(i64::MAX);
        if snapshot.limit.is_some() {
            m.upstream_ratelimit_limit
                .get_or_create(&labels)
                .set(gauge(snapshot.limit));
        }
        if snapshot.remaining.is_some() {
            m.upstream_ratelimit_remaining
                .get_or_create(&labels)
                .set(gauge(snapshot.remaining));
        }
        if let Some(w) = snapshot.window {
            m.upstream_ratelimit_window
                .get_or_create(&labels)
                .set(gauge(Some(w.as_secs())));
        }
        self.rate_limit().snapshot = Some(snapshot);
    }

    /// A `429` with `Retry-After` `value`: nothing is sent to the upstream until it has passed.
    pub(super) fn hold(&self, value: &str) {
        let Some(wait) = parse_retry_after(value, SystemTime::now()) else {
            return;
        };
        let until = Instant::now() + wait;
        let mut state = self.rate_limit();
        if state.hold_until.is_some_and(|u| u >= until) {
            return;
        }
        state.hold_until = Some(until);
        drop(state);
        tracing::warn!(
            upstream = self.name(),
            retry_after = value,
            hold_s = wait.as_secs_f64(),
            "upstream answered 429 with Retry-After; sending it nothing until then (cached tags are served stale)"
        );
    }

    /// How long the upstream's `Retry-After` still holds every request back, if it does.
    pub fn held_for(&self) -> Option<Duration> {
        let until = self.rate_limit().hold_until?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// Whether the upstream's quota is at or under `quota_reserve`: tags past their freshness
    /// are then served without revalidation until the announced window has passed since the
    /// answer that reported it. Logged when it starts and when it ends.
    pub fn quota_low(&self) -> bool {
        let reserve = self.config.quota_reserve;
        if reserve == 0 {
            return false;
        }
        let mut state = self.rate_limit();
        let low = state
            .snapshot
            .as_ref()
            .is_some_and(|s| s.at_reserve(reserve));
        if low != state.low {
            state.low = low;
            let (remaining, left) = state
                .snapshot
                .as_ref()
                .map(|s| (s.remaining, s.window_left()))
                .unwrap_or_default();
            drop(state);
            if low {
                tracing::warn!(
                    upstream = self.name(),
                    remaining,
                    quota_reserve = reserve,
                    window_left_s = left.map(|d| d.as_secs()),
                    "upstream pull quota is at the reserve; serving cached tags without revalidation until its window has passed"
                );
            } else {
                tracing::info!(
                    upstream = self.name(),
                    "upstream pull quota is above the reserve or its window has passed; revalidating tags again"
                );
            }
        }
        low
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_values_as_docker_hub_and_the_draft_write_them() {
        let q = |count, w: Option<u64>| {
            Some(QuotaValue {
                count,
                window: w.map(Duration::from_secs),
            })
        };
        assert_eq!(parse_quota("100;w=21600"), q(100, Some(21600)));
        assert_eq!(parse_quota(" 76 ; w=21600 "), q(76, Some(21600)));
        assert_eq!(parse_quota("0;w=21600"), q(0, Some(21600)));
        assert_eq!(parse_quota("100"), q(100, None));
        assert_eq!(parse_quota("100, 100;w=21600"), q(100, Some(21600)));
        assert_eq!(parse_quota("10;W=\"60\""), q(10, Some(60)));
        assert_eq!(parse_quota("10;w=0"), q(10, None), "no window");
        assert_eq!(parse_quota("10;w=x"), q(10, None));
        assert_eq!(
            parse_quota("10;w=99999999999999999999999"),
            q(10, Some(MAX_WINDOW.as_secs())),
            "capped"
        );
        for bad in ["", ";w=60", "-1", "1.5", "x", "１", "+5"] {
            assert_eq!(parse_quota(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 1 ", now), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after("0", now), None);
        assert_eq!(parse_retry_after("999999999999", now), Some(MAX_HOLD));
        let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&in_90s, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), None);
        for bad in ["", "soon", "-5", "1.5"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn a_snapshot_takes_the_remaining_window_and_keeps_the_headers() {
        let mut h = HeaderMap::new();
        assert!(RateLimitSnapshot::from_headers(&h).is_none());
        h.insert("ratelimit-limit", HeaderValue::from_static("100;w=21600"));
        h.insert("ratelimit-remaining", HeaderValue::from_static("3;w=60"));
        h.insert(
            "docker-ratelimit-source",
            HeaderValue::from_static("192.0.2.1"),
        );
        let s = RateLimitSnapshot::from_headers(&h).expect("snapshot");
        assert_eq!(
            (s.limit, s.remaining, s.window, s.source.as_deref()),
            (
                Some(100),
                Some(3),
                Some(Duration::from_secs(60)),
                Some("192.0.2.1")
            )
        );
        assert_eq!(s.headers().count(), 3);
        assert!(s.at_reserve(3) && s.at_reserve(10));
        assert!(!s.at_reserve(2), "above the reserve");
        assert!(!s.at_reserve(0), "0: no reserve");
        let st = s.status();
        assert_eq!(st.window_seconds, Some(60));
        assert!(st.observed_at.ends_with('Z'), "{}", st.observed_at);
        let passed = RateLimitSnapshot {
            observed: Instant::now() - Duration::from_secs(61),
            ..s
        };
        assert!(!passed.at_reserve(10), "the window has passed");
        let mut h = HeaderMap::new();
        h.insert("ratelimit-remaining", HeaderValue::from_static("3"));
        let no_window = RateLimitSnapshot::from_headers(&h).expect("snapshot");
        assert!(
            !no_window.at_reserve(10),
            "without a window there is no end to wait for"
        );
    }
}

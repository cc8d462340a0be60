//! The tags served stale in the last hour, per upstream: a small ring of stale answers with their
//! times each, which `GET /_regcache/status` (and so `regcache status` and the status page)
//! reports.
//!
//! The ring is bounded ([`CAPACITY`] answers per upstream), so an upstream down for long under
//! heavy traffic keeps only its latest answers: the summary then says it is not complete.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How far back the summary looks.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// Stale answers kept per upstream.
pub const CAPACITY: usize = 256;

/// One upstream's ring.
#[derive(Debug, Default)]
struct Ring {
    /// `(when, "repository:tag")`, oldest first.
    answers: VecDeque<(Instant, String)>,
    /// When the newest answer pushed out of a full ring was served.
    dropped: Option<Instant>,
}

/// The stale answers of every upstream, by upstream name.
#[derive(Debug, Default)]
pub struct StaleLog {
    rings: Mutex<HashMap<String, Ring>>,
}

/// One tag in a [`StaleSummary`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StaleTag {
    /// `repository:tag`, as routed to the upstream (`library/alpine:3.20`).
    pub tag: String,
    /// Its stale answers in the window.
    pub answers: usize,
    /// When it was last served stale, in seconds since the Unix epoch.
    pub last_served_at: u64,
    pub last_served_seconds_ago: u64,
}

/// The stale answers of one upstream within [`WINDOW`].
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct StaleSummary {
    /// Stale answers in the window (that the ring still holds).
    pub answers: usize,
    /// False when answers of the window were pushed out of the ring: the counts are then those
    /// of the latest [`CAPACITY`] answers.
    pub complete: bool,
    /// The tags, the most recently served first.
    pub tags: Vec<StaleTag>,
}

impl StaleLog {
    /// Notes that `tag` (`repository:tag`) of `upstream` was just served stale.
    pub fn record(&self, upstream: &str, tag: String) {
        self.record_at(upstream, tag, Instant::now());
    }

    fn record_at(&self, upstream: &str, tag: String, at: Instant) {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let ring = rings.entry(upstream.to_owned()).or_default();
        while ring
            .answers
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > WINDOW)
        {
            ring.answers.pop_front();
        }
        if ring.answers.len() >= CAPACITY {
            ring.dropped = ring.answers.pop_front().map(|(t, _)| t);
        }
        ring.answers.push_back((at, tag));
    }

    /// What `upstream` served stale in the last [`WINDOW`].
    pub fn recent(&self, upstream: &str) -> StaleSummary {
        self.recent_at(upstream, Instant::now(), SystemTime::now())
    }

    fn recent_at(&self, upstream: &str, now: Instant, wall: SystemTime) -> StaleSummary {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ring) = rings.get(upstream) else {
            return StaleSummary {
                complete: true,
                ..StaleSummary::default()
            };
        };
        let within = |t: &Instant| now.saturating_duration_since(*t) <= WINDOW;
        let mut tags: Vec<(String, usize, Instant)> = Vec::new();
        let mut answers = 0;
        // Newest first, so each tag's first sighting is its last answer.
        for (t, tag) in ring.answers.iter().rev().take_while(|(t, _)| within(t)) {
            answers += 1;
            match tags.iter_mut().find(|(name, ..)| name == tag) {
                Some(entry) => entry.1 += 1,
                None => tags.push((tag.clone(), 1, *t)),
            }
        }
        let wall_secs = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        StaleSummary {
            answers,
            complete: !ring.dropped.as_ref().is_some_and(within),
            tags: tags
                .into_iter()
                .map(|(tag, answers, last)| {
                    let ago = now.saturating_duration_since(last).as_secs();
                    StaleTag {
                        tag,
                        answers,
                        last_served_at: wall_secs.saturating_sub(ago),
                        last_served_seconds_ago: ago,
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_of_the_last_hour_are_counted_newest_first_and_older_ones_are_left_out() {
        let base = Instant::now();
        // The query is made 4000 s after the first answer.
        let now = base + Duration::from_secs(4000);
        let ago = |secs: u64| now - Duration::from_secs(secs);
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let log = StaleLog::default();
        log.record_at("docker", "library/old:1".into(), base);
        log.record_at("docker", "library/a:1".into(), ago(600));
        log.record_at("docker", "library/b:1".into(), ago(300));
        log.record_at("docker", "library/a:1".into(), ago(60));
        log.record_at("ghcr", "org/app:2".into(), ago(10));
        let s = log.recent_at("docker", now, wall);
        assert_eq!(s.answers, 3, "{s:?}");
        assert!(s.complete);
        assert_eq!(
            s.tags,
            vec![
                StaleTag {
                    tag: "library/a:1".into(),
                    answers: 2,
                    last_served_at: 1_000_000 - 60,
                    last_served_seconds_ago: 60,
                },
                StaleTag {
                    tag: "library/b:1".into(),
                    answers: 1,
                    last_served_at: 1_000_000 - 300,
                    last_served_seconds_ago: 300,
                },
            ],
            "an answer older than an hour is not reported; each upstream has its own ring"
        );
        assert_eq!(log.recent_at("quay", now, wall), {
            StaleSummary {
                complete: true,
                ..StaleSummary::default()
            }
        });
    }

    #[test]
    fn a_full_ring_keeps_the_latest_answers_and_says_it_is_not_complete() {
        let now = Instant::now();
        let log = StaleLog::default();
        for i in 0..CAPACITY + 5 {
            log.record_at("docker", format!("r/t:{}", i % 3), now);
        }
        let s = log.recent_at("docker", now, SystemTime::now());
        assert_eq!(s.answers, CAPACITY);
        assert!(!s.complete, "answers of the hour were pushed out");
        assert_eq!(s.tags.len(), 3);
    }
}

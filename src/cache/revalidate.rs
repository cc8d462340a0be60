//! Stale-while-revalidate: a cached tag past its freshness is revalidated by one background task
//! per tag, which a request waits for at most the upstream's `revalidate_budget`; past it the
//! request is answered from the cache, stale, while the task goes on and updates the tag for the
//! next request.
//!
//! The revalidation (the upstream's `HEAD`, then the new manifest when the tag moved:
//! `Cache::confirm_tag`) runs in its own single flight on the background runtime, apart from the
//! manifest flight that waits for it: a request that comes while it runs joins it, and waits for
//! it at most the budget again, so no second `HEAD` is sent while one is running. Misses do not
//! come here: with nothing to serve meanwhile, they wait for the upstream.

use std::sync::Arc;
use std::time::Duration;

use super::flight::{Flight, Waited};
use super::{Cache, CacheError, Manifest, Outcome, Route};
use crate::oci::media::Accept;
use crate::oci::reference::{Digest, Tag};
use crate::upstream::UpstreamError;

/// How a tag's revalidation (`Cache::confirm_tag`) ended, when not in an error to pass on.
#[derive(Debug, Clone)]
pub(super) enum Confirmed {
    /// The tag's manifest as the upstream now has it: the cached one, its record confirmed, or
    /// the new one, stored.
    Manifest(Manifest),
    /// The upstream could not answer the `HEAD`: the cached manifest is what can be served.
    Unavailable(UpstreamError),
}

/// What a tag's revalidation gave a request that waited for it.
pub(super) enum Revalidation {
    /// It ended within the budget (or there is none).
    Answered(Result<Confirmed, CacheError>),
    /// The budget passed first: it goes on in the background, and this error (a timeout, which
    /// the breaker does not count) says why the request is served from the cache.
    Outlived(UpstreamError),
}

/// `cached`, served stale because the upstream could not answer (`e`).
pub(super) fn stale_tag(cached: Manifest, e: &UpstreamError) -> Manifest {
    Manifest {
        outcome: Outcome::Stale,
        stale_reason: Some(e.to_string()),
        ..cached
    }
}

impl Cache {
    /// Revalidates tag `t`'s record for `accept`, which points at `cached`, waiting at most
    /// `route`'s `revalidate_budget`; with the budget off, the request does the revalidation
    /// itself, as a miss would.
    pub(super) async fn revalidate_within_budget(
        self: &Arc<Self>,
        route: &Route,
        t: &Tag,
        accept: Accept,
        cached: &Manifest,
    ) -> Revalidation {
        let Some(budget) = route.upstream.config.revalidate_budget else {
            return Revalidation::Answered(self.confirm_tag(route, t, accept, cached).await);
        };
        // One per tag and Accept set, whoever asks: a client's manifest flight and a peer's share it.
        let key = format!(
            "{}/{}@{t} accept={accept}",
            route.upstream.name(),
            route.repo
        );
        let (this, route2, t2, cached2) =
            (Arc::clone(self), route.clone(), t.clone(), cached.clone());
        let confirm = move || async move { this.confirm_tag(&route2, &t2, accept, &cached2).await };
        match self.revalidations.run_within(key, budget, confirm).await {
            Waited::Landed(result) => Revalidation::Answered(result),
            Waited::Outlived { flight, first } => {
                if first {
                    self.follow(route, t, cached.digest.clone(), budget, flight);
                }
                Revalidation::Outlived(UpstreamError::Timeout {
                    upstream: route.upstream.name().to_owned(),
                    what: "the tag's revalidation within revalidate_budget (it goes on in the \
                           background)",
                })
            }
        }
    }

    /// Follows a revalidation that outlived its budget to its end, in the background: logs and
    /// counts how it ended (`regcache_background_revalidations_total`).
    fn follow(
        &self,
        route: &Route,
        t: &Tag,
        cached: Digest,
        budget: Duration,
        flight: Flight<Confirmed>,
    ) {
        let (upstream, repo, tag) = (
            route.upstream.name().to_owned(),
            route.repo.clone(),
            t.clone(),
        );
        tracing::warn!(%upstream, %repo, %tag, budget_ms = budget.as_millis(), "the upstream did not answer within revalidate_budget; serving the cached tag and revalidating it in the background");
        let metrics = Arc::clone(&self.metrics);
        self.runtime.spawn(async move {
            let result = match flight.await {
                Ok(Confirmed::Unavailable(e)) => {
                    tracing::warn!(%upstream, %repo, %tag, error = %e, "background revalidation: the upstream cannot answer; the cached tag stays");
                    "failed"
                }
                Ok(Confirmed::Manifest(m)) if m.outcome == Outcome::Passthrough => {
                    // Served by the flight but not stored: the tag was not updated.
                    tracing::warn!(%upstream, %repo, %tag, digest = %m.digest, "background revalidation: the new manifest could not be stored");
                    "failed"
                }
                Ok(Confirmed::Manifest(m)) if m.digest == cached => {
                    tracing::info!(%upstream, %repo, %tag, digest = %m.digest, "background revalidation: the tag is unchanged");
                    "unchanged"
                }
                Ok(Confirmed::Manifest(m)) => {
                    tracing::info!(%upstream, %repo, %tag, old = %cached, digest = %m.digest, "background revalidation: the tag moved; the next request gets the new manifest");
                    "updated"
                }
                Err(e) => {
                    tracing::warn!(%upstream, %repo, %tag, error = %e, "background revalidation failed; the cached tag stays");
                    "failed"
                }
            };
            metrics
                .background_revalidations
                .get_or_create(&vec![("upstream", upstream), ("result", result.to_owned())])
                .inc();
        });
    }
}

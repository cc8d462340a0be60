//! Manifest policy: freshness of tags, revalidation with the upstream, stale answers while it
//! cannot answer, what a client's `Accept` gets from the store, and manifests from the tiers
//! (the shared tiers first, then the upstream), verified and stored.

use std::sync::Arc;
use std::time::Duration;

use super::revalidate::{stale_tag, Confirmed, Revalidation};
use super::share::Share;
use super::tier::{Tier, TierManifest, TierTag};
use super::{blocking, Asker, Cache, CacheError, Manifest, Outcome, Route};
use crate::bucket::upstream_id;
use crate::oci::media::{self, Accept, Negotiated};
use crate::oci::reference::{Digest, Reference, Tag};
use crate::store::{now_millis, RepoKey};
use crate::upstream::UpstreamError;

impl Cache {
    fn stored_manifest(
        &self,
        d: &Digest,
        outcome: Outcome,
    ) -> Result<Option<Manifest>, CacheError> {
        let Some((media_type, bytes)) = self.store.manifest(d)? else {
            return Ok(None);
        };
        self.store.touch(d);
        Ok(Some(Manifest {
            digest: d.clone(),
            media_type,
            bytes,
            outcome,
            stale_reason: None,
        }))
    }

    /// A manifest by tag or digest, as the upstream answers a client accepting `accept`.
    pub async fn manifest(
        self: &Arc<Self>,
        route: &Route,
        reference: &Reference,
        accept: Accept,
    ) -> Result<Manifest, CacheError> {
        self.manifest_for(route, reference, accept, Asker::Client)
            .await
    }

    /// [`Cache::manifest`] for a client or a peer (`asker`): a peer's request never asks the
    /// peers, and a local-only one is answered from the store alone.
    pub async fn manifest_for(
        self: &Arc<Self>,
        route: &Route,
        reference: &Reference,
        accept: Accept,
        asker: Asker,
    ) -> Result<Manifest, CacheError> {
        if asker == (Asker::Peer { local_only: true }) {
            return self.local_manifest(route, reference).map(|(m, _)| m);
        }
        let peers = asker.may_ask_peers();
        let key = route.key();
        match reference {
            Reference::Digest(d) => {
                if self.store.is_linked(&key, d)? {
                    if let Some(m) = self.stored_manifest(d, Outcome::Hit)? {
                        if accept.is_all() || media::serves_as_is(&m.media_type, accept, false) {
                            return Ok(m);
                        }
                    }
                }
            }
            Reference::Tag(t) => {
                if let Some(m) = self.fresh_tag(route, t, accept)? {
                    return Ok(m);
                }
            }
        }
        // Clients with other Accept sets may get other answers: they never share a flight. Nor do
        // peers' requests and clients' (a flight for a peer asks no peer).
        let mut flight_key = if accept.is_all() {
            format!("{}/{}@{}", key.upstream, key.repo, reference)
        } else {
            format!(
                "{}/{}@{} accept={accept}",
                key.upstream, key.repo, reference
            )
        };
        if !peers {
            flight_key.push_str(" hop");
        }
        let (this, route2, reference2) = (Arc::clone(self), route.clone(), reference.clone());
        let (result, joined) = self
            .manifests
            .run(flight_key, move || async move {
                this.fetch_manifest(&route2, &reference2, accept, peers)
                    .await
            })
            .await;
        let mut m = result?;
        if joined && m.outcome == Outcome::Miss {
            m.outcome = Outcome::Coalesced;
        }
        Ok(m)
    }

    /// A tag's manifest from the store, with no upstream contact: the full-Accept record's when
    /// it is fresh and served as it is to `accept`, else the fresh record of `accept` itself.
    /// While the upstream's quota is at its reserve, records past their freshness count too
    /// (served stale).
    fn fresh_tag(
        &self,
        route: &Route,
        t: &Tag,
        accept: Accept,
    ) -> Result<Option<Manifest>, CacheError> {
        let key = route.key();
        let records: &[Accept] = if accept.is_all() {
            &[Accept::ALL]
        } else {
            &[Accept::ALL, accept]
        };
        for &record in records {
            let Some(rec) = self.store.tag_for(&key, t, record)? else {
                continue;
            };
            let age = Duration::from_millis(now_millis().saturating_sub(rec.checked_at_ms));
            // Past its window, a tag is served as it is (stale) while the upstream's quota is at
            // `quota_reserve`: a revalidation that finds it moved would spend a pull.
            let past = age >= route.upstream.config.freshness;
            if past && !route.upstream.quota_low() {
                continue;
            }
            let Ok(d) = rec.digest.parse::<Digest>() else {
                continue;
            };
            let Some((media_type, bytes)) = self.store.manifest(&d)? else {
                continue;
            };
            if record == accept || media::serves_as_is(&media_type, accept, true) {
                self.store.touch(&d);
                return Ok(Some(Manifest {
                    digest: d,
                    media_type,
                    bytes,
                    outcome: if past { Outcome::Stale } else { Outcome::Hit },
                    stale_reason: past.then(|| "the upstream's quota is at quota_reserve".into()),
                }));
            }
        }
        Ok(None)
    }

    /// The stored manifest a tag's record for `accept` points at, however old the record.
    fn tagged_manifest(
        &self,
        key: &RepoKey,
        t: &Tag,
        accept: Accept,
    ) -> Result<Option<Manifest>, CacheError> {
        let Some(rec) = self.store.tag_for(key, t, accept)? else {
            return Ok(None);
        };
        let Ok(d) = rec.digest.parse::<Digest>() else {
            return Ok(None);
        };
        self.stored_manifest(&d, Outcome::Hit)
    }

    /// What the store alone holds for a peer's outage query: a manifest by digest linked to
    /// `route`'s repository, or the manifest of a tag's full-Accept record with the time the
    /// upstream confirmed that record (however old). Never asks a tier.
    pub fn local_manifest(
        &self,
        route: &Route,
        reference: &Reference,
    ) -> Result<(Manifest, Option<u64>), CacheError> {
        let key = route.key();
        let found = match reference {
            Reference::Digest(d) if self.store.is_linked(&key, d)? => {
                self.stored_manifest(d, Outcome::Hit)?.map(|m| (m, None))
            }
            Reference::Digest(_) => None,
            Reference::Tag(t) => match self.store.tag_for(&key, t, Accept::ALL)? {
                Some(rec) => match rec.digest.parse::<Digest>() {
                    Ok(d) => self
                        .stored_manifest(&d, Outcome::Hit)?
                        .map(|m| (m, Some(rec.checked_at_ms))),
                    Err(_) => None,
                },
                None => None,
            },
        };
        found.ok_or(CacheError::NotStored(
            "manifest not stored for this repository",
        ))
    }

    /// The slow path of [`Cache::manifest`], run once per key at a time; the peers are asked only
    /// if `peers`.
    async fn fetch_manifest(
        self: &Arc<Self>,
        route: &Route,
        reference: &Reference,
        accept: Accept,
        peers: bool,
    ) -> Result<Manifest, CacheError> {
        let key = route.key();
        match reference {
            Reference::Digest(_) if !accept.is_all() => {
                // Not stored here, or stored with a type this client may not be given: the
                // upstream decides, and the store answers as it would when it cannot.
                match self.download_manifest(route, reference, None, accept).await {
                    Err(CacheError::Upstream(e)) if e.is_unavailable() => {
                        self.answer_without_upstream(route, reference, accept, e)
                    }
                    r => r,
                }
            }
            Reference::Digest(d) => {
                let mut asked = false;
                for tier in self.tiers.shared_for(peers) {
                    asked |= tier.asks_holders(route);
                    if let Some(m) = self.shared_manifest(tier, route, d).await? {
                        return Ok(m);
                    }
                }
                let fallback = self.tiers.fallback(peers, asked);
                if self.store.manifest_info(d)?.is_some() {
                    // Stored for another repository: the upstream must confirm this one has it
                    // (or, while it cannot, a peer that holds it for this one).
                    let origin = self.tiers.origin();
                    if let Err(e) = origin.has_manifest(route, d).await {
                        return match (e, fallback) {
                            (CacheError::Upstream(e), Some(f)) if e.is_unavailable() => {
                                let m = self.shared_manifest(f, route, d).await?;
                                m.ok_or_else(|| e.into())
                            }
                            (e, _) => Err(e),
                        };
                    }
                    let (store, k2, d2) = (Arc::clone(&self.store), key.clone(), d.clone());
                    blocking(move || store.link(&k2, &d2, None)).await?;
                    if let Some(m) = self.stored_manifest(d, origin.confirmed())? {
                        return Ok(m);
                    }
                }
                match (
                    self.download_manifest(route, reference, None, Accept::ALL)
                        .await,
                    fallback,
                ) {
                    (Err(CacheError::Upstream(e)), Some(f)) if e.is_unavailable() => {
                        let m = self.shared_manifest(f, route, d).await?;
                        m.ok_or_else(|| e.into())
                    }
                    (r, _) => r,
                }
            }
            Reference::Tag(t) => {
                let mut asked = false;
                for tier in self.tiers.shared_for(peers) {
                    asked |= tier.asks_holders(route);
                    if let Some(m) = self.shared_tag(tier, route, t, accept).await? {
                        return Ok(m);
                    }
                }
                let fallback = self.tiers.fallback(peers, asked);
                if let Some(m) = self.fresh_tag(route, t, accept)? {
                    return Ok(m); // another flight refreshed it meanwhile
                }
                if let Some(cached) = self.tagged_manifest(&key, t, accept)? {
                    return self
                        .revalidate_tag(route, t, accept, cached, fallback)
                        .await;
                }
                match self
                    .download_manifest(route, reference, Some(t), accept)
                    .await
                {
                    Err(CacheError::Upstream(e)) if e.is_unavailable() => {
                        // Never cached here: the peers' records, if any, then what the store
                        // can answer for a narrower Accept.
                        if let Some(m) = self.tag_from_peers(fallback, route, t, accept, &e).await?
                        {
                            return Ok(m);
                        }
                        if accept.is_all() {
                            return Err(e.into());
                        }
                        self.answer_without_upstream(route, reference, accept, e)
                    }
                    r => r,
                }
            }
        }
    }

    /// Asks the upstream whether the cached manifest of tag `t` for `accept` is still the one,
    /// within the upstream's `revalidate_budget` (`revalidate.rs`); serves the cached one stale
    /// if the upstream cannot answer, or not within the budget.
    async fn revalidate_tag(
        self: &Arc<Self>,
        route: &Route,
        t: &Tag,
        accept: Accept,
        cached: Manifest,
        fallback: Option<&Tier>,
    ) -> Result<Manifest, CacheError> {
        let e = match self
            .revalidate_within_budget(route, t, accept, &cached)
            .await
        {
            Revalidation::Answered(Ok(Confirmed::Manifest(m))) => return Ok(m),
            Revalidation::Answered(Ok(Confirmed::Unavailable(e))) | Revalidation::Outlived(e) => e,
            // Any other failure of the HEAD (401, 404, …), or of the GET of a moved tag.
            Revalidation::Answered(Err(e)) => return Err(e),
        };
        // A peer's record confirmed more recently than ours wins.
        if let Some(m) = self.tag_from_peers(fallback, route, t, accept, &e).await? {
            return Ok(m);
        }
        tracing::warn!(upstream = route.upstream.name(), repo = %route.repo, tag = %t, %accept, error = %e, "upstream cannot answer; serving the cached tag");
        Ok(stale_tag(cached, &e))
    }

    /// The upstream's `HEAD` of tag `t` for `accept`: the cached manifest, its record confirmed,
    /// when the tag still points at it; else the new manifest, fetched and stored; or the
    /// `HEAD`'s failure when the upstream cannot answer it (an error of the `GET` that follows is
    /// an error, not a reason to serve the cached manifest).
    pub(super) async fn confirm_tag(
        &self,
        route: &Route,
        t: &Tag,
        accept: Accept,
        cached: &Manifest,
    ) -> Result<Confirmed, CacheError> {
        let up = &route.upstream;
        let head = match self.tiers.origin().tag(route, t, accept).await {
            Err(CacheError::Upstream(e)) if e.is_unavailable() => {
                return Ok(Confirmed::Unavailable(e))
            }
            head => head?,
        };
        match head {
            Some(TierTag {
                digest: Some(d),
                checked_at_ms: now,
            }) if d == cached.digest => {
                let (store, k2, t2, d2) =
                    (Arc::clone(&self.store), route.key(), t.clone(), d.clone());
                blocking(move || store.set_tag_for(&k2, &t2, accept, &d2, now)).await?;
                if accept.is_all() {
                    self.share(Share::Tag {
                        upstream: upstream_id(&up.config.url),
                        repo: route.repo.clone(),
                        tag: t.clone(),
                        digest: d,
                        checked_at_ms: now,
                    });
                }
                Ok(Confirmed::Manifest(Manifest {
                    outcome: Outcome::Revalidated,
                    ..cached.clone()
                }))
            }
            _ => self
                .download_manifest(route, &Reference::Tag(t.clone()), Some(t), accept)
                .await
                .map(Confirmed::Manifest),
        }
    }

    /// What the upstream would answer a client accepting `accept` (narrower than all four),
    /// worked out from the store while the upstream cannot answer (`e`): the full-Accept
    /// manifest as it is, a refusal, or a list's linux/amd64 child if stored. Anything else
    /// (a schema 1 conversion, a child not stored here) is `e`, as for any uncached content.
    fn answer_without_upstream(
        &self,
        route: &Route,
        reference: &Reference,
        accept: Accept,
        e: UpstreamError,
    ) -> Result<Manifest, CacheError> {
        let key = route.key();
        let (stored, by_tag) = match reference {
            Reference::Digest(d) if self.store.is_linked(&key, d)? => {
                (self.stored_manifest(d, Outcome::Stale)?, false)
            }
            Reference::Digest(_) => (None, false),
            Reference::Tag(t) => (self.tagged_manifest(&key, t, Accept::ALL)?, true),
        };
        let Some(stored) = stored else {
            return Err(e.into());
        };
        let served = match media::negotiate(&stored.media_type, &stored.bytes, accept, by_tag) {
            Negotiated::AsIs => stored,
            Negotiated::Refused(why) => return Err(CacheError::NotAcceptable(why)),
            Negotiated::Child(d) => {
                let child = if self.store.is_linked(&key, &d)? {
                    self.stored_manifest(&d, Outcome::Stale)?
                } else {
                    None
                };
                match child {
                    Some(c) if media::serves_as_is(&c.media_type, accept, true) => c,
                    _ => return Err(e.into()),
                }
            }
            Negotiated::Schema1 => return Err(e.into()),
        };
        tracing::warn!(upstream = route.upstream.name(), repo = %route.repo, reference = %reference, %accept, digest = %served.digest, error = %e, "upstream cannot answer; serving what it would from the cache");
        Ok(Manifest {
            outcome: Outcome::Stale,
            stale_reason: Some(e.to_string()),
            ..served
        })
    }

    /// A manifest by digest from a shared tier, if that tier says `route`'s repository has it
    /// (another server fetched it from the upstream for that repository).
    async fn shared_manifest(
        &self,
        tier: &Tier,
        route: &Route,
        d: &Digest,
    ) -> Result<Option<Manifest>, CacheError> {
        if tier.has_manifest(route, d).await? {
            self.import_manifest(tier, route, d, None).await
        } else {
            Ok(None)
        }
    }

    /// A tag from a shared tier when its record is newer than ours: served (`Some`) when still
    /// fresh, else only copied so that revalidation and stale answers start from it.
    async fn shared_tag(
        &self,
        tier: &Tier,
        route: &Route,
        t: &Tag,
        accept: Accept,
    ) -> Result<Option<Manifest>, CacheError> {
        let Some((m, fresh)) = self.newer_tag(tier, route, t, accept).await? else {
            return Ok(None);
        };
        Ok(Some(m).filter(|_| fresh))
    }

    /// Tag `t` from `tier` when its record is newer than ours, imported (manifest and record,
    /// with the tier's confirmation time, never as fresh), and whether it is still fresh.
    async fn newer_tag(
        &self,
        tier: &Tier,
        route: &Route,
        t: &Tag,
        accept: Accept,
    ) -> Result<Option<(Manifest, bool)>, CacheError> {
        let Some(TierTag {
            digest: Some(d),
            checked_at_ms,
        }) = tier.tag(route, t, accept).await?
        else {
            return Ok(None);
        };
        let local = self.store.tag(&route.key(), t)?.map(|r| r.checked_at_ms);
        if local.is_some_and(|l| l >= checked_at_ms) {
            return Ok(None);
        }
        let imported = self
            .import_manifest(tier, route, &d, Some((t, checked_at_ms)))
            .await?;
        let age = Duration::from_millis(now_millis().saturating_sub(checked_at_ms));
        Ok(imported.map(|m| (m, age < route.upstream.config.freshness)))
    }

    /// While the upstream cannot answer (`e`), tag `t` from the peers' records
    /// (`fallback`, the outage queries) when one is newer than ours: served as the peers' tier
    /// gives it while fresh, else stale, with `Warning: 110` like any stale tag. Full Accept only.
    async fn tag_from_peers(
        &self,
        fallback: Option<&Tier>,
        route: &Route,
        t: &Tag,
        accept: Accept,
        e: &UpstreamError,
    ) -> Result<Option<Manifest>, CacheError> {
        let Some(peers) = fallback.filter(|_| accept.is_all()) else {
            return Ok(None);
        };
        let Some((m, fresh)) = self.newer_tag(peers, route, t, accept).await? else {
            return Ok(None);
        };
        if fresh {
            return Ok(Some(m));
        }
        tracing::warn!(upstream = route.upstream.name(), repo = %route.repo, tag = %t, digest = %m.digest, error = %e, "upstream cannot answer; serving the tag as the peers last confirmed it");
        Ok(Some(stale_tag(m, e)))
    }

    /// Stores the manifest `d` for `route` (taking the bytes from the shared `tier` unless
    /// stored here), and points `tag` at it with the tier's check time.
    async fn import_manifest(
        &self,
        tier: &Tier,
        route: &Route,
        d: &Digest,
        tag: Option<(&Tag, u64)>,
    ) -> Result<Option<Manifest>, CacheError> {
        let (media_type, bytes) = match self.store.manifest(d)? {
            Some(m) => m,
            None => {
                let reference = Reference::Digest(d.clone());
                let max = self.max_manifest_size();
                match tier.manifest(route, &reference, Accept::ALL, max).await? {
                    Some(m) => (m.media_type, m.bytes),
                    None => return Ok(None),
                }
            }
        };
        let (store, key, d2, mt, bytes2, tag2) = (
            Arc::clone(&self.store),
            route.key(),
            d.clone(),
            media_type.clone(),
            bytes.clone(),
            tag.map(|(t, at)| (t.clone(), at)),
        );
        blocking(move || {
            store.put_manifest(&key, &d2, &mt, &bytes2, None, None)?;
            if let Some((t, at)) = tag2 {
                store.set_tag(&key, &t, &d2, at)?;
            }
            Ok(())
        })
        .await?;
        Ok(Some(Manifest {
            digest: d.clone(),
            media_type,
            bytes,
            outcome: tier.outcome(),
            stale_reason: None,
        }))
    }

    /// Fetches a manifest from the upstream as it answers a client accepting `accept`, verified,
    /// stores it and points `tag`'s record for `accept` at it.
    async fn download_manifest(
        &self,
        route: &Route,
        reference: &Reference,
        tag: Option<&Tag>,
        accept: Accept,
    ) -> Result<Manifest, CacheError> {
        let up = &route.upstream;
        let origin = self.tiers.origin();
        let max = self.max_manifest_size();
        let Some(TierManifest {
            digest,
            media_type,
            bytes,
        }) = origin.manifest(route, reference, accept, max).await?
        else {
            return Err(CacheError::broken(
                "the upstream gave no manifest and no error",
            ));
        };
        if !digest.matches(&bytes) {
            // A signed schema 1 conversion: signed anew at each request, its bytes do not hash to
            // its digest, so the store (content-addressed) cannot keep it.
            return Ok(Manifest {
                digest,
                media_type,
                bytes,
                outcome: Outcome::Passthrough,
                stale_reason: None,
            });
        }
        let (store, key, d2, mt, bytes2, tag2) = (
            Arc::clone(&self.store),
            route.key(),
            digest.clone(),
            media_type.clone(),
            bytes.clone(),
            tag.cloned(),
        );
        // Owed to the bucket from the manifest's commit on. The bucket's tag records are for the
        // full Accept only.
        let share = Share::Manifest {
            upstream: upstream_id(&up.config.url),
            repo: route.repo.clone(),
            digest: digest.clone(),
            media_type: media_type.clone(),
            bytes: bytes.clone(),
            tag: tag
                .filter(|_| accept.is_all())
                .map(|t| (t.clone(), now_millis())),
        };
        let stored = self
            .commit_and_share(Some(share), move |owed| {
                let tag = tag2.as_ref().map(|t| (t, accept));
                store.put_manifest(&key, &d2, &mt, &bytes2, tag, owed)
            })
            .await;
        let outcome = match stored {
            Ok(()) => origin.outcome(),
            Err(e) => {
                // Verified bytes are still good to serve; they are just not cached.
                tracing::warn!(digest = %digest, error = %e, "cannot store the manifest; serving it uncached");
                if e.is_disk_full() {
                    self.store.set_full(true);
                }
                Outcome::Passthrough
            }
        };
        Ok(Manifest {
            digest,
            media_type,
            bytes,
            outcome,
            stale_reason: None,
        })
    }
}

//! The tier chain: where the cache looks, in order, for what its local store does not hold.
//!
//! # Design
//!
//! regcache answers from tiers, nearest first:
//! 1. the local store (`crate::store`): what this server holds. It heads every lookup (a hit
//!    never leaves it) and is where fills land, so it is not a link of the chain below;
//! 2. the *shared* tiers, which hold what other regcache servers fetched: the peers (`[peers]`,
//!    a fleet of servers filling from each other, with an owner per digest), then the bucket
//!    (`[store.s3]`);
//! 3. the *origin*: the route's upstream registry, always last.
//!
//! [`Tiers`] is that chain after the local store, built once from the configuration — the peers
//! when `[peers]` is set, the bucket when `[store.s3]` is set, the upstream always last — and given
//! to [`Cache::new`](super::Cache::new); nothing is added to it later. [`Tier`] is one link: an
//! enum with one variant per kind of tier (static dispatch: the fill path boxes nothing),
//! answering the questions the cache asks of a tier, each on behalf of one repository R (a
//! [`Route`]):
//!
//! | question | `Tier::` | peers (`peer.rs`) | bucket | upstream |
//! |---|---|---|---|---|
//! | the bytes of blob D from offset O, and its size | `blob` | up: `GET` from D's owner; down: from a holder | GET `blobs/D` from O | `GET /v2/R/blobs/D` (`Range` from O) |
//! | the size of blob D | `blob_size` | down: a holder's `HEAD` | HEAD `blobs/D` | `HEAD /v2/R/blobs/D` |
//! | a URL the client may fetch blob D from | `blob_url` | never | presigned (`redirect`) | never |
//! | does R have blob D | `has_blob` | down: a peer holds it for R | R's `_layers/D` link | `HEAD` |
//! | does R have manifest D | `has_manifest` | down: a peer holds it for R | R's `_manifests/D` link | `HEAD` |
//! | manifest D, verified | `manifest` | a holder's `GET`, digest checked | GET `manifests/D`, size and digest checked | `GET` with the client's `Accept`, digest checked |
//! | what tag T of R points to | `tag` | down: the newest of the peers' records | R's `_tags/T` record (full `Accept` only) | `HEAD` with the client's `Accept` |
//!
//! "up" and "down" are the upstream's breaker: while it answers, the peers are asked only for
//! blobs, and only the owner (rendezvous hashing, `crate::peers`), which fills each blob once for
//! the fleet; manifests and tags go to the upstream as without peers. While it is down, the peers
//! are asked what they hold, with `x-regcache-local-only` (each answers from its store only, all
//! at once, bounded by the peer connect timeout). The same outage queries are the **fallback**
//! ([`Tiers::fallback`]) after the upstream failed as unavailable, unless the walk asked the
//! chain's peer tier them already ([`Tier::asks_holders`] when it asked: not the breaker's state
//! after the failure, which that failure may have changed). A
//! request that came from a peer (a hop) never asks the peers: nothing is forwarded to a third
//! peer, so nothing loops.
//!
//! **The cross-repository rule.** A tier gives R only what R has by the upstream's word. The
//! upstream applies it itself (it answers for R only). A peer answers for R exactly what it would
//! serve a client of R, from its own links. The bucket gives a blob to R when R links it here
//! (the store's link) or in the bucket (a server that fetched or confirmed it for R wrote R's
//! link), and a manifest after R's link (`has_manifest`) or R's tag record (`tag`) named it; a
//! blob whose bucket copy failed verification is not read from the bucket again
//! (`Tier::rejected`), nor is one a peer sent wrong from that peer.
//!
//! **Shared tiers pass; the origin answers.** A shared tier that does not hold what is asked,
//! is skipped after a failure (`bucket::DOWN_FOR`, a peer's breaker), or fails now, answers "not
//! here" (`None`, `false`): the cache asks the next tier, and no request fails because of a
//! shared tier. (One exception: a blob's owner that answers `404` passes on its upstream's
//! answer.) The origin always answers, and its errors reach the client. Only the origin confirms
//! a tag for a client's `Accept`, and only its silence lets the cache serve stale: so the
//! manifest policy (`manifest.rs`) asks the shared tiers in order, then applies freshness,
//! revalidation and stale answers with [`Tiers::origin`].
//!
//! **The walks.** A fill takes the bytes of the first tier, in chain order, that gives them
//! (`Tiers::open_blob`); when that stream breaks, it resumes with a range from the tiers after
//! the one that broke (the origin resumes from itself). A manifest by digest, a tag, a `HEAD`, a
//! redirect, and the check of a blob or manifest stored here for another repository ask
//! [`Tiers::shared`] in order, then the origin. The outcome follows from the tier that answered
//! ([`Tier::outcome`], [`Tier::confirmed`]: `shared` for a shared tier, `miss` or `revalidated`
//! for the origin). What came from the origin is written on to the bucket (`share.rs`); what came
//! from a shared tier is not.
//!
//! **Adding a tier** is one variant here with its answers to these questions, and its place in
//! [`Tiers::new`] when its configuration table is set.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream::BoxStream;

use super::peer::PeerTier;
use super::{lock, CacheError, Outcome, Route};
use crate::bucket::{or_without, upstream_id, Bucket};
use crate::config::Config;
use crate::oci::manifest::media_type_from_body;
use crate::oci::media::{self, Accept};
use crate::oci::reference::{Digest, Reference, Tag};
use crate::peers::{PeerStream, Peers};
use crate::store::{now_millis, Store};
use crate::telemetry::metrics::Metrics;
use crate::upstream::{FetchedManifest, Upstream, UpstreamError};

/// One tier of the chain.
pub enum Tier {
    /// The other servers of the fleet (`[peers]`).
    Peer(PeerTier),
    /// The shared bucket (`[store.s3]`).
    Bucket(BucketTier),
    /// The route's upstream registry: the origin, always last.
    Upstream,
}

/// The bucket as a tier.
pub struct BucketTier {
    bucket: Arc<Bucket>,
    /// Blobs whose copy in the bucket failed verification: asked of the next tier instead.
    bad: Mutex<HashSet<Digest>>,
}

/// The tiers after the local store, in the order they are asked; the upstream is last.
pub struct Tiers {
    /// The shared tiers, in order.
    shared: Vec<Tier>,
    /// The upstream.
    origin: Tier,
    /// The peers' outage queries, asked after the upstream failed as unavailable (not a link of
    /// the chain).
    fallback: Option<Tier>,
}

/// A blob's bytes from one tier.
pub(crate) struct TierBlob {
    pub stream: TierStream,
    /// The blob's size, when the tier announced it.
    pub size: Option<u64>,
    /// The tier's place in the chain (0: the first).
    pub index: usize,
}

/// The stream of a blob's bytes from one tier.
pub(crate) enum TierStream {
    Bucket {
        stream: BoxStream<'static, object_store::Result<Bytes>>,
        bucket: Arc<Bucket>,
    },
    Upstream(reqwest::Response),
    Peer(PeerStream),
}

/// A manifest a tier gave, verified.
pub(crate) struct TierManifest {
    /// Its digest: the one asked for, or (by tag) the one the upstream's bytes hash to.
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What a tier says a tag points to.
pub(crate) struct TierTag {
    /// `None`: the tier did not say (an upstream `HEAD` without `Docker-Content-Digest`).
    pub digest: Option<Digest>,
    /// When the upstream confirmed it (milliseconds since the epoch).
    pub checked_at_ms: u64,
}

impl Tiers {
    /// The chain the configuration describes: the peers when `[peers]` is set, the bucket when
    /// `[store.s3]` is set, then the upstream. The bucket and the peers send their requests on
    /// `runtime`. Contacts nothing.
    pub fn from_config(
        config: &Config,
        metrics: &Arc<Metrics>,
        runtime: &tokio::runtime::Handle,
    ) -> anyhow::Result<Tiers> {
        let peers = match &config.peers {
            Some(p) => Some(Peers::new(
                p,
                config.listen,
                Arc::clone(metrics),
                runtime.clone(),
            )?),
            None => None,
        };
        let bucket = match &config.store.s3 {
            Some(s3) => Some(Bucket::new(s3, Arc::clone(metrics), runtime.clone())?),
            None => None,
        };
        Ok(Tiers::new(peers, bucket))
    }

    /// The chain of these tiers: the peers and the bucket if given, then the upstream.
    pub fn new(peers: Option<Peers>, bucket: Option<Bucket>) -> Tiers {
        let peers = peers.map(Arc::new);
        let mut shared: Vec<Tier> = Vec::new();
        if let Some(p) = &peers {
            shared.push(Tier::Peer(PeerTier::new(Arc::clone(p), false)));
        }
        if let Some(b) = bucket {
            shared.push(Tier::Bucket(BucketTier {
                bucket: Arc::new(b),
                bad: Mutex::new(HashSet::new()),
            }));
        }
        Tiers {
            shared,
            origin: Tier::Upstream,
            fallback: peers.map(|p| Tier::Peer(PeerTier::new(p, true))),
        }
    }

    /// Every tier, in chain order.
    pub fn iter(&self) -> impl Iterator<Item = &Tier> {
        self.shared.iter().chain(std::iter::once(&self.origin))
    }

    /// Every tier in chain order, without the peers unless `peers` (a request from a peer never
    /// asks them).
    pub(crate) fn iter_for(&self, peers: bool) -> impl Iterator<Item = &Tier> {
        self.iter().filter(move |t| peers || !t.is_peer())
    }

    /// The tiers before the upstream, in order.
    pub fn shared(&self) -> impl Iterator<Item = &Tier> {
        self.shared.iter()
    }

    /// The tiers before the upstream, without the peers unless `peers`.
    pub(crate) fn shared_for(&self, peers: bool) -> impl Iterator<Item = &Tier> {
        self.shared.iter().filter(move |t| peers || !t.is_peer())
    }

    /// The peers' outage queries, for a request that may ask peers (`peers`), unless the walk's
    /// peer tier asked them already (`asked`: [`Tier::asks_holders`] was true when the walk asked
    /// it): where to look after the upstream failed as unavailable. `asked` is what the walk saw
    /// when it asked, never the breaker's state now: the upstream failure this falls back from
    /// may itself have opened the breaker meanwhile, and the peers were then not asked.
    pub(crate) fn fallback(&self, peers: bool, asked: bool) -> Option<&Tier> {
        self.fallback.as_ref().filter(|_| peers && !asked)
    }

    /// The fleet, when `[peers]` is configured.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.fallback.as_ref().and_then(|t| match t {
            Tier::Peer(p) => Some(p.peers()),
            _ => None,
        })
    }

    /// The upstream, last in the chain.
    pub fn origin(&self) -> &Tier {
        &self.origin
    }

    /// The shared bucket, when configured: a tier, and where what the upstream gave is shared.
    pub fn bucket(&self) -> Option<&Arc<Bucket>> {
        self.bucket_tier().map(BucketTier::bucket)
    }

    pub(crate) fn bucket_tier(&self) -> Option<&BucketTier> {
        self.shared.iter().find_map(|t| match t {
            Tier::Bucket(b) => Some(b),
            Tier::Peer(_) | Tier::Upstream => None,
        })
    }

    /// Whether some tier may answer a blob GET with a redirect.
    pub(crate) fn redirects(&self) -> bool {
        self.shared.iter().any(|t| match t {
            Tier::Bucket(b) => b.bucket.redirects(),
            Tier::Peer(_) | Tier::Upstream => false,
        })
    }

    /// Blob `d` for `route` from `offset`, from the first tier at or after the `from`th that
    /// gives it (the upstream always does, or fails), the peers only if `peers`. An upstream that
    /// cannot answer leaves the peers that hold the blob ([`Tiers::fallback`]). `total`: the
    /// blob's size, when known.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn open_blob(
        &self,
        store: &Store,
        route: &Route,
        d: &Digest,
        offset: u64,
        total: Option<u64>,
        from: usize,
        peers: bool,
    ) -> Result<TierBlob, CacheError> {
        // Whether this walk asked the peers who holds the blob already.
        let mut asked = false;
        for (index, tier) in self.iter().enumerate().skip(from) {
            if tier.is_peer() && !peers {
                continue;
            }
            asked |= tier.asks_holders(route);
            match tier.blob(store, route, d, offset, total).await {
                Ok(Some((stream, size))) => {
                    return Ok(TierBlob {
                        stream,
                        size,
                        index,
                    })
                }
                Ok(None) => {}
                Err(CacheError::Upstream(e)) if tier.is_origin() && e.is_unavailable() => {
                    // The upstream cannot answer: a peer that holds the blob can.
                    let held = match self.fallback(peers, asked) {
                        Some(f) => f.blob(store, route, d, offset, total).await?,
                        None => None,
                    };
                    let index = self.shared.iter().position(Tier::is_peer).unwrap_or(index);
                    return match held {
                        Some((stream, size)) => Ok(TierBlob {
                            stream,
                            size,
                            index,
                        }),
                        None => Err(e.into()),
                    };
                }
                Err(e) => return Err(e),
            }
        }
        Err(CacheError::broken(
            "no tier of the chain gave the blob, not even the upstream",
        ))
    }

    /// The index of the tier to resume a stream from after the `index`th broke: the next one,
    /// or the upstream itself.
    pub(crate) fn after(&self, index: usize) -> usize {
        (index + 1).min(self.shared.len())
    }

    /// The tier at `index` in chain order.
    pub(crate) fn get(&self, index: usize) -> &Tier {
        self.shared.get(index).unwrap_or(&self.origin)
    }
}

impl BucketTier {
    /// The bucket, unless it is skipped after a failure.
    fn up(&self) -> Option<&Bucket> {
        Some(&*self.bucket).filter(|b| b.is_up())
    }

    /// The bucket.
    pub(crate) fn bucket(&self) -> &Arc<Bucket> {
        &self.bucket
    }

    /// Whether a copy of `d` here failed verification.
    pub(crate) fn is_bad(&self, d: &Digest) -> bool {
        lock(&self.bad).contains(d)
    }

    /// Whether the bucket links blob `d` to `route`'s repository: a server fetched it from the
    /// upstream for that repository, or the upstream confirmed it there.
    async fn links_blob(&self, route: &Route, d: &Digest) -> bool {
        let Some(b) = self.up() else {
            return false;
        };
        let linked = b
            .is_blob_linked(&upstream_id(&route.upstream.config.url), &route.repo, d)
            .await;
        or_without(linked, "blob link")
    }

    /// Whether the bucket may be asked for blob `d` on behalf of `route`'s repository: the
    /// upstream confirmed that repository has it, here (a local link) or to the server that
    /// wrote the bucket's link. A manifest of the repository that names the digest is not enough.
    async fn may_serve_blob(
        &self,
        store: &Store,
        route: &Route,
        d: &Digest,
    ) -> Result<bool, CacheError> {
        if self.up().is_none() || self.is_bad(d) {
            return Ok(false);
        }
        Ok(store.is_linked(&route.key(), d)? || self.links_blob(route, d).await)
    }
}

/// The `source` labels of `regcache_fills_total`: `store` (a hit) and each tier's
/// [`Tier::name`], exported at 0 from the start.
pub const FILL_SOURCES: [&str; 4] = ["store", "peer", "bucket", "upstream"];

impl Tier {
    /// The tier's name, for logs and the `source` label of `regcache_fills_total`.
    pub fn name(&self) -> &'static str {
        match self {
            Tier::Peer(_) => "peer",
            Tier::Bucket(_) => "bucket",
            Tier::Upstream => "upstream",
        }
    }

    /// Whether this is the upstream.
    pub fn is_origin(&self) -> bool {
        matches!(self, Tier::Upstream)
    }

    /// Whether this is the peers.
    pub fn is_peer(&self) -> bool {
        matches!(self, Tier::Peer(_))
    }

    /// Whether this tier, asked now for `route`, asks the peers the outage queries (who holds
    /// what): the chain's peer tier while the upstream's breaker is open. A walk notes it just
    /// before asking the tier, for [`Tiers::fallback`].
    pub(crate) fn asks_holders(&self, route: &Route) -> bool {
        matches!(self, Tier::Peer(p) if p.in_outage(route))
    }

    /// How a request this tier gave the content for is reported.
    pub fn outcome(&self) -> Outcome {
        match self {
            Tier::Peer(_) | Tier::Bucket(_) => Outcome::Shared,
            Tier::Upstream => Outcome::Miss,
        }
    }

    /// How a request is reported that the store answered once this tier confirmed the
    /// repository has the content (stored here for another repository).
    pub fn confirmed(&self) -> Outcome {
        match self {
            Tier::Peer(_) | Tier::Bucket(_) => Outcome::Shared,
            Tier::Upstream => Outcome::Revalidated,
        }
    }

    /// The bytes of blob `d` for `route` from `offset`, with the blob's size when announced;
    /// `None` from a shared tier that may not or cannot give them.
    async fn blob(
        &self,
        store: &Store,
        route: &Route,
        d: &Digest,
        offset: u64,
        total: Option<u64>,
    ) -> Result<Option<(TierStream, Option<u64>)>, CacheError> {
        match self {
            Tier::Peer(p) => Ok(p
                .blob(route, d, offset)
                .await?
                .map(|(s, size)| (TierStream::Peer(s), Some(size)))),
            Tier::Bucket(t) => {
                if !t.may_serve_blob(store, route, d).await? {
                    return Ok(None);
                }
                let blob = or_without(t.bucket.get_blob(d, offset).await, "blob");
                Ok(blob.map(|b| {
                    let stream = TierStream::Bucket {
                        stream: b.stream,
                        bucket: Arc::clone(&t.bucket),
                    };
                    (stream, Some(b.size))
                }))
            }
            Tier::Upstream => {
                let resp = route
                    .upstream
                    .get_blob(&route.repo, d, offset, total)
                    .await?;
                let size = resp.content_length();
                Ok(Some((TierStream::Upstream(resp), size)))
            }
        }
    }

    /// The size of blob `d` for `route`. From a shared tier, `None` means it does not give the
    /// blob; from the upstream, that it did not announce the size.
    pub(crate) async fn blob_size(
        &self,
        store: &Store,
        route: &Route,
        d: &Digest,
    ) -> Result<Option<u64>, CacheError> {
        match self {
            Tier::Peer(p) if p.in_outage(route) => Ok(p.blob_size(route, d).await),
            // While the upstream answers, a HEAD starts a fill, which asks the owner.
            Tier::Peer(_) => Ok(None),
            Tier::Bucket(t) => {
                if !t.may_serve_blob(store, route, d).await? {
                    return Ok(None);
                }
                Ok(or_without(t.bucket.head_blob(d).await, "blob size"))
            }
            Tier::Upstream => Ok(route.upstream.head_blob(&route.repo, d).await?),
        }
    }

    /// A URL `route`'s client may fetch blob `d` from directly (a presigned URL of the bucket's
    /// copy, when `[store.s3] redirect` is on). Never for the upstream.
    pub(crate) async fn blob_url(
        &self,
        store: &Store,
        route: &Route,
        d: &Digest,
    ) -> Result<Option<reqwest::Url>, CacheError> {
        match self {
            Tier::Bucket(t) => {
                if !t.bucket.redirects() || !t.may_serve_blob(store, route, d).await? {
                    return Ok(None);
                }
                Ok(or_without(t.bucket.blob_url(d).await, "presigned URL"))
            }
            Tier::Peer(_) | Tier::Upstream => Ok(None),
        }
    }

    /// Whether `route`'s repository has blob `d`, by this tier's word. The upstream says yes or
    /// fails (a `404` is its "no", for the client).
    pub(crate) async fn has_blob(&self, route: &Route, d: &Digest) -> Result<bool, CacheError> {
        match self {
            Tier::Peer(p) => Ok(p.in_outage(route) && p.holds(route, "blobs", d).await),
            Tier::Bucket(t) => Ok(t.links_blob(route, d).await),
            Tier::Upstream => {
                route.upstream.head_blob(&route.repo, d).await?;
                Ok(true)
            }
        }
    }

    /// Whether `route`'s repository has manifest `d`, by this tier's word. The upstream says yes
    /// or fails.
    pub(crate) async fn has_manifest(&self, route: &Route, d: &Digest) -> Result<bool, CacheError> {
        match self {
            Tier::Peer(p) => Ok(p.in_outage(route) && p.holds(route, "manifests", d).await),
            Tier::Bucket(t) => {
                let Some(b) = t.up() else {
                    return Ok(false);
                };
                let linked = b
                    .is_linked(&upstream_id(&route.upstream.config.url), &route.repo, d)
                    .await;
                Ok(or_without(linked, "manifest link"))
            }
            Tier::Upstream => {
                route
                    .upstream
                    .head_manifest(&route.repo, &d.to_string(), Accept::ALL)
                    .await?;
                Ok(true)
            }
        }
    }

    /// The manifest `reference` as this tier gives it to a client accepting `accept`, verified,
    /// at most `max` bytes. The bucket holds manifests by digest for the full `Accept` only, and
    /// gives one only to a caller that has established `route`'s repository has it
    /// ([`Tier::has_manifest`] or [`Tier::tag`]).
    pub(crate) async fn manifest(
        &self,
        route: &Route,
        reference: &Reference,
        accept: Accept,
        max: u64,
    ) -> Result<Option<TierManifest>, CacheError> {
        match self {
            Tier::Peer(p) => match reference {
                Reference::Digest(d) if accept.is_all() => Ok(p.manifest(route, d, max).await),
                _ => Ok(None),
            },
            Tier::Bucket(t) => {
                let Reference::Digest(d) = reference else {
                    return Ok(None);
                };
                if !accept.is_all() {
                    return Ok(None);
                }
                let Some((mt, bytes)) = or_without(t.bucket.manifest(d, max).await, "manifest")
                else {
                    return Ok(None);
                };
                if bytes.len() as u64 > max || !d.matches(&bytes) {
                    t.bucket.corrupt();
                    tracing::warn!(digest = %d, "the bucket's copy of a manifest is oversized or does not match its digest; ignoring it");
                    return Ok(None);
                }
                let media_type = mt
                    .filter(|m| m.contains('/') && m != "application/octet-stream")
                    .or_else(|| media_type_from_body(&bytes))
                    .unwrap_or_else(|| media::OCI_MANIFEST.into());
                Ok(Some(TierManifest {
                    digest: d.clone(),
                    media_type,
                    bytes,
                }))
            }
            Tier::Upstream => {
                let up = &route.upstream;
                let fetched = up
                    .get_manifest(&route.repo, &reference.to_string(), max, accept)
                    .await?;
                let expected = match reference {
                    Reference::Digest(d) => Some(d),
                    Reference::Tag(_) => None,
                };
                let digest = verify_manifest(up, &fetched, expected)?;
                Ok(Some(TierManifest {
                    digest,
                    media_type: fetched.media_type,
                    bytes: fetched.bytes,
                }))
            }
        }
    }

    /// What tag `t` of `route`'s repository points to for a client accepting `accept`. The
    /// bucket's records are for the full `Accept` only. The upstream is asked only to revalidate
    /// a tag cached here, so it is given no longer than its connect timeout.
    pub(crate) async fn tag(
        &self,
        route: &Route,
        t: &Tag,
        accept: Accept,
    ) -> Result<Option<TierTag>, CacheError> {
        match self {
            Tier::Peer(p) if p.in_outage(route) && accept.is_all() => Ok(p.tag(route, t).await),
            Tier::Peer(_) => Ok(None),
            Tier::Bucket(b) => {
                let Some(bucket) = b.up().filter(|_| accept.is_all()) else {
                    return Ok(None);
                };
                let rec = bucket
                    .tag(&upstream_id(&route.upstream.config.url), &route.repo, t)
                    .await;
                let Some(rec) = or_without(rec, "tag record") else {
                    return Ok(None);
                };
                let Ok(d) = rec.digest.parse::<Digest>() else {
                    return Ok(None);
                };
                Ok(Some(TierTag {
                    digest: Some(d),
                    checked_at_ms: rec.checked_at_ms,
                }))
            }
            Tier::Upstream => {
                let up = &route.upstream;
                let head = tokio::time::timeout(
                    up.config.connect_timeout,
                    up.head_manifest(&route.repo, t.as_str(), accept),
                )
                .await;
                let head = match head {
                    Ok(r) => r?,
                    Err(_) => {
                        let e = UpstreamError::Timeout {
                            upstream: up.name().to_owned(),
                            what: "tag revalidation",
                        };
                        up.record_failure(&e);
                        return Err(e.into());
                    }
                };
                Ok(Some(TierTag {
                    digest: head.digest,
                    checked_at_ms: now_millis(),
                }))
            }
        }
    }

    /// Notes that this tier's copy of blob `d` failed verification: it is not asked for it again
    /// (the upstream's copy is simply not kept).
    pub(crate) fn rejected(&self, d: &Digest) {
        match self {
            Tier::Bucket(t) => {
                tracing::error!(digest = %d, "the shared bucket's copy of a blob failed verification; using the upstream for it from now on");
                t.bucket.corrupt();
                lock(&t.bad).insert(d.clone());
            }
            // The peer that sent it is known by its stream (`TierStream::peer`).
            Tier::Peer(_) | Tier::Upstream => {}
        }
    }
}

impl TierStream {
    /// Whether the bytes come from the upstream.
    pub(crate) fn is_origin(&self) -> bool {
        matches!(self, TierStream::Upstream(_))
    }

    /// The peer sending these bytes, when they come from one.
    pub(crate) fn peer(&self) -> Option<&Arc<crate::peers::Peer>> {
        match self {
            TierStream::Peer(s) => Some(s.peer()),
            _ => None,
        }
    }

    /// The next chunk (`Ok(None)` at the end). A shared tier that fails, or sends nothing for the
    /// upstream's `idle_timeout`, is recorded as failed (a peer is marked down) and its stream ends
    /// there: the fill resumes from the next tier. Only the upstream's stream fails.
    pub(crate) async fn next_chunk(
        &mut self,
        up: &Upstream,
    ) -> Result<Option<Bytes>, UpstreamError> {
        match self {
            TierStream::Upstream(resp) => up.next_chunk(resp).await,
            TierStream::Peer(s) => Ok(s.next_chunk(up.config.idle_timeout).await),
            TierStream::Bucket { stream, bucket } => {
                let idle = up.config.idle_timeout;
                match tokio::time::timeout(idle, futures_util::StreamExt::next(stream)).await {
                    Ok(Some(Ok(c))) => Ok(Some(c)),
                    Ok(None) => Ok(None),
                    Ok(Some(Err(e))) => {
                        bucket.failed("get", &e);
                        Ok(None)
                    }
                    Err(_) => {
                        bucket.failed("get", &format!("no data for {idle:?}"));
                        Ok(None)
                    }
                }
            }
        }
    }
}

/// The digest a client gets for a manifest body: the header's algorithm if given, else sha256.
/// A signed schema 1 manifest's digest covers its body without the signatures.
fn verify_manifest(
    up: &Upstream,
    fetched: &FetchedManifest,
    expected: Option<&Digest>,
) -> Result<Digest, CacheError> {
    let header = fetched.header_digest.as_ref();
    let signed;
    let bytes: &[u8] = if fetched.media_type == media::DOCKER_SCHEMA1_SIGNED {
        signed = media::schema1_payload(&fetched.bytes).ok_or_else(|| UpstreamError::Invalid {
            upstream: up.name().to_owned(),
            detail: "a schema 1 manifest without a readable signature".into(),
            source: None,
        })?;
        &signed
    } else {
        &fetched.bytes
    };
    let alg_of = expected.or(header);
    let actual = match alg_of {
        Some(d) => {
            let mut h = d.hasher();
            h.update(bytes);
            h.finish()
        }
        None => Digest::sha256_of(bytes),
    };
    for want in [expected, header].into_iter().flatten() {
        if *want != actual && want.algorithm() == actual.algorithm() {
            return Err(CacheError::DigestMismatch {
                upstream: up.name().to_owned(),
                expected: want.to_string(),
                actual: actual.to_string(),
            });
        }
    }
    Ok(actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(config: &str) -> Vec<&'static str> {
        let config =
            crate::config::Config::parse(config, "test", &crate::config::Overrides::default())
                .expect("config");
        let metrics = Arc::new(Metrics::new());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let tiers = Tiers::from_config(&config, &metrics, rt.handle()).expect("tiers");
        let names: Vec<_> = tiers.iter().map(Tier::name).collect();
        // A stream that breaks resumes from the next tier; the upstream resumes from itself.
        let last = names.len() - 1;
        assert_eq!(
            tiers.after(0),
            1.min(last),
            "a break resumes from the next tier"
        );
        assert_eq!(tiers.after(last), last, "the upstream resumes from itself");
        assert!(tiers.origin().is_origin() && tiers.get(last).is_origin());
        names
    }

    #[test]
    fn the_tier_chain_follows_the_configured_tables_with_the_upstream_last() {
        let upstream = "[upstreams.docker]\nurl = \"http://127.0.0.1:9\"\n";
        assert_eq!(
            chain(upstream),
            ["upstream"],
            "without [store.s3] the upstream is the only tier"
        );
        let with_bucket = format!(
            "{upstream}[store.s3]\nbucket = \"fleet-cache\"\nendpoint = \"http://127.0.0.1:9\"\n"
        );
        assert_eq!(
            chain(&with_bucket),
            ["bucket", "upstream"],
            "[store.s3] puts the bucket before the upstream"
        );
        let peers = "[peers]\nurls = [\"http://127.0.0.2:5000\"]\ntoken_env = \"PATH\"\n";
        assert_eq!(
            chain(&format!("{with_bucket}{peers}")),
            ["peer", "bucket", "upstream"],
            "[peers] puts the peers first: the owner fills from the bucket for the fleet"
        );
    }
}

//! The blob entry point: a blob from the store (once its repository is confirmed), from a fill in
//! progress (joined), or from a new fill; a `HEAD` answered without a fill where a tier can; the
//! redirect to a shared tier's copy.

use std::sync::Arc;

use super::share::Share;
use super::{lock, Asker, Blob, BlobSource, Cache, CacheError, Outcome, Route};
use crate::bucket::upstream_id;
use crate::oci::reference::Digest;

impl Cache {
    /// Whether a fill of `d` for `route` is under way, without joining or starting one:
    /// `Some(true)` while it fetches or commits, `Some(false)` for a fill on a full disk, served
    /// from memory and never committed. A commit records the blob before its fill leaves `fills`.
    pub fn filling(&self, route: &Route, d: &Digest) -> Option<bool> {
        let key = route.key();
        let fill =
            Arc::clone(lock(&self.fills).get(&format!("{}/{}@{}", key.upstream, key.repo, d))?);
        let to_disk = fill.disk_len().is_none();
        Some(to_disk)
    }

    /// A blob for `GET` (`want_body`) or `HEAD`, for a client.
    pub async fn blob(
        self: &Arc<Self>,
        route: &Route,
        d: &Digest,
        want_body: bool,
    ) -> Result<Blob, CacheError> {
        self.blob_for(route, d, want_body, Asker::Client).await
    }

    /// A blob for `GET` (`want_body`) or `HEAD`, for a client or a peer (`asker`). A `GET`'s
    /// answer is counted in `regcache_fills_total` by where its bytes come from.
    pub async fn blob_for(
        self: &Arc<Self>,
        route: &Route,
        d: &Digest,
        want_body: bool,
        asker: Asker,
    ) -> Result<Blob, CacheError> {
        let (blob, source) = self.find_blob(route, d, want_body, asker).await?;
        if want_body {
            self.metrics
                .fills
                .get_or_create(&vec![("source", source.to_owned())])
                .inc();
        }
        Ok(blob)
    }

    /// [`Cache::blob_for`], with where the bytes come from (`store`, or a fill's tier).
    async fn find_blob(
        self: &Arc<Self>,
        route: &Route,
        d: &Digest,
        want_body: bool,
        asker: Asker,
    ) -> Result<(Blob, &'static str), CacheError> {
        let key = route.key();
        let peers = asker.may_ask_peers();
        if !want_body {
            // HEAD of a stored blob: the database alone answers.
            if let Some((size, true)) = self.store.lookup_blob(&key, d)? {
                let blob = Blob {
                    size: Some(size),
                    source: BlobSource::Empty,
                    outcome: Outcome::Hit,
                };
                return Ok((blob, "store"));
            }
        }
        let local_only = asker == Asker::Peer { local_only: true };
        if let Some((file, size)) = self.store.open_blob(d)? {
            let mut outcome = Outcome::Hit;
            if !self.store.is_linked(&key, d)? {
                if local_only {
                    return Err(CacheError::NotStored("blob not stored for this repository"));
                }
                outcome = self.confirm_blob(route, d, size, peers).await?;
            }
            let blob = Blob {
                size: Some(size),
                source: if want_body {
                    self.store.touch(d);
                    BlobSource::File(file, self.store.hold(d))
                } else {
                    BlobSource::Empty
                },
                outcome,
            };
            return Ok((blob, "store"));
        }
        let fill_key = format!("{}/{}@{}", key.upstream, key.repo, d);
        let existing = {
            let fills = lock(&self.fills);
            match fills.get(&fill_key) {
                // A peer's outage query joins only a fill that has its bytes coming: one still
                // looking for a source may be asking that very peer, and each would wait for the
                // other.
                Some(f) if local_only && !f.has_source() => None,
                Some(f) => {
                    let reader = if want_body {
                        Some(self.attach(f, d)?)
                    } else {
                        None
                    };
                    Some((Arc::clone(f), reader))
                }
                None => None,
            }
        };
        if local_only && existing.is_none() {
            return Err(CacheError::NotStored("blob not stored"));
        }
        if !want_body && existing.is_none() {
            // A HEAD of a blob nobody is fetching: a shared tier that holds it answers.
            for tier in self.tiers.shared_for(peers) {
                if let Some(size) = tier.blob_size(&self.store, route, d).await? {
                    let blob = Blob {
                        size: Some(size),
                        source: BlobSource::Empty,
                        outcome: tier.outcome(),
                    };
                    return Ok((blob, tier.name()));
                }
            }
        }
        let (fill, reader, mut outcome) = match existing {
            Some((f, reader)) => (f, reader, Outcome::Coalesced),
            None if !want_body => {
                // A HEAD of a blob nobody is fetching: start the fill if a slot is free (so a
                // HEAD through a chain of mirrors fills each of them), else just ask.
                match self.free_fill_slot() {
                    Some(slot) => self.start_fill(route, d, fill_key, slot, false, peers)?,
                    None => {
                        let origin = self.tiers.origin();
                        let size = origin.blob_size(&self.store, route, d).await?;
                        let blob = Blob {
                            size,
                            source: BlobSource::Empty,
                            outcome: Outcome::Passthrough,
                        };
                        return Ok((blob, origin.name()));
                    }
                }
            }
            None => {
                let slot = self.fill_slot().await?;
                self.start_fill(route, d, fill_key, slot, true, peers)?
            }
        };
        let size = fill.wait_started().await?;
        if outcome == Outcome::Miss && fill.is_shared() {
            outcome = Outcome::Shared;
        }
        let blob = Blob {
            size,
            source: match reader {
                Some(r) => BlobSource::Fill(r),
                None => BlobSource::Empty,
            },
            outcome,
        };
        Ok((blob, fill.source()))
    }

    /// How blob `d`, stored here for another repository, may be served to `route`'s: once a
    /// tier confirms that this repository has it — a shared tier's link (a server that fetched
    /// or confirmed it for the repository), else the upstream now (its "no" reaches the client)
    /// — and the link is recorded. A manifest of this repository that names the digest is a
    /// claim, not proof. `size`: the blob's, for the bucket. While the upstream cannot answer, a
    /// peer that holds the blob for this repository confirms it (the upstream confirmed it to
    /// that peer), when `peers`.
    async fn confirm_blob(
        &self,
        route: &Route,
        d: &Digest,
        size: u64,
        peers: bool,
    ) -> Result<Outcome, CacheError> {
        // Whether the peers were asked who holds the blob for this repository already.
        let mut asked = false;
        for tier in self.tiers.iter_for(peers) {
            asked |= tier.asks_holders(route);
            let has = match tier.has_blob(route, d).await {
                Err(CacheError::Upstream(e)) if e.is_unavailable() => {
                    match self.tiers.fallback(peers, asked) {
                        Some(f) if f.has_blob(route, d).await? => {
                            let (store, key, d2) =
                                (Arc::clone(&self.store), route.key(), d.clone());
                            self.commit_and_share(None, move |owed| store.link(&key, &d2, owed))
                                .await?;
                            return Ok(f.confirmed());
                        }
                        _ => return Err(e.into()),
                    }
                }
                r => r?,
            };
            if !has {
                continue;
            }
            // The upstream's confirmation goes to the bucket too, owed from the link's record
            // on, so that another server may serve the blob for this repository while the
            // upstream is down.
            let share = tier.is_origin().then(|| Share::Blob {
                digest: d.clone(),
                size,
                link: Some((upstream_id(&route.upstream.config.url), route.repo.clone())),
            });
            let (store, key, d2) = (Arc::clone(&self.store), route.key(), d.clone());
            self.commit_and_share(share, move |owed| store.link(&key, &d2, owed))
                .await?;
            return Ok(tier.confirmed());
        }
        Err(CacheError::broken(
            "no tier of the chain answered for a blob, not even the upstream",
        ))
    }

    /// A URL the client may fetch blob `d` from itself: a presigned URL of the bucket's copy,
    /// when `[store.s3] redirect` is on, the blob is not in the local tier, and `route`'s
    /// repository may have it.
    pub async fn blob_redirect(
        &self,
        route: &Route,
        d: &Digest,
    ) -> Result<Option<reqwest::Url>, CacheError> {
        // Cheap checks first: this runs before every blob GET when a bucket is configured.
        if !self.tiers.redirects() || self.store.blob_size(d)?.is_some() {
            return Ok(None);
        }
        for tier in self.tiers.shared() {
            if let Some(url) = tier.blob_url(&self.store, route, d).await? {
                return Ok(Some(url));
            }
        }
        Ok(None)
    }
}

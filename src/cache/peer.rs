//! The fleet as a tier of the chain (`Tier::Peer`): a blob from its owner while the upstream
//! answers, and the outage queries (which peer holds a blob or manifest for a repository, what
//! its peers' records say a tag points to) while it does not. The peers themselves, their health
//! and the requests are `crate::peers`'; the walks that ask this tier are `tier.rs`'s.
//!
//! Every request names the route explicitly (`?ns=<the upstream's first host>`), so that the peer
//! routes it to the same upstream and repository, and the peer answers it as it would answer a
//! client for that repository (the cross-repository rule holds across the fleet). Everything a
//! peer gives is verified here before it is used or committed: blobs by the fill, manifests
//! below.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::{Method, StatusCode};

use super::tier::{TierManifest, TierTag};
use super::{CacheError, Route};
use crate::oci::manifest::media_type_from_body;
use crate::oci::media;
use crate::oci::reference::{Digest, Tag};
use crate::peers::{PeerAnswer, PeerError, PeerStream, Peers, Want, CHECKED_AT_HEADER};
use crate::store::now_millis;
use crate::upstream::UpstreamError;

/// The peers as a tier.
pub struct PeerTier {
    peers: Arc<Peers>,
    /// Asked whatever the upstream's state (the fallback after the upstream failed), only ever
    /// with the outage queries; else the chain's tier: the owner while the upstream is up, the
    /// outage queries while its breaker has it down.
    outage_only: bool,
}

/// A blob from a peer: its stream and the blob's size.
pub(crate) type PeerBlob = (PeerStream, u64);

impl PeerTier {
    pub(super) fn new(peers: Arc<Peers>, outage_only: bool) -> PeerTier {
        PeerTier { peers, outage_only }
    }

    pub(crate) fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Whether this tier answers with the outage queries for `route` now.
    pub(super) fn in_outage(&self, route: &Route) -> bool {
        self.outage_only || !route.upstream.is_up()
    }

    /// `/v2/<repo>/<kind>/<reference>?ns=<host>`: the route made explicit.
    fn path(route: &Route, kind: &str, reference: &str) -> String {
        let ns = route
            .upstream
            .config
            .hosts
            .first()
            .map(|h| format!("?ns={}", utf8_percent_encode(h, NON_ALPHANUMERIC)))
            .unwrap_or_default();
        format!("/v2/{}/{kind}/{reference}{ns}", route.repo)
    }

    /// A local-only request for `path`, bounded like every outage query.
    fn query<'a>(&self, method: Method, path: &'a str, from: u64) -> Want<'a> {
        Want {
            method,
            path,
            local_only: true,
            from,
            wait: self.peers.query_wait(),
        }
    }

    /// Blob `d` for `route`: from its owner while the upstream answers (the owner fills it once
    /// for the fleet), else from a peer that holds it.
    pub(super) async fn blob(
        &self,
        route: &Route,
        d: &Digest,
        offset: u64,
    ) -> Result<Option<PeerBlob>, CacheError> {
        if self.in_outage(route) || offset > 0 {
            return Ok(self.holder_blob(route, d, offset).await);
        }
        self.owner_blob(route, d).await
    }

    /// Blob `d` from the healthy peers ranked above this server for it, best first: the first
    /// that answers gives it (its own fill, single flight for every server asking). One that
    /// fails (no answer, not a peer) is marked down and the next is asked. A `404` is the owner's
    /// upstream's answer and is passed on (the upstream was asked already). Any other answer is a
    /// live owner that cannot give the blob now (its upstream failed, its fills are all busy):
    /// the next in rank would ask the same upstream, so a peer that holds the blob for the
    /// repository gives it if one does (an owner's `5xx` is most often its upstream's outage,
    /// which this server's upstream shares: asking it would cost another `header_timeout`),
    /// else this server's own tiers are next.
    async fn owner_blob(&self, route: &Route, d: &Digest) -> Result<Option<PeerBlob>, CacheError> {
        let up = &route.upstream;
        let path = Self::path(route, "blobs", &d.to_string());
        let want = Want {
            method: Method::GET,
            path: &path,
            local_only: false,
            from: 0,
            // The owner may wait for its own upstream first.
            wait: up.config.header_timeout + self.peers.query_wait(),
        };
        for peer in self.peers.owners(d) {
            let response = match self.peers.ask(&peer, &want).await {
                Ok(r) => r,
                // Where this server is in the list, the peers after it rank below it.
                Err(PeerError::Itself { .. }) => break,
                Err(_) => continue,
            };
            match (response.status(), length(&response)) {
                // A size is what tells a cut stream from a whole one.
                (StatusCode::OK, Some(size)) => {
                    let answer = PeerAnswer { peer, response };
                    return Ok(Some((PeerStream::new(&self.peers, answer), size)));
                }
                (StatusCode::NOT_FOUND, _) if is_unknown(response, "BLOB_UNKNOWN").await => {
                    return Err(UpstreamError::Status {
                        upstream: up.name().to_owned(),
                        status: 404,
                        path: format!(
                            "/v2/{}/blobs/{d} (answered by peer {})",
                            route.repo,
                            peer.url()
                        ),
                        retry_after: None,
                    }
                    .into());
                }
                _ => return Ok(self.holder_blob(route, d, 0).await),
            }
        }
        Ok(None)
    }

    /// Blob `d` from `offset` from a peer that holds it for `route`'s repository: every healthy
    /// peer is asked at once with a local-only `HEAD`, and the first to answer `200` is asked for
    /// the bytes.
    async fn holder_blob(&self, route: &Route, d: &Digest, offset: u64) -> Option<PeerBlob> {
        let path = Self::path(route, "blobs", &d.to_string());
        let held = self
            .peers
            .first_holder(&self.query(Method::HEAD, &path, 0), d)
            .await?;
        let peer = held.peer;
        let get = self.query(Method::GET, &path, offset);
        let response = self.peers.ask(&peer, &get).await.ok()?;
        let size = match response.status() {
            StatusCode::OK if offset == 0 => length(&response),
            StatusCode::PARTIAL_CONTENT => range_total(&response, offset),
            _ => None,
        }?;
        let answer = PeerAnswer { peer, response };
        Some((PeerStream::new(&self.peers, answer), size))
    }

    /// The size of blob `d` as a peer that holds it for `route`'s repository announces it.
    pub(super) async fn blob_size(&self, route: &Route, d: &Digest) -> Option<u64> {
        let path = Self::path(route, "blobs", &d.to_string());
        let held = self
            .peers
            .first_holder(&self.query(Method::HEAD, &path, 0), d)
            .await?;
        length(&held.response)
    }

    /// Whether a peer holds blob (`kind` `blobs`) or manifest (`manifests`) `d` for `route`'s
    /// repository: it answers only for a repository the upstream confirmed has it.
    pub(super) async fn holds(&self, route: &Route, kind: &str, d: &Digest) -> bool {
        let path = Self::path(route, kind, &d.to_string());
        self.peers
            .first_holder(&self.query(Method::HEAD, &path, 0), d)
            .await
            .is_some()
    }

    /// Manifest `d` of `route`'s repository from a peer that holds it, verified against `d` and
    /// `max`. A copy that fails is not asked of that peer again.
    pub(super) async fn manifest(
        &self,
        route: &Route,
        d: &Digest,
        max: u64,
    ) -> Option<TierManifest> {
        let path = Self::path(route, "manifests", &d.to_string());
        let held = self
            .peers
            .first_holder(&self.query(Method::GET, &path, 0), d)
            .await?;
        let PeerAnswer { peer, response } = held;
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = read_bounded(response, max, self.peers.query_wait()).await;
        let Some(bytes) = bytes.filter(|b| d.matches(b)) else {
            peer.rejected(d);
            return None;
        };
        let media_type = content_type
            .filter(|m| m.contains('/') && m != "application/octet-stream")
            .or_else(|| media_type_from_body(&bytes))
            .unwrap_or_else(|| media::OCI_MANIFEST.into());
        Some(TierManifest {
            digest: d.clone(),
            media_type,
            bytes,
        })
    }

    /// What tag `t` of `route`'s repository points to by the most recently confirmed record among
    /// the peers that have one (the time capped at this server's clock).
    pub(super) async fn tag(&self, route: &Route, t: &Tag) -> Option<TierTag> {
        let path = Self::path(route, "manifests", t.as_str());
        let answers = self
            .peers
            .ask_others(&self.query(Method::HEAD, &path, 0))
            .await;
        let newest = answers
            .iter()
            .filter(|a| a.response.status() == StatusCode::OK)
            .filter_map(|a| {
                let h = a.response.headers();
                let digest: Digest = h
                    .get("docker-content-digest")?
                    .to_str()
                    .ok()?
                    .parse()
                    .ok()?;
                let at: u64 = h.get(CHECKED_AT_HEADER)?.to_str().ok()?.parse().ok()?;
                Some((at, digest))
            })
            .max_by_key(|(at, _)| *at)?;
        Some(TierTag {
            digest: Some(newest.1),
            checked_at_ms: newest.0.min(now_millis()),
        })
    }
}

/// A response's `Content-Length` header (reqwest's `content_length` is the body's, which a
/// `HEAD` does not have).
fn length(r: &reqwest::Response) -> Option<u64> {
    r.headers()
        .get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The total size of a `206` whose `Content-Range` starts at `offset`.
fn range_total(r: &reqwest::Response, offset: u64) -> Option<u64> {
    let v = r
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    (start.parse::<u64>().ok()? == offset)
        .then(|| total.parse().ok())
        .flatten()
}

/// Whether a `404`'s OCI error code is `code` (a peer's "unknown", not a route it lacks).
async fn is_unknown(r: reqwest::Response, code: &str) -> bool {
    let Some(body) = read_bounded(r, 64 << 10, Duration::from_secs(1)).await else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(|c| c == code))
        .unwrap_or(false)
}

/// A body of at most `max` bytes read within `within`; `None` if larger, late or broken.
async fn read_bounded(mut r: reqwest::Response, max: u64, within: Duration) -> Option<Bytes> {
    if length(&r).is_some_and(|l| l > max) {
        return None;
    }
    let read = async {
        let mut out = Vec::new();
        while let Some(c) = r.chunk().await.ok()? {
            if (out.len() + c.len()) as u64 > max {
                return None;
            }
            out.extend_from_slice(&c);
        }
        Some(Bytes::from(out))
    };
    tokio::time::timeout(within, read).await.ok().flatten()
}

//! Peer requests, the server side: recognising a request from another server of the fleet
//! (`[peers]`) and checking its token, answering it through the normal cache path without asking
//! the peers (a hop is never forwarded) or from the store alone (`x-regcache-local-only`), and the
//! headers its answers carry (`x-regcache-server-id`, `x-regcache-checked-at`).
//!
//! A request with the token header or the hop header is a peer request. The token is compared in
//! constant time; a wrong or missing one is `403 DENIED` and counts as a failed login of the
//! client's address (`[access]` limits). `[access] allow` applies before any of this; a valid
//! token stands in for htpasswd credentials. The cross-repository rule holds as for a client:
//! the cache answers a peer for a repository only what it would serve a client of it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderValue;
use http::{Request, Response};

use crate::app::App;
use crate::cache::{Asker, CacheError, Manifest, Route};
use crate::http::auth::Verifier;
use crate::http::error::{ApiError, Code};
use crate::http::response::Body;
use crate::oci::media::Accept;
use crate::oci::reference::Reference;
use crate::peers::{
    CHECKED_AT_HEADER, HOP_HEADER, LOCAL_ONLY_HEADER, SERVER_ID_HEADER, TOKEN_HEADER,
};

/// A request from a peer whose token was right.
#[derive(Debug, Clone, Copy)]
pub struct PeerCall {
    /// How the cache answers it.
    pub asker: Asker,
    /// It carries this server's own id: the sender reached itself.
    pub from_self: bool,
}

/// Whether `req` is a peer request, with its token checked: `Ok(None)` for a client's request,
/// else the call, or `403 DENIED` (`429` while the client's address has too many failures
/// pending) with the limit it counts under.
pub fn recognise(
    app: &Arc<App>,
    auth: &Verifier,
    client: SocketAddr,
    req: &Request<hyper::body::Incoming>,
) -> Result<Option<PeerCall>, (ApiError, &'static str)> {
    let h = req.headers();
    if !h.contains_key(TOKEN_HEADER) && !h.contains_key(HOP_HEADER) {
        return Ok(None);
    }
    let denied = |why: &str| (ApiError::new(Code::Denied, why.to_owned()), "peer_token");
    let Some(peers) = app.cache.peers() else {
        return Err(denied(
            "this server has no [peers]: it answers no peer requests",
        ));
    };
    if let Some(wait) = auth.address_limited(client.ip()) {
        let secs = wait.as_secs().max(1);
        return Err((
            ApiError {
                retry_after: Some(secs.to_string()),
                ..ApiError::new(
                    Code::TooManyRequests,
                    format!("too many failed logins from this address; retry in {secs} s"),
                )
            },
            "auth_rate",
        ));
    }
    let given = h.get(TOKEN_HEADER).map(HeaderValue::as_bytes);
    if !given.is_some_and(|t| peers.token_is(t)) {
        auth.address_failed(client.ip());
        return Err(denied(if given.is_some() {
            "wrong peer token"
        } else {
            "a peer request needs the fleet's token (x-regcache-peer-token)"
        }));
    }
    let from_self = h
        .get(SERVER_ID_HEADER)
        .is_some_and(|id| id.as_bytes() == peers.server_id().as_bytes());
    Ok(Some(PeerCall {
        asker: Asker::Peer {
            local_only: h.contains_key(LOCAL_ONLY_HEADER),
        },
        from_self,
    }))
}

/// The answer to a peer that reached this server itself: at once, without touching the cache
/// (it would wait for its own fill). The server id on it tells the sender.
pub fn refuse_self(call: Option<PeerCall>) -> Option<ApiError> {
    call.filter(|c| c.from_self).map(|_| {
        ApiError::new(
            Code::LoopDetected,
            "this peer request came from this server itself",
        )
    })
}

/// Adds this server's id to the answer to a peer request, and counts its body (its
/// `Content-Length`) in `regcache_peer_sent_bytes_total`.
pub fn answered(app: &App, call: Option<PeerCall>, resp: &mut Response<Body>, head: bool) {
    let (Some(_), Some(peers)) = (call, app.cache.peers()) else {
        return;
    };
    if let Ok(v) = HeaderValue::from_str(peers.server_id()) {
        resp.headers_mut().insert(SERVER_ID_HEADER, v);
    }
    let bytes = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if !head && resp.status().is_success() {
        app.metrics.peer_sent_bytes.inc_by(bytes);
    }
}

/// A manifest for a client or a peer, with, for a peer's local-only query by tag, the time its
/// record was confirmed (for [`CHECKED_AT_HEADER`]).
pub async fn manifest(
    app: &Arc<App>,
    route: &Route,
    reference: &Reference,
    accept: Accept,
    call: Option<PeerCall>,
) -> Result<(Manifest, Option<u64>), CacheError> {
    match call.map(|c| c.asker) {
        Some(Asker::Peer { local_only: true }) => app.cache.local_manifest(route, reference),
        Some(asker) => Ok((
            app.cache
                .manifest_for(route, reference, accept, asker)
                .await?,
            None,
        )),
        None => Ok((app.cache.manifest(route, reference, accept).await?, None)),
    }
}

/// Sets [`CHECKED_AT_HEADER`] when a tag's confirmation time is known.
pub fn checked_at(h: &mut http::HeaderMap, at: Option<u64>) {
    if let Some(at) = at {
        h.insert(CHECKED_AT_HEADER, HeaderValue::from(at));
    }
}

//! Requests to peers: one request with the peer headers, bounded so that a dead or black-holed
//! peer costs one timeout; the same request to every healthy peer at once (the outage queries);
//! probes; and a peer's body as a stream of chunks. Every outcome updates the peer's health.
//! Each request is sent by a task of the background runtime (`crate::runtime::on_runtime`), so
//! that its pooled connection never lives on a shard.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use reqwest::{Method, Response};

use super::{
    Peer, Peers, Settings, ANSWER_WAIT, HOP_HEADER, LOCAL_ONLY_HEADER, SERVER_ID_HEADER,
    TOKEN_HEADER,
};
use crate::oci::reference::Digest;
use crate::runtime::{on_runtime, Stopped};
use crate::telemetry::metrics::Metrics;

/// What to ask a peer.
pub struct Want<'a> {
    /// `GET` or `HEAD`.
    pub method: Method,
    /// Path and query on the peer (`/v2/<repo>/blobs/<digest>?ns=<host>`).
    pub path: &'a str,
    /// Answer from the store only (the outage queries).
    pub local_only: bool,
    /// First byte wanted: sent as `Range: bytes=<from>-` when above 0.
    pub from: u64,
    /// How long the answer's headers may take. Longer than the connect timeout plus
    /// [`ANSWER_WAIT`], a probe checks at the connect timeout that the peer is alive.
    pub wait: Duration,
}

/// A peer's answer (any status): it carried the peer's server id.
pub struct PeerAnswer {
    pub peer: Arc<Peer>,
    pub response: Response,
}

/// Why a peer gave no answer. Every kind but [`PeerError::Itself`] and [`PeerError::Stopped`]
/// marks the peer down.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {peer} unreachable: {source}")]
    Unreachable {
        peer: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("peer {peer} did not answer within {wait:?}")]
    Timeout { peer: String, wait: Duration },
    /// An answer without a server id: not a regcache of this fleet (a load balancer, a server
    /// without `[peers]`), or one that refused the token.
    #[error(
        "peer {peer} answered {status} without a server id (not a peer, or the token was refused)"
    )]
    NotAPeer { peer: String, status: u16 },
    /// The URL is this server.
    #[error("peer {peer} is this server")]
    Itself { peer: String },
    /// Not asked: the server is stopping (its background runtime is shutting down).
    #[error("peer {peer} not asked: {source}")]
    Stopped {
        peer: String,
        #[source]
        source: Stopped,
    },
}

impl PeerError {
    /// The `result` label of `regcache_peer_requests_total`.
    fn label(&self) -> &'static str {
        match self {
            PeerError::Unreachable { .. } => "unreachable",
            PeerError::Timeout { .. } => "timeout",
            PeerError::NotAPeer { .. } => "refused",
            PeerError::Itself { .. } => "self",
            PeerError::Stopped { .. } => "stopped",
        }
    }
}

/// A peer's body, chunk by chunk, counted in `regcache_peer_received_bytes_total`.
pub struct PeerStream {
    peer: Arc<Peer>,
    response: Response,
    metrics: Arc<Metrics>,
}

impl PeerStream {
    pub fn new(peers: &Peers, answer: PeerAnswer) -> PeerStream {
        PeerStream {
            peer: answer.peer,
            response: answer.response,
            metrics: Arc::clone(&peers.metrics),
        }
    }

    /// The peer sending it.
    pub fn peer(&self) -> &Arc<Peer> {
        &self.peer
    }

    /// The next chunk; `None` at the end, and also when the peer fails or sends nothing for
    /// `idle` (it is then marked down): the caller tells a short body by its length and takes
    /// the rest elsewhere.
    pub async fn next_chunk(&mut self, idle: Duration) -> Option<Bytes> {
        let why = match tokio::time::timeout(idle, self.response.chunk()).await {
            Ok(Ok(Some(c))) => {
                self.metrics
                    .peer_received_bytes
                    .get_or_create(&Metrics::peer(self.peer.url()))
                    .inc_by(c.len() as u64);
                return Some(c);
            }
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => format!("body broke: {e}"),
            Err(_) => format!("no body data for {idle:?}"),
        };
        self.peer.failed(&why, &self.metrics);
        None
    }
}

impl Peers {
    /// Asks `peer`; updates its health and `regcache_peer_requests_total`.
    pub async fn ask(&self, peer: &Arc<Peer>, want: &Want<'_>) -> Result<Response, PeerError> {
        let settings = Arc::clone(&self.ring().settings);
        let result = self.send(peer, &settings, want).await;
        let label = match &result {
            Ok(r) if r.status().is_success() => "ok",
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => "not_found",
            Ok(_) => "status",
            Err(e) => e.label(),
        };
        self.metrics
            .peer_requests
            .get_or_create(&vec![
                ("peer", peer.url().to_owned()),
                ("result", label.to_owned()),
            ])
            .inc();
        match &result {
            Ok(_) => peer.answered(&self.metrics),
            Err(PeerError::Itself { .. }) => peer.is_me(&self.metrics),
            Err(PeerError::Stopped { .. }) => {}
            Err(e) => peer.failed(&e.to_string(), &self.metrics),
        }
        result
    }

    /// Asks every healthy peer but this server at once; the answers that came within their
    /// `wait` (any status), in the order they came.
    pub async fn ask_others(&self, want: &Want<'_>) -> Vec<PeerAnswer> {
        let mut asked: FuturesUnordered<_> = self
            .others_up()
            .into_iter()
            .map(|peer| async move {
                let r = self.ask(&peer, want).await;
                (peer, r)
            })
            .collect();
        let mut answers = Vec::new();
        while let Some((peer, r)) = asked.next().await {
            if let Ok(response) = r {
                answers.push(PeerAnswer { peer, response });
            }
        }
        answers
    }

    /// Asks every healthy peer but this server that may give `d` at once; the first answer with
    /// a success status.
    pub async fn first_holder(&self, want: &Want<'_>, d: &Digest) -> Option<PeerAnswer> {
        let mut asked: FuturesUnordered<_> = self
            .others_up()
            .into_iter()
            .filter(|p| p.may_give(d))
            .map(|peer| async move {
                let r = self.ask(&peer, want).await;
                (peer, r)
            })
            .collect();
        while let Some((peer, r)) = asked.next().await {
            match r {
                Ok(response) if response.status().is_success() => {
                    return Some(PeerAnswer { peer, response })
                }
                _ => {}
            }
        }
        None
    }

    /// The bound on an outage query or a probe: the connect timeout and [`ANSWER_WAIT`].
    pub fn query_wait(&self) -> Duration {
        self.ring().settings.connect_timeout + ANSWER_WAIT
    }

    /// One probe of `peer`: up when it answers `GET /v2/` as a peer.
    pub(super) async fn probe(&self, peer: &Arc<Peer>, settings: &Settings) {
        match self.alive(peer, settings).await {
            Ok(()) => peer.answered(&self.metrics),
            Err(PeerError::Itself { .. }) => peer.is_me(&self.metrics),
            Err(PeerError::Stopped { .. }) => {}
            Err(e) => peer.failed(&e.to_string(), &self.metrics),
        }
    }

    /// Whether `peer` answers `GET /v2/` as a peer within the connect timeout and
    /// [`ANSWER_WAIT`].
    async fn alive(&self, peer: &Peer, s: &Settings) -> Result<(), PeerError> {
        let want = Want {
            method: Method::GET,
            path: "/v2/",
            local_only: true,
            from: 0,
            wait: s.connect_timeout + ANSWER_WAIT,
        };
        let sent = self.sent(peer, s, &want);
        let r = tokio::time::timeout(want.wait, sent)
            .await
            .map_err(|_| timed_out(peer, &want))??;
        let r = self.peer_answer(peer, r)?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(PeerError::NotAPeer {
                peer: peer.url().to_owned(),
                status: r.status().as_u16(),
            })
        }
    }

    /// `want` for `peer`, with the peer headers.
    fn request(&self, peer: &Peer, s: &Settings, want: &Want<'_>) -> reqwest::RequestBuilder {
        let url = format!("{}{}", peer.url().trim_end_matches('/'), want.path);
        let mut req = s
            .client
            .request(want.method.clone(), url)
            .header(TOKEN_HEADER, &s.token)
            .header(HOP_HEADER, "1")
            .header(SERVER_ID_HEADER, &self.id);
        if want.local_only {
            req = req.header(LOCAL_ONLY_HEADER, "1");
        }
        if want.from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={}-", want.from));
        }
        req
    }

    /// Sends `want` to `peer` as a task of the background runtime: a connection the pool opens
    /// for it is driven there, whichever shard asks now or reuses it later. Dropping the future
    /// (a timeout) aborts the request.
    async fn sent(
        &self,
        peer: &Peer,
        s: &Settings,
        want: &Want<'_>,
    ) -> Result<Response, PeerError> {
        match on_runtime(&self.runtime, self.request(peer, s, want).send()).await {
            Ok(r) => r.map_err(|source| PeerError::Unreachable {
                peer: peer.url().to_owned(),
                source,
            }),
            Err(source) => Err(PeerError::Stopped {
                peer: peer.url().to_owned(),
                source,
            }),
        }
    }

    /// A response as a peer's answer: it carries a server id, not this server's.
    fn peer_answer(&self, peer: &Peer, r: Response) -> Result<Response, PeerError> {
        match r.headers().get(SERVER_ID_HEADER) {
            Some(id) if id.as_bytes() == self.id.as_bytes() => Err(PeerError::Itself {
                peer: peer.url().to_owned(),
            }),
            Some(_) => Ok(r),
            None => Err(PeerError::NotAPeer {
                peer: peer.url().to_owned(),
                status: r.status().as_u16(),
            }),
        }
    }

    /// Sends `want` to `peer` and waits for its headers. An answer late past the connect timeout
    /// may come from a peer waiting for its own upstream, or never (a black hole): when `want`
    /// allows a long wait, a probe then tells which, so a dead peer costs one probe's time.
    async fn send(
        &self,
        peer: &Peer,
        s: &Settings,
        want: &Want<'_>,
    ) -> Result<Response, PeerError> {
        let sent = self.sent(peer, s, want);
        tokio::pin!(sent);
        let answered = if want.wait > s.connect_timeout + ANSWER_WAIT {
            match tokio::time::timeout(s.connect_timeout, &mut sent).await {
                Ok(r) => r,
                Err(_) => {
                    let rest = tokio::time::timeout(want.wait - s.connect_timeout, &mut sent);
                    tokio::pin!(rest);
                    tokio::select! {
                        r = &mut rest => r.map_err(|_| timed_out(peer, want))?,
                        a = self.alive(peer, s) => {
                            a?;
                            rest.await.map_err(|_| timed_out(peer, want))?
                        }
                    }
                }
            }
        } else {
            tokio::time::timeout(want.wait, &mut sent)
                .await
                .map_err(|_| timed_out(peer, want))?
        };
        self.peer_answer(peer, answered?)
    }
}

fn timed_out(peer: &Peer, want: &Want<'_>) -> PeerError {
    PeerError::Timeout {
        peer: peer.url().to_owned(),
        wait: want.wait,
    }
}

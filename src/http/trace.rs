//! Following a request: its id (sent back in [`REQUEST_ID_HEADER`]), its tracing span, and its
//! access line (target `regcache::access`), written when the response body ends, with the body
//! bytes that went out and whether the connection ended first (the client hung up).
//!
//! The span (`request`, target `regcache::request`, fields `id`, `upstream`, `repo`, `reference`,
//! `outcome`) is entered around the handler and the cache work it awaits, so that every line
//! logged there names the request. It is at `debug`: `REGCACHE_LOG=info,regcache::request=debug`
//! turns it on.
//!
//! The answer's body is wrapped in [`Logged`], which counts the bytes of the frames it passes on
//! (placeholders of the sendfile path included, without touching them) and carries the request's
//! [`Access`] record; the record writes the line when it is dropped: with the body, or with the
//! handler if the connection ends before the answer is ready. Both happen on the connection's
//! shard, so the line joins that shard's batch (`telemetry::logbuf`).

use std::fmt::Display;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::{Body as _, Frame, SizeHint};
use tracing::field::Empty;
use tracing::Span;

use crate::cache::{Outcome, Route};
use crate::http::response::Body;
use crate::telemetry::metrics::Metrics;

/// Response header with the request's id, as its access line and span name it.
pub const REQUEST_ID_HEADER: &str = "x-regcache-request-id";

/// The status an access line gives a request whose connection ended before its answer was ready
/// (nginx's "client closed request"); no status was sent.
pub const CLOSED_BEFORE_ANSWER: u16 = 499;

/// Request ids: a counter from 1, per process (ids repeat after a restart; the log's timestamps
/// tell the runs apart).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What a request has found out on its way (for its span, its access line and the headers every
/// answer gets).
pub struct LogInfo {
    pub outcome: Option<Outcome>,
    /// The endpoint's `route` label (metrics).
    pub route: &'static str,
    /// The `ns` query parameter, once it has routed the request to an upstream.
    pub namespace: Option<String>,
    /// Set for a request from a peer (`[peers]`) whose token was right.
    pub peer: Option<crate::http::peer::PeerCall>,
    /// The upstream the request was routed to.
    pub upstream: Option<Arc<crate::upstream::Upstream>>,
    span: Span,
}

impl LogInfo {
    /// The request was routed to `route` (by `ns`, when given).
    pub fn routed(&mut self, route: &Route, ns: Option<&str>) {
        self.namespace = ns.map(str::to_owned);
        self.upstream = Some(Arc::clone(&route.upstream));
        self.span.record("upstream", route.upstream.name());
        self.span.record("repo", route.repo.as_str());
    }

    /// The request is about this tag or digest.
    pub fn target(&self, reference: &dyn Display) {
        self.span
            .record("reference", tracing::field::display(reference));
    }

    /// How the cache answered.
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
        self.span.record("outcome", outcome.as_str());
    }
}

/// One request's access record: written as its access line when dropped.
pub struct Access {
    id: u64,
    start: Instant,
    method: Method,
    path: String,
    pub info: LogInfo,
    /// The user its credentials named (`access.htpasswd`).
    pub user: Option<String>,
    metrics: Arc<Metrics>,
    /// The answer's status, once it is ready.
    status: Option<StatusCode>,
    /// The body's announced length (`Content-Length`).
    length: Option<u64>,
    /// Body bytes passed on to the connection.
    bytes: u64,
    /// The body reached its end.
    ended: bool,
    /// The body ended with an error (a fill that failed): the connection is closed by regcache.
    failed: bool,
}

impl Access {
    /// A new request: its id and its span, entered around the handler and the cache work.
    pub fn start(
        method: &Method,
        path: &str,
        route: &'static str,
        metrics: &Arc<Metrics>,
    ) -> Access {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // At `debug`, so off by default: an enabled span with these fields costs the fmt
        // subscriber about 0.9 µs of CPU per request (measured: span, four records and three
        // entries against one access line's 1 µs), some 5 % of a warm manifest request. Disabled,
        // it is a cached callsite check and allocates nothing.
        let span = tracing::debug_span!(
            target: "regcache::request",
            "request",
            id,
            upstream = Empty,
            repo = Empty,
            reference = Empty,
            outcome = Empty,
        );
        Access {
            id,
            start: Instant::now(),
            method: method.clone(),
            path: path.to_owned(),
            info: LogInfo {
                outcome: None,
                route,
                namespace: None,
                peer: None,
                upstream: None,
                span,
            },
            user: None,
            metrics: Arc::clone(metrics),
            status: None,
            length: None,
            bytes: 0,
            ended: false,
            failed: false,
        }
    }

    pub fn span(&self) -> Span {
        self.info.span.clone()
    }

    /// The answer is ready: it gets the request id header, and its body carries this record until
    /// it ends.
    pub fn respond(mut self, mut resp: Response<Body>) -> Response<Logged> {
        resp.headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from(self.id));
        self.status = Some(resp.status());
        self.length = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        resp.map(|inner| Logged {
            inner,
            access: self,
        })
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        let (status, complete) = match self.status {
            None => (CLOSED_BEFORE_ANSWER, false),
            // hyper drops a body with a known length once the last byte is queued, without
            // polling it to its end.
            Some(s) => (
                s.as_u16(),
                !self.failed && (self.ended || self.length.is_some_and(|n| self.bytes >= n)),
            ),
        };
        if self.status.is_some_and(|s| s.is_success()) {
            self.metrics.bytes_served.inc_by(self.bytes);
        }
        tracing::info!(
            target: "regcache::access",
            request_id = self.id,
            method = %self.method,
            path = %self.path,
            status,
            bytes = self.bytes,
            ms = self.start.elapsed().as_secs_f64() * 1000.0,
            cache = self.info.outcome.map_or("-", Outcome::as_str),
            user = self.user.as_deref().unwrap_or("-"),
            complete,
            hung_up = !complete && !self.failed,
            "request"
        );
    }
}

/// A response body that counts the bytes it passes on and writes the request's access line when
/// it ends or is dropped. Frames go through as they are (no copy).
pub struct Logged {
    inner: Body,
    access: Access,
}

impl Logged {
    /// Body bytes passed on so far.
    pub fn bytes(&self) -> u64 {
        self.access.bytes
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.access.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => this.access.failed = true,
            Poll::Ready(None) => this.access.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // hyper drops a body that says it has ended (a full or empty one) without polling it
        // again.
        if self.inner.is_end_stream() {
            self.access.ended = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn streamed(chunks: Vec<Bytes>) -> Body {
        let s = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))));
        BodyExt::boxed(http_body_util::StreamBody::new(s))
    }

    fn access() -> Access {
        Access::start(
            &Method::GET,
            "/v2/a/blobs/sha256:x",
            "blob",
            &Arc::new(Metrics::new()),
        )
    }

    /// A log writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn lines_logged_while_handling_name_the_request_once_its_span_is_on() {
        use tracing::Instrument as _;
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,regcache::request=debug",
            ))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let mut access = access();
        let id = access.id;
        access.info.target(&"v1");
        access.info.set_outcome(Outcome::Stale);
        async { tracing::warn!("the upstream is slow") }
            .instrument(access.span())
            .await;
        drop(access);
        let text = String::from_utf8_lossy(&out.0.lock().expect("lock")).into_owned();
        assert!(
            text.contains(&format!(
                "request{{id={id} reference=v1 outcome=\"stale\"}}: \
                 regcache::http::trace::tests: the upstream is slow"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("request_id={id} method=GET")),
            "the access line names the id: {text}"
        );
    }

    #[tokio::test]
    async fn frames_pass_through_uncopied_and_are_counted() {
        static DATA: [u8; 1000] = [7; 1000];
        let chunk = Bytes::from_static(&DATA);
        let resp = access().respond(Response::new(streamed(vec![chunk.clone(), chunk])));
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        let data = first.into_data().expect("data");
        assert_eq!(data.as_ptr(), DATA.as_ptr(), "the same bytes, not a copy");
        assert_eq!(body.bytes(), 1000);
        assert!(!body.access.ended);
        let _ = body.frame().await;
        assert!(body.frame().await.is_none());
        assert_eq!(body.bytes(), 2000);
        assert!(body.access.ended);
    }

    #[tokio::test]
    async fn a_body_dropped_early_is_counted_to_where_it_was() {
        let metrics = Arc::new(Metrics::new());
        let resp = Access::start(&Method::GET, "/v2/a/blobs/x", "blob", &metrics)
            .respond(Response::new(streamed(vec![Bytes::from_static(b"abc"); 3])));
        let id = resp.headers()[REQUEST_ID_HEADER].clone();
        assert!(
            id.to_str().is_ok_and(|s| s.parse::<u64>().is_ok()),
            "{id:?}"
        );
        let mut body = resp.into_body();
        let _ = body.frame().await;
        assert_eq!(body.bytes(), 3);
        drop(body);
        assert_eq!(metrics.bytes_served.get(), 3, "served bytes are those sent");
    }
}

//! Upstream failures: [`UpstreamError`], the cause it keeps, and how a failure is classified.
//!
//! An error's `Display` is complete (the upstream, what failed, and the text of its cause): it is
//! what the API tells the client and what the logs show. `source()` gives the cause itself (a
//! reqwest, I/O or JSON error), for code that needs to look at it; a report that walks the chain
//! would repeat its text.

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The error below an upstream failure, shared so that [`UpstreamError`] stays `Clone`: a
/// single-flight future hands the same error to every waiter.
pub type Cause = Arc<dyn Error + Send + Sync + 'static>;

/// An upstream failure, keeping what a caller needs to answer its client.
#[derive(Debug, Clone)]
pub enum UpstreamError {
    /// Refused, DNS failure, TLS failure, reset: the upstream could not be reached.
    Unreachable { upstream: String, source: Cause },
    /// The circuit breaker has the upstream marked down: it was not asked (see `breaker.rs`).
    MarkedDown {
        upstream: String,
        down_for: Duration,
    },
    /// The upstream answered `429` with a `Retry-After` that has not passed: it was not asked
    /// (see `ratelimit.rs`). `wait`: how long the hold lasts still.
    RetryAfter { upstream: String, wait: Duration },
    /// Connected, but no headers (or no next body chunk) in time.
    Timeout {
        upstream: String,
        what: &'static str,
    },
    /// The upstream answered with a non-success status.
    Status {
        upstream: String,
        status: u16,
        path: String,
        retry_after: Option<String>,
    },
    /// The upstream's answer breaks the protocol (bad digest header, oversized manifest, a
    /// redirect or token realm the address policy refuses, …), or the client for it could not be
    /// built (`ca_file`). `source`: the error that showed it, if any.
    Invalid {
        upstream: String,
        detail: String,
        source: Option<Cause>,
    },
    /// The upstream asked for a Bearer token and its token service gave none: it did not answer
    /// (in time), answered a status other than `401`/`403`, or answered without a usable token
    /// (`source`: which). The registry could not be asked at all, so this is an unavailable
    /// upstream, never a "not found".
    Token {
        upstream: String,
        source: Arc<UpstreamError>,
    },
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Unreachable { upstream, .. }
            | UpstreamError::MarkedDown { upstream, .. } => {
                write!(
                    f,
                    "upstream {upstream} unreachable: {}",
                    self.without_upstream()
                )
            }
            UpstreamError::Timeout { upstream, .. }
            | UpstreamError::Status { upstream, .. }
            | UpstreamError::RetryAfter { upstream, .. } => {
                write!(f, "upstream {upstream} {}", self.without_upstream())
            }
            UpstreamError::Invalid { upstream, .. } => {
                write!(
                    f,
                    "upstream {upstream} sent an invalid response: {}",
                    self.without_upstream()
                )
            }
            UpstreamError::Token { upstream, .. } => {
                write!(f, "upstream {upstream}: {}", self.without_upstream())
            }
        }
    }
}

/// Written out rather than derived: the source is the error in the `Arc` (so that a caller can
/// downcast it to `reqwest::Error`, `io::Error`, …), not the `Arc`.
impl Error for UpstreamError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            UpstreamError::Unreachable { source, .. } => Some(&**source),
            UpstreamError::Invalid { source, .. } => source.as_deref().map(|s| s as _),
            UpstreamError::Token { source, .. } => Some(&**source),
            UpstreamError::MarkedDown { .. }
            | UpstreamError::RetryAfter { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Status { .. } => None,
        }
    }
}

impl UpstreamError {
    /// True when the upstream could not give an answer at all (as opposed to "not found").
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. }
            | UpstreamError::MarkedDown { .. }
            | UpstreamError::RetryAfter { .. }
            | UpstreamError::Timeout { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Invalid { .. } => false,
            UpstreamError::Token { .. } => true,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What went wrong, without the upstream's name (for wrapping into another error).
    fn without_upstream(&self) -> String {
        match self {
            UpstreamError::Unreachable { source, .. } => Causes(&**source).to_string(),
            UpstreamError::MarkedDown { down_for, .. } => format!(
                "marked down {}s ago after repeated failures; probing it in the background",
                down_for.as_secs()
            ),
            UpstreamError::RetryAfter { wait, .. } => format!(
                "asked for no requests for {} s more (429 with Retry-After); not asked",
                super::ratelimit::whole_seconds(*wait)
            ),
            UpstreamError::Timeout { what, .. } => format!("timed out waiting for {what}"),
            UpstreamError::Status { status, path, .. } => format!("answered {status} for {path}"),
            UpstreamError::Invalid { detail, source, .. } => {
                format!("{detail}{}", Suffix(source.as_deref()))
            }
            UpstreamError::Token { source, .. } => {
                format!(
                    "its token service gave no token: {}",
                    source.without_upstream()
                )
            }
        }
    }

    /// The `kind` label of `regcache_upstream_errors_total`.
    /// The kinds [`UpstreamError::kind`] gives to the errors that are counted (a request that
    /// was not sent is not), each exported at 0 from the start.
    pub(super) const COUNTED_KINDS: [&'static str; 5] =
        ["unreachable", "timeout", "status", "invalid", "token"];

    pub(super) fn kind(&self) -> &'static str {
        match self {
            // Never counted (the request was not sent), but it is an unreachable upstream.
            UpstreamError::Unreachable { .. } | UpstreamError::MarkedDown { .. } => "unreachable",
            // Never counted either: the request was not sent.
            UpstreamError::RetryAfter { .. } => "retry_after",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Status { .. } => "status",
            UpstreamError::Invalid { .. } => "invalid",
            UpstreamError::Token { .. } => "token",
        }
    }
}

/// The error of a request to `upstream` that reqwest could not complete.
pub(super) fn classify(upstream: &str, e: reqwest::Error) -> UpstreamError {
    if e.is_redirect() {
        // Refused by the redirect policy: the upstream misbehaved, it is not down. The URL is
        // left out: a redirect target often carries a signed query. The policy's refusal is the
        // cause, when it is one (reqwest makes no other redirect errors with our policy).
        let refused = e
            .source()
            .and_then(|s| s.downcast_ref::<super::redirect::Refused>());
        let source: Cause = match refused {
            Some(r) => Arc::new(r.clone()),
            None => Arc::new(e.without_url()),
        };
        return UpstreamError::Invalid {
            upstream: upstream.to_owned(),
            detail: "error following redirect".into(),
            source: Some(source),
        };
    }
    if e.is_timeout() {
        UpstreamError::Timeout {
            upstream: upstream.to_owned(),
            what: "the connection",
        }
    } else {
        UpstreamError::Unreachable {
            upstream: upstream.to_owned(),
            source: Arc::new(e),
        }
    }
}

/// An error and its sources, `: `-separated. reqwest's own message names only the step
/// ("error sending request for url (…)"); the root cause (refused, DNS, TLS) is in its sources.
/// A source whose message already ends the text is left out: some errors (object_store's)
/// repeat their source's message in their own.
struct Causes<'a>(&'a (dyn Error + 'static));

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut next = self.0.source();
        while let Some(e) = next {
            let msg = e.to_string();
            if !text.ends_with(&msg) {
                text.push_str(": ");
                text.push_str(&msg);
            }
            next = e.source();
        }
        f.write_str(&text)
    }
}

/// `: ` and the [`Causes`] of an optional source; nothing without one.
struct Suffix<'a>(Option<&'a (dyn Error + Send + Sync + 'static)>);

impl fmt::Display for Suffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(e) => write!(f, ": {}", Causes(e)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::redirect::{self, HostClass, Refused};

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("step failed")]
    struct Step(#[source] std::io::Error);

    fn io(msg: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionRefused, msg)
    }

    #[test]
    fn an_unreachable_upstream_names_every_cause_once_and_keeps_the_error() {
        let e = UpstreamError::Unreachable {
            upstream: "hub".into(),
            source: Arc::new(Step(io("connection refused"))),
        };
        assert_eq!(
            e.to_string(),
            "upstream hub unreachable: step failed: connection refused"
        );
        let repeated = UpstreamError::Unreachable {
            upstream: "hub".into(),
            source: Arc::new(Repeats(io("connection refused"))),
        };
        assert_eq!(
            repeated.to_string(),
            "upstream hub unreachable: outer: connection refused"
        );
        let io_kind = e
            .source()
            .and_then(Error::source)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind);
        assert_eq!(
            io_kind,
            Some(std::io::ErrorKind::ConnectionRefused),
            "the cause is kept as an error, not as text"
        );
        assert!(e.is_unavailable());
        assert_eq!(e.kind(), "unreachable");
    }

    #[test]
    fn a_token_failure_says_what_the_token_service_did() {
        let inner = UpstreamError::Invalid {
            upstream: "hub".into(),
            detail: "its answer is not JSON".into(),
            source: Some(Arc::new(
                serde_json::from_slice::<serde_json::Value>(b"<html>").expect_err("not JSON"),
            )),
        };
        let e = UpstreamError::Token {
            upstream: "hub".into(),
            source: Arc::new(inner),
        };
        assert_eq!(
            e.to_string(),
            "upstream hub: its token service gave no token: its answer is not JSON: expected value \
             at line 1 column 1"
        );
        assert!(e.is_unavailable(), "an unavailable upstream, never a 404");
        assert_eq!((e.kind(), e.status()), ("token", None));
        assert!(matches!(
            e.source().and_then(|s| s.downcast_ref::<UpstreamError>()),
            Some(UpstreamError::Invalid { .. })
        ));
    }

    /// A redirect the address policy refuses is the upstream's invalid answer (not an outage),
    /// with the policy's refusal as its cause, and without the target's path or query.
    #[tokio::test]
    async fn a_refused_redirect_is_invalid_and_keeps_the_refusal() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let origin =
            reqwest::Url::parse(&format!("http://{}/", listener.local_addr().expect("addr")))
                .expect("origin URL");
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).await;
            let answer = concat!(
                "HTTP/1.1 302 Found\r\n",
                "Location: http://169.254.169.254/latest?sig=secret\r\n",
                "Content-Length: 0\r\n\r\n",
            );
            let _ = conn.write_all(answer.as_bytes()).await;
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(redirect::policy(origin.clone(), false))
            .build()
            .expect("client");
        let e = client
            .get(origin.join("v2/").expect("URL"))
            .send()
            .await
            .expect_err("the redirect is refused");
        let e = classify("hub", e);
        assert!(
            matches!(e, UpstreamError::Invalid { .. }) && !e.is_unavailable(),
            "{e:?}"
        );
        let refused = e.source().and_then(|s| s.downcast_ref::<Refused>());
        assert!(
            matches!(
                refused,
                Some(Refused::Internal {
                    class: HostClass::LinkLocal,
                    ..
                })
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with(
                "upstream hub sent an invalid response: error following redirect: refused to \
                 follow the upstream to 169.254.169.254, a link-local address"
            ),
            "{text}"
        );
        assert!(!text.contains("sig=secret"), "{text}");
    }

    #[test]
    fn marked_down_has_its_own_shape_and_counts_as_unreachable() {
        let e = UpstreamError::MarkedDown {
            upstream: "hub".into(),
            down_for: Duration::from_secs(42),
        };
        assert_eq!(
            e.to_string(),
            "upstream hub unreachable: marked down 42s ago after repeated failures; probing it in \
             the background"
        );
        assert!(e.is_unavailable());
        assert!(e.source().is_none(), "no underlying error");
        assert_eq!(e.kind(), "unreachable");
    }
}

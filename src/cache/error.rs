//! Why the cache could not answer: [`CacheError`], with the cause of each failure kept.
//!
//! A `CacheError` is shared by every request joined to one flight or fill, so it is `Clone`: the
//! causes that are not `Clone` themselves (store and internal failures) are held in an `Arc`.

use std::io;
use std::sync::Arc;

use crate::store::StoreError;
use crate::upstream::UpstreamError;

/// Why the cache could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("store: {0}")]
    Store(#[source] Arc<StoreError>),
    #[error("content from upstream {upstream} does not match digest {expected} (got {actual})")]
    DigestMismatch {
        upstream: String,
        expected: String,
        actual: String,
    },
    #[error("blob {digest} from upstream {upstream}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        upstream: String,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("internal: {0}")]
    Internal(#[source] Arc<InternalError>),
    /// A limit was reached (`limits.max_fills`): try again later.
    #[error("busy: {0}")]
    Busy(String),
    /// What the upstream answers this client for this manifest, by its `Accept`, is "unknown"
    /// (an OCI type it does not accept, a list without a linux/amd64 entry): a `404`.
    #[error("{0}")]
    NotAcceptable(&'static str),
    /// A peer asked for what this server's store holds (`x-regcache-local-only`), and it does
    /// not hold it for that repository: a `404`.
    #[error("{0}")]
    NotStored(&'static str),
}

/// A failure inside regcache itself, not of the store or of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    /// A task the work ran on panicked or was cancelled (`what`: which task).
    #[error("{what} task: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A system call on a file regcache already holds failed (e.g. `dup` of a descriptor).
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A state the code does not leave a fill in was found.
    #[error("{0}")]
    Broken(&'static str),
}

impl CacheError {
    /// Every value of [`CacheError::fill_failure_reason`], exported at 0 from the start.
    pub const FILL_FAILURE_REASONS: [&'static str; 6] =
        ["upstream", "digest", "size", "store", "internal", "busy"];

    /// The `reason` label of `regcache_fills_failed_total` for a fill that failed with this.
    pub fn fill_failure_reason(&self) -> &'static str {
        match self {
            CacheError::Upstream(_) | CacheError::NotAcceptable(_) | CacheError::NotStored(_) => {
                "upstream"
            }
            CacheError::DigestMismatch { .. } => "digest",
            CacheError::SizeMismatch { .. } => "size",
            CacheError::Store(_) => "store",
            CacheError::Internal(_) => "internal",
            CacheError::Busy(_) => "busy",
        }
    }
}

impl From<StoreError> for CacheError {
    fn from(e: StoreError) -> Self {
        CacheError::Store(Arc::new(e))
    }
}

impl From<InternalError> for CacheError {
    fn from(e: InternalError) -> Self {
        CacheError::Internal(Arc::new(e))
    }
}

impl CacheError {
    /// A task (`what`) that ended without its result.
    pub(crate) fn task(what: &'static str, source: tokio::task::JoinError) -> CacheError {
        InternalError::Task { what, source }.into()
    }

    /// An internal state that should not occur.
    pub(crate) fn broken(what: &'static str) -> CacheError {
        InternalError::Broken(what).into()
    }

    /// Whether the store failed because its filesystem is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, CacheError::Store(e) if e.is_disk_full())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_keeps_its_io_cause_and_is_known_as_disk_full_by_its_kind() {
        let full = io::Error::from_raw_os_error(28);
        let e = CacheError::from(StoreError::Io {
            path: "/data/tmp/fill-1".into(),
            source: full,
        });
        assert!(e.is_disk_full(), "ENOSPC is a full disk: {e}");
        let cause = std::error::Error::source(&e)
            .and_then(std::error::Error::source)
            .and_then(|c| c.downcast_ref::<io::Error>())
            .expect("the io::Error is the store error's cause");
        assert_eq!(cause.raw_os_error(), Some(28), "{cause}");
        let other = CacheError::from(StoreError::Io {
            path: "/data/tmp/fill-1".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        });
        assert!(
            !other.is_disk_full(),
            "a refused write is not a full disk: {other}"
        );
        assert!(!CacheError::broken("x").is_disk_full());
    }

    #[test]
    fn every_fill_failure_reason_is_one_exported_from_the_start() {
        let every_variant = [
            CacheError::Upstream(UpstreamError::MarkedDown {
                upstream: "u".into(),
                down_for: std::time::Duration::ZERO,
            }),
            CacheError::Store(Arc::new(StoreError::NotStored { digest: "d".into() })),
            CacheError::DigestMismatch {
                upstream: "u".into(),
                expected: "a".into(),
                actual: "b".into(),
            },
            CacheError::SizeMismatch {
                upstream: "u".into(),
                digest: "d".into(),
                expected: 1,
                actual: 2,
            },
            CacheError::Internal(Arc::new(InternalError::Broken("b"))),
            CacheError::Busy("b".into()),
            CacheError::NotAcceptable("n"),
            CacheError::NotStored("n"),
        ];
        let mut seen: Vec<&str> = every_variant
            .iter()
            .map(CacheError::fill_failure_reason)
            .collect();
        seen.sort_unstable();
        seen.dedup();
        let mut listed = CacheError::FILL_FAILURE_REASONS.to_vec();
        listed.sort_unstable();
        assert_eq!(seen, listed);
    }
}

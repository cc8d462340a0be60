//! The store's errors: each keeps its cause (the `io::Error` with its path, or the database's
//! error) and tells whether that cause is a full filesystem.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A store failure.
///
/// Each message includes its cause's, so a log line of the error alone says what failed; the
/// cause itself is also kept as the error's `source`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// I/O on a file or directory of the data directory.
    #[error("store I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The metadata database could not be opened.
    #[error("metadata database: cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: DbError,
    },
    /// A read or write of the metadata database failed.
    #[error("metadata database: {0}")]
    Db(#[source] DbError),
    /// A record could not be encoded for the database.
    #[error("metadata database: cannot encode a record: {0}")]
    Encode(#[source] serde_json::Error),
    /// A digest to link is not stored.
    #[error("cannot link {digest}: not stored")]
    NotStored { digest: String },
    /// Another process holds the data directory's lock (`pid`: what its lock file says).
    #[error(
        "the data directory {} is in use by another regcache (PID {}); stop it or use another --data-dir",
        path.display(),
        pid.as_deref().unwrap_or("unknown")
    )]
    Locked { path: PathBuf, pid: Option<String> },
    /// The directory holds files that regcache did not create and it has no [`MARKER`](super::MARKER): regcache
    /// deletes files in its data directory, so it never uses such a directory.
    #[error(
        "refusing to use {} as the data directory: it holds {} that regcache did not create, and \
         no {} file marks it as regcache's. regcache deletes files in its data directory \
         (tmp/, evicted blobs), so it uses only a directory it created, an empty one, or a store \
         of an earlier regcache (meta.redb and the files regcache makes, nothing else). Choose a new or empty \
         directory; if this one really is a regcache store, create the empty file {}",
        path.display(),
        found.join(", "),
        super::MARKER,
        path.join(super::MARKER).display()
    )]
    NotOurs { path: PathBuf, found: Vec<String> },
    /// The data directory holds a store this regcache must not use (a newer schema).
    #[error("{0}")]
    Incompatible(String),
}

impl StoreError {
    /// Whether the cause is a full filesystem (`ENOSPC`), wherever it happened: a blob file, a
    /// directory, or the database's own file.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => is_disk_full(source),
            StoreError::Open { source, .. } | StoreError::Db(source) => {
                source.io().is_some_and(is_disk_full)
            }
            StoreError::Encode(_)
            | StoreError::NotStored { .. }
            | StoreError::Locked { .. }
            | StoreError::NotOurs { .. }
            | StoreError::Incompatible(_) => false,
        }
    }
}

/// Whether an I/O error means the filesystem is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
}

/// An error of the metadata database, kept whole. Its I/O error, when it has one, is its source.
#[derive(Debug)]
pub struct DbError(redb::Error);

impl DbError {
    pub(super) fn new(e: impl Into<redb::Error>) -> DbError {
        DbError(e.into())
    }

    /// The I/O error under the database's error, if that is what it is.
    fn io(&self) -> Option<&io::Error> {
        match &self.0 {
            redb::Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // redb's own errors name no source: its I/O error is the one worth following.
        self.io().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// `?` on the database's results, in the store's database files.
macro_rules! from_db_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Db(DbError::new(e))
            }
        }
    )*};
}
from_db_errors!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Maps an `io::Error` on `path` to [`StoreError::Io`].
pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

// The cache shares store errors across tasks and threads.
const _: fn() = || {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<StoreError>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    fn io_on(e: io::Error) -> StoreError {
        StoreError::Io {
            path: PathBuf::from("/data/tmp/fill-1"),
            source: e,
        }
    }

    #[test]
    fn a_full_disk_is_recognised_by_the_error_not_its_text() {
        let enospc = || io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        assert!(io_on(enospc()).is_disk_full(), "ENOSPC on a file");
        assert!(
            io_on(io::Error::from(io::ErrorKind::StorageFull)).is_disk_full(),
            "an error of kind StorageFull"
        );
        assert!(
            StoreError::Db(DbError::new(redb::StorageError::Io(enospc()))).is_disk_full(),
            "ENOSPC under the database"
        );
        assert!(
            StoreError::from(redb::CommitError::Storage(redb::StorageError::Io(enospc())))
                .is_disk_full(),
            "ENOSPC at a commit"
        );
        let lookalike = io_on(io::Error::other("No space left on device (os error 28)"));
        assert!(
            !lookalike.is_disk_full(),
            "only the error's kind counts, not its text: {lookalike}"
        );
        assert!(!io_on(io::Error::from(io::ErrorKind::PermissionDenied)).is_disk_full());
        assert!(!StoreError::Db(DbError::new(redb::Error::DatabaseClosed)).is_disk_full());
    }

    #[test]
    fn errors_keep_their_cause() {
        let e = io_on(io::Error::from(io::ErrorKind::PermissionDenied));
        let cause = e.source().and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(
            cause.map(io::Error::kind),
            Some(io::ErrorKind::PermissionDenied),
            "{e}"
        );
        assert!(e.to_string().contains("/data/tmp/fill-1"), "{e}");

        let db = StoreError::from(redb::StorageError::Io(io::Error::from(
            io::ErrorKind::Interrupted,
        )));
        let io_cause = db
            .source()
            .and_then(|s| s.source())
            .and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(
            io_cause.map(io::Error::kind),
            Some(io::ErrorKind::Interrupted),
            "the database's I/O error is reachable from {db}"
        );
    }
}

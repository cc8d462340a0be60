//! The local content-addressed store: blob files on disk and the redb metadata database, sealed
//! behind `Store`'s methods.
//!
//! Layout under the data directory:
//! - `blobs/<alg>/<first two hex>/<hex>`: committed content (layers, configs and manifests alike);
//! - `tmp/`: files being filled, never served by path, removed at start;
//! - `meta.redb`: tables described in `docs/ARCHITECTURE.md`;
//! - `lock`: held while the store is open;
//! - `regcache-data-dir`: the marker that makes the directory regcache's ([`MARKER`]).
//!
//! Files: `mod.rs` (this one) has `Store` itself, its opening, its in-memory state (usage, the
//! full flag, holds, the manifest copy) and the shared types; `files.rs` the files; `db.rs` the
//! database's tables, schema and migrations; `records.rs` the database records; `error.rs` the
//! errors; `evict.rs` and `verify.rs` keep the store within its limits and consistent, through
//! `Store`'s methods only.
//!
//! A blob is recorded in the database only after its file was verified, fsynced and renamed into
//! place, so every recorded blob exists with its digest's content.

mod db;
mod error;
pub mod evict;
mod files;
mod records;
pub mod verify;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::oci::manifest::{manifest_refs, referrer_descriptor};
use crate::oci::media::Accept;
use crate::oci::reference::{Digest, RepoName, Tag};

use db::Db;
pub use db::SCHEMA_VERSION;
use error::io_err;
pub use error::{is_disk_full, DbError, StoreError};
use files::Ownership;
pub use files::{free_bytes, DirLock, TempBlob, MARKER};
use records::Records;

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the cache knows about a tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: String,
    /// Unix time in milliseconds when the upstream last confirmed (or gave) this digest.
    pub checked_at_ms: u64,
}

/// A stored manifest's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    pub media_type: String,
    pub size: u64,
}

/// A write owed elsewhere, recorded in the `outbox` table in the same transaction as the commit
/// that owes it, so that a crash right after the commit still leaves it owed. The store keeps
/// `record` under `key` without reading it; [`Store::outbox`] gives it back and
/// [`Store::outbox_remove`] drops it once the write is made.
#[derive(Debug, Clone, Copy)]
pub struct Owed<'a> {
    pub key: &'a str,
    pub record: &'a [u8],
}

/// Names a repository of one upstream in the database.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoKey {
    pub upstream: String,
    pub repo: RepoName,
}

/// The on-disk store.
pub struct Store {
    _lock: DirLock,
    root: PathBuf,
    tmp: PathBuf,
    /// The metadata database: used by `records.rs` (and the schema code of `db.rs`) only.
    db: Db,
    temp_seq: AtomicU64,
    /// Access times not yet written to `access`.
    access: Mutex<HashMap<String, u64>>,
    /// Blobs being read by clients: never evicted meanwhile.
    holds: Mutex<HashMap<String, usize>>,
    /// Bytes of recorded blobs.
    used: AtomicU64,
    /// Set when a write failed for lack of space; cleared by the next successful commit.
    full: AtomicBool,
    /// Recently served manifests (digest → media type, verified bytes): the hot path of every
    /// pull, answered without a file read, a hash or a database lookup.
    manifest_mem: Mutex<ManifestMem>,
}

/// A small in-memory copy of manifests, emptied when it outgrows its budget.
#[derive(Default)]
struct ManifestMem {
    map: HashMap<String, (String, bytes::Bytes)>,
    bytes: usize,
}

/// Bytes of manifests kept in memory.
const MANIFEST_MEM_BUDGET: usize = 16 << 20;

/// Keeps a blob from eviction while a client reads it.
pub struct Hold {
    store: std::sync::Arc<Store>,
    key: String,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut holds = self.store.holds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = holds.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                holds.remove(&self.key);
            }
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `root`, checking the schema and clearing `tmp/`.
    ///
    /// `root` must be regcache's: marked, missing, empty, or an earlier regcache's store (adopted
    /// once its database opens). Any other directory is refused before anything in it changes.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let owner = files::ownership(root)?;
        let db_path = root.join(db::DB_FILE);
        match owner {
            Ownership::New => files::write_marker(root)?,
            Ownership::Earlier if !db::is_regcache_db(&db_path)? => {
                // Another program's redb file: nothing created, written or marked.
                return Err(StoreError::NotOurs {
                    path: root.to_owned(),
                    found: vec!["a meta.redb that is not a regcache database".into()],
                });
            }
            Ownership::Earlier | Ownership::Marked => {}
        }
        let tmp = root.join(files::TMP_DIR);
        for d in [root.join(files::BLOBS_DIR), tmp.clone()] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let lock = DirLock::acquire(root)?;
        let db = Db::open(&db_path)?;
        let store = Store {
            _lock: lock,
            root: root.to_owned(),
            tmp: tmp.clone(),
            db,
            temp_seq: AtomicU64::new(0),
            access: Mutex::new(HashMap::new()),
            holds: Mutex::new(HashMap::new()),
            used: AtomicU64::new(0),
            full: AtomicBool::new(false),
            manifest_mem: Mutex::new(ManifestMem::default()),
        };
        store.init_schema()?;
        if owner == Ownership::Earlier {
            files::write_marker(root)?;
            tracing::info!(data_dir = %root.display(), "a store of an earlier regcache: marked as regcache's ({MARKER})");
        }
        // Anything in tmp/ belongs to a fill that did not finish: it was never visible.
        files::clear_tmp(&tmp);
        let (_, bytes) = store.usage()?;
        store.used.store(bytes, Ordering::Relaxed);
        Ok(store)
    }

    /// Bytes of recorded blobs (kept in memory).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn sub_used(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Whether the last write failed for lack of space.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    pub fn set_full(&self, full: bool) {
        if self.full.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::warn!(root = %self.root.display(), "the store's filesystem is full: serving without caching until space returns");
            } else {
                tracing::info!("space is available again: caching resumed");
            }
        }
    }

    /// Keeps `d` from eviction until the guard drops.
    pub fn hold(self: &std::sync::Arc<Self>, d: &Digest) -> Hold {
        let key = d.to_string();
        *self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_insert(0) += 1;
        Hold {
            store: std::sync::Arc::clone(self),
            key,
        }
    }

    fn held(&self) -> Vec<String> {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Checks that the database answers and the data directory is writable (for `/readyz`).
    pub fn check(&self) -> Result<(), StoreError> {
        self.db.check()?;
        self.probe_writable()
    }

    /// A stored manifest's media type and size.
    pub fn manifest_info(&self, d: &Digest) -> Result<Option<ManifestInfo>, StoreError> {
        let (Some(media_type), Some(size)) = (self.manifest_media_type(d)?, self.blob_size(d)?)
        else {
            return Ok(None);
        };
        Ok(Some(ManifestInfo { media_type, size }))
    }

    /// A stored manifest's media type and bytes, from memory when recently used.
    pub fn manifest(&self, d: &Digest) -> Result<Option<(String, bytes::Bytes)>, StoreError> {
        let key = d.to_string();
        if let Some(hit) = self
            .manifest_mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .get(&key)
        {
            return Ok(Some(hit.clone()));
        }
        let Some(info) = self.manifest_info(d)? else {
            return Ok(None);
        };
        let Some(bytes) = self.read_manifest(d)? else {
            return Ok(None);
        };
        let bytes = bytes::Bytes::from(bytes);
        let mut mem = self.manifest_mem.lock().unwrap_or_else(|p| p.into_inner());
        if mem.bytes + bytes.len() > MANIFEST_MEM_BUDGET {
            mem.map.clear();
            mem.bytes = 0;
        }
        mem.bytes += bytes.len();
        mem.map
            .insert(key, (info.media_type.clone(), bytes.clone()));
        Ok(Some((info.media_type, bytes)))
    }

    /// Drops a manifest from the memory copy (its records are going).
    fn forget_in_memory(&self, d: &str) {
        let mut mem = self.manifest_mem.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, b)) = mem.map.remove(d) {
            mem.bytes -= b.len();
        }
    }

    /// Stores a verified manifest for `repo` (recording `owed` with it, and its referrer record if
    /// it has a `subject`), and points `tag` at it.
    pub fn put_manifest(
        &self,
        repo: &RepoKey,
        d: &Digest,
        media_type: &str,
        bytes: &[u8],
        tag: Option<(&Tag, Accept)>,
        owed: Option<Owed<'_>>,
    ) -> Result<(), StoreError> {
        let refs = manifest_refs(bytes);
        let manifest = Some((media_type, refs.as_slice()));
        if self.blob_size(d)?.is_some() && self.blob_path(d).exists() {
            self.record_blob(d, bytes.len() as u64, repo, manifest, owed)?;
        } else {
            let mut temp = self.temp_blob()?;
            temp.write_all(bytes).map_err(io_err(temp.path()))?;
            self.commit_blob(temp, d, bytes.len() as u64, repo, manifest, owed)?;
        }
        if let Some((subject, descriptor)) = referrer_descriptor(bytes, media_type, d) {
            self.add_referrer(repo, &subject, d, &descriptor)?;
        }
        if let Some((tag, accept)) = tag {
            self.set_tag_for(repo, tag, accept, d, now_millis())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of `repo` of the upstream `u`.
    pub(super) fn key(repo: &str) -> RepoKey {
        RepoKey {
            upstream: "u".into(),
            repo: repo.parse().expect("valid repo"),
        }
    }

    #[test]
    fn committed_blob_is_linked_only_to_its_repo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let data = b"layer bytes";
        let d = Digest::sha256_of(data);
        let mut t = store.temp_blob().expect("temp");
        t.write_all(data).expect("write");
        let temp_path = t.path().to_owned();
        store
            .commit_blob(t, &d, data.len() as u64, &key("a/b"), None, None)
            .expect("commit");
        assert!(!temp_path.exists(), "temp file must be gone after commit");
        assert_eq!(std::fs::read(store.blob_path(&d)).expect("read"), data);
        assert!(store.is_linked(&key("a/b"), &d).expect("linked"));
        assert!(!store.is_linked(&key("a/c"), &d).expect("not linked"));
        store.link(&key("a/c"), &d, None).expect("link");
        assert!(store.is_linked(&key("a/c"), &d).expect("linked now"));
        assert_eq!(store.repos().expect("repos").len(), 2);
    }

    #[test]
    fn dropped_temp_blob_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut t = store.temp_blob().expect("temp");
        t.write_all(b"partial").expect("write");
        let p = t.path().to_owned();
        drop(t);
        assert!(!p.exists());
    }

    #[test]
    fn tags_and_manifests_round_trip_and_corruption_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let body = br#"{"schemaVersion":2}"#;
        let d = Digest::sha256_of(body);
        let tag: Tag = "v1".parse().expect("tag");
        store
            .put_manifest(
                &key("x"),
                &d,
                "application/vnd.oci.image.manifest.v1+json",
                body,
                Some((&tag, Accept::ALL)),
                None,
            )
            .expect("put");
        let rec = store.tag(&key("x"), &tag).expect("tag").expect("present");
        assert_eq!(rec.digest, d.to_string());
        // The record for a narrower Accept is the tag's, not a tag of its own.
        let s2 = Accept::parse([crate::oci::media::DOCKER_MANIFEST.as_bytes()]);
        assert_eq!(store.tag_for(&key("x"), &tag, s2).expect("tag"), None);
        store.set_tag_for(&key("x"), &tag, s2, &d, 7).expect("set");
        let narrow = store.tag_for(&key("x"), &tag, s2).expect("tag");
        assert_eq!(narrow.map(|r| r.checked_at_ms), Some(7));
        assert_eq!(store.tag(&key("x"), &tag).expect("tag"), Some(rec));
        let v0: Tag = "v0".parse().expect("tag");
        store.set_tag_for(&key("x"), &v0, s2, &d, 7).expect("set");
        assert_eq!(
            store.tags(&key("x")).expect("tags"),
            vec!["v0".to_string(), "v1".to_string()],
            "a tag cached for any Accept is listed once"
        );
        assert!(store.tags(&key("xy")).expect("tags").is_empty());
        assert_eq!(
            store.read_manifest(&d).expect("read").as_deref(),
            Some(&body[..])
        );
        std::fs::write(store.blob_path(&d), b"tampered").expect("tamper");
        assert_eq!(store.read_manifest(&d).expect("read"), None);
        assert_eq!(store.manifest_info(&d).expect("info"), None);
        // Records that point at a dropped manifest go with it, the narrower Accept's too.
        store
            .drop_blobs(&std::collections::BTreeSet::from([d.to_string()]))
            .expect("drop");
        assert_eq!(store.tag(&key("x"), &tag).expect("tag"), None);
        assert_eq!(store.tag_for(&key("x"), &tag, s2).expect("tag"), None);
    }

    #[test]
    fn a_locked_data_directory_is_refused_with_the_owner_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Store::open(dir.path()).expect("open");
        let err = Store::open(dir.path())
            .err()
            .expect("second open must fail");
        let msg = err.to_string();
        assert!(
            matches!(err, StoreError::Locked { .. })
                && msg.contains("in use")
                && msg.contains(&std::process::id().to_string()),
            "{msg}"
        );
        drop(first);
        Store::open(dir.path()).expect("lock released with the first store");
    }
}

//! The metadata database (`meta.redb`): its tables, the schema version and the migrations.
//!
//! Only this file and `records.rs` open transactions or name tables; the rest of the store,
//! eviction and verify included, goes through `Store`'s methods. Nothing outside `src/store/`
//! sees a redb type.

use std::fs;
use std::path::Path;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};

use super::{manifest_refs, DbError, Store, StoreError};
use crate::oci::reference::Digest;

/// Version of the database layout this build writes. History:
/// 1. blobs, manifests, tags (seconds), links, repos, referrers;
/// 2. adds refs/refby (manifest → content), access times, pins; tag times in milliseconds.
pub const SCHEMA_VERSION: u64 = 2;

/// The database's file in the data directory.
pub(super) const DB_FILE: &str = "meta.redb";

pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// digest → size in bytes of a committed blob file.
pub(super) const BLOBS: TableDefinition<&str, u64> = TableDefinition::new("blobs");
/// digest → media type, for blobs that are manifests.
pub(super) const MANIFESTS: TableDefinition<&str, &str> = TableDefinition::new("manifests");
/// `upstream \0 repo \0 tag` → JSON [`super::TagRecord`]: the tag's manifest for the full `Accept`.
/// `upstream \0 repo \0 tag \0 accept=<set>` → the same for clients accepting only `<set>`
/// (see [`crate::oci::media::Accept`]), when that answer is another manifest.
pub(super) const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");
/// `upstream \0 repo \0 digest` → unix time the link was made.
pub(super) const LINKS: TableDefinition<&str, u64> = TableDefinition::new("links");
/// `upstream \0 repo` → unix time the repository was first cached.
pub(super) const REPOS: TableDefinition<&str, u64> = TableDefinition::new("repos");
/// `upstream \0 repo \0 subject digest \0 referrer digest` → JSON descriptor of the referrer.
pub(super) const REFERRERS: TableDefinition<&str, &[u8]> = TableDefinition::new("referrers");
/// `parent \0 child`: a manifest references a blob or child manifest.
pub(super) const REFS: TableDefinition<&str, ()> = TableDefinition::new("refs");
/// `child \0 parent`: the reverse of `refs`.
pub(super) const REFBY: TableDefinition<&str, ()> = TableDefinition::new("refby");
/// digest → last access, unix milliseconds (written in batches, not per request).
pub(super) const ACCESS: TableDefinition<&str, u64> = TableDefinition::new("access");
/// `upstream \0 repo \0 tag-or-digest` → unix seconds when pinned.
pub(super) const PINS: TableDefinition<&str, u64> = TableDefinition::new("pins");
/// Writes owed to the shared bucket (`[store.s3]`): key → a JSON record, removed once written.
pub(super) const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");

/// Whether `db` is a regcache database: its `meta` table records a schema version.
fn has_schema_version(db: &impl ReadableDatabase) -> bool {
    db.begin_read()
        .ok()
        .and_then(|tx| tx.open_table(META).ok())
        .and_then(|t| t.get("schema_version").ok().flatten())
        .is_some()
}

/// Whether `path` is a regcache database, read without changing it where redb allows: one that
/// needs recovery (a regcache killed while writing) is opened for writing, which recovers it.
/// One held open by a running process counts as regcache's: the directory lock then names it.
pub(super) fn is_regcache_db(path: &Path) -> Result<bool, StoreError> {
    let cannot = |e: redb::DatabaseError| StoreError::Open {
        path: path.to_owned(),
        source: DbError::new(e),
    };
    match Database::builder().open_read_only(path) {
        Ok(db) => Ok(has_schema_version(&db)),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Ok(true),
        Err(redb::DatabaseError::RepairAborted) => {
            Ok(has_schema_version(&Database::create(path).map_err(cannot)?))
        }
        Err(e) => Err(cannot(e)),
    }
}

/// The open database. Its transactions are for `records.rs` (and the schema code here).
pub(super) struct Db(Database);

impl Db {
    /// Opens (creating if needed) the database at `path`.
    pub(super) fn open(path: &Path) -> Result<Db, StoreError> {
        Database::create(path)
            .map(Db)
            .map_err(|e| StoreError::Open {
                path: path.to_owned(),
                source: DbError::new(e),
            })
    }

    pub(super) fn read(&self) -> Result<ReadTransaction, StoreError> {
        Ok(self.0.begin_read()?)
    }

    pub(super) fn write(&self) -> Result<WriteTransaction, StoreError> {
        Ok(self.0.begin_write()?)
    }

    /// Whether the database answers a read.
    pub(super) fn check(&self) -> Result<(), StoreError> {
        self.read()?.open_table(META)?;
        Ok(())
    }
}

impl Store {
    /// Checks the schema version (refusing a newer one), migrates an older one, and creates every
    /// table, in one write transaction.
    pub(super) fn init_schema(&self) -> Result<(), StoreError> {
        let tx = self.db.write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::Incompatible(format!(
                        "the store in {} has schema version {v}, newer than this regcache understands ({SCHEMA_VERSION}): run a newer regcache or use another --data-dir",
                        self.root.display()
                    )))
                }
                Some(v) => {
                    if v < SCHEMA_VERSION {
                        tracing::info!(from = v, to = SCHEMA_VERSION, "migrating the metadata database");
                    }
                    if v < 2 {
                        self.migrate_to_2(&tx)?;
                    }
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            // Create every table so that readers never meet a missing one.
            tx.open_table(BLOBS)?;
            tx.open_table(MANIFESTS)?;
            tx.open_table(TAGS)?;
            tx.open_table(LINKS)?;
            tx.open_table(REPOS)?;
            tx.open_table(REFERRERS)?;
            tx.open_table(REFS)?;
            tx.open_table(REFBY)?;
            tx.open_table(ACCESS)?;
            tx.open_table(PINS)?;
            tx.open_table(OUTBOX)?;
        }
        Ok(tx.commit()?)
    }

    /// Schema 1 → 2: record what every stored manifest references; tag times to milliseconds.
    fn migrate_to_2(&self, tx: &WriteTransaction) -> Result<(), StoreError> {
        let manifests: Vec<String> = {
            let t = tx.open_table(MANIFESTS)?;
            let mut v = Vec::new();
            for item in t.iter()? {
                v.push(item?.0.value().to_owned());
            }
            v
        };
        {
            let mut refs = tx.open_table(REFS)?;
            let mut refby = tx.open_table(REFBY)?;
            for m in manifests {
                let Ok(d) = m.parse::<Digest>() else { continue };
                let Ok(bytes) = fs::read(self.blob_path(&d)) else {
                    continue;
                };
                for child in manifest_refs(&bytes) {
                    refs.insert(format!("{m}\0{child}").as_str(), ())?;
                    refby.insert(format!("{child}\0{m}").as_str(), ())?;
                }
            }
        }
        let mut tags = tx.open_table(TAGS)?;
        let mut rewritten = Vec::new();
        for item in tags.iter()? {
            let (k, v) = item?;
            if let Ok(mut j) = serde_json::from_slice::<serde_json::Value>(v.value()) {
                if let Some(secs) = j.get("checked_at").and_then(|c| c.as_u64()) {
                    j["checked_at_ms"] = serde_json::Value::from(secs.saturating_mul(1000));
                    rewritten.push((
                        k.value().to_owned(),
                        serde_json::to_vec(&j).map_err(StoreError::Encode)?,
                    ));
                }
            }
        }
        for (k, v) in rewritten {
            tags.insert(k.as_str(), v.as_slice())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::key;
    use crate::store::MARKER;
    use std::path::PathBuf;

    /// Every path under `dir` with its content (directories as `None`).
    fn snapshot(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).expect("read_dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    out.push((p.clone(), None));
                    todo.push(p);
                } else {
                    out.push((p.clone(), Some(fs::read(&p).expect("read"))));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_directory_with_foreign_files_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("tmp")).expect("mkdir");
        fs::write(dir.path().join("tmp/some-file"), b"not regcache's").expect("write");
        fs::write(dir.path().join("notes.txt"), b"mine").expect("write");
        let before = snapshot(dir.path());
        let err = Store::open(dir.path())
            .err()
            .expect("a directory regcache did not create must be refused");
        let msg = err.to_string();
        assert!(
            matches!(err, StoreError::NotOurs { .. })
                && msg.contains(MARKER)
                && msg.contains("notes.txt"),
            "{msg}"
        );
        assert_eq!(
            snapshot(dir.path()),
            before,
            "nothing created, changed or deleted"
        );

        // An earlier store (meta.redb and lock) with a foreign file next to it is refused too.
        let old = tempfile::tempdir().expect("tempdir");
        drop(Store::open(old.path()).expect("open"));
        fs::remove_file(old.path().join(MARKER)).expect("unmark");
        fs::write(old.path().join("tmp/fill-1-2-3"), b"half").expect("leftover");
        fs::write(old.path().join("photo.jpg"), b"jpeg").expect("foreign");
        let before = snapshot(old.path());
        let err = Store::open(old.path()).err().expect("must refuse");
        assert!(err.to_string().contains("photo.jpg"), "{err}");
        assert_eq!(snapshot(old.path()), before, "nothing deleted");

        // Another program's redb database is neither written to nor marked.
        let other = tempfile::tempdir().expect("tempdir");
        {
            let db = Database::create(other.path().join("meta.redb")).expect("redb");
            let tx = db.begin_write().expect("tx");
            tx.open_table(TableDefinition::<&str, u64>::new("theirs"))
                .expect("table")
                .insert("k", 1)
                .expect("insert");
            tx.commit().expect("commit");
        }
        fs::create_dir_all(other.path().join("tmp")).expect("mkdir");
        fs::write(other.path().join("tmp/their-file"), b"theirs").expect("write");
        let before = snapshot(other.path());
        let err = Store::open(other.path()).err().expect("must refuse");
        assert!(err.to_string().contains("not a regcache database"), "{err}");
        assert_eq!(snapshot(other.path()), before, "nothing changed");
    }

    #[test]
    fn a_new_or_empty_directory_gets_the_marker() {
        let parent = tempfile::tempdir().expect("tempdir");
        let new = parent.path().join("a/b");
        drop(Store::open(&new).expect("a missing directory is created"));
        assert!(new.join(MARKER).is_file(), "marker written at creation");
        // lost+found is what a fresh filesystem mounted there holds.
        let empty = parent.path().join("mnt");
        fs::create_dir_all(empty.join("lost+found")).expect("mkdir");
        drop(Store::open(&empty).expect("an empty directory is taken"));
        assert!(empty.join(MARKER).is_file());
        // Marked: opened again with whatever the store put there.
        let store = Store::open(&new).expect("reopen");
        std::mem::forget(store.temp_blob().expect("temp")); // a fill a crash left behind
        drop(store);
        Store::open(&new).expect("a marked directory is ours");
        assert_eq!(
            fs::read_dir(new.join("tmp")).expect("tmp").count(),
            0,
            "leftover fills in a marked directory are removed"
        );
    }

    #[test]
    fn a_store_made_by_an_earlier_version_is_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = b"layer bytes";
        let d = Digest::sha256_of(data);
        {
            let store = Store::open(dir.path()).expect("open");
            let mut t = store.temp_blob().expect("temp");
            t.write_all(data).expect("write");
            store
                .commit_blob(t, &d, data.len() as u64, &key("a/b"), None, None)
                .expect("commit");
            let crashed = store.temp_blob().expect("temp");
            std::mem::forget(crashed);
        }
        // What an earlier regcache left: the same layout without the marker, and the last good
        // copy of a config store overlay.
        fs::remove_file(dir.path().join(MARKER)).expect("unmark");
        fs::write(dir.path().join("config-store.last-good.toml"), "").expect("last good");
        // The same, restored from a backup that skipped the lock file, is the same store.
        let restored = tempfile::tempdir().expect("tempdir");
        fs::copy(
            dir.path().join("meta.redb"),
            restored.path().join("meta.redb"),
        )
        .expect("copy");
        drop(Store::open(restored.path()).expect("a restored store is adopted"));
        assert!(restored.path().join(MARKER).is_file());

        let store = Store::open(dir.path()).expect("an earlier store is adopted");
        assert!(dir.path().join(MARKER).is_file(), "marker written");
        assert!(
            store.is_linked(&key("a/b"), &d).expect("linked"),
            "data kept"
        );
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0,
            "its leftover fills are removed"
        );
    }

    #[test]
    fn a_schema_1_store_is_migrated_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layer = Digest::sha256_of(b"layer");
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{layer}","size":5}},"layers":[{{"digest":"{layer}","size":5}}]}}"#
        );
        let m = Digest::sha256_of(body.as_bytes());
        {
            // What a schema 1 regcache left: no refs, tag times in seconds.
            let store = Store::open(dir.path()).expect("open");
            std::fs::create_dir_all(store.blob_path(&m).parent().expect("parent")).expect("mkdir");
            std::fs::write(store.blob_path(&m), &body).expect("write manifest");
            let tx = store.db.write().expect("tx");
            {
                tx.open_table(META)
                    .expect("meta")
                    .insert("schema_version", 1)
                    .expect("v1");
                let key = m.to_string();
                tx.open_table(BLOBS)
                    .expect("blobs")
                    .insert(key.as_str(), body.len() as u64)
                    .expect("blob");
                tx.open_table(MANIFESTS)
                    .expect("manifests")
                    .insert(key.as_str(), "application/vnd.oci.image.manifest.v1+json")
                    .expect("manifest");
                let tag =
                    serde_json::json!({"digest": key, "checked_at": 1_700_000_000u64}).to_string();
                tx.open_table(TAGS)
                    .expect("tags")
                    .insert("u\0x\0v1", tag.as_bytes())
                    .expect("tag");
            }
            tx.commit().expect("commit");
        }
        let store = Store::open(dir.path()).expect("reopen migrates");
        let tx = store.db.read().expect("read");
        let v = tx
            .open_table(META)
            .expect("meta")
            .get("schema_version")
            .expect("get")
            .map(|v| v.value());
        assert_eq!(v, Some(SCHEMA_VERSION));
        let refs = tx.open_table(REFS).expect("refs");
        assert!(
            refs.get(format!("{m}\0{layer}").as_str())
                .expect("get")
                .is_some(),
            "refs rebuilt"
        );
        let rec = store
            .tag(&key("x"), &"v1".parse().expect("tag"))
            .expect("tag")
            .expect("present");
        assert_eq!(rec.checked_at_ms, 1_700_000_000_000);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let tx = store.db.write().expect("tx");
            tx.open_table(META)
                .expect("meta")
                .insert("schema_version", SCHEMA_VERSION + 1)
                .expect("insert");
            tx.commit().expect("commit");
        }
        let err = Store::open(dir.path()).err().expect("must refuse");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    /// Eviction, verify and the blob files go through the store's methods: only this file and
    /// `records.rs` open transactions or name tables.
    #[test]
    fn only_the_database_files_touch_the_database() {
        let sources = [
            ("evict.rs", include_str!("evict.rs")),
            ("verify.rs", include_str!("verify.rs")),
            ("files.rs", include_str!("files.rs")),
        ];
        for (file, text) in sources {
            for word in ["redb", "begin_read", "begin_write", "open_table", ".db."] {
                assert!(
                    !text.contains(word),
                    "src/store/{file} names `{word}`: it must go through the store's methods"
                );
            }
        }
    }
}

//! The local content-addressed store: blob files on disk and the redb metadata database.
//!
//! Layout under the data directory:
//! - `blobs/<alg>/<first two hex>/<hex>`: committed content (layers, configs and manifests alike);
//! - `tmp/`: files being filled, never served by path, removed at start;
//! - `meta.redb`: tables described in `docs/ARCHITECTURE.md`.
//!
//! A blob is recorded in the database only after its file was verified, fsynced and renamed into
//! place, so every recorded blob exists with its digest's content.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::reference::{Digest, RepoName, Tag};

/// Version of the database layout this build writes. History:
/// 1. blobs, manifests, tags (seconds), links, repos, referrers;
/// 2. adds refs/refby (manifest → content), access times, pins; tag times in milliseconds.
pub const SCHEMA_VERSION: u64 = 2;

/// The file that marks a directory as a regcache data directory, written when regcache creates
/// (or adopts) it. Nothing is ever deleted in a directory without it.
pub const MARKER: &str = "regcache-data-dir";

const MARKER_TEXT: &str = "This is a regcache data directory. regcache created it (or took it \
over as an empty directory or an earlier regcache's store) and deletes files in it: tmp/ at every \
start, blobs/ on eviction. Keep other files elsewhere.\n";

/// What a data directory of an earlier regcache (before the marker) may hold: the names regcache
/// itself creates there.
const STORE_NAMES: [&str; 6] = [
    "blobs",
    "tmp",
    "meta.redb",
    "lock",
    crate::config_store::LAST_GOOD_FILE,
    crate::config_store::LAST_GOOD_TEMP,
];

/// Directories of the system that are never a data directory, whatever they hold.
const SYSTEM_DIRECTORIES: [&str; 37] = [
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/run/user",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/usr/bin",
    "/usr/lib",
    "/usr/local",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/share",
    "/var",
    "/var/cache",
    "/var/lib",
    "/var/lib/private",
    "/var/log",
    "/var/mail",
    "/var/run",
    "/var/spool",
    "/var/tmp",
];

/// Whether `path` (absolute, compared component by component) is `/` or another system directory
/// such as `/etc`, `/usr` or `/tmp` (not a directory below one).
pub fn is_system_directory(path: &Path) -> bool {
    let path: PathBuf = path.components().collect();
    SYSTEM_DIRECTORIES.iter().any(|d| path == Path::new(d))
}

/// Whose a data directory is, decided before anything in it is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ownership {
    /// It holds the marker.
    Marked,
    /// Missing (now created) or empty: taken, and marked at once.
    New,
    /// Only names regcache creates, `meta.redb` among them: a store of a regcache from before the
    /// marker, adopted (marked) once `meta.redb` opens as a regcache database.
    Earlier,
}

fn ownership(root: &Path) -> Result<Ownership, StoreError> {
    let entries = match fs::read_dir(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(root).map_err(io_err(root))?;
            return Ok(Ownership::New);
        }
        Err(e) => return Err(io_err(root)(e)),
        Ok(entries) => entries,
    };
    // A symbolic link (or a path with one) leading to a system directory.
    if let Ok(real) = fs::canonicalize(root) {
        if is_system_directory(&real) {
            return Err(StoreError::Incompatible(format!(
                "refusing to use {} as the data directory: it is the system directory {}",
                root.display(),
                real.display()
            )));
        }
    }
    let mut names = Vec::new();
    for e in entries {
        let name = e.map_err(io_err(root))?.file_name();
        names.push(name.to_string_lossy().into_owned());
    }
    if names.iter().any(|n| n == MARKER) {
        return Ok(Ownership::Marked);
    }
    // lost+found is what a new filesystem mounted here holds.
    names.retain(|n| n != "lost+found");
    names.sort();
    if names.is_empty() {
        return Ok(Ownership::New);
    }
    let foreign: Vec<String> = names
        .iter()
        .filter(|n| !STORE_NAMES.contains(&n.as_str()))
        .cloned()
        .collect();
    // A backup restored without its lock file is the same store.
    if foreign.is_empty() && names.iter().any(|n| n == "meta.redb") {
        return Ok(Ownership::Earlier);
    }
    let mut found = if foreign.is_empty() { names } else { foreign };
    if found.len() > 5 {
        let more = found.len() - 5;
        found.truncate(5);
        found.push(format!("{more} more"));
    }
    Err(StoreError::NotOurs {
        path: root.to_owned(),
        found,
    })
}

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
fn is_regcache_db(path: &Path) -> Result<bool, StoreError> {
    let cannot =
        |e: redb::DatabaseError| StoreError::Db(format!("cannot open {}: {e}", path.display()));
    match Database::builder().open_read_only(path) {
        Ok(db) => Ok(has_schema_version(&db)),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Ok(true),
        Err(redb::DatabaseError::RepairAborted) => {
            Ok(has_schema_version(&Database::create(path).map_err(cannot)?))
        }
        Err(e) => Err(cannot(e)),
    }
}

/// Writes the marker (and makes it durable), making `root` regcache's.
fn write_marker(root: &Path) -> Result<(), StoreError> {
    let path = root.join(MARKER);
    let mut f = File::create(&path).map_err(io_err(&path))?;
    f.write_all(MARKER_TEXT.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(&path))?;
    File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(io_err(root))
}

pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// digest → size in bytes of a committed blob file.
pub(crate) const BLOBS: TableDefinition<&str, u64> = TableDefinition::new("blobs");
/// digest → media type, for blobs that are manifests.
pub(crate) const MANIFESTS: TableDefinition<&str, &str> = TableDefinition::new("manifests");
/// `upstream \0 repo \0 tag` → JSON [`TagRecord`].
pub(crate) const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");
/// `upstream \0 repo \0 digest` → unix time the link was made.
pub(crate) const LINKS: TableDefinition<&str, u64> = TableDefinition::new("links");
/// `upstream \0 repo` → unix time the repository was first cached.
pub(crate) const REPOS: TableDefinition<&str, u64> = TableDefinition::new("repos");
/// `upstream \0 repo \0 subject digest \0 referrer digest` → JSON descriptor of the referrer.
pub(crate) const REFERRERS: TableDefinition<&str, &[u8]> = TableDefinition::new("referrers");

/// `parent \0 child`: a manifest references a blob or child manifest.
pub(crate) const REFS: TableDefinition<&str, ()> = TableDefinition::new("refs");
/// `child \0 parent`: the reverse of `refs`.
pub(crate) const REFBY: TableDefinition<&str, ()> = TableDefinition::new("refby");
/// digest → last access, unix milliseconds (written in batches, not per request).
pub(crate) const ACCESS: TableDefinition<&str, u64> = TableDefinition::new("access");
/// `upstream \0 repo \0 tag-or-digest` → unix seconds when pinned.
pub(crate) const PINS: TableDefinition<&str, u64> = TableDefinition::new("pins");
/// Writes owed to the shared bucket (`[store.s3]`): key → a JSON record, removed once written.
pub(crate) const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");

/// Every blob record (digest, size), every manifest digest and every tag (key, digest) of one
/// read transaction: the whole-store view that eviction and verification start from.
pub(crate) type Records = (Vec<(String, u64)>, Vec<String>, Vec<(String, String)>);

pub(crate) fn read_records(tx: &redb::ReadTransaction) -> Result<Records, StoreError> {
    let mut blobs = Vec::new();
    for item in tx
        .open_table(BLOBS)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = item.map_err(db_err)?;
        blobs.push((k.value().to_owned(), v.value()));
    }
    let mut manifests = Vec::new();
    for item in tx
        .open_table(MANIFESTS)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        manifests.push(item.map_err(db_err)?.0.value().to_owned());
    }
    let mut tags = Vec::new();
    for item in tx
        .open_table(TAGS)
        .map_err(db_err)?
        .iter()
        .map_err(db_err)?
    {
        let (k, v) = item.map_err(db_err)?;
        let digest = serde_json::from_slice::<TagRecord>(v.value())
            .map(|r| r.digest)
            .unwrap_or_default();
        tags.push((k.value().to_owned(), digest));
    }
    Ok((blobs, manifests, tags))
}

/// The digests a manifest references: config, layers, index children, artifact blobs (not its
/// `subject`, which it points at rather than contains).
pub fn manifest_refs(bytes: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(d) = v
        .get("config")
        .and_then(|c| c.get("digest"))
        .and_then(|d| d.as_str())
    {
        out.extend(d.parse().ok());
    }
    for list in ["layers", "manifests", "blobs"] {
        for item in v.get(list).and_then(|l| l.as_array()).into_iter().flatten() {
            if let Some(d) = item.get("digest").and_then(|d| d.as_str()) {
                out.extend(d.parse().ok());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A store failure: I/O or database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("metadata database: {0}")]
    Db(String),
    #[error("{0}")]
    Incompatible(String),
    /// The directory holds files that regcache did not create and it has no [`MARKER`]: regcache
    /// deletes files in its data directory, so it never uses such a directory.
    #[error(
        "refusing to use {} as the data directory: it holds {} that regcache did not create, and \
         no {MARKER} file marks it as regcache's. regcache deletes files in its data directory \
         (tmp/, evicted blobs), so it uses only a directory it created, an empty one, or a store \
         of an earlier regcache (meta.redb and lock, nothing else). Choose a new or empty \
         directory; if this one really is a regcache store, create the empty file {}",
        path.display(),
        found.join(", "),
        path.join(MARKER).display()
    )]
    NotOurs { path: PathBuf, found: Vec<String> },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

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

/// Names a repository of one upstream in the database.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoKey {
    pub upstream: String,
    pub repo: RepoName,
}

impl RepoKey {
    fn prefix(&self) -> String {
        format!("{}\0{}\0", self.upstream, self.repo)
    }
    fn repo_key(&self) -> String {
        format!("{}\0{}", self.upstream, self.repo)
    }
}

/// An exclusive lock on a data directory, held while the store is open (`flock` on `lock`,
/// which holds the owner's PID). The kernel releases it when the process dies, so a lock left by a
/// killed regcache is simply taken over.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(root: &Path) -> Result<DirLock, StoreError> {
        use std::io::{Read, Seek};
        let path = root.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StoreError::Incompatible(format!(
                "the data directory {} is in use by another regcache (PID {}); stop it or use another --data-dir",
                root.display(),
                if pid.is_empty() { "unknown" } else { pid }
            )));
        }
        file.set_len(0).map_err(io_err(&path))?;
        file.rewind().map_err(io_err(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err(&path))?;
        Ok(DirLock { _file: file })
    }
}

/// The on-disk store.
pub struct Store {
    _lock: DirLock,
    root: PathBuf,
    tmp: PathBuf,
    pub(crate) db: Database,
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

/// Whether an I/O error means the filesystem is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull
}

/// A file being filled in `tmp/`; removed when dropped unless committed.
pub struct TempBlob {
    path: PathBuf,
    file: Option<File>,
}

impl TempBlob {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }
    /// Appends bytes.
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.write_all(data),
            None => Err(io::Error::other("temporary file already closed")),
        }
    }

    /// Appends several buffers, with as few `writev` calls as the kernel allows.
    pub fn write_all_parts(&mut self, parts: &[bytes::Bytes]) -> io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("temporary file already closed"));
        };
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match f.write_vectored(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `root`, checking the schema and clearing `tmp/`.
    ///
    /// `root` must be regcache's: marked, missing, empty, or an earlier regcache's store (adopted
    /// once its database opens). Any other directory is refused before anything in it changes.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let owner = ownership(root)?;
        let db_path = root.join("meta.redb");
        match owner {
            Ownership::New => write_marker(root)?,
            Ownership::Earlier if !is_regcache_db(&db_path)? => {
                // Another program's redb file: nothing created, written or marked.
                return Err(StoreError::NotOurs {
                    path: root.to_owned(),
                    found: vec!["a meta.redb that is not a regcache database".into()],
                });
            }
            Ownership::Earlier | Ownership::Marked => {}
        }
        let tmp = root.join("tmp");
        for d in [root.join("blobs"), tmp.clone()] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let lock = DirLock::acquire(root)?;
        let db = Database::create(&db_path)
            .map_err(|e| StoreError::Db(format!("cannot open {}: {e}", db_path.display())))?;
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
            write_marker(root)?;
            tracing::info!(data_dir = %root.display(), "a store of an earlier regcache: marked as regcache's ({MARKER})");
        }
        // Anything in tmp/ belongs to a fill that did not finish: it was never visible.
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let (_, bytes) = store.usage()?;
        store.used.store(bytes, Ordering::Relaxed);
        Ok(store)
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut meta = tx.open_table(META).map_err(db_err)?;
            let found = meta
                .get("schema_version")
                .map_err(db_err)?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION).map_err(db_err)?;
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
                    meta.insert("schema_version", SCHEMA_VERSION).map_err(db_err)?;
                }
            }
            // Create every table so that readers never meet a missing one.
            tx.open_table(BLOBS).map_err(db_err)?;
            tx.open_table(MANIFESTS).map_err(db_err)?;
            tx.open_table(TAGS).map_err(db_err)?;
            tx.open_table(LINKS).map_err(db_err)?;
            tx.open_table(REPOS).map_err(db_err)?;
            tx.open_table(REFERRERS).map_err(db_err)?;
            tx.open_table(REFS).map_err(db_err)?;
            tx.open_table(REFBY).map_err(db_err)?;
            tx.open_table(ACCESS).map_err(db_err)?;
            tx.open_table(PINS).map_err(db_err)?;
            tx.open_table(OUTBOX).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Schema 1 → 2: record what every stored manifest references; tag times to milliseconds.
    fn migrate_to_2(&self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let manifests: Vec<String> = {
            let t = tx.open_table(MANIFESTS).map_err(db_err)?;
            let mut v = Vec::new();
            for item in t.iter().map_err(db_err)? {
                v.push(item.map_err(db_err)?.0.value().to_owned());
            }
            v
        };
        {
            let mut refs = tx.open_table(REFS).map_err(db_err)?;
            let mut refby = tx.open_table(REFBY).map_err(db_err)?;
            for m in manifests {
                let Ok(d) = m.parse::<Digest>() else { continue };
                let Ok(bytes) = fs::read(self.blob_path(&d)) else {
                    continue;
                };
                for child in manifest_refs(&bytes) {
                    refs.insert(format!("{m}\0{child}").as_str(), ())
                        .map_err(db_err)?;
                    refby
                        .insert(format!("{child}\0{m}").as_str(), ())
                        .map_err(db_err)?;
                }
            }
        }
        let mut tags = tx.open_table(TAGS).map_err(db_err)?;
        let mut rewritten = Vec::new();
        for item in tags.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            if let Ok(mut j) = serde_json::from_slice::<serde_json::Value>(v.value()) {
                if let Some(secs) = j.get("checked_at").and_then(|c| c.as_u64()) {
                    j["checked_at_ms"] = serde_json::Value::from(secs.saturating_mul(1000));
                    rewritten.push((
                        k.value().to_owned(),
                        serde_json::to_vec(&j).map_err(db_err)?,
                    ));
                }
            }
        }
        for (k, v) in rewritten {
            tags.insert(k.as_str(), v.as_slice()).map_err(db_err)?;
        }
        Ok(())
    }

    /// Bytes of recorded blobs (kept in memory).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
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

    /// Notes an access to `d` (written to the database later, in a batch).
    pub fn touch(&self, d: &Digest) {
        self.access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(d.to_string(), now_millis());
    }

    /// Writes the pending access times in one transaction.
    pub fn flush_access(&self) -> Result<usize, StoreError> {
        let pending = std::mem::take(&mut *self.access.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let blobs = tx.open_table(BLOBS).map_err(db_err)?;
            let mut t = tx.open_table(ACCESS).map_err(db_err)?;
            for (k, v) in &pending {
                if blobs.get(k.as_str()).map_err(db_err)?.is_some() {
                    t.insert(k.as_str(), *v).map_err(db_err)?;
                }
            }
        }
        tx.commit().map_err(db_err)?;
        Ok(pending.len())
    }

    /// Access times, pending ones included.
    pub(crate) fn access_times(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut out = HashMap::new();
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(ACCESS).map_err(db_err)?;
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.insert(k.value().to_owned(), v.value());
        }
        for (k, v) in self.access.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.insert(k.clone(), *v);
        }
        Ok(out)
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

    pub(crate) fn held(&self) -> Vec<String> {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn sub_used(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Pins `reference` (tag or digest) of `repo` against eviction.
    pub fn pin(&self, repo: &RepoKey, reference: &str) -> Result<(), StoreError> {
        let key = format!("{}{reference}", repo.prefix());
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(PINS)
            .map_err(db_err)?
            .insert(key.as_str(), now_secs())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Removes a pin; returns whether it existed.
    pub fn unpin(&self, repo: &RepoKey, reference: &str) -> Result<bool, StoreError> {
        let key = format!("{}{reference}", repo.prefix());
        let tx = self.db.begin_write().map_err(db_err)?;
        let existed = tx
            .open_table(PINS)
            .map_err(db_err)?
            .remove(key.as_str())
            .map_err(db_err)?
            .is_some();
        tx.commit().map_err(db_err)?;
        Ok(existed)
    }

    /// Every pin as `(upstream, repo, reference)`.
    pub fn pins(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(PINS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, _) = item.map_err(db_err)?;
            let mut parts = k.value().splitn(3, '\0');
            if let (Some(u), Some(r), Some(x)) = (parts.next(), parts.next(), parts.next()) {
                out.push((u.to_owned(), r.to_owned(), x.to_owned()));
            }
        }
        Ok(out)
    }

    /// Records a write owed to the shared bucket (replacing one with the same key).
    pub fn outbox_add(&self, key: &str, record: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(OUTBOX)
            .map_err(db_err)?
            .insert(key, record)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Forgets a write owed to the shared bucket, once done.
    pub fn outbox_remove(&self, key: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(OUTBOX)
            .map_err(db_err)?
            .remove(key)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Every write owed to the shared bucket, as recorded.
    pub fn outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(OUTBOX).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Checks that the database answers and the data directory is writable (for `/readyz`).
    pub fn check(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        tx.open_table(META).map_err(db_err)?;
        let probe = self.tmp.join(format!("ready-{}", std::process::id()));
        File::create(&probe).map_err(io_err(&probe))?;
        let _ = fs::remove_file(&probe);
        Ok(())
    }

    /// Number of blobs and their total size, from the database.
    pub fn usage(&self) -> Result<(u64, u64), StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(BLOBS).map_err(db_err)?;
        let (mut n, mut bytes) = (0u64, 0u64);
        for item in t.iter().map_err(db_err)? {
            let (_, v) = item.map_err(db_err)?;
            n += 1;
            bytes += v.value();
        }
        Ok((n, bytes))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a committed blob lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    /// A new temporary file (`create_new`, so never shared).
    pub fn temp_blob(&self) -> Result<TempBlob, StoreError> {
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .tmp
            .join(format!("fill-{}-{n}-{}", std::process::id(), now_secs()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(TempBlob {
            path,
            file: Some(file),
        })
    }

    /// Size of a committed blob, if the database records it.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(BLOBS).map_err(db_err)?;
        let size = t
            .get(d.to_string().as_str())
            .map_err(db_err)?
            .map(|v| v.value());
        Ok(size)
    }

    /// Opens a committed blob for reading; `None` if not recorded or its file is gone.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<(File, u64)>, StoreError> {
        let Some(size) = self.blob_size(d)? else {
            return Ok(None);
        };
        let path = self.blob_path(d);
        match File::open(&path) {
            Ok(f) => Ok(Some((f, size))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(digest = %d, "recorded blob file is missing; dropping the record");
                self.forget_blob(d)?;
                Ok(None)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn forget_blob(&self, d: &Digest) -> Result<(), StoreError> {
        self.forget_in_memory(&d.to_string());
        let tx = self.db.begin_write().map_err(db_err)?;
        let freed;
        {
            let key = d.to_string();
            freed = tx
                .open_table(BLOBS)
                .map_err(db_err)?
                .remove(key.as_str())
                .map_err(db_err)?
                .map_or(0, |v| v.value());
            tx.open_table(MANIFESTS)
                .map_err(db_err)?
                .remove(key.as_str())
                .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)?;
        self.sub_used(freed);
        Ok(())
    }

    /// Makes a verified temporary file the blob `d`: fsync, rename, fsync the directory, then
    /// record it (with a link for `repo`, and a media type if it is a manifest) in one transaction.
    pub fn commit_blob(
        &self,
        mut temp: TempBlob,
        d: &Digest,
        size: u64,
        repo: &RepoKey,
        manifest: Option<(&str, &[Digest])>,
    ) -> Result<(), StoreError> {
        let file = temp
            .file
            .take()
            .ok_or_else(|| StoreError::Db("temporary file already committed".into()))?;
        let dest = self.blob_path(d);
        let result = (|| {
            file.sync_all().map_err(io_err(&temp.path))?;
            drop(file);
            let dir = dest.parent().unwrap_or(&self.root).to_owned();
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            fs::rename(&temp.path, &dest).map_err(io_err(&dest))?;
            File::open(&dir)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&dir))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp.path);
        }
        result?;
        self.record_blob(d, size, repo, manifest)
    }

    /// Records an existing blob file (and its link for `repo`, and for a manifest its media type
    /// and references), in one transaction.
    fn record_blob(
        &self,
        d: &Digest,
        size: u64,
        repo: &RepoKey,
        manifest: Option<(&str, &[Digest])>,
    ) -> Result<(), StoreError> {
        let key = d.to_string();
        let now = now_secs();
        let tx = self.db.begin_write().map_err(db_err)?;
        let new;
        {
            new = tx
                .open_table(BLOBS)
                .map_err(db_err)?
                .insert(key.as_str(), size)
                .map_err(db_err)?
                .is_none();
            if let Some((mt, refs)) = manifest {
                tx.open_table(MANIFESTS)
                    .map_err(db_err)?
                    .insert(key.as_str(), mt)
                    .map_err(db_err)?;
                let mut r = tx.open_table(REFS).map_err(db_err)?;
                let mut rb = tx.open_table(REFBY).map_err(db_err)?;
                for child in refs {
                    r.insert(format!("{key}\0{child}").as_str(), ())
                        .map_err(db_err)?;
                    rb.insert(format!("{child}\0{key}").as_str(), ())
                        .map_err(db_err)?;
                }
            }
            let link = format!("{}{key}", repo.prefix());
            tx.open_table(LINKS)
                .map_err(db_err)?
                .insert(link.as_str(), now)
                .map_err(db_err)?;
            let mut repos = tx.open_table(REPOS).map_err(db_err)?;
            let rk = repo.repo_key();
            if repos.get(rk.as_str()).map_err(db_err)?.is_none() {
                repos.insert(rk.as_str(), now).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        if new {
            self.used.fetch_add(size, Ordering::Relaxed);
        }
        self.touch(d);
        Ok(())
    }

    /// Removes the records of `doomed` (blob, manifest, access time, references, and the tags
    /// that point at them: a cached tag is always complete) in one transaction, then their files.
    /// Returns the manifests, blobs and bytes removed.
    pub(crate) fn drop_blobs(
        &self,
        doomed: &std::collections::BTreeSet<String>,
    ) -> Result<(u64, u64, u64), StoreError> {
        let (mut manifests_n, mut blobs_n, mut bytes) = (0, 0, 0);
        if doomed.is_empty() {
            return Ok((0, 0, 0));
        }
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut blobs = tx.open_table(BLOBS).map_err(db_err)?;
            let mut manifests = tx.open_table(MANIFESTS).map_err(db_err)?;
            let mut access = tx.open_table(ACCESS).map_err(db_err)?;
            let mut refs = tx.open_table(REFS).map_err(db_err)?;
            let mut refby = tx.open_table(REFBY).map_err(db_err)?;
            for d in doomed {
                if let Some(v) = blobs.remove(d.as_str()).map_err(db_err)? {
                    bytes += v.value();
                    blobs_n += 1;
                }
                if manifests.remove(d.as_str()).map_err(db_err)?.is_some() {
                    manifests_n += 1;
                }
                access.remove(d.as_str()).map_err(db_err)?;
                let (lo, hi) = (format!("{d}\0"), format!("{d}\x01"));
                let children: Vec<String> = refs
                    .range(lo.as_str()..hi.as_str())
                    .map_err(db_err)?
                    .filter_map(|i| i.ok().map(|(k, _)| k.value().to_owned()))
                    .collect();
                for k in children {
                    refs.remove(k.as_str()).map_err(db_err)?;
                    if let Some((p, c)) = k.split_once('\0') {
                        refby.remove(format!("{c}\0{p}").as_str()).map_err(db_err)?;
                    }
                }
            }
            let mut tags = tx.open_table(TAGS).map_err(db_err)?;
            let dangling: Vec<String> = tags
                .iter()
                .map_err(db_err)?
                .filter_map(|i| i.ok())
                .filter(|(_, v)| {
                    serde_json::from_slice::<TagRecord>(v.value())
                        .is_ok_and(|r| doomed.contains(&r.digest))
                })
                .map(|(k, _)| k.value().to_owned())
                .collect();
            for k in dangling {
                tags.remove(k.as_str()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)?;
        for d in doomed {
            self.forget_in_memory(d);
        }
        self.sub_used(bytes);
        for d in doomed {
            if let Ok(digest) = d.parse::<Digest>() {
                let _ = fs::remove_file(self.blob_path(&digest));
            }
        }
        Ok((manifests_n, blobs_n, bytes))
    }

    /// Records an intact blob file found without a record (no repository link: it is served
    /// once an upstream confirms a repository has it).
    pub fn record_orphan(&self, d: &Digest, size: u64) -> Result<(), StoreError> {
        let key = d.to_string();
        let tx = self.db.begin_write().map_err(db_err)?;
        let new = tx
            .open_table(BLOBS)
            .map_err(db_err)?
            .insert(key.as_str(), size)
            .map_err(db_err)?
            .is_none();
        tx.commit().map_err(db_err)?;
        if new {
            self.used.fetch_add(size, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether `digest` was obtained for (or confirmed to belong to) `repo`.
    pub fn is_linked(&self, repo: &RepoKey, d: &Digest) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(LINKS).map_err(db_err)?;
        let key = format!("{}{d}", repo.prefix());
        Ok(t.get(key.as_str()).map_err(db_err)?.is_some())
    }

    /// Whether a manifest linked to `repo` references `d` (so `repo` may serve it even before
    /// it is stored here, e.g. from the shared bucket).
    pub fn is_referenced(&self, repo: &RepoKey, d: &Digest) -> Result<bool, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let refby = tx.open_table(REFBY).map_err(db_err)?;
        let links = tx.open_table(LINKS).map_err(db_err)?;
        let (start, end) = (format!("{d}\0"), format!("{d}\x01"));
        for item in refby.range(start.as_str()..end.as_str()).map_err(db_err)? {
            let (k, _) = item.map_err(db_err)?;
            if let Some(parent) = k.value().strip_prefix(start.as_str()) {
                let link = format!("{}{parent}", repo.prefix());
                if links.get(link.as_str()).map_err(db_err)?.is_some() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Links an already stored blob to `repo` (after the upstream confirmed that repo has it).
    pub fn link(&self, repo: &RepoKey, d: &Digest) -> Result<(), StoreError> {
        let Some(size) = self.blob_size(d)? else {
            return Err(StoreError::Db(format!("cannot link {d}: not stored")));
        };
        // The references of a manifest were recorded with it; linking adds only the link.
        self.record_blob(d, size, repo, None)
    }

    pub fn manifest_media_type(&self, d: &Digest) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(MANIFESTS).map_err(db_err)?;
        let mt = t
            .get(d.to_string().as_str())
            .map_err(db_err)?
            .map(|v| v.value().to_owned());
        Ok(mt)
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
    pub(crate) fn forget_in_memory(&self, d: &str) {
        let mut mem = self.manifest_mem.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, b)) = mem.map.remove(d) {
            mem.bytes -= b.len();
        }
    }

    /// The size of a recorded blob and whether it is linked to `repo`, in one read.
    pub fn lookup_blob(
        &self,
        repo: &RepoKey,
        d: &Digest,
    ) -> Result<Option<(u64, bool)>, StoreError> {
        let key = d.to_string();
        let tx = self.db.begin_read().map_err(db_err)?;
        let Some(size) = tx
            .open_table(BLOBS)
            .map_err(db_err)?
            .get(key.as_str())
            .map_err(db_err)?
            .map(|v| v.value())
        else {
            return Ok(None);
        };
        let link = format!("{}{key}", repo.prefix());
        let linked = tx
            .open_table(LINKS)
            .map_err(db_err)?
            .get(link.as_str())
            .map_err(db_err)?
            .is_some();
        Ok(Some((size, linked)))
    }

    /// Reads a stored manifest's bytes (re-checking the digest: manifests are small).
    pub fn read_manifest(&self, d: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.blob_path(d);
        match fs::read(&path) {
            Ok(bytes) if d.matches(&bytes) => Ok(Some(bytes)),
            Ok(_) => {
                tracing::error!(digest = %d, path = %path.display(), "stored manifest does not match its digest; dropping it");
                let _ = fs::remove_file(&path);
                self.forget_blob(d)?;
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_blob(d)?;
                Ok(None)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Stores a verified manifest for `repo` (and points `tag` at it).
    pub fn put_manifest(
        &self,
        repo: &RepoKey,
        d: &Digest,
        media_type: &str,
        bytes: &[u8],
        tag: Option<&Tag>,
        subject: Option<(&Digest, &[u8])>,
    ) -> Result<(), StoreError> {
        let refs = manifest_refs(bytes);
        let manifest = Some((media_type, refs.as_slice()));
        if self.blob_size(d)?.is_some() && self.blob_path(d).exists() {
            self.record_blob(d, bytes.len() as u64, repo, manifest)?;
        } else {
            let mut temp = self.temp_blob()?;
            temp.write_all(bytes).map_err(io_err(&temp.path))?;
            self.commit_blob(temp, d, bytes.len() as u64, repo, manifest)?;
        }
        if let Some((subject, descriptor)) = subject {
            let key = format!("{}{subject}\0{d}", repo.prefix());
            let tx = self.db.begin_write().map_err(db_err)?;
            tx.open_table(REFERRERS)
                .map_err(db_err)?
                .insert(key.as_str(), descriptor)
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
        }
        if let Some(tag) = tag {
            self.set_tag(repo, tag, d, now_millis())?;
        }
        Ok(())
    }

    pub fn tag(&self, repo: &RepoKey, tag: &Tag) -> Result<Option<TagRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(TAGS).map_err(db_err)?;
        let key = format!("{}{tag}", repo.prefix());
        let Some(v) = t.get(key.as_str()).map_err(db_err)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    pub fn set_tag(
        &self,
        repo: &RepoKey,
        tag: &Tag,
        d: &Digest,
        checked_at_ms: u64,
    ) -> Result<(), StoreError> {
        let rec = TagRecord {
            digest: d.to_string(),
            checked_at_ms,
        };
        let value = serde_json::to_vec(&rec).map_err(db_err)?;
        let key = format!("{}{tag}", repo.prefix());
        let tx = self.db.begin_write().map_err(db_err)?;
        tx.open_table(TAGS)
            .map_err(db_err)?
            .insert(key.as_str(), value.as_slice())
            .map_err(db_err)?;
        tx.commit().map_err(db_err)
    }

    /// Cached tags of a repository, sorted.
    pub fn tags(&self, repo: &RepoKey) -> Result<Vec<String>, StoreError> {
        let prefix = repo.prefix();
        let end = format!("{}\x01", prefix.trim_end_matches('\0'));
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(TAGS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.range(prefix.as_str()..end.as_str()).map_err(db_err)? {
            let (k, _) = item.map_err(db_err)?;
            if let Some(tag) = k.value().strip_prefix(prefix.as_str()) {
                out.push(tag.to_owned());
            }
        }
        Ok(out)
    }

    /// Every cached repository as `(upstream, repo)`, sorted.
    pub fn repos(&self) -> Result<Vec<(String, String)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(REPOS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, _) = item.map_err(db_err)?;
            if let Some((u, r)) = k.value().split_once('\0') {
                out.push((u.to_owned(), r.to_owned()));
            }
        }
        Ok(out)
    }

    /// Descriptors (JSON) of cached manifests whose `subject` is `subject`.
    pub fn referrers(&self, repo: &RepoKey, subject: &Digest) -> Result<Vec<Vec<u8>>, StoreError> {
        let prefix = format!("{}{subject}\0", repo.prefix());
        let end = format!("{}{subject}\x01", repo.prefix());
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(REFERRERS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.range(prefix.as_str()..end.as_str()).map_err(db_err)? {
            let (_, v) = item.map_err(db_err)?;
            out.push(v.value().to_vec());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(repo: &str) -> RepoKey {
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
            .commit_blob(t, &d, data.len() as u64, &key("a/b"), None)
            .expect("commit");
        assert!(!temp_path.exists(), "temp file must be gone after commit");
        assert_eq!(std::fs::read(store.blob_path(&d)).expect("read"), data);
        assert!(store.is_linked(&key("a/b"), &d).expect("linked"));
        assert!(!store.is_linked(&key("a/c"), &d).expect("not linked"));
        store.link(&key("a/c"), &d).expect("link");
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
                Some(&tag),
                None,
            )
            .expect("put");
        let rec = store.tag(&key("x"), &tag).expect("tag").expect("present");
        assert_eq!(rec.digest, d.to_string());
        assert_eq!(store.tags(&key("x")).expect("tags"), vec!["v1".to_string()]);
        assert!(store.tags(&key("xy")).expect("tags").is_empty());
        assert_eq!(
            store.read_manifest(&d).expect("read").as_deref(),
            Some(&body[..])
        );
        std::fs::write(store.blob_path(&d), b"tampered").expect("tamper");
        assert_eq!(store.read_manifest(&d).expect("read"), None);
        assert_eq!(store.manifest_info(&d).expect("info"), None);
    }

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
                .commit_blob(t, &d, data.len() as u64, &key("a/b"), None)
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
    fn a_locked_data_directory_is_refused_with_the_owner_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Store::open(dir.path()).expect("open");
        let err = Store::open(dir.path())
            .err()
            .expect("second open must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("in use") && msg.contains(&std::process::id().to_string()),
            "{msg}"
        );
        drop(first);
        Store::open(dir.path()).expect("lock released with the first store");
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
            let tx = store.db.begin_write().expect("tx");
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
        let tx = store.db.begin_read().expect("read");
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
            let tx = store.db.begin_write().expect("tx");
            tx.open_table(META)
                .expect("meta")
                .insert("schema_version", SCHEMA_VERSION + 1)
                .expect("insert");
            tx.commit().expect("commit");
        }
        let err = Store::open(dir.path()).err().expect("must refuse");
        assert!(err.to_string().contains("newer"), "{err}");
    }
}

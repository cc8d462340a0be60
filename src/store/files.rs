//! The store's files in the data directory: whose the directory is (the [`MARKER`] file), the
//! directory lock, committed blob files and their paths, temporary files (`tmp/`) and their
//! commit, the walks over both for verify, and the filesystem's free space.
//!
//! A blob is recorded (`records.rs`) only after its file was verified, fsynced and renamed into
//! place, so every recorded blob exists with its digest's content.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::{io_err, now_secs, Owed, RepoKey, Store, StoreError};
use crate::config::data_dir::is_system_directory;
use crate::oci::reference::Digest;

/// Committed blob files: `blobs/<alg>/<first two hex>/<hex>`.
pub(super) const BLOBS_DIR: &str = "blobs";
/// Files being filled, never served by path, removed at start.
pub(super) const TMP_DIR: &str = "tmp";

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
    super::db::DB_FILE,
    "lock",
    crate::config::source::LAST_GOOD_FILE,
    crate::config::source::LAST_GOOD_TEMP,
];

/// Whose a data directory is, decided before anything in it is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ownership {
    /// It holds the marker.
    Marked,
    /// Missing (now created) or empty: taken, and marked at once.
    New,
    /// Only names regcache creates, the database file among them: a store of a regcache from
    /// before the marker, adopted (marked) once its database opens as a regcache database.
    Earlier,
}

pub(super) fn ownership(root: &Path) -> Result<Ownership, StoreError> {
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
    if foreign.is_empty() && names.iter().any(|n| n == super::db::DB_FILE) {
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

/// Writes the marker (and makes it durable), making `root` regcache's.
pub(super) fn write_marker(root: &Path) -> Result<(), StoreError> {
    let path = root.join(MARKER);
    let mut f = File::create(&path).map_err(io_err(&path))?;
    f.write_all(MARKER_TEXT.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(&path))?;
    File::open(root)
        .and_then(|d| d.sync_all())
        .map_err(io_err(root))
}

/// An exclusive lock on a data directory, held while the store is open (`flock` on `lock`,
/// which holds the owner's PID). The kernel releases it when the process dies, so a lock left by a
/// killed regcache is simply taken over.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    pub fn acquire(root: &Path) -> Result<DirLock, StoreError> {
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
            return Err(StoreError::Locked {
                path: root.to_owned(),
                pid: (!pid.is_empty()).then(|| pid.to_owned()),
            });
        }
        file.set_len(0).map_err(io_err(&path))?;
        file.rewind().map_err(io_err(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err(&path))?;
        Ok(DirLock { _file: file })
    }
}

/// Removes what `tmp` holds: at start, under the lock, that is fills that never finished (they
/// were never visible).
pub(super) fn clear_tmp(tmp: &Path) {
    if let Ok(entries) = fs::read_dir(tmp) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
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
            None => Err(closed()),
        }
    }

    /// Appends several buffers, with as few `writev` calls as the kernel allows.
    pub fn write_all_parts(&mut self, parts: &[bytes::Bytes]) -> io::Result<()> {
        let Some(f) = self.file.as_mut() else {
            return Err(closed());
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

fn closed() -> io::Error {
    io::Error::other("temporary file already closed")
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A file under `blobs/`, as found on disk.
pub(super) struct BlobFile {
    /// `<alg>:<file name>`: the digest the file's place names, if it is one.
    pub name: String,
    pub path: PathBuf,
}

/// Free bytes on the filesystem holding `path` (available to unprivileged users), via `statvfs`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Store {
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a committed blob lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join(BLOBS_DIR)
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

    /// Makes a verified temporary file the blob `d`: fsync, rename, fsync the directory, then
    /// record it (with a link for `repo`, a media type if it is a manifest, and what the commit
    /// owes elsewhere) in one transaction.
    pub fn commit_blob(
        &self,
        mut temp: TempBlob,
        d: &Digest,
        size: u64,
        repo: &RepoKey,
        manifest: Option<(&str, &[Digest])>,
        owed: Option<Owed<'_>>,
    ) -> Result<(), StoreError> {
        let Some(file) = temp.file.take() else {
            return Err(io_err(&temp.path)(closed()));
        };
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
        self.record_blob(d, size, repo, manifest, owed)
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

    /// Deletes the file of a digest whose records were removed (`digest` as recorded).
    pub(super) fn remove_blob_file(&self, digest: &str) {
        if let Ok(d) = digest.parse::<Digest>() {
            let _ = fs::remove_file(self.blob_path(&d));
        }
    }

    /// Checks that the data directory is writable: creates and removes a file in `tmp/`.
    pub(super) fn probe_writable(&self) -> Result<(), StoreError> {
        let probe = self.tmp.join(format!("ready-{}", std::process::id()));
        File::create(&probe).map_err(io_err(&probe))?;
        let _ = fs::remove_file(&probe);
        Ok(())
    }

    /// Every file under `blobs/<alg>/<xx>/`, read from disk as the walk goes. Unreadable
    /// directories are skipped.
    pub(super) fn blob_files(&self) -> impl Iterator<Item = BlobFile> {
        fn entries(dir: PathBuf) -> impl Iterator<Item = fs::DirEntry> {
            fs::read_dir(dir).into_iter().flatten().flatten()
        }
        entries(self.root.join(BLOBS_DIR)).flat_map(|alg| {
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            entries(alg.path()).flat_map(move |prefix| {
                let alg_name = alg_name.clone();
                entries(prefix.path()).map(move |file| BlobFile {
                    name: format!("{alg_name}:{}", file.file_name().to_string_lossy()),
                    path: file.path(),
                })
            })
        })
    }

    /// Every file in `tmp/`: fills in progress, or, with no server running, left by one that
    /// stopped.
    pub(super) fn temp_files(&self) -> Vec<PathBuf> {
        fs::read_dir(&self.tmp)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    }
}

//! The records of the metadata database, as `Store` methods: blob and manifest records, links,
//! tags, referrers, pins, the bucket outbox and access times, each read or written in one
//! transaction; and the whole-store reads and removals that eviction and verify work with.
//!
//! Keys and their formats (`upstream \0 repo \0 …`) stay in this file.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use redb::{Durability, ReadTransaction, ReadableTable, WriteTransaction};

use super::db::{
    ACCESS, BLOBS, LINKS, MANIFESTS, OUTBOX, PINS, REFBY, REFERRERS, REFS, REPOS, TAGS,
};
use super::{now_millis, now_secs, Owed, RepoKey, Store, StoreError, TagRecord};
use crate::oci::media::Accept;
use crate::oci::reference::{Digest, Tag};

impl RepoKey {
    fn prefix(&self) -> String {
        format!("{}\0{}\0", self.upstream, self.repo)
    }
    fn repo_key(&self) -> String {
        format!("{}\0{}", self.upstream, self.repo)
    }
}

/// What verify starts from, read in one transaction.
#[derive(Debug, Default)]
pub(super) struct Records {
    /// Every blob record: digest and size.
    pub blobs: Vec<(String, u64)>,
    /// Every manifest record's digest.
    pub manifests: Vec<String>,
    /// Every tag record: its key and digest (empty when the record does not parse).
    pub tags: Vec<(String, String)>,
}

/// What eviction starts from, read in one transaction.
#[derive(Debug, Default)]
pub(super) struct Snapshot {
    /// Every blob record: digest and size.
    pub blobs: Vec<(String, u64)>,
    /// `(parent, child)`: the manifest `parent` references `child`.
    pub refs: Vec<(String, String)>,
    /// The digests pins name: directly, or through a pinned tag (what it points to now, for the
    /// full `Accept` and for narrower ones).
    pub pinned: Vec<String>,
}

/// What a removal removed.
#[derive(Debug, Default)]
pub(super) struct Removed {
    /// The digests whose records and files were removed.
    pub digests: BTreeSet<String>,
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
}

/// Every blob record.
fn read_blobs(tx: &ReadTransaction) -> Result<Vec<(String, u64)>, StoreError> {
    let mut blobs = Vec::new();
    for item in tx.open_table(BLOBS)?.iter()? {
        let (k, v) = item?;
        blobs.push((k.value().to_owned(), v.value()));
    }
    Ok(blobs)
}

/// Every tag record's key and digest (empty when the record does not parse).
fn read_tags(tx: &ReadTransaction) -> Result<Vec<(String, String)>, StoreError> {
    let mut tags = Vec::new();
    for item in tx.open_table(TAGS)?.iter()? {
        let (k, v) = item?;
        let digest = serde_json::from_slice::<TagRecord>(v.value())
            .map(|r| r.digest)
            .unwrap_or_default();
        tags.push((k.value().to_owned(), digest));
    }
    Ok(tags)
}

/// The digests of `doomed` that no recorded manifest outside the result references, read in the
/// removal's write transaction (so nothing can be recorded between this check and the removal).
/// Sparing a manifest spares what it references, hence the loop until nothing changes.
fn still_unreferenced(
    tx: &WriteTransaction,
    doomed: &BTreeSet<String>,
) -> Result<BTreeSet<String>, StoreError> {
    let blobs = tx.open_table(BLOBS)?;
    let refby = tx.open_table(REFBY)?;
    let mut gone = doomed.clone();
    loop {
        let mut spared = Vec::new();
        for d in &gone {
            let (lo, hi) = (format!("{d}\0"), format!("{d}\x01"));
            for item in refby.range(lo.as_str()..hi.as_str())? {
                let (k, _) = item?;
                let Some(parent) = k.value().strip_prefix(lo.as_str()).map(str::to_owned) else {
                    continue;
                };
                if !gone.contains(&parent) && blobs.get(parent.as_str())?.is_some() {
                    spared.push(d.clone());
                    break;
                }
            }
        }
        if spared.is_empty() {
            return Ok(gone);
        }
        for d in spared {
            gone.remove(&d);
        }
    }
}

/// Blob and manifest records.
impl Store {
    /// Size of a committed blob, if the database records it.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        let tx = self.db.read()?;
        let t = tx.open_table(BLOBS)?;
        let size = t.get(d.to_string().as_str())?.map(|v| v.value());
        Ok(size)
    }

    /// The size of a recorded blob and whether it is linked to `repo`, in one read.
    pub fn lookup_blob(
        &self,
        repo: &RepoKey,
        d: &Digest,
    ) -> Result<Option<(u64, bool)>, StoreError> {
        let key = d.to_string();
        let tx = self.db.read()?;
        let Some(size) = tx.open_table(BLOBS)?.get(key.as_str())?.map(|v| v.value()) else {
            return Ok(None);
        };
        let link = format!("{}{key}", repo.prefix());
        let linked = tx.open_table(LINKS)?.get(link.as_str())?.is_some();
        Ok(Some((size, linked)))
    }

    /// Whether `digest` was obtained for (or confirmed to belong to) `repo`.
    pub fn is_linked(&self, repo: &RepoKey, d: &Digest) -> Result<bool, StoreError> {
        let tx = self.db.read()?;
        let t = tx.open_table(LINKS)?;
        let key = format!("{}{d}", repo.prefix());
        Ok(t.get(key.as_str())?.is_some())
    }

    /// Links an already stored blob to `repo` (after the upstream confirmed that repo has it),
    /// recording `owed` in the same transaction.
    pub fn link(
        &self,
        repo: &RepoKey,
        d: &Digest,
        owed: Option<Owed<'_>>,
    ) -> Result<(), StoreError> {
        let Some(size) = self.blob_size(d)? else {
            return Err(StoreError::NotStored {
                digest: d.to_string(),
            });
        };
        // The references of a manifest were recorded with it; linking adds only the link.
        self.record_blob(d, size, repo, None, owed)
    }

    pub fn manifest_media_type(&self, d: &Digest) -> Result<Option<String>, StoreError> {
        let tx = self.db.read()?;
        let t = tx.open_table(MANIFESTS)?;
        let mt = t.get(d.to_string().as_str())?.map(|v| v.value().to_owned());
        Ok(mt)
    }

    /// Records an existing blob file (and its link for `repo`, for a manifest its media type and
    /// references, and what the commit owes elsewhere), in one transaction.
    pub(super) fn record_blob(
        &self,
        d: &Digest,
        size: u64,
        repo: &RepoKey,
        manifest: Option<(&str, &[Digest])>,
        owed: Option<Owed<'_>>,
    ) -> Result<(), StoreError> {
        let key = d.to_string();
        let now = now_secs();
        let tx = self.db.write()?;
        let new;
        {
            new = tx.open_table(BLOBS)?.insert(key.as_str(), size)?.is_none();
            if let Some((mt, refs)) = manifest {
                tx.open_table(MANIFESTS)?.insert(key.as_str(), mt)?;
                let mut r = tx.open_table(REFS)?;
                let mut rb = tx.open_table(REFBY)?;
                for child in refs {
                    r.insert(format!("{key}\0{child}").as_str(), ())?;
                    rb.insert(format!("{child}\0{key}").as_str(), ())?;
                }
            }
            let link = format!("{}{key}", repo.prefix());
            tx.open_table(LINKS)?.insert(link.as_str(), now)?;
            let mut repos = tx.open_table(REPOS)?;
            let rk = repo.repo_key();
            if repos.get(rk.as_str())?.is_none() {
                repos.insert(rk.as_str(), now)?;
            }
            if let Some(o) = owed {
                tx.open_table(OUTBOX)?.insert(o.key, o.record)?;
            }
        }
        tx.commit()?;
        if new {
            self.used.fetch_add(size, Ordering::Relaxed);
        }
        self.touch(d);
        Ok(())
    }

    /// Records an intact blob file found without a record (no repository link: it is served
    /// once an upstream confirms a repository has it).
    pub fn record_orphan(&self, d: &Digest, size: u64) -> Result<(), StoreError> {
        let key = d.to_string();
        let tx = self.db.write()?;
        let new = tx.open_table(BLOBS)?.insert(key.as_str(), size)?.is_none();
        tx.commit()?;
        if new {
            self.used.fetch_add(size, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Drops the blob and manifest records of `d` (its file is gone or bad).
    pub(super) fn forget_blob(&self, d: &Digest) -> Result<(), StoreError> {
        self.forget_in_memory(&d.to_string());
        let tx = self.db.write()?;
        let freed;
        {
            let key = d.to_string();
            freed = tx
                .open_table(BLOBS)?
                .remove(key.as_str())?
                .map_or(0, |v| v.value());
            tx.open_table(MANIFESTS)?.remove(key.as_str())?;
        }
        tx.commit()?;
        self.sub_used(freed);
        Ok(())
    }

    /// Number of blobs and their total size, from the database.
    pub fn usage(&self) -> Result<(u64, u64), StoreError> {
        let tx = self.db.read()?;
        let t = tx.open_table(BLOBS)?;
        let (mut n, mut bytes) = (0u64, 0u64);
        for item in t.iter()? {
            let (_, v) = item?;
            n += 1;
            bytes += v.value();
        }
        Ok((n, bytes))
    }
}

/// Tags, repositories and referrers.
impl Store {
    /// The `tags` key of a tag's record for clients accepting `accept`.
    fn tag_key(repo: &RepoKey, tag: &Tag, accept: Accept) -> String {
        if accept.is_all() {
            format!("{}{tag}", repo.prefix())
        } else {
            format!("{}{tag}\0accept={accept}", repo.prefix())
        }
    }

    /// The tag's record for the full `Accept`.
    pub fn tag(&self, repo: &RepoKey, tag: &Tag) -> Result<Option<TagRecord>, StoreError> {
        self.tag_for(repo, tag, Accept::ALL)
    }

    /// The tag's record for clients accepting `accept`.
    pub fn tag_for(
        &self,
        repo: &RepoKey,
        tag: &Tag,
        accept: Accept,
    ) -> Result<Option<TagRecord>, StoreError> {
        let tx = self.db.read()?;
        let t = tx.open_table(TAGS)?;
        let key = Store::tag_key(repo, tag, accept);
        let Some(v) = t.get(key.as_str())? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(v.value()).ok())
    }

    /// Points the tag's record for the full `Accept` at `d`.
    pub fn set_tag(
        &self,
        repo: &RepoKey,
        tag: &Tag,
        d: &Digest,
        checked_at_ms: u64,
    ) -> Result<(), StoreError> {
        self.set_tag_for(repo, tag, Accept::ALL, d, checked_at_ms)
    }

    /// Points the tag's record for clients accepting `accept` at `d`.
    pub fn set_tag_for(
        &self,
        repo: &RepoKey,
        tag: &Tag,
        accept: Accept,
        d: &Digest,
        checked_at_ms: u64,
    ) -> Result<(), StoreError> {
        let rec = TagRecord {
            digest: d.to_string(),
            checked_at_ms,
        };
        let value = serde_json::to_vec(&rec).map_err(StoreError::Encode)?;
        let key = Store::tag_key(repo, tag, accept);
        let tx = self.db.write()?;
        tx.open_table(TAGS)?
            .insert(key.as_str(), value.as_slice())?;
        Ok(tx.commit()?)
    }

    /// Cached tags of a repository, sorted.
    pub fn tags(&self, repo: &RepoKey) -> Result<Vec<String>, StoreError> {
        let prefix = repo.prefix();
        let end = format!("{}\x01", prefix.trim_end_matches('\0'));
        let tx = self.db.read()?;
        let t = tx.open_table(TAGS)?;
        let mut out = Vec::new();
        for item in t.range(prefix.as_str()..end.as_str())? {
            let (k, _) = item?;
            // A tag's records for narrower Accept sets (`tag \0 accept=…`) follow its own, if any:
            // one name per tag.
            if let Some(rest) = k.value().strip_prefix(prefix.as_str()) {
                let tag = rest.split('\0').next().unwrap_or(rest);
                if out.last().map(String::as_str) != Some(tag) {
                    out.push(tag.to_owned());
                }
            }
        }
        Ok(out)
    }

    /// Removes tag records by their keys (as [`Records::tags`] gives them).
    pub(super) fn remove_tags(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let tx = self.db.write()?;
        {
            let mut t = tx.open_table(TAGS)?;
            for k in keys {
                t.remove(k.as_str())?;
            }
        }
        Ok(tx.commit()?)
    }

    /// Every cached repository as `(upstream, repo)`, sorted.
    pub fn repos(&self) -> Result<Vec<(String, String)>, StoreError> {
        let tx = self.db.read()?;
        let t = tx.open_table(REPOS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, _) = item?;
            if let Some((u, r)) = k.value().split_once('\0') {
                out.push((u.to_owned(), r.to_owned()));
            }
        }
        Ok(out)
    }

    /// Records that the manifest `d` of `repo` refers to `subject`, with its descriptor (JSON).
    pub(super) fn add_referrer(
        &self,
        repo: &RepoKey,
        subject: &Digest,
        d: &Digest,
        descriptor: &[u8],
    ) -> Result<(), StoreError> {
        let key = format!("{}{subject}\0{d}", repo.prefix());
        let tx = self.db.write()?;
        tx.open_table(REFERRERS)?.insert(key.as_str(), descriptor)?;
        Ok(tx.commit()?)
    }

    /// Descriptors (JSON) of cached manifests whose `subject` is `subject`.
    pub fn referrers(&self, repo: &RepoKey, subject: &Digest) -> Result<Vec<Vec<u8>>, StoreError> {
        let prefix = format!("{}{subject}\0", repo.prefix());
        let end = format!("{}{subject}\x01", repo.prefix());
        let tx = self.db.read()?;
        let t = tx.open_table(REFERRERS)?;
        let mut out = Vec::new();
        for item in t.range(prefix.as_str()..end.as_str())? {
            let (_, v) = item?;
            out.push(v.value().to_vec());
        }
        Ok(out)
    }
}

/// Pins, the bucket outbox and access times.
impl Store {
    /// Pins `reference` (tag or digest) of `repo` against eviction.
    pub fn pin(&self, repo: &RepoKey, reference: &str) -> Result<(), StoreError> {
        let key = format!("{}{reference}", repo.prefix());
        let tx = self.db.write()?;
        tx.open_table(PINS)?.insert(key.as_str(), now_secs())?;
        Ok(tx.commit()?)
    }

    /// Removes a pin; returns whether it existed.
    pub fn unpin(&self, repo: &RepoKey, reference: &str) -> Result<bool, StoreError> {
        let key = format!("{}{reference}", repo.prefix());
        let tx = self.db.write()?;
        let existed = tx.open_table(PINS)?.remove(key.as_str())?.is_some();
        tx.commit()?;
        Ok(existed)
    }

    /// Every pin as `(upstream, repo, reference)`.
    pub fn pins(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let tx = self.db.read()?;
        let t = tx.open_table(PINS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, _) = item?;
            let mut parts = k.value().splitn(3, '\0');
            if let (Some(u), Some(r), Some(x)) = (parts.next(), parts.next(), parts.next()) {
                out.push((u.to_owned(), r.to_owned(), x.to_owned()));
            }
        }
        Ok(out)
    }

    /// Records a write owed elsewhere (replacing one with the same key), apart from any commit.
    pub fn outbox_add(&self, key: &str, record: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.write()?;
        tx.open_table(OUTBOX)?.insert(key, record)?;
        Ok(tx.commit()?)
    }

    /// Forgets a write owed elsewhere, once made. Not flushed to disk by itself (the next
    /// durable commit carries it): a crash that loses the removal only means the write is made
    /// again, and each write done spares an fsync.
    pub fn outbox_remove(&self, key: &str) -> Result<(), StoreError> {
        let mut tx = self.db.write()?;
        tx.set_durability(Durability::None)
            .map_err(redb::Error::from)?;
        tx.open_table(OUTBOX)?.remove(key)?;
        Ok(tx.commit()?)
    }

    /// Every write owed elsewhere, as recorded.
    pub fn outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.read()?;
        let t = tx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
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
        let tx = self.db.write()?;
        {
            let blobs = tx.open_table(BLOBS)?;
            let mut t = tx.open_table(ACCESS)?;
            for (k, v) in &pending {
                if blobs.get(k.as_str())?.is_some() {
                    t.insert(k.as_str(), *v)?;
                }
            }
        }
        tx.commit()?;
        Ok(pending.len())
    }

    /// Access times, pending ones included.
    pub(super) fn access_times(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut out = HashMap::new();
        let tx = self.db.read()?;
        let t = tx.open_table(ACCESS)?;
        for item in t.iter()? {
            let (k, v) = item?;
            out.insert(k.value().to_owned(), v.value());
        }
        for (k, v) in self.access.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.insert(k.clone(), *v);
        }
        Ok(out)
    }
}

/// The whole store at once: what eviction and verify start from, and removals.
impl Store {
    /// Every blob, manifest and tag record, for verify.
    pub(super) fn records(&self) -> Result<Records, StoreError> {
        let tx = self.db.read()?;
        let mut manifests = Vec::new();
        for item in tx.open_table(MANIFESTS)?.iter()? {
            manifests.push(item?.0.value().to_owned());
        }
        Ok(Records {
            blobs: read_blobs(&tx)?,
            manifests,
            tags: read_tags(&tx)?,
        })
    }

    /// Every blob record, the reference graph and what the pins protect, for eviction.
    pub(super) fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let tx = self.db.read()?;
        let blobs = read_blobs(&tx)?;
        let tags: Vec<(String, String)> = read_tags(&tx)?
            .into_iter()
            .filter(|(_, d)| !d.is_empty())
            .collect();
        let mut refs = Vec::new();
        for item in tx.open_table(REFS)?.iter()? {
            let (k, _) = item?;
            if let Some((p, c)) = k.value().split_once('\0') {
                refs.push((p.to_owned(), c.to_owned()));
            }
        }
        let mut pin_keys = Vec::new();
        for item in tx.open_table(PINS)?.iter()? {
            pin_keys.push(item?.0.value().to_owned());
        }
        // A pin names a digest directly, or a tag whose current digest is pinned.
        let tag_digest: HashMap<&str, &str> =
            tags.iter().map(|(k, d)| (k.as_str(), d.as_str())).collect();
        let mut pinned = Vec::new();
        for key in pin_keys {
            let reference = key.rsplit('\0').next().unwrap_or("");
            if reference.parse::<Digest>().is_ok() {
                pinned.push(reference.to_owned());
            } else {
                pinned.extend(tag_digest.get(key.as_str()).map(|d| (*d).to_owned()));
                // And what the tag gives clients with narrower Accept sets (`key \0 accept=…`),
                // which may be all that is cached of it.
                let narrower = format!("{key}\0");
                pinned.extend(
                    tags.iter()
                        .filter(|(k, _)| k.starts_with(&narrower))
                        .map(|(_, d)| d.clone()),
                );
            }
        }
        Ok(Snapshot {
            blobs,
            refs,
            pinned,
        })
    }

    /// Removes the records of `doomed` (blob, manifest, access time, references, and the tags
    /// that point at them: a cached tag is always complete) in one transaction, then their files.
    /// Returns the manifests, blobs and bytes removed. For `verify --repair`: bad digests go,
    /// whatever references them.
    pub(super) fn drop_blobs(
        &self,
        doomed: &BTreeSet<String>,
    ) -> Result<(u64, u64, u64), StoreError> {
        let r = self.remove_blobs(doomed, false)?;
        Ok((r.manifests, r.blobs, r.bytes))
    }

    /// Eviction's removal: [`Store::drop_blobs`], except that `doomed` was chosen from a snapshot,
    /// and a manifest recorded since may reference some of it. Inside the removal's transaction,
    /// every doomed digest that a recorded manifest outside the removed set references (a `refby`
    /// row) is kept, and so, in turn, is what a kept manifest references.
    pub(super) fn evict_blobs(&self, doomed: &BTreeSet<String>) -> Result<Removed, StoreError> {
        self.remove_blobs(doomed, true)
    }

    fn remove_blobs(
        &self,
        doomed: &BTreeSet<String>,
        spare_referenced: bool,
    ) -> Result<Removed, StoreError> {
        let mut removed = Removed::default();
        if doomed.is_empty() {
            return Ok(removed);
        }
        let tx = self.db.write()?;
        let gone = if spare_referenced {
            still_unreferenced(&tx, doomed)?
        } else {
            doomed.clone()
        };
        {
            let mut blobs = tx.open_table(BLOBS)?;
            let mut manifests = tx.open_table(MANIFESTS)?;
            let mut access = tx.open_table(ACCESS)?;
            let mut refs = tx.open_table(REFS)?;
            let mut refby = tx.open_table(REFBY)?;
            for d in &gone {
                if let Some(v) = blobs.remove(d.as_str())? {
                    removed.bytes += v.value();
                    removed.blobs += 1;
                }
                if manifests.remove(d.as_str())?.is_some() {
                    removed.manifests += 1;
                }
                access.remove(d.as_str())?;
                let (lo, hi) = (format!("{d}\0"), format!("{d}\x01"));
                let children: Vec<String> = refs
                    .range(lo.as_str()..hi.as_str())?
                    .filter_map(|i| i.ok().map(|(k, _)| k.value().to_owned()))
                    .collect();
                for k in children {
                    refs.remove(k.as_str())?;
                    if let Some((p, c)) = k.split_once('\0') {
                        refby.remove(format!("{c}\0{p}").as_str())?;
                    }
                }
            }
            let mut tags = tx.open_table(TAGS)?;
            let dangling: Vec<String> = tags
                .iter()?
                .filter_map(|i| i.ok())
                .filter(|(_, v)| {
                    serde_json::from_slice::<TagRecord>(v.value())
                        .is_ok_and(|r| gone.contains(&r.digest))
                })
                .map(|(k, _)| k.value().to_owned())
                .collect();
            for k in dangling {
                tags.remove(k.as_str())?;
            }
        }
        tx.commit()?;
        for d in &gone {
            self.forget_in_memory(d);
        }
        self.sub_used(removed.bytes);
        // Records first, then files: a crash in between leaves only unrecorded files.
        for d in &gone {
            self.remove_blob_file(d);
        }
        removed.digests = gone;
        Ok(removed)
    }
}

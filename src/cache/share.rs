//! Writes to the shared bucket: what the upstream gave this server ([`Share`]) is written in the
//! background. A blob or manifest is owed from its commit on: its `outbox` record is written in
//! the commit's own transaction ([`Cache::commit_and_share`]) and removed once the write is made,
//! so a server killed before its upload makes it after a restart. What the bucket could not take
//! waits in memory (and in the `outbox`) and is retried by the maintenance loop once the bucket
//! answers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{blocking, lock, Cache, CacheError};
use crate::oci::reference::{Digest, RepoName, Tag};
use crate::store::{Owed, Store, StoreError};

/// Most writes kept for the bucket while it does not answer; the oldest are dropped beyond this.
const MAX_PENDING: usize = 10_000;

/// A write to the shared bucket.
#[derive(Clone)]
pub(super) enum Share {
    /// A committed blob: uploaded from its file, then linked to the repository it was
    /// fetched for (`upstream-id`, repository).
    Blob {
        digest: Digest,
        size: u64,
        link: Option<(String, RepoName)>,
    },
    /// A manifest fetched for `repo`, with the tag that pointed at it and when.
    Manifest {
        upstream: String,
        repo: RepoName,
        digest: Digest,
        media_type: String,
        bytes: Bytes,
        tag: Option<(Tag, u64)>,
    },
    /// A tag the upstream confirmed at `checked_at_ms`.
    Tag {
        upstream: String,
        repo: RepoName,
        tag: Tag,
        digest: Digest,
        checked_at_ms: u64,
    },
}

/// Writes waiting for the bucket, with the gauge that counts them.
pub(super) struct PendingShares {
    items: Mutex<VecDeque<Share>>,
    gauge: prometheus_client::metrics::gauge::Gauge,
    /// Where deferred writes are also recorded (the `outbox` table), to survive a restart.
    store: Arc<Store>,
}

/// A write owed to the bucket as the `outbox` table keeps it (a manifest's bytes are read back
/// from the store).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum ShareRecord {
    Blob {
        digest: String,
        size: u64,
        #[serde(default)]
        upstream: Option<String>,
        #[serde(default)]
        repo: Option<String>,
    },
    Manifest {
        upstream: String,
        repo: String,
        digest: String,
        media_type: String,
        tag: Option<String>,
        checked_at_ms: u64,
    },
    Tag {
        upstream: String,
        repo: String,
        tag: String,
        digest: String,
        checked_at_ms: u64,
    },
}

impl Share {
    /// The outbox key: one entry per object it writes (a newer write replaces an older one).
    fn key(&self) -> String {
        match self {
            // One entry per repository link: a blob fetched for two repositories owes both.
            Share::Blob {
                digest,
                link: Some((upstream, repo)),
                ..
            } => format!("blob\0{digest}\0{upstream}\0{repo}"),
            Share::Blob { digest, .. } => format!("blob\0{digest}"),
            Share::Manifest {
                upstream,
                repo,
                digest,
                ..
            } => format!("manifest\0{upstream}\0{repo}\0{digest}"),
            Share::Tag {
                upstream,
                repo,
                tag,
                ..
            } => format!("tag\0{upstream}\0{repo}\0{tag}"),
        }
    }

    fn record(&self) -> ShareRecord {
        match self.clone() {
            Share::Blob { digest, size, link } => ShareRecord::Blob {
                digest: digest.to_string(),
                size,
                upstream: link.as_ref().map(|(u, _)| u.clone()),
                repo: link.map(|(_, r)| r.to_string()),
            },
            Share::Manifest {
                upstream,
                repo,
                digest,
                media_type,
                tag,
                ..
            } => ShareRecord::Manifest {
                upstream,
                repo: repo.to_string(),
                digest: digest.to_string(),
                media_type,
                checked_at_ms: tag.as_ref().map_or(0, |(_, at)| *at),
                tag: tag.map(|(t, _)| t.to_string()),
            },
            Share::Tag {
                upstream,
                repo,
                tag,
                digest,
                checked_at_ms,
            } => ShareRecord::Tag {
                upstream,
                repo: repo.to_string(),
                tag: tag.to_string(),
                digest: digest.to_string(),
                checked_at_ms,
            },
        }
    }

    /// The write a record describes, if it still can be done (`None`: malformed, or the
    /// manifest is no longer stored).
    fn from_record(r: ShareRecord, store: &Store) -> Option<Share> {
        Some(match r {
            ShareRecord::Blob {
                digest,
                size,
                upstream,
                repo,
            } => Share::Blob {
                digest: digest.parse().ok()?,
                size,
                link: match (upstream, repo) {
                    (Some(u), Some(r)) => Some((u, r.parse().ok()?)),
                    _ => None,
                },
            },
            ShareRecord::Manifest {
                upstream,
                repo,
                digest,
                media_type,
                tag,
                checked_at_ms,
            } => {
                let digest: Digest = digest.parse().ok()?;
                let (_, bytes) = store.manifest(&digest).ok()??;
                let tag = match tag {
                    Some(t) => Some((t.parse().ok()?, checked_at_ms)),
                    None => None,
                };
                Share::Manifest {
                    upstream,
                    repo: repo.parse().ok()?,
                    digest,
                    media_type,
                    bytes,
                    tag,
                }
            }
            ShareRecord::Tag {
                upstream,
                repo,
                tag,
                digest,
                checked_at_ms,
            } => Share::Tag {
                upstream,
                repo: repo.parse().ok()?,
                tag: tag.parse().ok()?,
                digest: digest.parse().ok()?,
                checked_at_ms,
            },
        })
    }
}

impl Cache {
    /// Runs `commit` on the blocking pool, giving it the `outbox` record of `item` (when a bucket
    /// is configured) to write in its transaction; once it succeeded, writes `item` to the bucket
    /// in the background, and the record goes when that write is made. So the write is owed from
    /// the instant the content is committed: a crash afterwards leaves it for
    /// [`Cache::load_outbox`], and a failed commit owes nothing.
    pub(super) async fn commit_and_share(
        &self,
        item: Option<Share>,
        commit: impl FnOnce(Option<Owed<'_>>) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), CacheError> {
        let item = item.filter(|_| self.tiers.bucket_tier().is_some());
        let row = item
            .as_ref()
            .and_then(|i| match serde_json::to_vec(&i.record()) {
                Ok(record) => Some((i.key(), record)),
                Err(e) => {
                    // Still written, only not owed across a restart (as before the outbox).
                    tracing::warn!(error = %e, "cannot record a write owed to the bucket");
                    None
                }
            });
        let recorded = blocking(move || {
            commit(row.as_ref().map(|(key, record)| Owed { key, record }))?;
            Ok(row.is_some())
        })
        .await?;
        if let Some(item) = item {
            self.share_item(item, recorded);
        }
        Ok(())
    }

    /// Writes `item` to the bucket in the background; when the bucket is skipped or the write
    /// fails, keeps it for [`Cache::retry_shares`] (and records it in the `outbox`).
    pub(super) fn share(&self, item: Share) {
        self.share_item(item, false);
    }

    /// [`Cache::share`]; `recorded`: the write is in the outbox (a retry), to be removed from
    /// it once done.
    fn share_item(&self, item: Share, recorded: bool) {
        let Some(tier) = self.tiers.bucket_tier() else {
            return;
        };
        let b = tier.bucket();
        if !b.is_up() {
            self.pending.defer(item, recorded);
            return;
        }
        // Over a copy that failed verification here, the good one is written anyway.
        let replace = match &item {
            Share::Blob { digest, .. } => tier.is_bad(digest),
            _ => false,
        };
        let (b, pending, store) = (
            Arc::clone(b),
            Arc::clone(&self.pending),
            Arc::clone(&self.store),
        );
        self.runtime.spawn(async move {
            // One of a few write slots first: a retry of thousands of writes neither opens
            // thousands of files nor floods the bucket.
            let _slot = match b.upload_slot().await {
                Ok(s) => s,
                Err(_) => return,
            };
            let r = match &item {
                Share::Blob { digest, size, link } => {
                    // Opened now, so eviction cannot take the file away during the upload.
                    match store.open_blob(digest) {
                        Ok(Some((file, _))) => {
                            let r = b.put_blob(digest, file, *size, replace).await;
                            match (r, link) {
                                (Ok(()), Some((upstream, repo))) => {
                                    b.put_blob_link(upstream, repo, digest).await
                                }
                                (r, _) => r,
                            }
                        }
                        Ok(None) => {
                            // Evicted meanwhile: nothing left to share.
                            pending.forget(&item, recorded);
                            return;
                        }
                        Err(e) => Err(crate::bucket::BucketError::Local {
                            what: "opening the blob to upload",
                            source: Box::new(e),
                        }),
                    }
                }
                Share::Manifest {
                    upstream,
                    repo,
                    digest,
                    media_type,
                    bytes,
                    tag,
                } => {
                    let tag = tag.as_ref().map(|(t, at)| (t, *at));
                    b.put_manifest(upstream, repo, digest, media_type, bytes.clone(), tag)
                        .await
                }
                Share::Tag {
                    upstream,
                    repo,
                    tag,
                    digest,
                    checked_at_ms,
                } => b.put_tag(upstream, repo, tag, digest, *checked_at_ms).await,
            };
            match r {
                Ok(()) => pending.forget(&item, recorded),
                Err(e) => {
                    tracing::debug!(error = %e, "not shared yet; retried when the bucket answers");
                    pending.defer(item, recorded);
                }
            }
        });
    }

    /// Writes what could not be shared earlier, once the bucket answers again (run by the
    /// maintenance loop).
    pub fn retry_shares(&self) {
        if !self.tiers.bucket().is_some_and(|b| b.is_up()) {
            return;
        }
        let items: Vec<Share> = {
            let mut q = lock(&self.pending.items);
            self.pending.gauge.set(0);
            q.drain(..).collect()
        };
        if !items.is_empty() {
            tracing::info!(
                count = items.len(),
                "sharing what the bucket missed while it was unreachable"
            );
        }
        for item in items {
            self.share_item(item, true);
        }
    }

    /// Queues the writes owed to the bucket that a previous run recorded (called once at start;
    /// the maintenance loop retries them).
    pub fn load_outbox(&self) -> Result<usize, CacheError> {
        if self.tiers.bucket().is_none() {
            return Ok(0);
        }
        let mut n = 0;
        let records = self.store.outbox()?;
        let mut q = lock(&self.pending.items);
        for (key, raw) in records {
            let share = serde_json::from_slice::<ShareRecord>(&raw)
                .ok()
                .and_then(|r| Share::from_record(r, &self.store));
            match share {
                Some(item) => {
                    // Recorded by a version that keyed a blob by its digest alone: re-keyed,
                    // so that writing it clears it.
                    if item.key() != key {
                        self.store.outbox_remove(&key)?;
                        self.store.outbox_add(&item.key(), &raw)?;
                    }
                    q.push_back(item);
                    n += 1;
                }
                // Malformed, or its manifest was evicted: nothing left to write.
                None => self.store.outbox_remove(&key)?,
            }
        }
        self.pending.gauge.set(q.len() as i64);
        Ok(n)
    }
}

impl PendingShares {
    /// No writes waiting yet; `gauge` counts them, `store` records them.
    pub(super) fn new(gauge: prometheus_client::metrics::gauge::Gauge, store: Arc<Store>) -> Self {
        PendingShares {
            items: Mutex::new(VecDeque::new()),
            gauge,
            store,
        }
    }

    /// Keeps `item` for a retry, in memory and (unless `recorded` already) in the outbox.
    fn defer(&self, item: Share, recorded: bool) {
        if !recorded {
            let (key, record) = (item.key(), serde_json::to_vec(&item.record()));
            let store = Arc::clone(&self.store);
            if let Ok(record) = record {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = store.outbox_add(&key, &record) {
                        tracing::warn!(error = %e, "cannot record a write owed to the bucket");
                    }
                });
            }
        }
        let mut q = lock(&self.items);
        // One entry per object: a newer write (a later tag confirmation) replaces the older.
        let key = item.key();
        if let Some(old) = q.iter_mut().find(|x| x.key() == key) {
            *old = item;
            return;
        }
        if q.len() >= MAX_PENDING {
            if let Some(old) = q.pop_front() {
                self.forget(&old, true);
            }
            tracing::warn!(
                max = MAX_PENDING,
                "too many writes waiting for the bucket: dropping the oldest"
            );
        }
        q.push_back(item);
        self.gauge.set(q.len() as i64);
    }

    /// Drops `item` from the outbox once written (or no longer writable).
    fn forget(&self, item: &Share, recorded: bool) {
        if recorded {
            let (key, store) = (item.key(), Arc::clone(&self.store));
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.outbox_remove(&key) {
                    tracing::warn!(error = %e, "cannot clear a write owed to the bucket");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RepoKey;

    /// A cache on `store` with a bucket where nothing listens.
    fn with_bucket(store: &Arc<Store>, runtime: &tokio::runtime::Handle) -> Cache {
        use std::time::Duration;
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let cfg = crate::config::S3Config {
            bucket: "regcache".into(),
            endpoint: Some("http://127.0.0.1:9".parse().expect("url")),
            region: "us-east-1".into(),
            prefix: String::new(),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            virtual_hosted_style: false,
            timeout: Duration::from_secs(1),
            redirect: false,
            redirect_ttl: Duration::from_secs(60),
        };
        let bucket = crate::bucket::Bucket::new(&cfg, Arc::clone(&metrics), runtime.clone())
            .expect("bucket client");
        Cache::new(
            Arc::clone(store),
            super::super::tier::Tiers::new(None, Some(bucket)),
            1 << 20,
            metrics,
            runtime.clone(),
        )
    }

    /// The outbox's keys, readable.
    fn owed_keys(store: &Store) -> Vec<String> {
        let owed = store.outbox().expect("outbox");
        owed.into_iter()
            .map(|(k, _)| k.replace('\0', " "))
            .collect()
    }

    #[tokio::test]
    async fn a_commit_owes_the_bucket_its_write_at_once_and_a_failed_commit_owes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let cache = with_bucket(&store, &tokio::runtime::Handle::current());
        let data = b"a layer the upstream gave";
        let d = Digest::sha256_of(data);
        let key = RepoKey {
            upstream: "127.0.0.1:5000".into(),
            repo: "a/b".parse().expect("repo"),
        };
        let share = |d: &Digest| Share::Blob {
            digest: d.clone(),
            size: data.len() as u64,
            link: Some((key.upstream.clone(), key.repo.clone())),
        };
        /// Commits `data` as a blob fetched for `key`'s repository, owing `item`.
        async fn commit(
            cache: &Cache,
            key: &RepoKey,
            data: &[u8],
            item: Option<Share>,
        ) -> Result<(), CacheError> {
            let mut temp = cache.store.temp_blob().expect("temp");
            temp.write_all(data).expect("write");
            let (store, k, d) = (
                Arc::clone(&cache.store),
                key.clone(),
                Digest::sha256_of(data),
            );
            let size = data.len() as u64;
            cache
                .commit_and_share(item, move |owed| {
                    store.commit_blob(temp, &d, size, &k, None, owed)
                })
                .await
        }
        commit(&cache, &key, data, Some(share(&d)))
            .await
            .expect("commit");
        // Owed as the commit returns, before its upload could be made (none can be: nothing
        // listens), and still owed once that upload failed.
        let want = vec![share(&d).key().replace('\0', " ")];
        assert_eq!(owed_keys(&store), want, "right after the commit");

        // A link that cannot be recorded (the blob is not stored) owes nothing.
        let never = Digest::sha256_of(b"never stored");
        let (s2, k2, n2) = (Arc::clone(&store), key.clone(), never.clone());
        let linked = cache
            .commit_and_share(Some(share(&never)), move |owed| s2.link(&k2, &n2, owed))
            .await;
        assert!(linked.is_err(), "linked a blob that is not stored");
        assert_eq!(owed_keys(&store), want, "after a failed commit");

        // Without a bucket, a commit owes nothing.
        let other = tempfile::tempdir().expect("temp dir");
        let (plain, _) = crate::cache::tests::cache_without_upstream(other.path());
        commit(&plain, &key, data, Some(share(&d)))
            .await
            .expect("commit");
        assert!(plain.store.blob_size(&d).expect("size").is_some());
        assert_eq!(owed_keys(&plain.store), Vec::<String>::new());
    }

    #[test]
    fn owed_links_of_one_blob_to_two_repositories_are_both_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        // Where the cache would spawn its writes and the bucket its requests.
        let background = tokio::runtime::Runtime::new().expect("runtime");
        let d = Digest::sha256_of(b"a layer both repositories use");
        let owed = |repo: &str| Share::Blob {
            digest: d.clone(),
            size: 29,
            link: Some(("127.0.0.1:5000".into(), repo.parse().expect("repo"))),
        };
        // What a version that keyed a blob's entry by its digest alone left in the outbox.
        let legacy = serde_json::to_vec(&owed("small/app").record()).expect("json");
        store
            .outbox_add(&format!("blob\0{d}"), &legacy)
            .expect("record");

        let cache = with_bucket(&store, background.handle());
        assert_eq!(cache.load_outbox().expect("load"), 1);
        // The bucket is down: the same blob, fetched for another repository, is owed too.
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async { cache.pending.defer(owed("big/app"), false) });
        drop(rt); // waits for the outbox write
        let queued = cache.pending.items.lock().expect("queue").len();
        assert_eq!(queued, 2, "one owed link replaced the other");

        let recorded: Vec<String> = store
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|(key, _)| key.replace('\0', " "))
            .collect();
        assert_eq!(recorded.len(), 2, "recorded: {recorded:?}");
        assert_eq!(
            with_bucket(&store, background.handle())
                .load_outbox()
                .expect("load"),
            2,
            "after a restart, recorded: {recorded:?}"
        );
        // Written, each link's entry goes: none is left under the old key.
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            for repo in ["small/app", "big/app"] {
                cache.pending.forget(&owed(repo), true);
            }
        });
        drop(rt);
        let left = store.outbox().expect("outbox");
        assert!(
            left.is_empty(),
            "left in the outbox: {:?}",
            left.iter()
                .map(|(k, _)| k.replace('\0', " "))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn owed_bucket_writes_survive_their_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let d = Digest::sha256_of(b"layer");
        let items = [
            Share::Blob {
                digest: d.clone(),
                size: 5,
                link: Some((
                    "127.0.0.1:5000".into(),
                    "library/alpine".parse().expect("repo"),
                )),
            },
            Share::Tag {
                upstream: "127.0.0.1:5000".into(),
                repo: "library/alpine".parse().expect("repo"),
                tag: "3.20".parse().expect("tag"),
                digest: d.clone(),
                checked_at_ms: 42,
            },
        ];
        for item in items {
            let json = serde_json::to_vec(&item.record()).expect("json");
            let back = serde_json::from_slice::<ShareRecord>(&json).expect("parse");
            let again = Share::from_record(back, &store).expect("still writable");
            assert_eq!(again.key(), item.key());
            assert_eq!(
                serde_json::to_vec(&again.record()).expect("json"),
                json,
                "the record round-trips"
            );
        }
        // A manifest whose bytes are gone from the store is no longer owed.
        let gone = ShareRecord::Manifest {
            upstream: "h".into(),
            repo: "r".into(),
            digest: d.to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            tag: None,
            checked_at_ms: 0,
        };
        assert!(Share::from_record(gone, &store).is_none());
        let bad = ShareRecord::Blob {
            digest: "sha256:nothex".into(),
            size: 1,
            upstream: None,
            repo: None,
        };
        assert!(Share::from_record(bad, &store).is_none());
    }
}

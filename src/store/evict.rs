//! Eviction: keeps the store under its size cap (and the filesystem above its free-space floor)
//! by removing least recently used images, whole.
//!
//! The unit of eviction is a *root*: a manifest no other cached manifest references (with the
//! child manifests and blobs only it uses), or a blob no manifest references. A cached tag is
//! therefore always complete. Never evicted: pinned images (every platform), blobs being read,
//! and anything still referenced by a manifest that stays.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::store::{Store, StoreError};

/// What one collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EvictReport {
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
}

/// The store's metadata for one collection ([`Store::snapshot`]), as maps.
struct Graph {
    sizes: HashMap<String, u64>,
    children: HashMap<String, Vec<String>>,
    parents: HashMap<String, Vec<String>>,
    /// Digests that pins protect (with what they reference).
    pins: Vec<String>,
}

fn graph(store: &Store) -> Result<Graph, StoreError> {
    let snap = store.snapshot()?;
    let mut g = Graph {
        sizes: snap.blobs.into_iter().collect(),
        children: HashMap::new(),
        parents: HashMap::new(),
        pins: snap.pinned,
    };
    for (p, c) in snap.refs {
        g.children.entry(p.clone()).or_default().push(c.clone());
        g.parents.entry(c).or_default().push(p);
    }
    Ok(g)
}

impl Graph {
    /// `root` and everything below it (children first are not required; a set).
    fn closure(&self, root: &str) -> Vec<String> {
        let mut out = vec![root.to_owned()];
        let mut seen: HashSet<String> = out.iter().cloned().collect();
        let mut i = 0;
        while i < out.len() {
            if let Some(kids) = self.children.get(&out[i]) {
                for k in kids {
                    if seen.insert(k.clone()) {
                        out.push(k.clone());
                    }
                }
            }
            i += 1;
        }
        out
    }

    /// What evicting `root` removes: the root, then whatever below it is not `protected` and has
    /// no parent left (every parent doomed, already `gone`, or not recorded).
    fn doomed(
        &self,
        root: &str,
        protected: &HashSet<String>,
        gone: &HashSet<String>,
    ) -> BTreeSet<String> {
        let mut doomed: BTreeSet<String> = BTreeSet::new();
        for x in self.closure(root) {
            if protected.contains(&x) || gone.contains(&x) {
                continue;
            }
            let orphaned = x == root
                || self.parents.get(&x).is_none_or(|ps| {
                    ps.iter().all(|p| {
                        doomed.contains(p) || gone.contains(p) || !self.sizes.contains_key(p)
                    })
                });
            if orphaned {
                doomed.insert(x);
            }
        }
        doomed
    }
}

/// Evicts least recently used roots until the store holds at most `target` bytes.
pub fn evict_to(store: &Store, target: u64) -> Result<EvictReport, StoreError> {
    let mut report = EvictReport::default();
    if store.used_bytes() <= target {
        return Ok(report);
    }
    let _ = store.flush_access();
    let snap = graph(store)?;
    let access = store.access_times()?;
    let mut protected: HashSet<String> = store.held().into_iter().collect();
    for p in &snap.pins {
        protected.extend(snap.closure(p));
    }
    // Roots: recorded blobs that no recorded manifest references.
    let mut roots: Vec<(u64, String)> = snap
        .sizes
        .keys()
        .filter(|d| {
            snap.parents
                .get(*d)
                .is_none_or(|ps| ps.iter().all(|p| !snap.sizes.contains_key(p)))
        })
        .map(|d| {
            let last = snap
                .closure(d)
                .iter()
                .filter_map(|x| access.get(x))
                .max()
                .copied()
                .unwrap_or(0);
            (last, d.clone())
        })
        .collect();
    roots.sort();
    let mut gone: HashSet<String> = HashSet::new();
    for (_, root) in roots {
        if store.used_bytes() <= target {
            break;
        }
        if protected.contains(&root) || gone.contains(&root) {
            continue;
        }
        let doomed = snap.doomed(&root, &protected, &gone);
        let (r, removed) = remove(store, &doomed)?;
        report.manifests += r.manifests;
        report.blobs += r.blobs;
        report.bytes += r.bytes;
        // Only what was removed: a digest kept because a manifest recorded after the snapshot
        // references it still counts as a parent for the roots that follow.
        gone.extend(removed);
    }
    if report.bytes > 0 {
        tracing::info!(
            manifests = report.manifests,
            blobs = report.blobs,
            bytes = report.bytes,
            used = store.used_bytes(),
            "evicted least recently used content"
        );
    }
    Ok(report)
}

/// Removes `doomed` digests: records first (one transaction), then files. `doomed` comes from
/// the snapshot, so the store keeps any of it that a manifest recorded since references (a blob
/// committed after the snapshot is never doomed: it is not in the snapshot). Returns what was
/// removed.
fn remove(
    store: &Store,
    doomed: &BTreeSet<String>,
) -> Result<(EvictReport, BTreeSet<String>), StoreError> {
    let r = store.evict_blobs(doomed)?;
    let kept = doomed.len() - r.digests.len();
    if kept > 0 {
        tracing::debug!(
            kept,
            "kept content that a manifest recorded during the collection references"
        );
    }
    let report = EvictReport {
        manifests: r.manifests,
        blobs: r.blobs,
        bytes: r.bytes,
    };
    Ok((report, r.digests))
}

/// The size the store should be brought down to, if it is over a limit now.
pub fn target(
    store: &Store,
    max_size: Option<u64>,
    min_free: Option<u64>,
    low_water_percent: u8,
) -> Option<u64> {
    let used = store.used_bytes();
    let mut target: Option<u64> = None;
    if let Some(max) = max_size {
        if used > max {
            target = Some(max / 100 * u64::from(low_water_percent));
        }
    }
    if let Some(floor) = min_free {
        if let Some(free) = crate::store::free_bytes(store.root()) {
            if free < floor {
                // Free the deficit plus the same low-water slack.
                let slack = max_size.map_or(0, |m| m / 100 * u64::from(100 - low_water_percent));
                let t = used.saturating_sub(floor - free + slack);
                target = Some(target.map_or(t, |x| x.min(t)));
            }
        }
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::reference::Digest;
    use crate::store::tests::key;

    fn blob(store: &Store, repo: &str, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let mut t = store.temp_blob().expect("temp");
        t.write_all(data).expect("write");
        store
            .commit_blob(t, &d, data.len() as u64, &key(repo), None, None)
            .expect("commit");
        d
    }

    fn image(store: &Store, repo: &str, tag: &str, layers: &[&Digest]) -> Digest {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": layers[0].to_string(), "size": 1},
            "layers": layers[1..].iter().map(|l| serde_json::json!({"mediaType": "x", "digest": l.to_string(), "size": 1})).collect::<Vec<_>>(),
        });
        tagged(store, repo, tag, &body)
    }

    fn index(store: &Store, repo: &str, tag: &str, children: &[&Digest]) -> Digest {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "annotations": {"org.example.repo": repo},
            "manifests": children.iter().map(|c| serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": c.to_string(), "size": 1})).collect::<Vec<_>>(),
        });
        tagged(store, repo, tag, &body)
    }

    /// Stores the manifest `body` for `repo` and tags it `tag`.
    fn tagged(store: &Store, repo: &str, tag: &str, body: &serde_json::Value) -> Digest {
        let media_type = body["mediaType"].as_str().expect("mediaType").to_owned();
        let body = body.to_string();
        let d = Digest::sha256_of(body.as_bytes());
        let t: crate::oci::reference::Tag = tag.parse().expect("tag");
        store
            .put_manifest(
                &key(repo),
                &d,
                &media_type,
                body.as_bytes(),
                Some((&t, crate::oci::media::Accept::ALL)),
                None,
            )
            .expect("put manifest");
        d
    }

    #[test]
    fn evicts_least_recently_used_image_whole_and_keeps_shared_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let shared = blob(&store, "a", &[1u8; 1000]);
        let old_layer = blob(&store, "a", &[2u8; 5000]);
        let new_layer = blob(&store, "b", &[3u8; 5000]);
        let old = image(&store, "a", "v1", &[&shared, &old_layer]);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let new = image(&store, "b", "v1", &[&shared, &new_layer]);
        store.touch(&new);
        let before = store.used_bytes();
        let report = evict_to(&store, before - 1).expect("evict");
        assert_eq!(report.manifests, 1, "{report:?}");
        assert!(
            store.manifest_info(&old).expect("info").is_none(),
            "the old image goes"
        );
        assert!(
            store.blob_size(&old_layer).expect("size").is_none(),
            "with its own layer"
        );
        assert!(!store.blob_path(&old_layer).exists());
        assert!(
            store.blob_size(&shared).expect("size").is_some(),
            "a blob the new image uses stays"
        );
        assert!(store.manifest_info(&new).expect("info").is_some());
        assert!(
            store
                .tag(&key("a"), &"v1".parse().expect("tag"))
                .expect("tag")
                .is_none(),
            "its tag goes"
        );
        assert_eq!(store.used_bytes(), before - report.bytes);
    }

    /// The doomed set of `root` as [`evict_to`] computes it from a snapshot taken now.
    fn doomed_now(store: &Store, root: &Digest) -> BTreeSet<String> {
        let snap = graph(store).expect("snapshot");
        snap.doomed(&root.to_string(), &HashSet::new(), &HashSet::new())
    }

    #[test]
    fn a_manifest_recorded_after_the_snapshot_keeps_the_layer_it_shares() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let config = blob(&store, "a", &[1u8; 100]);
        let shared = blob(&store, "a", &[2u8; 5000]);
        let old = image(&store, "a", "v1", &[&config, &shared]);
        let old_size = store.blob_size(&old).expect("size").expect("stored");
        let doomed = doomed_now(&store, &old);
        assert!(
            doomed.contains(&shared.to_string()),
            "premise: in the snapshot only the old image uses the layer: {doomed:?}"
        );

        // Between the snapshot and the removal, another image that uses the layer is recorded.
        let new_config = blob(&store, "b", &[3u8; 100]);
        let new = image(&store, "b", "v1", &[&new_config, &shared]);
        let (report, _) = remove(&store, &doomed).expect("remove");

        assert!(
            store.manifest_info(&old).expect("info").is_none(),
            "the old image goes"
        );
        assert!(
            store.blob_size(&config).expect("size").is_none(),
            "with its own config"
        );
        assert!(
            store.blob_size(&shared).expect("size").is_some() && store.blob_path(&shared).exists(),
            "the layer that the image recorded after the snapshot uses stays: {report:?}"
        );
        assert!(store.manifest_info(&new).expect("info").is_some());
        assert_eq!(
            report,
            EvictReport {
                manifests: 1,
                blobs: 2,
                bytes: old_size + 100,
            },
            "only what was removed is reported"
        );
    }

    #[test]
    fn a_child_manifest_an_index_recorded_after_the_snapshot_names_is_kept_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let config = blob(&store, "a", &[4u8; 100]);
        let layer = blob(&store, "a", &[5u8; 5000]);
        let child = image(&store, "a", "child", &[&config, &layer]);
        let old_index = index(&store, "a", "v1", &[&child]);
        let doomed = doomed_now(&store, &old_index);
        assert_eq!(
            doomed.len(),
            4,
            "premise: the whole old index is doomed: {doomed:?}"
        );

        let new_index = index(&store, "b", "v1", &[&child]);
        remove(&store, &doomed).expect("remove");

        assert!(store.manifest_info(&old_index).expect("info").is_none());
        for (d, what) in [
            (&child, "child manifest"),
            (&config, "config"),
            (&layer, "layer"),
        ] {
            assert!(
                store.blob_size(d).expect("size").is_some(),
                "the {what} of the index recorded after the snapshot stays"
            );
        }
        assert!(store.manifest_info(&new_index).expect("info").is_some());
    }

    #[test]
    fn pinned_and_held_content_is_never_evicted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(Store::open(dir.path()).expect("open"));
        let l1 = blob(&store, "a", &[1u8; 3000]);
        let l2 = blob(&store, "b", &[2u8; 3000]);
        let loose = blob(&store, "c", &[3u8; 3000]);
        let l3 = blob(&store, "a", &[4u8; 3000]);
        let pinned = image(&store, "a", "v1", &[&l1]);
        // What `a:v1` gives clients accepting only Docker schema 2.
        let narrow = image(&store, "a", "v1-build", &[&l3]);
        let s2 = crate::oci::media::Accept::parse([crate::oci::media::DOCKER_MANIFEST.as_bytes()]);
        let v1: crate::oci::reference::Tag = "v1".parse().expect("tag");
        store
            .set_tag_for(&key("a"), &v1, s2, &narrow, 1)
            .expect("narrow record");
        // A pinned tag cached only for clients accepting only Docker schema 2.
        let l4 = blob(&store, "a", &[5u8; 3000]);
        let narrow_only = image(&store, "a", "v2-build", &[&l4]);
        let v2: crate::oci::reference::Tag = "v2".parse().expect("tag");
        store
            .set_tag_for(&key("a"), &v2, s2, &narrow_only, 1)
            .expect("narrow record");
        store.pin(&key("a"), "v2").expect("pin");
        let _other = image(&store, "b", "v1", &[&l2]);
        store.pin(&key("a"), "v1").expect("pin");
        let _hold = store.hold(&loose);
        let report = evict_to(&store, 0).expect("evict");
        assert!(store.manifest_info(&pinned).expect("info").is_some());
        assert!(store.blob_size(&l1).expect("size").is_some());
        assert!(
            store.manifest_info(&narrow).expect("info").is_some(),
            "the pinned tag's manifest for a narrower Accept stays"
        );
        assert!(store.blob_size(&l3).expect("size").is_some());
        assert!(
            store.manifest_info(&narrow_only).expect("info").is_some(),
            "a pinned tag cached only for a narrower Accept stays"
        );
        assert!(
            store.blob_size(&loose).expect("size").is_some(),
            "held blob stays"
        );
        assert!(
            store.blob_size(&l2).expect("size").is_none(),
            "unpinned image goes: {report:?}"
        );
        assert_eq!(store.pins().expect("pins").len(), 2);
        assert!(store.unpin(&key("a"), "v1").expect("unpin"));
    }
}

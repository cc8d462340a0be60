//! Consistency: checks the database against the disk both ways (and re-hashes blobs), repairs what
//! it finds, and restores the store's invariants at start after a crash.
//!
//! The invariants (see `docs/ARCHITECTURE.md`): every recorded blob exists with its size and
//! digest; every manifest record has its blob; every tag points to a stored manifest; nothing
//! temporary is visible.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::Path;

use crate::oci::reference::Digest;
use crate::store::{Records, Store, StoreError};

/// One inconsistency.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// `missing`, `size`, `digest`, `orphan`, `manifest-without-blob`, `dangling-tag`, `stray`.
    pub kind: &'static str,
    pub what: String,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\t{}\t{}", self.kind, self.what, self.detail)
    }
}

/// What a check does.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Re-hash recorded blobs (otherwise only their presence and size are checked).
    pub hash: bool,
    /// Check only this many recorded blobs, chosen at random.
    pub sample: Option<usize>,
    /// Fix what is found: drop records without content, remove corrupt files, re-record intact
    /// orphans, drop dangling tags.
    pub repair: bool,
}

/// Progress of a check, for a progress bar.
pub trait Progress {
    fn start(&mut self, total_bytes: u64);
    fn advance(&mut self, bytes: u64);
}

impl Progress for () {
    fn start(&mut self, _: u64) {}
    fn advance(&mut self, _: u64) {}
}

/// The outcome of a check.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub blobs_checked: u64,
    pub bytes_hashed: u64,
    pub problems: Vec<Problem>,
    pub repaired: u64,
}

fn hash_file(path: &Path, d: &Digest, progress: &mut dyn Progress) -> std::io::Result<Digest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = d.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        progress.advance(n as u64);
    }
    Ok(h.finish())
}

/// Removes the records of `digests` (and tags that point at them), then their files.
fn forget(store: &Store, digests: &[String]) -> Result<(), StoreError> {
    let doomed: std::collections::BTreeSet<String> = digests.iter().cloned().collect();
    store.drop_blobs(&doomed).map(|_| ())
}

/// Checks the store. With `online` (a server is using it), files in `tmp/` are fills in progress,
/// not problems.
pub fn check(
    store: &Store,
    opts: Options,
    online: bool,
    progress: &mut dyn Progress,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let Records {
        blobs: records,
        manifests,
        tags,
    } = store.records()?;
    let recorded: HashMap<String, u64> = records.iter().cloned().collect();

    // Database → disk.
    let chosen: Vec<&(String, u64)> = match opts.sample {
        Some(n) if n < records.len() => {
            let seed = crate::store::now_millis() as usize;
            let step = records.len() / n.max(1);
            (0..n)
                .map(|i| &records[(seed + i * step.max(1)) % records.len()])
                .collect()
        }
        _ => records.iter().collect(),
    };
    progress.start(if opts.hash {
        chosen.iter().map(|(_, s)| *s).sum()
    } else {
        0
    });
    let mut bad: Vec<String> = Vec::new();
    for (d, size) in chosen {
        report.blobs_checked += 1;
        let Ok(digest) = d.parse::<Digest>() else {
            report.problems.push(Problem {
                kind: "digest",
                what: d.clone(),
                detail: "record with a malformed digest".into(),
            });
            bad.push(d.clone());
            continue;
        };
        let path = store.blob_path(&digest);
        match std::fs::metadata(&path) {
            Err(_) => {
                report.problems.push(Problem {
                    kind: "missing",
                    what: d.clone(),
                    detail: format!("recorded but {} is absent", path.display()),
                });
                bad.push(d.clone());
            }
            Ok(m) if m.len() != *size => {
                report.problems.push(Problem {
                    kind: "size",
                    what: d.clone(),
                    detail: format!("recorded {size} bytes, file has {}", m.len()),
                });
                bad.push(d.clone());
            }
            Ok(_) if opts.hash => match hash_file(&path, &digest, progress) {
                Ok(actual) if actual == digest => report.bytes_hashed += size,
                Ok(actual) => {
                    report.problems.push(Problem {
                        kind: "digest",
                        what: d.clone(),
                        detail: format!("content hashes to {actual}"),
                    });
                    bad.push(d.clone());
                }
                Err(e) => {
                    report.problems.push(Problem {
                        kind: "missing",
                        what: d.clone(),
                        detail: format!("cannot read {}: {e}", path.display()),
                    });
                    bad.push(d.clone());
                }
            },
            Ok(_) => {}
        }
    }
    for m in &manifests {
        if !recorded.contains_key(m) {
            report.problems.push(Problem {
                kind: "manifest-without-blob",
                what: m.clone(),
                detail: "manifest record without its blob record".into(),
            });
            bad.push(m.clone());
        }
    }
    let manifest_set: HashSet<&String> = manifests.iter().collect();
    let bad_set: HashSet<&String> = bad.iter().collect();
    let mut dangling_tags = Vec::new();
    for (k, d) in &tags {
        if !manifest_set.contains(d) || bad_set.contains(d) {
            let shown = k.replace('\0', " ");
            report.problems.push(Problem {
                kind: "dangling-tag",
                what: shown,
                detail: format!("points to {d}, which is not stored"),
            });
            dangling_tags.push(k.clone());
        }
    }

    // Disk → database.
    let mut orphans: Vec<(std::path::PathBuf, Option<Digest>)> = Vec::new();
    for file in store.blob_files() {
        if recorded.contains_key(&file.name) {
            continue;
        }
        let digest = file
            .name
            .parse::<Digest>()
            .ok()
            .filter(|d| store.blob_path(d) == file.path);
        report.problems.push(Problem {
            kind: "orphan",
            what: file.path.display().to_string(),
            detail: "file without a record".into(),
        });
        orphans.push((file.path, digest));
    }
    if !online {
        for path in store.temp_files() {
            report.problems.push(Problem {
                kind: "stray",
                what: path.display().to_string(),
                detail: "temporary file of an unfinished fill".into(),
            });
            if opts.repair {
                let _ = std::fs::remove_file(&path);
                report.repaired += 1;
            }
        }
    }

    if opts.repair {
        bad.sort();
        bad.dedup();
        report.repaired += bad.len() as u64;
        forget(store, &bad)?;
        store.remove_tags(&dangling_tags)?;
        report.repaired += dangling_tags.len() as u64;
        for (path, digest) in orphans {
            report.repaired += 1;
            // An intact orphan (renamed into place, then a crash before its record) is kept:
            // recorded without links, it is served once an upstream confirms a repository has it.
            let intact = digest
                .as_ref()
                .and_then(|d| match hash_file(&path, d, &mut ()) {
                    Ok(actual) if actual == *d => {
                        std::fs::metadata(&path).ok().map(|m| (d.clone(), m.len()))
                    }
                    _ => None,
                });
            match intact {
                Some((d, size)) => store.record_orphan(&d, size)?,
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    Ok(report)
}

/// Restores the invariants after a crash: records without files are dropped, orphans are
/// re-recorded or removed, dangling tags dropped. Checks sizes, not hashes (a blob is only ever
/// renamed into place after its hash matched).
pub fn recover(store: &Store) -> Result<Report, StoreError> {
    let report = check(
        store,
        Options {
            hash: false,
            sample: None,
            repair: true,
        },
        true,
        &mut (),
    )?;
    if report.problems.is_empty() {
        tracing::debug!("store consistent");
    } else {
        for p in &report.problems {
            tracing::warn!(kind = p.kind, what = %p.what, detail = %p.detail, "recovery");
        }
        tracing::info!(
            problems = report.problems.len(),
            repaired = report.repaired,
            "store recovered"
        );
    }
    Ok(report)
}

//! Image content for the tests: deterministic layer bytes, and comparing `dir:` copies (what
//! `skopeo copy … dir:DEST` writes) byte for byte.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;

/// `len` deterministic pseudo-random (incompressible) bytes (xorshift64), different for each `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    Bytes::from(v)
}

/// Every file of a `dir:` copy, by name.
pub fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("dir entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read copied file"),
            )
        })
        .collect()
}

/// The `dir:` copy `got` (through regcache) has the same files as `want`, each with the same bytes.
pub fn assert_same_copy(want: &Path, got: &Path, what: &str) {
    let (w, g) = (dir_files(want), dir_files(got));
    assert_eq!(
        w.keys().collect::<Vec<_>>(),
        g.keys().collect::<Vec<_>>(),
        "{what}: the copy through regcache has different files"
    );
    for (name, bytes) in &w {
        assert!(
            g[name] == *bytes,
            "{what}: file {name} differs ({} vs {} bytes)",
            bytes.len(),
            g[name].len()
        );
    }
}

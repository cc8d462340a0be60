//! The layering of `src/` holds: reads every source file and fails when a module imports one of a
//! higher layer (docs/ARCHITECTURE.md, "Module map").
//!
//! Layers, top to bottom: `cmd` → `http` → `app` → `cache` → the tiers (`store`, `bucket`,
//! `upstream`, `peers`) → the base (`config`, `oci`, `runtime`, `telemetry`). A module may use its own layer
//! folder and the layers below it; a tier uses no other tier; nothing but `main.rs` uses `cmd`.
//! `fuzzing.rs` (the property and fuzz entry points, built only for tests and `cargo fuzz`) may use
//! anything, like a test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Layer rank of each top-level module: lower is higher up.
const LAYERS: &[(&str, u8)] = &[
    ("cmd", 0),
    ("http", 1),
    ("app", 2),
    ("cache", 3),
    ("store", 4),
    ("bucket", 4),
    ("upstream", 4),
    ("peers", 4),
    ("config", 5),
    ("oci", 5),
    ("runtime", 5),
    ("telemetry", 5),
];

fn rank(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// The top-level module a source file belongs to (`src/cache/fill.rs` → `cache`,
/// `src/bucket.rs` → `bucket`).
fn owner(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src/");
    let first = rel
        .components()
        .next()
        .expect("a path component")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.trim_end_matches(".rs").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file names with `crate::<module>`, outside comments, with the first
/// line each appears on.
fn imports(text: &str) -> BTreeMap<String, usize> {
    let mut found = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}` groups: every name in the braces.
            if let Some(group) = after.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for part in inner.split(',') {
                    let n: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !n.is_empty() {
                        found.entry(n).or_insert(i + 1);
                    }
                }
            } else if !name.is_empty() {
                found.entry(name).or_insert(i + 1);
            }
            rest = after;
        }
    }
    found
}

#[test]
fn no_module_imports_a_higher_layer_and_no_tier_imports_another() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    for file in &files {
        let from = owner(&src, file);
        if matches!(from.as_str(), "main" | "lib" | "fuzzing") {
            continue;
        }
        let Some(from_rank) = rank(&from) else {
            violations.push(format!(
                "{}: module `{from}` is in no layer (add it to LAYERS and to docs/ARCHITECTURE.md)",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for (to, line) in imports(&text) {
            if to == from {
                continue;
            }
            let Some(to_rank) = rank(&to) else {
                violations.push(format!(
                    "{}:{line}: uses `crate::{to}`, which is in no layer",
                    file.display()
                ));
                continue;
            };
            let why = if to == "cmd" {
                Some("nothing but main.rs uses cmd")
            } else if to_rank < from_rank {
                Some("a higher layer")
            } else if to_rank == from_rank && from_rank == 4 {
                Some("another tier")
            } else {
                None
            };
            if let Some(why) = why {
                violations.push(format!(
                    "{}:{line}: `{from}` uses `crate::{to}` ({why})",
                    file.display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "the layering of src/ is broken:\n{}",
        violations.join("\n")
    );
}

#[test]
fn no_source_file_is_much_over_800_lines_and_each_says_what_it_owns() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read source");
        // Unit tests at the end of a file do not count against its size.
        let code = text
            .split("\n#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or(&text);
        let lines = code.lines().count();
        if lines > 900 {
            problems.push(format!("{}: {lines} lines of code", file.display()));
        }
        if !text.starts_with("//!") {
            problems.push(format!(
                "{}: does not open with a `//!` line saying what it owns",
                file.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

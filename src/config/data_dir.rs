//! `data_dir`: its default (systemd's `$STATE_DIRECTORY`, else `/var/lib/regcache`) and the checks
//! on its path. Whether an existing directory is regcache's is decided by the store when it opens
//! it (`store::MARKER`), which also refuses a path that leads to a system directory.

use std::path::{Component, Path, PathBuf};

/// Data directory when none is configured (systemd's `StateDirectory` wins when set).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/regcache";

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

/// The data directory when neither the file nor `--data-dir` names one.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("STATE_DIRECTORY") {
        // systemd may pass several, colon-separated; the first is ours.
        Some(v) if !v.is_empty() => {
            let s = v.to_string_lossy();
            PathBuf::from(s.split(':').next().unwrap_or(DEFAULT_DATA_DIR))
        }
        _ => PathBuf::from(DEFAULT_DATA_DIR),
    }
}

/// A data directory must be an absolute path without `..` that is not `/` or another system
/// directory: regcache creates files there and deletes some (`tmp/`, evicted blobs).
pub fn check(dir: &Path) -> Result<(), String> {
    let shown = format!("{:?}", dir.display().to_string());
    if dir.as_os_str().is_empty() {
        return Err(format!(
            "data_dir = {shown} is empty: set an absolute path such as \"{DEFAULT_DATA_DIR}\", or \
             remove the key to use the default"
        ));
    }
    if !dir.is_absolute() {
        return Err(format!(
            "data_dir = {shown} is relative: set an absolute path such as \"{DEFAULT_DATA_DIR}\""
        ));
    }
    if dir.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "data_dir = {shown} contains \"..\": write the directory's path without it"
        ));
    }
    if is_system_directory(dir) {
        return Err(format!(
            "data_dir = {shown} is a system directory: regcache deletes files in its data \
             directory, so give it a directory of its own, such as \"{DEFAULT_DATA_DIR}\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;
    use crate::config::{Config, Overrides};
    use std::path::PathBuf;

    #[test]
    fn data_dir_must_be_absolute_and_not_a_system_directory() {
        for bad in [
            "",
            ".",
            "data",
            "./data",
            "var/lib/regcache",
            "/",
            "//",
            "/etc",
            "/etc/",
            "/usr",
            "/usr/./",
            "/tmp",
            "/var",
            "/var/lib",
            "/var/tmp",
            "/home",
            "/root",
            "/bin",
            "/usr/local",
            "/var/lib/../../etc",
            "/srv/../tmp",
        ] {
            let e = parse(&format!("data_dir = {bad:?}\n")).expect_err(bad);
            assert!(
                e.contains("data_dir") && e.contains(&format!("{bad:?}")),
                "data_dir = {bad:?}: {e}"
            );
            // The flag gets the same checks as the file.
            let o = Overrides {
                data_dir: Some(PathBuf::from(bad)),
                ..Default::default()
            };
            let e = Config::parse("", "t", &o).expect_err(bad).to_string();
            assert!(e.contains("data_dir"), "--data-dir {bad:?}: {e}");
        }
        for good in [
            "/var/lib/regcache",
            "/srv/regcache/",
            "/data",
            "/tmp/regcache",
        ] {
            let c = parse(&format!("data_dir = {good:?}\n")).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.data_dir, PathBuf::from(good));
        }
    }
}

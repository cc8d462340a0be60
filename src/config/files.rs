//! The files and environment variables a configuration names, read once all its values are valid:
//! the only place the config step reads anything but the config file itself (and, in
//! [`source`](super::source), the config store and its last good copy).
//!
//! What is read, all of it at every validation (`check-config`, `serve` at start, every reload):
//! - `upstreams.NAME.password_file` (the password) and `password_env` (the variable);
//! - `upstreams.NAME.ca_file`, checked to hold PEM certificates (the upstream's client reads it
//!   again when it is built);
//! - `[access] htpasswd` (the users and their bcrypt hashes);
//! - `[store.s3] secret_access_key_env` (the variable);
//! - `[tls] cert` and `key`, loaded as a pair and checked for their dates (the listener loads
//!   them again);
//! - `[peers] token_file` or `token_env` (the fleet's shared token);
//!
//! and the mode of each file that holds a secret, for a warning when others can read it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::access::Htpasswd;
use crate::config::peers;
use crate::config::tls;
use crate::config::upstreams::Credentials;
use crate::config::Config;

/// One thing a configuration names outside its text, to read once its values are valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// `upstreams.NAME.password_file`: the password of `username`.
    PasswordFile {
        upstream: String,
        username: String,
        path: PathBuf,
    },
    /// `upstreams.NAME.password_env`: the password of `username`.
    PasswordEnv {
        upstream: String,
        username: String,
        var: String,
    },
    /// `upstreams.NAME.ca_file`.
    CaFile { upstream: String, path: PathBuf },
    /// `[access] htpasswd`.
    Htpasswd { path: PathBuf },
    /// `[store.s3] secret_access_key_env`.
    S3SecretEnv { var: String },
    /// `[tls] cert` and `key`.
    TlsPair { cert: PathBuf, key: PathBuf },
    /// `[peers] token_file`.
    PeerTokenFile { path: PathBuf },
    /// `[peers] token_env`.
    PeerTokenEnv { var: String },
}

/// Reads each of `reads` into `config`, in order; the first failure is the error, worded as a
/// configuration error naming the key.
pub fn read_all(config: &mut Config, reads: Vec<Read>) -> Result<(), String> {
    for r in reads {
        read(config, r)?;
    }
    Ok(())
}

fn read(config: &mut Config, r: Read) -> Result<(), String> {
    match r {
        Read::PasswordFile {
            upstream,
            username,
            path,
        } => {
            let password = std::fs::read_to_string(&path)
                .map_err(|e| {
                    format!(
                        "upstreams.{upstream}.password_file: cannot read {}: {e}",
                        path.display()
                    )
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if let Some(w) = readable_by_others(&path, 0o044, "holds an upstream password") {
                config
                    .warnings
                    .push(format!("upstreams.{upstream}.password_file: {w}"));
            }
            set_credentials(config, &upstream, username, password);
        }
        Read::PasswordEnv {
            upstream,
            username,
            var,
        } => {
            let password = secret_from_env(&format!("upstreams.{upstream}.password_env"), &var)?;
            set_credentials(config, &upstream, username, password);
        }
        Read::CaFile { upstream, path } => {
            let pem = std::fs::read(&path).map_err(|e| {
                format!(
                    "upstreams.{upstream}.ca_file: cannot read {}: {e}",
                    path.display()
                )
            })?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(c) if !c.is_empty() => {}
                Ok(_) => {
                    return Err(format!(
                        "upstreams.{upstream}.ca_file: no certificate in {}",
                        path.display()
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "upstreams.{upstream}.ca_file: invalid PEM in {}: {e}",
                        path.display()
                    ))
                }
            }
        }
        Read::Htpasswd { path } => {
            let h = Htpasswd::load(&path).map_err(|e| format!("access.htpasswd: {e}"))?;
            if h.is_empty() {
                return Err(format!(
                    "access.htpasswd: {} has no users, which would refuse every client",
                    path.display()
                ));
            }
            if let Some(w) = readable_by_others(&path, 0o004, "holds password hashes") {
                config.warnings.push(w);
            }
            config.access.htpasswd = Some(Arc::new(h));
        }
        Read::S3SecretEnv { var } => {
            let secret = secret_from_env("store.s3.secret_access_key_env", &var)?;
            if let Some(s3) = &mut config.store.s3 {
                s3.secret_access_key = Some(secret);
            }
        }
        Read::TlsPair { cert, key } => {
            // Loaded now, so that a bad file, or a certificate that clients would refuse
            // (expired, not yet valid), is a configuration error (exit 2, a reload refused).
            let now = tls::unix_now();
            let (_, validity) =
                tls::load_pair(&cert, &key, now).map_err(|e| format!("[tls]: {e:#}"))?;
            if let Some(t) = &config.tls {
                config.warnings.extend(tls::expiry_warning(
                    &cert,
                    validity.not_after,
                    now,
                    t.expiry_warning,
                ));
            }
        }
        Read::PeerTokenFile { path } => {
            let token = std::fs::read_to_string(&path)
                .map_err(|e| format!("peers.token_file: cannot read {}: {e}", path.display()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if let Some(w) = readable_by_others(&path, 0o044, "holds the peer token") {
                config.warnings.push(format!("peers.token_file: {w}"));
            }
            let token =
                peers::check_token(&format!("peers.token_file: {}", path.display()), token)?;
            if let Some(p) = &mut config.peers {
                p.token = token;
            }
        }
        Read::PeerTokenEnv { var } => {
            let token = secret_from_env("peers.token_env", &var)?;
            let token = peers::check_token("peers.token_env", token)?;
            if let Some(p) = &mut config.peers {
                p.token = token;
            }
        }
    }
    Ok(())
}

fn set_credentials(config: &mut Config, upstream: &str, username: String, password: String) {
    if let Some(u) = config.upstreams.iter_mut().find(|u| u.name == upstream) {
        u.credentials = Some(Credentials { username, password });
    }
}

/// The value of the environment variable `var` (`what` names the key in errors).
fn secret_from_env(what: &str, var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => Ok(p),
        Ok(_) => Err(format!("{what}: the environment variable {var} is empty")),
        Err(_) => Err(format!(
            "{what}: the environment variable {var} is not set (or not UTF-8)"
        )),
    }
}

/// Whether `var` can name an environment variable (checked with the other values, before any
/// is read).
pub fn check_env_name(what: &str, var: &str) -> Result<(), String> {
    if var.is_empty() || !var.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_') {
        return Err(format!(
            "{what}: {var:?} is not an environment variable name"
        ));
    }
    Ok(())
}

/// A warning when `path` has any of the permission bits in `bits` (0o044: group or others can
/// read it; 0o004: others can).
pub fn readable_by_others(path: &Path, bits: u32, what: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mode = std::fs::metadata(path).ok()?.mode() & 0o777;
    (mode & bits != 0).then(|| {
        let who = if bits & 0o040 != 0 { "its group or other users" } else { "other users" };
        format!(
            "{} {what} and {who} can read it (mode {mode:04o}); restrict it, for example with chmod 600",
            path.display()
        )
    })
}

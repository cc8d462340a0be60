//! The listener's certificate in force (`[tls]`): loaded at start, swapped on reload (SIGHUP or
//! a config store change) without dropping connections, its end of validity watched; the
//! http layer's acceptor resolves each handshake's certificate here (`http::tls`).
//!
//! Reading the files (PEM, the key matching the certificate, the validity dates, refused outside
//! them, at start and on reload) is `config::tls`'s, the same code that validates `[tls]`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::tls::{format_utc, load_pair, unix_now};

/// The certificate in force, swapped on reload.
#[derive(Debug)]
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// `notAfter` of the certificate in force (Unix seconds).
    not_after: AtomicI64,
}

impl CertReloader {
    /// Loads the pair, refusing a certificate that is expired or not yet valid.
    pub fn new(cert: &Path, key: &Path) -> anyhow::Result<CertReloader> {
        let (ck, v) = load_pair(cert, key, unix_now())?;
        Ok(CertReloader {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(ck)),
            not_after: AtomicI64::new(v.not_after),
        })
    }

    /// Re-reads the files; on error (an expired certificate included) the certificate in force
    /// stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (ck, v) = load_pair(&self.cert, &self.key, unix_now())?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        self.not_after.store(v.not_after, Ordering::Relaxed);
        tracing::info!(cert = %self.cert.display(), not_after = %format_utc(v.not_after), "TLS certificate reloaded");
        Ok(())
    }

    /// `notAfter` of the certificate in force, in seconds since the Unix epoch.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    pub fn paths(&self) -> (&Path, &Path) {
        (&self.cert, &self.key)
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

//! TLS for the listener: the rustls acceptor, whose certificate is the one in force in
//! [`CertReloader`] (`app::tls`): new handshakes use a reloaded certificate at once, open
//! connections keep theirs.

use std::sync::Arc;

use crate::app::tls::CertReloader;

/// An acceptor whose certificate follows `reloader`.
pub fn acceptor(reloader: Arc<CertReloader>) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(reloader);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

//! The HTTP side: the listener and its shards, blob bodies (zero-copy where it can), TLS, access
//! control and the registry API.

pub mod access;
pub mod api;
pub mod body;
pub mod sendfile;
pub mod server;
pub mod tls;

//! The HTTP side: the listener and its shards, blob bodies (zero-copy where it can), TLS, access
//! control, the registry API, and the server side of peer requests.

pub mod access;
pub mod api;
pub mod body;
pub mod peer;
pub mod sendfile;
pub mod server;
pub mod tls;

//! The HTTP side: the listener and its shards, zero-copy bodies, TLS, access control and the
//! registry API.

pub mod access;
pub mod api;
pub mod sendfile;
pub mod server;
pub mod tls;

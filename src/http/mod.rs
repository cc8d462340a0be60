//! The HTTP side: the listener and its shards, blob bodies (zero-copy where it can), TLS, access
//! control, the registry API, and the test hooks (`REGCACHE_TEST_HOOKS=1` only).

pub mod access;
pub mod api;
pub mod body;
pub mod hooks;
pub mod sendfile;
pub mod server;
pub mod tls;

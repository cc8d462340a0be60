//! regcache: a pull-through image cache and registry mirror that keeps serving what it has seen
//! when the upstream, the network or a config store is down.
//!
//! Request flow: [`server`] accepts connections → [`api`] parses and routes the request →
//! [`cache`] answers from the [`store`] or fetches once through [`upstream`].
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod api;
pub mod bucket;
pub mod cache;
pub mod cli;
pub mod config;
pub mod config_store;
pub mod dockerfile;
pub mod evict;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod logbuf;
pub mod media;
pub mod metrics;
pub mod prefetch;
pub mod reference;
pub mod sendfile;
pub mod server;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod verify;

//! regcache: a pull-through image cache and registry mirror that keeps serving what it has seen
//! when the upstream, the network or a config store is down.
//!
//! Layers, top to bottom (a layer uses only the layers below it; `docs/ARCHITECTURE.md` has the
//! map): [`cmd`] (the command line) → [`http`] (the server and the API) → [`app`] (the running
//! service's state) → [`cache`] (the pull-through policy) → the tiers [`store`], [`bucket`],
//! [`upstream`] and [`peers`] → [`config`], [`oci`], [`runtime`] and [`telemetry`].
#![forbid(unsafe_code)]

pub mod app;
pub mod bucket;
pub mod cache;
pub mod cmd;
pub mod config;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod http;
pub mod oci;
pub mod peers;
pub mod runtime;
pub mod store;
pub mod telemetry;
pub mod upstream;

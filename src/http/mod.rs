//! The HTTP side: the listener and its shards (`server`), zero-copy bodies (`sendfile`), TLS,
//! access control (`access`: the policy, `auth`: credentials), and the registry API: the router
//! (path, query, name → upstream), OCI errors, one handler per endpoint family, and each request's
//! span and access line (`trace`).
//!
//! A request goes `server` → [`handle`] (access checks, dispatch) → `router` → the endpoint's
//! handler (`manifests`, `blobs`, `tags`, `referrers`, `catalog`, `ops`, `status` and its HTML
//! `page`, `admin`) → the cache.
//!
//! The test hooks (`hooks`) exist only with `REGCACHE_TEST_HOOKS=1` at start.
//!
//! The server side of peer requests (`[peers]`) is `peer`.

pub mod access;
pub mod admin;
pub mod auth;
pub mod blobs;
pub mod body;
pub mod catalog;
pub mod error;
pub mod handle;
pub mod hooks;
pub mod manifests;
pub mod ops;
pub mod page;
pub mod paging;
pub mod peer;
pub mod referrers;
pub mod response;
pub mod router;
pub mod sendfile;
pub mod server;
pub mod status;
pub mod tags;
pub mod tls;
pub mod trace;

pub use admin::OPERATOR_HEADER;
pub use handle::{handle, CACHE_HEADER, NAMESPACE_HEADER};
pub use trace::REQUEST_ID_HEADER;

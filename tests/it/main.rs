//! regcache's integration tests: one test binary, real upstream (docker-registry) and real clients.
// A test may unwrap, expect and panic: that is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod accept;
mod bucket;
mod clients;
mod config_store;
mod durability;
mod fleet;
mod offline;
mod ops;
mod outage;
mod prefetch;
mod pull;
mod quota;
mod ranges;
mod status;
mod support;

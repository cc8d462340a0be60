//! regcache's integration tests: one test binary, real upstream (docker-registry) and real clients.

mod accept;
mod bucket;
mod clients;
mod config_store;
mod durability;
mod offline;
mod ops;
mod outage;
mod prefetch;
mod pull;
mod support;

//! The tests that need nothing installed and no root: only the regcache binary (or regcache
//! in-process), the in-process fake upstream of `support::fake`, loopback sockets and files of
//! this repository. `cargo test --test it offline::` runs them all (the fast inner loop of
//! docs/TESTING.md). A module here is named after the module of the tests that need the real
//! parts (docker-registry, skopeo, etcd, moto, nginx, dockerd, root for tmpfs mounts), whose
//! helpers it may borrow.

mod accept;
mod architecture;
mod config_store;
mod durability;
mod faults;
mod fleet;
pub(crate) mod ops;
mod outage;
mod prefetch;
mod pull;
mod quota;
mod revalidate;
mod security;
mod status;

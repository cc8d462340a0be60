//! Shared test support: real upstream registry, fixtures, fake upstream, regcache harness.
#![allow(dead_code)]

pub mod certs;
pub mod clients;
pub mod consul;
pub mod daemon;
pub mod etcd;
pub mod fake;
pub mod fleet;
pub mod garage;
pub mod images;
pub mod media;
pub mod moto;
pub mod net;
pub mod nginx;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod regcache;
pub mod registry;
pub mod reply;
pub mod s3;

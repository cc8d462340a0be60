//! regcache's integration tests: one test binary, real upstream (docker-registry) and real clients.

mod faults;
mod pull;
mod support;

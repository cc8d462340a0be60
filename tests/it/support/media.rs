//! Manifest media types for the tests: regcache's own list (`regcache::oci::media`), so that the
//! code and the tests name the same four types, and the `Accept` value that names them all.

use std::sync::OnceLock;

pub use regcache::oci::media::{
    DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, OCI_INDEX, OCI_MANIFEST,
};

/// The `Accept` value naming the four manifest types, as docker, containerd, podman, skopeo and
/// `regcache prefetch` send: the value regcache itself asks upstreams with for such a client.
pub fn accept_all() -> &'static str {
    static ALL: OnceLock<String> = OnceLock::new();
    ALL.get_or_init(|| {
        regcache::oci::media::Accept::ALL
            .header_value()
            .expect("Accept::ALL names four types")
    })
}

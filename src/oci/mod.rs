//! The OCI vocabulary: repository names, tags, digests and references, manifest media types, and
//! what regcache reads out of a manifest body.

pub mod manifest;
pub mod media;
pub mod reference;

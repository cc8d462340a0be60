//! The OCI vocabulary: repository names, tags, digests and references, and manifest media types.

pub mod media;
pub mod reference;

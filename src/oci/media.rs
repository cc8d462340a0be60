//! Manifest media types and the negotiation of a client's `Accept` for manifests.
//!
//! The one definition of the four manifest types regcache deals in, the set of them a client
//! accepts ([`Accept`]), and what a registry answers a client that does not accept the type it
//! stores ([`negotiate`]): the rules of distribution 2.8 (`registry/handlers/manifests.go`,
//! `GetManifest`), which regcache applies when it answers without its upstream.

use std::fmt;

use base64::Engine as _;

use crate::oci::reference::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// A signed Docker schema 1 manifest: what distribution converts a schema 2 manifest to, by tag,
/// for a client that does not accept schema 2. Its digest covers the body without signatures.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// One of the four manifest types a client can name in `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    OciIndex,
    OciManifest,
    DockerList,
    DockerManifest,
}

impl Kind {
    /// In the order regcache names them in its `Accept` to upstreams.
    pub const ALL: [Kind; 4] = [
        Kind::OciIndex,
        Kind::OciManifest,
        Kind::DockerList,
        Kind::DockerManifest,
    ];

    pub fn media_type(self) -> &'static str {
        match self {
            Kind::OciIndex => OCI_INDEX,
            Kind::OciManifest => OCI_MANIFEST,
            Kind::DockerList => DOCKER_LIST,
            Kind::DockerManifest => DOCKER_MANIFEST,
        }
    }

    /// A short name, for logs and database keys.
    fn name(self) -> &'static str {
        match self {
            Kind::OciIndex => "oci-index",
            Kind::OciManifest => "oci-manifest",
            Kind::DockerList => "docker-list",
            Kind::DockerManifest => "docker-manifest",
        }
    }

    /// The kind a media type names, if any. Case matters, as it does to distribution 2.8 (which
    /// gives a client asking for `APPLICATION/…` what it gives one that names no type).
    pub fn of(media_type: &str) -> Option<Kind> {
        Kind::of_bytes(media_type.as_bytes())
    }

    fn of_bytes(media_type: &[u8]) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.media_type().as_bytes() == media_type)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The manifest types a client accepts: which of the four its `Accept` lines name, exactly.
/// Parameters (`q=` included) are ignored, and other types (`*/*`, schema 1) count for nothing, as
/// in distribution, so that a client gets through regcache what the upstream would give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Accept(u8);

impl Accept {
    /// All four: what docker, containerd, podman, skopeo and `regcache prefetch` send.
    pub const ALL: Accept = Accept(0b1111);

    /// The set named by the values of a request's `Accept` lines (one type per line, or several
    /// separated by commas).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Accept {
        let mut set = 0u8;
        for value in values {
            for item in value.split(|&b| b == b',') {
                let media_type = item.split(|&b| b == b';').next().unwrap_or(item);
                if let Some(k) = Kind::of_bytes(media_type.trim_ascii()) {
                    set |= k.bit();
                }
            }
            if set == Accept::ALL.0 {
                break;
            }
        }
        Accept(set)
    }

    pub fn contains(self, k: Kind) -> bool {
        self.0 & k.bit() != 0
    }

    pub fn is_all(self) -> bool {
        self == Accept::ALL
    }

    /// The `Accept` value that asks an upstream for this set (`None` for the empty set: no
    /// `Accept` at all, which distribution treats like `*/*`).
    pub fn header_value(self) -> Option<String> {
        let types: Vec<&str> = Kind::ALL
            .into_iter()
            .filter(|k| self.contains(*k))
            .map(Kind::media_type)
            .collect();
        (!types.is_empty()).then(|| types.join(", "))
    }
}

/// Short names joined by `+` (`docker-list+docker-manifest`), or `none`.
impl fmt::Display for Accept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for k in Kind::ALL.into_iter().filter(|k| self.contains(*k)) {
            if !first {
                f.write_str("+")?;
            }
            f.write_str(k.name())?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// What a registry answers a client for a stored manifest, by the client's [`Accept`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Negotiated {
    /// The stored manifest, as it is.
    AsIs,
    /// `404 MANIFEST_UNKNOWN` with this message.
    Refused(&'static str),
    /// The linux/amd64 child of a Docker manifest list, in its place.
    Child(Digest),
    /// A Docker schema 1 conversion, which takes the registry's signing key.
    Schema1,
}

/// Whether a manifest of `media_type` is served as it is, by tag (`by_tag`) or by digest, to a
/// client accepting `accept`: when the client accepts its type, when it is none of the four, and
/// by digest when it is a Docker type (distribution serves those by digest whatever the Accept).
pub fn serves_as_is(media_type: &str, accept: Accept, by_tag: bool) -> bool {
    match Kind::of(media_type) {
        None => true,
        Some(k) if accept.contains(k) => true,
        Some(Kind::DockerList | Kind::DockerManifest) => !by_tag,
        Some(Kind::OciIndex | Kind::OciManifest) => false,
    }
}

/// What distribution 2.8 answers a client accepting `accept` for a stored manifest: OCI types it
/// does not accept are refused; by tag, a Docker manifest list becomes its linux/amd64 child,
/// and a schema 2 manifest a schema 1 conversion.
pub fn negotiate(media_type: &str, bytes: &[u8], accept: Accept, by_tag: bool) -> Negotiated {
    if serves_as_is(media_type, accept, by_tag) {
        return Negotiated::AsIs;
    }
    match Kind::of(media_type) {
        Some(Kind::OciManifest) => Negotiated::Refused(
            "OCI manifest found, but accept header does not support OCI manifests",
        ),
        Some(Kind::OciIndex) => {
            Negotiated::Refused("OCI index found, but accept header does not support OCI indexes")
        }
        Some(Kind::DockerList) => match amd64_child(bytes) {
            Some(d) => Negotiated::Child(d),
            None => Negotiated::Refused("manifest unknown"),
        },
        Some(Kind::DockerManifest) => Negotiated::Schema1,
        None => Negotiated::AsIs,
    }
}

/// The first linux/amd64 entry of a manifest list, the platform distribution picks for clients
/// that do not accept lists.
fn amd64_child(bytes: &[u8]) -> Option<Digest> {
    #[derive(serde::Deserialize)]
    struct Platform {
        architecture: String,
        os: String,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        digest: String,
        platform: Option<Platform>,
    }
    #[derive(serde::Deserialize)]
    struct List {
        manifests: Vec<Entry>,
    }
    let list: List = serde_json::from_slice(bytes).ok()?;
    list.manifests
        .into_iter()
        .find(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.architecture == "amd64" && p.os == "linux")
        })?
        .digest
        .parse()
        .ok()
}

/// The bytes the digest of a signed schema 1 manifest covers: the body up to `formatLength`
/// followed by `formatTail`, both from the first signature's protected header (libtrust's
/// "pretty JWS"); `None` when the body is not such a manifest.
pub fn schema1_payload(bytes: &[u8]) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Signature {
        protected: String,
    }
    #[derive(serde::Deserialize)]
    struct Signed {
        signatures: Vec<Signature>,
    }
    #[derive(serde::Deserialize)]
    struct Protected {
        #[serde(rename = "formatLength")]
        format_length: usize,
        #[serde(rename = "formatTail")]
        format_tail: String,
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signed: Signed = serde_json::from_slice(bytes).ok()?;
    let protected = signed.signatures.first()?.protected.trim_end_matches('=');
    let protected: Protected = serde_json::from_slice(&b64.decode(protected).ok()?).ok()?;
    let tail = b64
        .decode(protected.format_tail.trim_end_matches('='))
        .ok()?;
    let mut payload = bytes.get(..protected.format_length)?.to_vec();
    payload.extend_from_slice(&tail);
    Some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&str]) -> Accept {
        Accept::parse(lines.iter().map(|l| l.as_bytes()))
    }

    #[test]
    fn accept_lines_parameters_and_case_are_read_as_distribution_reads_them() {
        assert_eq!(parse(&[]), Accept(0));
        assert_eq!(parse(&["*/*"]), Accept(0));
        assert_eq!(parse(&[DOCKER_SCHEMA1_SIGNED]), Accept(0));
        let all = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
        assert!(parse(&all).is_all());
        assert!(parse(&[&all.join(",")]).is_all());
        assert_eq!(parse(&[&DOCKER_MANIFEST.to_ascii_uppercase()]), Accept(0));
        let s2 = parse(&[" application/vnd.docker.distribution.manifest.v2+json ; q=0 "]);
        assert!(s2.contains(Kind::DockerManifest), "{s2}");
        assert!(!s2.contains(Kind::DockerList), "{s2}");
        assert_eq!(s2.to_string(), "docker-manifest");
        assert_eq!(
            parse(&[DOCKER_MANIFEST, &format!("{DOCKER_LIST};q=0.5, text/html")]).to_string(),
            "docker-list+docker-manifest"
        );
        assert_eq!(Accept(0).to_string(), "none");
        assert_eq!(Accept(0).header_value(), None);
        assert_eq!(
            Accept::ALL.header_value().as_deref(),
            Some(
                "application/vnd.oci.image.index.v1+json, \
                 application/vnd.oci.image.manifest.v1+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json, \
                 application/vnd.docker.distribution.manifest.v2+json"
            )
        );
        assert_eq!(
            parse(&[s2.header_value().as_deref().unwrap_or("")]),
            s2,
            "the upstream Accept of a set names that set"
        );
    }

    #[test]
    fn negotiation_follows_distribution() {
        let s2 = parse(&[DOCKER_MANIFEST]);
        let oci = parse(&[OCI_MANIFEST]);
        let none = Accept(0);
        let amd64 = Digest::sha256_of(b"amd64");
        let list = serde_json::json!({
            "mediaType": DOCKER_LIST,
            "manifests": [
                {"digest": Digest::sha256_of(b"arm").to_string(), "platform": {"architecture": "arm64", "os": "linux"}},
                {"digest": amd64.to_string(), "platform": {"architecture": "amd64", "os": "linux"}},
            ],
        })
        .to_string();
        let list = list.as_bytes();
        for by_tag in [true, false] {
            assert_eq!(
                negotiate(OCI_INDEX, b"{}", s2, by_tag),
                Negotiated::Refused(
                    "OCI index found, but accept header does not support OCI indexes"
                )
            );
            assert!(matches!(
                negotiate(OCI_MANIFEST, b"{}", none, by_tag),
                Negotiated::Refused(_)
            ));
            assert_eq!(
                negotiate(OCI_MANIFEST, b"{}", oci, by_tag),
                Negotiated::AsIs
            );
            assert_eq!(
                negotiate("application/vnd.example+json", b"{}", none, by_tag),
                Negotiated::AsIs
            );
        }
        assert_eq!(
            negotiate(DOCKER_LIST, list, s2, true),
            Negotiated::Child(amd64)
        );
        assert_eq!(negotiate(DOCKER_LIST, list, s2, false), Negotiated::AsIs);
        assert_eq!(
            negotiate(DOCKER_LIST, br#"{"manifests":[]}"#, s2, true),
            Negotiated::Refused("manifest unknown")
        );
        assert_eq!(
            negotiate(DOCKER_MANIFEST, b"{}", oci, true),
            Negotiated::Schema1
        );
        assert_eq!(
            negotiate(DOCKER_MANIFEST, b"{}", oci, false),
            Negotiated::AsIs
        );
    }

    #[test]
    fn a_schema1_digest_covers_the_body_without_signatures() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = "{\n   \"schemaVersion\": 1,\n   \"name\": \"x\"\n}";
        // libtrust cuts the payload before its closing "\n}" and keeps that as the tail.
        let cut = payload.len() - 2;
        let protected = b64.encode(format!(
            r#"{{"formatLength":{cut},"formatTail":"{}","time":"2024-01-01T00:00:00Z"}}"#,
            b64.encode(&payload[cut..])
        ));
        let signed = format!(
            "{},\n   \"signatures\": [{{\"protected\": \"{protected}\", \"signature\": \"x\"}}]\n}}",
            &payload[..cut]
        );
        assert_eq!(
            schema1_payload(signed.as_bytes()).as_deref(),
            Some(payload.as_bytes())
        );
        assert_eq!(schema1_payload(payload.as_bytes()), None);
    }
}

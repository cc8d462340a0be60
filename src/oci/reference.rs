//! Repository names, tags and digests: parsed at the edge with the OCI distribution grammar.
//!
//! Nothing below the API layer handles a raw string for these: a value of one of these types is
//! known to match the grammar, so it is safe to use in a file path or a database key.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// Longest repository name accepted (the spec asks clients to stay under 255 with the host).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted (the spec's grammar allows 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// Why a name, tag or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid repository name {0:?}")]
    Name(String),
    #[error("invalid tag {0:?}")]
    Tag(String),
    #[error("invalid digest {0:?}")]
    Digest(String),
    #[error("unsupported digest algorithm {0:?} (sha256 and sha512 are supported)")]
    Algorithm(String),
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum_lower(b[i]) {
            return false;
        }
    }
    true
}

/// A repository name such as `library/alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Docker Hub's rule: a single-component name lives under `library/`.
    pub fn docker_hub_normalised(self) -> RepoName {
        if self.0.contains('/') {
            self
        } else {
            RepoName(format!("library/{}", self.0))
        }
    }
}

impl FromStr for RepoName {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(ParseError::Name(truncate(s)));
        }
        Ok(RepoName(s.to_owned()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(ParseError::Tag(truncate(s)))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The digest algorithms regcache can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A content digest such as `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: format!("{:x}", sha2::Sha256::digest(data)),
        }
    }

    /// A hasher for this digest's algorithm.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }

    /// The digest of `data` with this digest's algorithm, compared with this one.
    pub fn matches(&self, data: &[u8]) -> bool {
        let mut h = self.hasher();
        h.update(data);
        h.finish() == *self
    }
}

impl FromStr for Digest {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| ParseError::Digest(truncate(s)))?;
        let valid_alg = !alg.is_empty()
            && alg.split(['+', '.', '_', '-']).all(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            });
        let valid_hex = !hex.is_empty()
            && hex
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'=' || c == b'_' || c == b'-');
        if !valid_alg || !valid_hex {
            return Err(ParseError::Digest(truncate(s)));
        }
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(ParseError::Algorithm(truncate(alg))),
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return Err(ParseError::Digest(truncate(s)));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// Incremental hashing for either supported algorithm.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: format!("{:x}", h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: format!("{:x}", h.finalize()),
            },
        }
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// Parses the last path segment of a manifest URL. A value with `:` is a digest.
    pub fn parse(s: &str) -> Result<Reference, ParseError> {
        if s.contains(':') {
            s.parse().map(Reference::Digest)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// An image reference as a user types it: `alpine`, `alpine:3.20`, `ghcr.io/org/app:1.2`,
/// `name@sha256:…`, `name:tag@sha256:…`. The name keeps any registry host as its first segment
/// (routing decides what it means); a missing tag and digest means `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, ParseError> {
        let s = s.trim();
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].parse::<Tag>()?))
            }
            None => (rest, None),
        };
        // The name: an optional registry host, then a repository name.
        let repo = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                let host_ok = first
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b':');
                if !host_ok {
                    return Err(ParseError::Name(truncate(s)));
                }
                rest
            }
            _ => name,
        };
        repo.parse::<RepoName>()?;
        let tag = match (&tag, &digest) {
            (None, None) => Some(Tag("latest".into())),
            _ => tag,
        };
        Ok(ImageRef {
            name: name.to_owned(),
            tag,
            digest,
        })
    }

    /// The reference to ask for: the digest when given, else the tag.
    pub fn reference(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Reference::Digest(d.clone()),
            (None, Some(t)) => Reference::Tag(t.clone()),
            (None, None) => Reference::Tag(Tag("latest".into())),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Keeps error messages short when the input is huge.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_grammar() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/my_app",
            "a__b",
            "a.b",
            "a---b",
            "0/1",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok} should parse");
        }
        for bad in [
            "",
            "Alpine",
            "a//b",
            "/a",
            "a/",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "..",
            "a/../b",
            "a%2fb",
            "a\0b",
            "a b",
            &"a".repeat(256),
        ] {
            assert!(
                bad.parse::<RepoName>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_x.Y-1".parse::<Tag>().is_ok());
        assert!("a".repeat(128).parse::<Tag>().is_ok());
        for bad in [".x", "-x", "", "a/b", "a:b", "a\0", &"a".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn digests_accept_sha256_and_sha512_only() {
        let d256 = format!("sha256:{}", "a".repeat(64));
        let d512 = format!("sha512:{}", "0".repeat(128));
        assert_eq!(d256.parse::<Digest>().map(|d| d.to_string()), Ok(d256));
        assert!(d512.parse::<Digest>().is_ok());
        assert!(matches!(
            format!("md5:{}", "a".repeat(32)).parse::<Digest>(),
            Err(ParseError::Algorithm(_))
        ));
        for bad in [
            "sha256:".to_string(),
            "sha256".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "g".repeat(64)),
            format!("sha256:../{}", "a".repeat(61)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn digest_of_content_matches() {
        let d = Digest::sha256_of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(d.matches(b"hello"));
        assert!(!d.matches(b"hellO"));
    }

    #[test]
    fn image_references_parse_like_docker() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse("alpine").expect("alpine");
        assert_eq!(
            (r.name.as_str(), r.tag.as_ref().map(Tag::as_str)),
            ("alpine", Some("latest"))
        );
        let r = ImageRef::parse("localhost:5000/org/app:1.2").expect("host:port");
        assert_eq!(r.name, "localhost:5000/org/app");
        assert_eq!(r.tag.as_ref().map(Tag::as_str), Some("1.2"));
        let r = ImageRef::parse(&format!("ghcr.io/org/app@{d}")).expect("digest");
        assert_eq!(
            (r.tag, r.digest.map(|x| x.to_string())),
            (None, Some(d.clone()))
        );
        let r = ImageRef::parse(&format!("app:v1@{d}")).expect("tag and digest");
        assert!(r.tag.is_some() && matches!(r.reference(), Reference::Digest(_)));
        assert!(ImageRef::parse("app@sha256:zz").is_err());
        assert!(
            ImageRef::parse("app:bad/tag")
                .is_ok_and(|r| r.name == "app:bad/tag" || r.tag.is_none())
                || ImageRef::parse("app:bad/tag").is_err()
        );
        assert!(ImageRef::parse(":v1").is_err());
    }

    #[test]
    fn docker_hub_names_get_library_prefix() {
        let n: RepoName = "alpine".parse().expect("valid");
        assert_eq!(n.docker_hub_normalised().as_str(), "library/alpine");
        let n: RepoName = "org/app".parse().expect("valid");
        assert_eq!(n.docker_hub_normalised().as_str(), "org/app");
    }
}

//! The router: a request path into its [`Endpoint`], a query string into the parameters regcache
//! reads, and a repository name into the upstream and repository that serve it ([`Router`]: by
//! `?ns=` (containerd), a leading registry host (podman mirrors with a path), or else the default
//! upstream), with the upstream's `allow_repos` and `deny_repos` applied.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

use crate::app::{App, Routing};
use crate::cache::Route;
use crate::http::access::{repo_allowed, RepoDenied};
use crate::http::error::{ApiError, Code};
use crate::oci::reference::RepoName;

/// The parsed shape of a `/v2/…` path, with the raw name, reference and digest segments (not yet
/// validated).
#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint<'a> {
    Base,
    Catalog,
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    Upload,
    Tags(&'a str),
    Referrers(&'a str, &'a str),
    Unknown,
}

impl Endpoint<'_> {
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Base => "base",
            Endpoint::Catalog => "catalog",
            Endpoint::Manifest(..) => "manifest",
            Endpoint::Blob(..) => "blob",
            Endpoint::Upload => "upload",
            Endpoint::Tags(_) => "tags",
            Endpoint::Referrers(..) => "referrers",
            Endpoint::Unknown => "other",
        }
    }
}

/// The endpoints addressed as `<name>/<operation>/<reference or digest>`.
#[derive(Clone, Copy)]
enum Operation {
    Manifests,
    Blobs,
    Referrers,
}

impl Operation {
    /// In the order they are looked for: a name may itself contain `/blobs/` before `/manifests/`.
    const ALL: [Operation; 3] = [Operation::Manifests, Operation::Blobs, Operation::Referrers];

    fn separator(self) -> &'static str {
        match self {
            Operation::Manifests => "/manifests/",
            Operation::Blobs => "/blobs/",
            Operation::Referrers => "/referrers/",
        }
    }

    fn endpoint<'a>(self, name: &'a str, target: &'a str) -> Endpoint<'a> {
        match self {
            Operation::Manifests => Endpoint::Manifest(name, target),
            Operation::Blobs => Endpoint::Blob(name, target),
            Operation::Referrers => Endpoint::Referrers(name, target),
        }
    }
}

/// Splits a request path into its endpoint and the raw name, reference and digest segments. A
/// name may contain the operation's word: the path splits on its last occurrence.
pub fn parse_path(path: &str) -> Endpoint<'_> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Endpoint::Unknown;
    };
    if rest.is_empty() || rest == "/" {
        return Endpoint::Base;
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Endpoint::Unknown;
    };
    if rest == "_catalog" {
        return Endpoint::Catalog;
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Endpoint::Tags(name);
    }
    if rest.contains("/blobs/uploads") {
        return Endpoint::Upload;
    }
    for op in Operation::ALL {
        let sep = op.separator();
        if let Some(i) = rest.rfind(sep) {
            return op.endpoint(&rest[..i], &rest[i + sep.len()..]);
        }
    }
    Endpoint::Unknown
}

/// Query parameters regcache reads.
#[derive(Debug, Default)]
pub struct Query {
    pub ns: Option<String>,
    pub n: Option<String>,
    pub last: Option<String>,
    pub artifact_type: Option<String>,
}

/// The parameters regcache reads from a query string (others, and undecodable values, ignored).
pub fn parse_query(q: Option<&str>) -> Query {
    let mut out = Query::default();
    for (k, v) in query_pairs(q.unwrap_or("")) {
        match k {
            "ns" => out.ns = Some(v),
            "n" => out.n = Some(v),
            "last" => out.last = Some(v),
            "artifactType" => out.artifact_type = Some(v),
            _ => {}
        }
    }
    out
}

/// The `key=value` pairs of a query string, with their values decoded; a pair whose value does
/// not decode is left out. Keys are compared as written.
pub fn query_pairs(q: &str) -> impl Iterator<Item = (&str, String)> {
    q.split('&').filter(|p| !p.is_empty()).filter_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        Some((k, percent_decode(v)?))
    })
}

/// Decodes `%XX` escapes and `+` (a space); `None` for a `%` not followed by two hex digits or a
/// result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    // `percent-encoding` keeps a malformed escape as it is, and `form_urlencoded` also replaces
    // bytes that are not UTF-8: regcache ignores such a value instead, as it always has, so that
    // `?ns=%zz` routes like no `ns` rather than to a registry named "%zz".
    let well_formed = s.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    let spaced = if s.contains('+') {
        Cow::Owned(s.replace('+', " "))
    } else {
        Cow::Borrowed(s)
    };
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}

/// What [`url_encode`] escapes: all but the unreserved characters, `/` and `:` (so that names and
/// tags in a `Link` read as they are).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/')
    .remove(b':');

/// A query value, percent-encoded (what [`percent_decode`] reads back).
pub fn url_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, QUERY_VALUE).to_string()
}

/// Picks the upstream and repository for a request's name.
pub trait Router {
    fn route(&self, raw_name: &str, ns: Option<&str>) -> Result<Route, ApiError>;
}

impl Router for App {
    /// Routes with the routing in force now.
    fn route(&self, raw_name: &str, ns: Option<&str>) -> Result<Route, ApiError> {
        self.routing().route(raw_name, ns)
    }
}

impl Router for Routing {
    fn route(&self, raw_name: &str, ns: Option<&str>) -> Result<Route, ApiError> {
        let unknown_host = |h: &str| {
            ApiError::new(
                Code::NameUnknown,
                format!("no upstream is configured for registry host {h:?}"),
            )
        };
        let (upstream, name) = if let Some(ns) = ns {
            let up = self.upstream_for_host(ns).ok_or_else(|| unknown_host(ns))?;
            // A mirror with a path may also repeat the host: accept it once.
            let name = match raw_name.split_once('/') {
                Some((first, rest))
                    if up
                        .config
                        .hosts
                        .iter()
                        .any(|h| h.eq_ignore_ascii_case(first)) =>
                {
                    rest
                }
                _ => raw_name,
            };
            (up, name)
        } else {
            match raw_name.split_once('/') {
                Some((first, rest)) if looks_like_host(first) => (
                    self.upstream_for_host(first)
                        .ok_or_else(|| unknown_host(first))?,
                    rest,
                ),
                _ => (self.default_upstream(), raw_name),
            }
        };
        let mut repo: RepoName = name.parse()?;
        if upstream.config.docker_hub_names {
            repo = repo.docker_hub_normalised();
        }
        let c = &upstream.config;
        if let Err(why) = repo_allowed(&c.allow_repos, &c.deny_repos, repo.as_str()) {
            let key = match why {
                RepoDenied::Denied(_) => "deny_repos",
                RepoDenied::NotAllowed => "allow_repos",
            };
            return Err(ApiError::new(
                Code::Denied,
                format!(
                    "repository {repo} is not served by this mirror (upstreams.{}.{key})",
                    c.name
                ),
            ));
        }
        Ok(Route { upstream, repo })
    }
}

/// Whether the catalog lists a cached repository: not when its upstream's `allow_repos` or
/// `deny_repos` now refuse it.
pub fn repo_listed(routing: &Routing, upstream: &str, repo: &str) -> bool {
    match routing.upstreams().iter().find(|u| u.name() == upstream) {
        Some(u) => repo_allowed(&u.config.allow_repos, &u.config.deny_repos, repo).is_ok(),
        None => true,
    }
}

/// Whether a leading path segment names a registry host (`ghcr.io`, `localhost:5000`,
/// `127.0.0.1:5000`): DNS labels with at least one dot (or `localhost`), and an optional port.
pub fn looks_like_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return false;
        }
    }
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let labels: Vec<&str> = host.split('.').collect();
    (labels.len() > 1 || port.is_some())
        && host.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_on_the_last_operation() {
        assert!(matches!(parse_path("/v2/"), Endpoint::Base));
        assert!(matches!(parse_path("/v2"), Endpoint::Base));
        assert!(matches!(parse_path("/v2/_catalog"), Endpoint::Catalog));
        assert!(matches!(
            parse_path("/v2/a/b/manifests/latest"),
            Endpoint::Manifest("a/b", "latest")
        ));
        assert!(matches!(
            parse_path("/v2/a/manifests/x/manifests/y"),
            Endpoint::Manifest("a/manifests/x", "y")
        ));
        assert!(matches!(
            parse_path("/v2/a/blobs/x/manifests/y"),
            Endpoint::Manifest("a/blobs/x", "y")
        ));
        assert!(matches!(
            parse_path("/v2/a/blobs/sha256:x"),
            Endpoint::Blob("a", "sha256:x")
        ));
        assert!(matches!(
            parse_path("/v2/a/blobs/uploads/"),
            Endpoint::Upload
        ));
        assert!(matches!(parse_path("/v2/a/tags/list"), Endpoint::Tags("a")));
        assert!(matches!(
            parse_path("/v2/a/referrers/sha256:x"),
            Endpoint::Referrers("a", "sha256:x")
        ));
        assert!(matches!(parse_path("/v3/a"), Endpoint::Unknown));
        assert!(matches!(parse_path("/v2x"), Endpoint::Unknown));
    }

    #[test]
    fn query_values_decode_strictly() {
        let q = parse_query(Some("ns=docker.io&n=2&last=a%2Bb&&artifactType=x+y"));
        assert_eq!(q.ns.as_deref(), Some("docker.io"));
        assert_eq!(q.n.as_deref(), Some("2"));
        assert_eq!(q.last.as_deref(), Some("a+b"));
        assert_eq!(q.artifact_type.as_deref(), Some("x y"));
        for (raw, want) in [
            ("a%2fb%3A", Some("a/b:")),
            ("%C3%A9", Some("é")),
            ("", Some("")),
            ("%", None),
            ("a%4", None),
            ("%zz", None),
            ("%%41", None),
            ("%é1", None),
            ("%FF", None),
        ] {
            assert_eq!(percent_decode(raw).as_deref(), want, "{raw:?}");
        }
        // A value that does not decode is ignored, and keys are not decoded.
        let q = parse_query(Some("ns=%zz&n%73=ghcr.io&last"));
        assert_eq!((q.ns, q.last.as_deref()), (None, Some("")));
    }

    #[test]
    fn query_values_encode_as_they_decode() {
        assert_eq!(url_encode("library/a:b-c_d.e~f"), "library/a:b-c_d.e~f");
        assert_eq!(url_encode("a b+c&d=é"), "a%20b%2Bc%26d%3D%C3%A9");
        for s in ["a b+c&d=é%", "", "x/y"] {
            assert_eq!(percent_decode(&url_encode(s)).as_deref(), Some(s));
        }
    }

    #[test]
    fn hosts_are_recognised() {
        assert!(looks_like_host("ghcr.io"));
        assert!(looks_like_host("127.0.0.1:5000"));
        assert!(looks_like_host("localhost"));
        assert!(!looks_like_host("library"));
        assert!(!looks_like_host(".."));
        assert!(!looks_like_host("."));
        assert!(!looks_like_host("a."));
        assert!(!looks_like_host(".a"));
        assert!(!looks_like_host("a:"));
        assert!(!looks_like_host("a:x"));
        assert!(looks_like_host("registry:5000"));
    }
}

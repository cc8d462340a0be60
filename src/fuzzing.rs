//! Invariant checks for every parser that reads client or upstream input, shared by the
//! cargo-fuzz targets in `fuzz/` and by the property tests below (a deterministic generator, so
//! the normal test suite runs the same checks on every build).
//!
//! Each check takes arbitrary bytes, feeds them to one parser and panics if the parser panics or
//! its answer breaks a property: an accepted repository name never holds `..`, an empty segment
//! or a byte outside the grammar; a resolved range stays inside the blob; a routed request names
//! a configured upstream and a valid repository; and so on. Compiled only for tests and with the
//! `fuzzing` feature.
// The invariant checks panic on purpose: a panic is how a fuzzer or a property test sees a
// broken invariant.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};

use http::HeaderValue;

use crate::app::Routing;
use crate::cmd::prefetch::dockerfile;
use crate::cmd::prefetch::Platform;
use crate::config::access::{Cidr, Htpasswd, RepoPattern};
use crate::http::blobs::{parse_ranges, plan, Plan, MAX_RANGES};
use crate::http::paging::{page, parse_n};
use crate::http::router::{
    looks_like_host, parse_path, parse_query, percent_decode, url_encode, Endpoint, Router as _,
};
use crate::oci::media::{self, Accept, Kind};
use crate::oci::reference::{
    Digest, ImageRef, Reference, RepoName, Tag, MAX_NAME_LEN, MAX_TAG_LEN,
};
use crate::upstream::{
    parse_quota, parse_retry_after, RateLimitSnapshot, MAX_HOLD, MAX_WINDOW, RATELIMIT_HEADERS,
};

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A repository name that was accepted is safe as a path and a database key.
fn assert_safe_name(n: &str) {
    // Docker Hub's `library/` prefix may take a name just past the limit clients must respect.
    assert!(
        !n.is_empty() && n.len() <= MAX_NAME_LEN + "library/".len(),
        "{n:?}: length"
    );
    assert!(
        !n.starts_with('/') && !n.ends_with('/'),
        "{n:?}: slash at an end"
    );
    for c in n.split('/') {
        assert!(!c.is_empty(), "{n:?}: empty component");
        assert!(c != "." && c != "..", "{n:?}: dot component");
        assert!(
            c.bytes().all(|b| b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'_' | b'-')),
            "{n:?}: a byte outside [a-z0-9._-]"
        );
        let first = c.as_bytes()[0];
        let last = c.as_bytes()[c.len() - 1];
        assert!(
            first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric(),
            "{n:?}: component starts or ends with a separator"
        );
    }
}

/// Repository names: accepted ones follow the grammar and print back unchanged.
pub fn name(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(n) = s.parse::<RepoName>() {
        assert_eq!(n.as_str(), s);
        assert!(s.len() <= MAX_NAME_LEN);
        assert_safe_name(n.as_str());
        let hub = n.clone().docker_hub_normalised();
        assert_safe_name(hub.as_str());
    }
}

/// Tags: accepted ones are 1 to 128 bytes of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn tag(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(t) = s.parse::<Tag>() {
        assert_eq!(t.as_str(), s);
        assert!(!s.is_empty() && s.len() <= MAX_TAG_LEN);
        assert!(!s.starts_with('.') && !s.starts_with('-'), "{s:?}");
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')));
        // `1..2` is a valid tag; what matters is that no tag is a path segment of its own.
        assert!(s != "." && s != ".." && !s.contains('/'), "{s:?}");
    }
}

/// Digests: accepted ones are `sha256:`/`sha512:` with lowercase hex of the right length.
pub fn digest(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
        let want = match d.algorithm().as_str() {
            "sha256" => 64,
            "sha512" => 128,
            a => panic!("unexpected algorithm {a}"),
        };
        assert_eq!(d.hex().len(), want);
        assert!(d
            .hex()
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(s.parse::<Digest>().ok(), Some(d));
    }
}

/// Manifest references and user-typed image references.
pub fn reference(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match Reference::parse(s) {
        Ok(Reference::Tag(t)) => tag(t.as_str().as_bytes()),
        Ok(Reference::Digest(d)) => digest(d.to_string().as_bytes()),
        Err(_) => {}
    }
    if let Ok(r) = ImageRef::parse(s) {
        let again = ImageRef::parse(&r.to_string());
        assert_eq!(again.as_ref().ok(), Some(&r), "{s:?} printed as {r}");
    }
}

/// `Range` headers: a resolved range lies inside the blob, whatever the size; a plan of parts has
/// at most [`MAX_RANGES`] of them and no more bytes than the blob.
pub fn range(data: &[u8]) {
    let (size_bytes, header) = data.split_at(data.len().min(8));
    let mut b = [0u8; 8];
    b[..size_bytes.len()].copy_from_slice(size_bytes);
    let Ok(h) = HeaderValue::from_bytes(header) else {
        return;
    };
    let Some(ranges) = parse_ranges(Some(&h)) else {
        return;
    };
    assert!(!ranges.is_empty(), "{h:?}: no range");
    for size in [0, 1, 2, 10, 1 << 20, u64::MAX, u64::from_le_bytes(b)] {
        for r in &ranges {
            if let Some((a, z)) = r.resolve(size) {
                assert!(a <= z && z < size, "{h:?} on {size}: {a}-{z}");
            }
        }
        if let Plan::Parts(parts) = plan(&ranges, size) {
            let bytes: u128 = parts.iter().map(|(a, z)| u128::from(z - a) + 1).sum();
            assert!(
                !parts.is_empty() && parts.len() <= MAX_RANGES && bytes <= u128::from(size),
                "{h:?} on {size}: {} parts, {bytes} bytes",
                parts.len()
            );
        }
    }
}

/// The upstream's rate-limit headers and `Retry-After`: a quota value keeps its count and a
/// window of at most [`MAX_WINDOW`] (never zero) and prints back to itself; a `Retry-After`
/// holds for more than 0 and at most [`MAX_HOLD`]; a snapshot exists exactly when one of the
/// headers does, and passes on only those.
pub fn ratelimit(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Some(q) = parse_quota(s) {
        let first = s.split(',').next().and_then(|m| m.split(';').next());
        assert!(
            first.is_some_and(|f| f.trim().parse::<u64>().ok() == Some(q.count)),
            "{s:?}: count {}",
            q.count
        );
        if let Some(w) = q.window {
            assert!(!w.is_zero() && w <= MAX_WINDOW, "{s:?}: window {w:?}");
            let again = parse_quota(&format!("{};w={}", q.count, w.as_secs()));
            assert_eq!(again, Some(q), "{s:?} printed back");
        }
    }
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    if let Some(wait) = parse_retry_after(s, now) {
        assert!(
            !wait.is_zero() && wait <= MAX_HOLD,
            "{s:?}: a hold of {wait:?}"
        );
    }
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    for (i, name) in RATELIMIT_HEADERS.iter().enumerate() {
        let mut h = http::HeaderMap::new();
        assert!(RateLimitSnapshot::from_headers(&h).is_none(), "no headers");
        h.insert(*name, value.clone());
        h.insert("retry-after", value.clone());
        let snapshot = RateLimitSnapshot::from_headers(&h)
            .unwrap_or_else(|| panic!("{name}: {s:?} makes no snapshot"));
        let passed: Vec<_> = snapshot.headers().collect();
        assert_eq!(passed, vec![(*name, &value)], "{name}: {s:?}");
        if i < 2 {
            let q = value.to_str().ok().and_then(parse_quota);
            let counted = if i == 0 {
                snapshot.limit
            } else {
                snapshot.remaining
            };
            assert_eq!(counted, q.map(|q| q.count), "{name}: {s:?}");
        }
    }
}

/// Query strings, `n` and `last`: a page is at most `n` long, sorted, after `last`.
pub fn n_last(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let q = parse_query(Some(s));
    let max = 1 + (data.len() % 50);
    let n = match parse_n(q.n.as_deref(), max) {
        Ok(n) => n,
        Err(e) => {
            assert_eq!(e.status().as_u16(), 400);
            return;
        }
    };
    if let Some(n) = n {
        assert!(n <= max);
    }
    let mut items: Vec<String> = s.split(['&', '=', '/']).map(str::to_owned).collect();
    items.sort();
    items.dedup();
    let (p, more) = page(items.clone(), n, q.last.as_deref());
    if let Some(n) = n {
        assert!(p.len() <= n);
        if more {
            assert_eq!(p.len(), n);
        }
    }
    if let Some(l) = &q.last {
        assert!(p.iter().all(|t| t.as_str() > l.as_str()));
    }
    assert!(p.windows(2).all(|w| w[0] < w[1]), "page is sorted");
    assert!(p.iter().all(|t| items.contains(t)));
    if let Some(ns) = &q.ns {
        let again = percent_decode(&url_encode(ns));
        assert_eq!(again.as_deref(), Some(ns.as_str()));
    }
}

/// A routing table with three upstreams (Docker Hub names, ghcr.io, and a local registry with
/// repository patterns), built once.
pub fn routing() -> &'static Routing {
    // With the runtime its upstream clients were given, kept (never dropped, so never inside an
    // async context), though it never runs: names are routed here, never fetched.
    static R: OnceLock<(tokio::runtime::Runtime, Routing)> = OnceLock::new();
    &R.get_or_init(|| {
        let text = "default_upstream = \"docker\"\n\
            [upstreams.docker]\nurl = \"https://registry-1.docker.io\"\n\
            [upstreams.ghcr]\nurl = \"https://ghcr.io\"\n\
            [upstreams.local]\nurl = \"http://127.0.0.1:5000\"\nhosts = [\"registry.local\"]\n\
            allow_repos = [\"team/*\", \"org/**\"]\ndeny_repos = [\"org/secret/**\"]\n";
        let config = crate::config::Config::parse(text, "fuzzing", &Default::default())
            .unwrap_or_else(|e| panic!("fuzzing config: {e}"));
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let idle = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("fuzzing runtime: {e}"));
        let routing = Routing::build(config, &metrics, idle.handle(), None)
            .unwrap_or_else(|e| panic!("fuzzing routing: {e}"));
        (idle, routing)
    })
    .1
}

fn check_route(raw_name: &str, ns: Option<&str>) {
    let r = routing();
    match r.route(raw_name, ns) {
        Ok(route) => {
            assert_safe_name(route.repo.as_str());
            assert!(r
                .upstreams()
                .iter()
                .any(|u| Arc::ptr_eq(u, &route.upstream)));
            let c = &route.upstream.config;
            assert!(
                crate::http::access::repo_allowed(
                    &c.allow_repos,
                    &c.deny_repos,
                    route.repo.as_str()
                )
                .is_ok(),
                "{raw_name:?} routed to a repository its upstream refuses"
            );
            if route.upstream.name() == "local" {
                let repo = route.repo.as_str();
                assert!(
                    repo.starts_with("team/") || repo.starts_with("org/"),
                    "{repo}"
                );
                assert!(!repo.starts_with("org/secret/"), "{repo}");
            }
        }
        Err(e) => assert!(
            matches!(e.status().as_u16(), 400 | 403 | 404),
            "{raw_name:?} ns {ns:?}: {}",
            e.status()
        ),
    }
}

/// `?ns=` and names: routing never panics and only ever yields a configured upstream and a valid,
/// allowed repository.
pub fn ns(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let (ns, name) = s.split_once('\n').unwrap_or(("", s));
    let ns = percent_decode(ns);
    check_route(name, ns.as_deref().filter(|n| !n.is_empty()));
}

/// Request paths: the parts the parser finds put back together give the path, and every part
/// that reaches the cache has passed its grammar.
pub fn path(data: &[u8]) {
    let Some(p) = text(data) else { return };
    let endpoint = parse_path(p);
    let _ = endpoint.label();
    match endpoint {
        Endpoint::Manifest(n, r) => {
            assert_eq!(format!("/v2/{n}/manifests/{r}"), p);
            check_route(n, None);
            reference(r.as_bytes());
        }
        Endpoint::Blob(n, d) => {
            assert_eq!(format!("/v2/{n}/blobs/{d}"), p);
            check_route(n, None);
            digest(d.as_bytes());
        }
        Endpoint::Referrers(n, d) => {
            assert_eq!(format!("/v2/{n}/referrers/{d}"), p);
            check_route(n, None);
            digest(d.as_bytes());
        }
        Endpoint::Tags(n) => {
            assert_eq!(format!("/v2/{n}/tags/list"), p);
            check_route(n, None);
        }
        Endpoint::Base => assert!(p == "/v2" || p == "/v2/"),
        Endpoint::Catalog => assert_eq!(p, "/v2/_catalog"),
        Endpoint::Upload => assert!(p.contains("/blobs/uploads")),
        Endpoint::Unknown => {}
    }
    let _ = looks_like_host(p.trim_start_matches('/'));
}

/// A slow but obviously correct glob matcher, to check the real one against.
fn glob_reference(p: &[u8], n: &[u8]) -> bool {
    match p {
        [] => n.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=n.len()).any(|i| glob_reference(rest, &n[i..])),
        [b'*', rest @ ..] => {
            let seg = n.iter().position(|&c| c == b'/').unwrap_or(n.len());
            (0..=seg).any(|i| glob_reference(rest, &n[i..]))
        }
        [b'?', rest @ ..] => !n.is_empty() && n[0] != b'/' && glob_reference(rest, &n[1..]),
        [c, rest @ ..] => n.first() == Some(c) && glob_reference(rest, &n[1..]),
    }
}

/// Repository patterns: the linear matcher agrees with the obvious recursive one.
pub fn glob(data: &[u8]) {
    let Some(s) = text(data) else { return };
    let (p, n) = s.split_once('\n').unwrap_or((s, "library/alpine"));
    let Ok(pattern) = p.parse::<RepoPattern>() else {
        return;
    };
    // Keep the reference matcher's backtracking affordable.
    if p.len() > 40 || n.len() > 64 || p.matches('*').count() > 6 {
        let _ = pattern.matches(n);
        return;
    }
    assert_eq!(
        pattern.matches(n),
        glob_reference(p.as_bytes(), n.as_bytes()),
        "pattern {p:?} name {n:?}"
    );
}

/// The JSON nesting scanner agrees with serde_json on every document serde_json accepts.
pub fn json(data: &[u8]) {
    let depth = crate::oci::manifest::json_depth(data);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let mut deepest = 0;
        let mut stack = vec![(&v, 0usize)];
        while let Some((v, d)) = stack.pop() {
            match v {
                serde_json::Value::Array(a) => {
                    deepest = deepest.max(d + 1);
                    stack.extend(a.iter().map(|x| (x, d + 1)));
                }
                serde_json::Value::Object(o) => {
                    deepest = deepest.max(d + 1);
                    stack.extend(o.values().map(|x| (x, d + 1)));
                }
                _ => {}
            }
        }
        assert_eq!(depth, deepest, "{:?}", String::from_utf8_lossy(data));
    }
}

/// Client `Accept` lines (one per input line) and manifests from upstreams: the `Accept` set holds
/// exactly the manifest types some line names (parameters cut at `;`) and reads back from the
/// value regcache sends upstream; reading a list's platforms and a schema 1 signature never panics.
pub fn accept(data: &[u8]) {
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let set = Accept::parse(lines.iter().copied());
    for k in Kind::ALL {
        let named = lines
            .iter()
            .flat_map(|l| l.split(|&b| b == b','))
            .any(|item| {
                let t = item.split(|&b| b == b';').next().unwrap_or(item);
                t.trim_ascii() == k.media_type().as_bytes()
            });
        assert_eq!(
            set.contains(k),
            named,
            "{k:?} in {:?}",
            String::from_utf8_lossy(data)
        );
    }
    let sent = set.header_value();
    assert_eq!(Accept::parse(sent.as_deref().map(str::as_bytes)), set);
    for by_tag in [true, false] {
        let _ = media::negotiate(media::DOCKER_LIST, data, set, by_tag);
    }
    let _ = media::schema1_payload(data);
}

/// Dockerfiles (what `prefetch --dockerfile` reads): reading one never panics, every image it
/// yields is a valid reference with a platform that prints back to itself, and word expansion
/// never panics either.
pub fn dockerfile(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let platform = |s: &str| Platform::parse(s).expect("a valid platform");
    let (amd64, arm) = (platform("linux/amd64"), platform("linux/arm/v7"));
    let vars: std::collections::HashMap<String, String> = [("V", "1.36"), ("EMPTY", "")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for target in [&amd64, &arm] {
        let Ok(images) = dockerfile::images(text, &vars, target, &amd64) else {
            continue;
        };
        for i in images {
            assert!(
                ImageRef::parse(&i.image).is_ok(),
                "{:?} in {text:?}",
                i.image
            );
            assert_eq!(
                Platform::parse(&i.platform.to_string()).as_ref(),
                Ok(&i.platform),
                "{text:?}"
            );
        }
    }
    for line in text.lines().take(64) {
        for escape in ['\\', '`'] {
            let _ = crate::cmd::prefetch::shell::expand(line, &vars, escape);
        }
    }
}

/// Client credentials and address lists: htpasswd files, `Authorization` headers, CIDRs.
pub fn access(data: &[u8]) {
    let _ = crate::http::auth::parse_basic(data);
    let Some(s) = text(data) else { return };
    if let Ok(h) = Htpasswd::parse(s, std::path::Path::new("fuzz")) {
        assert!(!format!("{h:?}").contains("$2"), "hashes stay out of Debug");
    }
    for line in s.lines() {
        if let Ok(c) = line.parse::<Cidr>() {
            let text = c.to_string();
            let again: Cidr = text
                .parse()
                .unwrap_or_else(|e| panic!("{line:?} printed as {text}, which fails: {e}"));
            assert_eq!(again, c);
            let (addr, _) = text.split_once('/').unwrap_or((&text, ""));
            if let Ok(ip) = addr.parse() {
                assert!(c.contains(ip), "{c} contains its own address");
            }
        }
    }
}

/// Deterministic pseudo-random inputs for the property tests: strings built from pieces that
/// matter to these parsers (separators, dots, escapes, NUL, hosts, digests), valid values with
/// one edit, and raw bytes.
pub struct Gen(u64);

const PIECES: &[&str] = &[
    "a",
    "b",
    "z",
    "0",
    "9",
    "x1",
    "alpine",
    "library",
    "/",
    "/",
    "//",
    ".",
    "..",
    "...",
    "-",
    "--",
    "_",
    "__",
    "___",
    ":",
    "@",
    "%",
    "%2e",
    "%2E%2e",
    "%2f",
    "%2F",
    "%00",
    "%",
    "%zz",
    "\0",
    "A",
    "Z",
    "sha256:",
    "sha512:",
    "md5:",
    "ghcr.io",
    "docker.io",
    "localhost",
    ":5000",
    "registry.local",
    "127.0.0.1",
    "?",
    "&",
    "=",
    "n=",
    "last=",
    "ns=",
    "bytes=",
    ",",
    "+",
    " ",
    "\t",
    "é",
    "\u{202e}",
    "*",
    "**",
    "?",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "\\",
    "manifests",
    "blobs",
    "tags/list",
    "referrers",
    "_catalog",
    "uploads",
    "/v2/",
    "/v2",
    "team/",
    "org/",
    "secret/",
    "0123456789abcdef",
    "deadbeef",
    "-1",
    "18446744073709551616",
    "99999999999999999999",
    "\r\n",
    "\n",
    "\u{0}\u{0}",
    "$2y$04$",
    "Basic ",
    "::ffff:",
    "/8",
    "/33",
    "10.0.0.0",
];

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    fn valid_name(&mut self) -> String {
        let parts = 1 + self.below(3);
        (0..parts)
            .map(|_| {
                let len = 1 + self.below(8);
                (0..len)
                    .map(|_| (b'a' + self.below(26) as u8) as char)
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    fn hex(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| b"0123456789abcdef"[self.below(16)] as char)
            .collect()
    }

    /// One input.
    pub fn input(&mut self) -> Vec<u8> {
        let mut out = match self.below(6) {
            // Raw bytes.
            0 => (0..self.below(64)).map(|_| self.next_u64() as u8).collect(),
            // A valid value, to mutate below.
            1 => self.valid_name().into_bytes(),
            2 => format!("sha256:{}", self.hex(64)).into_bytes(),
            3 => format!("/v2/{}/blobs/sha256:{}", self.valid_name(), self.hex(64)).into_bytes(),
            // Pieces.
            _ => {
                let n = 1 + self.below(12);
                (0..n)
                    .flat_map(|_| PIECES[self.below(PIECES.len())].bytes())
                    .collect()
            }
        };
        // Sometimes: one edit, a long run, or a huge length.
        match self.below(8) {
            0 if !out.is_empty() => {
                let i = self.below(out.len());
                out[i] = PIECES[self.below(PIECES.len())]
                    .bytes()
                    .next()
                    .unwrap_or(b'.');
            }
            1 => {
                let i = self.below(out.len() + 1);
                let piece = PIECES[self.below(PIECES.len())].as_bytes();
                out.splice(i..i, piece.iter().copied());
            }
            2 => {
                let piece = PIECES[self.below(PIECES.len())].as_bytes();
                let times = 1 + self.below(300);
                for _ in 0..times {
                    out.extend_from_slice(piece);
                }
            }
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-written hostile inputs, tried by every check before the generated ones.
    const HOSTILE: &[&str] = &[
        "..",
        "../etc/passwd",
        "a/../b",
        "a/./b",
        "%2e%2e",
        "%2e%2e/%2e%2e/etc",
        "a%2f..%2fb",
        "a\0b",
        "/v2/../../etc/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "/v2/a/manifests/..%2f..%2fetc%2fpasswd",
        "/v2/%2e%2e/tags/list",
        "/v2/ghcr.io/../x/manifests/latest",
        "/v2/registry.local/org/secret/x/manifests/v1",
        "/v2/registry.local/team/a/b/manifests/v1",
        "sha256:../../../../etc/passwd",
        "bytes=-0",
        "bytes=18446744073709551615-",
        "bytes=0-18446744073709551615",
        "bytes=-18446744073709551616",
        "n=10001&last=%ff",
        "n=-1",
        "ns=%2e%2e&n=1",
        "ns=ghcr.io\n../x",
        "**/*/**\norg/a/b",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]",
        "alice:$2y$04$\nbob",
        "::ffff:10.0.0.1/104",
        "application/vnd.docker.distribution.manifest.v2+json ;q=0,*/*\n\napplication/vnd.oci.image.index.v1+json;;,",
        r#"{"manifests":[{"digest":"sha256:x","platform":{"architecture":"amd64","os":"linux"}}]}"#,
        r#"{"signatures":[{"protected":"eyJmb3JtYXRMZW5ndGgiOjk5OTl9"}]}"#,
    ];

    fn drive(check: fn(&[u8]), seed: u64, runs: usize) {
        for s in HOSTILE {
            check(s.as_bytes());
        }
        check(&[b'a'; 100_000]);
        let mut g = Gen::new(seed);
        for _ in 0..runs {
            check(&g.input());
        }
    }

    /// `check` on `runs` inputs of fewer than `most` pieces each, drawn from `pieces`.
    fn drive_pieces(check: fn(&[u8]), pieces: &[&str], most: usize, seed: u64, runs: usize) {
        let mut g = Gen::new(seed);
        for _ in 0..runs {
            let text: String = (0..g.below(most))
                .map(|_| pieces[g.below(pieces.len())])
                .collect();
            check(text.as_bytes());
        }
    }

    #[test]
    fn property_names() {
        drive(name, 1, 20_000);
    }

    #[test]
    fn property_tags() {
        drive(tag, 2, 20_000);
    }

    #[test]
    fn property_digests() {
        drive(digest, 3, 20_000);
    }

    #[test]
    fn property_references() {
        drive(reference, 4, 20_000);
    }

    #[test]
    fn property_ranges() {
        drive(range, 5, 20_000);
    }

    #[test]
    fn property_n_and_last() {
        drive(n_last, 6, 20_000);
    }

    #[test]
    fn property_ns_routing() {
        drive(ns, 7, 20_000);
    }

    #[test]
    fn property_paths() {
        drive(path, 8, 20_000);
    }

    #[test]
    fn property_globs() {
        drive(glob, 9, 20_000);
    }

    #[test]
    fn property_json_depth() {
        drive(json, 10, 20_000);
    }

    #[test]
    fn property_access() {
        drive(access, 11, 20_000);
    }

    #[test]
    fn property_accept() {
        drive(accept, 13, 20_000);
    }

    /// Pieces of rate-limit header values and `Retry-After`s.
    const RATELIMIT_PIECES: &[&str] = &[
        "0",
        "1",
        "76",
        "100",
        "18446744073709551615",
        "18446744073709551616",
        ";",
        ",",
        " ",
        "w=",
        "W=",
        "w=21600",
        "w=0",
        "w=\"60\"",
        "w=86401",
        "q=1",
        "\"",
        "-",
        ".",
        "+",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Sun, 06 Nov 2094 08:49:37 GMT",
        "GMT",
        "x",
    ];

    #[test]
    fn property_ratelimit_headers() {
        drive(ratelimit, 16, 20_000);
        drive_pieces(ratelimit, RATELIMIT_PIECES, 8, 17, 20_000);
    }

    /// Pieces of Dockerfiles, to generate inputs shaped like them.
    const DOCKERFILE_PIECES: &[&str] = &[
        "FROM ",
        "from ",
        "ARG ",
        "ENV ",
        "RUN ",
        "COPY ",
        "ADD ",
        " AS ",
        " as ",
        "\n",
        "\n\n",
        "\\\n",
        "`\n",
        "# escape=`\n",
        "# syntax=x\n",
        "# c\n",
        "\t",
        " ",
        "alpine",
        "busybox",
        ":1.36",
        "@sha256:",
        "scratch",
        "base",
        "--platform=",
        "--from=",
        "--mount=type=bind,from=",
        "$V",
        "${V}",
        "${V:-",
        "${V-",
        "${V:+",
        "${V+",
        "${V:?",
        "${V?",
        "${V#",
        "${V##",
        "${V%",
        "${V%%",
        "${V/",
        "${V//",
        "${",
        "}",
        "$",
        "$TARGETARCH",
        "${TARGETOS}/${TARGETARCH}",
        "$BUILDPLATFORM",
        "linux/",
        "amd64",
        "*",
        "?",
        "\"",
        "'",
        "=",
        "<<EOF",
        "<<-EOF",
        "<<\"EOF\"",
        "<<'EOF'",
        "EOF",
        "\tEOF",
        "2<<X",
        "X",
        "0",
        "1",
        "/",
        "\\",
    ];

    #[test]
    fn property_dockerfiles() {
        drive(dockerfile, 14, 5_000);
        drive_pieces(dockerfile, DOCKERFILE_PIECES, 60, 15, 5_000);
    }

    #[test]
    fn generated_valid_values_are_accepted() {
        let mut g = Gen::new(12);
        for _ in 0..2_000 {
            let n = g.valid_name();
            assert!(n.parse::<RepoName>().is_ok(), "{n}");
            let d = format!("sha256:{}", g.hex(64));
            assert!(d.parse::<Digest>().is_ok(), "{d}");
        }
    }
}

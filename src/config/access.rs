//! `[access]` and the repository patterns of `[upstreams.NAME]`, as the configuration holds them:
//! the client networks of `allow` ([`Cidr`], on ipnet), the users of an htpasswd file
//! ([`Htpasswd`], bcrypt only) and the `allow_repos`/`deny_repos` globs ([`RepoPattern`]).
//!
//! The checks that use them on requests are the http layer's (`http::access`, `http::auth`).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::files::Read;
use crate::config::raw::{self, RawAccess};
use crate::config::Pending;

/// A network in CIDR notation (`10.0.0.0/8`, `fd00::/8`), or a single address, as an allow-list
/// holds it.
///
/// The address is read by std (ipnet's own parser also takes IPv4 octets with leading zeros,
/// `010.0.0.1`, which std refuses as ambiguous); ipnet does the rest. An IPv4-mapped IPv6 address
/// (`::ffff:10.1.2.3`, as a dual-stack listener reports IPv4 peers) is its IPv4 address, and a
/// prefix after one counts IPv4 bits, as it always has (`::ffff:10.0.0.0/8` is `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an address or network such as \"10.0.0.0/8\"");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = addr.parse::<IpAddr>().map_err(|_| bad())?.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: u8's parser also takes a sign ("+8").
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
        };
        let net = IpNet::new(addr, prefix)
            .map_err(|_| format!("{s:?}: prefix /{prefix} is longer than {max} bits"))?;
        Ok(Cidr(net.trunc()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Cidr {
    /// Whether `ip` is in this network. IPv4-mapped IPv6 addresses count as their IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

/// A repository pattern: `*` matches within one path component, `**` across components, `?` one
/// character other than `/`; everything else matches itself (`library/*`, `org/**`).
#[derive(Clone, PartialEq, Eq)]
pub struct RepoPattern(String);

impl fmt::Debug for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl FromStr for RepoPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<RepoPattern, String> {
        if s.is_empty() || s.len() > 512 {
            return Err(format!("{s:?} is not a repository pattern"));
        }
        if let Some(c) = s.chars().find(|c| {
            !(c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, '.' | '_' | '-' | '/' | '*' | '?'))
        }) {
            return Err(format!(
                "repository pattern {s:?} holds {c:?}: repository names use a-z, 0-9, '.', '_', \
                 '-' and '/'; patterns add '*', '**' and '?'"
            ));
        }
        if s.contains("***") {
            return Err(format!(
                "repository pattern {s:?}: use '*' or '**', not '***'"
            ));
        }
        Ok(RepoPattern(s.to_owned()))
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl RepoPattern {
    pub fn matches(&self, repo: &str) -> bool {
        glob_match(&self.0, repo)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Copy)]
enum Token {
    Byte(u8),
    One,
    Star,
    DoubleStar,
}

fn tokens(pattern: &str) -> Vec<Token> {
    let b = pattern.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'*' if b.get(i + 1) == Some(&b'*') => {
                out.push(Token::DoubleStar);
                i += 2;
            }
            b'*' => {
                out.push(Token::Star);
                i += 1;
            }
            b'?' => {
                out.push(Token::One);
                i += 1;
            }
            c => {
                out.push(Token::Byte(c));
                i += 1;
            }
        }
    }
    out
}

/// Glob matching (`*`, `**`, `?`) in O(pattern × name) time, whatever the input: a dynamic
/// programme over the pattern's tokens, never backtracking.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let name = name.as_bytes();
    // row[j]: the tokens so far match name[..j].
    let mut row = vec![false; name.len() + 1];
    row[0] = true;
    for t in tokens(pattern) {
        let mut next = vec![false; name.len() + 1];
        for j in 0..=name.len() {
            match t {
                Token::Byte(c) => {
                    if j > 0 && row[j - 1] && name[j - 1] == c {
                        next[j] = true;
                    }
                }
                Token::One => {
                    if j > 0 && row[j - 1] && name[j - 1] != b'/' {
                        next[j] = true;
                    }
                }
                Token::Star => {
                    next[j] = row[j] || (j > 0 && next[j - 1] && name[j - 1] != b'/');
                }
                Token::DoubleStar => {
                    next[j] = row[j] || (j > 0 && next[j - 1]);
                }
            }
        }
        row = next;
    }
    row[name.len()]
}

/// Users and bcrypt hashes from an htpasswd file.
#[derive(Clone, PartialEq, Eq)]
pub struct Htpasswd {
    pub path: PathBuf,
    users: HashMap<String, String>,
    /// One of the file's hashes, checked against when the user is unknown, so that an unknown
    /// user costs the same time as a wrong password (no user enumeration by timing).
    pub(crate) decoy: Option<String>,
}

impl fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Htpasswd({}, {} users, <hashes redacted>)",
            self.path.display(),
            self.users.len()
        )
    }
}

impl Htpasswd {
    /// Reads and checks an htpasswd file. Errors name the line.
    pub fn load(path: &Path) -> Result<Htpasswd, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Htpasswd::parse(&text, path)
    }

    /// Parses `user:hash` lines; blank lines and `#` comments are skipped. Only bcrypt hashes
    /// (`$2y$`, `$2b$`, `$2a$`, as `htpasswd -B` writes) are accepted.
    pub fn parse(text: &str, path: &Path) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        let mut decoy = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("{} line {n}: expected user:hash", path.display()))?;
            if user.is_empty() || user.contains(char::is_control) {
                return Err(format!(
                    "{} line {n}: empty or invalid user name",
                    path.display()
                ));
            }
            let hash = hash.trim();
            let bcrypt_prefix = ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p));
            if !bcrypt_prefix || bcrypt::HashParts::from_str(hash).is_err() {
                return Err(format!(
                    "{} line {n}: user {user:?} does not have a bcrypt hash; only bcrypt is \
                     supported (create entries with `htpasswd -B`)",
                    path.display()
                ));
            }
            decoy.get_or_insert_with(|| hash.to_owned());
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(format!(
                    "{} line {n}: user {user:?} appears twice",
                    path.display()
                ));
            }
        }
        Ok(Htpasswd {
            path: path.to_owned(),
            users,
            decoy,
        })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub(crate) fn hash_of(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }
}

/// Client access settings (`[access]`). The default lets every client in, without credentials.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccessConfig {
    /// Networks whose clients may connect; empty: everyone.
    pub allow: Vec<Cidr>,
    /// When set, every request but `/healthz` and `/readyz` needs Basic credentials from it.
    pub htpasswd: Option<Arc<Htpasswd>>,
}

/// `[access]`; the htpasswd file is left to `pending`.
pub(super) fn validate(
    text: &str,
    raw: RawAccess,
    pending: &mut Pending,
) -> Result<AccessConfig, String> {
    let allow = match raw.allow {
        None => AccessConfig::default().allow,
        Some(list) if list.is_empty() => {
            return Err(
                "access.allow is empty, which would refuse every client: remove the key \
                        to allow every address"
                    .into(),
            )
        }
        Some(list) => list
            .iter()
            .map(|c| {
                c.get_ref()
                    .parse::<Cidr>()
                    .map_err(|e| format!("line {}: access.allow: {e}", raw::line(text, c)))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    if let Some(path) = raw.htpasswd {
        pending.reads.push(Read::Htpasswd { path });
    }
    Ok(AccessConfig {
        allow,
        htpasswd: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, set_mode};

    #[test]
    fn cidrs_parse_and_contain() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains("10.255.1.2".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        assert!(c.contains("::ffff:10.1.2.3".parse().expect("mapped")));
        let host: Cidr = "127.0.0.1".parse().expect("host");
        assert!(host.contains("127.0.0.1".parse().expect("ip")));
        assert!(!host.contains("127.0.0.2".parse().expect("ip")));
        let v6: Cidr = "fd00::/8".parse().expect("v6");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert!(!v6.contains("10.0.0.1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().map(|c| c.to_string()),
            Ok("10.0.0.0/8".into())
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "1.2.3.4/+8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} should be refused");
        }
    }

    /// Every form of allow-list entry accepted before ipnet, with the network it stands for.
    #[test]
    fn every_allow_list_form_the_config_accepts_stays_accepted() {
        for (entry, network) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("10.0.0.0/008", "10.0.0.0/8"),
            (" 10.0.0.0/8 ", "10.0.0.0/8"),
            // Bare addresses: one host.
            ("127.0.0.1", "127.0.0.1/32"),
            ("::1", "::1/128"),
            ("fd00::/8", "fd00::/8"),
            ("fd12:3456::1/64", "fd12:3456::/64"),
            ("::/0", "::/0"),
            // IPv4-mapped IPv6: the IPv4 address, a prefix after it in IPv4 bits.
            ("::ffff:10.1.2.3", "10.1.2.3/32"),
            ("::ffff:a01:203", "10.1.2.3/32"),
            ("::ffff:10.0.0.0/8", "10.0.0.0/8"),
        ] {
            assert_eq!(
                entry.parse::<Cidr>().map(|c| c.to_string()),
                Ok(network.to_string()),
                "{entry:?}"
            );
        }
        // Refused before ipnet, refused now: octets with leading zeros (octal to some tools), a
        // mapped address with an IPv6-sized prefix, four digits of prefix.
        for bad in [
            "010.0.0.1",
            "010.0.0.0/8",
            "::ffff:10.0.0.0/104",
            "10.0.0.0/0008",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} should be refused");
        }
        let mapped: Cidr = "::ffff:10.1.2.3".parse().expect("mapped");
        assert!(mapped.contains("10.1.2.3".parse().expect("ip")));
        assert!(mapped.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(!mapped.contains("10.1.2.4".parse().expect("ip")));
    }

    #[test]
    fn globs_match_components() {
        let m = |p: &str, n: &str| glob_match(p, n);
        assert!(m("library/*", "library/alpine"));
        assert!(!m("library/*", "library/a/b"));
        assert!(m("org/**", "org/a/b/c"));
        assert!(m("org/**", "org/a"));
        assert!(!m("org/**", "org"));
        assert!(!m("org/**", "orgx/a"));
        assert!(m("**", "a/b"));
        assert!(m("*/app", "team/app"));
        assert!(!m("*/app", "a/team/app"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "a/c"));
        assert!(m("exact/name", "exact/name"));
        assert!(!m("exact/name", "exact/names"));
        assert!(m("**/base", "x/y/base"));
        // Pathological patterns stay linear.
        let p = "*a".repeat(100);
        assert!(!m(&p, &"a".repeat(99)));
        assert!("Library/*".parse::<RepoPattern>().is_err());
        assert!("a b".parse::<RepoPattern>().is_err());
        assert!("a/***".parse::<RepoPattern>().is_err());
    }

    #[test]
    fn htpasswd_accepts_bcrypt_only() {
        let hash = bcrypt::hash("pw", 4).expect("hash");
        let path = Path::new("/etc/regcache/htpasswd");
        let h = Htpasswd::parse(&format!("# users\n\nalice:{hash}\n"), path).expect("valid");
        assert_eq!(h.len(), 1);
        assert!(!format!("{h:?}").contains(&hash), "hashes are redacted");
        for (text, line) in [
            ("bob:$apr1$abc$def\n", "line 1"),
            ("\nbob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "line 2"),
            ("bob:plain\n", "line 1"),
            ("nocolon\n", "line 1"),
            (&format!("a:{hash}\na:{hash}\n"), "line 2"),
        ] {
            let e = Htpasswd::parse(text, path).expect_err(text);
            assert!(e.contains(line), "{text:?}: {e}");
        }
    }

    #[test]
    fn access_allow_list_and_htpasswd() {
        let c =
            parse("[access]\nallow = [\"127.0.0.0/8\", \"10.0.0.0/8\", \"::1\"]\n").expect("valid");
        assert_eq!(c.access.allow.len(), 3);
        let e = parse("[access]\nallow = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/40\",\n]\n")
            .expect_err("bad prefix");
        assert!(e.contains("line 4") && e.contains("access.allow"), "{e}");
        let e = parse("[access]\nallow = []\n").expect_err("empty");
        assert!(e.contains("access.allow is empty"), "{e}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).expect("hash");
        std::fs::write(&path, format!("alice:{hash}\n")).expect("write");
        set_mode(&path, 0o640);
        let text = format!("[access]\nhtpasswd = {:?}\n", path.display().to_string());
        let c = parse(&text).expect("valid htpasswd");
        assert_eq!(c.access.htpasswd.as_ref().map(|h| h.len()), Some(1));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(
            !format!("{c:?}").contains(&hash),
            "the hash never shows in Debug"
        );
        set_mode(&path, 0o644);
        let c = parse(&text).expect("valid htpasswd");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("other users can read")),
            "{:?}",
            c.warnings
        );
        std::fs::write(&path, "alice:$apr1$x$y\n").expect("write");
        let e = parse(&text).expect_err("md5 entry");
        assert!(e.contains("access.htpasswd") && e.contains("bcrypt"), "{e}");
        std::fs::write(&path, "# nobody yet\n").expect("write");
        let e = parse(&text).expect_err("no users");
        assert!(e.contains("has no users"), "{e}");
        let e = parse("[access]\nhtpasswd = \"/nonexistent/htpasswd\"\n").expect_err("missing");
        assert!(e.contains("cannot read"), "{e}");
    }
}

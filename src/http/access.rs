//! Who may use the mirror, checked on each request: the client address against `[access] allow`,
//! and the repository against its upstream's `allow_repos` and `deny_repos`.
//!
//! The networks, patterns and htpasswd users are parsed with the configuration
//! (`config::access`); Basic credentials are checked by `auth::Verifier`.

use std::net::IpAddr;

use crate::config::access::{Cidr, RepoPattern};

/// Whether `peer` may connect under `allow` (an empty list allows everyone).
pub fn address_allowed(allow: &[Cidr], peer: IpAddr) -> bool {
    allow.is_empty() || allow.iter().any(|c| c.contains(peer))
}

/// Why a repository is refused by an upstream's patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoDenied {
    /// It matches this `deny_repos` pattern.
    Denied(String),
    /// `allow_repos` is set and no pattern matches.
    NotAllowed,
}

/// Checks `repo` (normalised, e.g. `library/alpine`) against an upstream's patterns: it must
/// match one `allow` pattern when there are any, and no `deny` pattern.
pub fn repo_allowed(
    allow: &[RepoPattern],
    deny: &[RepoPattern],
    repo: &str,
) -> Result<(), RepoDenied> {
    if let Some(p) = deny.iter().find(|p| p.matches(repo)) {
        return Err(RepoDenied::Denied(p.as_str().to_owned()));
    }
    if !allow.is_empty() && !allow.iter().any(|p| p.matches(repo)) {
        return Err(RepoDenied::NotAllowed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_allow_list_allows_everyone() {
        assert!(address_allowed(&[], "1.2.3.4".parse().expect("ip")));
        let allow: Vec<Cidr> = vec!["10.0.0.0/8".parse().expect("cidr")];
        assert!(address_allowed(&allow, "10.1.2.3".parse().expect("ip")));
        assert!(address_allowed(
            &allow,
            "::ffff:10.1.2.3".parse().expect("ip")
        ));
        assert!(!address_allowed(&allow, "11.1.2.3".parse().expect("ip")));
    }

    #[test]
    fn repo_policy_deny_wins() {
        let p = |v: &[&str]| -> Vec<RepoPattern> {
            v.iter().map(|s| s.parse().expect("pattern")).collect()
        };
        let allow = p(&["library/*", "org/**"]);
        let deny = p(&["org/secret/**"]);
        assert_eq!(repo_allowed(&allow, &deny, "library/alpine"), Ok(()));
        assert_eq!(repo_allowed(&allow, &deny, "org/a/b"), Ok(()));
        assert_eq!(
            repo_allowed(&allow, &deny, "org/secret/x"),
            Err(RepoDenied::Denied("org/secret/**".into()))
        );
        assert_eq!(
            repo_allowed(&allow, &deny, "other/x"),
            Err(RepoDenied::NotAllowed)
        );
        assert_eq!(repo_allowed(&[], &deny, "other/x"), Ok(()));
    }
}

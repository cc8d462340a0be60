//! The address policy for redirects and Bearer token realms: which URLs the upstream may send
//! regcache (with its credentials) to.
//!
//! At most [`MAX_REDIRECTS`], http(s) only, and not to loopback, private, link-local or special
//! addresses unless the upstream is itself on that kind of address or `allow_private_redirects`
//! is set. reqwest follows the redirects this policy allows, and drops `Authorization` when one
//! leaves the host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use reqwest::Url;

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 10;

/// What kind of address a URL's host names, for the redirect rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostClass {
    /// Anything not below, including every host name but `localhost`.
    Public,
    /// 127.0.0.0/8, ::1, `localhost` and `*.localhost`.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (shared), fc00::/7, fec0::/10.
    Private,
    /// 169.254/16 (cloud metadata services live here), fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8, ::, multicast, 240/4 and broadcast, IPv4-compatible IPv6: never a registry.
    Special,
}

impl HostClass {
    fn describe(self) -> &'static str {
        match self {
            HostClass::Public => "public",
            HostClass::Loopback => "loopback",
            HostClass::Private => "private",
            HostClass::LinkLocal => "link-local",
            HostClass::Special => "unspecified, multicast or reserved",
        }
    }
}

/// Why a redirect (or a Bearer realm) was not followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooMany,
    #[error("refused to follow the upstream to a {scheme}: URL: only http and https are followed")]
    Scheme { scheme: String },
    #[error(
        "refused to follow the upstream to {host}, a {} address, while the upstream itself is not \
         on one (set allow_private_redirects = true for this upstream to allow it)",
        .class.describe()
    )]
    Internal { host: String, class: HostClass },
}

fn v4_class(a: Ipv4Addr) -> HostClass {
    let o = a.octets();
    match o {
        [127, ..] => HostClass::Loopback,
        [10, ..] | [192, 168, ..] => HostClass::Private,
        [172, b, ..] if (16..32).contains(&b) => HostClass::Private,
        [100, b, ..] if (64..128).contains(&b) => HostClass::Private,
        [169, 254, ..] => HostClass::LinkLocal,
        [0, ..] => HostClass::Special,
        [a, ..] if a >= 224 => HostClass::Special,
        _ => HostClass::Public,
    }
}

fn v6_class(a: Ipv6Addr) -> HostClass {
    if let Some(v4) = a.to_ipv4_mapped() {
        return v4_class(v4);
    }
    let seg = a.segments();
    let bits = u128::from(a);
    if a.is_loopback() {
        HostClass::Loopback
    } else if bits >> 32 == 0 {
        // :: and the deprecated IPv4-compatible ::a.b.c.d
        HostClass::Special
    } else if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        // NAT64 (64:ff9b::/96): the IPv4 address it reaches.
        v4_class(Ipv4Addr::from((bits & 0xffff_ffff) as u32))
    } else if seg[0] & 0xfe00 == 0xfc00 || seg[0] & 0xffc0 == 0xfec0 {
        HostClass::Private
    } else if seg[0] & 0xffc0 == 0xfe80 {
        HostClass::LinkLocal
    } else if seg[0] & 0xff00 == 0xff00 {
        HostClass::Special
    } else {
        HostClass::Public
    }
}

/// The class of a URL's host. IP literals are classified by address (the URL parser has already
/// turned `0x7f.1` or `2130706433` into `127.0.0.1`); names are public except `localhost`. A
/// public name that resolves to a private address is not caught here (see docs/SECURITY.md).
pub fn host_class(url: &Url) -> HostClass {
    match url.host() {
        None => HostClass::Special,
        Some(url::Host::Ipv4(a)) => v4_class(a),
        Some(url::Host::Ipv6(a)) => v6_class(a),
        Some(url::Host::Domain(name)) => {
            // A domain never parses as an address (the URL parser made those `Ipv4`/`Ipv6`),
            // except in a URL of a scheme the parser does not know, kept here just the same.
            if let Ok(ip) = name.parse::<IpAddr>() {
                return match ip {
                    IpAddr::V4(a) => v4_class(a),
                    IpAddr::V6(a) => v6_class(a),
                };
            }
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                HostClass::Loopback
            } else {
                HostClass::Public
            }
        }
    }
}

/// Whether regcache may follow a redirect (or a Bearer realm) from `upstream` to `target`:
/// http(s) only, and a loopback, private, link-local or special address only when the upstream
/// is itself on that kind of address, or `allow_private` is set.
pub fn check_redirect(upstream: &Url, target: &Url, allow_private: bool) -> Result<(), Refused> {
    if target.scheme() != "http" && target.scheme() != "https" {
        return Err(Refused::Scheme {
            scheme: target.scheme().to_owned(),
        });
    }
    let class = host_class(target);
    if class == HostClass::Public || allow_private || class == host_class(upstream) {
        return Ok(());
    }
    Err(Refused::Internal {
        host: target.host_str().unwrap_or("?").to_owned(),
        class,
    })
}

/// The redirect policy of the client for the upstream at `origin`: [`check_redirect`] at each
/// hop, at most [`MAX_REDIRECTS`] of them.
pub(super) fn policy(origin: Url, allow_private: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(Refused::TooMany);
        }
        match check_redirect(&origin, attempt.url(), allow_private) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).expect("test URL")
    }

    #[test]
    fn hosts_are_classified() {
        for (u, class) in [
            ("https://registry-1.docker.io/", HostClass::Public),
            ("http://8.8.8.8/", HostClass::Public),
            ("http://127.0.0.1:5000/", HostClass::Loopback),
            ("http://2130706433/", HostClass::Loopback),
            ("http://0x7f.1/", HostClass::Loopback),
            ("http://[::1]/", HostClass::Loopback),
            ("http://localhost/", HostClass::Loopback),
            ("http://a.localhost./", HostClass::Loopback),
            ("http://10.1.2.3/", HostClass::Private),
            ("http://172.16.0.1/", HostClass::Private),
            ("http://172.32.0.1/", HostClass::Public),
            ("http://192.168.1.1/", HostClass::Private),
            ("http://100.64.0.1/", HostClass::Private),
            ("http://[fd00::1]/", HostClass::Private),
            ("http://169.254.169.254/", HostClass::LinkLocal),
            ("http://[fe80::1]/", HostClass::LinkLocal),
            ("http://[::ffff:169.254.169.254]/", HostClass::LinkLocal),
            ("http://[64:ff9b::a9fe:a9fe]/", HostClass::LinkLocal),
            ("http://0.0.0.0/", HostClass::Special),
            ("http://[::]/", HostClass::Special),
            ("http://224.0.0.1/", HostClass::Special),
            ("http://255.255.255.255/", HostClass::Special),
            ("http://[::127.0.0.1]/", HostClass::Special),
            ("gopher://127.0.0.1/", HostClass::Loopback),
            ("gopher://[fe80::1]/", HostClass::LinkLocal),
        ] {
            assert_eq!(host_class(&url(u)), class, "{u}");
        }
    }

    #[test]
    fn redirects_stay_out_of_internal_networks() {
        let public = url("https://registry.example/");
        let local = url("http://127.0.0.1:5000/");
        let private = url("http://10.0.0.5:5000/");
        for target in [
            "http://127.0.0.1/x",
            "http://localhost:8080/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]/",
            "http://0.0.0.0:22/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            let e = check_redirect(&public, &url(target), false).expect_err(target);
            assert!(matches!(e, Refused::Internal { .. }), "{target}: {e:?}");
            assert!(e.to_string().contains("allow_private_redirects"), "{e}");
            assert!(
                check_redirect(&public, &url(target), true).is_ok(),
                "{target}"
            );
        }
        assert!(check_redirect(&public, &url("https://cdn.example/blob?sig=1"), false).is_ok());
        assert!(check_redirect(&local, &url("http://127.0.0.2:9000/"), false).is_ok());
        assert!(check_redirect(&local, &url("http://169.254.169.254/"), false).is_err());
        assert!(check_redirect(&local, &url("http://0.0.0.0:1/"), false).is_err());
        assert!(check_redirect(&private, &url("http://10.9.9.9/"), false).is_ok());
        assert!(check_redirect(&private, &url("http://127.0.0.1/"), false).is_err());
        for target in [
            "file:///etc/passwd",
            "ftp://registry.example/x",
            "gopher://x/",
        ] {
            let e = check_redirect(&public, &url(target), true).expect_err(target);
            assert!(e.to_string().contains("only http and https"), "{e}");
        }
    }
}

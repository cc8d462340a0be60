//! `[peers]`: the other regcache servers of a fleet, which fill from each other (docs/FLEET.md),
//! with their defaults and checks (URLs, one source of the shared token, the connect timeout).

use std::fmt;
use std::time::Duration;

use crate::config::files::{self, Read};
use crate::config::raw::{self, RawPeers};
use crate::config::units::parse_upstream_url;
use crate::config::Pending;

/// Default of `[peers] connect_timeout`.
pub const DEFAULT_PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

/// The fleet (`[peers]`): the same list on every server, itself included.
#[derive(Clone, PartialEq)]
pub struct PeersConfig {
    /// Base URLs of the servers of the fleet (`http(s)://host:port/`), in the order written.
    pub urls: Vec<reqwest::Url>,
    /// The shared secret peer requests carry (`x-regcache-peer-token`): read from `token_file`
    /// or `token_env` in the step that reads files ([`files`]).
    pub token: String,
    /// A peer that does not accept a connection (or answer a probe) within this is skipped.
    pub connect_timeout: Duration,
}

impl fmt::Debug for PeersConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeersConfig")
            .field(
                "urls",
                &self.urls.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            )
            .field("token", &"<hidden>")
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `[peers]`: each URL a registry root with a host (and a port, written or the scheme's), no two
/// alike; exactly one source of the token, left to `pending` (the token itself is read, and
/// checked to be non-empty and fit a header, with the other files).
pub(super) fn validate(
    text: &str,
    raw: RawPeers,
    pending: &mut Pending,
) -> Result<PeersConfig, String> {
    if raw.urls.is_empty() {
        return Err(
            "peers.urls is empty: list every server of the fleet, this one included".into(),
        );
    }
    let mut urls: Vec<reqwest::Url> = Vec::new();
    for u in &raw.urls {
        let line = raw::line(text, u);
        let url =
            parse_upstream_url(u.get_ref()).map_err(|e| format!("line {line}: peers.urls: {e}"))?;
        if url.port_or_known_default().is_none() {
            return Err(format!(
                "line {line}: peers.urls: {:?} has no port",
                u.get_ref()
            ));
        }
        if urls.contains(&url) {
            return Err(format!(
                "line {line}: peers.urls: {:?} is listed twice",
                u.get_ref()
            ));
        }
        urls.push(url);
    }
    match (raw.token_file, raw.token_env) {
        (Some(_), Some(_)) => return Err("peers: set one of token_file and token_env".into()),
        (None, None) => {
            return Err(
                "peers: a shared token is required (token_file or token_env): peers answer only \
                 requests that carry it"
                    .into(),
            )
        }
        (Some(path), None) => pending.reads.push(Read::PeerTokenFile { path }),
        (None, Some(var)) => {
            files::check_env_name("peers.token_env", &var)?;
            pending.reads.push(Read::PeerTokenEnv { var });
        }
    }
    let connect_timeout = raw
        .connect_timeout
        .map_or(DEFAULT_PEER_CONNECT_TIMEOUT, |d| d.0);
    if connect_timeout < Duration::from_millis(1) || connect_timeout > Duration::from_secs(60) {
        return Err("peers.connect_timeout must be from 1ms to 60s".into());
    }
    Ok(PeersConfig {
        urls,
        token: String::new(),
        connect_timeout,
    })
}

/// The token read from its file or variable, checked: non-empty, printable ASCII without spaces
/// (it travels in a header).
pub(super) fn check_token(what: &str, token: String) -> Result<String, String> {
    if token.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if !token.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "{what}: the token must be printable ASCII without spaces (it travels in a header)"
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, set_mode};

    #[test]
    fn peers_need_urls_with_a_port_and_exactly_one_token_source() {
        let dir = tempfile::tempdir().expect("temp dir");
        let token = dir.path().join("peer-token");
        std::fs::write(&token, "s3cr3t-fleet-token\n").expect("write token");
        set_mode(&token, 0o600);
        let urls = "urls = [\"http://10.0.0.1:5000\", \"https://cache-2.internal\"]\n";
        let base = format!("[peers]\n{urls}token_file = \"{}\"\n", token.display());
        let c = parse(&base).expect("minimal [peers]");
        let p = c.peers.as_ref().expect("peers set");
        assert_eq!(
            p.token, "s3cr3t-fleet-token",
            "the file's final newline is not the token's"
        );
        assert_eq!(p.connect_timeout, Duration::from_millis(250));
        assert_eq!(
            p.urls.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            ["http://10.0.0.1:5000/", "https://cache-2.internal/"]
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(
            !format!("{p:?}").contains("s3cr3t"),
            "the token never reaches logs"
        );
        assert!(parse("").expect("defaults").peers.is_none());
        let c = parse(&format!(
            "[peers]\n{urls}token_env = \"PATH\"\nconnect_timeout = \"1s\"\n"
        ))
        .expect("token from the environment");
        let p = c.peers.expect("peers set");
        assert_eq!(p.token, std::env::var("PATH").expect("PATH"));
        assert_eq!(p.connect_timeout, Duration::from_secs(1));

        set_mode(&token, 0o644);
        let c = parse(&base).expect("valid, with a warning");
        assert!(
            c.warnings.iter().any(|w| w.contains("peers.token_file")),
            "{:?}",
            c.warnings
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let missing = dir.path().join("missing");
        for (bad, want) in [
            (format!("[peers]\n{urls}"), "token is required".to_owned()),
            (
                format!(
                    "[peers]\n{urls}token_file = \"{}\"\ntoken_env = \"PATH\"\n",
                    token.display()
                ),
                "one of token_file and token_env".to_owned(),
            ),
            (
                format!("[peers]\n{urls}token_file = \"{}\"\n", missing.display()),
                format!("cannot read {}", missing.display()),
            ),
            (
                format!("[peers]\n{urls}token_file = \"{}\"\n", empty.display()),
                "is empty".to_owned(),
            ),
            (
                format!("[peers]\n{urls}token_env = \"REGCACHE_SURELY_UNSET_9\"\n"),
                "not set".to_owned(),
            ),
            (
                "[peers]\nurls = []\ntoken_env = \"PATH\"\n".to_owned(),
                "peers.urls is empty".to_owned(),
            ),
            (
                "[peers]\ntoken_env = \"PATH\"\nurls = [\n  \"http://a:1\",\n  \"ftp://b:2\",\n]\n"
                    .to_owned(),
                "line 5: peers.urls".to_owned(),
            ),
            (
                "[peers]\ntoken_env = \"PATH\"\nurls = [\"http://a:1/mirror\"]\n".to_owned(),
                "no path".to_owned(),
            ),
            (
                "[peers]\ntoken_env = \"PATH\"\nurls = [\"http://a:1\", \"http://a:1/\"]\n"
                    .to_owned(),
                "listed twice".to_owned(),
            ),
            (
                format!("{base}connect_timeout = \"2m\"\n"),
                "peers.connect_timeout".to_owned(),
            ),
            (
                format!("{base}url = \"http://x:1\"\n"),
                "unknown field `url`".to_owned(),
            ),
        ] {
            let e = parse(&bad).expect_err(&bad);
            assert!(e.contains(&want), "{bad}: {e}");
        }
    }
}

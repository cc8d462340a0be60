//! `[upstreams.NAME]` and `default_upstream`: the registries regcache mirrors, their defaults,
//! host names (Docker Hub's included), credentials and repository patterns.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use toml::Spanned;

use crate::config::access::RepoPattern;
use crate::config::files::{self, Read};
use crate::config::raw::{self, RawUpstream};
use crate::config::units::{parse_upstream_url, UpstreamUrl};
use crate::config::Pending;

/// Docker Hub's registry endpoint, the default upstream.
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";
/// Names under which clients refer to Docker Hub.
pub const DOCKER_HUB_HOSTS: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
/// Name of the default upstream when `default_upstream` is not set and there is not exactly one
/// `[upstreams.NAME]` table (a Docker Hub upstream of that name is added when none exists).
pub const DEFAULT_UPSTREAM_NAME: &str = "docker";

/// The longest `revalidate_budget`: the budget is meant to be short (clients such as docker and
/// containerd give a mirror 30 s in all), and a longer wait is what turning it off gives.
const MAX_REVALIDATE_BUDGET: Duration = Duration::from_secs(60);

/// Basic credentials for an upstream (also used to obtain Bearer tokens).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// One validated upstream registry.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: reqwest::Url,
    /// Host names clients use for this registry (`?ns=`, leading path segment).
    pub hosts: Vec<String>,
    /// Whether Docker Hub's `library/` rule applies to single-component names.
    pub docker_hub_names: bool,
    pub freshness: Duration,
    /// How long a request for a cached tag past `freshness` waits for the revalidation before
    /// it is served stale (the revalidation goes on in the background); `None`: off, it waits.
    pub revalidate_budget: Option<Duration>,
    pub credentials: Option<Credentials>,
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Consecutive failures after which the upstream is marked down.
    pub failure_threshold: u32,
    /// Longest wait between two background probes of a down upstream.
    pub probe_max_interval: Duration,
    /// Extra CA certificates (PEM) trusted for this upstream, besides the system's and the
    /// built-in roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Repositories this upstream may be asked for (empty: all), as glob patterns.
    pub allow_repos: Vec<RepoPattern>,
    /// Repositories never asked for (wins over `allow_repos`).
    pub deny_repos: Vec<RepoPattern>,
    /// Follow redirects (and token realms) to loopback, private or link-local addresses even
    /// when the upstream itself is not on such an address.
    pub allow_private_redirects: bool,
    /// Pulls of the upstream's quota (`ratelimit-remaining`) kept for misses: at or under it,
    /// tags past their freshness are served without revalidation until the window has passed.
    /// 0: off.
    pub quota_reserve: u64,
}

impl UpstreamConfig {
    /// The upstream `name` at `url` with every other key at its default: the one place the
    /// defaults of an `[upstreams.NAME]` table are written (`url` has none: a table must set it;
    /// the implicit Docker Hub upstream is at [`DOCKER_HUB_URL`]). Its host names are derived
    /// from the whole configuration when it is validated.
    pub fn new(name: String, url: reqwest::Url) -> UpstreamConfig {
        UpstreamConfig {
            name,
            url,
            hosts: Vec::new(),
            docker_hub_names: false,
            freshness: Duration::from_secs(60),
            revalidate_budget: Some(Duration::from_millis(250)),
            credentials: None,
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            failure_threshold: 3,
            probe_max_interval: Duration::from_secs(30),
            ca_file: None,
            allow_repos: Vec::new(),
            deny_repos: Vec::new(),
            allow_private_redirects: false,
            quota_reserve: 0,
        }
    }
}

/// The upstreams, in name order, and the index of the default one. Passwords from files and the
/// environment, and `ca_file`s, are left to `pending`.
pub(super) fn validate(
    mut raw_upstreams: BTreeMap<String, RawUpstream>,
    default_upstream: Option<&Spanned<String>>,
    url_override: Option<&reqwest::Url>,
    text: &str,
    pending: &mut Pending,
) -> Result<(Vec<UpstreamConfig>, usize), String> {
    let default_name = match default_upstream {
        Some(s) => {
            if !raw_upstreams.contains_key(s.get_ref()) {
                return Err(format!(
                    "line {}: default_upstream = {:?} names no [upstreams.{}] table",
                    raw::line(text, s),
                    s.get_ref(),
                    s.get_ref()
                ));
            }
            s.get_ref().clone()
        }
        None if raw_upstreams.len() == 1 => raw_upstreams
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| DEFAULT_UPSTREAM_NAME.into()),
        None => DEFAULT_UPSTREAM_NAME.to_owned(),
    };
    if !raw_upstreams.contains_key(&default_name) {
        let url = parse_upstream_url(DOCKER_HUB_URL)?;
        raw_upstreams.insert(
            default_name.clone(),
            RawUpstream::url_only(UpstreamUrl(url)),
        );
    }
    if let (Some(url), Some(u)) = (url_override, raw_upstreams.get_mut(&default_name)) {
        u.url = UpstreamUrl(url.clone());
    }
    // Docker Hub's names belong to the default upstream unless another claims them.
    let hub_claimed = raw_upstreams.values().any(|u| {
        u.hosts
            .iter()
            .any(|h| DOCKER_HUB_HOSTS.contains(&h.as_str()))
    });

    let mut upstreams = Vec::new();
    let mut default_index = 0;
    let mut seen_hosts: BTreeMap<String, String> = BTreeMap::new();
    for (name, raw) in raw_upstreams {
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(format!(
                "[upstreams.{name}]: upstream names use letters, digits, '-' and '_'"
            ));
        }
        let is_default = name == default_name;
        let hosts = hosts(&name, &raw, is_default && !hub_claimed, &mut seen_hosts)?;
        if is_default {
            default_index = upstreams.len();
        }
        upstreams.push(one(name, raw, hosts, text, pending)?);
    }
    for u in &upstreams {
        for (key, d) in [
            ("connect_timeout", u.connect_timeout),
            ("header_timeout", u.header_timeout),
            ("idle_timeout", u.idle_timeout),
            ("probe_max_interval", u.probe_max_interval),
        ] {
            if d.is_zero() {
                return Err(format!("upstreams.{}.{key} must be more than 0", u.name));
            }
        }
        if u.revalidate_budget
            .is_some_and(|b| b > MAX_REVALIDATE_BUDGET)
        {
            return Err(format!(
                "upstreams.{}.revalidate_budget must be at most {}s, or \"off\"",
                u.name,
                MAX_REVALIDATE_BUDGET.as_secs()
            ));
        }
        if u.failure_threshold == 0 {
            return Err(format!(
                "upstreams.{}.failure_threshold must be at least 1",
                u.name
            ));
        }
    }
    Ok((upstreams, default_index))
}

/// The host names of upstream `name`: those configured, then its URL's `host[:port]`, then
/// Docker Hub's when it serves them; each served by one upstream only (`seen` maps them).
fn hosts(
    name: &str,
    raw: &RawUpstream,
    docker_hub: bool,
    seen: &mut BTreeMap<String, String>,
) -> Result<Vec<String>, String> {
    let mut hosts: Vec<String> = raw.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
    if let Some(h) = raw.url.0.host_str() {
        let with_port = match raw.url.0.port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_owned(),
        };
        hosts.push(with_port.to_ascii_lowercase());
    }
    if docker_hub {
        hosts.extend(DOCKER_HUB_HOSTS.iter().map(|h| h.to_string()));
    }
    // Configured hosts first (the first names the upstream in the catalog), no repeats.
    let mut unique = HashSet::new();
    hosts.retain(|h| unique.insert(h.clone()));
    for h in &hosts {
        if h.is_empty() || h.contains('/') || h.contains(char::is_whitespace) {
            return Err(format!("upstreams.{name}.hosts: {h:?} is not a host name"));
        }
        if let Some(other) = seen.insert(h.clone(), name.to_owned()) {
            return Err(format!(
                "upstreams.{name}.hosts: host {h:?} is already served by [upstreams.{other}]"
            ));
        }
    }
    Ok(hosts)
}

/// One upstream's settings (its host names already derived).
fn one(
    name: String,
    raw: RawUpstream,
    hosts: Vec<String>,
    text: &str,
    pending: &mut Pending,
) -> Result<UpstreamConfig, String> {
    let sources = [
        raw.password.is_some(),
        raw.password_file.is_some(),
        raw.password_env.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if sources > 1 {
        return Err(format!(
            "upstreams.{name}: set one of password, password_file and password_env"
        ));
    }
    if raw.username.is_some() != (sources == 1) {
        return Err(format!(
            "upstreams.{name}: username needs one of password, password_file or \
             password_env, and they need a username"
        ));
    }
    let mut credentials = None;
    if let Some(username) = raw.username {
        if let Some(password) = raw.password {
            pending.inline_secret = true;
            credentials = Some(Credentials { username, password });
        } else if let Some(path) = raw.password_file {
            pending.reads.push(Read::PasswordFile {
                upstream: name.clone(),
                username,
                path,
            });
        } else if let Some(var) = raw.password_env {
            files::check_env_name(&format!("upstreams.{name}.password_env"), &var)?;
            pending.reads.push(Read::PasswordEnv {
                upstream: name.clone(),
                username,
                var,
            });
        }
    }
    let allow_repos = repo_patterns(
        text,
        &format!("upstreams.{name}.allow_repos"),
        &raw.allow_repos,
    )?;
    let deny_repos = repo_patterns(
        text,
        &format!("upstreams.{name}.deny_repos"),
        &raw.deny_repos,
    )?;
    if let Some(path) = &raw.ca_file {
        pending.reads.push(Read::CaFile {
            upstream: name.clone(),
            path: path.clone(),
        });
    }
    let docker_hub_names = hosts.iter().any(|h| h == "docker.io");
    let d = UpstreamConfig::new(name, raw.url.0);
    Ok(UpstreamConfig {
        hosts,
        docker_hub_names,
        freshness: raw.freshness.map_or(d.freshness, |v| v.0),
        revalidate_budget: raw.revalidate_budget.map_or(d.revalidate_budget, |v| v.0),
        credentials,
        connect_timeout: raw.connect_timeout.map_or(d.connect_timeout, |v| v.0),
        header_timeout: raw.header_timeout.map_or(d.header_timeout, |v| v.0),
        idle_timeout: raw.idle_timeout.map_or(d.idle_timeout, |v| v.0),
        failure_threshold: raw.failure_threshold.unwrap_or(d.failure_threshold),
        probe_max_interval: raw.probe_max_interval.map_or(d.probe_max_interval, |v| v.0),
        ca_file: raw.ca_file,
        allow_repos,
        deny_repos,
        allow_private_redirects: raw
            .allow_private_redirects
            .unwrap_or(d.allow_private_redirects),
        quota_reserve: raw.quota_reserve.unwrap_or(d.quota_reserve),
        ..d
    })
}

/// Parses a list of repository patterns, naming the key and line of a bad one.
fn repo_patterns(
    text: &str,
    key: &str,
    list: &[Spanned<String>],
) -> Result<Vec<RepoPattern>, String> {
    list.iter()
        .map(|p| {
            p.get_ref()
                .parse()
                .map_err(|e| format!("line {}: {key}: {e}", raw::line(text, p)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{parse, set_mode};
    use crate::config::{Config, Overrides};

    #[test]
    fn upstream_flag_replaces_default_upstream_url() {
        let o = Overrides {
            upstream: Some(parse_upstream_url("http://127.0.0.1:5001").expect("url")),
            ..Default::default()
        };
        let c = Config::parse("", "t", &o).expect("valid");
        assert_eq!(c.default_upstream().url.as_str(), "http://127.0.0.1:5001/");
        assert!(c.default_upstream().hosts.iter().any(|h| h == "docker.io"));
    }

    #[test]
    fn several_upstreams_with_hosts() {
        let c = parse(
            "default_upstream = \"hub\"\n\
             [upstreams.hub]\nurl = \"http://127.0.0.1:1\"\nfreshness = \"5m\"\n\
             [upstreams.ghcr]\nurl = \"https://ghcr.io\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .expect("valid");
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.default_upstream().name, "hub");
        assert_eq!(c.default_upstream().freshness, Duration::from_secs(300));
        let ghcr = c.upstreams.iter().find(|u| u.name == "ghcr").expect("ghcr");
        assert_eq!(ghcr.hosts, vec!["ghcr.io".to_string()]);
        assert!(!ghcr.docker_hub_names);
        assert!(format!("{:?}", ghcr.credentials).contains("redacted"));
        let e = parse(
            "[upstreams.a]\nurl = \"https://a.io\"\nhosts = [\"x.io\"]\n\
             [upstreams.b]\nurl = \"https://x.io\"\n",
        )
        .expect_err("duplicate host");
        assert!(e.contains("x.io"), "{e}");
    }

    #[test]
    fn passwords_come_from_one_of_three_sources() {
        let base = "[upstreams.a]\nurl = \"https://a.io\"\nusername = \"u\"\n";
        let c = parse(&format!("{base}password_env = \"PATH\"\n")).expect("env");
        let creds = c.upstreams[0].credentials.as_ref().expect("credentials");
        assert_eq!(Some(creds.password.clone()), std::env::var("PATH").ok());
        assert!(!c.inline_password);
        let e = parse(&format!(
            "{base}password_env = \"REGCACHE_TEST_SURELY_UNSET_1234\"\n"
        ))
        .expect_err("unset");
        assert!(
            e.contains("upstreams.a.password_env") && e.contains("not set"),
            "{e}"
        );
        let e = parse(&format!("{base}password_env = \"A-B\"\n")).expect_err("bad name");
        assert!(e.contains("password_env"), "{e}");
        let e = parse(&format!(
            "{base}password = \"x\"\npassword_env = \"PATH\"\n"
        ))
        .expect_err("two sources");
        assert!(
            e.contains("one of password, password_file and password_env"),
            "{e}"
        );
        let e = parse("[upstreams.a]\nurl = \"https://a.io\"\npassword_env = \"PATH\"\n")
            .expect_err("no username");
        assert!(e.contains("username"), "{e}");

        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").expect("write");
        set_mode(&pw, 0o600);
        let text = format!("{base}password_file = {:?}\n", pw.display().to_string());
        let c = parse(&text).expect("file");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        set_mode(&pw, 0o644);
        let c = parse(&text).expect("file");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("password_file") && w.contains("can read it")),
            "{:?}",
            c.warnings
        );
        assert!(!c.warnings.iter().any(|w| w.contains("s3cret")));
    }

    /// `revalidate_budget` takes the duration forms of the other duration keys, `"off"` and `0`
    /// turn it off, and it is at most 60 s; it defaults to 250 ms.
    #[test]
    fn revalidate_budget_takes_durations_off_and_zero_up_to_a_minute() {
        let budget = |v: &str| {
            parse(&format!(
                "[upstreams.a]\nurl = \"https://a.io\"\nrevalidate_budget = {v}\n"
            ))
            .map(|c| c.upstreams[0].revalidate_budget)
        };
        let ms = |n| Ok(Some(Duration::from_millis(n)));
        assert_eq!(
            parse("").expect("defaults").upstreams[0].revalidate_budget,
            Some(Duration::from_millis(250))
        );
        for (v, want) in [
            ("\"300ms\"", ms(300)),
            ("\"1.5s\"", ms(1500)),
            ("\"0.25\"", ms(250)),
            ("2", ms(2000)),
            ("\"60s\"", ms(60_000)),
            ("\"1m\"", ms(60_000)),
            ("\"off\"", Ok(None)),
            ("\" off \"", Ok(None)),
            ("0", Ok(None)),
            ("\"0ms\"", Ok(None)),
        ] {
            assert_eq!(budget(v), want, "revalidate_budget = {v}");
        }
        for (v, says) in [
            ("\"61s\"", "at most 60s"),
            ("61", "at most 60s"),
            ("\"2h\"", "at most 60s"),
            ("\"soon\"", "\"off\""),
            ("\"OFF\"", "\"off\""),
            ("\"on\"", "\"off\""),
            ("-1", "negative"),
            ("true", "a duration such as"),
            ("1.5", "a duration such as"),
        ] {
            let e = budget(v).expect_err(v);
            assert!(
                e.contains("revalidate_budget") && e.contains(says),
                "revalidate_budget = {v}: {e}"
            );
        }
    }

    #[test]
    fn repo_patterns_and_redirect_opt_out() {
        let c = parse(
            "[upstreams.a]\nurl = \"https://a.io\"\nallow_repos = [\"library/*\", \"org/**\"]\n\
             deny_repos = [\"org/secret/**\"]\nallow_private_redirects = true\n",
        )
        .expect("valid");
        let u = &c.upstreams[0];
        assert_eq!(u.allow_repos.len(), 2);
        assert_eq!(u.deny_repos.len(), 1);
        assert!(u.allow_private_redirects);
        assert!(!parse("").expect("defaults").upstreams[0].allow_private_redirects);
        let e = parse("[upstreams.a]\nurl = \"https://a.io\"\nallow_repos = [\"Library/*\"]\n")
            .expect_err("uppercase");
        assert!(
            e.contains("line 3") && e.contains("upstreams.a.allow_repos"),
            "{e}"
        );
    }
}

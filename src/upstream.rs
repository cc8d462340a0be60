//! The upstream registry client: requests, Bearer/Basic auth, token cache and bounded waits.
//!
//! One [`Upstream`] per configured registry. Every request has a connect timeout (in the client),
//! a time limit for the response headers, and callers read bodies with [`Upstream::next_chunk`],
//! which bounds the idle time between chunks. Redirects are followed by reqwest, which drops
//! `Authorization` when a redirect leaves the host; [`check_redirect`] decides which redirects
//! (and Bearer token realms) may be followed at all: at most [`MAX_REDIRECTS`], http(s) only, and
//! not to loopback, private or link-local addresses unless the upstream is itself on one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use crate::config::{Credentials, UpstreamConfig};
use crate::media::Accept;
use crate::metrics::Metrics;
use crate::reference::{Digest, RepoName};

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 10;

/// Deepest nesting of JSON arrays and objects accepted from an upstream (manifests, listings,
/// token answers). serde_json itself stops at 128; this refuses such documents before parsing.
pub const MAX_JSON_DEPTH: usize = 64;

/// The deepest nesting of arrays and objects in `bytes` read as JSON (brackets inside strings do
/// not count). Linear, without recursion, whatever the input.
pub fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

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

fn v4_class(a: std::net::Ipv4Addr) -> HostClass {
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

fn v6_class(a: std::net::Ipv6Addr) -> HostClass {
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
        v4_class(std::net::Ipv4Addr::from((bits & 0xffff_ffff) as u32))
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
pub fn host_class(url: &reqwest::Url) -> HostClass {
    let Some(host) = url.host_str() else {
        return HostClass::Special;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => v4_class(a),
        Ok(std::net::IpAddr::V6(a)) => v6_class(a),
        Err(_) => {
            let name = bare.trim_end_matches('.').to_ascii_lowercase();
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
pub fn check_redirect(
    upstream: &reqwest::Url,
    target: &reqwest::Url,
    allow_private: bool,
) -> Result<(), String> {
    if target.scheme() != "http" && target.scheme() != "https" {
        return Err(format!(
            "refused to follow the upstream to a {}: URL: only http and https are followed",
            target.scheme()
        ));
    }
    let class = host_class(target);
    if class == HostClass::Public || allow_private || class == host_class(upstream) {
        return Ok(());
    }
    Err(format!(
        "refused to follow the upstream to {}, a {} address, while the upstream itself is not on \
         one (set allow_private_redirects = true for this upstream to allow it)",
        target.host_str().unwrap_or("?"),
        class.describe()
    ))
}

/// An upstream failure, keeping what a caller needs to answer its client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Refused, DNS failure, TLS failure, reset: the upstream could not be reached.
    #[error("upstream {upstream} unreachable: {detail}")]
    Unreachable { upstream: String, detail: String },
    /// Connected, but no headers (or no next body chunk) in time.
    #[error("upstream {upstream} timed out waiting for {what}")]
    Timeout {
        upstream: String,
        what: &'static str,
    },
    /// The upstream answered with a non-success status.
    #[error("upstream {upstream} answered {status} for {path}")]
    Status {
        upstream: String,
        status: u16,
        path: String,
        retry_after: Option<String>,
    },
    /// The upstream's answer breaks the protocol (bad digest header, oversized manifest, …).
    #[error("upstream {upstream} sent an invalid response: {detail}")]
    Invalid { upstream: String, detail: String },
    /// The upstream asked for a Bearer token and its token service gave none: it did not answer
    /// (in time), answered a status other than `401`/`403`, or answered without a usable token.
    /// The registry could not be asked at all, so this is an unavailable upstream, never a "not
    /// found".
    #[error("upstream {upstream}: its token service gave no token: {detail}")]
    Token { upstream: String, detail: String },
}

impl UpstreamError {
    /// True when the upstream could not give an answer at all (as opposed to "not found").
    pub fn is_unavailable(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. } => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Invalid { .. } => false,
            UpstreamError::Token { .. } => true,
        }
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What went wrong, without the upstream's name (for wrapping into another error).
    fn cause(&self) -> String {
        match self {
            UpstreamError::Unreachable { detail, .. }
            | UpstreamError::Invalid { detail, .. }
            | UpstreamError::Token { detail, .. } => detail.clone(),
            UpstreamError::Timeout { what, .. } => format!("timed out waiting for {what}"),
            UpstreamError::Status { status, path, .. } => format!("answered {status} for {path}"),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable { .. } => "unreachable",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Status { .. } => "status",
            UpstreamError::Invalid { .. } => "invalid",
            UpstreamError::Token { .. } => "token",
        }
    }
}

/// Circuit breaker state of one upstream.
#[derive(Debug, Default)]
struct Breaker {
    /// Consecutive failures while up.
    failures: u32,
    /// Set while the upstream is marked down.
    down_since: Option<Instant>,
}

/// What `/readyz` reports about an upstream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub url: String,
    pub up: bool,
    pub down_for_seconds: Option<u64>,
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (quoted values may hold commas).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), val.trim().to_owned());
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

struct CachedToken {
    token: String,
    expires: Instant,
}

/// What a manifest `HEAD` told us.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
    pub size: Option<u64>,
}

/// A fetched manifest, not yet verified.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub header_digest: Option<Digest>,
}

/// A client for one upstream registry.
pub struct Upstream {
    pub config: UpstreamConfig,
    client: reqwest::Client,
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// Set once the upstream asked for Basic auth: send it up front from then on.
    basic: std::sync::atomic::AtomicBool,
    breaker: Mutex<Breaker>,
    metrics: Arc<Metrics>,
    me: Weak<Upstream>,
}

fn classify(upstream: &str, e: reqwest::Error) -> UpstreamError {
    if e.is_redirect() {
        // Refused by the redirect policy: the upstream misbehaved, it is not down. The URL is
        // left out: a redirect target often carries a signed query.
        let e = e.without_url();
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        return UpstreamError::Invalid {
            upstream: upstream.to_owned(),
            detail,
        };
    }
    if e.is_timeout() {
        UpstreamError::Timeout {
            upstream: upstream.to_owned(),
            what: "the connection",
        }
    } else {
        // Show the root cause (connection refused, DNS, TLS) rather than reqwest's wrapper.
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        UpstreamError::Unreachable {
            upstream: upstream.to_owned(),
            detail,
        }
    }
}

impl Upstream {
    pub fn new(
        config: UpstreamConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Upstream>, UpstreamError> {
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| UpstreamError::Invalid {
                upstream: config.name.clone(),
                detail: format!("cannot read ca_file {}: {e}", path.display()),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                UpstreamError::Invalid {
                    upstream: config.name.clone(),
                    detail: format!("invalid PEM in ca_file {}: {e}", path.display()),
                }
            })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let (origin, allow_private) = (config.url.clone(), config.allow_private_redirects);
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                let e = format!("more than {MAX_REDIRECTS} redirects");
                return attempt.error(e);
            }
            match check_redirect(&origin, attempt.url(), allow_private) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        });
        let client = builder
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("regcache/", env!("CARGO_PKG_VERSION")))
            .redirect(policy)
            .build()
            .map_err(|e| UpstreamError::Invalid {
                upstream: config.name.clone(),
                detail: format!("cannot build the HTTP client: {e}"),
            })?;
        metrics
            .upstream_up
            .get_or_create(&Metrics::upstream(&config.name))
            .set(1);
        Ok(Arc::new_cyclic(|me| Upstream {
            config,
            client,
            tokens: Mutex::new(HashMap::new()),
            basic: std::sync::atomic::AtomicBool::new(false),
            breaker: Mutex::new(Breaker::default()),
            metrics,
            me: me.clone(),
        }))
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the circuit is closed (the upstream is believed reachable).
    pub fn is_up(&self) -> bool {
        self.breaker().down_since.is_none()
    }

    pub fn status(&self) -> UpstreamStatus {
        let down = self.breaker().down_since;
        UpstreamStatus {
            name: self.name().to_owned(),
            url: self.config.url.to_string(),
            up: down.is_none(),
            down_for_seconds: down.map(|d| d.elapsed().as_secs()),
        }
    }

    /// Fails at once while the upstream is marked down: clients are not made to wait for it.
    fn check_circuit(&self) -> Result<(), UpstreamError> {
        match self.breaker().down_since {
            None => Ok(()),
            Some(since) => Err(UpstreamError::Unreachable {
                upstream: self.name().to_owned(),
                detail: format!(
                    "marked down {}s ago after repeated failures; probing it in the background",
                    since.elapsed().as_secs()
                ),
            }),
        }
    }

    /// Counts a failure; after `failure_threshold` in a row the upstream is marked down and one
    /// background probe starts.
    pub fn record_failure(&self, e: &UpstreamError) {
        self.metrics
            .upstream_errors
            .get_or_create(&vec![
                ("upstream", self.name().to_owned()),
                ("kind", e.kind().to_owned()),
            ])
            .inc();
        if !e.is_unavailable() {
            return;
        }
        let newly_down = {
            let mut b = self.breaker();
            b.failures += 1;
            if b.down_since.is_none() && b.failures >= self.config.failure_threshold {
                b.down_since = Some(Instant::now());
                true
            } else {
                false
            }
        };
        if newly_down {
            tracing::warn!(upstream = self.name(), error = %e, "upstream marked down; serving from the cache and probing in the background");
            self.metrics
                .upstream_up
                .get_or_create(&Metrics::upstream(self.name()))
                .set(0);
            self.metrics
                .upstream_state_changes
                .get_or_create(&vec![
                    ("upstream", self.name().to_owned()),
                    ("state", "down".to_owned()),
                ])
                .inc();
            if let Some(me) = self.me.upgrade() {
                let weak = Arc::downgrade(&me);
                drop(me);
                tokio::spawn(probe_until_up(weak));
            }
        }
    }

    fn record_success(&self) {
        let was_down = {
            let mut b = self.breaker();
            b.failures = 0;
            b.down_since.take()
        };
        if let Some(since) = was_down {
            tracing::info!(
                upstream = self.name(),
                down_s = since.elapsed().as_secs(),
                "upstream is back up"
            );
            self.metrics
                .upstream_up
                .get_or_create(&Metrics::upstream(self.name()))
                .set(1);
            self.metrics
                .upstream_state_changes
                .get_or_create(&vec![
                    ("upstream", self.name().to_owned()),
                    ("state", "up".to_owned()),
                ])
                .inc();
        }
    }

    /// One probe: `GET /v2/`. Any answer that is not 5xx or 429 means the upstream is back,
    /// except a `401` with a Bearer challenge: no request gets through without a token, so the
    /// challenge's token service is asked too, and must give a token or refuse the credentials
    /// (any failure that [`UpstreamError::is_unavailable`] counts keeps the circuit open).
    async fn probe(&self) -> bool {
        let req = self.client.get(self.url("/v2/"));
        let total = self.config.connect_timeout + self.config.header_timeout;
        let resp = match tokio::time::timeout(total, req.send()).await {
            Ok(Ok(resp)) => resp,
            _ => return false,
        };
        let s = resp.status();
        if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS {
            return false;
        }
        let bearer = match challenge(&resp) {
            Some(ch) if s == StatusCode::UNAUTHORIZED && ch.scheme == "bearer" => ch,
            _ => return true,
        };
        match tokio::time::timeout(total, self.request_token(&bearer, None)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => !e.is_unavailable(),
            Err(_) => false,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.url.as_str().trim_end_matches('/'), path)
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        match tokens.get(scope) {
            Some(t) if t.expires > Instant::now() => Some(t.token.clone()),
            Some(_) => {
                tokens.remove(scope);
                None
            }
            None => None,
        }
    }

    fn with_basic(
        &self,
        req: reqwest::RequestBuilder,
        creds: &Credentials,
    ) -> reqwest::RequestBuilder {
        req.basic_auth(&creds.username, Some(&creds.password))
    }

    /// Gets a Bearer token for `scope` from the challenge's realm, and caches it.
    async fn fetch_token(&self, ch: &Challenge, scope: &str) -> Result<String, UpstreamError> {
        let (token, expires_in) = self.request_token(ch, Some(scope)).await?;
        // The spec's default lifetime is 60 s; renew a little early.
        let ttl = expires_in.unwrap_or(60).max(10);
        let expires = Instant::now() + Duration::from_secs(ttl - ttl.min(10).min(ttl / 2));
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                scope.to_owned(),
                CachedToken {
                    token: token.clone(),
                    expires,
                },
            );
        Ok(token)
    }

    /// Asks the challenge's realm for a token: for the challenge's own scope, else `scope` (none
    /// when probing `/v2/`). Returns the token and its `expires_in`. A realm regcache refuses to
    /// call is `Invalid`; the token service refusing the credentials (`401`, `403`) is a `401`;
    /// any other failure of the token service is [`UpstreamError::Token`]. Nothing is counted
    /// here: the caller counts the failure once.
    async fn request_token(
        &self,
        ch: &Challenge,
        scope: Option<&str>,
    ) -> Result<(String, Option<u64>), UpstreamError> {
        let name = self.name();
        let realm = ch
            .params
            .get("realm")
            .ok_or_else(|| UpstreamError::Invalid {
                upstream: name.to_owned(),
                detail: "Bearer challenge without realm".into(),
            })?;
        let mut url = reqwest::Url::parse(realm).map_err(|e| UpstreamError::Invalid {
            upstream: name.to_owned(),
            detail: format!("Bearer realm {realm:?} is not a URL: {e}"),
        })?;
        // The realm is chosen by the upstream: the same rule as redirects, so that a hostile
        // upstream cannot make regcache (with its credentials) call an internal address.
        if let Err(e) = check_redirect(&self.config.url, &url, self.config.allow_private_redirects)
        {
            return Err(UpstreamError::Invalid {
                upstream: name.to_owned(),
                detail: format!("Bearer realm: {e}"),
            });
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = ch.params.get("service") {
                q.append_pair("service", service);
            }
            if let Some(scope) = ch.params.get("scope").map(String::as_str).or(scope) {
                q.append_pair("scope", scope);
            }
        }
        let failed = |detail: String| UpstreamError::Token {
            upstream: name.to_owned(),
            detail,
        };
        let mut req = self.client.get(url);
        if let Some(c) = &self.config.credentials {
            req = self.with_basic(req, c);
        }
        let resp = match tokio::time::timeout(self.config.header_timeout, req.send()).await {
            Err(_) => {
                let waited = self.config.header_timeout;
                return Err(failed(format!("no answer within {waited:?}")));
            }
            Ok(Err(e)) => return Err(failed(classify(name, e).cause())),
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            // An answer about regcache's credentials, not a failure of the service.
            return Err(UpstreamError::Status {
                upstream: name.to_owned(),
                status: 401,
                path: "token realm".into(),
                retry_after: None,
            });
        }
        if !status.is_success() {
            return Err(failed(format!("it answered {status}")));
        }
        let body = self
            .collect_body(resp, 1 << 20, "token response")
            .await
            .map_err(|e| failed(e.cause()))?;
        let depth = json_depth(&body);
        if depth > MAX_JSON_DEPTH {
            return Err(failed(format!(
                "its answer nests JSON {depth} levels deep (the limit is {MAX_JSON_DEPTH})"
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| failed(format!("its answer is not JSON: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| failed("its answer holds no token".into()))?;
        Ok((token, t.expires_in))
    }

    /// Sends a request for `path` (starting with `/v2/`) with auth; returns a 2xx response or an
    /// error carrying the status.
    pub async fn send(
        &self,
        method: Method,
        repo: Option<&RepoName>,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        self.check_circuit()?;
        let result = self.send_inner(method, repo, path, headers).await;
        match &result {
            Ok(_) => self.record_success(),
            Err(e) => {
                if !e.is_unavailable() {
                    // The upstream answered (404, 401, …): it is up.
                    self.record_success();
                }
                self.record_failure(e);
            }
        }
        result
    }

    async fn send_inner(
        &self,
        method: Method,
        repo: Option<&RepoName>,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        let name = self.name();
        let scope = repo
            .map(|r| format!("repository:{r}:pull"))
            .unwrap_or_default();
        let mut refreshed = false;
        loop {
            let mut req = self
                .client
                .request(method.clone(), self.url(path))
                .headers(headers.clone());
            if let Some(tok) = self.cached_token(&scope) {
                req = req.bearer_auth(tok);
            } else if let (true, Some(c)) = (
                self.basic.load(std::sync::atomic::Ordering::Relaxed),
                &self.config.credentials,
            ) {
                req = self.with_basic(req, c);
            }
            let resp = tokio::time::timeout(self.config.header_timeout, req.send())
                .await
                .map_err(|_| UpstreamError::Timeout {
                    upstream: name.to_owned(),
                    what: "response headers",
                })?
                .map_err(|e| classify(name, e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                refreshed = true;
                match challenge(&resp) {
                    Some(ch) if ch.scheme == "bearer" => {
                        self.tokens
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&scope);
                        self.fetch_token(&ch, &scope).await?;
                        continue;
                    }
                    Some(ch) if ch.scheme == "basic" && self.config.credentials.is_some() => {
                        self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    _ => {}
                }
            }
            if status.is_success() {
                return Ok(resp);
            }
            if status.is_redirection() {
                // A redirect reqwest did not follow (a Location that is not an http(s) URL): the
                // upstream misbehaves, it is not down. Only the target's scheme and host are
                // named: a redirect often carries a signed query.
                let target = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| reqwest::Url::parse(l).ok())
                    .map_or_else(
                        || "an unusable Location".to_owned(),
                        |u| format!("{}://{}", u.scheme(), u.host_str().unwrap_or("")),
                    );
                return Err(UpstreamError::Invalid {
                    upstream: name.to_owned(),
                    detail: format!(
                        "refused to follow the upstream's redirect ({status}) to {target}: only \
                         http and https are followed"
                    ),
                });
            }
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Err(UpstreamError::Status {
                upstream: name.to_owned(),
                status: status.as_u16(),
                path: path.to_owned(),
                retry_after,
            });
        }
    }

    /// Reads the next body chunk, bounded by the idle timeout.
    pub async fn next_chunk(&self, resp: &mut Response) -> Result<Option<Bytes>, UpstreamError> {
        let r = self.chunk_in_time(resp).await;
        if let Err(e) = &r {
            self.record_failure(e);
        }
        r
    }

    /// [`Upstream::next_chunk`] without counting a failure.
    async fn chunk_in_time(&self, resp: &mut Response) -> Result<Option<Bytes>, UpstreamError> {
        match tokio::time::timeout(self.config.idle_timeout, resp.chunk()).await {
            Err(_) => Err(UpstreamError::Timeout {
                upstream: self.name().to_owned(),
                what: "the next body chunk",
            }),
            Ok(r) => r.map_err(|e| classify(self.name(), e)),
        }
    }

    /// Reads a whole (small) body, refusing more than `max` bytes.
    pub async fn read_body(
        &self,
        resp: Response,
        max: u64,
        what: &str,
    ) -> Result<Bytes, UpstreamError> {
        let r = self.collect_body(resp, max, what).await;
        if let Err(e) = &r {
            self.record_failure(e);
        }
        r
    }

    /// [`Upstream::read_body`] without counting a failure.
    async fn collect_body(
        &self,
        mut resp: Response,
        max: u64,
        what: &str,
    ) -> Result<Bytes, UpstreamError> {
        let too_big = || UpstreamError::Invalid {
            upstream: self.name().to_owned(),
            detail: format!("{what} is larger than {max} bytes"),
        };
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(too_big());
        }
        let mut buf = Vec::new();
        while let Some(chunk) = self.chunk_in_time(&mut resp).await? {
            if buf.len() as u64 + chunk.len() as u64 > max {
                return Err(too_big());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    }

    /// Refuses a JSON document nested deeper than [`MAX_JSON_DEPTH`] (counted as an upstream
    /// error in the metrics).
    fn check_depth(&self, body: &[u8], what: &str) -> Result<(), UpstreamError> {
        let depth = json_depth(body);
        if depth <= MAX_JSON_DEPTH {
            return Ok(());
        }
        let e = UpstreamError::Invalid {
            upstream: self.name().to_owned(),
            detail: format!(
                "{what} nests JSON {depth} levels deep (the limit is {MAX_JSON_DEPTH})"
            ),
        };
        self.record_failure(&e);
        Err(e)
    }

    /// Asks for the manifest types `accept` names (none: no `Accept`).
    fn manifest_headers(accept: Accept) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = accept
            .header_value()
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            h.insert(ACCEPT, v);
        }
        h
    }

    fn digest_header(&self, resp: &Response) -> Result<Option<Digest>, UpstreamError> {
        match resp.headers().get("docker-content-digest") {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .map(Some)
                .ok_or_else(|| UpstreamError::Invalid {
                    upstream: self.name().to_owned(),
                    detail: format!("malformed Docker-Content-Digest {v:?}"),
                }),
        }
    }

    /// `HEAD /v2/<repo>/manifests/<reference>`, for a client accepting `accept`.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        accept: Accept,
    ) -> Result<ManifestHead, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(
                Method::HEAD,
                Some(repo),
                &path,
                Self::manifest_headers(accept),
            )
            .await?;
        Ok(ManifestHead {
            digest: self.digest_header(&resp)?,
            media_type: content_type(&resp),
            size: header_length(&resp),
        })
    }

    /// `GET /v2/<repo>/manifests/<reference>` for a client accepting `accept`, at most `max` bytes.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        max: u64,
        accept: Accept,
    ) -> Result<FetchedManifest, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(
                Method::GET,
                Some(repo),
                &path,
                Self::manifest_headers(accept),
            )
            .await?;
        let header_digest = self.digest_header(&resp)?;
        let media_type = content_type(&resp);
        let bytes = self.read_body(resp, max, "manifest").await?;
        self.check_depth(&bytes, "manifest")?;
        let media_type = media_type
            .or_else(|| media_type_from_body(&bytes))
            .ok_or_else(|| UpstreamError::Invalid {
                upstream: self.name().to_owned(),
                detail: "manifest without a media type".into(),
            })?;
        Ok(FetchedManifest {
            bytes,
            media_type,
            header_digest,
        })
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`: the size if the upstream has it for `repo`.
    pub async fn head_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{d}");
        let resp = self
            .send(Method::HEAD, Some(repo), &path, HeaderMap::new())
            .await?;
        Ok(header_length(&resp))
    }

    /// `GET /v2/<repo>/blobs/<digest>`, from byte `from` when resuming a blob of `total` bytes
    /// (when known). A resumed read must be a `206` whose `Content-Range` starts at `from` (and
    /// names `total`, if the server states one): any other answer would put bytes in the wrong
    /// place.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        from: u64,
        total: Option<u64>,
    ) -> Result<Response, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/{d}");
        let mut h = HeaderMap::new();
        if from > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={from}-")) {
                h.insert(reqwest::header::RANGE, v);
            }
        }
        let resp = self.send(Method::GET, Some(repo), &path, h).await?;
        if from == 0 {
            return Ok(resp);
        }
        let range = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .map(|v| v.to_str().unwrap_or("(not text)"));
        let checked = if resp.status() == StatusCode::PARTIAL_CONTENT {
            check_content_range(range, from, total)
        } else {
            Err(format!("got status {}", resp.status()))
        };
        if let Err(detail) = checked {
            let e = UpstreamError::Invalid {
                upstream: self.name().to_owned(),
                detail: format!("asked for bytes from {from}: {detail}"),
            };
            self.record_failure(&e);
            return Err(e);
        }
        Ok(resp)
    }

    /// `GET` of a small JSON document (tags list, referrers), with its `Link` header.
    pub async fn get_json(
        &self,
        repo: &RepoName,
        path_and_query: &str,
    ) -> Result<(Bytes, Option<String>), UpstreamError> {
        let resp = self
            .send(Method::GET, Some(repo), path_and_query, HeaderMap::new())
            .await?;
        let link = resp
            .headers()
            .get(reqwest::header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = self.read_body(resp, 16 << 20, "listing").await?;
        self.check_depth(&body, "listing")?;
        Ok((body, link))
    }
}

/// Checks the `Content-Range` of a `206` to a request for the bytes from `from` of a blob of
/// `total` bytes (when known): `bytes <from>-<last>/<total or *>`.
fn check_content_range(range: Option<&str>, from: u64, total: Option<u64>) -> Result<(), String> {
    let Some(range) = range else {
        return Err("the 206 has no Content-Range".into());
    };
    let parsed = range
        .trim()
        .strip_prefix("bytes ")
        .and_then(|r| r.split_once('/'))
        .and_then(|(span, size)| {
            let (first, last) = span.split_once('-')?;
            let first: u64 = first.trim().parse().ok()?;
            let last: u64 = last.trim().parse().ok()?;
            let size = match size.trim() {
                "*" => None,
                n => Some(n.parse::<u64>().ok()?),
            };
            (first <= last).then_some((first, size))
        });
    match parsed {
        None => Err(format!("unreadable Content-Range {range:?}")),
        Some((first, _)) if first != from => Err(format!(
            "the 206 starts at byte {first} (Content-Range {range:?})"
        )),
        Some((_, Some(size))) if total.is_some_and(|t| t != size) => Err(format!(
            "the 206 is for a blob of {size} bytes, not {} (Content-Range {range:?})",
            total.unwrap_or(0)
        )),
        Some(_) => Ok(()),
    }
}

/// Probes a down upstream with exponential backoff until it answers, then closes the circuit.
async fn probe_until_up(upstream: Weak<Upstream>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::time::sleep(backoff).await;
        let Some(up) = upstream.upgrade() else { return };
        if up.is_up() {
            return;
        }
        if up.probe().await {
            up.record_success();
            return;
        }
        tracing::debug!(
            upstream = up.name(),
            next_probe_s = backoff.as_secs_f64() * 2.0,
            "upstream still down"
        );
        backoff = (backoff * 2).min(up.config.probe_max_interval);
    }
}

/// The `WWW-Authenticate` challenge of an answer, if it has a readable one.
fn challenge(resp: &Response) -> Option<Challenge> {
    resp.headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge)
}

/// The `Content-Length` header (reqwest's `content_length()` is the body's size, 0 for a HEAD).
pub fn header_length(resp: &Response) -> Option<u64> {
    resp.headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn content_type(resp: &Response) -> Option<String> {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
        .filter(|s| !s.is_empty() && s != "application/octet-stream" && s != "text/plain")
}

/// The `mediaType` field of a manifest body, when the upstream sent no usable Content-Type.
pub fn media_type_from_body(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<M>(bytes).ok()?.media_type
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_bearer_challenge() {
        let ch = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        )
        .expect("parses");
        assert_eq!(ch.scheme, "bearer");
        assert_eq!(ch.params["realm"], "https://auth.docker.io/token");
        assert_eq!(ch.params["service"], "registry.docker.io");
        assert_eq!(ch.params["scope"], "repository:library/alpine:pull,push");
    }

    #[test]
    fn parses_basic_challenge_and_junk() {
        let ch = parse_challenge(r#"Basic realm="Registry Realm""#).expect("parses");
        assert_eq!(ch.scheme, "basic");
        assert_eq!(ch.params["realm"], "Registry Realm");
        assert!(parse_challenge("").is_none());
        let ch = parse_challenge("Bearer garbage").expect("scheme only");
        assert!(ch.params.is_empty());
    }

    #[test]
    fn json_depth_counts_nesting_outside_strings() {
        assert_eq!(json_depth(b"{}"), 1);
        assert_eq!(json_depth(br#"{"a":[{"b":[]}]}"#), 4);
        assert_eq!(json_depth(br#"{"a":"[[[[{{{{\"[["}"#), 1);
        assert_eq!(json_depth(b"not json"), 0);
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(json_depth(deep.as_bytes()), 100_000);
        assert_eq!(json_depth(b"]]]]["), 1);
    }

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).expect("test URL")
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
            assert!(e.contains("allow_private_redirects"), "{e}");
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
            assert!(e.contains("only http and https"), "{e}");
        }
    }

    #[test]
    fn a_resumed_read_must_start_where_it_was_asked_to_in_a_blob_of_the_known_size() {
        let ok = [
            ("bytes 150000-299999/300000", Some(300_000)),
            ("bytes 150000-299999/*", Some(300_000)),
            ("bytes 150000-299999/300000", None),
            ("bytes 150000-150000/300000", Some(300_000)),
        ];
        for (range, total) in ok {
            assert_eq!(
                check_content_range(Some(range), 150_000, total),
                Ok(()),
                "{range} for {total:?}"
            );
        }
        let refused = [
            (None, Some(300_000), "no Content-Range"),
            (
                Some("bytes 0-149999/300000"),
                Some(300_000),
                "starts at byte 0",
            ),
            (
                Some("bytes 150001-299999/300000"),
                None,
                "starts at byte 150001",
            ),
            (
                Some("bytes 150000-299999/400000"),
                Some(300_000),
                "of 400000 bytes",
            ),
            (Some("bytes 150000-149999/300000"), None, "unreadable"),
            (Some("bytes */300000"), None, "unreadable"),
            (Some("items 150000-299999/300000"), None, "unreadable"),
        ];
        for (range, total, why) in refused {
            let e = check_content_range(range, 150_000, total)
                .expect_err(&format!("{range:?} for {total:?} must be refused"));
            assert!(e.contains(why), "{range:?}: {e}");
        }
    }

    #[test]
    fn media_type_falls_back_to_body() {
        assert_eq!(
            media_type_from_body(br#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#)
                .as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(media_type_from_body(b"not json"), None);
    }
}

//! Authentication to an upstream: `WWW-Authenticate` challenges, the Bearer token service, the
//! token cache, and Basic credentials.
//!
//! A request carries the cached Bearer token of its scope, or Basic credentials once the upstream
//! asked for them. A `401` with a challenge is answered once per request (a new token, or Basic
//! from then on) and the request retried. Tokens live in memory only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::WWW_AUTHENTICATE;
use reqwest::{RequestBuilder, Response, StatusCode};

use super::error::classify;
use super::redirect::check_redirect;
use super::{Upstream, UpstreamError, MAX_JSON_DEPTH};
use crate::oci::manifest::json_depth;

/// Largest token service answer read.
const MAX_TOKEN_ANSWER: u64 = 1 << 20;

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

/// The `WWW-Authenticate` challenge of an answer, if it has a readable one.
pub(super) fn challenge(resp: &Response) -> Option<Challenge> {
    resp.headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_challenge)
}

struct CachedToken {
    token: String,
    expires: Instant,
}

/// What an upstream has asked for: Bearer tokens per scope, and whether it wants Basic.
#[derive(Default)]
pub(super) struct Auth {
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// Set once the upstream asked for Basic auth: send it up front from then on.
    basic: AtomicBool,
}

impl Auth {
    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedToken>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token for `scope`, if one is cached and not about to expire.
    fn token(&self, scope: &str) -> Option<String> {
        let mut tokens = self.tokens();
        match tokens.get(scope) {
            Some(t) if t.expires > Instant::now() => Some(t.token.clone()),
            Some(_) => {
                tokens.remove(scope);
                None
            }
            None => None,
        }
    }

    /// Keeps `token` for `scope` for its `expires_in` (the spec's default is 60 s), renewed a
    /// little early.
    fn keep(&self, scope: &str, token: String, expires_in: Option<u64>) {
        let ttl = expires_in.unwrap_or(60).max(10);
        let expires = Instant::now() + Duration::from_secs(ttl - ttl.min(10).min(ttl / 2));
        self.tokens()
            .insert(scope.to_owned(), CachedToken { token, expires });
    }
}

impl Upstream {
    /// Adds what the upstream wants to `req` for `scope`: the cached Bearer token, else Basic
    /// credentials once the upstream asked for them.
    pub(super) fn authorize(&self, req: RequestBuilder, scope: &str) -> RequestBuilder {
        if let Some(tok) = self.auth.token(scope) {
            return req.bearer_auth(tok);
        }
        match &self.config.credentials {
            Some(c) if self.auth.basic.load(Ordering::Relaxed) => {
                req.basic_auth(&c.username, Some(&c.password))
            }
            _ => req,
        }
    }

    /// Answers the challenge of a `401` for `scope`: a new Bearer token, or Basic credentials
    /// from now on (when configured). `Ok(true)`: send the request again.
    pub(super) async fn answer_challenge(
        &self,
        resp: &Response,
        scope: &str,
    ) -> Result<bool, UpstreamError> {
        match challenge(resp) {
            Some(ch) if ch.scheme == "bearer" => {
                self.auth.tokens().remove(scope);
                let (token, expires_in) = self.request_token(&ch, Some(scope)).await?;
                self.auth.keep(scope, token, expires_in);
                Ok(true)
            }
            Some(ch) if ch.scheme == "basic" && self.config.credentials.is_some() => {
                self.auth.basic.store(true, Ordering::Relaxed);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Asks the challenge's realm for a token: for the challenge's own scope, else `scope` (none
    /// when probing `/v2/`). Returns the token and its `expires_in`. A realm regcache refuses to
    /// call is `Invalid`; the token service refusing the credentials (`401`, `403`) is a `401`;
    /// any other failure of the token service is [`UpstreamError::Token`], with that failure as
    /// its source. Nothing is counted here: the caller counts the failure once.
    pub(super) async fn request_token(
        &self,
        ch: &Challenge,
        scope: Option<&str>,
    ) -> Result<(String, Option<u64>), UpstreamError> {
        let name = self.name();
        let realm = ch
            .params
            .get("realm")
            .ok_or_else(|| self.invalid("Bearer challenge without realm", None))?;
        let mut url = reqwest::Url::parse(realm).map_err(|e| {
            self.invalid(
                format!("Bearer realm {realm:?} is not a URL"),
                Some(Arc::new(e)),
            )
        })?;
        // The realm is chosen by the upstream: the same rule as redirects, so that a hostile
        // upstream cannot make regcache (with its credentials) call an internal address.
        check_redirect(&self.config.url, &url, self.config.allow_private_redirects)
            .map_err(|e| self.invalid("Bearer realm", Some(Arc::new(e))))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = ch.params.get("service") {
                q.append_pair("service", service);
            }
            if let Some(scope) = ch.params.get("scope").map(String::as_str).or(scope) {
                q.append_pair("scope", scope);
            }
        }
        let failed = |e: UpstreamError| UpstreamError::Token {
            upstream: name.to_owned(),
            source: Arc::new(e),
        };
        let mut req = self.client.get(url);
        if let Some(c) = &self.config.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = match tokio::time::timeout(self.config.header_timeout, req.send()).await {
            Err(_) => {
                return Err(failed(UpstreamError::Timeout {
                    upstream: name.to_owned(),
                    what: "response headers",
                }))
            }
            Ok(Err(e)) => return Err(failed(classify(name, e))),
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
            return Err(failed(UpstreamError::Status {
                upstream: name.to_owned(),
                status: status.as_u16(),
                path: "token realm".into(),
                retry_after: None,
            }));
        }
        let body = self
            .collect_body(resp, MAX_TOKEN_ANSWER, "token response")
            .await
            .map_err(failed)?;
        let depth = json_depth(&body);
        if depth > MAX_JSON_DEPTH {
            return Err(failed(self.invalid(
                format!(
                    "its answer nests JSON {depth} levels deep (the limit is {MAX_JSON_DEPTH})"
                ),
                None,
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| failed(self.invalid("its answer is not JSON", Some(Arc::new(e)))))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| failed(self.invalid("its answer holds no token", None)))?;
        Ok((token, t.expires_in))
    }
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
    fn tokens_are_kept_per_scope_and_renewed_before_they_expire() {
        let auth = Auth::default();
        auth.keep("repository:a:pull", "ta".into(), Some(300));
        auth.keep("repository:b:pull", "tb".into(), None);
        assert_eq!(auth.token("repository:a:pull").as_deref(), Some("ta"));
        assert_eq!(auth.token("repository:b:pull").as_deref(), Some("tb"));
        assert_eq!(auth.token("repository:c:pull"), None);
        // A lifetime of 10 s or less is renewed at half of it (at least 10 s are assumed).
        auth.keep("repository:a:pull", "ta2".into(), Some(0));
        assert_eq!(auth.token("repository:a:pull").as_deref(), Some("ta2"));
    }
}

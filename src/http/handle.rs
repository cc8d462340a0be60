//! One request from start to answer: the access checks every request passes first, dispatch to
//! the endpoint's handler, the headers every answer gets, the metrics, and the request's span and
//! access record (`trace`).
//!
//! Access control is applied before anything else: the request target's length
//! (`limits.max_uri_length`), the client address (`access.allow`), Basic credentials
//! (`access.htpasswd`), and, once a request is routed, the upstream's `allow_repos` and
//! `deny_repos` (`router`), so that a refused repository never reaches the cache or the upstream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tracing::Instrument as _;

use crate::app::App;
use crate::cache::{Outcome, Route};
use crate::http::admin::{admin, is_operator_path};
use crate::http::auth::{Verdict, Verifier};
use crate::http::error::{ApiError, Code};
use crate::http::response::{empty, full, set_header, Body};
use crate::http::router::{parse_path, parse_query, Endpoint, Query, Router as _};
use crate::http::sendfile::LaneRef;
use crate::http::trace::{Access, LogInfo, Logged};
use crate::http::{blobs, catalog, manifests, ops, page, referrers, status, tags};
use crate::oci::reference::{Digest, Reference};
use crate::telemetry::metrics::Metrics;
use crate::upstream::Upstream;

/// Response header naming the `ns` a request was routed by (the distribution spec's registry
/// proxying).
pub const NAMESPACE_HEADER: &str = "oci-namespace";

/// Response header naming the cache outcome (`hit`, `miss`, `stale`, …).
pub const CACHE_HEADER: &str = "x-regcache-cache";

/// Handles one request (never fails: errors become OCI error responses). The answer's body
/// writes the access line when it ends.
pub async fn handle(
    app: Arc<App>,
    auth: Arc<Verifier>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Logged>, Infallible> {
    let path = req.uri().path();
    let shard = req
        .extensions()
        .get::<crate::http::hooks::ShardHooks>()
        .map(|h| h.shard);
    let started = std::time::Instant::now();
    let mut access = Access::start(req.method(), path, route_label(path), &app.metrics);
    let span = access.span();
    let mut resp = answer(&app, &auth, peer, &req, &mut access.info, &mut access.user)
        .instrument(span)
        .await;
    let head_ready = started.elapsed();
    let info = &access.info;
    if let Some(o) = info.outcome {
        // How the cache answered: lets `regcache prefetch` (and operators) see hits.
        resp.headers_mut()
            .insert(CACHE_HEADER, HeaderValue::from_static(o.as_str()));
    }
    if let (Some(o), Some(up)) = (info.outcome, &info.upstream) {
        pass_on_ratelimit(o, up, resp.headers_mut());
    }
    if let Some(ns) = &info.namespace {
        // Errors included: a 404 for a request routed by `ns` is that registry's answer.
        set_header(resp.headers_mut(), NAMESPACE_HEADER, ns);
    }
    crate::http::peer::answered(&app, info.peer, &mut resp, req.method() == Method::HEAD);
    if let Some(shard) = shard {
        resp.headers_mut()
            .insert(crate::http::hooks::SHARD_HEADER, HeaderValue::from(shard));
    }
    let m = &app.metrics;
    m.requests
        .get_or_create(&vec![
            ("route", info.route.to_owned()),
            ("status", resp.status().as_u16().to_string()),
        ])
        .inc();
    if let Some(o) = info.outcome {
        m.cache_outcomes
            .get_or_create(&vec![("outcome", o.as_str().to_owned())])
            .inc();
    }
    let outcome = match info.outcome {
        Some(o) => o.as_str(),
        None if resp.status().as_u16() >= 400 => "error",
        None => "none",
    };
    m.request_duration
        .get_or_create(&vec![
            ("route", Metrics::duration_route(info.route).to_owned()),
            ("outcome", outcome.to_owned()),
        ])
        .observe(head_ready.as_secs_f64());
    Ok(access.respond(resp))
}

/// An answer that went upstream (`outcome`) carries the upstream's rate-limit headers, as its
/// last answer that had them sent them: a client sees the quota its pull spent.
fn pass_on_ratelimit(outcome: Outcome, upstream: &Upstream, headers: &mut http::HeaderMap) {
    let went_upstream = matches!(
        outcome,
        Outcome::Revalidated | Outcome::Miss | Outcome::Coalesced | Outcome::Passthrough
    );
    if !went_upstream {
        return;
    }
    if let Some(snapshot) = upstream.ratelimit() {
        for (name, value) in snapshot.headers() {
            headers.insert(name, value.clone());
        }
    }
}

/// The answer to a request, errors included.
async fn answer(
    app: &Arc<App>,
    auth: &Verifier,
    peer: SocketAddr,
    req: &Request<Incoming>,
    info: &mut LogInfo,
    user: &mut Option<String>,
) -> Response<Body> {
    let result = match check_access(app, auth, peer, req, user, &mut info.peer).await {
        Err((e, limit)) => {
            app.metrics
                .limit_rejections
                .get_or_create(&vec![("limit", limit.to_owned())])
                .inc();
            Err(e)
        }
        Ok(()) if is_operator_path(req.uri().path()) => admin(app, peer, req).await,
        Ok(()) => match crate::http::peer::refuse_self(info.peer) {
            Some(e) => Err(e),
            None => dispatch(app, req, info).await,
        },
    };
    result.unwrap_or_else(|e| e.into_response(req.method() == Method::HEAD))
}

/// The `route` label of a path, for metrics, before the request is checked.
fn route_label(path: &str) -> &'static str {
    match path {
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        status::PATH => "status",
        p if is_operator_path(p) => "admin",
        p => parse_path(p).label(),
    }
}

/// The checks every request passes before it is looked at: the request target's length, the
/// client's address, and (with `access.htpasswd`) its credentials, except on `/healthz` and
/// `/readyz`. The error comes with the name of the limit, for the metrics.
async fn check_access(
    app: &Arc<App>,
    auth: &Verifier,
    peer: SocketAddr,
    req: &Request<Incoming>,
    user: &mut Option<String>,
    from_peer: &mut Option<crate::http::peer::PeerCall>,
) -> Result<(), (ApiError, &'static str)> {
    let routing = app.routing();
    let limits = &routing.config.limits;
    let access = &routing.config.access;
    let target_len = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path().len(), |pq| pq.as_str().len());
    if target_len > limits.max_uri_length {
        return Err((
            ApiError::new(
                Code::UriTooLong,
                format!(
                    "the request target is {target_len} bytes; the limit is {} (limits.max_uri_length)",
                    limits.max_uri_length
                ),
            ),
            "max_uri_length",
        ));
    }
    if !crate::http::access::address_allowed(&access.allow, peer.ip()) {
        return Err((
            ApiError::new(
                Code::Denied,
                format!("client address {} is not allowed (access.allow)", peer.ip()),
            ),
            "access_allow",
        ));
    }
    if let Some(call) = crate::http::peer::recognise(app, auth, peer, req)? {
        // The fleet's token stands in for client credentials.
        (*user, *from_peer) = (Some("peer".into()), Some(call));
        return Ok(());
    }
    let path = req.uri().path();
    let open = matches!(path, "/healthz" | "/readyz") || is_operator_path(path);
    if let (Some(htpasswd), false) = (&access.htpasswd, open) {
        let given = req.headers().get(header::AUTHORIZATION);
        match auth
            .check(htpasswd, given.map(HeaderValue::as_bytes), peer.ip())
            .await
        {
            Verdict::Allowed(u) => *user = Some(u),
            // 429, not 401: the credentials were not checked, so "wrong password" would not be
            // true. Clients treat both as a failed pull.
            Verdict::Limited { retry_after } => {
                let secs = crate::upstream::whole_seconds(retry_after);
                return Err((
                    ApiError::new(
                        Code::TooManyRequests,
                        format!(
                            "too many failed logins from this address; the credentials were \
                             not checked; retry in {secs} s"
                        ),
                    )
                    .retry_after(secs.to_string()),
                    "auth_rate",
                ));
            }
            Verdict::Refused => {
                let message = if given.is_some() {
                    "wrong user name or password"
                } else {
                    "this mirror needs a user name and password"
                };
                return Err((
                    ApiError {
                        challenge: true,
                        ..ApiError::new(Code::Unauthorized, message)
                    },
                    "auth",
                ));
            }
        }
    }
    Ok(())
}

/// Routes a request's name to its upstream and repository, and notes it.
fn route(app: &App, name: &str, query: &Query, info: &mut LogInfo) -> Result<Route, ApiError> {
    let route = app.route(name, query.ns.as_deref())?;
    info.routed(&route, query.ns.as_deref());
    Ok(route)
}

/// Sends a request that passed the checks to its endpoint.
async fn dispatch(
    app: &Arc<App>,
    req: &Request<Incoming>,
    info: &mut LogInfo,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path();
    let method = req.method();
    let head = method == Method::HEAD;
    if path == status::PATH {
        return status::answer(app, method);
    }
    if path == "/" && page::wants_html(req.headers()) {
        info.route = "status";
        return page::answer(app, method);
    }
    if let Some((label, resp)) = ops::ops_endpoint(app, path, method) {
        info.route = label;
        return resp;
    }
    let endpoint = parse_path(path);
    if method != Method::GET && method != Method::HEAD {
        return Err(match endpoint {
            Endpoint::Unknown => {
                ApiError::new(Code::NoSuchEndpoint, format!("no such endpoint: {path}"))
            }
            Endpoint::Upload => ApiError::unsupported("uploads"),
            _ => ApiError::unsupported(&format!("{method}")),
        });
    }
    let query = parse_query(req.uri().query());
    match endpoint {
        Endpoint::Base => {
            // Always answered locally: clients call this before every pull.
            let mut resp = Response::new(if head { empty() } else { full("{}") });
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(2));
            h.insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            Ok(resp)
        }
        Endpoint::Catalog => catalog::catalog(app, &query, head),
        Endpoint::Manifest(name, r) => {
            let route = route(app, name, &query, info)?;
            let reference = Reference::parse(r)?;
            info.target(&reference);
            manifests::manifest(app, &route, &reference, req.headers(), head, info).await
        }
        Endpoint::Blob(name, d) => {
            let route = route(app, name, &query, info)?;
            let digest: Digest = d.parse()?;
            info.target(&digest);
            let lane = req.extensions().get::<LaneRef>();
            blobs::blob(app, &route, &digest, req.headers(), lane, head, info).await
        }
        Endpoint::Upload => Err(ApiError::unsupported("uploads")),
        Endpoint::Tags(name) => tags::tags(app, name, &query, head, info).await,
        Endpoint::Referrers(name, d) => {
            let route = route(app, name, &query, info)?;
            let digest: Digest = d.parse()?;
            info.target(&digest);
            referrers::referrers(app, &route, &digest, query.artifact_type.as_deref(), head).await
        }
        Endpoint::Unknown => Err(ApiError::new(
            Code::NoSuchEndpoint,
            format!("no such endpoint: {path}"),
        )),
    }
}

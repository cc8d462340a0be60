//! `/healthz` (liveness), `/readyz` (readiness: the store, with the upstreams, the bucket and the
//! peers for information) and `/metrics` (OpenMetrics text), outside the registry API.

use std::sync::Arc;

use http::{Method, Response, StatusCode};

use crate::app::App;
use crate::http::error::ApiError;
use crate::http::response::{json_response, plain, Body};

/// Builds one of these answers (`true`: for a `HEAD`).
type Answer = fn(&Arc<App>, bool) -> Response<Body>;

/// The answer to `path` when it is one of these endpoints (`None` otherwise), and its `route`
/// label.
pub fn ops_endpoint(
    app: &Arc<App>,
    path: &str,
    method: &Method,
) -> Option<(&'static str, Result<Response<Body>, ApiError>)> {
    let (route, answer): (_, Answer) = match path {
        "/healthz" => ("healthz", healthz),
        "/readyz" => ("readyz", readyz),
        "/metrics" => ("metrics", metrics),
        _ => return None,
    };
    if method != Method::GET && method != Method::HEAD {
        return Some((route, Err(ApiError::unsupported(&format!("{method}")))));
    }
    Some((route, Ok(answer(app, method == Method::HEAD))))
}

fn healthz(_: &Arc<App>, head: bool) -> Response<Body> {
    plain(StatusCode::OK, "ok\n", "text/plain", head)
}

fn metrics(app: &Arc<App>, head: bool) -> Response<Body> {
    app.refresh_store_metrics();
    app.refresh_tls_metric();
    plain(
        StatusCode::OK,
        app.metrics.render(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        head,
    )
}

fn readyz(app: &Arc<App>, head: bool) -> Response<Body> {
    let store_ok = app.cache.store.check();
    let upstreams: Vec<_> = app
        .routing()
        .upstreams()
        .iter()
        .map(|u| u.status())
        .collect();
    let mut body = serde_json::json!({
        "ready": store_ok.is_ok(),
        "store_full": app.cache.store.is_full(),
        "store_used_bytes": app.cache.store.used_bytes(),
        "store": match &store_ok { Ok(()) => "ok".to_owned(), Err(e) => e.to_string() },
        "upstreams": upstreams,
    });
    if let Some(b) = app.cache.bucket() {
        // Like an upstream, a bucket that is down does not make regcache unready.
        body["bucket"] = serde_json::json!({ "up": b.is_up() });
    }
    if let Some(p) = app.cache.peers() {
        // Nor do peers: a server can always serve what it holds and go upstream.
        body["peers"] = serde_json::json!(p.status());
    }
    let status = if store_ok.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = json_response(&body, head, "application/json");
    *r.status_mut() = status;
    r
}

//! The operator endpoints under [`ADMIN_PREFIX`] (`gc`, `verify`, `pins`), used by
//! `regcache gc`, `verify` and `pin` while a server runs: loopback clients only, and never a
//! request a web page could have made a browser send. (`/_regcache/status`, which changes
//! nothing, is `crate::http::status`'s, under the access rules of the API.)

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response};

use crate::app::App;
use crate::http::error::{ApiError, Code, Object};
use crate::http::response::{json_response, Body};
use crate::http::router::{query_pairs, Router as _};
use crate::oci::media::Accept;

/// Path prefix of the operator endpoints (gc, verify, pins): loopback clients only.
pub const ADMIN_PREFIX: &str = "/_regcache/";

/// Header every operator request must carry (`regcache gc`, `verify`, `pin` and `prefetch --pin`
/// send it). A web page cannot add a custom header to a cross-origin request without a CORS
/// preflight, which regcache never grants.
pub const OPERATOR_HEADER: &str = "x-regcache-operator";

/// Whether `path` is one of the loopback-only operator endpoints: under [`ADMIN_PREFIX`], except
/// the status (`crate::http::status::PATH`), which is under the access rules of the API.
pub fn is_operator_path(path: &str) -> bool {
    path.starts_with(ADMIN_PREFIX) && path != crate::http::status::PATH
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError::new(Code::BadRequest, msg)
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(Code::Internal, e.to_string())
}

/// Answers an operator request from `peer`.
pub async fn admin(
    app: &Arc<App>,
    peer: std::net::SocketAddr,
    req: &Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    if !peer.ip().is_loopback() {
        return Err(ApiError::new(
            Code::Denied,
            "operator endpoints answer loopback clients only",
        ));
    }
    operator_request(req.headers())?;
    let path = &req.uri().path()[ADMIN_PREFIX.len()..];
    let q: HashMap<&str, String> = query_pairs(req.uri().query().unwrap_or("")).collect();
    let method = req.method();
    let hooks = req.extensions().get::<crate::http::hooks::ShardHooks>();
    if let (Some(hooks), "POST", crate::http::hooks::STALL_PATH) = (hooks, method.as_str(), path) {
        return test_stall(hooks, &q).await;
    }
    match (method.as_str(), path) {
        ("POST", "gc") => {
            let target = match q.get("target") {
                Some(t) => Some(crate::config::parse_size(t).map_err(bad_request)?),
                None => None,
            };
            let report = app.collect(target).await.map_err(|e| internal(&e))?;
            let body = serde_json::json!({
                "evicted": report,
                "used_bytes": app.cache.store.used_bytes(),
            });
            Ok(json_response(&body, false, "application/json"))
        }
        // A check re-reads the whole store: a POST, so that no page can make a browser start one.
        ("POST", "verify") => {
            let opts = crate::store::verify::Options {
                hash: q.get("hash").is_none_or(|v| v != "false"),
                sample: q.get("sample").and_then(|n| n.parse().ok()),
                repair: q.get("repair").is_some_and(|v| v == "true"),
            };
            let store = Arc::clone(&app.cache.store);
            let report = tokio::task::spawn_blocking(move || {
                crate::store::verify::check(&store, opts, true, &mut ())
            })
            .await
            .map_err(|e| internal(&e))?
            .map_err(|e| internal(&e))?;
            let body = serde_json::to_value(&report).map_err(|e| internal(&e))?;
            Ok(json_response(&body, false, "application/json"))
        }
        ("GET", "pins") => {
            let pins = app
                .routing()
                .pin_names(&app.cache.store)
                .map_err(|e| internal(&e))?;
            Ok(json_response(
                &serde_json::json!({ "pins": pins }),
                false,
                "application/json",
            ))
        }
        ("POST" | "DELETE", "pins") => {
            let image = q
                .get("image")
                .ok_or_else(|| bad_request("the image parameter is required"))?;
            let r = crate::oci::reference::ImageRef::parse(image)?;
            let route = app.route(&r.name, None)?;
            let reference = r.reference();
            if method == Method::POST {
                // Through the cache, so that an image not cached yet is fetched; one that does
                // not exist (or cannot be had now) is not pinned.
                app.cache
                    .manifest(&route, &reference, Accept::ALL)
                    .await
                    .map_err(|e| {
                        let e = ApiError::from_cache(e, Object::Manifest);
                        ApiError {
                            message: format!("cannot pin {image}: {}", e.message),
                            ..e
                        }
                    })?;
            }
            let reference = reference.to_string();
            let store = &app.cache.store;
            let changed = if method == Method::POST {
                store.pin(&route.key(), &reference).map(|()| true)
            } else {
                store.unpin(&route.key(), &reference)
            }
            .map_err(|e| internal(&e))?;
            let body = serde_json::json!({ "image": image, "changed": changed });
            Ok(json_response(&body, false, "application/json"))
        }
        (_, "gc" | "verify" | "pins") => {
            let allow = if path == "pins" {
                "GET, POST, DELETE"
            } else {
                "POST"
            };
            Err(ApiError {
                allow: Some(allow),
                ..ApiError::new(
                    Code::MethodNotAllowed,
                    format!("{method} {}: use {allow}", req.uri().path()),
                )
            })
        }
        _ => Err(ApiError::new(
            Code::NoSuchEndpoint,
            format!("no such operator endpoint: {method} {}", req.uri().path()),
        )),
    }
}

/// The stall test hook (`REGCACHE_TEST_HOOKS=1`): `?shard=N&ms=M` blocks shard N's thread for
/// M milliseconds. The answer's head leaves once that thread is blocked, its body (one line) once
/// it runs again.
async fn test_stall(
    hooks: &crate::http::hooks::ShardHooks,
    q: &HashMap<&str, String>,
) -> Result<Response<Body>, ApiError> {
    let number = |k: &str| -> Result<u64, ApiError> {
        q.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad_request(format!("{k} must be a number")))
    };
    let (shard, ms) = (number("shard")?, number("ms")?);
    let shard = usize::try_from(shard).unwrap_or(usize::MAX);
    let rx = hooks
        .stall(shard, std::time::Duration::from_millis(ms))
        .await
        .map_err(|e| bad_request(e.to_string()))?;
    let mut resp = Response::new(crate::http::blobs::channel_body(rx));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
}

/// Refuses an operator request that a web page could have made a browser send: one with an
/// `Origin` header (every cross-origin request and every browser `POST` has one), one without
/// [`OPERATOR_HEADER`] (which a page can add only after a preflight), and one whose `Host` is a
/// DNS name (a page on a name rebound to 127.0.0.1 is same-origin and may add headers to a `GET`,
/// but its `Host` still names it).
fn operator_request(headers: &HeaderMap) -> Result<(), ApiError> {
    let denied = |m: String| ApiError::new(Code::Denied, m);
    if headers.contains_key(header::ORIGIN) {
        return Err(denied(
            "operator endpoints refuse requests with an Origin header (sent by web pages)".into(),
        ));
    }
    if !headers.contains_key(OPERATOR_HEADER) {
        return Err(denied(format!(
            "operator requests need the header {OPERATOR_HEADER} (regcache gc, verify and pin \
             send it)"
        )));
    }
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !address_host(host) {
            return Err(denied(format!(
                "operator requests must name the server by address (127.0.0.1, [::1]) or \
                 localhost, not Host {host:?}"
            )));
        }
    }
    Ok(())
}

/// Whether a `Host` header is an IP address or `localhost` (any port): no DNS name that a web
/// page could have pointed at this machine.
fn address_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    #[test]
    fn operator_requests_name_the_server_by_address() {
        for ok in [
            "127.0.0.1:5000",
            "127.0.0.1",
            "[::1]:5000",
            "[::1]",
            "localhost:5000",
            "LOCALHOST",
            "0.0.0.0:5000",
        ] {
            assert!(address_host(ok), "{ok}");
        }
        for bad in [
            "rebind.example:5000",
            "rebind.example",
            "[::1",
            "",
            "127.0.0.1.nip.io:80",
        ] {
            assert!(!address_host(bad), "{bad}");
        }
        let mut h = HeaderMap::new();
        assert!(operator_request(&h).is_err(), "no operator header");
        h.insert(OPERATOR_HEADER, HeaderValue::from_static("1"));
        assert!(operator_request(&h).is_ok());
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:5000"));
        assert!(operator_request(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(operator_request(&h).is_err(), "an Origin");
        h.remove(header::ORIGIN);
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        assert!(operator_request(&h).is_err(), "a DNS name");
    }
}

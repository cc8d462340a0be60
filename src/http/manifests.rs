//! `GET`/`HEAD /v2/<name>/manifests/<reference>`: the manifest the cache has for the client's
//! `Accept` set, with its digest, and a `Warning` when it is served stale (a tag served stale is
//! noted for `GET /_regcache/status`).

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::Response;

use crate::app::App;
use crate::cache::{Outcome, Route};
use crate::http::error::{ApiError, Object};
use crate::http::response::{empty, full, set_header, Body};
use crate::http::trace::LogInfo;
use crate::oci::media::Accept;
use crate::oci::reference::Reference;

/// Answers a manifest request routed to `route`.
pub async fn manifest(
    app: &Arc<App>,
    route: &Route,
    reference: &Reference,
    headers: &HeaderMap,
    head: bool,
    info: &mut LogInfo,
) -> Result<Response<Body>, ApiError> {
    let accept = Accept::parse(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let (m, checked_at) = crate::http::peer::manifest(app, route, reference, accept, info.peer)
        .await
        .map_err(|e| ApiError::from_cache(e, Object::Manifest))?;
    info.set_outcome(m.outcome);
    let mut resp = Response::new(if head { empty() } else { full(m.bytes.clone()) });
    let h = resp.headers_mut();
    set_header(h, header::CONTENT_TYPE, &m.media_type);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
    set_header(h, "docker-content-digest", &m.digest.to_string());
    set_header(h, header::ETAG, &format!("\"{}\"", m.digest));
    crate::http::peer::checked_at(h, checked_at);
    if m.outcome == Outcome::Stale {
        if let Reference::Tag(tag) = reference {
            app.stale
                .record(route.upstream.name(), format!("{}:{tag}", route.repo));
        }
        h.insert(
            header::WARNING,
            HeaderValue::from_static("110 regcache \"Response is Stale\""),
        );
    }
    Ok(resp)
}

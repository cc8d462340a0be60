//! `GET`/`HEAD /v2/<name>/tags/list`: the upstream's tag list, paged by `n` and `last`; the cached
//! tags when the upstream is unavailable.

use std::sync::Arc;

use http::Response;

use crate::app::App;
use crate::http::error::{ApiError, Code, Object};
use crate::http::paging::{link_header, page, parse_n};
use crate::http::response::{json_response, Body};
use crate::http::router::{url_encode, Query, Router as _};
use crate::http::trace::LogInfo;

pub async fn tags(
    app: &Arc<App>,
    name: &str,
    q: &Query,
    head: bool,
    info: &mut LogInfo,
) -> Result<Response<Body>, ApiError> {
    let routing = app.routing();
    let route = routing.route(name, q.ns.as_deref())?;
    info.routed(&route, q.ns.as_deref());
    let n = parse_n(q.n.as_deref(), routing.config.limits.max_page)?;
    let mut upstream_query = Vec::new();
    if let Some(n) = n {
        upstream_query.push(format!("n={n}"));
    }
    if let Some(l) = &q.last {
        upstream_query.push(format!("last={}", url_encode(l)));
    }
    let mut up_path = format!("/v2/{}/tags/list", route.repo);
    if !upstream_query.is_empty() {
        up_path = format!("{up_path}?{}", upstream_query.join("&"));
    }
    #[derive(serde::Deserialize)]
    struct TagList {
        tags: Option<Vec<String>>,
    }
    let (tags, more) = match route.upstream.get_json(&route.repo, &up_path).await {
        Ok((body, link)) => {
            let list: TagList = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    Code::BadGateway,
                    format!("upstream tag list is not valid JSON: {e}"),
                )
            })?;
            let mut tags = list.tags.unwrap_or_default();
            // Apply n and last ourselves too, in case the upstream ignored them.
            tags.sort();
            let (tags, more) = page(tags, n, q.last.as_deref());
            (tags, more || link.is_some())
        }
        Err(e) if e.is_unavailable() => {
            tracing::warn!(upstream = route.upstream.name(), error = %e, "upstream cannot list tags; listing cached tags");
            let cached = app
                .cache
                .store
                .tags(&route.key())
                .map_err(|e| ApiError::from_cache(e.into(), Object::Repository))?;
            if cached.is_empty() {
                return Err(ApiError::from_upstream(&e, Object::Repository));
            }
            page(cached, n, q.last.as_deref())
        }
        Err(e) => return Err(ApiError::from_upstream(&e, Object::Repository)),
    };
    let last = tags.last().cloned();
    let mut resp = json_response(
        &serde_json::json!({ "name": name, "tags": tags }),
        head,
        "application/json",
    );
    if let (true, Some(l)) = (more, last) {
        link_header(
            &mut resp,
            &format!("/v2/{name}/tags/list"),
            n,
            &l,
            q.ns.as_deref(),
        );
    }
    Ok(resp)
}

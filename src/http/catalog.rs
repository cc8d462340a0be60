//! `GET`/`HEAD /v2/_catalog`: the cached repositories that their upstream's `allow_repos` and
//! `deny_repos` still allow, by the name a client pulls them with, a page at a time.

use std::sync::Arc;

use http::Response;

use crate::app::App;
use crate::http::error::{ApiError, Object};
use crate::http::paging::{link_header, page, parse_n};
use crate::http::response::{json_response, Body};
use crate::http::router::{repo_listed, Query};

pub fn catalog(app: &Arc<App>, q: &Query, head: bool) -> Result<Response<Body>, ApiError> {
    let routing = app.routing();
    let n = parse_n(q.n.as_deref(), routing.config.limits.max_page)?;
    let mut names: Vec<String> = app
        .cache
        .store
        .repos()
        .map_err(|e| ApiError::from_cache(e.into(), Object::Repository))?
        .into_iter()
        .filter(|(u, r)| repo_listed(&routing, u, r))
        .map(|(u, r)| routing.catalog_name(&u, &r))
        .collect();
    names.sort();
    names.dedup();
    let (names, more) = page(names, n, q.last.as_deref());
    let last = names.last().cloned();
    let mut resp = json_response(
        &serde_json::json!({ "repositories": names }),
        head,
        "application/json",
    );
    if let (true, Some(l)) = (more, last) {
        link_header(&mut resp, "/v2/_catalog", n, &l, None);
    }
    Ok(resp)
}

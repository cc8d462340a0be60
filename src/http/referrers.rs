//! `GET`/`HEAD /v2/<name>/referrers/<digest>`: the upstream's referrers (or the tag schema's index
//! when it has no referrers API) merged with the referrers the cache recorded, filtered by
//! `artifactType`.

use std::sync::Arc;

use http::header::HeaderValue;
use http::Response;

use crate::app::App;
use crate::cache::Route;
use crate::http::error::{ApiError, Code, Object};
use crate::http::response::{json_response, Body};
use crate::oci::media::{self, Accept};
use crate::oci::reference::{Digest, Reference};

pub async fn referrers(
    app: &Arc<App>,
    route: &Route,
    subject: &Digest,
    artifact_type: Option<&str>,
    head: bool,
) -> Result<Response<Body>, ApiError> {
    let mut descriptors: Vec<serde_json::Value> = Vec::new();
    let path = format!("/v2/{}/referrers/{subject}", route.repo);
    match route.upstream.get_json(&route.repo, &path).await {
        Ok((body, _)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    Code::BadGateway,
                    format!("upstream referrers answer is not JSON: {e}"),
                )
            })?;
            if let Some(list) = v.get("manifests").and_then(|m| m.as_array()) {
                descriptors.extend(list.iter().cloned());
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "upstream has no referrers API; using the tag schema and the cache");
            // The spec's fallback: an index tagged `<alg>-<hex>` lists the referrers.
            let tag = format!("{}-{}", subject.algorithm().as_str(), subject.hex());
            if let Ok(Reference::Tag(t)) = Reference::parse(&tag) {
                if let Ok(m) = app
                    .cache
                    .manifest(route, &Reference::Tag(t), Accept::ALL)
                    .await
                {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.bytes) {
                        if let Some(list) = v.get("manifests").and_then(|m| m.as_array()) {
                            descriptors.extend(list.iter().cloned());
                        }
                    }
                }
            }
        }
    }
    let cached = app
        .cache
        .store
        .referrers(&route.key(), subject)
        .map_err(|e| ApiError::from_cache(e.into(), Object::Manifest))?;
    for c in cached {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&c) {
            if !descriptors
                .iter()
                .any(|d| d.get("digest") == v.get("digest"))
            {
                descriptors.push(v);
            }
        }
    }
    if let Some(at) = artifact_type {
        descriptors.retain(|d| d.get("artifactType").and_then(|a| a.as_str()) == Some(at));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": descriptors,
    });
    let mut resp = json_response(&index, head, media::OCI_INDEX);
    if artifact_type.is_some() {
        resp.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}

//! Reading manifest bodies: JSON nesting depth, the media type, referenced digests, `subject`.
//!
//! The few things regcache reads out of a manifest's JSON; nothing else of a manifest is parsed.
//! Every function here takes untrusted bytes and answers "nothing" rather than failing.

use crate::oci::reference::Digest;

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

/// The `mediaType` field of a manifest body, when the upstream sent no usable Content-Type.
pub fn media_type_from_body(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<M>(bytes).ok()?.media_type
}

/// The digests a manifest references: config, layers, index children, artifact blobs (not its
/// `subject`, which it points at rather than contains).
pub fn manifest_refs(bytes: &[u8]) -> Vec<Digest> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(d) = v
        .get("config")
        .and_then(|c| c.get("digest"))
        .and_then(|d| d.as_str())
    {
        out.extend(d.parse().ok());
    }
    for list in ["layers", "manifests", "blobs"] {
        for item in v.get(list).and_then(|l| l.as_array()).into_iter().flatten() {
            if let Some(d) = item.get("digest").and_then(|d| d.as_str()) {
                out.extend(d.parse().ok());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The `subject` of a manifest and the descriptor to list it under in the referrers API.
pub fn referrer_descriptor(
    bytes: &[u8],
    media_type: &str,
    d: &Digest,
) -> Option<(Digest, Vec<u8>)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let subject: Digest = v.get("subject")?.get("digest")?.as_str()?.parse().ok()?;
    let artifact_type = v
        .get("artifactType")
        .and_then(|a| a.as_str())
        .or_else(|| v.get("config")?.get("mediaType")?.as_str())
        .map(str::to_owned);
    let mut desc = serde_json::json!({
        "mediaType": media_type,
        "digest": d.to_string(),
        "size": bytes.len(),
    });
    if let Some(a) = artifact_type {
        desc["artifactType"] = serde_json::Value::String(a);
    }
    if let Some(ann) = v.get("annotations") {
        desc["annotations"] = ann.clone();
    }
    Some((subject, serde_json::to_vec(&desc).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed sha256 digest of one repeated hex digit.
    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
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

    #[test]
    fn media_type_falls_back_to_body() {
        assert_eq!(
            media_type_from_body(br#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#)
                .as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(media_type_from_body(b"not json"), None);
    }

    #[test]
    fn refs_are_config_layers_children_and_blobs_but_not_the_subject() {
        let body = serde_json::json!({
            "config": {"digest": digest('c')},
            "layers": [{"digest": digest('a')}, {"digest": digest('a')}, {"digest": "junk"}],
            "manifests": [{"digest": digest('d')}],
            "blobs": [{"digest": digest('b')}],
            "subject": {"digest": digest('e')},
        });
        let refs: Vec<String> = manifest_refs(body.to_string().as_bytes())
            .iter()
            .map(Digest::to_string)
            .collect();
        assert_eq!(
            refs,
            [digest('a'), digest('b'), digest('c'), digest('d')],
            "sorted, each once, malformed digests and the subject left out"
        );
        assert!(manifest_refs(b"not json").is_empty());
    }

    #[test]
    fn a_referrer_is_listed_under_its_subject_with_its_artifact_type() {
        let d: Digest = digest('f').parse().expect("digest");
        let body = serde_json::json!({
            "config": {"mediaType": "application/vnd.example.sbom"},
            "subject": {"digest": digest('e')},
            "annotations": {"org.example": "yes"},
        })
        .to_string();
        let (subject, desc) = referrer_descriptor(
            body.as_bytes(),
            "application/vnd.oci.image.manifest.v1+json",
            &d,
        )
        .expect("a manifest with a subject is a referrer");
        assert_eq!(subject.to_string(), digest('e'));
        let desc: serde_json::Value = serde_json::from_slice(&desc).expect("descriptor JSON");
        assert_eq!(
            desc,
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest('f'),
                "size": body.len(),
                "artifactType": "application/vnd.example.sbom",
                "annotations": {"org.example": "yes"},
            })
        );
        assert!(
            referrer_descriptor(b"{}", "x/y", &d).is_none(),
            "no subject"
        );
    }
}

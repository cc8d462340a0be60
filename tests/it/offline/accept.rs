//! Manifest content negotiation against the in-process fake upstream: clients with different
//! `Accept` sets at once, revalidation with a narrow `Accept`, schema 1 answers.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::accept::full_accept;
use crate::support::fake::{self, FakeUpstream};
use crate::support::media::{DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED as SCHEMA1};
use crate::support::regcache::{client, config_for, Regcache};

/// A Docker manifest list over two platforms on the fake upstream, tagged `repo:tag`; returns
/// the list's digest and the amd64 child's.
fn fake_list(fake: &FakeUpstream, repo: &str, tag: &str, seed: u8) -> (String, String) {
    let mut children = Vec::new();
    for arch in ["amd64", "arm64"] {
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": fake::sha256_digest(&[seed]),
                "size": 1,
            },
            "layers": [],
            "annotations": { "arch": arch },
        });
        let body = Bytes::from(serde_json::to_vec(&body).expect("JSON"));
        let size = body.len();
        let digest = fake.add_manifest(repo, None, DOCKER_MANIFEST, body);
        children.push(serde_json::json!({
            "mediaType": DOCKER_MANIFEST,
            "digest": digest,
            "size": size,
            "platform": { "architecture": arch, "os": "linux" },
        }));
    }
    let amd64 = children[0]["digest"].as_str().expect("digest").to_owned();
    let list = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": children,
    });
    let list = Bytes::from(serde_json::to_vec(&list).expect("JSON"));
    (fake.add_manifest(repo, Some(tag), DOCKER_LIST, list), amd64)
}

/// `GET` of a manifest through regcache with one `Accept` line; status, digest, cache outcome.
async fn get_manifest(
    rc: &Regcache,
    path: &str,
    accept: &str,
) -> (u16, Option<String>, Option<String>) {
    let resp = client()
        .get(format!("{}{path}", rc.url()))
        .header("accept", accept)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    (
        resp.status().as_u16(),
        h("docker-content-digest"),
        h("x-regcache-cache"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_different_accept_sets_asking_at_once_each_get_their_own_answer() {
    let fake = FakeUpstream::start().await;
    let (list, amd64) = fake_list(&fake, "library/app", "v1", 1);
    let rc = Regcache::with_upstream(&fake.url());
    let path = "/v2/library/app/manifests/v1";
    fake.set_manifest_gate(true);
    let all = full_accept().join(", ");
    let full = tokio::spawn({
        let (rc_url, all) = (rc.url(), all.clone());
        async move {
            client()
                .get(format!("{rc_url}{path}"))
                .header("accept", all)
                .send()
                .await
                .map(|r| r.headers().get("docker-content-digest").cloned())
        }
    });
    let manifest_requests = || fake.requests().iter().filter(|r| r.path == path).count();
    let deadline = Instant::now() + Duration::from_secs(20);
    while manifest_requests() < 1 {
        assert!(
            Instant::now() < deadline,
            "regcache never asked the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A schema-2-only client while the full-Accept fetch is held upstream.
    let narrow = tokio::spawn({
        let rc_url = rc.url();
        async move {
            client()
                .get(format!("{rc_url}{path}"))
                .header("accept", DOCKER_MANIFEST)
                .send()
                .await
                .map(|r| r.headers().get("docker-content-digest").cloned())
        }
    });
    // Its own upstream request arrives (bounded wait: with a shared flight it never would).
    let deadline = Instant::now() + Duration::from_secs(10);
    while manifest_requests() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.set_manifest_gate(false);
    let full = full.await.expect("task").expect("full-Accept GET");
    let narrow = narrow.await.expect("task").expect("schema-2-only GET");
    assert_eq!(
        full.as_ref().and_then(|v| v.to_str().ok()),
        Some(list.as_str()),
        "the full-Accept client gets the list"
    );
    assert_eq!(
        narrow.as_ref().and_then(|v| v.to_str().ok()),
        Some(amd64.as_str()),
        "the schema-2-only client, asking while the full-Accept fetch ran, gets the amd64 child \
         (the list is {list})"
    );
    let accepts: Vec<_> = fake
        .requests()
        .iter()
        .filter(|r| r.path == path)
        .map(|r| r.header("accept").unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        accepts.len(),
        2,
        "one upstream request per Accept set: {accepts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrow_accept_answer_is_revalidated_with_that_accept_served_stale_and_refetched() {
    let fake = FakeUpstream::start().await;
    let (_, amd64) = fake_list(&fake, "library/app", "v1", 1);
    let rc = Regcache::start(&config_for(&fake.url(), "freshness = \"0s\"", ""));
    let path = "/v2/library/app/manifests/v1";
    let get = || get_manifest(&rc, path, DOCKER_MANIFEST);

    let (status, digest, outcome) = get().await;
    assert_eq!(
        (status, digest.as_deref(), outcome.as_deref()),
        (200, Some(amd64.as_str()), Some("miss")),
        "first schema-2-only GET"
    );
    fake.reset_counters();
    let (status, digest, outcome) = get().await;
    assert_eq!(
        (status, digest.as_deref(), outcome.as_deref()),
        (200, Some(amd64.as_str()), Some("revalidated")),
        "second schema-2-only GET (freshness 0)"
    );
    let seen: Vec<_> = fake
        .requests()
        .iter()
        .filter(|r| r.path == path)
        .map(|r| {
            (
                r.method.clone(),
                r.header("accept").unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![("HEAD".to_owned(), DOCKER_MANIFEST.to_owned())],
        "the revalidation is one HEAD with the client's Accept"
    );

    fake.set_status(Some(503));
    let (status, digest, outcome) = get().await;
    assert_eq!(
        (status, digest.as_deref(), outcome.as_deref()),
        (200, Some(amd64.as_str()), Some("stale")),
        "schema-2-only GET with the upstream answering 503"
    );
    fake.set_status(None);

    let (_, amd64_v2) = fake_list(&fake, "library/app", "v1", 2);
    let (status, digest, _) = get().await;
    assert_eq!(
        (status, digest.as_deref()),
        (200, Some(amd64_v2.as_str())),
        "schema-2-only GET after the tag moved to a new list (the old child was {amd64})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema1_answers_are_checked_over_their_payload_and_never_stored() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let fake = FakeUpstream::start().await;
    // A signed schema 1 manifest as libtrust writes it: the payload, cut before its closing
    // "\n}", then the signatures; the protected header says where the cut was.
    let payload =
        "{\n   \"schemaVersion\": 1,\n   \"name\": \"library/old\",\n   \"tag\": \"v1\"\n}";
    let cut = payload.len() - 2;
    let protected = b64.encode(format!(
        r#"{{"formatLength":{cut},"formatTail":"{}","time":"2024-01-01T00:00:00Z"}}"#,
        b64.encode(&payload[cut..])
    ));
    let signed = format!(
        "{},\n   \"signatures\": [{{\"protected\": \"{protected}\", \"signature\": \"x\"}}]\n}}",
        &payload[..cut]
    );
    // The fake names the digest of the whole body, not of the payload: a lie for schema 1.
    fake.add_manifest(
        "library/old",
        Some("v1"),
        SCHEMA1,
        Bytes::from(signed.clone()),
    );
    // No signature to find the payload by.
    fake.add_manifest(
        "library/old",
        Some("unsigned"),
        SCHEMA1,
        Bytes::from_static(b"{\"schemaVersion\": 1}"),
    );
    let rc = Regcache::with_upstream(&fake.url());
    for (tag, what) in [
        ("v1", "Docker-Content-Digest over the signed body"),
        ("unsigned", "no signature"),
    ] {
        let (status, digest, _) =
            get_manifest(&rc, &format!("/v2/library/old/manifests/{tag}"), SCHEMA1).await;
        assert_eq!(
            (status, digest),
            (502, None),
            "a schema 1 manifest with {what} is refused"
        );
    }
    assert!(
        rc.app
            .cache
            .store
            .tags(&regcache::store::RepoKey {
                upstream: "docker".into(),
                repo: "library/old".parse().expect("repo"),
            })
            .expect("tags")
            .is_empty(),
        "nothing of them is stored"
    );
}

//! Peer requests on one regcache (in-process, in front of the fake upstream): the fleet's token,
//! which stands in for htpasswd credentials but not for the address allow-list, the headers of a
//! peer's answers, local-only answers, and `[peers]` applied on reload.

use bytes::Bytes;
use reqwest::StatusCode;

use crate::offline::ops::cloud_init_file;
use crate::support::fake::FakeUpstream;
use crate::support::fleet::{peer_headers, peers_toml, token_file, TOKEN};
use crate::support::media::accept_all;
use crate::support::process::Process;
use crate::support::regcache::{client, config_for, error_code, Regcache};

/// `GET` (or `HEAD`) `url` with `headers`: status, server id header, body.
async fn ask(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>, Bytes) {
    let mut req = client().request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("request");
    let id = r
        .headers()
        .get("x-regcache-server-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (r.status(), id, r.bytes().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_requests_need_the_fleet_token_which_stands_in_for_htpasswd() {
    let fake = FakeUpstream::start().await;
    let (_, layer) = fake.add_image("team/app", "v1", Bytes::from_static(b"a layer"));
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let token = token_file(dir.path());
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("alice:{}\n", bcrypt::hash("pw", 4).expect("bcrypt")),
    )
    .expect("htpasswd");
    // One peer besides this server, which never answers: it is down, and nothing needs it.
    let peers = peers_toml(&["http://127.0.0.9:9".to_owned()], &token);
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "",
        &format!("[access]\nhtpasswd = \"{}\"\n{peers}", htpasswd.display()),
    ));
    let base = format!("{}/v2/", rc.url());
    let blob = format!("{}/v2/team/app/blobs/{layer}", rc.url());
    let get = reqwest::Method::GET;

    let (status, id, _) = ask(get.clone(), &base, &[]).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a client needs credentials"
    );
    assert_eq!(id, None, "a client's answer names no server id");
    let (status, id, _) = ask(get.clone(), &base, &peer_headers(false)).await;
    assert_eq!(status, StatusCode::OK, "the token stands in for htpasswd");
    let id = id.expect("a peer's answer carries the server id");
    assert_eq!(id.len(), 32, "{id}");

    // Missing or wrong token: 403, no id, whatever the path.
    for (what, headers) in [
        ("hop without a token", vec![("x-regcache-hop", "1")]),
        (
            "a wrong token",
            vec![("x-regcache-peer-token", "not-the-token")],
        ),
        (
            "a wrong token on a blob",
            vec![("x-regcache-peer-token", "x"), ("x-regcache-hop", "1")],
        ),
    ] {
        let url = if what.contains("blob") { &blob } else { &base };
        let (status, id, body) = ask(get.clone(), url, &headers).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
        assert_eq!(error_code(&body), "DENIED", "{what}");
        assert_eq!(id, None, "{what}: a refused request learns no server id");
    }

    // Local-only: the store alone answers; a hop fills from this server's own tiers.
    let local = peer_headers(true);
    let (status, _, body) = ask(reqwest::Method::GET, &blob, &local).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "local-only, not stored");
    assert_eq!(error_code(&body), "BLOB_UNKNOWN");
    assert_eq!(
        fake.blob_gets(&layer),
        0,
        "a local-only request went upstream"
    );
    let (status, _, body) = ask(get.clone(), &blob, &peer_headers(false)).await;
    assert_eq!(status, StatusCode::OK, "a hop fills");
    assert_eq!(&body[..], b"a layer");
    let (status, _, _) = ask(reqwest::Method::HEAD, &blob, &local).await;
    assert_eq!(status, StatusCode::OK, "local-only, now stored");
    let tag = format!("{}/v2/team/app/manifests/v1", rc.url());
    let head_tag = || async {
        let mut req = client().head(&tag);
        for (k, v) in peer_headers(true) {
            req = req.header(k, v);
        }
        req.send().await.expect("HEAD tag")
    };
    let r = head_tag().await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the tag was never pulled here"
    );
    let mut hop = peer_headers(false);
    hop.push(("accept", accept_all()));
    let (status, _, _) = ask(get.clone(), &tag, &hop).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a hop by tag, with the four types a puller accepts"
    );
    let r = head_tag().await;
    assert_eq!(r.status(), StatusCode::OK);
    let at: u64 = r
        .headers()
        .get("x-regcache-checked-at")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a tag's answer to a peer says when it was confirmed");
    assert!(at > 1_600_000_000_000, "unix milliseconds: {at}");

    // Wrong tokens count as failed logins of the address: after 10, 429 without a check.
    let mut last = StatusCode::OK;
    for _ in 0..12 {
        last = ask(get.clone(), &base, &[("x-regcache-peer-token", "guess")])
            .await
            .0;
    }
    assert_eq!(
        last,
        StatusCode::TOO_MANY_REQUESTS,
        "guessing the token is limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_applies_to_peers_and_a_reload_changes_the_peer_list() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("dir");
    let token = token_file(dir.path());
    let peers = peers_toml(&["http://127.0.0.9:9".to_owned()], &token);
    let refused = Regcache::start(&config_for(
        &fake.url(),
        "",
        &format!("[access]\nallow = [\"10.0.0.0/8\"]\n{peers}"),
    ));
    let (status, id, body) = ask(
        reqwest::Method::GET,
        &format!("{}/v2/", refused.url()),
        &peer_headers(false),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "the token does not bypass access.allow"
    );
    assert_eq!(error_code(&body), "DENIED");
    assert_eq!(id, None);

    let rc = Regcache::start(&config_for(&fake.url(), "", &peers));
    let readyz = || async {
        let r = client()
            .get(format!("{}/readyz", rc.url()))
            .send()
            .await
            .expect("readyz");
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "peers never make a server unready"
        );
        let body = r.bytes().await.expect("readyz body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("readyz JSON");
        v["peers"].clone()
    };
    let before = readyz().await;
    assert_eq!(before[0]["url"], "http://127.0.0.9:9/", "{before}");
    let next = peers_toml(
        &[
            "http://127.0.0.9:9".to_owned(),
            "http://127.0.0.8:8".to_owned(),
        ],
        &token,
    );
    let cfg = regcache::config::Config::parse(
        &config_for(&fake.url(), "", &next),
        "reloaded",
        &regcache::config::Overrides {
            data_dir: Some(rc.data_dir().to_owned()),
            ..Default::default()
        },
    )
    .expect("config");
    rc.app.reload(cfg).expect("reload");
    let after = readyz().await;
    assert_eq!(after.as_array().map(Vec::len), Some(2), "{after}");
    assert_eq!(after[1]["url"], "http://127.0.0.8:8/", "{after}");
}

#[test]
fn the_fleet_cloud_init_template_renders_a_valid_config_with_every_peer() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let template = std::fs::read_to_string(root.join("deploy/cloud-init/fleet.yaml.tftpl"))
        .expect("the fleet's cloud-init template");
    // What terraform's templatefile makes of it (deploy/terraform/fleet.tf).
    let doc = template
        .replace(
            "${peer_urls}",
            r#"["http://10.0.0.11:5000","http://10.0.0.12:5000","http://10.0.0.13:5000"]"#,
        )
        .replace("${peer_token}", TOKEN)
        .replace("${fleet_cidr}", "10.0.0.0/16");
    assert!(
        !doc.contains("${"),
        "a placeholder terraform does not fill:\n{doc}"
    );
    let unit = std::fs::read_to_string(root.join("deploy/systemd/regcache.service")).expect("unit");
    assert_eq!(
        cloud_init_file(&doc, "/etc/systemd/system/regcache.service").trim_end(),
        unit.trim_end(),
        "the fleet's unit must be deploy/systemd/regcache.service"
    );
    let work = tempfile::TempDir::new_in(env!("CARGO_TARGET_TMPDIR")).expect("work dir");
    let token = work.path().join("peer-token");
    std::fs::write(&token, cloud_init_file(&doc, "/etc/regcache/peer-token")).expect("token");
    let config = work.path().join("config.toml");
    let text = cloud_init_file(&doc, "/etc/regcache/config.toml")
        .replace("/etc/regcache/peer-token", &token.display().to_string());
    std::fs::write(&config, &text).expect("config");
    let out = Process::run_to_end(&["check-config", &config.display().to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("peers: [\"http://10.0.0.11:5000/\""),
        "{}{stdout}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains(TOKEN), "check-config printed the token");
}

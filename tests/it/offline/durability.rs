//! The storage lifecycle against the in-process fake upstream: the size cap's eviction, pins, and
//! a blob still being sent from its fill.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::durability::blob_file;
use crate::support::fake::FakeUpstream;
use crate::support::regcache::{client, config_for, stored, Regcache};

/// The body of `GET /v2/app/img{i}/blobs/{layer}` on `rc` (`what` names the request).
async fn get_img_blob(
    c: &reqwest::Client,
    rc: &Regcache,
    i: usize,
    layer: &str,
    what: &str,
) -> Bytes {
    c.get(format!("{}/v2/app/img{i}/blobs/{layer}", rc.url()))
        .send()
        .await
        .expect(what)
        .bytes()
        .await
        .expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_cap_evicts_least_recently_used_images_but_never_pinned_ones() {
    let fake = FakeUpstream::start().await;
    let mut images = Vec::new();
    for i in 0..4u8 {
        let layer = Bytes::from(vec![i; 8 << 20]);
        images.push(fake.add_image(&format!("app/img{i}"), "v1", layer));
    }
    let rc = Regcache::start(&config_for(
        &fake.url(),
        "",
        "[store]\nmax_size = \"20MiB\"\nlow_water = 90\ngc_interval = \"100ms\"",
    ));
    let c = client();
    let r = c
        .post(format!("{}/_regcache/pins?image=app/img0:v1", rc.url()))
        .header("x-regcache-operator", "1")
        .send()
        .await
        .expect("pin");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    for (i, (_, layer)) in images.iter().enumerate() {
        let r = c
            .get(format!("{}/v2/app/img{i}/manifests/v1", rc.url()))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .expect("manifest");
        assert_eq!(r.status(), 200);
        let body = get_img_blob(&c, &rc, i, layer, "blob").await;
        assert_eq!(body.len(), 8 << 20);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let t = Instant::now();
    while rc.app.cache.store.used_bytes() > 20 << 20 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still {} bytes",
            rc.app.cache.store.used_bytes()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = rc.app.metrics.render();
    assert!(!m.contains("regcache_evicted_bytes_total 0\n"), "{m}");
    // The pinned image is whole; the oldest unpinned one (img1) was evicted with its tag.
    let before = fake.blob_gets(&images[0].1);
    let body = get_img_blob(&c, &rc, 0, &images[0].1, "pinned blob").await;
    assert_eq!(body.len(), 8 << 20);
    assert_eq!(
        fake.blob_gets(&images[0].1),
        before,
        "the pinned image was served from the cache"
    );
    let before = fake.blob_gets(&images[1].1);
    let body = get_img_blob(&c, &rc, 1, &images[1].1, "evicted blob").await;
    assert_eq!(body.len(), 8 << 20);
    assert_eq!(
        fake.blob_gets(&images[1].1),
        before + 1,
        "the evicted image is fetched again"
    );
    let pins = c
        .get(format!("{}/_regcache/pins", rc.url()))
        .header("x-regcache-operator", "1")
        .send()
        .await
        .expect("pins");
    let pins = pins.text().await.expect("pins body");
    assert!(pins.contains("app/img0:v1"), "{pins}");
}

/// `POST /_regcache/gc?target=0`: evict everything that may be evicted. Returns the answer.
async fn gc_to_zero(c: &reqwest::Client, rc: &Regcache) -> serde_json::Value {
    let r = c
        .post(format!("{}/_regcache/gc?target=0", rc.url()))
        .header("x-regcache-operator", "1")
        .send()
        .await
        .expect("POST gc");
    assert_eq!(r.status(), 200);
    serde_json::from_slice(&r.bytes().await.expect("gc body")).expect("gc JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_still_being_read_from_its_fill_is_not_evicted() {
    // Larger than what the socket buffers and the body channel can take in, so that the body is
    // still being sent, from the fill, when the fill has committed.
    const SIZE: usize = 64 << 20;
    let fake = FakeUpstream::start().await;
    let data = crate::support::images::pseudo_random(SIZE, 91);
    let digest = fake.add_blob("app/slowreader", data.clone());
    let rc = Regcache::with_upstream(&fake.url());
    let c = client();
    let mut resp = c
        .get(format!("{}/v2/app/slowreader/blobs/{digest}", rc.url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 200);
    let mut body = resp
        .chunk()
        .await
        .expect("chunk")
        .expect("a first chunk")
        .to_vec();
    let t = Instant::now();
    while !stored(&rc, &digest) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the fill did not commit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let file = blob_file(rc.data_dir(), &digest);
    let report = gc_to_zero(&c, &rc).await;
    assert!(
        stored(&rc, &digest) && file.exists(),
        "a blob whose body is still being sent (from its fill) was evicted: recorded {}, file \
         {}, gc answered {report}",
        stored(&rc, &digest),
        file.exists()
    );
    while let Some(chunk) = resp.chunk().await.expect("the rest of the body") {
        body.extend_from_slice(&chunk);
    }
    assert!(
        body.len() == SIZE && body[..] == data[..],
        "{} bytes, equal {}",
        body.len(),
        body[..] == data[..]
    );
    // The body has ended: nothing holds the blob any more.
    let t = Instant::now();
    while stored(&rc, &digest) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the blob stays held after its body ended"
        );
        gc_to_zero(&c, &rc).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!file.exists(), "evicted once no longer read");
}

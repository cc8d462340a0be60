//! Fetching one image through the server (`prefetch_one`): its manifest, the children of an
//! index for the wanted platforms, and each blob once per run (a `HEAD` when the server holds it,
//! a streamed and discarded `GET` otherwise), then the pin.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cmd::prefetch::jobs::Job;
use crate::cmd::prefetch::Platform;
use crate::cmd::remote::{error_message, query_value};
use crate::oci::media::{Accept, Kind};
use crate::oci::reference::Digest;

/// What happened to one image: a line on stderr, an element of `images` in the `--json` summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(super) struct Outcome {
    pub image: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub platforms: Vec<String>,
    pub blobs: u64,
    pub bytes: u64,
    pub fetched_bytes: u64,
    pub already_cached: bool,
}

/// Whether an image ended up on the server (`"cached"`) or not (`"failed"`, with a reason).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Status {
    Cached,
    #[default]
    Failed,
}

/// A blob of one repository handled during this run: its size once the server holds it.
type BlobCell = Arc<tokio::sync::OnceCell<u64>>;

/// What the images of one run share: the client, the download slots, the blobs handled so far
/// and the progress bars.
pub(super) struct Ctx {
    pub client: reqwest::Client,
    pub server: String,
    pub blob_slots: tokio::sync::Semaphore,
    /// Blobs by repository and digest, so that images sharing a blob (the same image by tag and
    /// by digest, platforms of one index, layers in common) move it once.
    pub blobs: std::sync::Mutex<HashMap<(String, String), BlobCell>>,
    pub multi: indicatif::MultiProgress,
    pub overall: indicatif::ProgressBar,
    pub terminal: bool,
}

fn is_index(media_type: &str, v: &serde_json::Value) -> bool {
    let media_type = media_type.split(';').next().unwrap_or(media_type).trim();
    matches!(
        Kind::of(media_type),
        Some(Kind::OciIndex | Kind::DockerList)
    ) || v.get("manifests").is_some()
}

async fn get_manifest(
    ctx: &Ctx,
    name: &str,
    reference: &str,
) -> anyhow::Result<(String, serde_json::Value, String)> {
    let url = format!("{}/v2/{name}/manifests/{reference}", ctx.server);
    // All four types: prefetch stores what docker, containerd and podman pull.
    let accept = Accept::ALL.header_value().unwrap_or_default();
    let resp = ctx.client.get(&url).header("accept", accept).send().await?;
    let status = resp.status();
    let media_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.bytes().await?;
    if !status.is_success() {
        anyhow::bail!("{name}:{reference}: {status}: {}", error_message(&body));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    Ok((media_type, v, digest))
}

/// [`fetch_blob`] once per repository and digest in this run; later callers wait for the first
/// and move nothing.
async fn fetch_blob_once(
    ctx: &Ctx,
    repo: &str,
    name: &str,
    digest: &str,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(u64, u64)> {
    let cell = Arc::clone(
        ctx.blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((repo.to_owned(), digest.to_owned()))
            .or_default(),
    );
    let mut ran = None;
    let size = *cell
        .get_or_try_init(|| async {
            let (size, moved) = fetch_blob(ctx, name, digest, bar).await?;
            ran = Some(moved);
            anyhow::Ok(size)
        })
        .await?;
    match ran {
        Some(moved) => Ok((size, moved)),
        None => {
            // Handled for another image of this run: its progress is complete.
            bar.inc(size);
            ctx.overall.inc(size);
            Ok((size, 0))
        }
    }
}

/// Makes sure the server holds one blob; returns (size, bytes moved).
async fn fetch_blob(
    ctx: &Ctx,
    name: &str,
    digest: &str,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(u64, u64)> {
    let url = format!("{}/v2/{name}/blobs/{digest}", ctx.server);
    let head = ctx.client.head(&url).send().await?;
    if !head.status().is_success() {
        anyhow::bail!("blob {digest}: {}", head.status());
    }
    let size = crate::upstream::header_length(&head).unwrap_or(0);
    let hit = head
        .headers()
        .get(crate::http::CACHE_HEADER)
        .is_some_and(|v| v.as_bytes() == b"hit");
    if hit {
        bar.inc(size);
        ctx.overall.inc(size);
        return Ok((size, 0));
    }
    let _slot = ctx.blob_slots.acquire().await?;
    let mut resp = ctx.client.get(&url).send().await?;
    if !resp.status().is_success() {
        anyhow::bail!("blob {digest}: {}", resp.status());
    }
    let expected = resp.content_length().unwrap_or(size);
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        got += chunk.len() as u64;
        bar.inc(chunk.len() as u64);
        ctx.overall.inc(chunk.len() as u64);
    }
    if got != expected {
        anyhow::bail!("blob {digest}: got {got} of {expected} bytes");
    }
    Ok((expected, got))
}

/// Config and layers of an image manifest (foreign layers with `urls` are not the cache's).
fn image_blobs(v: &serde_json::Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Some(c) = v.get("config") {
        if let Some(d) = c.get("digest").and_then(|d| d.as_str()) {
            out.push((
                d.to_owned(),
                c.get("size").and_then(|s| s.as_u64()).unwrap_or(0),
            ));
        }
    }
    for l in v
        .get("layers")
        .and_then(|l| l.as_array())
        .into_iter()
        .flatten()
    {
        if l.get("urls").is_some() {
            continue;
        }
        if let Some(d) = l.get("digest").and_then(|d| d.as_str()) {
            out.push((
                d.to_owned(),
                l.get("size").and_then(|s| s.as_u64()).unwrap_or(0),
            ));
        }
    }
    out
}

pub(super) async fn prefetch_one(
    ctx: Arc<Ctx>,
    job: Job,
    all_platforms: bool,
    pin: bool,
) -> Outcome {
    let mut o = Outcome {
        image: job.shown.clone(),
        ..Default::default()
    };
    match prefetch_inner(&ctx, &job, all_platforms, pin, &mut o).await {
        Ok(()) => {
            o.status = Status::Cached;
            o.already_cached = o.fetched_bytes == 0;
        }
        Err(e) => {
            o.status = Status::Failed;
            o.reason = Some(format!("{e:#}"));
        }
    }
    o
}

async fn prefetch_inner(
    ctx: &Ctx,
    job: &Job,
    all_platforms: bool,
    pin: bool,
    o: &mut Outcome,
) -> anyhow::Result<()> {
    let name = &job.reference.name;
    let reference = job.reference.reference().to_string();
    let (media_type, top, digest) = get_manifest(ctx, name, &reference).await?;
    o.digest = Some(digest);
    let mut manifests: Vec<serde_json::Value> = Vec::new();
    if is_index(&media_type, &top) {
        let children = top
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        let chosen: Vec<&serde_json::Value> = children
            .iter()
            .filter(|c| {
                let p = c.get("platform").cloned().unwrap_or_default();
                // Attestation manifests (unknown/unknown) are not images to run.
                p.get("os").and_then(|x| x.as_str()) != Some("unknown")
                    && (all_platforms || job.platforms.iter().any(|want| want.matches(&p)))
            })
            .collect();
        if chosen.is_empty() {
            let has: Vec<String> = children
                .iter()
                .filter_map(|c| {
                    let p = c.get("platform")?;
                    Some(format!(
                        "{}/{}",
                        p.get("os")?.as_str()?,
                        p.get("architecture")?.as_str()?
                    ))
                })
                .collect();
            let want: Vec<String> = job.platforms.iter().map(Platform::to_string).collect();
            anyhow::bail!(
                "no manifest for {} (the index has {})",
                want.join(", "),
                has.join(", ")
            );
        }
        for c in chosen {
            let d = c.get("digest").and_then(|d| d.as_str()).unwrap_or("");
            d.parse::<Digest>()
                .map_err(|e| anyhow::anyhow!("index child: {e}"))?;
            if let Some(p) = c.get("platform") {
                o.platforms.push(format!(
                    "{}/{}",
                    p.get("os").and_then(|x| x.as_str()).unwrap_or("?"),
                    p.get("architecture")
                        .and_then(|x| x.as_str())
                        .unwrap_or("?")
                ));
            }
            let (_, child, _) = get_manifest(ctx, name, d).await?;
            manifests.push(child);
        }
    } else {
        manifests.push(top);
    }
    let blobs: Vec<(String, u64)> = manifests.iter().flat_map(image_blobs).collect();
    let total: u64 = blobs.iter().map(|(_, s)| s).sum();
    ctx.overall.inc_length(total);
    let bar = ctx.multi.add(indicatif::ProgressBar::new(total));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:30!} {bar:30} {binary_bytes:>10}/{binary_total_bytes:10} {binary_bytes_per_sec:>12} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_message(job.shown.clone());
    let results = futures_util::future::join_all(
        blobs
            .iter()
            .map(|(d, _)| fetch_blob_once(ctx, &job.repo, name, d, &bar)),
    )
    .await;
    bar.finish_and_clear();
    for r in results {
        let (size, moved) = r?;
        o.blobs += 1;
        o.bytes += size;
        o.fetched_bytes += moved;
    }
    if pin {
        let url = format!(
            "{}/_regcache/pins?image={}",
            ctx.server,
            query_value(&job.shown)
        );
        let resp = ctx
            .client
            .post(&url)
            .header(crate::http::OPERATOR_HEADER, "1")
            .send()
            .await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.bytes().await.unwrap_or_default();
            anyhow::bail!("pinning failed: {status}: {}", error_message(&body));
        }
    }
    Ok(())
}

//! Fetching one image through the server (`prefetch_one`): its manifest, the children of an
//! index for the wanted platforms, and each blob once per run (a `HEAD` when the server holds it,
//! a streamed and discarded `GET` otherwise), each confirmed committed ([`commit`]), then the pin.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::cmd::prefetch::commit::{self, Object, Uncommitted};
use crate::cmd::prefetch::jobs::Job;
use crate::cmd::prefetch::quota::Quotas;
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
    /// Manifests confirmed stored: the one the reference names, and an index's chosen children.
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
    pub fetched_bytes: u64,
    pub already_cached: bool,
    /// Every manifest and blob is committed on the server (and, with `--pin`, the pin).
    pub durable: bool,
    /// With `--pin`: whether the image was pinned (only once durable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
    /// What the server served but did not commit, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub uncommitted: Vec<Uncommitted>,
}

/// Whether an image is durable on the server (`"cached"`), or all there but not all committed
/// (`"not_durable"`, with `uncommitted`), or could not be fetched (`"failed"`); both with a reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Status {
    Cached,
    NotDurable,
    #[default]
    Failed,
}

/// A blob once the server has served it: its size, and what kept it from being committed.
#[derive(Debug, Clone)]
pub(super) struct Served {
    size: u64,
    uncommitted: Option<Uncommitted>,
}

/// A blob of one repository handled during this run.
type BlobCell = Arc<tokio::sync::OnceCell<Served>>;

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
    /// How long to wait for the server to commit each manifest and blob (`--commit-timeout`).
    pub commit_timeout: Duration,
    /// The upstreams' quotas the server passed on, and `--on-quota`.
    pub quotas: Quotas,
}

/// The `x-regcache-cache` outcome of a server's answer.
pub(super) fn outcome(resp: &reqwest::Response) -> Option<&str> {
    resp.headers()
        .get(crate::http::CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
}

fn is_index(media_type: &str, v: &serde_json::Value) -> bool {
    let media_type = media_type.split(';').next().unwrap_or(media_type).trim();
    matches!(
        Kind::of(media_type),
        Some(Kind::OciIndex | Kind::DockerList)
    ) || v.get("manifests").is_some()
}

/// A manifest as the server served it.
struct Got {
    media_type: String,
    body: serde_json::Value,
    digest: String,
}

/// `GET`s a manifest, then confirms it stored: a `passthrough` answer (served, not stored)
/// or a `HEAD` by digest that never answers `hit` goes to `o.uncommitted`.
async fn get_manifest(
    ctx: &Ctx,
    job: &Job,
    reference: &str,
    o: &mut Outcome,
) -> anyhow::Result<Got> {
    let name = &job.reference.name;
    let url = format!("{}/v2/{name}/manifests/{reference}", ctx.server);
    // All four types: prefetch stores what docker, containerd and podman pull.
    let accept = Accept::ALL.header_value().unwrap_or_default();
    let resp = ctx.client.get(&url).header("accept", accept).send().await?;
    ctx.quotas.note(&job.upstream, resp.headers());
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
    let passthrough = outcome(&resp) == Some("passthrough");
    let body = resp.bytes().await?;
    if !status.is_success() {
        anyhow::bail!("{name}:{reference}: {status}: {}", error_message(&body));
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    if digest.parse::<Digest>().is_err() {
        anyhow::bail!("{name}:{reference}: the server sent no valid Docker-Content-Digest");
    }
    let uncommitted = if passthrough {
        Some(commit::not_stored(ctx, Object::Manifest, &digest).await)
    } else {
        let by_digest = format!("{}/v2/{name}/manifests/{digest}", ctx.server);
        commit::confirm(ctx, Object::Manifest, &by_digest, &digest).await?
    };
    match uncommitted {
        None => o.manifests += 1,
        Some(u) => o.uncommitted.push(u),
    }
    Ok(Got {
        media_type,
        body: v,
        digest,
    })
}

/// [`fetch_blob`] once per repository and digest in this run; later callers wait for the first
/// and move nothing. Returns the blob and the bytes moved.
async fn fetch_blob_once(
    ctx: &Ctx,
    repo: &str,
    name: &str,
    digest: &str,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(Served, u64)> {
    let cell = Arc::clone(
        ctx.blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((repo.to_owned(), digest.to_owned()))
            .or_default(),
    );
    let mut ran = None;
    let served = cell
        .get_or_try_init(|| async {
            let (served, moved) = fetch_blob(ctx, name, digest, bar).await?;
            ran = Some(moved);
            anyhow::Ok(served)
        })
        .await?
        .clone();
    match ran {
        Some(moved) => Ok((served, moved)),
        None => {
            // Handled for another image of this run: its progress is complete.
            bar.inc(served.size);
            ctx.overall.inc(served.size);
            Ok((served, 0))
        }
    }
}

/// Makes sure the server holds one blob and has committed it; returns it and the bytes moved.
async fn fetch_blob(
    ctx: &Ctx,
    name: &str,
    digest: &str,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(Served, u64)> {
    let url = format!("{}/v2/{name}/blobs/{digest}", ctx.server);
    let head = ctx.client.head(&url).send().await?;
    if !head.status().is_success() {
        anyhow::bail!("blob {digest}: {}", head.status());
    }
    let size = crate::upstream::header_length(&head).unwrap_or(0);
    if outcome(&head) == Some("hit") {
        // Recorded in the store: committed already.
        bar.inc(size);
        ctx.overall.inc(size);
        let served = Served {
            size,
            uncommitted: None,
        };
        return Ok((served, 0));
    }
    let (size, got, redirected) = {
        let _slot = ctx.blob_slots.acquire().await?;
        let mut resp = ctx.client.get(&url).send().await?;
        if !resp.status().is_success() {
            anyhow::bail!("blob {digest}: {}", resp.status());
        }
        // `[store.s3] redirect`: the server sent the client to its shared bucket's copy.
        let redirected = reqwest::Url::parse(&url).is_ok_and(|u| u.origin() != resp.url().origin());
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
        (expected, got, redirected)
    };
    // A blob in the shared bucket is stored there, and served from there (a redirect again).
    let uncommitted = if redirected {
        None
    } else {
        commit::confirm(ctx, Object::Blob, &url, digest).await?
    };
    Ok((Served { size, uncommitted }, got))
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
    if let Err(why) = ctx
        .quotas
        .before_pull(&job.upstream, job.quota_reserve)
        .await
    {
        o.reason = Some(why);
        return o;
    }
    match prefetch_inner(&ctx, &job, all_platforms, pin, &mut o).await {
        Ok(()) if o.uncommitted.is_empty() => {
            o.status = Status::Cached;
            o.durable = true;
            o.already_cached = o.fetched_bytes == 0;
        }
        Ok(()) => {
            o.status = Status::NotDurable;
            let what: Vec<String> = o.uncommitted.iter().map(ToString::to_string).collect();
            o.reason = Some(what.join("; "));
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
    let Got {
        media_type,
        body: top,
        digest,
    } = get_manifest(ctx, job, &reference, o).await?;
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
            manifests.push(get_manifest(ctx, job, d, o).await?.body);
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
        let (served, moved) = r?;
        o.blobs += 1;
        o.bytes += served.size;
        o.fetched_bytes += moved;
        o.uncommitted.extend(served.uncommitted);
    }
    if pin {
        o.pinned = Some(false);
    }
    // Pinned once durable: the server answers after the pin's database commit.
    if pin && o.uncommitted.is_empty() {
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
        o.pinned = Some(true);
    }
    Ok(())
}

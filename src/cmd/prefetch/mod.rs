//! `regcache prefetch`: warms a running regcache with the images a build or a machine will pull.
//!
//! It talks to the server over HTTP like any client, so the server fills its own cache with its own
//! upstream credentials. Blobs stream through the prefetcher (over loopback, discarded as they
//! arrive): the server's normal pull path fetches, verifies and commits them, and the prefetcher
//! sees real progress. A blob the server already holds is only `HEAD`ed (the server answers
//! `x-regcache-cache: hit`), so a second run moves almost no bytes.

pub mod dockerfile;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::cmd::{ConfigArgs, EXIT_FAILURE, EXIT_USAGE};
use crate::http::router::Router as _;
use crate::oci::media::{Accept, Kind};
use crate::oci::reference::{Digest, ImageRef};

/// Exit code when Ctrl-C stopped the run.
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// Images as a user would type them: alpine, alpine:3.20, ghcr.io/org/app:1.2, name@sha256:…
    pub images: Vec<String>,
    /// A file with one image per line (`#` comments and blank lines ignored).
    #[arg(short = 'f', long = "file")]
    pub files: Vec<PathBuf>,
    /// Every FROM (and COPY --from) image of a Dockerfile; repeatable.
    #[arg(long = "dockerfile")]
    pub dockerfiles: Vec<PathBuf>,
    /// A build argument for Dockerfiles (K=V); repeatable.
    #[arg(long = "build-arg")]
    pub build_args: Vec<String>,
    /// Platform to fetch from multi-platform images (os/arch[/variant]); repeatable.
    /// Default: this machine's.
    #[arg(long = "platform")]
    pub platforms: Vec<String>,
    /// Fetch every platform of multi-platform images.
    #[arg(long)]
    pub all_platforms: bool,
    /// Pin the prefetched images against eviction (the server must be on loopback).
    #[arg(long)]
    pub pin: bool,
    /// Blobs fetched at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Print what would be fetched, fetch nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// The regcache to fill (default: the configured listen address).
    #[arg(long)]
    pub server: Option<String>,
    /// Credentials (USER:PASSWORD) for a regcache protected by an htpasswd file.
    #[arg(long, env = "REGCACHE_PREFETCH_AUTH", hide_env_values = true)]
    pub auth: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// A platform as `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        };
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_ascii_lowercase(),
                arch: arch.to_ascii_lowercase(),
                variant: None,
            }),
            [os, arch, v] if ok(os) && ok(arch) && ok(v) => Ok(Platform {
                os: os.to_ascii_lowercase(),
                arch: arch.to_ascii_lowercase(),
                variant: Some(v.to_ascii_lowercase()),
            }),
            _ => Err(format!(
                "invalid platform {s:?} (expected os/arch[/variant], e.g. linux/arm64)"
            )),
        }
    }

    /// This machine's platform, in OCI terms.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: None,
        }
    }

    fn matches(&self, v: &serde_json::Value) -> bool {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
        s("os") == self.os
            && s("architecture") == self.arch
            && self
                .variant
                .as_deref()
                .is_none_or(|want| s("variant") == want)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One image to prefetch.
#[derive(Debug, Clone)]
struct Job {
    reference: ImageRef,
    shown: String,
    /// The repository the server keeps it under ([`Names::repo`]): one key for every spelling.
    repo: String,
    platforms: Vec<Platform>,
}

/// Normalises image names the way the server routes them (`Routing::route`): `busybox`,
/// `library/busybox`, `docker.io/library/busybox` and `index.docker.io/busybox` are one repository
/// of the default upstream. Without a configuration to route with, names are compared as written.
struct Names(Option<crate::app::Routing>);

impl Names {
    fn new(config: Option<crate::config::Config>) -> Names {
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        Names(config.and_then(|c| crate::app::Routing::build(c, &metrics, None).ok()))
    }

    /// `upstream NUL repository` for a name the configuration routes; the name itself otherwise
    /// (the server then says what is wrong with it).
    fn repo(&self, name: &str) -> String {
        match self.0.as_ref().map(|r| r.route(name, None)) {
            Some(Ok(route)) => format!("{}\0{}", route.upstream.name(), route.repo),
            _ => name.to_owned(),
        }
    }
}

/// What happened to one image.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Outcome {
    image: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    platforms: Vec<String>,
    blobs: u64,
    bytes: u64,
    fetched_bytes: u64,
    already_cached: bool,
}

/// A blob of one repository handled during this run: its size once the server holds it.
type BlobCell = Arc<tokio::sync::OnceCell<u64>>;

struct Ctx {
    client: reqwest::Client,
    server: String,
    blob_slots: tokio::sync::Semaphore,
    /// Blobs by repository and digest, so that images sharing a blob (the same image by tag and
    /// by digest, platforms of one index, layers in common) move it once.
    blobs: std::sync::Mutex<HashMap<(String, String), BlobCell>>,
    multi: indicatif::MultiProgress,
    overall: indicatif::ProgressBar,
    terminal: bool,
}

/// Ends a run that fetched nothing: the message on stderr and, with `--json`, as
/// `{"ok":false,"exit_code":N,"error":"…"}` on stdout, so that a script reading stdout always gets
/// one JSON document.
pub fn fail_early(json: bool, code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("regcache prefetch: {msg}");
    if json {
        println!("{}", json_error(code, &msg.to_string()));
    }
    ExitCode::from(code)
}

/// The JSON document of a run that ended before fetching anything.
pub fn json_error(code: u8, msg: &str) -> serde_json::Value {
    serde_json::json!({ "ok": false, "exit_code": code, "error": msg })
}

/// Builds the job list; every error here is a usage error, before anything is fetched.
fn jobs(args: &PrefetchArgs, names: &Names) -> Result<Vec<Job>, String> {
    let default_platforms: Vec<Platform> = if args.platforms.is_empty() {
        vec![Platform::host()]
    } else {
        args.platforms
            .iter()
            .map(|p| Platform::parse(p))
            .collect::<Result<_, _>>()?
    };
    let mut build_args = HashMap::new();
    for kv in &args.build_args {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--build-arg {kv:?} is not K=V"))?;
        build_args.insert(k.to_owned(), v.to_owned());
    }
    let mut wanted: Vec<(String, Option<Platform>, String)> = Vec::new();
    for i in &args.images {
        wanted.push((i.clone(), None, format!("argument {i:?}")));
    }
    for f in &args.files {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                wanted.push((line.to_owned(), None, format!("{}:{}", f.display(), n + 1)));
            }
        }
    }
    // A build runs on this machine (BUILDPLATFORM) for each target platform (TARGETPLATFORM):
    // the Dockerfile is read once per target, and each image gets the platform it is pulled for.
    let build = Platform::host();
    for d in &args.dockerfiles {
        let text =
            std::fs::read_to_string(d).map_err(|e| format!("cannot read {}: {e}", d.display()))?;
        for target in &default_platforms {
            let images =
                crate::cmd::prefetch::dockerfile::images(&text, &build_args, target, &build)
                    .map_err(|e| format!("{}: {e}", d.display()))?;
            for img in images {
                let origin = format!("{}:{}", d.display(), img.line);
                wanted.push((img.image, Some(img.platform), origin));
            }
        }
    }
    if wanted.is_empty() {
        return Err("no images given (IMAGE..., -f FILE or --dockerfile PATH)".into());
    }
    let mut out: Vec<Job> = Vec::new();
    for (text, platform, origin) in wanted {
        let reference = ImageRef::parse(&text).map_err(|e| format!("{origin}: {e}"))?;
        let platforms = match platform {
            Some(p) => vec![p],
            None => default_platforms.clone(),
        };
        // One job per repository and reference (the digest when given, as docker pulls it): the
        // first spelling names it.
        let repo = names.repo(&reference.name);
        let wanted = reference.reference();
        if let Some(existing) = out
            .iter_mut()
            .find(|j| j.repo == repo && j.reference.reference() == wanted)
        {
            for p in platforms {
                if !existing.platforms.contains(&p) {
                    existing.platforms.push(p);
                }
            }
        } else {
            out.push(Job {
                shown: reference.to_string(),
                reference,
                repo,
                platforms,
            });
        }
    }
    Ok(out)
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

/// The code and message of an OCI error body (`{"errors":[…]}`), else the start of the body.
pub fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = &v["errors"][0];
            Some(format!(
                "{} {}",
                e["code"].as_str()?,
                e["message"].as_str().unwrap_or("")
            ))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
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

async fn prefetch_one(ctx: Arc<Ctx>, job: Job, all_platforms: bool, pin: bool) -> Outcome {
    let mut o = Outcome {
        image: job.shown.clone(),
        ..Default::default()
    };
    match prefetch_inner(&ctx, &job, all_platforms, pin, &mut o).await {
        Ok(()) => {
            o.status = "cached";
            o.already_cached = o.fetched_bytes == 0;
        }
        Err(e) => {
            o.status = "failed";
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
            crate::cmd::admin::urlencode(&job.shown)
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

fn line_for(o: &Outcome) -> String {
    match o.status {
        "cached" if o.already_cached => format!(
            "cached  {} ({} blobs, {}, already cached)",
            o.image,
            o.blobs,
            indicatif::HumanBytes(o.bytes)
        ),
        "cached" => format!(
            "cached  {} ({} blobs, {}, {} fetched)",
            o.image,
            o.blobs,
            indicatif::HumanBytes(o.bytes),
            indicatif::HumanBytes(o.fetched_bytes)
        ),
        _ => format!(
            "FAILED  {}: {}",
            o.image,
            o.reason.as_deref().unwrap_or("unknown error")
        ),
    }
}

pub fn run(args: PrefetchArgs) -> ExitCode {
    // The configuration names the server (without --server) and routes names like it does.
    let (config, server) = match (args.config.load(None), &args.server) {
        (Ok(c), Some(s)) => (Some(c), s.trim_end_matches('/').to_owned()),
        (Ok(c), None) => {
            let scheme = if c.tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://{}", c.listen);
            (Some(c), url)
        }
        (Err(e), None) => return fail_early(args.json, EXIT_USAGE, e),
        (Err(e), Some(s)) => {
            eprintln!(
                "regcache prefetch: warning: {e}; images are merged only when written the same way"
            );
            (None, s.trim_end_matches('/').to_owned())
        }
    };
    let jobs = match jobs(&args, &Names::new(config)) {
        Ok(j) => j,
        Err(e) => return fail_early(args.json, EXIT_USAGE, e),
    };
    if args.concurrency == 0 {
        return fail_early(args.json, EXIT_USAGE, "--concurrency must be at least 1");
    }
    if args.dry_run {
        for j in &jobs {
            let platforms = if args.all_platforms {
                "all platforms".to_owned()
            } else {
                j.platforms
                    .iter()
                    .map(Platform::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "image": j.shown, "platforms": platforms, "server": server })
                );
            } else {
                println!(
                    "would fetch {} ({platforms}) through {server}{}",
                    j.shown,
                    if args.pin { ", and pin it" } else { "" }
                );
            }
        }
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail_early(args.json, EXIT_FAILURE, e),
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = indicatif::MultiProgress::with_draw_target(if terminal {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    });
    let overall = multi.add(indicatif::ProgressBar::new(0));
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix:30!} {bar:30} {binary_bytes:>10}/{binary_total_bytes:10} {binary_bytes_per_sec:>12} eta {eta}",
    ) {
        overall.set_style(style);
    }
    overall.set_prefix("total");
    let loopback = reqwest::Url::parse(&server)
        .ok()
        .and_then(|u| {
            u.host_str().map(|h| {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            })
        })
        .unwrap_or(false);
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    if loopback {
        builder = builder.no_proxy();
    }
    if let Some(auth) = &args.auth {
        let Some((user, pass)) = auth.split_once(':') else {
            return fail_early(args.json, EXIT_USAGE, "--auth must be USER:PASSWORD");
        };
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        let mut headers = reqwest::header::HeaderMap::new();
        match reqwest::header::HeaderValue::from_str(&format!("Basic {token}")) {
            Ok(mut v) => {
                v.set_sensitive(true);
                headers.insert(reqwest::header::AUTHORIZATION, v);
            }
            Err(_) => {
                return fail_early(
                    args.json,
                    EXIT_USAGE,
                    "--auth holds characters that cannot be sent",
                )
            }
        }
        builder = builder.default_headers(headers);
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => return fail_early(args.json, EXIT_FAILURE, e),
    };
    let ctx = Arc::new(Ctx {
        client,
        server,
        blob_slots: tokio::sync::Semaphore::new(args.concurrency),
        blobs: std::sync::Mutex::new(HashMap::new()),
        multi,
        overall,
        terminal,
    });
    let all_platforms = args.all_platforms;
    let pin = args.pin;
    let work = {
        let ctx = Arc::clone(&ctx);
        async move {
            let image_slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
            let mut tasks = Vec::new();
            for job in jobs {
                let (ctx, slots) = (Arc::clone(&ctx), Arc::clone(&image_slots));
                tasks.push(tokio::spawn(async move {
                    let _slot = slots.acquire().await;
                    let o = prefetch_one(Arc::clone(&ctx), job, all_platforms, pin).await;
                    let line = line_for(&o);
                    if ctx.terminal {
                        let _ = ctx.multi.println(line);
                    } else {
                        eprintln!("{line}");
                    }
                    o
                }));
            }
            let mut outcomes = Vec::new();
            for t in tasks {
                match t.await {
                    Ok(o) => outcomes.push(o),
                    Err(e) => outcomes.push(Outcome {
                        image: "?".into(),
                        status: "failed",
                        reason: Some(e.to_string()),
                        ..Default::default()
                    }),
                }
            }
            outcomes
        }
    };
    let outcomes = rt.block_on(async {
        tokio::select! {
            o = work => Some(o),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    ctx.overall.finish_and_clear();
    let Some(outcomes) = outcomes else {
        return fail_early(args.json, EXIT_INTERRUPTED, "interrupted");
    };
    let failed = outcomes.iter().filter(|o| o.status != "cached").count();
    let all_cached = outcomes.iter().all(|o| o.already_cached);
    if args.json {
        let summary = serde_json::json!({
            "ok": failed == 0,
            "images": outcomes,
            "fetched_bytes": outcomes.iter().map(|o| o.fetched_bytes).sum::<u64>(),
        });
        println!("{summary}");
    }
    if failed > 0 {
        eprintln!(
            "regcache prefetch: {failed} of {} images failed:",
            outcomes.len()
        );
        for o in outcomes.iter().filter(|o| o.status != "cached") {
            eprintln!("  {}: {}", o.image, o.reason.as_deref().unwrap_or(""));
        }
        ExitCode::from(EXIT_FAILURE)
    } else {
        if all_cached {
            eprintln!(
                "regcache prefetch: all {} images were already cached",
                outcomes.len()
            );
        } else {
            eprintln!("regcache prefetch: {} images cached", outcomes.len());
        }
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse_and_match() {
        let p = Platform::parse("linux/arm64/v8").expect("platform");
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/../x").is_err());
        let v = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert!(p.matches(&v));
        assert!(Platform::parse("linux/arm64").expect("p").matches(&v));
        assert!(!Platform::parse("linux/amd64").expect("p").matches(&v));
    }
}

//! `regcache prefetch`: warms a running regcache with the images a build or a machine will pull.
//!
//! It talks to the server over HTTP like any client, so the server fills its own cache with its own
//! upstream credentials. Blobs stream through the prefetcher (over loopback, discarded as they
//! arrive): the server's normal pull path fetches, verifies and commits them, and the prefetcher
//! sees real progress. A blob the server already holds is only `HEAD`ed (the server answers
//! `x-regcache-cache: hit`), so a second run moves almost no bytes. Exit 0 means durable: every
//! manifest and blob was confirmed committed on the server before the run ends.
//!
//! This file has the flags, the run and its output; [`jobs`] what to fetch, [`fetch`] how one
//! image is fetched, [`commit`] how its commit is confirmed, [`quota`] the upstreams' pull quotas
//! (`--on-quota`), [`dockerfile`] and [`shell`] reading Dockerfiles, [`platform`] platforms.

mod commit;
pub mod dockerfile;
mod fetch;
mod jobs;
mod platform;
mod quota;
pub mod shell;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::cmd::args::{ClientArgs, ConfigArgs};
use crate::cmd::{remote, runtime, Exit};
use fetch::{Ctx, Outcome, Status};
use jobs::{Job, Names};
pub use platform::Platform;
pub use quota::OnQuota;
use quota::Quotas;

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
    /// How long to wait, after its last byte, for the server to commit each manifest and blob
    /// (fsync and database record); an image not committed by then is not durable (exit 1).
    #[arg(long, default_value = "60s", value_parser = crate::config::parse_duration)]
    pub commit_timeout: Duration,
    /// When an upstream's pull quota, as the server passes it on, is at or under that
    /// upstream's `quota_reserve`: `stop` fails the images still to fetch from it (exit 1),
    /// `wait` sleeps until the quota's window has passed (at most `--max-wait`).
    #[arg(long, value_enum, default_value = "stop")]
    pub on_quota: OnQuota,
    /// The longest `--on-quota wait` sleeps for a quota's window; a longer one stops the run.
    #[arg(long, default_value = "15m", value_parser = crate::config::parse_duration)]
    pub max_wait: Duration,
    /// Print what would be fetched, fetch nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// The regcache to fill.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Credentials (USER:PASSWORD) for a regcache protected by an htpasswd file.
    #[arg(long, env = "REGCACHE_PREFETCH_AUTH", hide_env_values = true)]
    pub auth: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Ends a run that fetched nothing: the message on stderr and, with `--json`, as
/// `{"ok":false,"exit_code":N,"error":"…"}` on stdout, so that a script reading stdout always gets
/// one JSON document.
fn fail_early(json: bool, code: Exit, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("regcache prefetch: {msg}");
    if json {
        println!("{}", json_error(code, &msg.to_string()));
    }
    code.into()
}

/// The JSON document of a run that ended before fetching anything.
pub fn json_error(code: Exit, msg: &str) -> serde_json::Value {
    serde_json::json!({ "ok": false, "exit_code": code.code(), "error": msg })
}

fn line_for(o: &Outcome) -> String {
    match o.status {
        Status::Cached if o.already_cached => format!(
            "cached  {} ({} blobs, {}, already cached)",
            o.image,
            o.blobs,
            indicatif::HumanBytes(o.bytes)
        ),
        Status::Cached => format!(
            "cached  {} ({} blobs, {}, {} fetched)",
            o.image,
            o.blobs,
            indicatif::HumanBytes(o.bytes),
            indicatif::HumanBytes(o.fetched_bytes)
        ),
        Status::NotDurable => format!(
            "NOT DURABLE {}: {}",
            o.image,
            o.reason.as_deref().unwrap_or("not committed")
        ),
        Status::Failed => format!(
            "FAILED  {}: {}",
            o.image,
            o.reason.as_deref().unwrap_or("unknown error")
        ),
    }
}

pub fn run(args: PrefetchArgs) -> ExitCode {
    // The configuration names the server (without --server) and routes names like it does.
    let (config, server) = match (args.config.load(None), args.client.given()) {
        (Ok(c), Some(s)) => (Some(c), s),
        (Ok(c), None) => {
            let url = remote::configured_url(&c);
            (Some(c), url)
        }
        (Err(e), None) => return fail_early(args.json, Exit::Usage, e),
        (Err(e), Some(s)) => {
            eprintln!(
                "regcache prefetch: warning: {e}; images are merged only when written the same way"
            );
            (None, s)
        }
    };
    let jobs = match jobs::jobs(&args, &Names::new(config)) {
        Ok(j) => j,
        Err(e) => return fail_early(args.json, Exit::Usage, e),
    };
    if args.concurrency == 0 {
        return fail_early(args.json, Exit::Usage, "--concurrency must be at least 1");
    }
    if args.dry_run {
        dry_run(&args, &jobs, &server);
        return Exit::Success.into();
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail_early(args.json, Exit::Failure, e),
    };
    let (multi, overall, terminal) = progress();
    let client = match client(&server, args.auth.as_deref()) {
        Ok(c) => c,
        Err((code, e)) => return fail_early(args.json, code, e),
    };
    let ctx = Arc::new(Ctx {
        client,
        server,
        blob_slots: tokio::sync::Semaphore::new(args.concurrency),
        blobs: std::sync::Mutex::new(HashMap::new()),
        multi,
        overall,
        terminal,
        commit_timeout: args.commit_timeout,
        quotas: Quotas::new(args.on_quota, args.max_wait),
    });
    let work = fetch_all(
        Arc::clone(&ctx),
        jobs,
        args.concurrency,
        args.all_platforms,
        args.pin,
    );
    let outcomes = rt.block_on(async {
        tokio::select! {
            o = work => Some(o),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    ctx.overall.finish_and_clear();
    let Some(outcomes) = outcomes else {
        return fail_early(args.json, Exit::Interrupted, "interrupted");
    };
    summary(&outcomes, &ctx.quotas, args.json)
}

/// `--dry-run`: what would be fetched, one line (or JSON object) per image.
fn dry_run(args: &PrefetchArgs, jobs: &[Job], server: &str) {
    for j in jobs {
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
}

/// The progress bars (drawn only when stderr is a terminal): one per image under a total.
fn progress() -> (indicatif::MultiProgress, indicatif::ProgressBar, bool) {
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
    (multi, overall, terminal)
}

/// The HTTP client for `server`: direct on loopback, with `--auth` as basic credentials.
fn client(server: &str, auth: Option<&str>) -> Result<reqwest::Client, (Exit, String)> {
    remote::client_builder(server, auth)?
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| (Exit::Failure, e.to_string()))
}

/// Fetches every job, at most `concurrency` images at once, printing a line per image as it
/// ends; the outcomes in the order of the jobs.
async fn fetch_all(
    ctx: Arc<Ctx>,
    jobs: Vec<Job>,
    concurrency: usize,
    all_platforms: bool,
    pin: bool,
) -> Vec<Outcome> {
    let image_slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for job in jobs {
        // Taken here, not in the task: images start in the order given (the first ones are
        // those fetched before an upstream's quota reserve stops the run).
        let slot = Arc::clone(&image_slots).acquire_owned().await;
        let ctx = Arc::clone(&ctx);
        tasks.push(tokio::spawn(async move {
            let _slot = slot;
            let o = fetch::prefetch_one(Arc::clone(&ctx), job, all_platforms, pin).await;
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
                status: Status::Failed,
                reason: Some(e.to_string()),
                ..Default::default()
            }),
        }
    }
    outcomes
}

/// The end of a run: the `--json` summary on stdout, the failures (exit 1) or the count on
/// stderr.
fn summary(outcomes: &[Outcome], quotas: &Quotas, json: bool) -> ExitCode {
    let failed = outcomes
        .iter()
        .filter(|o| o.status != Status::Cached)
        .count();
    let all_cached = outcomes.iter().all(|o| o.already_cached);
    if json {
        let summary = serde_json::json!({
            "ok": failed == 0,
            "images": outcomes,
            "fetched_bytes": outcomes.iter().map(|o| o.fetched_bytes).sum::<u64>(),
            "quota": quotas.json(),
        });
        println!("{summary}");
    }
    // What the answers that went upstream said of its quota.
    for line in quotas.lines() {
        eprintln!("regcache prefetch: {line}");
    }
    if failed > 0 {
        eprintln!(
            "regcache prefetch: {failed} of {} images failed:",
            outcomes.len()
        );
        for o in outcomes.iter().filter(|o| o.status != Status::Cached) {
            let not_durable = if o.status == Status::NotDurable {
                "not durable: "
            } else {
                ""
            };
            eprintln!(
                "  {}: {not_durable}{}",
                o.image,
                o.reason.as_deref().unwrap_or("")
            );
        }
        Exit::Failure.into()
    } else {
        if all_cached {
            eprintln!(
                "regcache prefetch: all {} images were already cached",
                outcomes.len()
            );
        } else {
            eprintln!("regcache prefetch: {} images cached", outcomes.len());
        }
        Exit::Success.into()
    }
}

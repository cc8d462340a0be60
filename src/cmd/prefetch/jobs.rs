//! The images a `prefetch` run fetches ([`jobs`]): from the arguments, list files and
//! Dockerfiles, parsed, with their platforms, and merged when they name the same image.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cmd::prefetch::{dockerfile, Platform, PrefetchArgs};
use crate::http::router::Router as _;
use crate::oci::reference::ImageRef;

/// One image to prefetch.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub reference: ImageRef,
    pub shown: String,
    /// The repository the server keeps it under ([`Names::repo`]): one key for every spelling.
    pub repo: String,
    pub platforms: Vec<Platform>,
    /// The upstream the server routes it to, and that upstream's `quota_reserve`
    /// ([`Names::quota`]).
    pub upstream: String,
    pub quota_reserve: u64,
}

/// Normalises image names the way the server routes them (`Routing::route`): `busybox`,
/// `library/busybox`, `docker.io/library/busybox` and `index.docker.io/busybox` are one repository
/// of the default upstream. Without a configuration to route with, names are compared as written.
pub(super) struct Names(Option<crate::app::Routing>);

impl Names {
    pub fn new(config: Option<crate::config::Config>) -> Names {
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        // Names are only routed, never fetched: the upstream clients get the handle of a runtime
        // that never runs (a request on it would fail as cancelled).
        Names(config.and_then(|c| {
            let idle = tokio::runtime::Builder::new_current_thread().build().ok()?;
            crate::app::Routing::build(c, &metrics, idle.handle(), None).ok()
        }))
    }

    /// The upstream the configuration routes `name` to and its `quota_reserve`; without a
    /// configuration to route with, `the server's upstream` and no reserve.
    fn quota(&self, name: &str) -> (String, u64) {
        match self.0.as_ref().map(|r| r.route(name, None)) {
            Some(Ok(route)) => (
                route.upstream.name().to_owned(),
                route.upstream.config.quota_reserve,
            ),
            _ => ("(the server's upstream)".to_owned(), 0),
        }
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

/// Builds the job list; every error here is a usage error, before anything is fetched.
pub(super) fn jobs(args: &PrefetchArgs, names: &Names) -> Result<Vec<Job>, String> {
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
            let images = dockerfile::images(&text, &build_args, target, &build)
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
            let (upstream, quota_reserve) = names.quota(&reference.name);
            out.push(Job {
                shown: reference.to_string(),
                reference,
                repo,
                platforms,
                upstream,
                quota_reserve,
            });
        }
    }
    Ok(out)
}

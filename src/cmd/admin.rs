//! The store commands `gc`, `verify` and `pin`: run offline on the data directory, or, when a
//! server holds it, through that server's loopback-only `/_regcache/` endpoints.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};

use crate::app::App;
use crate::cmd::{ConfigArgs, EXIT_FAILURE, EXIT_USAGE};
use crate::config::Config;
use crate::http::router::Router as _;

/// Exit code of `verify` when it found inconsistencies.
pub const EXIT_PROBLEMS: u8 = 3;

#[derive(Debug, Args)]
pub struct ServerArg {
    /// URL of the running regcache to ask (default: the configured listen address, used only
    /// when a server holds the data directory).
    #[arg(long)]
    pub server: Option<String>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub server: ServerArg,
    /// Evict down to this size now (e.g. "10GiB"), whatever the configured limits.
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_size: Option<u64>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub server: ServerArg,
    /// Check only this many recorded blobs, chosen at random (presence, size and hash); the
    /// disk-to-database and tag checks stay complete.
    #[arg(long)]
    pub sample: Option<usize>,
    /// Remove what is corrupt or dangling, so that it is fetched again on demand.
    #[arg(long)]
    pub repair: bool,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    #[command(subcommand)]
    pub action: PinAction,
}

#[derive(Debug, Subcommand)]
pub enum PinAction {
    /// Pin an image (tag or digest, every platform) so that it is never evicted.
    Add {
        image: String,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove a pin.
    Rm {
        image: String,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List pins.
    List {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        server: ServerArg,
    },
}

/// Where a store command runs.
enum Target {
    Offline(Arc<App>),
    Server(String),
}

fn target(config: &Config, server: &ServerArg) -> anyhow::Result<Target> {
    if let Some(url) = &server.server {
        return Ok(Target::Server(url.trim_end_matches('/').to_owned()));
    }
    match App::open(config.clone()) {
        Ok(app) => Ok(Target::Offline(app)),
        Err(e) if e.to_string().contains("in use by another regcache") => {
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            Ok(Target::Server(format!("{scheme}://{}", config.listen)))
        }
        Err(e) => Err(e),
    }
}

async fn call(method: reqwest::Method, url: String) -> anyhow::Result<serde_json::Value> {
    // The operator endpoints answer loopback clients only; a loopback server's certificate is
    // typically self-signed, and there is no one in between to trust or distrust.
    let loopback = reqwest::Url::parse(&url).ok().is_some_and(|u| {
        let host = u.host_str().unwrap_or("");
        host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    let client = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(loopback)
        .build()?;
    let resp = client
        .request(method, &url)
        .header(crate::http::OPERATOR_HEADER, "1")
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the running regcache at {url}: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        anyhow::bail!(
            "{} (the server at {url} answered {status})",
            crate::cmd::prefetch::error_message(&body)
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn load(config: &ConfigArgs) -> Result<Config, ExitCode> {
    config.load(None).map_err(|e| {
        eprintln!("regcache: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("regcache: {e:#}");
    ExitCode::from(EXIT_FAILURE)
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

pub fn gc(args: GcArgs) -> ExitCode {
    let config = match load(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            match target(&config, &args.server)? {
                Target::Offline(app) => {
                    let report = app.collect(args.max_size).await?;
                    Ok((
                        report.manifests,
                        report.blobs,
                        report.bytes,
                        app.cache.store.used_bytes(),
                    ))
                }
                Target::Server(url) => {
                    let mut u = format!("{url}/_regcache/gc");
                    if let Some(t) = args.max_size {
                        u = format!("{u}?target={t}");
                    }
                    let v = call(reqwest::Method::POST, u).await?;
                    let n = |k: &str| v["evicted"][k].as_u64().unwrap_or(0);
                    Ok((
                        n("manifests"),
                        n("blobs"),
                        n("bytes"),
                        v["used_bytes"].as_u64().unwrap_or(0),
                    ))
                }
            }
        })
    });
    match result {
        Ok((manifests, blobs, bytes, used)) => {
            println!(
                "freed {} ({blobs} blobs, {manifests} manifests); the store now holds {}",
                human(bytes),
                human(used)
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// A terminal progress bar for `verify` (nothing when stderr is not a terminal).
struct Bar(Option<indicatif::ProgressBar>);

impl crate::store::verify::Progress for Bar {
    fn start(&mut self, total: u64) {
        if total > 0 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "verify {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            self.0 = Some(bar);
        }
    }
    fn advance(&mut self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
}

pub fn verify(args: VerifyArgs) -> ExitCode {
    let config = match load(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let opts = crate::store::verify::Options {
        hash: true,
        sample: args.sample,
        repair: args.repair,
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            match target(&config, &args.server)? {
                Target::Offline(app) => {
                    let store = Arc::clone(&app.cache.store);
                    let report = tokio::task::spawn_blocking(move || {
                        let mut bar = Bar(None);
                        let r = crate::store::verify::check(&store, opts, false, &mut bar);
                        if let Some(b) = bar.0 {
                            b.finish_and_clear();
                        }
                        r
                    })
                    .await??;
                    Ok(serde_json::to_value(&report)?)
                }
                Target::Server(url) => {
                    let mut u = format!("{url}/_regcache/verify?repair={}", args.repair);
                    if let Some(n) = args.sample {
                        u = format!("{u}&sample={n}");
                    }
                    call(reqwest::Method::POST, u).await
                }
            }
        })
    });
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let problems = report["problems"].as_array().cloned().unwrap_or_default();
    for p in &problems {
        println!(
            "{}\t{}\t{}",
            p["kind"].as_str().unwrap_or(""),
            p["what"].as_str().unwrap_or(""),
            p["detail"].as_str().unwrap_or("")
        );
    }
    eprintln!(
        "verify: {} blobs checked, {} hashed, {} problems{}",
        report["blobs_checked"].as_u64().unwrap_or(0),
        human(report["bytes_hashed"].as_u64().unwrap_or(0)),
        problems.len(),
        if args.repair {
            format!(", {} repaired", report["repaired"].as_u64().unwrap_or(0))
        } else {
            String::new()
        }
    );
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEMS)
    }
}

pub fn pin(args: PinArgs) -> ExitCode {
    let (image, config, server, method) = match &args.action {
        PinAction::Add {
            image,
            config,
            server,
        } => (Some(image), config, server, reqwest::Method::POST),
        PinAction::Rm {
            image,
            config,
            server,
        } => (Some(image), config, server, reqwest::Method::DELETE),
        PinAction::List { config, server } => (None, config, server, reqwest::Method::GET),
    };
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(i) = image {
        if let Err(e) = crate::oci::reference::ImageRef::parse(i) {
            eprintln!("regcache: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    let result: anyhow::Result<Vec<String>> = runtime().and_then(|rt| {
        rt.block_on(async {
            match target(&config, server)? {
                Target::Offline(app) => {
                    let store = &app.cache.store;
                    match image {
                        None => Ok(app.routing().pin_names(store)?),
                        Some(i) => {
                            let r = crate::oci::reference::ImageRef::parse(i)?;
                            let route = app
                                .route(&r.name, None)
                                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                            let reference = r.reference();
                            let key = route.key();
                            if method == reqwest::Method::POST && !stored(store, &key, &reference)?
                            {
                                anyhow::bail!(
                                    "cannot pin {i}: it is not stored in {}, and the store \
                                     commands cannot fetch images offline; start regcache (or \
                                     pass --server) and pin it again, which fetches it",
                                    config.data_dir.display()
                                );
                            }
                            let reference = reference.to_string();
                            if method == reqwest::Method::POST {
                                store.pin(&key, &reference)?;
                                Ok(vec![format!("pinned {i}")])
                            } else if store.unpin(&key, &reference)? {
                                Ok(vec![format!("unpinned {i}")])
                            } else {
                                anyhow::bail!("{i} was not pinned")
                            }
                        }
                    }
                }
                Target::Server(url) => {
                    let u = match image {
                        Some(i) => format!("{url}/_regcache/pins?image={}", urlencode(i)),
                        None => format!("{url}/_regcache/pins"),
                    };
                    let v = call(method.clone(), u).await?;
                    match image {
                        None => Ok(v["pins"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|p| p.as_str().map(str::to_owned))
                            .collect()),
                        Some(i) if method == reqwest::Method::POST => {
                            Ok(vec![format!("pinned {i}")])
                        }
                        Some(i) if v["changed"].as_bool() == Some(true) => {
                            Ok(vec![format!("unpinned {i}")])
                        }
                        Some(i) => anyhow::bail!("{i} was not pinned"),
                    }
                }
            }
        })
    });
    match result {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Whether the store holds the manifest that `reference` names for `repo`: the tag's manifest, or
/// the digest's manifest obtained for that repository.
fn stored(
    store: &crate::store::Store,
    repo: &crate::store::RepoKey,
    reference: &crate::oci::reference::Reference,
) -> anyhow::Result<bool> {
    use crate::oci::reference::{Digest, Reference};
    let digest = match reference {
        Reference::Tag(t) => match store.tag(repo, t)? {
            Some(rec) => rec.digest.parse::<Digest>().ok(),
            // Cached only for clients accepting fewer manifest types: a record under the tag.
            None => return Ok(store.tags(repo)?.iter().any(|x| x == t.as_str())),
        },
        Reference::Digest(d) => store.is_linked(repo, d)?.then(|| d.clone()),
    };
    Ok(match digest {
        Some(d) => store.manifest_info(&d)?.is_some(),
        None => false,
    })
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

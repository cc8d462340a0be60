//! `regcache pin add|rm|list`: pins images against eviction, offline on the data directory (only
//! what the store holds) or through the running server (which fetches what it lacks).

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::app::App;
use crate::cmd::args::{ClientArgs, ConfigArgs};
use crate::cmd::remote::{self, Target};
use crate::cmd::{fail, runtime, Exit};
use crate::config::Config;
use crate::http::router::Router as _;
use crate::oci::reference::{Digest, ImageRef, Reference};
use crate::store::{RepoKey, Store};

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
        server: ClientArgs,
    },
    /// Remove a pin.
    Rm {
        image: String,
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        server: ClientArgs,
    },
    /// List pins.
    List {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        server: ClientArgs,
    },
}

/// One image to pin or unpin: as the user wrote it (for messages and the server), and parsed.
struct Image<'a> {
    shown: &'a str,
    parsed: ImageRef,
}

impl<'a> Image<'a> {
    fn parse(shown: &'a str) -> Result<Image<'a>, crate::oci::reference::ParseError> {
        Ok(Image {
            shown,
            parsed: ImageRef::parse(shown)?,
        })
    }
}

/// What `pin` was asked to do.
enum Op<'a> {
    Add(Image<'a>),
    Rm(Image<'a>),
    List,
}

pub fn run(args: PinArgs) -> ExitCode {
    let (config, server) = match &args.action {
        PinAction::Add { config, server, .. }
        | PinAction::Rm { config, server, .. }
        | PinAction::List { config, server } => (config, server),
    };
    let config = match config.load_or_exit() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let op = match &args.action {
        PinAction::Add { image, .. } => Image::parse(image).map(Op::Add),
        PinAction::Rm { image, .. } => Image::parse(image).map(Op::Rm),
        PinAction::List { .. } => Ok(Op::List),
    };
    let op = match op {
        Ok(op) => op,
        Err(e) => {
            eprintln!("regcache: {e}");
            return Exit::Usage.into();
        }
    };
    let result: anyhow::Result<Vec<String>> = runtime().and_then(|rt| {
        rt.block_on(async {
            match remote::target(&config, server, rt.handle())? {
                Target::Offline(app) => offline(&app, &config, &op),
                Target::Server(url) => through_server(&url, &op).await,
            }
        })
    });
    match result {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            Exit::Success.into()
        }
        Err(e) => fail(e),
    }
}

/// `pin` on the data directory: only an image the store holds can be pinned.
fn offline(app: &App, config: &Config, op: &Op<'_>) -> anyhow::Result<Vec<String>> {
    let store = &app.cache.store;
    let (image, add) = match op {
        Op::List => return Ok(app.routing().pin_names(store)?),
        Op::Add(image) => (image, true),
        Op::Rm(image) => (image, false),
    };
    let i = image.shown;
    let route = app
        .route(&image.parsed.name, None)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let reference = image.parsed.reference();
    let key = route.key();
    if add && !stored(store, &key, &reference)? {
        anyhow::bail!(
            "cannot pin {i}: it is not stored in {}, and the store commands cannot fetch images \
             offline; start regcache (or pass --server) and pin it again, which fetches it",
            config.data_dir.display()
        );
    }
    let reference = reference.to_string();
    if add {
        store.pin(&key, &reference)?;
        Ok(vec![format!("pinned {i}")])
    } else if store.unpin(&key, &reference)? {
        Ok(vec![format!("unpinned {i}")])
    } else {
        anyhow::bail!("{i} was not pinned")
    }
}

/// `pin` through the running server's `/_regcache/pins`.
async fn through_server(url: &str, op: &Op<'_>) -> anyhow::Result<Vec<String>> {
    let (method, image) = match op {
        Op::Add(image) => (reqwest::Method::POST, Some(image)),
        Op::Rm(image) => (reqwest::Method::DELETE, Some(image)),
        Op::List => (reqwest::Method::GET, None),
    };
    let u = match image {
        Some(i) => format!(
            "{url}/_regcache/pins?image={}",
            remote::query_value(i.shown)
        ),
        None => format!("{url}/_regcache/pins"),
    };
    let v = remote::call(method, u).await?;
    match op {
        Op::List => Ok(v["pins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect()),
        Op::Add(i) => Ok(vec![format!("pinned {}", i.shown)]),
        Op::Rm(i) if v["changed"].as_bool() == Some(true) => {
            Ok(vec![format!("unpinned {}", i.shown)])
        }
        Op::Rm(i) => anyhow::bail!("{} was not pinned", i.shown),
    }
}

/// Whether the store holds the manifest that `reference` names for `repo`: the tag's manifest, or
/// the digest's manifest obtained for that repository.
fn stored(store: &Store, repo: &RepoKey, reference: &Reference) -> anyhow::Result<bool> {
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

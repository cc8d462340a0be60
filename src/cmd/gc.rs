//! `regcache gc`: evicts least recently used content down to the configured limits (or
//! `--max-size`), offline on the data directory or through the running server.

use std::process::ExitCode;

use clap::Args;

use crate::cmd::args::{ClientArgs, ConfigArgs};
use crate::cmd::remote::{self, Target};
use crate::cmd::{fail, runtime, Exit};

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub server: ClientArgs,
    /// Evict down to this size now (e.g. "10GiB"), whatever the configured limits.
    #[arg(long, value_parser = crate::config::parse_size)]
    pub max_size: Option<u64>,
}

/// What a collection did: manifests, blobs and bytes evicted, and the bytes the store now holds.
struct Freed {
    manifests: u64,
    blobs: u64,
    bytes: u64,
    used: u64,
}

pub fn run(args: GcArgs) -> ExitCode {
    let config = match args.config.load_or_exit() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            match remote::target(&config, &args.server, rt.handle())? {
                Target::Offline(app) => {
                    let report = app.collect(args.max_size).await?;
                    Ok(Freed {
                        manifests: report.manifests,
                        blobs: report.blobs,
                        bytes: report.bytes,
                        used: app.cache.store.used_bytes(),
                    })
                }
                Target::Server(url) => {
                    let mut u = format!("{url}/_regcache/gc");
                    if let Some(t) = args.max_size {
                        u = format!("{u}?target={t}");
                    }
                    let v = remote::call(reqwest::Method::POST, u).await?;
                    let n = |k: &str| v["evicted"][k].as_u64().unwrap_or(0);
                    Ok(Freed {
                        manifests: n("manifests"),
                        blobs: n("blobs"),
                        bytes: n("bytes"),
                        used: v["used_bytes"].as_u64().unwrap_or(0),
                    })
                }
            }
        })
    });
    match result {
        Ok(f) => {
            println!(
                "freed {} ({} blobs, {} manifests); the store now holds {}",
                indicatif::HumanBytes(f.bytes),
                f.blobs,
                f.manifests,
                indicatif::HumanBytes(f.used)
            );
            Exit::Success.into()
        }
        Err(e) => fail(e),
    }
}

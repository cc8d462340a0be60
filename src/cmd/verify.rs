//! `regcache verify`: checks the store (re-hashes blobs, compares the database with the disk both
//! ways, optionally repairs), offline or through the running server; exit 3 when it found
//! problems.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::cmd::args::{ClientArgs, ConfigArgs};
use crate::cmd::remote::{self, Target};
use crate::cmd::{fail, runtime, Exit};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub server: ClientArgs,
    /// Check only this many recorded blobs, chosen at random (presence, size and hash); the
    /// disk-to-database and tag checks stay complete.
    #[arg(long)]
    pub sample: Option<usize>,
    /// Remove what is corrupt or dangling, so that it is fetched again on demand.
    #[arg(long)]
    pub repair: bool,
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

pub fn run(args: VerifyArgs) -> ExitCode {
    let config = match args.config.load_or_exit() {
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
            match remote::target(&config, &args.server, rt.handle())? {
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
                    remote::call(reqwest::Method::POST, u).await
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
        indicatif::HumanBytes(report["bytes_hashed"].as_u64().unwrap_or(0)),
        problems.len(),
        if args.repair {
            format!(", {} repaired", report["repaired"].as_u64().unwrap_or(0))
        } else {
            String::new()
        }
    );
    if problems.is_empty() {
        Exit::Success.into()
    } else {
        Exit::Problems.into()
    }
}

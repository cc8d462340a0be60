//! `regcache check-config`: validates a config file (and the flags) without starting, and prints
//! the effective settings; exit 2 when the configuration is invalid.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::cmd::args::ConfigArgs;
use crate::cmd::Exit;
use crate::config::Config;

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The config file to check.
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(args: CheckConfigArgs) -> ExitCode {
    match args.config.load(args.file.as_ref()) {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("regcache: warning: {w}");
            }
            print_settings(&c);
            Exit::Success.into()
        }
        Err(e) => {
            eprintln!("regcache: {e}");
            Exit::Usage.into()
        }
    }
}

fn print_settings(c: &Config) {
    println!("config OK");
    println!("listen = {}", c.listen);
    println!("data_dir = {}", c.data_dir.display());
    println!("max_manifest_size = {}", c.max_manifest_size);
    for (i, u) in c.upstreams.iter().enumerate() {
        let default = if i == c.default_upstream {
            " (default)"
        } else {
            ""
        };
        println!(
            "upstream {}{default}: {} hosts={:?} freshness={}s auth={}",
            u.name,
            u.url,
            u.hosts,
            u.freshness.as_secs(),
            if u.credentials.is_some() {
                "basic/token with credentials"
            } else {
                "anonymous"
            }
        );
    }
    if let Some(s3) = &c.store.s3 {
        println!(
            "store.s3: bucket {} at {} region {} prefix {:?} credentials {} redirect {}",
            s3.bucket,
            s3.endpoint.as_ref().map_or("AWS S3", |u| u.as_str()),
            s3.region,
            s3.prefix,
            if s3.access_key_id.is_some() {
                "from the config"
            } else {
                "from the environment"
            },
            s3.redirect
        );
    }
    if let Some(p) = &c.peers {
        let urls: Vec<&str> = p.urls.iter().map(|u| u.as_str()).collect();
        println!(
            "peers: {urls:?} connect_timeout={}ms token set",
            p.connect_timeout.as_millis()
        );
    }
}

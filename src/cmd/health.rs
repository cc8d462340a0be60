//! `regcache health`: asks a running regcache's `/readyz` (for probes); exit 0 when it answers
//! 200, 1 when it answers otherwise or not at all.

use std::process::ExitCode;

use clap::Args;

use crate::cmd::args::ConfigArgs;
use crate::cmd::{remote, Exit};

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Base URL of the server (default: from the config's listen address and tls).
    #[arg(long)]
    pub url: Option<String>,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration)]
    pub timeout: std::time::Duration,
    /// Accept any server certificate (a self-signed one on loopback).
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(args: HealthArgs) -> ExitCode {
    let url = match &args.url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => match args.config.load_or_exit() {
            Ok(c) => remote::configured_url(&c),
            Err(code) => return code,
        },
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regcache: {e}");
            return Exit::Failure.into();
        }
    };
    let result: anyhow::Result<(u16, String)> = rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(args.timeout)
            .danger_accept_invalid_certs(args.insecure)
            .build()?;
        let resp = client.get(format!("{url}/readyz")).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.unwrap_or_default()))
    });
    match result {
        Ok((200, body)) => {
            println!("{body}");
            Exit::Success.into()
        }
        Ok((status, body)) => {
            eprintln!("regcache: not ready ({status}): {body}");
            Exit::Failure.into()
        }
        Err(e) => {
            eprintln!("regcache: {url}/readyz: {e:#}");
            Exit::Failure.into()
        }
    }
}

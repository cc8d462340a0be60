//! `regcache health`: asks a running regcache's `/readyz` (for probes); exit 0 when it answers
//! 200, 1 when it answers otherwise or not at all.

use std::process::ExitCode;

use clap::Args;

use crate::cmd::args::{ClientArgs, ConfigArgs, ProbeArgs};
use crate::cmd::Exit;

#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The former name of --server, kept for scripts.
    #[arg(long, value_name = "URL", hide = true, conflicts_with = "server")]
    pub url: Option<String>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
}

pub fn run(args: HealthArgs) -> ExitCode {
    let client = ClientArgs {
        server: args.client.server.or(args.url),
    };
    let url = match client.url_or_configured(&args.config) {
        Ok(u) => u,
        Err(code) => return code,
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
            .timeout(args.probe.timeout)
            .danger_accept_invalid_certs(args.probe.insecure)
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

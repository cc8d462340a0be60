//! `regcache status`: a running regcache's state at a glance, from its `GET /_regcache/status`
//! (version and uptime; each upstream up or down and since when, its quota, the tags it served
//! stale in the last hour; the store, the bucket, the peers; the traffic since start), as text or,
//! with `--json`, as the server's JSON. Exit codes as `health`: 0 healthy, 1 not healthy or no
//! answer, 2 usage.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Args;
use indicatif::HumanBytes;

use crate::cmd::args::{ClientArgs, ConfigArgs, ProbeArgs};
use crate::cmd::{remote, Exit};
use crate::http::status::{duration_text, quota_text, time_text, State, Status, PATH};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the server's JSON document (docs/API.md) instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Credentials (USER:PASSWORD) for a regcache protected by an htpasswd file.
    #[arg(
        long,
        value_name = "USER:PASSWORD",
        env = "REGCACHE_STATUS_AUTH",
        hide_env_values = true
    )]
    pub auth: Option<String>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Why there is no status to show.
enum Failed {
    /// Before asking (`--auth`): exit 2.
    Usage(String),
    /// No answer, an error answer, or one that is not a status: exit 1.
    Server(String),
}

pub fn run(args: StatusArgs) -> ExitCode {
    let url = match args.client.url_or_configured(&args.config) {
        Ok(u) => u,
        Err(code) => return code,
    };
    match ask(&args, &url) {
        Ok((status, body)) => {
            if args.json {
                println!("{body}");
            } else {
                print!("{}", render(&status, &url));
            }
            if status.healthy {
                Exit::Success.into()
            } else {
                Exit::Failure.into()
            }
        }
        Err(Failed::Usage(msg)) => {
            eprintln!("regcache status: {msg}");
            Exit::Usage.into()
        }
        Err(Failed::Server(msg)) => {
            eprintln!("regcache status: {url}{PATH}: {msg}");
            Exit::Failure.into()
        }
    }
}

/// The server's status, parsed and as it sent it.
fn ask(args: &StatusArgs, url: &str) -> Result<(Status, String), Failed> {
    let client = remote::client_builder(url, args.auth.as_deref())
        .map_err(|(_, msg)| Failed::Usage(msg))?
        .timeout(args.probe.timeout)
        .danger_accept_invalid_certs(args.probe.insecure)
        .build()
        .map_err(|e| Failed::Server(format!("{e:#}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::Server(e.to_string()))?;
    let (code, body) = rt
        .block_on(async {
            let resp = client.get(format!("{url}{PATH}")).send().await?;
            let code = resp.status();
            Ok::<_, reqwest::Error>((code, resp.text().await?))
        })
        .map_err(|e| Failed::Server(format!("no answer: {}", error_chain(&e))))?;
    if code == reqwest::StatusCode::UNAUTHORIZED {
        return Err(Failed::Server(format!(
            "{} ({code}): this server wants credentials: --auth USER:PASSWORD or \
             REGCACHE_STATUS_AUTH",
            remote::error_message(body.as_bytes())
        )));
    }
    if !code.is_success() {
        return Err(Failed::Server(format!(
            "{} ({code})",
            remote::error_message(body.as_bytes())
        )));
    }
    let status = serde_json::from_str(&body)
        .map_err(|e| Failed::Server(format!("the answer is not a regcache status: {e}")))?;
    Ok((status, body.trim_end().to_owned()))
}

/// An error with its causes, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(out, ": {c}");
        cause = c.source();
    }
    out
}

/// The summary for a person: what is wrong first, then each part, one line each.
pub fn render(s: &Status, url: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "regcache {} at {url}: up {} (since {})",
        s.version,
        duration_text(s.uptime_seconds),
        time_text(s.started_at)
    );
    let problems = s.problems();
    if problems.is_empty() {
        let _ = writeln!(o, "healthy");
    } else {
        let _ = writeln!(o, "NOT HEALTHY: {}", problems.join("; "));
    }
    for u in &s.upstreams {
        let state = match (u.state, u.down_since, u.down_for_seconds) {
            (State::Down, Some(since), Some(secs)) => {
                format!("down since {} ({})", time_text(since), duration_text(secs))
            }
            (state, ..) => state.as_str().to_owned(),
        };
        let _ = writeln!(o, "upstream {} ({}): {state}", u.name, u.url);
        if let Some(q) = &u.ratelimit {
            let _ = writeln!(o, "  rate limit: {}", quota_text(q));
        }
        let stale = &u.stale_last_hour;
        if stale.answers > 0 {
            let _ = writeln!(
                o,
                "  served stale in the last hour: {} answer{}{}",
                stale.answers,
                plural(stale.answers),
                if stale.complete {
                    ""
                } else {
                    " (the latest only)"
                }
            );
            for t in &stale.tags {
                let _ = writeln!(
                    o,
                    "    {}: {} answer{}, last {} ago",
                    t.tag,
                    t.answers,
                    plural(t.answers),
                    duration_text(t.last_served_seconds_ago)
                );
            }
        }
    }
    let st = &s.store;
    let _ = write!(
        o,
        "store: {}, {} used",
        if st.ready { "ready" } else { "NOT READY" },
        HumanBytes(st.used_bytes)
    );
    if let Some(max) = st.max_size {
        let _ = write!(o, " of {}", HumanBytes(max));
    }
    if let Some(free) = st.free_bytes {
        let _ = write!(o, ", {} free", HumanBytes(free));
    }
    let _ = writeln!(o, "{}", if st.full { ", FULL" } else { ", not full" });
    if let Some(b) = &s.bucket {
        let _ = writeln!(
            o,
            "bucket: {}, {} write{} pending",
            b.state.as_str(),
            b.pending_writes,
            plural(b.pending_writes as usize)
        );
    }
    for p in &s.peers {
        let state = match (p.state, p.down_for_seconds) {
            (State::Down, Some(secs)) => format!("down for {}", duration_text(secs)),
            (state, _) => state.as_str().to_owned(),
        };
        let me = if p.is_self { " (this server)" } else { "" };
        let _ = writeln!(o, "peer {}: {state}{me}", p.url);
    }
    let t = &s.traffic;
    let ratio = t
        .hit_ratio
        .map_or_else(|| "-".to_owned(), |r| format!("{:.1} %", r * 100.0));
    let _ = writeln!(
        o,
        "traffic: hit ratio {ratio} ({} of {} answers); served {}, fetched {} from upstreams, saved {}",
        t.hits,
        t.answers,
        HumanBytes(t.served_bytes),
        HumanBytes(t.fetched_bytes),
        HumanBytes(t.saved_bytes)
    );
    o
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

//! The command line: the subcommands, their dispatch and every exit code ([`Exit`]). Each
//! subcommand lives in its own file; flags that several share are in [`args`].

pub mod args;
mod check_config;
mod gc;
mod health;
mod pin;
pub mod prefetch;
mod remote;
mod serve;
mod status;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The exit codes of every command, all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success (`serve` after a clean shutdown, `health`: ready, `status`: healthy, `verify`: no
    /// problem found).
    Success = 0,
    /// A runtime failure: the store, the network, the listener; `health`: not ready; `status`:
    /// not healthy (something is down or full); `prefetch`: at least one image failed.
    Failure = 1,
    /// A usage or configuration error, found before anything was done.
    Usage = 2,
    /// `verify` found problems (also after repairing them).
    Problems = 3,
    /// `prefetch` was interrupted (Ctrl-C, SIGINT).
    Interrupted = 130,
}

impl Exit {
    /// The process exit status.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "regcache",
    version,
    about = "A pull-through image cache and registry mirror"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OCI distribution API, mirroring the configured upstreams.
    Serve(serve::ServeArgs),
    /// Validate a config file (and flags) without starting; prints the effective settings.
    CheckConfig(check_config::CheckConfigArgs),
    /// Evict least recently used content down to the configured limits (or --max-size).
    Gc(gc::GcArgs),
    /// Check the store: re-hash blobs, compare the database with the disk both ways.
    Verify(verify::VerifyArgs),
    /// Pin images against eviction, unpin them, list pins.
    Pin(pin::PinArgs),
    /// Ask a running regcache whether it is ready (for probes): exit 0 if so, 1 if not.
    Health(health::HealthArgs),
    /// Show a running regcache's state: upstreams (up or down, since when, served stale), store,
    /// bucket, peers, traffic. Exit 0 if healthy, 1 if not or no answer.
    Status(status::StatusArgs),
    /// Warm a running regcache with images (arguments, a list file, Dockerfiles).
    Prefetch(prefetch::PrefetchArgs),
}

/// Reports a command line that does not parse (clap's message, exit 2), or prints `--help` and
/// `--version` (exit 0). `prefetch --json` also gets its JSON error object on stdout.
pub fn parse_error(e: clap::Error) -> ExitCode {
    let _ = e.print();
    if !e.use_stderr() {
        return Exit::Success.into();
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "prefetch") && args.iter().any(|a| a == "--json") {
        let rendered = e.render().to_string();
        let first = rendered.lines().next().unwrap_or("invalid arguments");
        let msg = first.strip_prefix("error: ").unwrap_or(first);
        println!("{}", prefetch::json_error(Exit::Usage, msg));
    }
    Exit::Usage.into()
}

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::CheckConfig(args) => check_config::run(args),
        Command::Gc(args) => gc::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Pin(args) => pin::run(args),
        Command::Health(args) => health::run(args),
        Command::Status(args) => status::run(args),
        Command::Prefetch(args) => prefetch::run(args),
    }
}

/// Ends a command with a runtime failure: the error and its causes on stderr, exit 1.
fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("regcache: {e:#}");
    Exit::Failure.into()
}

/// The runtime of a command that is not the server (which builds its own).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let codes: Vec<u8> = [
            Exit::Success,
            Exit::Failure,
            Exit::Usage,
            Exit::Problems,
            Exit::Interrupted,
        ]
        .into_iter()
        .map(Exit::code)
        .collect();
        assert_eq!(
            codes,
            [0, 1, 2, 3, 130],
            "docs/COMMANDS.md's exit code table lists these; scripts and probes depend on them"
        );
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap's own checks: conflicting flag names, bad defaults, duplicate short options.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}

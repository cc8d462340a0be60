//! The `regcache` binary: parses the command line and hands over to [`regcache::cmd`].
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    match regcache::cmd::Cli::try_parse() {
        Ok(cli) => regcache::cmd::main(cli),
        Err(e) => regcache::cmd::parse_error(e),
    }
}

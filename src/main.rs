//! The `regcache` binary: parses the command line and hands over to [`regcache::cli`].
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    match regcache::cli::Cli::try_parse() {
        Ok(cli) => regcache::cli::main(cli),
        Err(e) => regcache::cli::parse_error(e),
    }
}

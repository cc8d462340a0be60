//! The `regcache` binary: parses the command line and hands over to [`regcache::cli`].
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    regcache::cli::main(regcache::cli::Cli::parse())
}

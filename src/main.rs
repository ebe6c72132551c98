//! The `sluice` binary: parse flags and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    sluice::cli::main(sluice::cli::Cli::parse())
}

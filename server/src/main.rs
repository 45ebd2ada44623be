//! `clusterclaw`: the control plane (`clusterclaw server`) and its admin CLI in one binary.

use std::process::ExitCode;

use clap::Parser;
use clusterclaw_server::cli::{self, Cli, Command};

/// jemalloc gives freed memory back to the system from a background thread (its defaults are
/// in `.cargo/config.toml`); with the system allocator, the peaks of a scheduler pass over
/// thousands of instances stayed resident in per-thread arenas, and mimalloc kept about 60 MB
/// more than jemalloc at 10,000 hosts in pages still holding a live block. The
/// `system-allocator` feature leaves it out, for heap profilers that hook `malloc`
/// (`heaptrack`).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    clusterclaw_server::crypto::install();
    // Usage errors exit with 2, `--help` and `--version` with 0.
    let cli = Cli::parse();
    match cli.command {
        Command::Server(args) => clusterclaw_server::server::main(*args),
        command => match cli::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                err.report(&mut std::io::stderr().lock());
                ExitCode::from(err.exit_code())
            }
        },
    }
}

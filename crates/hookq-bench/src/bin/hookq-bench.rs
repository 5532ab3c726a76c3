//! `hookq bench` (see `hookq_bench::bench`).

use std::process::ExitCode;

use clap::Parser;
use hookq_bench::args::BenchCli;

fn main() -> ExitCode {
    let cli = BenchCli::parse();
    hookq_bench::main_with(&cli.global, |settings| async move {
        hookq_bench::bench::run(&settings, &cli.args).await
    })
}

//! `hookq simulate` (see `hookq_bench::simulate`).

use std::process::ExitCode;

use clap::Parser;
use hookq_bench::args::SimulateCli;

fn main() -> ExitCode {
    let cli = SimulateCli::parse();
    hookq_bench::main_with(&cli.global, |settings| async move {
        hookq_bench::simulate::run(&settings, &cli.args).await
    })
}

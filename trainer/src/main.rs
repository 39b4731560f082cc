//! `minisam`: the offline tools of QLoRA-MiniSAM (pack, inspect, segment, eval). The work is in
//! the library (`lib.rs` lists its modules); every failure reaches `main` as an error chain,
//! printed once.

use std::process::ExitCode;

use clap::Parser;
use minisam::{cli, commands};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match &cli.command {
        cli::Command::Pack(a) => commands::pack::run(a),
        cli::Command::Inspect(a) => commands::inspect::run(a),
        cli::Command::Segment(a) => commands::segment::run(a),
        cli::Command::Convert(a) => commands::convert::run(a),
        cli::Command::Eval(a) => commands::eval::run(a),
        cli::Command::Train(a) => commands::train::run(a),
        cli::Command::Distill(a) => commands::distill::run(a),
        cli::Command::OnnxCheck(a) => commands::onnx_check::run(a),
        cli::Command::CudaCompile(a) => commands::cuda::compile(a),
        cli::Command::CudaCheck(a) => commands::cuda::check(a),
        cli::Command::CudaBench(a) => commands::cuda::bench(a),
    }
}

//! minisamd: see daemon/README.md.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = minisamd::config::Args::parse();
    minisamd::logging::init();
    match minisamd::daemon::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! The `minigpt` command: parse, run, print any error as one line, exit non-zero.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = minigpt::cli::Cli::parse();
    // `--log-placement` is TensorFlow's own log, at its INFO level.
    let verbose = std::env::args().skip(1).any(|a| a == "-v" || a == "--verbose" || a == "--log-placement");
    match minigpt::library::load(verbose).and_then(|()| minigpt::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<minigpt::train::Interrupted>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {}", minigpt::text::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

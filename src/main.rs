//! The `minigpt` command: parse, run, print any error as one line, exit non-zero.

use std::process::ExitCode;

use clap::Parser;
use minigpt::output;
use minigpt::train::{Interrupted, OutputLost};

fn main() -> ExitCode {
    if let Err(e) = output::check_stdout_open() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let cli = minigpt::cli::Cli::parse();
    // `--log-placement` is TensorFlow's own log, at its INFO level.
    let verbose = std::env::args_os().skip(1).any(|a| a == "-v" || a == "--verbose" || a == "--log-placement");
    match minigpt::library::load(verbose).and_then(|()| minigpt::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failure(&e),
    }
}

/// Says why the command failed, on one line, and gives its exit code.
fn failure(e: &anyhow::Error) -> ExitCode {
    if e.is::<Interrupted>() {
        eprintln!("{e}");
        return ExitCode::from(130);
    }
    if let Some(lost) = e.downcast_ref::<OutputLost>() {
        // Training stopped, checkpointed, because its stdout failed.
        return match lost.closed {
            true => {
                eprintln!("{lost}");
                ExitCode::from(output::CLOSED_EXIT_CODE)
            }
            false => {
                eprintln!("error: {lost}");
                ExitCode::FAILURE
            }
        };
    }
    if output::is_closed(e) {
        // `| head` has read what it wanted: quietly, as a tool that SIGPIPE stopped.
        return ExitCode::from(output::CLOSED_EXIT_CODE);
    }
    eprintln!("error: {}", minigpt::text::error_line(e));
    ExitCode::FAILURE
}

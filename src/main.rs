//! The `minigpt` command: parse, run, print any error as one line, exit non-zero.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Silence TensorFlow's C++ logging unless the user asked for it; it reads this lazily.
    if std::env::var_os("TF_CPP_MIN_LOG_LEVEL").is_none() {
        std::env::set_var("TF_CPP_MIN_LOG_LEVEL", "2");
    }
    let cli = minigpt::cli::Cli::parse();
    match minigpt::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<minigpt::train::Interrupted>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            // TensorFlow's messages can span lines (`\n\t [[{{node ...}}]]`): keep one line.
            let message = format!("{e:#}");
            eprintln!("error: {}", message.split_whitespace().collect::<Vec<_>>().join(" "));
            ExitCode::FAILURE
        }
    }
}

//! The `minigpt` command: parse, run, print any error as one line, exit non-zero.

use std::process::ExitCode;

use clap::Parser;

/// TensorFlow's C++ logging is silenced (`TF_CPP_MIN_LOG_LEVEL=2`) unless `-v` lets it through
/// (`0`) or the variable is already set. TensorFlow reads the variable while its library loads,
/// before `main` runs, so the process starts itself again with the variable set; that second
/// image loads the library with stderr parked on another descriptor, restored here.
fn quiet_tensorflow() {
    const PARKED: &str = "MINIGPT_STDERR_FD";
    if let Some(fd) = std::env::var(PARKED).ok().and_then(|v| v.parse::<i32>().ok()) {
        // SAFETY: `fd` is the duplicate of stderr the first image left open for us.
        unsafe {
            libc::dup2(fd, 2);
            libc::close(fd);
        }
        std::env::remove_var(PARKED);
        return;
    }
    // `--log-placement` is TensorFlow's own log, at its INFO level.
    let verbose = std::env::args().skip(1).any(|a| a == "-v" || a == "--verbose" || a == "--log-placement");
    let level = match (std::env::var("TF_CPP_MIN_LOG_LEVEL").ok(), verbose) {
        (None, false) => "2",
        (Some(level), true) if level != "0" => "0",
        _ => return,
    };
    std::env::set_var("TF_CPP_MIN_LOG_LEVEL", level);
    let Ok(exe) = std::env::current_exe() else { return };
    // SAFETY: plain descriptor juggling on this process's own stderr.
    let parked = unsafe {
        let parked = libc::dup(2);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if parked >= 0 && null >= 0 && !verbose {
            libc::dup2(null, 2);
            std::env::set_var(PARKED, parked.to_string());
        }
        if null >= 0 {
            libc::close(null);
        }
        parked
    };
    use std::os::unix::process::CommandExt;
    let _ = std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec();
    // Only reached if exec failed: put stderr back and go on, merely noisier.
    if parked >= 0 {
        // SAFETY: as above.
        unsafe {
            libc::dup2(parked, 2);
            libc::close(parked);
        }
    }
    std::env::remove_var(PARKED);
}

fn main() -> ExitCode {
    quiet_tensorflow();
    let cli = minigpt::cli::Cli::parse();
    match minigpt::cli::run(cli) {
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

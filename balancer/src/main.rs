//! The `balancer` binary: see `balancer --help`.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = balancer::cli::Cli::parse();
    let daemon = matches!(cli.command, balancer::cli::Command::Run { .. });
    if !daemon {
        // A one-shot command piped into `head` ends quietly, as other Unix tools do, instead of
        // panicking in `println!`. The daemon keeps Rust's default (ignored: a client that
        // goes away must never end the proxy).
        // SAFETY: restoring a signal's default disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let default_level = if daemon { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // One thread: the daemon waits on the kernel and a socket, and stays small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("balancer: error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(balancer::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "balancer: error: {}",
                balancer::daemon::error_chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

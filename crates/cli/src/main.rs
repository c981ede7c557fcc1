//! `genius`: pull, run and serve local models from the shell.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a command line prints

mod args;
mod commands;
mod http;
mod openai;
mod serve;

use std::process::ExitCode;

use args::{exit, Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match (cli.verbose, &cli.command) {
        (0, Command::Serve(_)) => "info",
        (0, _) => "warn",
        (1, _) => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    // The engine computes on threads of its own; the HTTP side only moves
    // small JSON pieces. One worker is plenty, and it leaves the cores to
    // the engine: a second worker woken for every token measurably slowed
    // generation with 4 clients on 2 cores. TOKIO_WORKER_THREADS overrides.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let result = runtime.block_on(commands::run(cli.command));
    // A task still reading stdin (a chat ended by Ctrl-C) would hold a
    // plain drop of the runtime until the next line comes.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("error: {}", failure.message);
            }
            ExitCode::from(failure.code)
        }
    }
}

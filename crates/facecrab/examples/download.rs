//! Resolves a model name and downloads it, with a live progress bar.
//!
//! ```text
//! cargo run -p facecrab --example download -- qwen-2.5-3b-instruct
//! cargo run -p facecrab --example download -- Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q8_0
//! ```
//!
//! Prints the local path on stdout. `--stats` adds the peak memory use.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use facecrab::AssetAuthority;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rusty_genius_core::protocol::AssetEvent;

#[async_std::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stats = args.iter().any(|a| a == "--stats");
    let Some(name) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: download <registry name | org/repo[:QUANT | /file.gguf][@revision] | path> [--stats]");
        std::process::exit(2);
    };
    let authority = match AssetAuthority::new() {
        Ok(authority) => authority,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut events = std::pin::pin!(authority.ensure_model_stream(name));
    while let Some(event) = events.next().await {
        match event {
            AssetEvent::Started(name) => bar.set_message(name),
            AssetEvent::Progress(done, total) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            AssetEvent::Complete(path) => {
                bar.finish_and_clear();
                println!("{path}");
            }
            AssetEvent::Error(message) => {
                bar.abandon();
                eprintln!("error: {message}");
                std::process::exit(1);
            }
            _ => {}
        }
    }
    if stats {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let peak = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap_or("VmHWM: unknown");
        eprintln!("peak memory {}", peak.trim_start_matches("VmHWM:").trim());
    }
}

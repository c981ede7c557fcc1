//! facecrab's download throughput against curl, on the same file from the
//! same loopback Hub, in one run; plus facecrab's peak memory.
//!
//! ```text
//! cargo build --release -p facecrab --features test-hub --example download --example bench_download
//! target/release/examples/bench_download <file.gguf> [rounds]
//! ```
//!
//! facecrab runs in a child process (the `download` example) so its peak
//! resident memory is its own; curl writes to a file in the same folder.
//! facecrab also hashes every byte and syncs the file to disk; curl does
//! neither, so a second baseline adds the time to `fsync` curl's file
//! (`sync <file>`) afterwards. Both start from a `sync`, and they take turns
//! going first.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use facecrab::testing::TestHub;

const REPO: &str = "bench/model-GGUF";

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn timed(command: &mut Command) -> (Duration, String) {
    let started = Instant::now();
    let output = command.output().expect("run the command");
    let elapsed = started.elapsed();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        elapsed,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(source) = args.next().map(PathBuf::from) else {
        eprintln!("usage: bench_download <file.gguf> [rounds=9]");
        std::process::exit(2);
    };
    let rounds: usize = args.next().map_or(9, |n| n.parse().expect("rounds"));
    let file = source.file_name().unwrap().to_string_lossy().into_owned();
    let size = std::fs::metadata(&source).expect("source file").len();
    let hub = TestHub::start().expect("loopback hub");
    hub.add_file(REPO, &file, &source, None)
        .expect("serve the file");
    let url = format!("{}/{REPO}/resolve/main/{file}", hub.endpoint());
    let downloader = std::env::current_exe().unwrap().with_file_name("download");
    assert!(
        downloader.exists(),
        "build the download example first (cargo build --release -p facecrab --example download)"
    );
    let work = std::env::temp_dir().join(format!("facecrab-bench-{}", std::process::id()));
    let mib = size as f64 / (1 << 20) as f64;
    println!(
        "{file}: {mib:.1} MiB from {}, {rounds} rounds",
        hub.endpoint()
    );

    let (mut ours, mut theirs, mut durable, mut peaks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let _ = Command::new("sync").status();
        // Each side starts with no dirty pages of the other's to write back.
        let facecrab_run = || {
            let _ = Command::new("sync").status();
            timed(
                Command::new(&downloader)
                    // The exact file, as curl gets the exact URL: no listing.
                    .args([format!("{REPO}/{file}").as_str(), "--stats"])
                    .env("GENIUS_HOME", &work)
                    .env("HF_ENDPOINT", hub.endpoint())
                    .env_remove("HF_TOKEN")
                    .env_remove("HF_HUB_OFFLINE"),
            )
        };
        let curl_run = || {
            let _ = Command::new("sync").status();
            let fetched = timed(
                Command::new("curl")
                    .args(["-sSf", "-o"])
                    .arg(work.join("curl.bin"))
                    .arg(&url),
            )
            .0;
            let synced = timed(Command::new("sync").arg(work.join("curl.bin"))).0;
            (fetched, fetched + synced)
        };
        // Alternate who goes first, so neither always runs on a warmer box.
        let ((facecrab, stderr), (curl, curl_synced)) = if round % 2 == 0 {
            let ours = facecrab_run();
            (ours, curl_run())
        } else {
            let theirs = curl_run();
            (facecrab_run(), theirs)
        };
        let peak = stderr
            .lines()
            .find_map(|l| l.strip_prefix("peak memory "))
            .unwrap_or("?")
            .to_owned();
        assert_eq!(
            std::fs::metadata(work.join("curl.bin")).unwrap().len(),
            size
        );
        let rate = |took: Duration| mib / took.as_secs_f64();
        let (a, b, c) = (rate(facecrab), rate(curl), rate(curl_synced));
        println!(
            "round {round}: facecrab {a:7.1} MiB/s (peak {peak})   curl {b:7.1} MiB/s   curl+fsync {c:7.1} MiB/s"
        );
        ours.push(a);
        theirs.push(b);
        durable.push(c);
        peaks.push(peak_kib(&peak));
    }
    let _ = std::fs::remove_dir_all(&work);
    let (ours, theirs, durable) = (median(ours), median(theirs), median(durable));
    println!(
        "median: facecrab {ours:.1} MiB/s, curl {theirs:.1} MiB/s, ratio {:.3}",
        ours / theirs
    );
    println!(
        "against curl+fsync {durable:.1} MiB/s: ratio {:.3}",
        ours / durable
    );
    println!(
        "facecrab peak RSS: {:.1} MiB",
        peaks.into_iter().fold(0.0, f64::max) / 1024.0
    );
}

fn peak_kib(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

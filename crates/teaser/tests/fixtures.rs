//! Runs every case under `fixtures/` (or those whose name contains the
//! first argument) and prints a line per case and a summary.
//!
//! `cargo test -p rusty-genius-teaser`, or with a filter:
//! `cargo test -p rusty-genius-teaser --test fixtures -- capital`.
//!
//! Real-model steps that expect text print the smallest margin of the
//! tokens that decided it; with `TEASER_MARGINS=<file>` every such token's
//! margin is also written there as JSON lines, to compare builds.

#![allow(clippy::print_stdout, clippy::print_stderr)] // printing is its job

use std::io::Write;
use std::time::Instant;

use rusty_genius_teaser::{discover, fixtures_dir, run_case_measured, Env, Outcome};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    let fixtures = match discover(&fixtures_dir()) {
        Ok(fixtures) => fixtures,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    };
    let selected: Vec<_> = fixtures
        .into_iter()
        .filter(|f| {
            filter
                .as_ref()
                .is_none_or(|needle| f.name.contains(needle.as_str()))
        })
        .collect();
    if args.iter().any(|a| a == "--list") {
        for fixture in &selected {
            println!("{}: test", fixture.name);
        }
        return;
    }
    let env = Env::from_env();
    let mut margin_log = std::env::var_os("TEASER_MARGINS").map(|path| {
        std::fs::File::create(&path)
            .unwrap_or_else(|err| panic!("cannot write TEASER_MARGINS={path:?}: {err}"))
    });
    println!("running {} fixture cases", selected.len());
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for fixture in &selected {
        let started = Instant::now();
        let (outcome, measured) =
            async_std::task::block_on(run_case_measured(&fixture.case, &fixture.engine, &env));
        let took = started.elapsed().as_secs_f64();
        if let Some(log) = &mut margin_log {
            for step in &measured {
                let line = serde_json::json!({"fixture": fixture.name, "step": step.step, "tokens": step.tokens});
                writeln!(log, "{line}").expect("write the margin log");
            }
        }
        let margins: Vec<String> = measured
            .iter()
            .map(|m| format!("step {}: {:.2}", m.step, m.min_margin()))
            .collect();
        let margins = if margins.is_empty() {
            String::new()
        } else {
            format!(", smallest margin {}", margins.join(", "))
        };
        match outcome {
            Outcome::Passed => {
                passed += 1;
                println!("PASS {} ({took:.1} s{margins})", fixture.name);
            }
            Outcome::Skipped(why) => {
                skipped += 1;
                println!("SKIP {}: {why}", fixture.name);
            }
            Outcome::Failed(diff) => {
                failed += 1;
                println!("FAIL {} ({took:.1} s{margins})\n{diff}", fixture.name);
            }
        }
    }
    println!("fixtures: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(1);
    }
}

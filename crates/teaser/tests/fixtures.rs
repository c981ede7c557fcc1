//! Runs every case under `fixtures/` (or those whose name contains the
//! first argument) and prints a line per case and a summary.
//!
//! `cargo test -p rusty-genius-teaser`, or with a filter:
//! `cargo test -p rusty-genius-teaser --test fixtures -- capital`.

use std::time::Instant;

use rusty_genius_teaser::{discover, fixtures_dir, run_case, Env, Outcome};

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
    println!("running {} fixture cases", selected.len());
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for fixture in &selected {
        let started = Instant::now();
        let outcome = async_std::task::block_on(run_case(&fixture.case, &fixture.engine, &env));
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Outcome::Passed => {
                passed += 1;
                println!("PASS {} ({took:.1} s)", fixture.name);
            }
            Outcome::Skipped(why) => {
                skipped += 1;
                println!("SKIP {}: {why}", fixture.name);
            }
            Outcome::Failed(diff) => {
                failed += 1;
                println!("FAIL {} ({took:.1} s)\n{diff}", fixture.name);
            }
        }
    }
    println!("fixtures: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(1);
    }
}

//! Teaser: the QA harness of rusty-genius.
//!
//! Every JSON file under the workspace's `fixtures/` folder is a test case
//! (format in `fixtures/README.md`). Teaser drives each case through the
//! public facade — a fresh `rusty_genius::Orchestrator` over its channels,
//! with a private model cache — and compares what comes back with the
//! case's expectations. Adding a case is adding a file.
//!
//! Where a case runs is given by its folder: `fixtures/pinky/` on the Pinky
//! stub, `fixtures/<org>/<repo>/<quant>/` on that model, `fixtures/any/` on
//! both. Models are served to facecrab by a loopback Hub, so every
//! real-model case also exercises the download path.

mod case;
mod check;
mod run;

use std::path::{Path, PathBuf};

pub use case::{Case, Expect, Step, Strategy};
pub use run::{run_case, run_case_measured, Env, Measured};

use facecrab::testing::GEMMA;

/// Which engine a case runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Engine {
    /// The Pinky stub.
    Pinky,
    /// A real model, by HuggingFace id (`org/repo:QUANT`).
    Model(String),
}

/// A case and where it runs.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// Its name: the path under `fixtures/` without `.json`, plus the
    /// engine for `any/` cases.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// The engine.
    pub engine: Engine,
    /// The case.
    pub case: Case,
}

/// How one case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every expectation held.
    Passed,
    /// What differed, readable.
    Failed(String),
    /// Why it could not run here.
    Skipped(String),
}

/// The workspace's `fixtures/` folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Folders under `fixtures/` that hold data for other tests, not cases.
const NOT_CASES: [&str; 4] = ["chat-templates", "embeddings", "helpers", "infill"];

/// Reads every case under `root`, in name order.
pub fn discover(root: &Path) -> Result<Vec<Fixture>, String> {
    let mut files = Vec::new();
    collect(root, &mut files).map_err(|err| format!("cannot list {}: {err}", root.display()))?;
    files.retain(|path| {
        let relative = path.strip_prefix(root).unwrap_or(path);
        !NOT_CASES.iter().any(|folder| relative.starts_with(folder))
    });
    files.sort();
    let mut fixtures = Vec::new();
    for path in files {
        let relative = path.strip_prefix(root).unwrap_or(&path);
        let name = relative
            .with_extension("")
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&path).map_err(|err| format!("{name}: {err}"))?;
        let case: Case =
            serde_json::from_str(&text).map_err(|err| format!("{name}: invalid case: {err}"))?;
        let parts: Vec<&str> = name.split('/').collect();
        let engines = match parts.as_slice() {
            ["pinky", ..] => vec![(Engine::Pinky, name.clone())],
            ["any", ..] => vec![
                (Engine::Pinky, format!("{name} [pinky]")),
                (Engine::Model(GEMMA.hub_name()), format!("{name} [gemma]")),
            ],
            [org, repo, quant, _case] => vec![(Engine::Model(format!("{org}/{repo}:{quant}")), name.clone())],
            _ => {
                return Err(format!(
                    "{name}: cases live in pinky/, any/ or <org>/<repo>/<quant>/ (see fixtures/README.md)"
                ))
            }
        };
        for (engine, name) in engines {
            fixtures.push(Fixture {
                name,
                path: path.clone(),
                engine,
                case: case.clone(),
            });
        }
    }
    Ok(fixtures)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

//! The official `openai` Python package against `genius serve` on the
//! instruct test model (tests/openai_sdk.py holds the checks).
//!
//! Needs `GENIUS_TEST_CHAT_MODEL` and a Python with `openai` and
//! `jsonschema` (`pip install openai jsonschema`); without them it is
//! skipped with a note, except under CI, where it fails.

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // the skip note must reach the person running the tests

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;
use rusty_genius::facecrab::testing::{TempDir, MINILM, QWEN};

fn python_with_openai() -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let found = Command::new(&python)
        .args(["-c", "import openai, jsonschema"])
        .output()
        .is_ok_and(|out| out.status.success());
    if found {
        return Some(python);
    }
    let why =
        format!("{python} lacks the openai or jsonschema package (pip install openai jsonschema)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}: CI must run the OpenAI client tests");
    }
    eprintln!("skipped: {why}");
    None
}

/// Serves `model` (with `serve_args`), runs tests/openai_sdk.py against it
/// with `script_args`, and checks that all `checks` passed.
fn run_checks(model: &Path, serve_args: &[&str], script_args: &[&str], checks: usize) {
    let Some(python) = python_with_openai() else {
        return;
    };
    let home = TempDir::new("openai-sdk");
    let key = "sk-genius-test";
    let model_arg = model.display().to_string();
    let mut args = vec!["--model", &model_arg, "--api-key", key];
    args.extend_from_slice(serve_args);
    let server = Server::start(
        &args,
        &[("GENIUS_HOME", &home.path().display().to_string())],
    );
    server.wait_healthy();
    let id = model.file_stem().unwrap().to_string_lossy().into_owned();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py");
    let output = Command::new(python)
        .args([script, &format!("http://{}/v1", server.addr), key, &id])
        .args(script_args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "the openai client checks failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log().join("\n")
    );
    assert!(
        stdout.contains(&format!("{checks} checks passed")),
        "{stdout}"
    );
}

#[test]
fn the_official_openai_client_works_against_genius_serve() {
    let Some(model) = QWEN.for_test() else { return };
    run_checks(&model, &["--parallel", "2", "--ctx-size", "2048"], &[], 17);
}

#[test]
fn the_official_openai_client_gets_embeddings_from_genius_serve() {
    let Some(model) = MINILM.for_test() else {
        return;
    };
    let reference = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/embeddings/minilm-reference.json"
    );
    run_checks(&model, &[], &["--embeddings", reference], 4);
}

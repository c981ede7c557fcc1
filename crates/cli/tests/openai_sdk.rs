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

use common::Server;
use rusty_genius::facecrab::testing::{TempDir, MINILM, QWEN};

/// Serves `model` (with `serve_args`), runs tests/openai_sdk.py against it
/// with `script_args`, and checks that all `checks` passed.
fn run_checks(model: &Path, serve_args: &[&str], script_args: &[&str], checks: usize) {
    let Some(python) = common::python_with(&["openai", "jsonschema"], "openai jsonschema") else {
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
    let base = format!("http://{}/v1", server.addr);
    let mut script = vec![base.as_str(), key, &id];
    script.extend_from_slice(script_args);
    common::run_client_script(&python, "openai_sdk.py", &script, checks, &server);
}

#[test]
fn the_official_openai_client_works_against_genius_serve() {
    let Some(model) = QWEN.for_test() else { return };
    run_checks(&model, &["--parallel", "2", "--ctx-size", "2048"], &[], 20);
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

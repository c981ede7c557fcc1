//! The `anthropic` Python package, unchanged, against `genius serve`'s
//! Messages API on the instruct test model (tests/anthropic_client.py holds
//! the checks).
//!
//! Needs `GENIUS_TEST_CHAT_MODEL` and a Python with `anthropic`; without
//! them it is skipped with a note, except under CI, where it fails.

#![cfg(feature = "llama")]

mod common;

use common::Server;
use rusty_genius::facecrab::testing::{TempDir, QWEN};

#[test]
fn the_anthropic_client_works_against_genius_serve() {
    let Some(model) = QWEN.for_test() else { return };
    let Some(python) = common::python_with(&["anthropic"], "anthropic") else {
        return;
    };
    let home = TempDir::new("anthropic-client");
    let key = "sk-ant-genius-test";
    let model_arg = model.display().to_string();
    let server = Server::start(
        &[
            "--model",
            &model_arg,
            "--api-key",
            key,
            "--ctx-size",
            "2048",
        ],
        &[("GENIUS_HOME", &home.path().display().to_string())],
    );
    server.wait_healthy();
    let id = model.file_stem().unwrap().to_string_lossy().into_owned();
    let base = format!("http://{}", server.addr);
    common::run_client_script(
        &python,
        "anthropic_client.py",
        &[&base, key, &id],
        6,
        &server,
    );
}

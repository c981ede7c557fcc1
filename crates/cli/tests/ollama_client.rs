//! The `ollama` Python package and the `ollama` npm package, unchanged,
//! against `genius serve`'s Ollama API on the instruct and embedding test
//! models (tests/ollama_client.py and tests/ollama_client.mjs hold the
//! checks).
//!
//! Needs `GENIUS_TEST_CHAT_MODEL`, `GENIUS_TEST_EMBED_MODEL` and a Python
//! with `ollama` and `jsonschema`; without them it is skipped with a note,
//! except under CI, where it fails.

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // the checks and the skip note go to the test log

mod common;

use common::Server;
use std::path::Path;

use rusty_genius::facecrab::testing::{TempDir, TestHub, MINILM, QWEN};

#[test]
fn the_ollama_client_works_against_genius_serve() {
    let (Some(chat), Some(embed)) = (QWEN.for_test(), MINILM.for_test()) else {
        return;
    };
    let Some(python) = common::python_with(&["ollama", "jsonschema"], "ollama jsonschema") else {
        return;
    };
    let home = TempDir::new("ollama-client");
    // A loopback Hub with a small file to pull.
    let hub = TestHub::start().unwrap();
    let tiny = common::pinky_model(home.path());
    hub.add_file("org/tiny-GGUF", "tiny-q4_k_m.gguf", Path::new(&tiny), None)
        .unwrap();
    let (chat_arg, embed_arg) = (chat.display().to_string(), embed.display().to_string());
    let server = Server::start(
        &[
            "--model",
            &chat_arg,
            "--model",
            &embed_arg,
            "--max-models",
            "2",
            "--ctx-size",
            "2048",
        ],
        &[
            (
                "GENIUS_HOME",
                &home.path().join("home").display().to_string(),
            ),
            ("HF_ENDPOINT", &hub.endpoint()),
        ],
    );
    server.wait_healthy();
    let name = |path: &Path| path.file_stem().unwrap().to_string_lossy().into_owned();
    let reference = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/embeddings/minilm-reference.json"
    );
    let host = format!("http://{}", server.addr);
    common::run_client_script(
        &python,
        "ollama_client.py",
        &[
            &host,
            &name(&chat),
            &name(&embed),
            reference,
            "hf.co/org/tiny-GGUF",
        ],
        10,
        &server,
    );

    // The npm client, where site/check.sh installed it (CI runs that
    // first), on the same server; the model pulled above was deleted.
    let Some(module) = common::node_module("ollama") else {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI must run the ollama npm client (site/check.sh installs it)"
        );
        eprintln!("skipped the npm client: site/check.sh installs it");
        return;
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ollama_client.mjs");
    let output = std::process::Command::new("node")
        .args([
            script,
            &host,
            &name(&chat),
            &name(&embed),
            "hf.co/org/tiny-GGUF",
        ])
        .env("OLLAMA_JS", module)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success() && stdout.contains("9 checks passed"),
        "the ollama npm checks failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log().join("\n")
    );
}

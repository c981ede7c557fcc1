//! The chat page at `/`, driven in headless Chromium on the real models:
//! it loads with no request leaving the machine, streams an answer from
//! Qwen, stops a long answer within a second, switches to another model
//! (Qwen again under another name, as the only chat test model) and starts
//! a new chat; screenshots (desktop and phone width) are kept in
//! `target/tmp/chat-page/`.
//!
//! Needs Node, Chromium at /usr/bin/chromium and playwright-core where
//! `site/check.sh` installs it (CI runs that first), and the test models;
//! without them the test says so and passes, except under CI, where the
//! models must be there.

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // says why it did not run

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Server;
use rusty_genius::facecrab::testing::{TempDir, QWEN};
use serde_json::Value;

#[test]
fn the_chat_page_streams_stops_and_switches_models_in_a_browser() {
    let Some(qwen) = QWEN.for_test() else {
        return;
    };
    let Some(module) = common::playwright() else {
        eprintln!("skipped: needs node, /usr/bin/chromium and playwright-core (site/check.sh installs it)");
        return;
    };
    let home = TempDir::new("chat-page");
    // A second model to switch to: the chat model under another name.
    let second = home.join("second-chat-model.gguf");
    std::os::unix::fs::symlink(&qwen, &second).unwrap();
    let (qwen_arg, second_arg) = (qwen.display().to_string(), second.display().to_string());
    let server = Server::start(
        &[
            "--model",
            &qwen_arg,
            "--model",
            &second_arg,
            "--max-models",
            "2",
            "--ctx-size",
            "2048",
        ],
        &[("GENIUS_HOME", &home.path().display().to_string())],
    );
    server.wait_healthy();
    let id = |path: &std::path::Path| path.file_stem().unwrap().to_string_lossy().into_owned();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chat-page");
    std::fs::create_dir_all(&shots).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/chat.js");
    let output = Command::new("node")
        .arg(script)
        .arg(format!("http://127.0.0.1:{}", server.addr.port()))
        .arg(&shots)
        .arg(id(&qwen))
        .arg(id(&second))
        .env("PLAYWRIGHT_CORE", module)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| {
            panic!(
                "the page printed no result: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    eprintln!("the page saw: {seen}");
    assert_eq!(seen["ok"], true, "{seen}\n{}", server.log().join("\n"));
    assert_eq!(
        seen["elsewhere"],
        serde_json::json!([]),
        "requests left the machine"
    );
    assert_eq!(
        seen["problems"],
        serde_json::json!([]),
        "errors in the page"
    );
    assert_eq!(seen["temperature"], "0", "{seen}");
    let models = seen["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{seen}");
    // The first answer streamed in (it grew on screen) and is right: the
    // page was set to temperature 0, and the question's greedy answer is
    // firm (tests/openai_sdk.py checks its margins).
    assert!(seen["answer"].as_str().unwrap().contains("Tokyo"), "{seen}");
    assert!(seen["growth"].as_u64().unwrap() >= 3, "{seen}");
    // Stopped within a second, and nothing came after.
    assert!(seen["stopMs"].as_u64().unwrap() < 1000, "{seen}");
    assert_eq!(seen["grewAfterStop"], false, "{seen}");
    assert_eq!(seen["stoppedMeta"], true, "{seen}");
    let went_away = server
        .log()
        .iter()
        .any(|line| line.contains("the client went away"));
    assert!(went_away, "the server did not stop the generation");
    // The next request went to the other model, and it answered.
    let chats: Vec<&str> = seen["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(chats, [id(&qwen), id(&qwen), id(&second)], "{seen}");
    assert!(
        !seen["secondAnswer"].as_str().unwrap().trim().is_empty(),
        "{seen}"
    );
    assert_eq!(seen["overflows"], false, "the page is wider than a phone");
    assert_eq!(seen["afterNew"], 0, "{seen}");
    for shot in ["chat-desktop.png", "chat-phone.png"] {
        assert!(shots.join(shot).is_file(), "{shot}");
    }
}

//! `genius serve` in headless Chromium, on Pinky: a page from another
//! origin reads a streamed answer when `--cors-origin` allows its origin,
//! and the browser refuses it the answer otherwise; and the server's own
//! chat page renders Markdown, folds thinking and runs none of a model's
//! HTML.
//!
//! Needs Node, Chromium at /usr/bin/chromium and playwright-core where
//! `site/check.sh` installs it (CI runs that first); without them the test
//! says so and passes.

#![allow(clippy::print_stderr)] // says why it did not run

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Server;
use rusty_genius::facecrab::testing::TempDir;
use serde_json::Value;

const KEY: &str = "sk-browser-test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap()
}

/// Runs the page against `server`; what the page read or was refused.
fn run_page(module: &PathBuf, page_port: u16, server: &Server) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/cors.js");
    let output = Command::new("node")
        .arg(script)
        .arg(page_port.to_string())
        .arg(format!("http://localhost:{}", server.addr.port()))
        .arg(KEY)
        .env("PLAYWRIGHT_CORE", module)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "the page printed no result: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

#[test]
fn a_page_from_an_allowed_origin_streams_an_answer_and_others_are_refused() {
    let Some(module) = common::playwright() else {
        eprintln!("skipped: needs node, /usr/bin/chromium and playwright-core (site/check.sh installs it)");
        return;
    };
    let dir = TempDir::new("cors-browser");
    let model = common::pinky_model(dir.path());
    let home = dir.join("home").display().to_string();
    let page_port = free_port();
    let origin = format!("http://127.0.0.1:{page_port}");
    let start = |extra: &[&str]| {
        let mut args = vec![
            "--engine",
            "pinky",
            "--model",
            model.as_str(),
            "--api-key",
            KEY,
        ];
        args.extend_from_slice(extra);
        let server = Server::start(&args, &[("GENIUS_HOME", home.as_str())]);
        server.wait_healthy();
        server
    };

    let allowed = start(&["--cors-origin", origin.as_str()]);
    let read = run_page(&module, page_port, &allowed);
    assert_eq!(read["ok"], true, "{read}");
    assert_eq!(read["status"], 200, "{read}");
    assert_eq!(read["text"], "Narf! You said: hello from a page", "{read}");
    assert!(read["events"].as_u64().unwrap() > 2, "not streamed: {read}");
    drop(allowed);

    let other = start(&["--cors-origin", "http://127.0.0.1:1"]);
    let refused = run_page(&module, page_port, &other);
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("Failed to fetch"),
        "{refused}"
    );
    drop(other);

    let closed = start(&[]);
    let refused = run_page(&module, page_port, &closed);
    assert_eq!(refused["ok"], false, "{refused}");
}

#[test]
fn the_chat_page_renders_markdown_folds_thinking_and_runs_no_model_markup() {
    let Some(module) = common::playwright() else {
        eprintln!("skipped: needs node, /usr/bin/chromium and playwright-core (site/check.sh installs it)");
        return;
    };
    let dir = TempDir::new("chat-page-render");
    let model = common::pinky_model(dir.path());
    let home = dir.join("home").display().to_string();
    let server = Server::start(
        &["--engine", "pinky", "--model", model.as_str()],
        &[("GENIUS_HOME", &home)],
    );
    server.wait_healthy();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chat-page");
    std::fs::create_dir_all(&shots).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/render.js");
    let output = Command::new("node")
        .arg(script)
        .arg(format!("http://127.0.0.1:{}", server.addr.port()))
        .arg(shots.join("chat-render.png"))
        .env("PLAYWRIGHT_CORE", module)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("no result: {stdout}"));
    eprintln!("the page rendered: {seen}");
    assert_eq!(seen["ok"], true, "{seen}");
    assert_eq!(seen["code"], "let x = 1;", "{seen}");
    assert_eq!(seen["codeClass"], "language-js", "{seen}");
    assert_eq!(seen["bold"], "bold", "{seen}");
    assert_eq!(seen["inlineCode"], "a<b", "{seen}");
    assert_eq!(seen["thinking"], "plan it", "{seen}");
    assert_eq!(seen["thinkingOpen"], false, "folded once the answer came");
    assert_eq!(seen["images"], 0, "the model's HTML stayed text: {seen}");
    assert_eq!(seen["pwned"], false, "{seen}");
    assert_eq!(seen["link"], "https://example.org/", "{seen}");
    assert_eq!(seen["linkRel"], "noopener noreferrer", "{seen}");
    assert_eq!(seen["elsewhere"], serde_json::json!([]), "{seen}");
}

//! llama.cpp's helper endpoints on Qwen2.5-Coder, against llama.cpp's own
//! server: every case of `fixtures/helpers/cases.json` gets, field by
//! field, the answer llama-server b11434 gave (recorded in
//! `llama-server.json` by `record.py`); with `LLAMA_SERVER` set to its
//! binary, the peer is asked again in the same run.

#![cfg(feature = "llama")]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{post, request, Server};
use rusty_genius::facecrab::testing::{TempDir, QWEN};
use serde_json::Value;

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/helpers")
}

fn read(name: &str) -> Value {
    let path = fixtures().join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Where two answers first differ, as a JSON pointer and both values.
fn difference(pointer: &str, ours: &Value, theirs: &Value) -> Option<String> {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys()) {
                let here = format!("{pointer}/{key}");
                let (x, y) = (
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                );
                if let Some(found) = difference(&here, x, y) {
                    return Some(found);
                }
            }
            None
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                if let Some(found) = difference(&format!("{pointer}/{i}"), x, y) {
                    return Some(found);
                }
            }
            (a.len() != b.len()).then(|| {
                format!(
                    "{pointer}: {} items here, {} in llama-server's",
                    a.len(),
                    b.len()
                )
            })
        }
        _ => {
            (ours != theirs).then(|| format!("{pointer}: {ours} here, {theirs} in llama-server's"))
        }
    }
}

/// Asks llama-server at `binary` every case, as `record.py` does.
fn ask_peer(binary: &str, model: &str, cases: &[Value]) -> Vec<Value> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut peer = Command::new(binary)
        .args([
            "-m",
            model,
            "--port",
            &port.to_string(),
            "-c",
            "4096",
            "--no-webui",
            "--jinja",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama-server starts");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while request(addr, "GET", "/health", &[], None).map_or(true, |r| r.status != 200) {
        assert!(
            Instant::now() < deadline,
            "llama-server never became healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let answers = cases
        .iter()
        .map(|case| post(addr, case["path"].as_str().unwrap(), &case["body"], &[]).json())
        .collect();
    let _ = peer.kill();
    let _ = peer.wait();
    answers
}

#[test]
fn tokenize_detokenize_and_apply_template_answer_as_llama_server_does() {
    let Some(qwen) = QWEN.for_test() else { return };
    let qwen = qwen.display().to_string();
    let home = TempDir::new("serve-helpers");
    let server = Server::start(
        &["--model", &qwen, "--ctx-size", "4096", "--parallel", "1"],
        &[("GENIUS_HOME", &home.path().display().to_string())],
    );
    server.wait_healthy();

    let cases = read("cases.json");
    let cases = cases.as_array().unwrap();
    let recorded = read("llama-server.json");
    let mut theirs: Vec<Value> = recorded
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["answer"].clone())
        .collect();
    assert_eq!(
        theirs.len(),
        cases.len(),
        "record.py again: the cases changed"
    );
    if let Ok(binary) = std::env::var("LLAMA_SERVER") {
        let live = ask_peer(&binary, &qwen, cases);
        for (case, (now, then)) in cases.iter().zip(live.iter().zip(&theirs)) {
            assert_eq!(
                now, then,
                "{}: llama-server now differs from its recording",
                case["name"]
            );
        }
        theirs = live;
    }
    let mut failures = Vec::new();
    for (case, theirs) in cases.iter().zip(&theirs) {
        let reply = post(
            server.addr,
            case["path"].as_str().unwrap(),
            &case["body"],
            &[],
        );
        if reply.status != 200 {
            failures.push(format!(
                "{}: {} {}",
                case["name"],
                reply.status,
                reply.text()
            ));
            continue;
        }
        if let Some(found) = difference("", &reply.json(), theirs) {
            failures.push(format!("{}: {found}", case["name"]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // An id outside the vocabulary is a 400 naming it.
    let unknown = post(
        server.addr,
        "/detokenize",
        &serde_json::json!({"tokens": [9707, 151936]}),
        &[],
    );
    assert_eq!(unknown.status, 400, "{}", unknown.text());
    assert!(
        unknown.text().contains("token 151936"),
        "{}",
        unknown.text()
    );
    let props = request(server.addr, "GET", "/props", &[], None).unwrap();
    assert_eq!(props.status, 200);
    assert_eq!(props.json()["default_generation_settings"]["n_ctx"], 4096);
    assert_eq!(props.json()["total_slots"], 1);
}

//! KV snapshots through `genius serve` on the real chat model: what a
//! conversation decoded survives hibernation and restarts, and a snapshot
//! that does not fit (another model, another context size, damaged, cut
//! short, killed mid-write, past the budget) is never used.
//!
//! Needs `GENIUS_TEST_CHAT_MODEL` (Qwen2.5-Coder-0.5B-Instruct) and, for
//! the other-model check, `GENIUS_TEST_MODEL` (gemma-3-270m).

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // says how the kill fell

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Server;
use rusty_genius::facecrab::testing::{sha256_file, TempDir, GEMMA, QWEN};
use serde_json::{json, Value};

/// A system prompt of about a thousand tokens, as agents send them.
fn system_prompt() -> String {
    let rules: Vec<String> = (0..60)
        .map(|i| {
            format!(
                "Rule {i}: when a user asks about ticket {}, reply with its queue, {}.",
                1000 + i * 7,
                ["billing", "shipping", "returns", "accounts"][i % 4]
            )
        })
        .collect();
    format!("You are a support assistant. {}", rules.join(" "))
}

fn ask(server: &Server, model: &str, question: &str) -> (String, Value) {
    let reply = common::post(
        server.addr,
        "/v1/chat/completions",
        &json!({
            "model": model,
            "messages": [
                {"role": "system", "content": system_prompt()},
                {"role": "user", "content": question},
            ],
            "max_tokens": 24,
            "temperature": 0,
        }),
        &[],
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json();
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    (text, body["usage"].clone())
}

fn cached(usage: &Value) -> u64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0)
}

fn prompt_tokens(usage: &Value) -> u64 {
    usage["prompt_tokens"].as_u64().unwrap()
}

/// `genius serve` on `model` with snapshots in `kv` (or none).
fn serve(model: &Path, kv: Option<&Path>, args: &[&str]) -> Server {
    let model = model.display().to_string();
    let kv = kv.map_or("off".to_owned(), |dir| dir.display().to_string());
    let mut all = vec!["--model", &model, "--parallel", "2"];
    if !args.contains(&"--ctx-size") {
        all.extend(["--ctx-size", "2048"]);
    }
    all.extend_from_slice(args);
    let server = Server::start(&all, &[("GENIUS_KV_DIR", &kv)]);
    server.wait_healthy();
    server
}

fn id(model: &Path) -> String {
    model.file_stem().unwrap().to_string_lossy().into_owned()
}

/// The snapshot files under `kv`.
fn snapshots(kv: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in std::fs::read_dir(kv).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if file.path().extension().is_some_and(|e| e == "kvs") {
                found.push(file.path());
            }
        }
    }
    found.sort();
    found
}

const FIRST: &str = "Which queue handles ticket 1014?";
const SECOND: &str = "Which queue handles ticket 1042?";

/// The second question's answer from a server that never stopped, after
/// the first question, and the usage of each.
fn warm_answer(model: &Path) -> (String, Value, Value) {
    let server = serve(model, None, &[]);
    let (_, first) = ask(&server, &id(model), FIRST);
    let (answer, second) = ask(&server, &id(model), SECOND);
    (answer, first, second)
}

#[test]
fn a_restart_keeps_the_system_prompt_and_answers_as_if_it_never_stopped() {
    let Some(model) = QWEN.for_test() else { return };
    let (expected, first_usage, warm_usage) = warm_answer(&model);
    assert!(
        prompt_tokens(&first_usage) > 900,
        "the system prompt is about a thousand tokens: {first_usage}"
    );
    let kv = TempDir::new("kv-restart");
    let mut before = serve(&model, Some(kv.path()), &[]);
    ask(&before, &id(&model), FIRST);
    before.terminate();
    assert!(
        before
            .log()
            .iter()
            .any(|l| l.contains("saved a KV snapshot")),
        "{:?}",
        before.log()
    );
    assert!(!snapshots(kv.path()).is_empty());

    let after = serve(&model, Some(kv.path()), &[]);
    let (answer, usage) = ask(&after, &id(&model), SECOND);
    assert_eq!(
        answer, expected,
        "the answer after a restart is the warm one"
    );
    assert_eq!(
        cached(&usage),
        cached(&warm_usage),
        "as much is cached as on a server that never stopped: {usage}"
    );
    assert!(
        prompt_tokens(&usage) - cached(&usage) < 40,
        "only the new question is decoded: {usage}"
    );
}

#[test]
fn hibernation_keeps_the_prefix_and_the_answer() {
    let Some(model) = QWEN.for_test() else { return };
    let (expected, _, warm_usage) = warm_answer(&model);
    let kv = TempDir::new("kv-hibernate");
    let server = serve(&model, Some(kv.path()), &["--idle-unload", "1"]);
    ask(&server, &id(&model), FIRST);
    assert!(
        server
            .wait_for_log("saved a KV snapshot", Duration::from_secs(30))
            .is_some(),
        "{:?}",
        server.log()
    );
    let (answer, usage) = ask(&server, &id(&model), SECOND);
    assert_eq!(answer, expected);
    assert_eq!(cached(&usage), cached(&warm_usage), "{usage}");
    assert!(server
        .log()
        .iter()
        .any(|l| l.contains("restored") && l.contains("from disk")));
}

/// Writes the snapshots of the first question into `kv`.
fn make_snapshots(model: &Path, kv: &Path) {
    let mut server = serve(model, Some(kv), &[]);
    ask(&server, &id(model), FIRST);
    server.terminate();
    assert!(!snapshots(kv).is_empty(), "{:?}", server.log());
}

/// The second question asked cold, of a server without snapshots.
fn cold_answer(model: &Path, args: &[&str]) -> String {
    let server = serve(model, None, args);
    ask(&server, &id(model), SECOND).0
}

/// Starts a server on `kv`, asks the second question, and checks that a
/// log line gives `why` the snapshot was not used, that nothing was read
/// from it, and that the answer is `expected`.
fn refused(model: &Path, kv: &Path, args: &[&str], why: &str, expected: &str) {
    let server = serve(model, Some(kv), args);
    let (answer, usage) = ask(&server, &id(model), SECOND);
    let log = server.log();
    assert!(
        log.iter()
            .any(|l| l.contains("not used and deleted") && l.contains(why)),
        "no log line says `{why}`: {log:#?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("restored")),
        "a refused snapshot was read: {log:#?}"
    );
    assert_eq!(cached(&usage), 0, "{usage}");
    assert_eq!(answer, expected);
}

#[test]
fn a_damaged_or_truncated_snapshot_is_deleted_and_the_answer_is_still_right() {
    let Some(model) = QWEN.for_test() else { return };
    let expected = cold_answer(&model, &[]);

    let kv = TempDir::new("kv-damaged");
    make_snapshots(&model, kv.path());
    for file in snapshots(kv.path()) {
        let mut bytes = std::fs::read(&file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
    }
    refused(&model, kv.path(), &[], "checksum", &expected);
    assert!(
        snapshots(kv.path()).is_empty(),
        "the damaged snapshot is gone"
    );

    let kv = TempDir::new("kv-truncated");
    make_snapshots(&model, kv.path());
    for file in snapshots(kv.path()) {
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() * 2 / 3]).unwrap();
    }
    refused(&model, kv.path(), &[], "truncated", &expected);
    assert!(snapshots(kv.path()).is_empty());
}

#[test]
fn a_snapshot_of_another_context_size_or_model_is_deleted_and_never_used() {
    let Some(model) = QWEN.for_test() else { return };
    let kv = TempDir::new("kv-context");
    make_snapshots(&model, kv.path());
    let expected = cold_answer(&model, &["--ctx-size", "1536"]);
    refused(
        &model,
        kv.path(),
        &["--ctx-size", "1536"],
        "context",
        &expected,
    );

    // Qwen's snapshots where gemma's belong: their header names Qwen.
    let Some(gemma) = GEMMA.for_test() else {
        return;
    };
    let kv = TempDir::new("kv-other-model");
    make_snapshots(&model, kv.path());
    let gemma_dir = kv.path().join(sha256_file(&gemma).unwrap());
    std::fs::create_dir_all(&gemma_dir).unwrap();
    for file in snapshots(kv.path()) {
        std::fs::rename(&file, gemma_dir.join(file.file_name().unwrap())).unwrap();
    }
    let server = serve(&gemma, Some(kv.path()), &[]);
    // Gemma's file is hashed (and its snapshots listed) in the background.
    server.wait_for_log("not used and deleted", Duration::from_secs(60));
    let reply = common::post(
        server.addr,
        "/v1/completions",
        &json!({"model": id(&gemma), "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
        &[],
    );
    assert_eq!(reply.status, 200);
    let log = server.log();
    assert!(
        log.iter()
            .any(|l| l.contains("not used and deleted") && l.contains("another model")),
        "{log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains("restored")));
    assert!(std::fs::read_dir(&gemma_dir).unwrap().next().is_none());
}

#[test]
fn a_tiny_budget_keeps_the_newest_snapshots_and_nothing_breaks() {
    let Some(model) = QWEN.for_test() else { return };
    let kv = TempDir::new("kv-budget");
    // One snapshot of the system prompt is about 12 MiB.
    let mut server = serve(&model, Some(kv.path()), &["--kv-disk", "20"]);
    for question in [FIRST, SECOND] {
        // Two conversations with system prompts of their own.
        let reply = common::post(
            server.addr,
            "/v1/chat/completions",
            &json!({
                "model": id(&model),
                "messages": [
                    {"role": "system", "content": format!("{question} {}", system_prompt())},
                    {"role": "user", "content": question},
                ],
                "max_tokens": 8,
                "temperature": 0,
            }),
            &[],
        );
        assert_eq!(reply.status, 200);
    }
    server.terminate();
    let log = server.log();
    assert!(
        log.iter()
            .any(|l| l.contains("exceed their budget of 20 MiB")),
        "{log:#?}"
    );
    let left = snapshots(kv.path());
    assert_eq!(left.len(), 1, "{log:#?}");
    let total: u64 = left
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(total <= 20 << 20);

    // A budget smaller than one snapshot saves nothing, and serving goes on.
    let kv = TempDir::new("kv-budget-tiny");
    let mut server = serve(&model, Some(kv.path()), &["--kv-disk", "1"]);
    let (answer, _) = ask(&server, &id(&model), FIRST);
    assert!(!answer.is_empty());
    server.terminate();
    assert!(snapshots(kv.path()).is_empty());
    assert!(server
        .log()
        .iter()
        .any(|l| l.contains("larger than the whole snapshot budget")));
}

#[test]
fn a_process_killed_while_saving_leaves_no_snapshot_that_is_used() {
    let Some(model) = QWEN.for_test() else { return };
    let expected = cold_answer(&model, &[]);
    let kv = TempDir::new("kv-killed");
    let mut server = serve(&model, Some(kv.path()), &[]);
    ask(&server, &id(&model), FIRST);
    // SIGTERM starts the save; SIGKILL as soon as a temporary file shows.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status();
    let model_dir = kv.path().join(sha256_file(&model).unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut caught = false;
    while std::time::Instant::now() < deadline {
        let temp = std::fs::read_dir(&model_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|f| f.file_name().to_string_lossy().contains(".tmp-"));
        if temp {
            server.kill();
            caught = true;
            break;
        }
        if !snapshots(kv.path()).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    server.kill();
    eprintln!(
        "killed {} the write",
        if caught { "during" } else { "after" }
    );
    // Whatever is left: a whole snapshot (renamed once complete) may be
    // used; a temporary file never is.
    let complete = snapshots(kv.path());
    let server = serve(&model, Some(kv.path()), &[]);
    let (answer, usage) = ask(&server, &id(&model), SECOND);
    let log = server.log();
    assert!(
        !log.iter().any(|l| l.contains("not used and deleted")),
        "a snapshot was left half-written at its final name: {log:#?}"
    );
    if complete.is_empty() {
        assert_eq!(cached(&usage), 0, "{usage}");
        assert_eq!(answer, expected);
    } else {
        assert!(cached(&usage) > 900, "{usage}");
    }
}

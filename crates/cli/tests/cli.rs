//! The `genius` command line: pull, list, rm, run, help and exit codes.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use rusty_genius::facecrab::testing::{TempDir, TestHub};

fn genius(home: &TempDir, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_genius"));
    command
        .args(args)
        .env("GENIUS_HOME", home.path())
        .env_remove("HF_TOKEN");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("genius runs")
}

/// `genius <args>` with `input` on its stdin, as a chat typed in.
fn genius_fed(home: &TempDir, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_genius"))
        .args(args)
        .env("GENIUS_HOME", home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("genius runs");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn every_command_has_help() {
    let home = TempDir::new("cli-help");
    for command in [&[][..], &["pull"], &["run"], &["list"], &["rm"], &["serve"]] {
        let mut args = command.to_vec();
        args.push("--help");
        let out = genius(&home, &args, &[]);
        assert!(out.status.success(), "{args:?}");
        let help = text(&out.stdout);
        assert!(help.contains("Usage: genius"), "{help}");
        assert!(help.contains("Exit codes"), "{help}");
    }
    let wrong = genius(&home, &["frobnicate"], &[]);
    assert_eq!(wrong.status.code(), Some(2));
}

#[test]
fn pull_list_and_rm_work_on_the_cache_with_exit_codes_scripts_can_use() {
    let home = TempDir::new("cli-cache");
    let hub = TestHub::start().unwrap();
    let model = common::pinky_model(home.path());
    let bytes = std::fs::read(&model).unwrap();
    let source = home.join("source.gguf");
    std::fs::write(&source, &bytes).unwrap();
    hub.add_file("org/tiny-GGUF", "tiny-q4_k_m.gguf", &source, None)
        .unwrap();
    let endpoint = hub.endpoint();
    let env = [("HF_ENDPOINT", endpoint.as_str())];

    let empty = genius(&home, &["list"], &env);
    assert!(empty.status.success());
    assert!(
        text(&empty.stderr).contains("no models"),
        "{}",
        text(&empty.stderr)
    );

    let pulled = genius(&home, &["pull", "org/tiny-GGUF"], &env);
    assert!(pulled.status.success(), "{}", text(&pulled.stderr));
    let path = text(&pulled.stdout).trim().to_owned();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    let listed = genius(&home, &["list"], &env);
    assert!(listed.status.success());
    assert!(
        text(&listed.stdout).contains("org/tiny-GGUF/tiny-q4_k_m.gguf"),
        "{}",
        text(&listed.stdout)
    );

    // A second pull is served from the cache: no request reaches the Hub.
    hub.clear_requests();
    let again = genius(&home, &["pull", "org/tiny-GGUF"], &env);
    assert!(again.status.success());
    assert_eq!(text(&again.stdout).trim(), path);
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());

    let missing = genius(&home, &["pull", "org/no-such-repo"], &env);
    assert_eq!(missing.status.code(), Some(3), "{}", text(&missing.stderr));
    assert!(text(&missing.stderr).starts_with("error: "));
    let not_registry = genius(&home, &["pull", "no-such-registry-name"], &env);
    assert_eq!(not_registry.status.code(), Some(3));
    let unreachable = genius(
        &home,
        &["pull", "org/other-GGUF"],
        &[("HF_ENDPOINT", "http://127.0.0.1:9")],
    );
    assert_eq!(
        unreachable.status.code(),
        Some(4),
        "{}",
        text(&unreachable.stderr)
    );

    let removed = genius(&home, &["rm", "org/tiny-GGUF/tiny-q4_k_m.gguf"], &env);
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    assert!(!std::path::Path::new(&path).exists());
    let gone = genius(&home, &["rm", "org/tiny-GGUF/tiny-q4_k_m.gguf"], &env);
    assert_eq!(gone.status.code(), Some(3));
}

#[test]
fn pull_refuses_a_file_that_is_not_a_model_and_an_encoded_dot_dot() {
    let home = TempDir::new("cli-pull-bad");
    let hub = TestHub::start().unwrap();
    let endpoint = hub.endpoint();
    let env = [("HF_ENDPOINT", endpoint.as_str())];
    let text_file = home.join("passwd");
    std::fs::write(&text_file, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
    for path in [text_file.display().to_string(), "/etc/passwd".to_owned()] {
        if !std::path::Path::new(&path).is_file() {
            continue;
        }
        let pulled = genius(&home, &["pull", &path], &env);
        assert_eq!(pulled.status.code(), Some(1), "{}", text(&pulled.stderr));
        assert!(
            text(&pulled.stderr).contains("not a GGUF model"),
            "{}",
            text(&pulled.stderr)
        );
        assert!(text(&pulled.stdout).is_empty());
    }
    let encoded = genius(&home, &["pull", "org/tiny-GGUF/%2e%2e/x.gguf@v1"], &env);
    assert_eq!(encoded.status.code(), Some(3), "{}", text(&encoded.stderr));
    assert!(
        text(&encoded.stderr).contains("invalid model name"),
        "{}",
        text(&encoded.stderr)
    );
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}

#[test]
fn run_answers_a_prompt_and_chats_from_stdin() {
    let home = TempDir::new("cli-run");
    let model = common::pinky_model(home.path());
    let once = genius(
        &home,
        &["run", &model, "--engine", "pinky", "hello", "world"],
        &[],
    );
    assert!(once.status.success(), "{}", text(&once.stderr));
    assert_eq!(text(&once.stdout).trim(), "Narf! You said: hello world");

    let out = genius_fed(
        &home,
        &["run", &model, "--engine", "pinky"],
        b"first line\n\nsecond line\n/bye\nnever read\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        ["Narf! You said: first line", "Narf! You said: second line"]
    );

    let missing = genius(
        &home,
        &["run", "/no/such/model.gguf", "--engine", "pinky", "hi"],
        &[],
    );
    assert_eq!(missing.status.code(), Some(3), "{}", text(&missing.stderr));
}

/// The interactive chat keeps its history: the model answers the second
/// turn from the first (on the instruct test model).
#[cfg(feature = "llama")]
#[test]
fn the_interactive_chat_remembers_the_conversation() {
    let Some(model) = rusty_genius::facecrab::testing::QWEN.for_test() else {
        return;
    };
    let home = TempDir::new("cli-chat");
    let model = model.display().to_string();
    let out = genius_fed(
        &home,
        &[
            "run",
            &model,
            "--system",
            "Answer in one short sentence.",
            "--temperature",
            "0",
            "--max-tokens",
            "48",
            "--parallel",
            "1",
        ],
        b"My name is Ada.\nWhat is my name?\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answers = text(&out.stdout);
    let second = answers
        .lines()
        .filter(|l| !l.is_empty())
        .nth(1)
        .unwrap_or("");
    assert!(second.contains("Ada"), "{answers}");
}

/// Sends `signal` (`INT`, `TERM`) to a child.
fn signal(child: &std::process::Child, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Reads from `out` until `enough` bytes came (or it ends); what came.
fn read_some(out: &mut impl std::io::Read, enough: usize) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 256];
    while seen.len() < enough {
        match out.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
        }
    }
    seen
}

/// Waits for `child` at most `limit`; its exit code (`None` when a signal
/// ended it).
fn exit_code(child: &mut std::process::Child, limit: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("genius did not exit within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `genius run` on the real model, cut off mid-answer: by a reader that
/// closes the pipe (`genius run … | head -c 8`), it stops and exits 0; by
/// Ctrl-C, it stops and exits 130. Never a crash of the engine thread.
#[cfg(feature = "llama")]
#[test]
fn run_cut_off_by_a_closed_pipe_or_ctrl_c_stops_and_exits_cleanly() {
    let Some(model) = rusty_genius::facecrab::testing::GEMMA.for_test() else {
        return;
    };
    let home = TempDir::new("cli-cut-off");
    let model = model.display().to_string();
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_genius"))
            .args(["run", &model, "--max-tokens", "400", "--temperature", "0"])
            .arg("1, 2, 3, 4,")
            .env("GENIUS_HOME", home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("genius runs")
    };
    let limit = std::time::Duration::from_secs(120);
    for _ in 0..4 {
        let mut child = start();
        let mut out = child.stdout.take().unwrap();
        assert!(read_some(&mut out, 8).len() >= 8);
        drop(out);
        let code = exit_code(&mut child, limit);
        let stderr = text(&read_some(child.stderr.as_mut().unwrap(), usize::MAX));
        assert_eq!(code, Some(0), "closed pipe: {stderr}");
    }
    for _ in 0..3 {
        let mut child = start();
        let mut out = child.stdout.take().unwrap();
        assert!(read_some(&mut out, 8).len() >= 8);
        signal(&child, "INT");
        let code = exit_code(&mut child, limit);
        let rest = text(&read_some(&mut out, usize::MAX));
        let stderr = text(&read_some(child.stderr.as_mut().unwrap(), usize::MAX));
        assert_eq!(code, Some(130), "Ctrl-C: {stderr}");
        assert!(rest.len() < 2000, "the answer went on after Ctrl-C: {rest}");
    }
}

/// In a chat, Ctrl-C stops the answer and the chat goes on; at the prompt
/// it ends the chat (exit 130).
#[test]
fn ctrl_c_stops_a_chat_answer_and_ends_the_chat_at_the_prompt() {
    let home = TempDir::new("cli-chat-interrupt");
    let model = common::pinky_model(home.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_genius"))
        .args([
            "run",
            &model,
            "--engine",
            "pinky",
            "--pinky-token-ms",
            "300",
        ])
        .env("GENIUS_HOME", home.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("genius runs");
    let mut input = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    input.write_all(b"first question\n").unwrap();
    // The first piece of the answer, then Ctrl-C.
    assert!(!read_some(&mut out, 1).is_empty());
    signal(&child, "INT");
    input.write_all(b"second\n").unwrap();
    let mut seen = Vec::new();
    while !text(&seen).contains("You said: second") {
        let more = read_some(&mut out, 1);
        assert!(!more.is_empty(), "the chat ended: {}", text(&seen));
        seen.extend(more);
    }
    assert!(
        !text(&seen).contains("first question"),
        "the stopped answer went on: {}",
        text(&seen)
    );
    // Back at the prompt: Ctrl-C ends the chat.
    while !text(&seen).ends_with('\n') {
        seen.extend(read_some(&mut out, 1));
    }
    signal(&child, "INT");
    assert_eq!(
        exit_code(&mut child, std::time::Duration::from_secs(30)),
        Some(130)
    );
}

//! Fill-in-the-middle over HTTP on Qwen2.5-Coder: `/infill` as llama.cpp's
//! server and its editor plugins speak it (whole, streamed, with
//! `response_fields`), `suffix` on `/v1/completions` and on Ollama's
//! `/api/generate`; a completion at the next keystroke decodes only what
//! changed; gemma-3 (no fill-in-the-middle tokens) gets a 400 saying so.

#![cfg(feature = "llama")]

mod common;

use common::{post, Server};
use rusty_genius::facecrab::testing::{TempDir, GEMMA, QWEN};
use serde_json::{json, Value};

const QWEN_ID: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m";

fn start(models: &[&str]) -> (Server, TempDir) {
    let home = TempDir::new("serve-infill");
    let mut args = vec!["--ctx-size", "4096", "--parallel", "2"];
    for model in models {
        args.extend(["--model", model]);
    }
    let server = Server::start(
        &args,
        &[("GENIUS_HOME", &home.path().display().to_string())],
    );
    server.wait_healthy();
    (server, home)
}

// A middle whose every token leads the next choice by 1.19 logits or more
// here (3.33 with ops.py below as context).
const PREFIX: &str = "def maximum(a, b):\n    if a > b:\n        return a\n    ";
const SUFFIX: &str = "\n\n\nprint(maximum(1, 2))\n";
const MIDDLE: &str = "return b";

#[test]
fn infill_answers_as_llama_cpps_server_does_and_suffix_works_on_openai_and_ollama() {
    let Some(qwen) = QWEN.for_test() else { return };
    let qwen = qwen.display().to_string();
    let (server, _home) = start(&[&qwen]);
    // As llama.vscode sends it.
    let body = json!({
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "input_extra": [{"text": "def minimum(a, b):\n    if a < b:\n        return a\n    return b\n", "time": 1700000000, "filename": "ops.py"}],
        "prompt": "",
        "n_predict": 32,
        "n_indent": 4,
        "top_k": 40,
        "top_p": 0.99,
        "temperature": 0,
        "samplers": ["top_k", "top_p", "infill"],
        "stream": false,
        "cache_prompt": true,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 3000,
        "response_fields": ["content", "timings/prompt_n", "timings/predicted_n", "tokens_cached", "truncated"],
    });
    let reply = post(server.addr, "/infill", &body, &[]);
    assert_eq!(reply.status, 200, "{}", reply.json());
    let answer = reply.json();
    let content = answer["content"].as_str().unwrap();
    assert!(content.contains(MIDDLE), "{answer}");
    assert!(!content.contains("<|"), "{answer}");
    // Only the fields asked for, the timings' under their slashed names.
    let mut keys: Vec<&str> = answer
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "content",
            "timings/predicted_n",
            "timings/prompt_n",
            "tokens_cached",
            "truncated"
        ],
        "{answer}"
    );
    // The next keystroke: the prompt up to the cursor is cached.
    let mut next = body.clone();
    next["input_prefix"] = json!(format!("{PREFIX}r"));
    let again = post(server.addr, "/infill", &next, &[]).json();
    let (cached, decoded) = (
        again["tokens_cached"].as_u64().unwrap(),
        again["timings/prompt_n"].as_u64().unwrap(),
    );
    assert!(cached > 30 && decoded < 25, "{again}");

    // Streamed: events of content, then the last with stop and timings.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed.as_object_mut().unwrap().remove("response_fields");
    let reply = post(server.addr, "/infill", &streamed, &[]);
    assert_eq!(reply.status, 200);
    let text = String::from_utf8(reply.body.clone()).unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let joined: String = events
        .iter()
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert_eq!(joined, content, "{text}");
    let last = events.last().unwrap();
    assert_eq!(last["stop"], true, "{text}");
    assert!(last["timings"]["predicted_n"].as_u64().is_some(), "{text}");

    // OpenAI's completions with a suffix.
    let reply = post(
        server.addr,
        "/v1/completions",
        &json!({"model": QWEN_ID, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 24, "temperature": 0}),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.json());
    let text = reply.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains(MIDDLE), "{text:?}");
    // Ollama's generate with a suffix.
    let reply = post(
        server.addr,
        "/api/generate",
        &json!({"model": QWEN_ID, "prompt": PREFIX, "suffix": SUFFIX, "stream": false, "options": {"temperature": 0, "num_predict": 24}}),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.json());
    let text = reply.json()["response"].as_str().unwrap().to_owned();
    assert!(text.contains(MIDDLE), "{text:?}");

    // What llama.cpp refuses, refused by name.
    let reply = post(server.addr, "/infill", &json!({"input_suffix": "x"}), &[]);
    assert_eq!(reply.status, 400);
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("input_prefix"));
}

#[test]
fn a_model_without_fill_in_the_middle_tokens_is_a_400_saying_so() {
    let Some(gemma) = GEMMA.for_test() else {
        return;
    };
    let gemma = gemma.display().to_string();
    let (server, _home) = start(&[&gemma]);
    for (path, body) in [
        (
            "/infill",
            json!({"input_prefix": PREFIX, "input_suffix": SUFFIX}),
        ),
        (
            "/v1/completions",
            json!({"model": "gemma-3-270m-q4_k_m", "prompt": PREFIX, "suffix": SUFFIX}),
        ),
    ] {
        let reply = post(server.addr, path, &body, &[]);
        assert_eq!(reply.status, 400, "{path}: {}", reply.json());
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains("fill-in-the-middle"), "{path}: {message}");
    }
}

#[test]
fn a_burst_of_completions_each_dropping_the_last_leaves_nothing_running() {
    let Some(qwen) = QWEN.for_test() else { return };
    let qwen = qwen.display().to_string();
    let (server, _home) = start(&[&qwen]);
    // As an editor does while typing: a request per keystroke, the one
    // before abandoned (its connection closed) as the next goes out.
    let file = "def total(prices):\n    result = 0\n    for price in prices:\n        ";
    let mut open: Option<std::net::TcpStream> = None;
    for typed in 1..=40 {
        let body = json!({
            "input_prefix": &file[..file.len() * typed / 40],
            "input_suffix": "\n    return result\n",
            "n_predict": 64,
            "temperature": 0,
        });
        let connection = common::send(
            server.addr,
            "POST",
            "/infill",
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
        .unwrap();
        drop(open.replace(connection));
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    // The last one is answered.
    let mut last = open.take().unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut last, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"content\""), "{answer}");
    // And nothing is left running or waiting.
    let started = std::time::Instant::now();
    loop {
        let listed = common::request(
            server.addr,
            "GET",
            &format!("/v1/models/{QWEN_ID}"),
            &[],
            None,
        )
        .unwrap()
        .json();
        let resident = &listed["resident"];
        if resident["running"] == 0 && resident["queued"] == 0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "still busy: {listed}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

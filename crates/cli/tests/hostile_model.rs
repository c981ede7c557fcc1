//! `genius serve` on the real engine against requests that once crashed or
//! wedged it: grammars llama.cpp's parser could not survive, grammars no
//! token can satisfy, schemas its converter would quietly weaken, and
//! embeddings of long texts on a generative model. Each is answered as a
//! 4xx (or bounded), and the server answers an ordinary request after it.

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // the measured memory goes to the test log

mod common;

use std::net::SocketAddr;

use common::{post, Server};
use rusty_genius::facecrab::testing::{TempDir, TestModel, GEMMA, QWEN};
use serde_json::{json, Value};

/// The id `genius serve --model <file>` lists a test model under.
fn id(model: TestModel) -> &'static str {
    model.file.trim_end_matches(".gguf")
}

/// A server of `model` (gemma for completions and embeddings, Qwen, which
/// has a chat template, for constrained chat).
fn serve(model: TestModel, dir: &TempDir, context: u32, extra: &[&str]) -> Option<Server> {
    let model = model.for_test()?.display().to_string();
    let context = context.to_string();
    let mut args = vec![
        "--model",
        model.as_str(),
        "--ctx-size",
        context.as_str(),
        "--parallel",
        "2",
    ];
    args.extend_from_slice(extra);
    let server = Server::start(
        &args,
        &[("GENIUS_HOME", &dir.join("home").display().to_string())],
    );
    server.wait_healthy();
    Some(server)
}

/// A greedy chat request to Qwen whose answer must follow `format`.
fn constrained(format: Value) -> Value {
    json!({
        "model": id(QWEN),
        "messages": [{"role": "user", "content": "Answer."}],
        "max_tokens": 8,
        "temperature": 0,
        "response_format": format,
    })
}

fn grammar(text: &str) -> Value {
    constrained(json!({"type": "grammar", "grammar": text}))
}

fn nested(depth: usize) -> String {
    format!("root ::= {}\"a\"{}", "(".repeat(depth), ")".repeat(depth))
}

/// The error message of a 400 answer.
fn refused(addr: SocketAddr, path: &str, body: &Value) -> String {
    let reply = post(addr, path, body, &[]);
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    assert_eq!(reply.status, 400, "{}", &text[..text.len().min(400)]);
    reply.json()["error"]["message"]
        .as_str()
        .expect("a message")
        .to_owned()
}

/// The process is alive and answers an ordinary request.
fn still_serves(server: &mut Server, model: TestModel) {
    assert!(server.is_running(), "the server died");
    let reply = post(
        server.addr,
        "/v1/completions",
        &json!({"model": id(model), "prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0}),
        &[],
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(!reply.completion_text(false).is_empty());
}

#[test]
fn grammars_that_would_crash_or_wedge_llama_cpp_are_refused_and_the_server_lives() {
    let dir = TempDir::new("hostile-grammar");
    let Some(mut server) = serve(QWEN, &dir, 1024, &[]) else {
        return;
    };
    let addr = server.addr;
    for depth in [5_000, 20_000, 100_000] {
        let message = refused(addr, "/v1/chat/completions", &grammar(&nested(depth)));
        assert!(message.contains("grammar_depth"), "{message}");
        still_serves(&mut server, QWEN);
    }
    // At the limit, the grammar reaches llama.cpp and holds the answer.
    let reply = post(addr, "/v1/chat/completions", &grammar(&nested(64)), &[]);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "a");

    // No token of any model spells a NUL byte.
    for text in [r#"root ::= "\x00" "a""#, r#"root ::= "a" "\x00""#] {
        let message = refused(addr, "/v1/chat/completions", &grammar(text));
        assert!(message.contains("no token"), "{message}");
        still_serves(&mut server, QWEN);
    }
    // A grammar llama.cpp cannot parse is the client's error too.
    let message = refused(addr, "/v1/chat/completions", &grammar("root ::= (\"a\""));
    assert!(message.contains("grammar"), "{message}");
    still_serves(&mut server, QWEN);
}

#[test]
fn the_engine_thread_parses_a_grammar_as_deep_as_a_raised_limit_admits() {
    // 20,000 levels overflow a default 2 MiB thread stack inside
    // llama.cpp's parser (which aborts the process); the engine thread's
    // stack is made for this.
    let dir = TempDir::new("hostile-deep");
    let Some(mut server) = serve(
        QWEN,
        &dir,
        1024,
        &[
            "--max-grammar-depth",
            "20000",
            "--max-grammar-bytes",
            "65536",
        ],
    ) else {
        return;
    };
    let reply = post(
        server.addr,
        "/v1/chat/completions",
        &grammar(&nested(20_000)),
        &[],
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["choices"][0]["message"]["content"], "a");
    still_serves(&mut server, QWEN);
}

#[test]
fn schemas_the_converter_would_weaken_are_refused_by_keyword() {
    let dir = TempDir::new("hostile-schema");
    let Some(mut server) = serve(QWEN, &dir, 1024, &[]) else {
        return;
    };
    let addr = server.addr;
    let schema = |property: Value| {
        constrained(
            json!({"type": "json_schema", "json_schema": {"name": "t", "schema": {
            "type": "object", "properties": {"v": property}, "required": ["v"]}}}),
        )
    };
    for (property, named) in [
        (json!({"not": {"type": "string"}}), "`not`"),
        (
            json!({"type": "string", "pattern": "^(?=a)[a-z]+$"}),
            "pattern",
        ),
        (json!({"type": "string", "pattern": "[a-z]+"}), "pattern"),
        (json!({"type": "string", "pattern": "^(ab$"}), "pattern"),
        (json!({"type": "number", "minimum": 0}), "`minimum`"),
        (json!({"type": "string", "format": "email"}), "email"),
        (json!({"type": "array", "uniqueItems": true}), "uniqueItems"),
    ] {
        let message = refused(addr, "/v1/chat/completions", &schema(property.clone()));
        assert!(message.contains(named), "{property}: {message}");
        still_serves(&mut server, QWEN);
    }
    // What the converter does enforce is answered.
    let fine = schema(json!({"type": "string", "pattern": "^[a-z]{2}$"}));
    let reply = post(addr, "/v1/chat/completions", &fine, &[]);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let content = reply.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let value: Value = serde_json::from_str(&content).expect("JSON");
    let v = value["v"].as_str().unwrap();
    assert!(
        v.len() == 2 && v.chars().all(|c| c.is_ascii_lowercase()),
        "{content}"
    );
}

#[test]
fn long_texts_embedded_on_a_generative_model_are_bounded_and_errors_show_no_paths() {
    let dir = TempDir::new("hostile-embed");
    let Some(mut server) = serve(GEMMA, &dir, 256, &[]) else {
        return;
    };
    let addr = server.addr;
    let model_path = GEMMA.local_file().unwrap().display().to_string();

    let message = refused(
        addr,
        "/v1/embeddings",
        &json!({"model": id(GEMMA), "input": "hello"}),
    );
    assert!(message.contains("pooling"), "{message}");
    assert!(!message.contains(&model_path), "{message}");
    assert!(!message.contains("/"), "a path in: {message}");

    let long = "word ".repeat(2000);
    let message = refused(
        addr,
        "/v1/embeddings",
        &json!({"model": id(GEMMA), "input": [long], "pooling": "mean"}),
    );
    assert!(message.contains("truncate"), "{message}");

    // Ten such texts, cut to the window (256 tokens here): once 4.8 GB
    // more memory and minutes of a held engine; now bounded, and others
    // are served meanwhile.
    let before = server.rss();
    let inputs = vec![long; 10];
    let body = json!({"model": id(GEMMA), "input": inputs, "pooling": "mean", "truncate": true});
    let heavy = std::thread::spawn(move || post(addr, "/v1/embeddings", &body, &[]));
    still_serves(&mut server, GEMMA);
    let reply = heavy.join().unwrap();
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let data = reply.json()["data"].as_array().unwrap().clone();
    assert_eq!(data.len(), 10);
    let grown = server.rss().saturating_sub(before);
    eprintln!("RSS grew by {} MB", grown >> 20);
    assert!(grown < 1 << 30, "RSS grew by {} MB", grown >> 20);
    still_serves(&mut server, GEMMA);
}

//! `genius serve` over the Pinky stub engine: the HTTP API's shapes,
//! errors, limits and cancellation, without a model.

#![allow(clippy::print_stderr)] // the measured count goes to the test log

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::{post, request, send, Server};
use rusty_genius::facecrab::testing::TempDir;
use serde_json::{json, Value};

const KEY: &str = "sk-test-key";

fn pinky_server(dir: &TempDir, extra: &[&str]) -> Server {
    common::pinky_server(dir.path(), &[&["--api-key", KEY][..], extra].concat())
}

const AUTH: (&str, &str) = ("Authorization", "Bearer sk-test-key");

/// Where a streamed chat chunk carries its text.
const CONTENT: &str = "/choices/0/delta/content";

fn chat_body(text: &str, stream: bool) -> Value {
    json!({
        "model": "pinky",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    })
}

#[test]
fn chat_answers_whole_and_streamed_in_the_openai_shape() {
    let dir = TempDir::new("serve-shape");
    let server = pinky_server(&dir, &[]);

    let whole = post(
        server.addr,
        "/v1/chat/completions",
        &chat_body("hello there", false),
        &[AUTH],
    );
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.body)
    );
    let body = whole.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "pinky");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Narf! You said: hello there"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut streamed_body = chat_body("hello there", true);
    streamed_body["stream_options"] = json!({"include_usage": true});
    let streamed = post(server.addr, "/v1/chat/completions", &streamed_body, &[AUTH]);
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.header("content-type"), Some("text/event-stream"));
    let chunks = streamed.chunks();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        streamed.streamed_text(CONTENT),
        "Narf! You said: hello there"
    );
    // One chunk per token: the words arrive one by one.
    let pieces = chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(pieces, 5, "{chunks:?}");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Completions continue the raw text; max_tokens ends them by length.
    let completion = post(
        server.addr,
        "/v1/completions",
        &json!({"model": "pinky", "prompt": "one two three", "max_tokens": 2}),
        &[AUTH],
    );
    assert_eq!(completion.status, 200);
    let body = completion.json();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "Narf! You ");
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    let models = request(server.addr, "GET", "/v1/models", &[AUTH], None).unwrap();
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], "pinky");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let dir = TempDir::new("serve-errors");
    let server = pinky_server(&dir, &["--max-body-bytes", "1000000"]);
    let error_of = |reply: &common::Reply| -> Value {
        let body = reply.json();
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(body["error"]["type"].is_string(), "{body}");
        body["error"].clone()
    };

    let malformed = request(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[AUTH],
        Some(b"{\"model\": \"pinky\", \"messages\": ["),
    )
    .unwrap();
    assert_eq!(malformed.status, 400);
    assert!(error_of(&malformed)["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));

    let wrong_type = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"model": "pinky", "messages": 5}),
        &[AUTH],
    );
    assert_eq!(wrong_type.status, 400);
    error_of(&wrong_type);

    let bad_value = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"model": "pinky", "messages": [{"role": "user", "content": "x"}], "temperature": -1}),
        &[AUTH],
    );
    assert_eq!(bad_value.status, 400);
    assert!(error_of(&bad_value)["message"]
        .as_str()
        .unwrap()
        .contains("temperature"));

    let huge = format!(
        "{{\"model\": \"pinky\", \"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "a".repeat(10 * 1024 * 1024)
    );
    let too_large = request(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[AUTH],
        Some(huge.as_bytes()),
    )
    .unwrap();
    assert_eq!(too_large.status, 413);
    error_of(&too_large);

    let unknown = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        &[AUTH],
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(error_of(&unknown)["code"], "model_not_found");

    let no_key = post(
        server.addr,
        "/v1/chat/completions",
        &chat_body("x", false),
        &[],
    );
    assert_eq!(no_key.status, 401);
    assert_eq!(error_of(&no_key)["code"], "invalid_api_key");
    let wrong_key = post(
        server.addr,
        "/v1/chat/completions",
        &chat_body("x", false),
        &[("Authorization", "Bearer sk-wrong")],
    );
    assert_eq!(wrong_key.status, 401);
    let models_without_key = request(server.addr, "GET", "/v1/models", &[], None).unwrap();
    assert_eq!(models_without_key.status, 401);

    let nowhere = request(server.addr, "GET", "/v1/nothing", &[AUTH], None).unwrap();
    assert_eq!(nowhere.status, 404);
    error_of(&nowhere);
    let wrong_method = request(server.addr, "DELETE", "/v1/models", &[AUTH], None).unwrap();
    assert_eq!(wrong_method.status, 405);
    error_of(&wrong_method);

    // /health needs no key (load balancers probe it).
    assert_eq!(
        request(server.addr, "GET", "/health", &[], None)
            .unwrap()
            .status,
        200
    );
    let fine = post(
        server.addr,
        "/v1/chat/completions",
        &chat_body("still here", false),
        &[AUTH],
    );
    assert_eq!(fine.status, 200);
    assert_eq!(
        fine.json()["choices"][0]["message"]["content"],
        "Narf! You said: still here"
    );
}

#[test]
fn a_client_that_hangs_up_stops_its_generation_and_the_others_finish() {
    let dir = TempDir::new("serve-hangup");
    let server = pinky_server(&dir, &["--pinky-token-ms", "20"]);
    let words: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
    let long = words.join(" ");

    let others: Vec<_> = (0..3)
        .map(|i| {
            let addr = server.addr;
            let text = format!("other {i} {}", words[..40].join(" "));
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/chat/completions",
                    &chat_body(&text, true),
                    &[AUTH],
                )
            })
        })
        .collect();

    let body = chat_body(&long, true).to_string();
    let stream = send(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[AUTH],
        Some(body.as_bytes()),
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut pieces = 0;
    let mut line = String::new();
    while pieces < 10 {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the stream ended early"
        );
        if line.contains("\"content\":\"") && !line.contains("\"content\":\"\"") {
            pieces += 1;
        }
    }
    drop(reader); // hang up mid-stream

    let stopped = server
        .wait_for_log("the client went away", Duration::from_secs(10))
        .expect("the server logs the stopped generation");
    let generated: usize = stopped
        .split("stopped after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a token count");
    let after: usize = stopped
        .split("tokens (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a count after the last piece");
    eprintln!("{stopped}");
    assert!(
        (10..30).contains(&generated) && after <= 2,
        "the generation went on after the client left: {stopped}"
    );

    for other in others {
        let reply = other.join().unwrap();
        assert_eq!(reply.status, 200);
        let text = reply.streamed_text(CONTENT);
        assert!(text.ends_with("w39"), "{text}");
    }
}

#[test]
fn thirty_two_concurrent_clients_all_get_their_own_answer() {
    let dir = TempDir::new("serve-32");
    let server = pinky_server(&dir, &["--pinky-token-ms", "2", "--parallel", "4"]);
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let text = format!("client number {i}");
                let reply = post(
                    addr,
                    "/v1/chat/completions",
                    &chat_body(&text, i % 2 == 0),
                    &[AUTH],
                );
                (i, text, reply)
            })
        })
        .collect();
    for client in clients {
        let (i, text, reply) = client.join().unwrap();
        assert_eq!(reply.status, 200);
        let answer: String = if i % 2 == 0 {
            reply.streamed_text(CONTENT)
        } else {
            reply.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(answer, format!("Narf! You said: {text}"));
    }
}

#[test]
fn without_a_model_named_it_serves_the_cache_and_loads_on_first_use() {
    let dir = TempDir::new("serve-cache");
    let hub = rusty_genius::facecrab::testing::TestHub::start().unwrap();
    let source = common::pinky_model(dir.path());
    hub.add_file(
        "org/tiny-GGUF",
        "tiny-q4_k_m.gguf",
        std::path::Path::new(&source),
        None,
    )
    .unwrap();
    let home = dir.join("home").display().to_string();
    let endpoint = hub.endpoint();
    let pulled = std::process::Command::new(env!("CARGO_BIN_EXE_genius"))
        .args(["pull", "org/tiny-GGUF"])
        .env("GENIUS_HOME", &home)
        .env("HF_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert!(pulled.status.success());
    hub.clear_requests();

    let server = Server::start(
        &["--engine", "pinky"],
        &[("GENIUS_HOME", &home), ("HF_ENDPOINT", &endpoint)],
    );
    server.wait_healthy();
    let models = request(server.addr, "GET", "/v1/models", &[], None).unwrap();
    let id = "org/tiny-GGUF/tiny-q4_k_m.gguf";
    assert_eq!(models.json()["data"][0]["id"], id);
    let mut body = chat_body("cached", false);
    body["model"] = json!(id);
    let reply = post(server.addr, "/v1/chat/completions", &body, &[]);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "Narf! You said: cached"
    );
    // A model the cache lacks is not downloaded on a client's behalf.
    body["model"] = json!("org/other-GGUF");
    let missing = post(server.addr, "/v1/chat/completions", &body, &[]);
    assert_eq!(missing.status, 404);
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}

#[test]
fn embeddings_come_in_the_openai_shape_as_floats_or_base64() {
    let dir = TempDir::new("serve-embed");
    let server = pinky_server(&dir, &[]);
    let body = json!({"model": "pinky", "input": ["the cat sat", "a dog ran"]});
    let reply = post(server.addr, "/v1/embeddings", &body, &[AUTH]);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let floats = reply.json();
    assert_eq!(floats["object"], "list");
    assert_eq!(floats["model"], "pinky");
    let data = floats["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["object"], "embedding");
    let first: Vec<f32> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(
        first,
        rusty_genius::cortex::Pinky::embedding("the cat sat", true)
    );
    assert_eq!(floats["usage"]["prompt_tokens"], 20);

    let mut as_base64 = body.clone();
    as_base64["encoding_format"] = json!("base64");
    let encoded = post(server.addr, "/v1/embeddings", &as_base64, &[AUTH]).json();
    let text = encoded["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(decode_base64_f32(text), first);

    // The whole width is no cut; a shorter one needs a model trained
    // for it, which Pinky is not.
    let whole = post(
        server.addr,
        "/v1/embeddings",
        &json!({"model": "pinky", "input": "x", "dimensions": 64}),
        &[AUTH],
    );
    assert_eq!(whole.status, 200);
    let refused = post(
        server.addr,
        "/v1/embeddings",
        &json!({"model": "pinky", "input": "x", "dimensions": 3}),
        &[AUTH],
    );
    let message = refused.json()["error"]["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap()
            .contains("not trained for shorter vectors"),
        "{message}"
    );
    for (bad, param) in [
        (json!({"model": "pinky", "input": []}), "input"),
        (json!({"model": "pinky", "input": ["ok", ""]}), "input[1]"),
        (
            json!({"model": "pinky", "input": "x", "dimensions": 3}),
            "dimensions",
        ),
        (
            json!({"model": "pinky", "input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
        (
            json!({"model": "pinky", "input": [[104, 300]]}),
            "input[0][1]",
        ),
        (json!({"model": "pinky", "input": [1.5]}), "input"),
        (json!({"model": "pinky", "input": {"text": "x"}}), "input"),
        (
            json!({"model": "pinky", "input": "x", "encoding_format": 5}),
            "encoding_format",
        ),
    ] {
        let reply = post(server.addr, "/v1/embeddings", &bad, &[AUTH]);
        assert_eq!(
            reply.status,
            400,
            "{bad}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = &reply.json()["error"];
        assert_eq!(error["param"], param, "{bad}");
        let message = error["message"].as_str().unwrap();
        assert!(
            !message.contains("untagged") && !message.contains("line 1"),
            "{bad}: {message}"
        );
    }
    let words = post(
        server.addr,
        "/v1/embeddings",
        &json!({"model": "pinky", "input": [1.5]}),
        &[AUTH],
    );
    assert!(
        words.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must be a string, a list of strings, a list of token ids"),
        "{}",
        String::from_utf8_lossy(&words.body)
    );
    let outside = post(
        server.addr,
        "/v1/embeddings",
        &json!({"model": "pinky", "input": [[104, 300]]}),
        &[AUTH],
    );
    assert!(
        outside.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token id 300 is not in Pinky's vocabulary"),
        "{}",
        String::from_utf8_lossy(&outside.body)
    );

    // Token ids (Pinky's are bytes) give the vectors of their text, alone
    // or as a list.
    let hello = rusty_genius::cortex::Pinky::embedding("hello", true);
    for input in [
        json!([104, 101, 108, 108, 111]),
        json!([[104, 101, 108, 108, 111], [104, 105]]),
    ] {
        let reply = post(
            server.addr,
            "/v1/embeddings",
            &json!({"model": "pinky", "input": input}),
            &[AUTH],
        );
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let vector: Vec<f32> = reply.json()["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(vector, hello, "{input}");
    }
}

/// The floats in standard base64 of little-endian f32s.
fn decode_base64_f32(text: &str) -> Vec<f32> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            other => panic!("not base64: {other}"),
        }
    };
    let mut bytes = Vec::new();
    for quad in text.as_bytes().chunks(4) {
        let data: Vec<u8> = quad.iter().copied().filter(|&c| c != b'=').collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | (value(c) << (18 - 6 * i)));
        for i in 0..data.len().saturating_sub(1) {
            bytes.push((n >> (16 - 8 * i)) as u8);
        }
    }
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn cross_origin_pages_are_refused_unless_their_origin_is_allowed() {
    let dir = TempDir::new("serve-cors");
    let page = "http://page.example:3000";
    let preflight = |server: &Server, origin: &str| {
        request(
            server.addr,
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, content-type",
                ),
            ],
            None,
        )
        .unwrap()
    };
    let from = |server: &Server, origin: &str| {
        post(
            server.addr,
            "/v1/chat/completions",
            &chat_body("hello", false),
            &[AUTH, ("Origin", origin)],
        )
    };

    // Off by default: no preflight is granted and no answer is readable.
    let closed = pinky_server(&dir, &[]);
    let refused = preflight(&closed, page);
    assert_eq!(
        refused.status,
        403,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--cors-origin"));
    assert_eq!(refused.header("access-control-allow-origin"), None);
    let answered = from(&closed, page);
    assert_eq!(answered.status, 200);
    assert_eq!(answered.header("access-control-allow-origin"), None);
    drop(closed);

    let open = pinky_server(&dir, &["--cors-origin", page]);
    let granted = preflight(&open, page);
    assert_eq!(granted.status, 200);
    assert_eq!(granted.header("access-control-allow-origin"), Some(page));
    assert!(granted
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    assert!(granted
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
    let answered = from(&open, page);
    assert_eq!(answered.status, 200);
    assert_eq!(answered.header("access-control-allow-origin"), Some(page));
    assert_eq!(answered.header("vary"), Some("Origin"));
    // Errors are readable too, so that the page can show them.
    let unauthorized = post(
        open.addr,
        "/v1/chat/completions",
        &chat_body("hello", false),
        &[("Origin", page)],
    );
    assert_eq!(unauthorized.status, 401);
    assert_eq!(
        unauthorized.header("access-control-allow-origin"),
        Some(page)
    );
    // Another origin is still refused.
    let other = "http://other.example";
    assert_eq!(preflight(&open, other).status, 403);
    assert_eq!(
        from(&open, other).header("access-control-allow-origin"),
        None
    );
}

#[test]
fn sampling_settings_out_of_range_are_refused_by_name() {
    let dir = TempDir::new("serve-sampling");
    let server = pinky_server(&dir, &[]);
    for (extra, param) in [
        (json!({"frequency_penalty": 3.0}), "frequency_penalty"),
        (json!({"presence_penalty": -2.5}), "presence_penalty"),
        (json!({"logit_bias": {"12": 250}}), "logit_bias"),
        (json!({"logit_bias": {"twelve": 1}}), "logit_bias"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"top_k": -1}), "top_k"),
    ] {
        let mut body = chat_body("hello", false);
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let reply = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
        assert_eq!(
            reply.status,
            400,
            "{extra}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = &reply.json()["error"];
        assert_eq!(error["param"], param, "{extra}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(param),
            "{extra}: {error}"
        );
    }
    // In range, they are taken.
    let mut body = chat_body("hello", false);
    body["frequency_penalty"] = json!(0.5);
    body["logit_bias"] = json!({"12": -5});
    body["top_k"] = json!(10);
    let reply = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
}

#[test]
fn responses_answer_continue_and_refuse_in_words() {
    let dir = TempDir::new("serve-responses");
    let server = pinky_server(&dir, &[]);
    let create = |body: Value| post(server.addr, "/v1/responses", &body, &[AUTH]);
    let first = create(json!({"model": "pinky", "input": "hello"}));
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let first = first.json();
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "completed");
    assert_eq!(first["output"][0]["type"], "message");
    assert_eq!(
        first["output"][0]["content"][0]["text"],
        "Narf! You said: hello"
    );
    let id = first["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"), "{id}");

    // The next turn sees the first one's conversation.
    let second =
        create(json!({"model": "pinky", "input": "again", "previous_response_id": id})).json();
    assert!(
        second["usage"]["input_tokens"].as_u64() > first["usage"]["input_tokens"].as_u64(),
        "{second}"
    );
    let path = format!("/v1/responses/{}", second["id"].as_str().unwrap());
    let kept = request(server.addr, "GET", &path, &[AUTH], None).unwrap();
    assert_eq!(kept.status, 200);
    assert_eq!(kept.json()["output"], second["output"]);
    assert_eq!(
        request(server.addr, "DELETE", &path, &[AUTH], None)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        request(server.addr, "GET", &path, &[AUTH], None)
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        request(server.addr, "GET", &path, &[], None)
            .unwrap()
            .status,
        401
    );

    // Streamed: typed events, in order, ending in response.completed.
    let streamed = create(json!({"model": "pinky", "input": "hi", "stream": true}));
    let events: Vec<String> = String::from_utf8_lossy(&streamed.body)
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        events.first().map(String::as_str),
        Some("response.created"),
        "{events:?}"
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("response.completed"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .filter(|e| *e == "response.output_text.delta")
            .count()
            > 2,
        "{events:?}"
    );

    for (body, status, param) in [
        (
            json!({"model": "pinky", "input": "x", "previous_response_id": "resp_none"}),
            404,
            "previous_response_id",
        ),
        (
            json!({"model": "pinky", "input": "x", "tools": [{"type": "web_search"}]}),
            400,
            "tools[0].type",
        ),
        (
            json!({"model": "pinky", "input": [{"type": "image_generation_call"}]}),
            400,
            "input[0].type",
        ),
        (
            json!({"model": "pinky", "input": [{"role": "robot", "content": "x"}]}),
            400,
            "input[0].role",
        ),
        (
            json!({"model": "pinky", "input": "x", "background": true}),
            400,
            "background",
        ),
        (
            json!({"model": "pinky", "input": "x", "text": {"format": {"type": "yaml"}}}),
            400,
            "text.format",
        ),
        (json!({"model": "pinky"}), 400, "input"),
    ] {
        let reply = create(body.clone());
        assert_eq!(
            reply.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.json()["error"]["param"], param, "{body}");
    }
}

#[test]
fn with_an_api_key_every_endpoint_but_health_needs_it() {
    let dir = TempDir::new("serve-auth-everywhere");
    let server = pinky_server(&dir, &[]);
    let body = br#"{"model": "pinky", "input": "x"}"#;
    for (method, path) in [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/pinky"),
        ("GET", "/models"),
        ("POST", "/models/load"),
        ("POST", "/models/unload"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/resp_x"),
        ("DELETE", "/v1/responses/resp_x"),
        ("GET", "/v1/no-such-endpoint"),
    ] {
        let sent = (method == "POST").then_some(&body[..]);
        let reply = request(server.addr, method, path, &[], sent).unwrap();
        assert_eq!(reply.status, 401, "{method} {path}");
        assert_eq!(
            reply.json()["error"]["code"],
            "invalid_api_key",
            "{method} {path}"
        );
    }
    let health = request(server.addr, "GET", "/health", &[], None).unwrap();
    assert_eq!(health.status, 200);
}

#[test]
fn parallel_tool_calls_false_keeps_the_first_call_and_unhonourable_fields_are_refused() {
    let dir = TempDir::new("serve-one-call");
    let server = pinky_server(&dir, &[]);
    // Pinky repeats what it is told: two calls in Hermes markup.
    let two = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
    let weather = json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}]);
    let calls = |extra: Value| {
        let mut body = chat_body(two, false);
        body["tools"] = weather.clone();
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let reply = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()["choices"][0]["message"]["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(calls(json!({})).len(), 2);
    let one = calls(json!({"parallel_tool_calls": false}));
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0]["function"]["arguments"], "{\"city\":\"Paris\"}");

    for (extra, param) in [
        (
            json!({"audio": {"voice": "alloy", "format": "mp3"}}),
            "audio",
        ),
        (json!({"modalities": ["text", "audio"]}), "modalities"),
        (
            json!({"prediction": {"type": "content", "content": 5}}),
            "prediction",
        ),
        (json!({"web_search_options": {}}), "web_search_options"),
    ] {
        let mut body = chat_body("hello", false);
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let reply = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
        assert_eq!(reply.status, 400, "{extra}");
        assert_eq!(reply.json()["error"]["param"], param, "{extra}");
    }
    let mut text_only = chat_body("hello", false);
    text_only["modalities"] = json!(["text"]);
    assert_eq!(
        post(server.addr, "/v1/chat/completions", &text_only, &[AUTH]).status,
        200
    );
}

#[test]
fn n_choices_come_whole_and_streamed_each_with_its_index() {
    let dir = TempDir::new("serve-n");
    let server = pinky_server(&dir, &["--parallel", "3"]);
    let said = "Narf! You said: three ways";
    let one = post(
        server.addr,
        "/v1/chat/completions",
        &chat_body("three ways", false),
        &[AUTH],
    )
    .json();
    let tokens = one["usage"]["completion_tokens"].as_u64().unwrap();

    let mut body = chat_body("three ways", false);
    body["n"] = json!(3);
    let whole = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
    assert_eq!(
        whole.status,
        200,
        "{}",
        String::from_utf8_lossy(&whole.body)
    );
    let whole = whole.json();
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{whole}");
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"]["content"], said);
        assert_eq!(choice["finish_reason"], "stop");
    }
    // The prompt counts once, the answers all.
    assert_eq!(
        whole["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    assert_eq!(whole["usage"]["completion_tokens"], 3 * tokens);

    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let streamed = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
    assert_eq!(streamed.status, 200);
    let chunks = streamed.chunks();
    let (usage, chunks) = chunks.split_last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3 * tokens);
    for i in 0..3 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| {
                c["choices"].as_array().unwrap().len() == 1 && c["choices"][0]["index"] == i
            })
            .collect();
        assert_eq!(
            mine[0]["choices"][0]["delta"]["role"], "assistant",
            "{chunks:?}"
        );
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, said, "choice {i}");
        let finishes: Vec<_> = mine
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null())
            .collect();
        assert_eq!(finishes.len(), 1, "choice {i}: {mine:?}");
        assert_eq!(finishes[0]["choices"][0]["finish_reason"], "stop");
    }
    assert_eq!(
        chunks.len(),
        chunks
            .iter()
            .filter(|c| c["choices"].as_array().unwrap().len() == 1)
            .count()
    );

    let completion = post(
        server.addr,
        "/v1/completions",
        &json!({"model": "pinky", "prompt": "one two three", "max_tokens": 2, "n": 2}),
        &[AUTH],
    )
    .json();
    let texts: Vec<_> = completion["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["index"].clone(), c["text"].clone()))
        .collect();
    assert_eq!(
        texts,
        [
            (json!(0), json!("Narf! You ")),
            (json!(1), json!("Narf! You "))
        ]
    );

    // More choices than run at once, or none, are refused by name.
    for n in [0, 4] {
        let mut body = chat_body("hi", false);
        body["n"] = json!(n);
        let refused = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
        assert_eq!(refused.status, 400, "n={n}");
        let error = &refused.json()["error"];
        assert_eq!(error["param"], "n");
        assert!(
            error["message"].as_str().unwrap().contains("from 1 to 3"),
            "{error}"
        );
    }
}

#[test]
fn reasoning_goes_to_reasoning_content_or_stays_in_content_when_asked() {
    let dir = TempDir::new("serve-reasoning");
    let server = pinky_server(&dir, &[]);
    // Pinky repeats the prompt, so its answer holds these tags.
    let said = "<think>plan it</think>done";
    let ask = |format: Option<&str>, stream: bool| {
        let mut body = chat_body(said, stream);
        if let Some(format) = format {
            body["reasoning_format"] = json!(format);
        }
        let reply = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        if stream {
            let text = reply.streamed_text(CONTENT);
            let reasoning = reply.streamed_text("/choices/0/delta/reasoning_content");
            (text, reasoning)
        } else {
            let message = reply.json()["choices"][0]["message"].clone();
            let reasoning = message["reasoning_content"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            (message["content"].as_str().unwrap().to_owned(), reasoning)
        }
    };
    for stream in [false, true] {
        for format in [None, Some("auto"), Some("deepseek")] {
            assert_eq!(
                ask(format, stream),
                ("Narf! You said: done".to_owned(), "plan it".to_owned()),
                "{format:?}, stream {stream}"
            );
        }
        assert_eq!(
            ask(Some("none"), stream),
            (
                "Narf! You said: <think>plan it</think>done".to_owned(),
                String::new()
            ),
            "none, stream {stream}"
        );
    }
    let mut body = chat_body(said, false);
    body["reasoning_format"] = json!("loud");
    let refused = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["error"]["param"], "reasoning_format");
}

/// The objects of an NDJSON body.
fn ndjson_lines(reply: &common::Reply) -> Vec<Value> {
    String::from_utf8_lossy(&reply.body)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}")))
        .collect()
}

#[test]
fn ollama_pull_serves_and_delete_removes_a_model_of_the_cache() {
    let dir = TempDir::new("serve-ollama-pull");
    let hub = rusty_genius::facecrab::testing::TestHub::start().unwrap();
    let source = common::pinky_model(dir.path());
    hub.add_file(
        "org/tiny-GGUF",
        "tiny-q4_k_m.gguf",
        std::path::Path::new(&source),
        None,
    )
    .unwrap();
    let home = dir.join("home").display().to_string();
    let server = Server::start(
        &["--engine", "pinky"],
        &[("GENIUS_HOME", &home), ("HF_ENDPOINT", &hub.endpoint())],
    );
    server.wait_healthy();
    let tags = || {
        let reply = request(server.addr, "GET", "/api/tags", &[], None).unwrap();
        reply.json()["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert!(tags().is_empty());

    let pulled = post(
        server.addr,
        "/api/pull",
        &json!({"model": "hf.co/org/tiny-GGUF"}),
        &[],
    );
    assert_eq!(pulled.status, 200);
    assert_eq!(pulled.header("content-type"), Some("application/x-ndjson"));
    let lines = ndjson_lines(&pulled);
    assert_eq!(lines[0]["status"], "pulling manifest", "{lines:?}");
    assert_eq!(lines.last().unwrap()["status"], "success", "{lines:?}");
    let progress: Vec<_> = lines.iter().filter(|l| l["completed"].is_u64()).collect();
    let last = progress.last().expect("progress lines");
    assert_eq!(last["completed"], last["total"], "{lines:?}");
    assert_eq!(tags(), ["org/tiny-GGUF/tiny-q4_k_m.gguf:latest"]);

    // Ollama's name for it, with its quantization, reaches it.
    let chat = post(
        server.addr,
        "/api/chat",
        &json!({"model": "hf.co/org/tiny-GGUF:Q4_K_M", "stream": false,
                "messages": [{"role": "user", "content": "pulled"}]}),
        &[],
    );
    assert_eq!(chat.status, 200, "{}", String::from_utf8_lossy(&chat.body));
    assert_eq!(chat.json()["message"]["content"], "Narf! You said: pulled");

    let delete = |model: &str| {
        let body = json!({"model": model}).to_string();
        request(
            server.addr,
            "DELETE",
            "/api/delete",
            &[],
            Some(body.as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(delete("hf.co/org/tiny-GGUF").status, 200);
    assert!(tags().is_empty());
    let again = delete("hf.co/org/tiny-GGUF");
    assert_eq!(again.status, 404);
    assert!(again.json()["error"]
        .as_str()
        .unwrap()
        .contains("not found"));

    let missing = post(
        server.addr,
        "/api/pull",
        &json!({"model": "hf.co/org/missing-GGUF", "stream": false}),
        &[],
    );
    assert_eq!(
        missing.status,
        404,
        "{}",
        String::from_utf8_lossy(&missing.body)
    );
    assert!(missing.json()["error"].is_string());
}

#[test]
fn bad_ollama_requests_get_ollama_errors_and_the_server_keeps_serving() {
    let dir = TempDir::new("serve-ollama-bad");
    let server = pinky_server(&dir, &[]);
    let auth = [AUTH];
    for (path, body, status, words) in [
        ("/api/chat", "{not json", 400, ""),
        ("/api/chat", r#"{"messages": []}"#, 400, "model"),
        (
            "/api/chat",
            r#"{"model": "pinky", "messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}}"#,
            400,
            "temperature",
        ),
        (
            "/api/chat",
            r#"{"model": "pinky", "messages": [{"role": "user", "content": "x"}], "format": 5}"#,
            400,
            "format",
        ),
        (
            "/api/chat",
            r#"{"model": "pinky", "messages": [{"role": "user", "content": "x"}], "keep_alive": "soon"}"#,
            400,
            "keep_alive",
        ),
        (
            "/api/chat",
            r#"{"model": "nope:7b", "messages": [{"role": "user", "content": "x"}]}"#,
            404,
            "not found",
        ),
        (
            "/api/generate",
            r#"{"model": "pinky", "prompt": "x", "images": ["aGk="]}"#,
            400,
            "images",
        ),
        (
            "/api/embed",
            r#"{"model": "pinky", "input": [""]}"#,
            400,
            "empty",
        ),
        ("/api/show", r#"{"model": "nope"}"#, 404, "not found"),
    ] {
        let reply = request(server.addr, "POST", path, &auth, Some(body.as_bytes())).unwrap();
        assert_eq!(
            reply.status,
            status,
            "{path} {body}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let error = reply.json()["error"].clone();
        let message = error
            .as_str()
            .unwrap_or_else(|| panic!("{path} {body}: {error}"));
        assert!(message.contains(words), "{path} {body}: {message}");
    }
    // Without the key, Ollama's shape too.
    let refused = request(server.addr, "GET", "/api/tags", &[], None).unwrap();
    assert_eq!(refused.status, 401);
    assert!(refused.json()["error"].is_string());
    let fine = post(
        server.addr,
        "/api/generate",
        &json!({"model": "pinky:latest", "prompt": "still here", "stream": false}),
        &auth,
    );
    assert_eq!(fine.json()["response"], "Narf! You said: still here");
}

#[test]
fn ollama_addr_serves_the_same_api_on_a_second_address() {
    let dir = TempDir::new("serve-ollama-addr");
    let server = pinky_server(&dir, &["--ollama-addr", "127.0.0.1:0"]);
    let second: std::net::SocketAddr = server
        .log()
        .iter()
        .find_map(|line| line.split("also listening for Ollama's clients at ").nth(1))
        .expect("the second address in the log")
        .trim()
        .parse()
        .unwrap();
    assert_ne!(second, server.addr);
    let version = request(second, "GET", "/api/version", &[AUTH], None).unwrap();
    assert_eq!(version.status, 200);
    assert!(version.json()["version"].is_string());
    let reply = post(
        second,
        "/api/chat",
        &json!({"model": "pinky", "stream": false,
                "messages": [{"role": "user", "content": "over there"}]}),
        &[AUTH],
    );
    assert_eq!(
        reply.json()["message"]["content"],
        "Narf! You said: over there"
    );
    // The same rules: the key is needed there too.
    let refused = request(second, "GET", "/api/tags", &[], None).unwrap();
    assert_eq!(refused.status, 401);
}

#[test]
fn ollama_chat_sends_thinking_apart_unless_think_is_false() {
    let dir = TempDir::new("serve-ollama-think");
    let server = pinky_server(&dir, &[]);
    let ask = |think: Option<bool>| {
        let mut body = json!({"model": "pinky", "stream": false,
            "messages": [{"role": "user", "content": "<think>plan it</think>done"}]});
        if let Some(think) = think {
            body["think"] = json!(think);
        }
        post(server.addr, "/api/chat", &body, &[AUTH]).json()["message"].clone()
    };
    for think in [None, Some(true)] {
        let message = ask(think);
        assert_eq!(message["content"], "Narf! You said: done", "{think:?}");
        assert_eq!(message["thinking"], "plan it", "{think:?}");
    }
    let hidden = ask(Some(false));
    assert_eq!(hidden["content"], "Narf! You said: done");
    assert!(hidden.get("thinking").is_none(), "{hidden}");
}

#[test]
fn a_silent_stream_carries_keep_alive_comments_from_the_moment_it_is_accepted() {
    let dir = TempDir::new("serve-keep-alive");
    // Each token takes 1.5 s: the first one comes after a silence longer
    // than the keep-alive interval.
    let server = pinky_server(&dir, &["--pinky-token-ms", "1500", "--sse-keep-alive", "1"]);
    let mut body = chat_body("slow", true);
    body["max_tokens"] = json!(2);
    let streamed = post(server.addr, "/v1/chat/completions", &body, &[AUTH]);
    assert_eq!(streamed.status, 200);
    let raw = String::from_utf8_lossy(&streamed.body).into_owned();
    let first_alive = raw.find(": keep-alive").expect("a keep-alive comment");
    let first_content = raw.find("\"content\":\"Narf").expect("the answer");
    assert!(first_alive < first_content, "{raw}");
    // The role chunk went out on acceptance, before the silence.
    assert!(
        raw.find("\"role\":\"assistant\"").unwrap() < first_alive,
        "{raw}"
    );
    assert_eq!(streamed.streamed_text(CONTENT), "Narf! You ");
}

#[test]
fn anthropic_messages_carry_thinking_blocks_and_stream_in_event_order() {
    let dir = TempDir::new("serve-anthropic");
    let server = pinky_server(&dir, &[]);
    let key = ("x-api-key", KEY);
    let body = json!({"model": "pinky", "max_tokens": 50,
        "messages": [{"role": "user", "content": "<think>plan it</think>done"}]});
    let whole = post(server.addr, "/v1/messages", &body, &[key]).json();
    assert_eq!(whole["type"], "message");
    // Pinky repeats the prompt after its own words: text, thinking, text.
    let kinds: Vec<&str> = whole["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|block| block["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["text", "thinking", "text"], "{whole}");
    assert_eq!(whole["content"][1]["thinking"], "plan it");
    assert_eq!(whole["content"][2]["text"], "done");
    assert_eq!(whole["stop_reason"], "end_turn");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let reply = post(server.addr, "/v1/messages", &streamed, &[key]);
    assert_eq!(reply.status, 200);
    let names: Vec<String> = String::from_utf8_lossy(&reply.body)
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .map(str::to_owned)
        .collect();
    let mut expected = vec![
        "message_start",
        "content_block_start",
        "content_block_delta",
    ];
    assert_eq!(&names[..3], expected.as_slice(), "{names:?}");
    expected = vec!["content_block_stop", "message_delta", "message_stop"];
    assert_eq!(&names[names.len() - 3..], expected.as_slice(), "{names:?}");
    let starts = names.iter().filter(|n| *n == "content_block_start").count();
    let stops = names.iter().filter(|n| *n == "content_block_stop").count();
    assert_eq!(
        (starts, stops),
        (3, 3),
        "text, thinking and text blocks: {names:?}"
    );

    // Its own error shape, and bad blocks refused by field.
    let missing = post(
        server.addr,
        "/v1/messages",
        &json!({"model": "pinky", "messages": []}),
        &[key],
    );
    assert_eq!(missing.status, 400);
    let error = missing.json();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{error}"
    );
    let image = post(
        server.addr,
        "/v1/messages",
        &json!({"model": "pinky", "max_tokens": 5, "messages": [{"role": "user",
            "content": [{"type": "image", "source": {}}]}]}),
        &[key],
    );
    assert_eq!(image.status, 400);
    let no_key = post(server.addr, "/v1/messages", &body, &[]);
    assert_eq!(no_key.status, 401);
    assert_eq!(no_key.json()["error"]["type"], "authentication_error");
}

//! `genius serve` on the real base model: 32 concurrent clients each get
//! the answer their prompt gets alone, and a client killed mid-stream
//! stops its generation at once while the others finish; and (on the
//! chat model) logit_bias and frequency_penalty steer the greedy answer,
//! and `n` choices are sampled each with its own seed.

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // the measured counts go to the test log

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::{post, request, send, Server};
use rusty_genius::facecrab::testing::{TempDir, GEMMA, QWEN};
use serde_json::{json, Value};

use rusty_genius::stem::testing::{MIN_MARGIN, SEQUENCE_PROMPTS};

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "gemma-3-270m-q4_k_m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

#[test]
fn thirty_two_clients_get_their_answers_and_a_killed_one_stops_at_once() {
    let Some(model) = GEMMA.for_test() else {
        return;
    };
    let home = TempDir::new("serve-gemma");
    let model_arg = model.display().to_string();
    let server = Server::start(
        &[
            "--model",
            &model_arg,
            "--parallel",
            "4",
            "--ctx-size",
            "1024",
        ],
        &[("GENIUS_HOME", &home.path().display().to_string())],
    );
    server.wait_healthy();
    let addr = server.addr;

    // Each candidate prompt alone, with every token's margin measured from
    // the server's logprobs: the comparison below is portable only for
    // answers without a near tie, and which candidates have none depends
    // on the CPU's kernels. The first four firm ones are used.
    let mut sequences: Vec<&str> = Vec::new();
    let mut expected = Vec::new();
    let mut seen = Vec::new();
    for prompt in SEQUENCE_PROMPTS {
        let mut body = completion(prompt, 14, false);
        body["logprobs"] = json!(2);
        let reply = post(addr, "/v1/completions", &body, &[]);
        let text = reply.completion_text(false);
        let tops = reply.json()["choices"][0]["logprobs"]["top_logprobs"].clone();
        let tops = tops.as_array().expect("top_logprobs");
        assert_eq!(tops.len(), 14);
        let mut smallest = f64::INFINITY;
        for top in tops {
            let mut values: Vec<f64> = top
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .collect();
            values.sort_by(|a, b| b.total_cmp(a));
            if values.len() > 1 {
                smallest = smallest.min(values[0] - values[1]);
            }
        }
        seen.push((prompt, smallest));
        if smallest >= f64::from(MIN_MARGIN) {
            sequences.push(prompt);
            expected.push(text);
            if sequences.len() == 4 {
                break;
            }
        }
    }
    eprintln!("smallest margins over 14 tokens, alone: {seen:?}");
    assert_eq!(
        sequences.len(),
        4,
        "fewer than four candidate prompts are firm here: {seen:?}"
    );

    // One client asks for a long answer and hangs up after 10 pieces,
    // while 32 others (half streamed) run.
    let killed = std::thread::spawn(move || {
        let body = completion("1, 2, 3, 4, 5, 6, 7,", 400, true).to_string();
        let stream = send(addr, "POST", "/v1/completions", &[], Some(body.as_bytes())).unwrap();
        let mut reader = BufReader::new(stream);
        let mut pieces = 0;
        let mut line = String::new();
        while pieces < 10 {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0);
            if line.starts_with("data: {") {
                pieces += 1;
            }
        }
    });
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let prompt = sequences[i % 4];
            std::thread::spawn(move || {
                let streamed = i % 2 == 0;
                let reply = post(
                    addr,
                    "/v1/completions",
                    &completion(prompt, 14, streamed),
                    &[],
                );
                (i % 4, reply.completion_text(streamed))
            })
        })
        .collect();
    killed.join().unwrap();
    for client in clients {
        let (which, text) = client.join().unwrap();
        assert_eq!(
            text, expected[which],
            "{:?} with 32 clients vs alone",
            sequences[which]
        );
    }
    let stopped = server
        .wait_for_log("the client went away", Duration::from_secs(30))
        .expect("the server logs the stopped generation");
    eprintln!("{stopped}");
    let after: usize = stopped
        .split("tokens (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(
        after <= 2,
        "the killed client's generation went on: {stopped}"
    );
}

/// The ids of the tokens a completion generated, and the ids of the
/// first token's two likeliest alternatives.
fn generated_ids(reply: &Value) -> (Vec<u64>, Vec<u64>) {
    let content = reply["choices"][0]["logprobs"]["content"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let ids = content.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    let first = content
        .first()
        .map(|t| {
            t["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|top| top["id"].as_u64().unwrap())
                .collect()
        })
        .unwrap_or_default();
    (ids, first)
}

#[test]
fn logit_bias_and_frequency_penalty_change_the_greedy_answer() {
    // A chat model: its answers carry token ids in their logprobs.
    let Some(model) = QWEN.for_test() else {
        return;
    };
    let home = TempDir::new("serve-qwen-bias");
    let model_arg = model.display().to_string();
    let server = Server::start(
        &["--model", &model_arg, "--ctx-size", "1024"],
        &[("GENIUS_HOME", &home.path().display().to_string())],
    );
    server.wait_healthy();
    let chat = |extra: Value, prompt: &str, tokens: u32| {
        let mut body = json!({
            "model": "qwen2.5-coder-0.5b-instruct-q4_k_m",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
            "logprobs": true,
            "top_logprobs": 2,
        });
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let reply = post(server.addr, "/v1/chat/completions", &body, &[]);
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()
    };
    let capital = "What is the capital of Japan?";
    let (plain, alternatives) = generated_ids(&chat(json!({}), capital, 4));
    let first = plain[0];
    let second = alternatives[1];
    assert_ne!(first, second);
    // A bias of -100 keeps the greedy choice from its first token; +100
    // makes the runner-up the choice. Both are far beyond any margin.
    let (banned, _) = generated_ids(&chat(
        json!({"logit_bias": {first.to_string(): -100}}),
        capital,
        4,
    ));
    assert_ne!(banned[0], first, "{banned:?}");
    let (forced, _) = generated_ids(&chat(
        json!({"logit_bias": {second.to_string(): 100}}),
        capital,
        4,
    ));
    assert_eq!(forced[0], second, "{forced:?}");

    // A frequency penalty of 2 logits per repeat breaks a loop the
    // unpenalised greedy answer stays in.
    let most_repeated = |ids: &[u64]| {
        let mut counts = std::collections::HashMap::new();
        for id in ids {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts.into_values().max().unwrap_or(0)
    };
    let echo = "Write the word \"cat\" twenty times, separated by spaces.";
    let (looping, _) = generated_ids(&chat(json!({}), echo, 24));
    let (penalised, _) = generated_ids(&chat(json!({"frequency_penalty": 2.0}), echo, 24));
    eprintln!(
        "most repeated token: {} times unpenalised, {} with frequency_penalty 2",
        most_repeated(&looping),
        most_repeated(&penalised)
    );
    assert!(
        most_repeated(&penalised) < most_repeated(&looping),
        "{looping:?} vs {penalised:?}"
    );

    // n choices: each sampled with its own seed (seed + i), so they
    // differ, and the same seeded request gives the same three again.
    let haiku = "Write a haiku about the sea.";
    let sampled = json!({"n": 3, "temperature": 1.0, "seed": 7});
    let texts = |reply: &Value| -> Vec<String> {
        let choices = reply["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3, "{reply}");
        choices
            .iter()
            .enumerate()
            .map(|(i, choice)| {
                assert_eq!(choice["index"], i);
                choice["message"]["content"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let first = texts(&chat(sampled.clone(), haiku, 24));
    let again = texts(&chat(sampled, haiku, 24));
    eprintln!("three choices: {first:?}");
    assert_eq!(first, again);
    assert!(first[0] != first[1] || first[1] != first[2], "{first:?}");
    assert!(first.iter().all(|text| !text.is_empty()), "{first:?}");
}

#[test]
fn a_draft_model_of_other_tokens_is_a_400_naming_both_and_the_server_keeps_serving() {
    let (Some(gemma), Some(qwen)) = (GEMMA.for_test(), QWEN.for_test()) else {
        return;
    };
    let home = TempDir::new("serve-draft");
    let (gemma, qwen) = (gemma.display().to_string(), qwen.display().to_string());
    // Qwen drafts for gemma only; gemma's tokens are not Qwen's.
    let draft = format!("gemma-3-270m-q4_k_m={qwen}");
    let server = Server::start(
        &[
            "--model",
            &gemma,
            "--model",
            &qwen,
            "--draft-model",
            &draft,
            "--ctx-size",
            "1024",
        ],
        &[("GENIUS_HOME", &home.path().display().to_string())],
    );
    // Loading at start, gemma fails, and health says so.
    let started = std::time::Instant::now();
    let health = loop {
        let health = request(server.addr, "GET", "/health", &[], None);
        match health {
            Ok(reply) if reply.json()["status"] != "loading" => break reply,
            _ if started.elapsed() > Duration::from_secs(120) => panic!("still loading"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(health.status, 503, "{}", health.json());
    assert!(
        health.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("gemma-3-270m")),
        "{}",
        health.json()
    );
    let chat = |model: &str| {
        post(
            server.addr,
            "/v1/chat/completions",
            &json!({
                "model": model,
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 4,
            }),
            &[],
        )
    };
    let refused = chat("gemma-3-270m-q4_k_m");
    assert_eq!(refused.status, 400, "{}", refused.json());
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("qwen2.5-coder-0.5b-instruct-q4_k_m")
            && message.contains("gemma-3-270m-q4_k_m")
            && !message.contains('/'),
        "{message}"
    );
    // The model it does not draft for answers as ever.
    let answered = chat("qwen2.5-coder-0.5b-instruct-q4_k_m");
    assert_eq!(answered.status, 200, "{}", answered.json());
}

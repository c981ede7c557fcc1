//! `genius serve` against hostile clients, on the Pinky stub engine: web
//! pages on other origins, slow and idle connections, and requests over
//! the limits. After each, an ordinary request is answered.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{post, raw, request, Server};
use rusty_genius::facecrab::testing::TempDir;
use serde_json::{json, Value};

fn pinky(dir: &TempDir, extra: &[&str]) -> Server {
    common::pinky_server(dir.path(), extra)
}

fn chat(text: &str) -> Value {
    json!({"model": "pinky", "messages": [{"role": "user", "content": text}]})
}

/// An ordinary request is answered as ever.
fn still_serves(addr: SocketAddr) {
    let reply = post(addr, "/v1/chat/completions", &chat("still there?"), &[]);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        "Narf! You said: still there?"
    );
}

/// A POST of `body` with exactly these header lines.
fn post_with(addr: SocketAddr, headers: &[&str], body: &str) -> common::Reply {
    let mut head = String::from("POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    raw(addr, head.as_bytes()).expect("an answer")
}

fn error_code(reply: &common::Reply) -> String {
    reply.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_keyless_server_answers_only_its_own_hosts_and_json_bodies() {
    let dir = TempDir::new("hostile-origin");
    let server = pinky(&dir, &["--allowed-host", "genius.lan"]);
    let addr = server.addr;
    let port = addr.port();
    let body = chat("hi").to_string();
    let json_type = "Content-Type: application/json";

    // DNS rebinding: a page on evil.example whose name now points here.
    for host in [
        "evil.example",
        "evil.example:8080",
        "localhost.evil.example",
    ] {
        let reply = post_with(addr, &[&format!("Host: {host}"), json_type], &body);
        assert_eq!(reply.status, 403, "Host {host}");
        assert_eq!(error_code(&reply), "host_not_allowed");
        let message = reply.json()["error"]["message"].to_string();
        assert!(message.contains("--allowed-host"), "{message}");
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "genius.lan".to_owned(),
        format!("GENIUS.lan:{port}"),
    ] {
        let reply = post_with(addr, &[&format!("Host: {host}"), json_type], &body);
        assert_eq!(reply.status, 200, "Host {host}");
    }

    // A page's "simple" cross-origin POST cannot say application/json.
    let host = format!("Host: 127.0.0.1:{port}");
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let header = content_type.map(|t| format!("Content-Type: {t}"));
        let mut headers = vec![host.as_str()];
        headers.extend(header.as_deref());
        let reply = post_with(addr, &headers, &body);
        assert_eq!(reply.status, 415, "{content_type:?}");
        assert_eq!(error_code(&reply), "unsupported_media_type");
    }
    let with_charset = post_with(
        addr,
        &[&host, "Content-Type: application/json; charset=utf-8"],
        &body,
    );
    assert_eq!(with_charset.status, 200);
    still_serves(addr);

    // With a key, a page cannot authenticate: neither check applies.
    let keyed_dir = TempDir::new("hostile-origin-key");
    let keyed = pinky(&keyed_dir, &["--api-key", "sk-k"]);
    let reply = post_with(
        keyed.addr,
        &[
            "Host: evil.example",
            "Content-Type: text/plain",
            "Authorization: Bearer sk-k",
        ],
        &body,
    );
    assert_eq!(reply.status, 200);
    let reply = post_with(keyed.addr, &["Host: evil.example", json_type], &body);
    assert_eq!(reply.status, 401);
}

/// Reads from `stream` until the server closes it; how long that took.
fn time_to_close(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                return started.elapsed()
            }
            Err(err) => panic!("the server kept the connection open: {err}"),
        }
    }
}

#[test]
fn slow_and_idle_connections_are_closed_and_the_server_keeps_serving() {
    let dir = TempDir::new("hostile-slow");
    let server = pinky(
        &dir,
        &[
            "--header-timeout",
            "1",
            "--body-timeout",
            "1",
            "--idle-timeout",
            "2",
        ],
    );
    let addr = server.addr;

    // Half the headers, then nothing.
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let took = time_to_close(&mut half);
    assert!(took < Duration::from_secs(10), "closed after {took:?}");

    // A byte every 300 ms never finishes a head in time either.
    let mut dribble = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if dribble.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    if !closed {
        time_to_close(&mut dribble);
    }
    assert!(started.elapsed() < Duration::from_secs(15));

    // A body announced but never sent: 408.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":",
        )
        .unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stalled.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");

    // Keep-alive: one request, then silence; and a connection that never
    // says anything. Both are closed after the idle timeout.
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut silent = TcpStream::connect(addr).unwrap();
    let took = time_to_close(&mut kept);
    assert!(took < Duration::from_secs(10), "kept open {took:?}");
    let took = time_to_close(&mut silent);
    assert!(took < Duration::from_secs(10), "kept open {took:?}");

    still_serves(addr);
    let log = server.log().join("\n");
    assert!(
        log.contains("the request head did not arrive in time"),
        "{log}"
    );
    assert!(log.contains("idle for too long"), "{log}");
}

#[test]
fn requests_over_a_limit_are_refused_by_name_before_any_work() {
    let dir = TempDir::new("hostile-limits");
    let server = pinky(&dir, &["--max-stop", "2"]);
    let addr = server.addr;
    let refused = |path: &str, body: Value, limit: &str| {
        let reply = post(addr, path, &body, &[]);
        let text = String::from_utf8_lossy(&reply.body);
        assert_eq!(
            reply.status,
            400,
            "{limit}: {}",
            &text[..text.len().min(300)]
        );
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(&format!("`{limit}`")), "{message}");
        still_serves(addr);
        message
    };

    // One request's 10 KB grammar nested 5,000 levels deep once took the
    // whole process down inside llama.cpp.
    for depth in [5_000, 20_000, 100_000] {
        let grammar = format!("root ::= {}\"a\"{}", "(".repeat(depth), ")".repeat(depth));
        let mut body = chat("nest");
        body["response_format"] = json!({"type": "grammar", "grammar": grammar});
        let message = refused("/v1/chat/completions", body, "grammar_depth");
        assert!(message.contains(&depth.to_string()), "{message}");
    }
    let alternatives: Vec<String> = (0..200_000).map(|i| format!("\"w{i}\"")).collect();
    let mut body = chat("pick");
    body["response_format"] =
        json!({"type": "grammar", "grammar": format!("root ::= {}", alternatives.join(" | "))});
    refused("/v1/chat/completions", body, "grammar_bytes");

    let words: Vec<String> = (0..50_000).map(|i| format!("value-{i:05}")).collect();
    let mut body = chat("pick");
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "e",
        "schema": {"type": "object", "properties": {"v": {"enum": words}}}}});
    let message = refused("/v1/chat/completions", body, "enum_values");
    assert!(message.contains("50000"), "{message}");

    let tools: Vec<Value> = (0..129)
        .map(|i| json!({"type": "function", "function": {"name": format!("f{i}"), "parameters": {"type": "object"}}}))
        .collect();
    let mut body = chat("call");
    body["tools"] = json!(tools);
    refused("/v1/chat/completions", body, "tools");

    let mut body = chat("stop");
    body["stop"] = json!(["a", "b", "c"]);
    refused("/v1/chat/completions", body, "stop_sequences");

    let inputs: Vec<String> = (0..2049).map(|i| format!("text {i}")).collect();
    refused(
        "/v1/embeddings",
        json!({"model": "pinky", "input": inputs}),
        "embed_inputs",
    );
    // Pinky's tokens are bytes: 76 texts of 4,000 are 304,000 of them.
    let long = "x".repeat(4000);
    let inputs: Vec<&str> = std::iter::repeat_n(long.as_str(), 76).collect();
    refused(
        "/v1/embeddings",
        json!({"model": "pinky", "input": inputs, "truncate": true}),
        "embed_tokens",
    );
    let models = request(addr, "GET", "/v1/models", &[], None).unwrap();
    assert_eq!(models.status, 200);
}

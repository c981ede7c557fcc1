//! Running `genius serve` for a team, on the Pinky stub engine: request
//! ids on every response and log line, a bounded queue that refuses the
//! excess in each API's shape, and `/metrics` as Prometheus itself scrapes
//! and checks it.

#![allow(clippy::print_stderr)] // skips and measured figures go to the test log

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{post, request, Reply, Server};
use rusty_genius::facecrab::testing::TempDir;
use serde_json::{json, Value};

const KEY: &str = "sk-ops-key";
const AUTH: (&str, &str) = ("Authorization", "Bearer sk-ops-key");

fn pinky_server(dir: &TempDir, extra: &[&str]) -> Server {
    common::pinky_server(dir.path(), &[&["--api-key", KEY][..], extra].concat())
}

fn chat(text: &str) -> Value {
    json!({"model": "pinky", "messages": [{"role": "user", "content": text}]})
}

#[test]
fn every_response_carries_a_request_id_and_a_given_one_reaches_the_log() {
    let dir = TempDir::new("ops-ids");
    let server = pinky_server(&dir, &[]);

    let given = "client-7f3a:retry=2";
    let answered = post(
        server.addr,
        "/v1/chat/completions",
        &chat("hello"),
        &[AUTH, ("X-Request-Id", given)],
    );
    assert_eq!(answered.status, 200, "{}", answered.text());
    assert_eq!(answered.header("x-request-id"), Some(given));
    let line = server
        .wait_for_log(&format!("[{given}]"), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no log line with the id:\n{}", server.log().join("\n")));
    assert!(line.contains("POST /v1/chat/completions 200"), "{line}");

    // Made by the server where the client gave none, or one it cannot
    // keep (too long, or with characters a log line or header must not
    // carry); different for each request.
    let mut seen = Vec::new();
    let long = "x".repeat(200);
    let unfit: [&[(&str, &str)]; 3] = [
        &[AUTH],
        &[AUTH, ("X-Request-Id", long.as_str())],
        &[AUTH, ("X-Request-Id", "two words")],
    ];
    for headers in unfit {
        let reply = request(server.addr, "GET", "/v1/models", headers, None).unwrap();
        assert_eq!(reply.status, 200);
        let id = reply.header("x-request-id").expect("an id").to_owned();
        assert!(id.len() <= 128 && !id.contains(' ') && id != long, "{id}");
        seen.push(id);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "{seen:?}");

    // Errors of every kind and API carry it in the header and the body.
    let cases: Vec<(Reply, &str)> = vec![
        (
            request(
                server.addr,
                "GET",
                "/v1/models",
                &[("X-Request-Id", "no-key")],
                None,
            )
            .unwrap(),
            "/request_id",
        ),
        (
            post(
                server.addr,
                "/v1/chat/completions",
                &json!({"model": "pinky"}),
                &[AUTH, ("X-Request-Id", "no-key")],
            ),
            "/request_id",
        ),
        (
            post(
                server.addr,
                "/api/chat",
                &json!({"model": "nope", "messages": []}),
                &[AUTH, ("X-Request-Id", "no-key")],
            ),
            "/request_id",
        ),
        (
            post(
                server.addr,
                "/v1/messages",
                &json!({"model": "pinky"}),
                &[AUTH, ("X-Request-Id", "no-key")],
            ),
            "/request_id",
        ),
        (
            request(
                server.addr,
                "GET",
                "/no/such/path",
                &[AUTH, ("X-Request-Id", "no-key")],
                None,
            )
            .unwrap(),
            "/request_id",
        ),
    ];
    for (reply, pointer) in cases {
        assert!(reply.status >= 400, "{}", reply.text());
        assert_eq!(
            reply.header("x-request-id"),
            Some("no-key"),
            "{}",
            reply.text()
        );
        assert_eq!(
            reply.json().pointer(pointer),
            Some(&json!("no-key")),
            "{}",
            reply.text()
        );
    }
    // Each in its API's own shape.
    let ollama = post(
        server.addr,
        "/api/chat",
        &json!({"model": "nope", "messages": []}),
        &[AUTH],
    );
    assert!(ollama.json()["error"].is_string(), "{}", ollama.text());
    let anthropic = post(
        server.addr,
        "/v1/messages",
        &json!({"model": "pinky"}),
        &[AUTH],
    );
    assert_eq!(anthropic.json()["type"], "error", "{}", anthropic.text());
    assert_eq!(anthropic.json()["error"]["type"], "invalid_request_error");
}

/// One request of `dialect` to the server, its status, head and body.
fn ask(addr: SocketAddr, dialect: usize, n: usize) -> Reply {
    let text = format!("request {n} of the crowd");
    let (path, body) = match dialect {
        0 => ("/v1/chat/completions", chat(&text)),
        1 => (
            "/api/chat",
            json!({"model": "pinky", "stream": false, "messages": [{"role": "user", "content": text}]}),
        ),
        _ => (
            "/v1/messages",
            json!({"model": "pinky", "max_tokens": 64, "messages": [{"role": "user", "content": text}]}),
        ),
    };
    // A connection the server dropped is a status of 0, with the reason.
    request(
        addr,
        "POST",
        path,
        &[AUTH],
        Some(body.to_string().as_bytes()),
    )
    .unwrap_or_else(|err| Reply {
        status: 0,
        headers: Vec::new(),
        body: err.to_string().into_bytes(),
    })
}

#[test]
fn past_the_queue_bound_the_excess_gets_503s_in_each_api_shape_and_the_rest_complete() {
    let dir = TempDir::new("ops-queue");
    let server = pinky_server(
        &dir,
        &[
            "--parallel",
            "1",
            "--max-queue",
            "64",
            "--pinky-token-ms",
            "2",
        ],
    );
    let before = server.rss();
    let addr = server.addr;
    let threads: Vec<_> = (0..600)
        .map(|n| std::thread::spawn(move || (n % 3, ask(addr, n % 3, n))))
        .collect();
    let mut peak = before;
    let mut replies = Vec::new();
    for thread in threads {
        peak = peak.max(server.rss());
        replies.push(thread.join().expect("a reply"));
    }
    // The kernel holds at most net.core.somaxconn connections waiting to
    // be accepted (the server asks for 4096); on a machine set lower, a
    // crowd of 600 may see resets before the server hears of them.
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(4096);
    let mut reset = 0;
    let mut answered = [0; 3];
    let mut refused = [0; 3];
    for (dialect, reply) in &replies {
        let body = if matches!(reply.status, 200 | 503) {
            reply.json()
        } else {
            Value::Null
        };
        match reply.status {
            200 => {
                let text = match dialect {
                    0 => body["choices"][0]["message"]["content"].as_str(),
                    1 => body["message"]["content"].as_str(),
                    _ => body["content"][0]["text"].as_str(),
                };
                assert!(
                    text.is_some_and(|t| t.starts_with("Narf! You said: request")),
                    "{}",
                    reply.text()
                );
                answered[*dialect] += 1;
            }
            503 => {
                assert_eq!(reply.header("retry-after"), Some("1"), "{}", reply.text());
                let message = match dialect {
                    0 => {
                        assert_eq!(body["error"]["code"], "queue_full", "{}", reply.text());
                        body["error"]["message"].as_str()
                    }
                    1 => body["error"].as_str(),
                    _ => {
                        assert_eq!(body["type"], "error");
                        assert_eq!(
                            body["error"]["type"],
                            "overloaded_error",
                            "{}",
                            reply.text()
                        );
                        body["error"]["message"].as_str()
                    }
                };
                assert!(
                    message.is_some_and(|m| m.contains("--max-queue 64")),
                    "{}",
                    reply.text()
                );
                refused[*dialect] += 1;
            }
            0 if somaxconn < 600 => reset += 1,
            other => panic!(
                "status {other}: {}\n{}",
                reply.text(),
                server.log().join("\n")
            ),
        }
    }
    let (answered_all, refused_all): (usize, usize) = (answered.iter().sum(), refused.iter().sum());
    eprintln!(
        "600 at once, --max-queue 64, one place: {answered_all} answered {answered:?}, {refused_all} refused {refused:?}; RSS {} -> peak {} MiB",
        before >> 20,
        peak >> 20
    );
    if reset > 0 {
        eprintln!("{reset} connections reset by the kernel (net.core.somaxconn = {somaxconn})");
    }
    assert_eq!(answered_all + refused_all + reset, 600);
    assert!(refused.iter().all(|&n| n > 0), "{refused:?}");
    // The queue held at most 64 (and one ran) whenever a request came.
    assert!(answered_all >= 64, "{answered_all} answered");
    assert!(peak < before + (256 << 20), "RSS {before} -> {peak}");

    // The queue takes requests again once it has room.
    let after = ask(addr, 0, 601);
    assert_eq!(after.status, 200, "{}", after.text());
}

/// A free port on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tool` on the PATH, or `None` with a note (under CI, a failure).
fn tool(name: &str) -> Option<()> {
    let found = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if found {
        return Some(());
    }
    let why = format!("{name} is not installed (Debian: apt install prometheus)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}: CI must run the metrics tests");
    }
    eprintln!("skipped: {why}");
    None
}

/// The value Prometheus' query API gives for `query` (one series), once
/// it equals `want`, or the last one seen after a minute.
fn prometheus_value(prometheus: SocketAddr, query: &str, want: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let path = format!("/api/v1/query?query={}", encode(query));
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(reply) = request(prometheus, "GET", &path, &[], None) {
            if reply.status == 200 {
                let body = reply.json();
                last = body["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok());
                if last == Some(want) {
                    return last;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    last
}

/// `text` as a URL query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_metrics_and_its_figures_match_what_was_sent() {
    let dir = TempDir::new("ops-metrics");
    let server = pinky_server(&dir, &["--metrics"]);

    // Behind the key, as every endpoint.
    let no_key = request(server.addr, "GET", "/metrics", &[], None).unwrap();
    assert_eq!(no_key.status, 401);

    // Three chats that share a long first message: the second and third
    // find its tokens in the cache.
    let shared = "You are a careful assistant who answers in one short sentence. ".repeat(4);
    let mut prompt_tokens = 0;
    let mut cached_tokens = 0;
    let mut completion_tokens = 0;
    for question in ["What is red?", "What is blue?", "What is green?"] {
        let reply = post(
            server.addr,
            "/v1/chat/completions",
            &json!({"model": "pinky", "messages": [
                {"role": "system", "content": shared},
                {"role": "user", "content": question},
            ]}),
            &[AUTH],
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        let usage = &reply.json()["usage"];
        prompt_tokens += usage["prompt_tokens"].as_u64().unwrap();
        completion_tokens += usage["completion_tokens"].as_u64().unwrap();
        cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
    }
    assert!(cached_tokens > 0, "no prefix was reused");
    let bad = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"model": "pinky"}),
        &[AUTH],
    );
    assert_eq!(bad.status, 400);

    let scraped = request(server.addr, "GET", "/metrics", &[AUTH], None).unwrap();
    assert_eq!(scraped.status, 200, "{}", scraped.text());
    assert!(
        scraped
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        scraped.header("content-type")
    );
    let text = scraped.text();
    let line = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no `{series}` in\n{text}"))
    };
    assert_eq!(
        line(r#"genius_requests_total{model="pinky",outcome="completed"}"#),
        3.0
    );
    assert_eq!(
        line(r#"genius_prompt_tokens_total{model="pinky"}"#),
        prompt_tokens as f64
    );
    assert_eq!(
        line(r#"genius_prompt_cached_tokens_total{model="pinky"}"#),
        cached_tokens as f64
    );
    assert_eq!(
        line(r#"genius_generated_tokens_total{model="pinky"}"#),
        completion_tokens as f64
    );
    assert_eq!(
        line(
            r#"genius_http_requests_total{route="/v1/chat/completions",method="POST",status="400"}"#
        ),
        1.0
    );
    assert_eq!(
        line(r#"genius_time_to_first_token_seconds_count{model="pinky"}"#),
        3.0
    );
    assert_eq!(line(r#"genius_model_loads_total{model="pinky"}"#), 1.0);
    assert_eq!(line(r#"genius_model_resident{model="pinky"}"#), 1.0);

    if tool("promtool").is_none() {
        return;
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let checked = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );

    if tool("prometheus").is_none() {
        return;
    }
    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: genius\n    scrape_interval: 1s\n    authorization:\n      credentials: {KEY}\n    static_configs:\n      - targets: ['{}']\n",
            server.addr
        ),
    )
    .unwrap();
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prometheus = Stop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );
    let at: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Scraped while requests run: two more, the first streamed.
    let streamed = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"model": "pinky", "stream": true, "messages": [
            {"role": "system", "content": shared},
            {"role": "user", "content": "What is gold?"},
        ]}),
        &[AUTH],
    );
    assert_eq!(streamed.status, 200);
    let ollama = post(
        server.addr,
        "/api/chat",
        &json!({"model": "pinky", "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
        &[AUTH],
    );
    assert_eq!(ollama.status, 200, "{}", ollama.text());

    let up = prometheus_value(at, r#"up{job="genius"}"#, 1.0);
    assert_eq!(up, Some(1.0), "Prometheus cannot scrape the server");
    let completed = prometheus_value(
        at,
        r#"genius_requests_total{model="pinky",outcome="completed"}"#,
        5.0,
    );
    assert_eq!(completed, Some(5.0));
    let failed_http = prometheus_value(
        at,
        r#"genius_http_requests_total{route="/v1/chat/completions",status="400"}"#,
        1.0,
    );
    assert_eq!(failed_http, Some(1.0));
    let ollama_http = prometheus_value(
        at,
        r#"genius_http_requests_total{route="/api/chat",status="200"}"#,
        1.0,
    );
    assert_eq!(ollama_http, Some(1.0));
    let hit = prometheus_value(
        at,
        r#"genius_prompt_cached_tokens_total{model="pinky"} > bool 0"#,
        1.0,
    );
    assert_eq!(hit, Some(1.0), "no cache hits in Prometheus");
    let ttft = prometheus_value(
        at,
        r#"genius_time_to_first_token_seconds_count{model="pinky"}"#,
        5.0,
    );
    assert_eq!(ttft, Some(5.0));
}

#[test]
fn llama_cpp_helper_endpoints_answer_in_its_shapes() {
    let dir = TempDir::new("ops-helpers");
    let server = pinky_server(&dir, &[]);
    let addr = server.addr;

    // Pinky's tokens are bytes.
    let ids = post(addr, "/tokenize", &json!({"content": "hi"}), &[AUTH]);
    assert_eq!(ids.status, 200, "{}", ids.text());
    assert_eq!(ids.json(), json!({"tokens": [104, 105]}));
    let pieces = post(
        addr,
        "/tokenize",
        &json!({"content": ["h", 105], "with_pieces": true, "model": "pinky"}),
        &[AUTH],
    );
    assert_eq!(
        pieces.json(),
        json!({"tokens": [{"id": 104, "piece": "h"}, {"id": 105, "piece": "i"}]})
    );
    // A piece that is not UTF-8 alone comes as its bytes.
    let bytes = post(
        addr,
        "/tokenize",
        &json!({"content": [195], "with_pieces": true}),
        &[AUTH],
    );
    assert_eq!(
        bytes.json(),
        json!({"tokens": [{"id": 195, "piece": [195]}]})
    );
    let none = post(addr, "/tokenize", &json!({}), &[AUTH]);
    assert_eq!(none.json(), json!({"tokens": []}));

    let text = post(addr, "/detokenize", &json!({"tokens": [104, 105]}), &[AUTH]);
    assert_eq!(text.json(), json!({"content": "hi"}));
    let unknown = post(
        addr,
        "/detokenize",
        &json!({"tokens": [104, 9999]}),
        &[AUTH],
    );
    assert_eq!(unknown.status, 400, "{}", unknown.text());
    let error = &unknown.json()["error"];
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("token 9999")),
        "{error}"
    );
    assert_eq!(error["param"], "tokens");
    let negative = post(addr, "/detokenize", &json!({"tokens": [-1]}), &[AUTH]);
    assert_eq!(negative.status, 400, "{}", negative.text());
    assert!(negative.json()["error"]["param"]
        .as_str()
        .is_some_and(|p| p.starts_with("tokens")));

    let prompt = post(
        addr,
        "/apply-template",
        &json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ]}),
        &[AUTH],
    );
    assert_eq!(prompt.status, 200, "{}", prompt.text());
    assert_eq!(
        prompt.json(),
        json!({"prompt": "system: Be brief.\nuser: hi\n"})
    );
    let bad = post(addr, "/apply-template", &json!({"messages": []}), &[AUTH]);
    assert_eq!(bad.status, 400, "{}", bad.text());

    let wrong_model = post(
        addr,
        "/tokenize",
        &json!({"content": "x", "model": "nope"}),
        &[AUTH],
    );
    assert_eq!(wrong_model.status, 404, "{}", wrong_model.text());

    let props = request(addr, "GET", "/props", &[AUTH], None).unwrap();
    assert_eq!(props.status, 200, "{}", props.text());
    let props = props.json();
    assert!(
        props["total_slots"].as_u64().is_some_and(|n| n >= 1),
        "{props}"
    );
    assert!(props["default_generation_settings"]["n_ctx"]
        .as_u64()
        .is_some_and(|n| n > 0));
    assert_eq!(props["model_alias"], "pinky");
    assert_eq!(props["modalities"]["vision"], false);
    // Read-only.
    let write = post(addr, "/props", &json!({}), &[AUTH]);
    assert_eq!(write.status, 405, "{}", write.text());
}

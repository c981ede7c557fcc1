//! `genius serve` with several models, on Pinky: each request goes to the
//! model it names (or its alias, or the default model), `/v1/models` says
//! what is loaded, `/models/load` and `/models/unload` control it, nothing
//! waits on another model's load, and `genius ps` shows it all.

mod common;

use std::time::{Duration, Instant};

use common::{post, request, Server};
use facecrab::testing::TempDir;
use serde_json::{json, Value};

/// A file Pinky loads, of `bytes` (sparse), named `<name>.gguf`.
fn model(dir: &TempDir, name: &str, bytes: u64) -> String {
    let path = dir.join(format!("{name}.gguf"));
    let file = std::fs::File::create(&path).unwrap();
    use std::io::Write;
    (&file).write_all(b"GGUF\x03\0\0\0").unwrap();
    file.set_len(bytes.max(32)).unwrap();
    path.display().to_string()
}

fn start(dir: &TempDir, args: &[&str]) -> Server {
    let mut all = vec!["--engine", "pinky"];
    all.extend_from_slice(args);
    Server::start(
        &all,
        &[("GENIUS_HOME", &dir.join("home").display().to_string())],
    )
}

fn chat(server: &Server, model: &str) -> (u16, Value) {
    let reply = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        &[],
    );
    (reply.status, reply.json())
}

/// `id → status.value` of every model `/v1/models` lists.
fn states(server: &Server) -> Vec<(String, String)> {
    let listed = request(server.addr, "GET", "/v1/models", &[], None)
        .unwrap()
        .json();
    listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["status"]["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn requests_go_to_the_model_they_name_its_alias_or_the_default() {
    let dir = TempDir::new("serve-models");
    let a = model(&dir, "alpha", 64);
    let b = model(&dir, "beta", 64);
    let server = start(
        &dir,
        &[
            "--model",
            &a,
            "--model",
            &b,
            "--alias",
            "gpt-4o-mini=alpha",
            "--alias",
            "text-embedding-3-small=beta",
        ],
    );
    server.wait_healthy();
    assert_eq!(
        states(&server),
        [
            ("alpha".to_owned(), "loaded".to_owned()),
            ("beta".to_owned(), "loaded".to_owned())
        ]
    );
    let (status, body) = chat(&server, "beta");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "beta");
    let (status, body) = chat(&server, "gpt-4o-mini");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "alpha");
    let embedded = post(
        server.addr,
        "/v1/embeddings",
        &json!({"model": "text-embedding-3-small", "input": "hello"}),
        &[],
    );
    assert_eq!(embedded.status, 200);
    assert_eq!(embedded.json()["model"], "beta");
    // Without --default-model, an unknown name is a 404 naming the served.
    let (status, body) = chat(&server, "gpt-5");
    assert_eq!(status, 404, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("alpha") && message.contains("beta"),
        "{message}"
    );
    // A loaded model says what it holds.
    let listed = request(server.addr, "GET", "/v1/models/alpha", &[], None)
        .unwrap()
        .json();
    assert_eq!(listed["resident"]["parallel"], 4, "{listed}");
    assert_eq!(listed["resident"]["running"], 0, "{listed}");
    assert!(listed["resident"]["memory_bytes"].as_u64().unwrap() >= 64);

    let with_default = start(&dir, &["--model", &a, "--default-model", "alpha"]);
    with_default.wait_healthy();
    let (status, body) = chat(&with_default, "gpt-5");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "alpha");
}

#[test]
fn models_load_and_unload_on_request_and_nothing_waits_on_a_load() {
    let dir = TempDir::new("serve-models-control");
    let a = model(&dir, "alpha", 64);
    let server = start(&dir, &["--model", &a, "--pinky-load-ms", "1500"]);
    server.wait_healthy();
    let unloaded = post(
        server.addr,
        "/models/unload",
        &json!({"model": "alpha"}),
        &[],
    );
    assert_eq!(unloaded.status, 200);
    assert_eq!(unloaded.json()["was_loaded"], true);
    assert_eq!(
        states(&server),
        [("alpha".to_owned(), "unloaded".to_owned())]
    );

    // A load in the background (1.5 s); /health and /v1/models answer
    // meanwhile, and say it is loading.
    let addr = server.addr;
    let loading =
        std::thread::spawn(move || post(addr, "/models/load", &json!({"model": "alpha"}), &[]));
    let loading_state = [("alpha".to_owned(), "loading".to_owned())];
    while states(&server) != loading_state {
        assert!(
            !loading.is_finished(),
            "never seen loading: {:?}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let health = request(server.addr, "GET", "/health", &[], None).unwrap();
    assert_eq!(health.status, 200);
    // Answered before the load ended.
    assert_eq!(states(&server), loading_state, "{:?}", server.log());
    let loaded = loading.join().unwrap();
    assert_eq!(loaded.status, 200, "{}", loaded.json());
    assert_eq!(loaded.json()["parallel"], 4);
    assert_eq!(states(&server), [("alpha".to_owned(), "loaded".to_owned())]);
    let unknown = post(server.addr, "/models/load", &json!({"model": "nope"}), &[]);
    assert_eq!(unknown.status, 404);

    // `genius ps` shows it.
    let ps = std::process::Command::new(env!("CARGO_BIN_EXE_genius"))
        .args(["ps", "--url", &format!("http://{}", server.addr)])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ps.stdout);
    assert!(ps.status.success(), "{out}");
    assert!(out.contains("alpha") && out.contains("loaded"), "{out}");
}

#[test]
fn a_model_over_the_memory_budget_is_a_400_naming_it_and_the_others_serve() {
    let dir = TempDir::new("serve-models-budget");
    let small = model(&dir, "small", 20_000_000);
    let huge = model(&dir, "huge", 90_000_000);
    let server = start(
        &dir,
        &[
            "--model",
            &small,
            "--model",
            &huge,
            "--memory-budget",
            "50MB",
        ],
    );
    // The huge one fails at start: /health says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = loop {
        let health = request(server.addr, "GET", "/health", &[], None).unwrap();
        if health.status != 503 || health.json()["status"] != "loading" {
            break health;
        }
        assert!(Instant::now() < deadline, "still loading");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(health.status, 503);
    let (status, body) = chat(&server, "huge");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "model_too_large");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("huge") && message.contains("90 MB") && message.contains("small"),
        "{message}"
    );
    assert!(!message.contains('/'), "no paths: {message}");
    let (status, body) = chat(&server, "small");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn with_two_places_the_least_recently_used_idle_model_makes_room() {
    let dir = TempDir::new("serve-models-lru");
    let names = ["one", "two", "three"];
    let paths: Vec<String> = names.iter().map(|n| model(&dir, n, 64)).collect();
    let mut args = vec!["--max-models", "2"];
    for path in &paths {
        args.extend(["--model", path.as_str()]);
    }
    let server = start(&dir, &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(server.addr, "GET", "/health", &[], None)
        .unwrap()
        .json()["status"]
        == "loading"
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    for round in 0..2 {
        for name in names {
            let (status, body) = chat(&server, name);
            assert_eq!(status, 200, "round {round}: {body}");
            let loaded: Vec<String> = states(&server)
                .into_iter()
                .filter(|(_, state)| state == "loaded")
                .map(|(id, _)| id)
                .collect();
            assert_eq!(loaded.len(), 2, "{loaded:?}");
            assert!(loaded.contains(&name.to_owned()), "{loaded:?}");
        }
    }
    // `three` was used last, then `two`: `one` is out.
    let loaded: Vec<(String, String)> = states(&server);
    assert!(
        loaded.contains(&("one".to_owned(), "unloaded".to_owned())),
        "{loaded:?}\nserver log:\n{}",
        server.log().join("\n")
    );
    let evictions = server
        .log()
        .iter()
        .filter(|line| line.contains("to make room for"))
        .count();
    assert!(evictions >= 4, "{:?}", server.log());
}

/// `(running, queued)` of `model` as `/v1/models` gives them.
fn load_of(server: &Server, model: &str) -> (u64, u64) {
    let listed = request(server.addr, "GET", "/v1/models", &[], None)
        .unwrap()
        .json();
    let entry = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == model)
        .cloned()
        .unwrap_or_else(|| panic!("{model} is not listed: {listed}"));
    let resident = &entry["resident"];
    (
        resident["running"].as_u64().unwrap(),
        resident["queued"].as_u64().unwrap(),
    )
}

#[test]
fn running_counts_the_requests_being_answered_and_queued_those_waiting_for_a_place() {
    let dir = TempDir::new("serve-models-load");
    let path = model(&dir, "busy", 64);
    let server = start(
        &dir,
        &[
            "--model",
            &path,
            "--parallel",
            "2",
            "--pinky-token-ms",
            "60",
        ],
    );
    server.wait_healthy();
    assert_eq!(load_of(&server, "busy"), (0, 0));
    // Eight answers at once (a few tokens each, 60 ms a token), on two
    // places.
    let addr = server.addr;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/chat/completions",
                    &json!({"model": "busy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}),
                    &[],
                )
                .status
            })
        })
        .collect();
    let (mut most_running, mut most_queued, mut all_seen) = (0, 0, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while clients.iter().any(|c| !c.is_finished()) && Instant::now() < deadline {
        let (running, queued) = load_of(&server, "busy");
        assert!(
            running <= 2,
            "{running} running on 2 places ({queued} queued)"
        );
        assert!(
            running + queued <= 8,
            "{running} running, {queued} queued of 8"
        );
        most_running = most_running.max(running);
        most_queued = most_queued.max(queued);
        all_seen |= running + queued == 8;
        std::thread::sleep(Duration::from_millis(15));
    }
    for client in clients {
        assert_eq!(client.join().unwrap(), 200);
    }
    assert_eq!(most_running, 2);
    assert!(most_queued >= 4, "at most {most_queued} seen waiting");
    assert!(
        all_seen,
        "the eight requests were never all counted at once"
    );
    assert_eq!(load_of(&server, "busy"), (0, 0));
}

//! Scale-out as the README describes it: two `genius serve` processes
//! share one model cache behind nginx. The model is fetched once (the
//! second process asks the Hub nothing), both answer, and when one is
//! killed nginx's retries keep every new request answered.
//!
//! The Hub is facecrab's loopback test Hub; nginx is Debian's package
//! (`apt install nginx`). Without nginx or the test model the test is
//! skipped with a note, except under CI, where it fails.

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // notes and counts go to the test log

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{post, Server};
use rusty_genius::facecrab::testing::{TempDir, TestHub, GEMMA};
use serde_json::json;

fn nginx() -> Option<PathBuf> {
    let found = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file());
    if found.is_none() {
        let why = "nginx is not installed (apt install nginx)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}: CI must run the scale-out test");
        }
        eprintln!("skipped: {why}");
    }
    found
}

/// nginx in the foreground with its files under `dir`, balancing over
/// `backends`; stopped when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    fn start(binary: &Path, dir: &Path, backends: &[SocketAddr]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let servers: String = backends
            .iter()
            .map(|addr| format!("        server {addr} max_fails=1 fail_timeout=10s;\n"))
            .collect();
        let conf = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/nginx.conf"
        ))
        .expect("the README's nginx example")
        .replace("        server 10.0.0.11:8080 max_fails=1 fail_timeout=10s;\n        server 10.0.0.12:8080 max_fails=1 fail_timeout=10s;\n", &servers)
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
        assert!(
            conf.contains(&servers),
            "the example's upstream block changed"
        );
        let conf = format!(
            "pid {dir}/nginx.pid;\nerror_log {dir}/error.log;\ndaemon off;\n{conf}",
            dir = dir.display()
        )
        .replace(
            "http {",
            &format!(
                "http {{\n    access_log {dir}/access.log;\n    client_body_temp_path {dir}/body;\n    proxy_temp_path {dir}/proxy;\n    fastcgi_temp_path {dir}/fastcgi;\n    uwsgi_temp_path {dir}/uwsgi;\n    scgi_temp_path {dir}/scgi;",
                dir = dir.display()
            ),
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new(binary)
            .args(["-p", &dir.display().to_string(), "-c"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx starts");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn answer(addr: SocketAddr, stream: bool) -> String {
    let body = json!({
        "model": GEMMA.hub_name(),
        "prompt": "1, 2, 3, 4, 5, 6, 7,",
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
    });
    post(addr, "/v1/completions", &body, &[]).completion_text(stream)
}

fn served_requests(server: &Server) -> usize {
    server
        .log()
        .iter()
        .filter(|line| line.contains("POST /v1/completions 200"))
        .count()
}

/// What each server has logged as answered, once `total` answers are
/// logged in all: a log line reaches the test a moment after its answer.
fn served_counts(servers: &[&Server], total: usize) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts: Vec<usize> = servers.iter().map(|s| served_requests(s)).collect();
        if counts.iter().sum::<usize>() >= total || Instant::now() > deadline {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_servers_share_one_cache_behind_nginx_and_survive_one_dying() {
    let Some(model) = GEMMA.for_test() else {
        return;
    };
    let Some(nginx_binary) = nginx() else { return };
    let dir = TempDir::new("scale-out");
    let hub = TestHub::start().unwrap();
    hub.add_file(GEMMA.repo, GEMMA.file, &model, Some(GEMMA.sha256))
        .unwrap();
    let home = dir.join("shared-cache").display().to_string();
    let endpoint = hub.endpoint();
    let env = [
        ("GENIUS_HOME", home.as_str()),
        ("HF_ENDPOINT", endpoint.as_str()),
    ];
    let name = GEMMA.hub_name();
    let args = [
        "--model",
        name.as_str(),
        "--parallel",
        "2",
        "--ctx-size",
        "512",
    ];

    let mut first = Server::start(&args, &env);
    first.wait_healthy();
    let downloads = hub.downloads().len();
    assert_eq!(downloads, 1, "the first server downloads the model once");

    hub.clear_requests();
    let second = Server::start(&args, &env);
    second.wait_healthy();
    assert_eq!(
        hub.requests().len(),
        0,
        "the second server found the model in the shared cache"
    );

    let balancer_dir = dir.join("nginx");
    std::fs::create_dir_all(&balancer_dir).unwrap();
    let nginx = Nginx::start(&nginx_binary, &balancer_dir, &[first.addr, second.addr]);

    let expected = answer(first.addr, false);
    let before = served_counts(&[&first, &second], 1);
    for i in 0..8 {
        assert_eq!(answer(nginx.addr, i % 2 == 0), expected);
    }
    let after = served_counts(&[&first, &second], 9);
    let by_first = after[0] - before[0];
    let by_second = after[1] - before[1];
    eprintln!("through nginx: {by_first} answered by the first server, {by_second} by the second");
    assert!(by_first > 0 && by_second > 0, "both servers serve");

    first.kill();
    let before = served_requests(&second);
    for i in 0..8 {
        assert_eq!(
            answer(nginx.addr, i % 2 == 0),
            expected,
            "request {i} after the kill"
        );
    }
    assert_eq!(served_counts(&[&second], before + 8)[0] - before, 8);
    let mut error_log = String::new();
    if let Ok(mut file) = std::fs::File::open(balancer_dir.join("error.log")) {
        let _ = file.read_to_string(&mut error_log);
    }
    let retried = error_log.matches("connect() failed").count();
    eprintln!("after killing the first server: 8 of 8 answered; nginx logged {retried} failed connects it retried on the second");
}

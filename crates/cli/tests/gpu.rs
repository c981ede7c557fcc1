//! `genius` built with a GPU backend: it says where a model runs, offloads
//! as many layers as asked, names a missing device in its error, and falls
//! back to the CPU with a warning when the GPU's driver is gone, answering
//! the same.
//!
//! Compiled only with the `vulkan` or `cuda` feature; CI runs it on the
//! `vulkan` build with lavapipe (`GGML_VK_VISIBLE_DEVICES=0`).

#![cfg(any(feature = "vulkan", feature = "cuda"))]

mod common;

use std::process::{Command, Output};

use common::{request, Server};
use rusty_genius::facecrab::testing::GEMMA;

const JAPAN: &str =
    "Question: What is the capital of France?\nAnswer: Paris\nQuestion: What is the capital of Japan?\nAnswer:";

/// The backend llama.cpp names for this build's GPU.
const BACKEND: &str = if cfg!(feature = "cuda") {
    "CUDA"
} else {
    "Vulkan"
};

/// The variables that hide every device of this build's backend, as a
/// machine without the driver would be.
const NO_DRIVER: &[(&str, &str)] = if cfg!(feature = "cuda") {
    &[("CUDA_VISIBLE_DEVICES", "")]
} else {
    &[
        ("VK_ICD_FILENAMES", "/nonexistent/icd.json"),
        ("VK_DRIVER_FILES", "/nonexistent/icd.json"),
    ]
};

/// `genius run -v --raw --temperature 0 --max-tokens 4 <model> <JAPAN>
/// <extra>` with `env`.
fn run(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_genius"));
    command
        .args([
            "run",
            "-v",
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
        ])
        .args(["--ctx-size", "512", "--parallel", "1"])
        .arg(model)
        .arg(JAPAN)
        .args(extra)
        .env("GENIUS_KV_DIR", "off");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("genius runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The answer's first line: the capital, which is firm on every CPU.
fn capital(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout)
        .trim()
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn run_offloads_every_layer_says_so_and_falls_back_to_the_cpu_without_a_driver() {
    let Some(model) = GEMMA.for_test() else {
        return;
    };
    let model = model.display().to_string();

    let gpu = run(&model, &[], &[]);
    let log = text(&gpu.stderr);
    assert_eq!(capital(&gpu), "Tokyo", "{log}");
    // gemma-3-270m has 18 blocks and the output layer.
    let placed = format!("on {BACKEND}, 19/19 layers on {BACKEND}0");
    assert!(log.contains(&placed), "no {placed:?} in:\n{log}");

    let cpu = run(&model, &["--device", "cpu"], &[]);
    assert_eq!(capital(&cpu), "Tokyo");
    assert!(
        text(&cpu.stderr).contains(" on CPU ("),
        "{}",
        text(&cpu.stderr)
    );

    // No driver: a warning, the CPU, and the very answer `--device cpu`
    // gives (the same kernels, the same numbers).
    let fallback = run(&model, &[], NO_DRIVER);
    let log = text(&fallback.stderr);
    assert!(
        log.contains("finds no device for it") && log.contains(" on CPU ("),
        "{log}"
    );
    assert_eq!(text(&fallback.stdout), text(&cpu.stdout), "{log}");

    // Part of the layers.
    let part = run(&model, &["--gpu-layers", "7"], &[]);
    assert_eq!(capital(&part), "Tokyo");
    let log = text(&part.stderr);
    assert!(log.contains("7/19 layers"), "{log}");

    // A device that is not there is named in the error, with those that are.
    let missing = run(&model, &["--device", &format!("{BACKEND}9")], &[]);
    let log = text(&missing.stderr);
    assert!(!missing.status.success(), "{log}");
    assert!(
        log.contains(&format!("device `{BACKEND}9` is not available"))
            && log.contains(&format!("{BACKEND}0")),
        "{log}"
    );
    let missing = run(&model, &["--device", &format!("{BACKEND}0")], NO_DRIVER);
    let log = text(&missing.stderr);
    assert!(!missing.status.success(), "{log}");
    assert!(log.contains("finds no"), "{log}");

    let wrong = run(&model, &["--gpu-layers", "lots"], &[]);
    assert_eq!(wrong.status.code(), Some(2), "{}", text(&wrong.stderr));
    assert!(text(&wrong.stderr).contains("--gpu-layers"));
}

#[test]
fn the_models_endpoint_shows_the_device_and_the_layers_offloaded() {
    let Some(model) = GEMMA.for_test() else {
        return;
    };
    let model = model.display().to_string();
    let server = Server::start(&["--model", &model, "--ctx-size", "512"], &[]);
    server.wait_healthy();
    let listed = request(server.addr, "GET", "/v1/models", &[], None)
        .unwrap()
        .json();
    let resident = &listed["data"][0]["resident"];
    let placement = &resident["placement"];
    assert_eq!(placement["backend"], BACKEND, "{listed}");
    assert_eq!(placement["gpu_layers"], 19, "{listed}");
    assert_eq!(placement["layers"], 19, "{listed}");
    let device = placement["devices"][0].as_str().unwrap_or_default();
    assert!(device.starts_with(&format!("{BACKEND}0")), "{listed}");
    // Its weights and KV cache are counted on the device.
    let device_bytes = resident["device_bytes"].as_u64().unwrap_or_default();
    assert!(device_bytes > 100_000_000, "{listed}");
}

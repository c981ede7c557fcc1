//! A process that ends while its engine computes ends cleanly: `main`
//! returning mid-answer, an Orchestrator dropped mid-answer, and
//! `std::process::exit` all exit with the process's own status, never a
//! signal (llama.cpp's static objects were destroyed under the running
//! engine thread, SIGSEGV, before the exit gate).
//!
//! Each case runs as a child process: this same test binary, running the
//! ignored test `child` with `GENIUS_EXIT_CHILD` naming how it leaves. The
//! child starts a long prompt (three of llama.cpp's batches), so that it
//! leaves in the middle of a computation, with a short answer streaming
//! beside it.

#![cfg(feature = "llama")]
#![allow(clippy::print_stdout)] // the child shows what it got to its parent

use std::process::{Command, Stdio};

use futures::StreamExt;
use rusty_genius::core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent};
use rusty_genius::core::{InferenceConfig, PromptFormat};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::facecrab::testing::GEMMA;
use rusty_genius::Orchestrator;

/// How many times each way of leaving is tried.
const TRIES: usize = 6;

/// The children share two cores: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(tokens: usize) -> InferenceConfig {
    InferenceConfig::greedy()
        .with_max_tokens(tokens)
        .with_prompt_format(PromptFormat::Raw)
}

/// A prompt of about 1,500 tokens: three batches to compute.
fn long_prompt() -> String {
    (0..500).map(|n| format!("item {n}, ")).collect()
}

fn orchestrator() -> Orchestrator {
    let options = LlamaOptions {
        context_size: 2048,
        parallel: 2,
        ..LlamaOptions::default()
    };
    Orchestrator::builder()
        .engine(move || LlamaEngine::new(options.clone()))
        .build()
        .unwrap()
}

#[test]
#[ignore = "run by the tests below, as a child process"]
fn child() {
    let (Ok(how), Some(model)) = (std::env::var("GENIUS_EXIT_CHILD"), GEMMA.for_test()) else {
        return;
    };
    let model = model.display().to_string();
    async_std::task::block_on(async {
        if how == "channel" {
            // The seed's API, as the README's example uses it: the loop on
            // a task of its own, and `main` returning while it answers.
            let (mut input, rx) = futures::channel::mpsc::channel(8);
            let (tx, mut output) = futures::channel::mpsc::channel(64);
            let mut genius = orchestrator();
            async_std::task::spawn(async move { genius.run(rx, tx).await });
            futures::SinkExt::send(&mut input, BrainstemInput::LoadModel(model))
                .await
                .unwrap();
            for prompt in [long_prompt(), "1, 2, 3, 4,".to_owned()] {
                futures::SinkExt::send(
                    &mut input,
                    BrainstemInput::Infer {
                        prompt,
                        config: config(200),
                    },
                )
                .await
                .unwrap();
            }
            let mut pieces = 0;
            while let Some(message) = output.next().await {
                if let BrainstemOutput::Event(InferenceEvent::Content(text)) = message {
                    print!("{text}");
                    pieces += 1;
                    if pieces == 2 {
                        break;
                    }
                }
            }
            std::mem::forget(input);
            return;
        }
        let genius = orchestrator().start();
        genius.load(&model).await.unwrap();
        let long = genius.infer(long_prompt(), config(200));
        let mut short = genius.infer("1, 2, 3, 4,", config(200));
        let mut pieces = 0;
        while let Some(event) = short.next().await {
            if let Ok(InferenceEvent::Content(text)) = event {
                print!("{text}");
                pieces += 1;
                if pieces == 2 {
                    break;
                }
            }
        }
        match how.as_str() {
            // Nothing is dropped: the engine is still computing when the
            // process exits.
            "return" => {
                std::mem::forget((long, short));
                std::mem::forget(genius);
            }
            // The application lets go of everything, then ends at once.
            "drop" => drop((long, short, genius)),
            "exit" => std::process::exit(0),
            other => panic!("unknown way to leave: {other}"),
        }
    });
}

/// Runs the child `TRIES` times, leaving `how`: each run exits 0 after
/// printing the start of its answer.
fn leaves_cleanly(how: &str) {
    if GEMMA.for_test().is_none() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..TRIES {
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child", "--nocapture"])
            .env("GENIUS_EXIT_CHILD", how)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "leaving by {how}: {:?}\n{stderr}",
            output.status
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            !stdout.trim().is_empty(),
            "leaving by {how}: no answer\n{stderr}"
        );
    }
}

#[test]
fn main_returning_mid_answer_exits_cleanly() {
    leaves_cleanly("return");
}

#[test]
fn the_channel_api_exits_cleanly_mid_answer() {
    leaves_cleanly("channel");
}

#[test]
fn dropping_the_orchestrator_mid_answer_exits_cleanly() {
    leaves_cleanly("drop");
}

#[test]
fn process_exit_mid_answer_exits_cleanly() {
    leaves_cleanly("exit");
}

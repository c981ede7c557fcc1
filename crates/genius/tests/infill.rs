//! Fill-in-the-middle on the real models: Qwen2.5-Coder fills the middle of
//! real functions (`GENIUS_TEST_CHAT_MODEL`); gemma-3, which has no
//! fill-in-the-middle tokens, refuses with a clear error
//! (`GENIUS_TEST_MODEL`).

#![cfg(feature = "llama")]

use std::time::Duration;

use rusty_genius::core::{ErrorKind, InferenceConfig, Infill};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::facecrab::testing::{GEMMA, QWEN};
use rusty_genius::stem::testing::{Reply, TestClient};
use rusty_genius::{CortexStrategy, Orchestrator};

/// The real-model tests share two cores; one at a time.
static ONE_AT_A_TIME: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

async fn start(path: &std::path::Path) -> TestClient {
    let options = LlamaOptions {
        context_size: 4096,
        parallel: 2,
        ..LlamaOptions::default()
    };
    let orchestrator = Orchestrator::builder()
        .strategy(CortexStrategy::KeepAlive)
        .engine(move || LlamaEngine::new(options.clone()))
        .build()
        .unwrap();
    let mut client = TestClient::start(orchestrator).with_timeout(Duration::from_secs(300));
    let loaded = client.load(&path.display().to_string()).await.unwrap();
    assert!(loaded.errors.is_empty(), "{loaded:?}");
    client
}

fn greedy(max_tokens: usize) -> InferenceConfig {
    InferenceConfig::greedy().with_max_tokens(max_tokens)
}

/// The middles the model must find (each the one answer a reader would
/// write), with the code around them.
const MIDDLES: [(&str, &str, &str); 3] = [
    (
        "a missing return statement",
        "def maximum(a, b):\n    if a > b:\n        return a\n    ",
        "\n\n\nprint(maximum(1, 2))\n",
    ),
    (
        "a missing loop body",
        "def total(prices):\n    result = 0\n    for price in prices:\n        ",
        "\n    return result\n",
    ),
    (
        "a missing argument",
        "import math\n\n\ndef distance(x, y):\n    return math.sqrt(x * x + ",
        ")\n",
    ),
];

// Each with every token's margin over the next choice at least 1.19
// logits here (llama.cpp's kernels move margins by ~0.3 between CPUs).
const EXPECTED: [&str; 3] = ["return b", "result += price", "y * y"];

fn check(what: &str, reply: &Reply, expected: &str) {
    assert!(reply.errors.is_empty(), "{what}: {:?}", reply.errors);
    assert!(
        reply.text.contains(expected),
        "{what}: {:?} lacks {expected:?}",
        reply.text
    );
    assert!(
        !reply.text.contains("<|"),
        "{what}: markup in {:?}",
        reply.text
    );
}

#[async_std::test]
async fn qwen_coder_fills_the_middle_of_real_functions() {
    let Some(path) = QWEN.for_test() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    for ((what, prefix, suffix), expected) in MIDDLES.into_iter().zip(EXPECTED) {
        // Ended at the end of the block, as an editor asks.
        let config = InferenceConfig {
            min_indent: 4,
            ..greedy(32)
        };
        let reply = client
            .infill(Infill::new(prefix, suffix), config)
            .await
            .unwrap();
        check(what, &reply, expected);
        assert!(
            reply.usage().generated_tokens < 32,
            "{what}: {:?}",
            reply.text
        );
    }
    // With the project's files: a name only they define.
    let infill = Infill::new(
        "from shapes import area\n\n\ndef describe(w, h):\n    print(\"area\", ",
        ")\n",
    )
    .with_file("shapes.py", "def area(w, h):\n    return w * h\n");
    let reply = client.infill(infill, greedy(16)).await.unwrap();
    check("a call from another file", &reply, "area(w, h)");
}

#[async_std::test]
async fn a_completion_stops_at_the_end_of_its_block_and_in_time() {
    let Some(path) = QWEN.for_test() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    // A body to write whole: without a limit it goes on past the block.
    let prefix = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        ";
    let suffix = "\n";
    let free = client
        .infill(Infill::new(prefix, suffix), greedy(80))
        .await
        .unwrap();
    let blocked = client
        .infill(
            Infill::new(prefix, suffix),
            InferenceConfig {
                min_indent: 8,
                ..greedy(80)
            },
        )
        .await
        .unwrap();
    assert!(blocked.errors.is_empty(), "{:?}", blocked.errors);
    // Every line after the first stays inside the method.
    for line in blocked.text.lines().skip(1) {
        let indent = line.len() - line.trim_start().len();
        assert!(indent >= 8 || line.trim().is_empty(), "{:?}", blocked.text);
    }
    assert!(
        blocked.text.len() < free.text.len() || !free.text.contains("\n    def"),
        "free: {:?}\nblocked: {:?}",
        free.text,
        blocked.text
    );
    // A time limit ends the answer at its first line break past it.
    let quick = client
        .infill(
            Infill::new(prefix, suffix),
            InferenceConfig {
                time_limit: Some(Duration::from_millis(1)),
                ..greedy(80)
            },
        )
        .await
        .unwrap();
    assert!(quick.errors.is_empty(), "{:?}", quick.errors);
    assert!(!quick.text.trim_end().contains('\n'), "{:?}", quick.text);
    assert!(quick.text.len() < free.text.len(), "{:?}", quick.text);
}

#[async_std::test]
async fn a_model_without_fill_in_the_middle_tokens_says_so() {
    let Some(path) = GEMMA.for_test() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let reply = client
        .infill(Infill::new("def add(a, b):\n    ", "\n"), greedy(8))
        .await
        .unwrap();
    let error = reply.errors.first().expect("refused");
    assert_eq!(error.kind, ErrorKind::InvalidRequest, "{error}");
    assert!(error.contains("fill-in-the-middle"), "{error}");
}

//! Embeddings on the real models: all-MiniLM-L6-v2 checked against an
//! independent implementation (fixtures/embeddings), retrieval on a small
//! labelled set, bad input, batching and the lifecycle.

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // measured numbers go to the test log

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use rusty_genius::core::protocol::InferenceEvent;
use rusty_genius::core::{Embed, Embeddings, ErrorKind, InferenceConfig, Pooling};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::facecrab::testing::{GEMMA, MINILM};
use rusty_genius::{CortexStrategy, Orchestrator, OrchestratorHandle};
use serde_json::Value;

/// The real-model tests share two cores: one at a time.
static ONE_AT_A_TIME: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/embeddings")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn texts(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

async fn start(model: &std::path::Path, strategy: CortexStrategy) -> OrchestratorHandle {
    let genius = Orchestrator::builder()
        .strategy(strategy)
        .engine(|| LlamaEngine::new(LlamaOptions::default()))
        .build()
        .unwrap()
        .start();
    genius.load(&model.display().to_string()).await.unwrap();
    genius
}

#[async_std::test]
async fn twenty_sentences_match_an_independent_implementation() {
    let Some(model) = MINILM.for_test() else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(&model, CortexStrategy::KeepAlive).await;
    let reference = fixture("minilm-reference.json");
    let expected = reference["embeddings"].as_array().unwrap();
    let sentences: Vec<String> = expected
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    let ours = genius
        .embeddings(Embed::new(sentences.clone()))
        .await
        .unwrap();
    assert_eq!(ours.vectors.len(), 20);
    let mut lowest = f32::INFINITY;
    for ((vector, tokens), reference) in ours.vectors.iter().zip(&ours.tokens).zip(expected) {
        let theirs: Vec<f32> = reference["vector"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(vector.len(), 384);
        // Both tokenizers must agree before the vectors can.
        assert_eq!(
            *tokens as u64,
            reference["tokens"].as_u64().unwrap(),
            "{}",
            reference["text"]
        );
        let cosine = Embeddings::cosine(vector, &theirs);
        assert!(cosine >= 0.999, "{}: cosine {cosine}", reference["text"]);
        lowest = lowest.min(cosine);
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised by default: {norm}");
    }
    eprintln!("lowest cosine to the numpy implementation over 20 sentences: {lowest:.6}");

    // Unnormalised vectors point the same way.
    let raw = genius
        .embeddings(Embed::new([sentences[0].clone()]).without_normalizing())
        .await
        .unwrap();
    let norm: f32 = raw.vectors[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "left as the model made it: {norm}"
    );
    assert!(Embeddings::cosine(&raw.vectors[0], &ours.vectors[0]) > 0.99999);

    // One at a time gives what the batch gave.
    for (index, sentence) in sentences.iter().enumerate().step_by(5) {
        let alone = genius
            .embeddings(Embed::new([sentence.clone()]))
            .await
            .unwrap();
        let cosine = Embeddings::cosine(&alone.vectors[0], &ours.vectors[index]);
        assert!(cosine > 0.9999, "{sentence}: alone vs batched {cosine}");
    }
}

#[async_std::test]
async fn the_relevant_document_ranks_first_for_nine_of_ten_queries() {
    let Some(model) = MINILM.for_test() else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(&model, CortexStrategy::KeepAlive).await;
    let set = fixture("sentences.json")["retrieval"].clone();
    let documents = genius
        .embeddings(Embed::new(texts(&set["documents"])))
        .await
        .unwrap();
    let queries = set["queries"].as_array().unwrap();
    let mut first = 0;
    for query in queries {
        let asked = genius
            .embeddings(Embed::new([query["query"].as_str().unwrap()]))
            .await
            .unwrap();
        let scores: Vec<f32> = documents
            .vectors
            .iter()
            .map(|d| Embeddings::cosine(&asked.vectors[0], d))
            .collect();
        let best = (0..scores.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        if best as u64 == query["relevant"].as_u64().unwrap() {
            first += 1;
        } else {
            eprintln!("missed: {} (ranked {best} first)", query["query"]);
        }
    }
    eprintln!(
        "relevant document first for {first} of {} queries",
        queries.len()
    );
    assert!(first >= 9, "{first} of 10");
}

fn window_breaker() -> String {
    "word ".repeat(600)
}

#[async_std::test]
async fn bad_embed_requests_get_typed_errors_and_the_orchestrator_keeps_serving() {
    let Some(model) = MINILM.for_test() else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(&model, CortexStrategy::KeepAlive).await;
    let expect_invalid = |result: Result<Embeddings, rusty_genius::core::ErrorReport>,
                          what: &str| {
        let err = result.expect_err(what);
        assert_eq!(err.kind, ErrorKind::InvalidRequest, "{what}: {err}");
        err
    };
    expect_invalid(
        genius.embeddings(Embed::new(Vec::<String>::new())).await,
        "no inputs",
    );
    let err = expect_invalid(
        genius.embeddings(Embed::new(["fine", ""])).await,
        "an empty text",
    );
    assert!(err.contains("inputs[1]"), "{err}");
    let err = expect_invalid(
        genius
            .embeddings(Embed::new(["fine", &window_breaker()]))
            .await,
        "over the window",
    );
    assert!(err.contains("inputs[1]") && err.contains("512"), "{err}");
    // Truncation when asked: the text is cut to the window.
    let cut = genius
        .embeddings(Embed::new([window_breaker()]).truncating())
        .await
        .unwrap();
    assert_eq!(cut.tokens, [512]);
    // MiniLM was not trained for shorter vectors: only its whole width.
    let err = expect_invalid(
        genius
            .embeddings(Embed::new(["fine"]).with_dimensions(128))
            .await,
        "shorter vectors",
    );
    assert!(err.contains("not trained for shorter vectors"), "{err}");
    let whole = genius
        .embeddings(Embed::new(["fine"]).with_dimensions(384))
        .await
        .unwrap();
    assert_eq!(whole.vectors[0].len(), 384);
    // An embedding model does not generate.
    let mut answer = genius.infer("Hello", InferenceConfig::greedy());
    let mut refused = None;
    while let Some(event) = answer.next().await {
        match event {
            Ok(InferenceEvent::ProcessStart) => {}
            Ok(other) => panic!("an embedding model answered {other:?}"),
            Err(err) => refused = Some(err),
        }
    }
    let refused = refused.expect("an embedding model refuses Infer");
    assert_eq!(refused.kind, ErrorKind::InvalidRequest);
    assert!(refused.contains("embedding model"), "{refused}");
    // Still serving.
    let fine = genius.embeddings(Embed::new(["still here"])).await.unwrap();
    assert_eq!(fine.vectors.len(), 1);
}

#[async_std::test]
async fn a_generative_model_embeds_only_with_a_pooling_chosen() {
    let Some(model) = GEMMA.for_test() else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(&model, CortexStrategy::KeepAlive).await;
    let err = genius
        .embeddings(Embed::new(["The cat sleeps."]))
        .await
        .expect_err("no pooling chosen");
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
    assert!(err.contains("pooling"), "{err}");
    let inputs = ["The cat sleeps.", "A kitten naps.", "Stocks fell today."];
    for pooling in [Pooling::Mean, Pooling::Last] {
        let got = genius
            .embeddings(Embed::new(inputs).with_pooling(pooling))
            .await
            .unwrap();
        assert_eq!(got.vectors.len(), 3);
        assert_eq!(got.vectors[0].len(), 640, "gemma-3-270m's width");
    }
    // It still generates.
    let mut answer = genius.infer("1, 2, 3,", InferenceConfig::greedy().with_max_tokens(4));
    let mut text = String::new();
    while let Some(event) = answer.next().await {
        if let InferenceEvent::Content(piece) = event.unwrap() {
            text.push_str(&piece);
        }
    }
    assert!(!text.is_empty());
}

#[async_std::test]
async fn embeddings_survive_hibernation_and_reload() {
    let Some(model) = MINILM.for_test() else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    // Unload after every request: each embed reloads the model.
    let genius = start(&model, CortexStrategy::Immediate).await;
    let mut events = Box::pin(genius.events());
    let first = genius.embeddings(Embed::new(["reload me"])).await.unwrap();
    let second = genius.embeddings(Embed::new(["reload me"])).await.unwrap();
    assert_eq!(first, second);
    let mut hibernated = 0;
    while let Ok(Some(event)) =
        async_std::future::timeout(Duration::from_millis(500), events.next()).await
    {
        if format!("{event:?}").contains("Hibernated") {
            hibernated += 1;
        }
    }
    assert!(
        hibernated >= 1,
        "the model was unloaded between the requests"
    );
}

#[async_std::test]
async fn token_ids_embed_as_their_text_does() {
    let Some(model) = MINILM.for_test() else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(&model, CortexStrategy::KeepAlive).await;
    // The texts' ids in the model's (bert-base-uncased) vocabulary, with
    // its [CLS] (101) and [SEP] (102), as llama-server's /tokenize and
    // HuggingFace's tokenizer give them.
    let texts = ["hello world", "The cat sat on the mat."];
    let ids: Vec<Vec<u32>> = vec![
        vec![101, 7592, 2088, 102],
        vec![101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102],
    ];
    let from_text = genius.embeddings(Embed::new(texts)).await.unwrap();
    let from_ids = genius.embeddings(Embed::new(ids.clone())).await.unwrap();
    assert_eq!(from_ids.tokens, [4, 9]);
    assert_eq!(from_text.tokens, from_ids.tokens, "the tokenizer agrees");
    for (index, text) in texts.iter().enumerate() {
        assert_eq!(from_ids.vectors[index], from_text.vectors[index], "{text}");
    }

    let outside = genius
        .embeddings(Embed::new([vec![101, 40000, 102]]))
        .await
        .unwrap_err();
    assert_eq!(outside.kind, ErrorKind::InvalidRequest, "{outside:?}");
    assert!(
        outside.message.contains("inputs[0][1]") && outside.message.contains("30522"),
        "{}",
        outside.message
    );
    // The model still serves.
    assert!(genius.embeddings(Embed::new(["still here"])).await.is_ok());
}

//! Embeddings through both APIs, on Pinky: deterministic vectors an app
//! can test its retrieval code with, typed errors, and the channel API.

use facecrab::testing::TempDir;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rusty_genius_core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent};
use rusty_genius_core::{Embed, Embeddings, ErrorKind};
use rusty_genius_cortex::Pinky;
use rusty_genius_stem::{Orchestrator, OrchestratorHandle};

async fn serve(dir: &TempDir) -> (OrchestratorHandle, String) {
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky's pretend weights").unwrap();
    let genius = Orchestrator::builder()
        .pinky(Pinky::new())
        .build()
        .unwrap()
        .start();
    let name = model.display().to_string();
    genius.load(&name).await.unwrap();
    (genius, name)
}

#[async_std::test]
async fn pinky_embeds_deterministically_and_shared_words_are_closer() {
    let dir = TempDir::new("stem-embed");
    let (genius, _) = serve(&dir).await;
    let texts = [
        "the cat sat on the mat",
        "a cat on a mat",
        "stock prices fell sharply",
    ];
    let first = genius.embeddings(Embed::new(texts)).await.unwrap();
    let again = genius.embeddings(Embed::new(texts)).await.unwrap();
    assert_eq!(first, again, "the same texts get the same vectors");
    assert_eq!(first.vectors.len(), 3);
    assert!(first
        .vectors
        .iter()
        .all(|v| v.len() == Pinky::EMBEDDING_WIDTH));
    for vector in &first.vectors {
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    let near = Embeddings::cosine(&first.vectors[0], &first.vectors[1]);
    let far = Embeddings::cosine(&first.vectors[0], &first.vectors[2]);
    assert!(near > far, "shared words: {near}, none: {far}");
    assert_eq!(first.tokens, texts.map(str::len));
    assert_eq!(first.vectors[0], Pinky::embedding(texts[0], true));

    // The stream carries the vectors, then the usage and the end.
    let mut stream = genius.embed(Embed::new(["one"]));
    let mut kinds = Vec::new();
    while let Some(event) = stream.next().await {
        kinds.push(match event.unwrap() {
            InferenceEvent::ProcessStart => "start",
            InferenceEvent::Embeddings(_) => "embeddings",
            InferenceEvent::Usage(_) => "usage",
            InferenceEvent::Complete => "complete",
            other => panic!("unexpected {other:?}"),
        });
    }
    // ProcessStart comes first, even though Pinky sends the vectors as it
    // accepts the request.
    assert_eq!(kinds, ["start", "embeddings", "usage", "complete"]);

    // A request the engine refuses ends with its error alone: no
    // ProcessStart, which says a request was accepted.
    let mut refused = genius.embed(Embed::new([vec![104, 300]]));
    let mut events = Vec::new();
    while let Some(event) = refused.next().await {
        events.push(event);
    }
    assert_eq!(events.len(), 1, "{events:?}");
    let err = events[0].as_ref().unwrap_err();
    assert!(err.contains("300"), "{err}");

    let err = genius
        .embeddings(Embed::new(["ok", " "]))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
    assert!(err.contains("inputs[1]"), "{err}");
    let err = genius
        .embeddings(Embed::new(Vec::<String>::new()))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
    let long = "x".repeat(5000);
    let err = genius
        .embeddings(Embed::new([long.as_str()]))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::ContextExceeded);
    let cut = genius
        .embeddings(Embed::new([long.as_str()]).truncating())
        .await
        .unwrap();
    assert_eq!(cut.tokens, [4096]);
    assert!(genius
        .embeddings(Embed::new(["still serving"]))
        .await
        .is_ok());
}

#[async_std::test]
async fn the_channel_api_answers_embed_in_order_with_the_others() {
    let dir = TempDir::new("stem-embed-channel");
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky's pretend weights").unwrap();
    let mut genius = Orchestrator::builder().pinky(Pinky::new()).build().unwrap();
    let (mut input, rx) = mpsc::channel(8);
    let (tx, mut output) = mpsc::channel(64);
    let task = async_std::task::spawn(async move { genius.run(rx, tx).await });
    input
        .send(BrainstemInput::LoadModel(model.display().to_string()))
        .await
        .unwrap();
    input
        .send(BrainstemInput::Embed(Embed::new(["", "bad"])))
        .await
        .unwrap();
    input
        .send(BrainstemInput::Embed(Embed::new([
            "hello world",
            "goodbye",
        ])))
        .await
        .unwrap();
    drop(input);
    let mut errors = Vec::new();
    let mut vectors = Vec::new();
    let mut completes = 0;
    while let Some(message) = output.next().await {
        match message {
            BrainstemOutput::Error(err) => errors.push(err),
            BrainstemOutput::Event(InferenceEvent::Embeddings(found)) => vectors.push(found),
            BrainstemOutput::Event(InferenceEvent::Complete) => completes += 1,
            _ => {}
        }
    }
    task.await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind, ErrorKind::InvalidRequest);
    assert_eq!(vectors.len(), 1);
    assert_eq!(vectors[0].vectors.len(), 2);
    assert_eq!(vectors[0].vectors[0], Pinky::embedding("hello world", true));
    assert_eq!(completes, 1);
}

#[async_std::test]
async fn the_channel_api_reads_only_a_bounded_way_ahead_of_its_answers() {
    let dir = TempDir::new("stem-read-ahead");
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky's pretend weights").unwrap();
    // The first request holds the adapter for as long as the test runs.
    let pinky = Pinky::new()
        .with_script(vec!["tick "; 100_000])
        .with_token_delay(std::time::Duration::from_millis(5));
    let mut genius = Orchestrator::builder().pinky(pinky).build().unwrap();
    let (mut input, rx) = mpsc::channel(8);
    let (tx, output) = mpsc::channel(1024);
    let task = async_std::task::spawn(async move { genius.run(rx, tx).await });
    input
        .send(BrainstemInput::LoadModel(model.display().to_string()))
        .await
        .unwrap();
    let infer = || BrainstemInput::Infer {
        prompt: "go".into(),
        config: Default::default(),
    };
    input.send(infer()).await.unwrap();
    // Offer many more; a bounded adapter leaves them in the sender's
    // channel, whose fullness the sender sees.
    let mut accepted = 0;
    for _ in 0..50 {
        while input.try_send(infer()).is_ok() {
            accepted += 1;
            assert!(accepted < 10_000, "the adapter reads without a bound");
        }
        async_std::task::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        accepted < 200,
        "{accepted} inputs taken ahead of their answers"
    );
    assert!(accepted >= 8, "the sender's own channel holds {accepted}");
    // The application goes away: the adapter stops at its next output.
    drop(output);
    task.await;
}

//! Several real models resident in one Orchestrator: retrieval-shaped
//! traffic (MiniLM embeds, Qwen answers) loads each model once, an
//! embedding is answered while the chat model generates, and with two
//! places for three models the least recently used idle one makes room.

#![cfg(feature = "llama")]

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream, StreamExt};
use rusty_genius::core::manifest::ModelState;
use rusty_genius::core::protocol::{BrainstemOutput, EngineStatus, FinishReason, InferenceEvent};
use rusty_genius::core::{ChatMessage, Embed, InferenceConfig, PromptFormat};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::facecrab::testing::{GEMMA, MINILM, QWEN};
use rusty_genius::stem::Residency;
use rusty_genius::{CortexStrategy, Orchestrator, OrchestratorHandle};

/// The real-model tests share two cores: one at a time.
static ONE_AT_A_TIME: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

fn name(path: &Path) -> String {
    path.display().to_string()
}

fn start(residency: Residency) -> OrchestratorHandle {
    let options = LlamaOptions {
        context_size: 2048,
        parallel: 2,
        ..LlamaOptions::default()
    };
    Orchestrator::builder()
        .strategy(CortexStrategy::KeepAlive)
        .residency(residency)
        .engine(move || LlamaEngine::new(options.clone()))
        .build()
        .unwrap()
        .start()
}

/// The status events that arrived so far.
fn statuses(events: &mut (impl Stream<Item = BrainstemOutput> + Unpin)) -> Vec<EngineStatus> {
    let mut seen = Vec::new();
    while let Some(Some(event)) = events.next().now_or_never() {
        if let BrainstemOutput::Status(status) = event {
            seen.push(status);
        }
    }
    seen
}

fn loads(seen: &[EngineStatus]) -> usize {
    seen.iter()
        .filter(|s| matches!(s, EngineStatus::Loading(_)))
        .count()
}

async fn ask(genius: &OrchestratorHandle, model: &str, question: &str, tokens: usize) -> String {
    let config = InferenceConfig::greedy()
        .with_max_tokens(tokens)
        .with_model(model);
    let mut stream = genius.chat(vec![ChatMessage::user(question)], config);
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event.expect("the chat is answered") {
            InferenceEvent::Content(piece) => text.push_str(&piece),
            InferenceEvent::Complete => break,
            _ => {}
        }
    }
    text
}

#[async_std::test]
async fn retrieval_traffic_loads_each_model_once_and_both_stay_resident() {
    let (Some(chat), Some(embedder)) = (QWEN.for_test(), MINILM.for_test()) else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(Residency::default());
    let mut events = genius.events();
    let (chat, embedder) = (name(&chat), name(&embedder));
    genius.load(&chat).await.unwrap();
    let mut after_first = 0;
    for round in 0..20 {
        let question = format!("What is {round} plus {round}?");
        let found = genius
            .embeddings(Embed::new([question.clone()]).with_model(embedder.clone()))
            .await
            .unwrap();
        assert_eq!(found.vectors[0].len(), 384);
        let answer = ask(&genius, &chat, &question, 8).await;
        assert!(!answer.is_empty(), "round {round}");
        let seen = statuses(&mut events);
        if round > 0 {
            after_first += loads(&seen);
        } else {
            assert_eq!(loads(&seen), 2, "{seen:?}");
        }
    }
    assert_eq!(after_first, 0, "loads after the first round");
    let listed = genius.models().await.unwrap();
    assert_eq!(listed.len(), 2);
    for model in &listed {
        assert_eq!(model.state, ModelState::Loaded, "{model:?}");
        assert!(model.memory_bytes > 10_000_000, "{model:?}");
        assert_eq!(model.embeds, model.name == embedder, "{model:?}");
    }
    assert!(listed[0].default && listed[0].name == chat);
}

#[async_std::test]
async fn an_embedding_is_answered_while_the_other_model_generates() {
    let (Some(chat), Some(embedder)) = (QWEN.for_test(), MINILM.for_test()) else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(Residency::default());
    let (chat, embedder) = (name(&chat), name(&embedder));
    genius.load(&embedder).await.unwrap();
    genius.load(&chat).await.unwrap();
    let config = InferenceConfig::greedy()
        .with_max_tokens(200)
        .with_model(chat.clone());
    let mut long = genius.chat(
        vec![ChatMessage::user(
            "Write the numbers from 1 to 400 in words, one per line.",
        )],
        config,
    );
    // Wait until it generates.
    while !matches!(
        long.next().await.unwrap().unwrap(),
        InferenceEvent::Content(_)
    ) {}
    let reading = async_std::task::spawn(async move {
        let mut usage = None;
        while let Some(event) = long.next().await {
            if let InferenceEvent::Usage(u) = event.unwrap() {
                usage = Some(u);
            }
        }
        (Instant::now(), usage.expect("usage"))
    });
    let found = genius
        .embeddings(Embed::new(["a question about numbers"]).with_model(embedder.clone()))
        .await
        .unwrap();
    let embedded = Instant::now();
    assert_eq!(found.vectors.len(), 1);
    let (chat_ended, usage) = reading.await;
    assert_eq!(usage.finish_reason, FinishReason::MaxTokens, "{usage:?}");
    assert!(
        embedded < chat_ended,
        "the embedding came {:?} after the 200-token generation ended",
        embedded - chat_ended
    );
}

#[async_std::test]
async fn two_places_three_models_the_least_recently_used_idle_one_makes_room() {
    let (Some(base), Some(chat), Some(embedder)) =
        (GEMMA.for_test(), QWEN.for_test(), MINILM.for_test())
    else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(Residency::default().with_max_models(2));
    let mut events = genius.events();
    let (base, chat, embedder) = (name(&base), name(&chat), name(&embedder));
    let complete = |genius: OrchestratorHandle, base: String| async move {
        let config = InferenceConfig::greedy()
            .with_max_tokens(4)
            .with_prompt_format(PromptFormat::Raw)
            .with_model(base);
        let mut stream = genius.infer("The capital of France is", config);
        while let Some(event) = stream.next().await {
            event.unwrap();
        }
    };
    for _ in 0..2 {
        complete(genius.clone(), base.clone()).await;
        assert!(!ask(&genius, &chat, "Say hi.", 4).await.is_empty());
        genius
            .embeddings(Embed::new(["hello"]).with_model(embedder.clone()))
            .await
            .unwrap();
    }
    let evicted: Vec<(String, String)> = statuses(&mut events)
        .into_iter()
        .filter_map(|s| match s {
            EngineStatus::Evicted { name, for_model } => Some((name, for_model)),
            _ => None,
        })
        .collect();
    let expected = vec![
        (base.clone(), embedder.clone()),
        (chat.clone(), base.clone()),
        (embedder.clone(), chat.clone()),
        (base.clone(), embedder.clone()),
    ];
    assert_eq!(evicted, expected);

    // A model generating is never evicted: `chat` is the least recently
    // used when the others take turns, and keeps generating.
    let config = InferenceConfig::greedy()
        .with_max_tokens(120)
        .with_model(chat.clone());
    let long = genius.chat(
        vec![ChatMessage::user(
            "Count from 1 to 100, one number per line.",
        )],
        config,
    );
    let long = async_std::task::spawn(async move {
        let mut long = long;
        let mut usage = None;
        while let Some(event) = long.next().await {
            if let InferenceEvent::Usage(u) = event.unwrap() {
                usage = Some(u);
            }
        }
        usage.expect("usage")
    });
    async_std::task::sleep(Duration::from_millis(300)).await;
    genius
        .embeddings(Embed::new(["hello"]).with_model(embedder.clone()))
        .await
        .unwrap();
    complete(genius.clone(), base.clone()).await;
    let usage = long.await;
    assert_ne!(usage.finish_reason, FinishReason::Cancelled);
    let seen = statuses(&mut events);
    assert!(
        !seen
            .iter()
            .any(|s| matches!(s, EngineStatus::Evicted { name, .. } if *name == chat)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&EngineStatus::Evicted {
            name: embedder.clone(),
            for_model: base.clone()
        }),
        "{seen:?}"
    );
}

/// The text of `reply`'s tokens up to its first near tie: what must not
/// change with the threads a step runs on.
fn firm_prefix(reply: &rusty_genius::stem::testing::Reply) -> String {
    reply
        .margins()
        .into_iter()
        .take_while(|(_, margin)| *margin >= rusty_genius::stem::testing::MIN_MARGIN)
        .map(|(token, _)| token)
        .collect()
}

/// Two models computing at the same time (each step on its lease of the
/// cores, with that many threads, the lease changing as the other model
/// comes and goes) answer as each answers alone.
#[async_std::test]
async fn two_models_computing_at_once_answer_as_they_do_alone() {
    use rusty_genius::stem::testing::{read_stream, SEQUENCE_PROMPTS};

    let (Some(base), Some(chat)) = (GEMMA.for_test(), QWEN.for_test()) else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = start(Residency::default());
    let (base, chat) = (name(&base), name(&chat));
    genius.load(&base).await.unwrap();
    genius.load(&chat).await.unwrap();
    let limit = Duration::from_secs(300);
    let completion = |prompt: &str| {
        genius.infer(
            prompt,
            InferenceConfig::greedy()
                .with_max_tokens(24)
                .with_logprobs(2)
                .with_prompt_format(PromptFormat::Raw)
                .with_model(&base),
        )
    };
    let question = |text: &str| {
        genius.chat(
            vec![ChatMessage::user(text)],
            InferenceConfig::greedy()
                .with_max_tokens(24)
                .with_logprobs(2)
                .with_model(&chat),
        )
    };
    let prompts = &SEQUENCE_PROMPTS[..2];
    let questions = ["Name the planets of the solar system.", "What is Rust?"];
    let mut alone = Vec::new();
    for prompt in prompts {
        alone.push(read_stream(completion(prompt), limit).await.reply);
    }
    for text in questions {
        alone.push(read_stream(question(text), limit).await.reply);
    }
    // Something to compare: a reply whose first token is a near tie
    // checks nothing, and the counting prompts are chosen firm.
    assert!(
        alone.iter().any(|reply| !firm_prefix(reply).is_empty()),
        "no reply alone has a firm first token"
    );
    // All four at once, twice.
    for _ in 0..2 {
        let streams = prompts
            .iter()
            .map(|prompt| completion(prompt))
            .chain(questions.iter().map(|text| question(text)))
            .map(|stream| read_stream(stream, limit));
        let together = futures::future::join_all(streams).await;
        for (before, now) in alone.iter().zip(&together) {
            assert!(now.reply.completed, "{}", now.reply.event_list());
            let firm = firm_prefix(before);
            assert!(
                now.reply.text.starts_with(&firm),
                "alone: {:?} (firm: {firm:?}), together: {:?}",
                before.text,
                now.reply.text
            );
        }
    }
}

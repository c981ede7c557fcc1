//! Speculative decoding on real models (Qwen2.5-Coder-0.5B-Instruct,
//! `GENIUS_TEST_CHAT_MODEL`; gemma-3-270m, `GENIUS_TEST_MODEL`): guesses
//! ahead change how fast an answer comes, not what it says.
//!
//! llama.cpp's CPU kernels round a row of a many-row batch slightly
//! differently from a batch of one row (by a few hundredths of a logit
//! here), the same difference that four requests at once make against one
//! alone. So answers are compared through the part whose every choice is
//! firm (see fixtures/README.md), and log-probabilities within that
//! rounding.

#![cfg(feature = "llama")]

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use rusty_genius::core::protocol::{BrainstemOutput, FinishReason, InferenceEvent};
use rusty_genius::core::ErrorKind;
use rusty_genius::core::{
    ChatMessage, InferenceConfig, PromptFormat, ResponseFormat, Speculative, Tool, ToolChoice,
};
use rusty_genius::cortex::{DraftChoice, LlamaEngine, LlamaOptions};
use rusty_genius::facecrab::testing::{GEMMA, QWEN};
use rusty_genius::stem::testing::{Reply, TestClient, MIN_MARGIN, SEQUENCE_PROMPTS};
use rusty_genius::{CortexStrategy, Orchestrator};
use serde_json::{json, Value};

fn model() -> Option<PathBuf> {
    QWEN.for_test()
}

/// The real-model tests share two cores; one at a time.
static ONE_AT_A_TIME: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

/// How far a token's log-probability may move between a batch of one row
/// and a row of a larger batch.
const ROUNDING: f32 = 0.15;

/// An Orchestrator that keeps the model, `parallel` requests at once.
fn orchestrator(parallel: u32) -> Orchestrator {
    let options = LlamaOptions {
        context_size: 4096,
        parallel,
        ..LlamaOptions::default()
    };
    Orchestrator::builder()
        .strategy(CortexStrategy::KeepAlive)
        .engine(move || LlamaEngine::new(options.clone()))
        .build()
        .unwrap()
}

async fn start(path: &std::path::Path) -> TestClient {
    let mut client = TestClient::start(orchestrator(1)).with_timeout(Duration::from_secs(300));
    let loaded = client.load(&path.display().to_string()).await.unwrap();
    assert!(loaded.errors.is_empty(), "{loaded:?}");
    client
}

const CODE: &str = "def area(width, height):
    return width * height


def perimeter(width, height):
    return 2 * (width + height)


def describe(width, height):
    print(\"area\", area(width, height))
    print(\"perimeter\", perimeter(width, height))
";

fn edit() -> Vec<ChatMessage> {
    vec![ChatMessage::user(format!(
        "Rename the function `area` to `surface` everywhere. Answer with the whole code and nothing else.\n\n```python\n{CODE}```"
    ))]
}

fn config(speculative: Speculative, max_tokens: usize) -> InferenceConfig {
    InferenceConfig::greedy()
        .with_max_tokens(max_tokens)
        .with_logprobs(2)
        .with_speculative(speculative)
}

/// How many bytes of `reply`'s text rest on firm choices only.
fn firm_bytes(reply: &Reply) -> usize {
    let mut bytes = 0;
    for (token, margin) in reply.margins() {
        if margin < MIN_MARGIN {
            break;
        }
        bytes += token.len();
    }
    bytes.min(reply.text.len())
}

/// `on` says what `off` says through `off`'s firm part, with the same
/// tokens and log-probabilities there (up to the kernels' rounding).
fn assert_same_answer(off: &Reply, on: &Reply) {
    let firm = firm_bytes(off);
    assert!(
        firm >= 40,
        "too little of the answer is firm here: {firm} bytes of {:?}",
        off.text
    );
    assert_eq!(
        on.text.get(..firm),
        off.text.get(..firm),
        "\n--- off\n{}\n--- on\n{}",
        off.text,
        on.text
    );
    let mut through = 0;
    for (a, b) in off.logprobs.iter().zip(&on.logprobs) {
        if through >= firm {
            break;
        }
        assert_eq!(a.id, b.id);
        assert!(
            (a.logprob - b.logprob).abs() <= ROUNDING,
            "{:?}: {} off, {} on",
            a.token,
            a.logprob,
            b.logprob
        );
        through += a.bytes.len();
    }
}

#[async_std::test]
async fn an_edit_says_the_same_with_guesses_from_its_own_text_and_from_a_prediction() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let off = client
        .chat(edit(), config(Speculative::Off, 160))
        .await
        .unwrap();
    assert!(off.completed, "{off:?}");
    assert_eq!(off.usage().draft_tokens, 0);
    assert!(off.text.contains("def surface("), "{:?}", off.text);

    let on = client
        .chat(edit(), config(Speculative::Auto, 160))
        .await
        .unwrap();
    assert_same_answer(&off, &on);
    let usage = on.usage();
    assert!(
        usage.accepted_draft_tokens > 20,
        "the edit repeats its prompt: guesses from it should hold, {usage:?}"
    );
    assert!(usage.accepted_draft_tokens <= usage.draft_tokens);

    let predicted = client
        .chat(
            edit(),
            config(Speculative::Auto, 160).with_prediction(format!("```python\n{CODE}```")),
        )
        .await
        .unwrap();
    assert_same_answer(&off, &predicted);
    assert!(
        predicted.usage().accepted_draft_tokens > usage.accepted_draft_tokens / 2,
        "{:?}",
        predicted.usage()
    );

    // A prediction wrong everywhere changes nothing either.
    let wrong = client
        .chat(
            edit(),
            config(Speculative::Auto, 160)
                .with_prediction("Lorem ipsum dolor sit amet. ".repeat(20)),
        )
        .await
        .unwrap();
    assert_same_answer(&off, &wrong);
}

#[async_std::test]
async fn max_tokens_and_a_stop_sequence_end_an_answer_inside_a_kept_guess() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let whole = client
        .chat(edit(), config(Speculative::Off, 160))
        .await
        .unwrap();
    let firm = firm_bytes(&whole);
    assert!(firm >= 80, "too little is firm: {:?}", whole.text);
    // The answer itself as the prediction: every guess is right, so each
    // limit falls inside a run of kept guesses.
    let prediction = whole.text.clone();

    for max_tokens in [7, 13] {
        let off = client
            .chat(edit(), config(Speculative::Off, max_tokens))
            .await
            .unwrap();
        let on = client
            .chat(
                edit(),
                config(Speculative::Auto, max_tokens).with_prediction(prediction.clone()),
            )
            .await
            .unwrap();
        assert_eq!(on.text, off.text);
        assert_eq!(on.usage().generated_tokens, max_tokens);
        assert_eq!(on.usage().finish_reason, FinishReason::MaxTokens);
        assert!(on.usage().accepted_draft_tokens > 0, "{:?}", on.usage());
    }

    let stop = "perimeter(";
    let at = whole.text.find(stop).expect("the answer keeps `perimeter`");
    assert!(at < firm, "the stop sequence lies in the firm part");
    let on = client
        .chat(
            edit(),
            config(Speculative::Auto, 160)
                .with_prediction(prediction)
                .with_stop(stop),
        )
        .await
        .unwrap();
    assert_eq!(on.text, whole.text[..at]);
    assert_eq!(on.usage().finish_reason, FinishReason::StopSequence);
}

#[async_std::test]
async fn a_json_schema_answer_and_a_tool_call_come_out_the_same_with_guesses() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let person = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "city": {"type": "string"},
            "items": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "city", "items"],
    });
    let order = vec![ChatMessage::user(
        "Ada Lovelace from London ordered: a brass telescope, a walnut writing desk, a brass telescope stand. Give her name, city and items as JSON.",
    )];
    let schema = |speculative| {
        config(speculative, 120)
            .with_response_format(ResponseFormat::json_schema("order", person.clone()))
    };
    let off = client
        .chat(order.clone(), schema(Speculative::Off))
        .await
        .unwrap();
    let on = client
        .chat(order.clone(), schema(Speculative::Auto))
        .await
        .unwrap();
    let value: Value = serde_json::from_str(&on.text).expect("JSON");
    assert_eq!(value["name"], "Ada Lovelace", "{value}");
    assert_eq!(
        on.text, off.text,
        "a grammar holds the answer: every choice is firm or forced"
    );
    on.assert_json_firm();
    assert!(on.usage().accepted_draft_tokens > 0, "{:?}", on.usage());

    let weather = Tool::function(
        "get_weather",
        "The current weather in a city",
        json!({
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        }),
    );
    let ask = vec![ChatMessage::user("What is the weather in Paris?")];
    let call = |speculative| {
        config(speculative, 64)
            .with_tools(vec![weather.clone()])
            .with_tool_choice(ToolChoice::Required)
    };
    let off = client
        .chat(ask.clone(), call(Speculative::Off))
        .await
        .unwrap();
    let on = client.chat(ask, call(Speculative::Auto)).await.unwrap();
    assert_eq!(on.tool_calls.len(), 1, "{on:?}");
    assert_eq!(on.tool_calls[0].1, "get_weather");
    assert_eq!(on.tool_calls[0].2, off.tool_calls[0].2);
    assert_eq!(on.tool_calls[0].2, json!({"city": "Paris"}));
}

#[async_std::test]
async fn four_edits_at_once_say_what_they_say_one_at_a_time() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = orchestrator(4).start();
    genius.load(&path.display().to_string()).await.unwrap();
    let renames = ["surface", "size", "extent", "room"];
    let ask = |name: &str| {
        vec![ChatMessage::user(format!(
            "Rename the function `area` to `{name}` everywhere. Answer with the whole code and nothing else.\n\n```python\n{CODE}```"
        ))]
    };
    // Four at once without guesses, then with: the same batches but for
    // the guesses' rows.
    let mut replies = Vec::new();
    for speculative in [Speculative::Off, Speculative::Auto] {
        let streams: Vec<_> = renames
            .iter()
            .map(|name| genius.chat(ask(name), config(speculative, 160)))
            .collect();
        let mut round = Vec::new();
        for stream in streams {
            let reply = collect(stream).await;
            assert!(reply.errors.is_empty(), "{:?}", reply.errors);
            round.push(reply);
        }
        replies.push(round);
    }
    let mut kept = 0;
    for (off, on) in replies[0].iter().zip(&replies[1]) {
        assert_same_answer(off, on);
        kept += on.usage().accepted_draft_tokens;
    }
    assert!(
        kept > 40,
        "guesses from the prompt should hold in edits: {kept}"
    );
}

#[async_std::test]
async fn a_base_model_with_a_sliding_window_repeats_a_list_the_same_with_guesses() {
    // gemma-3 keeps only a window of its sliding-window layers' cache:
    // guesses that fall must come out of both kinds of layer.
    let Some(path) = GEMMA.for_test() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let list = "copper kettle, linen apron, oak ladle, clay bowl, iron skillet, \
                glass jar, wicker basket, tin funnel, bone spoon, stone mortar";
    let prompt = format!("Inventory of the kitchen: {list}.\nThe same inventory, copied: copper");
    let ask = |speculative| config(speculative, 60).with_prompt_format(PromptFormat::Raw);
    let off = client.infer(&prompt, ask(Speculative::Off)).await.unwrap();
    let on = client.infer(&prompt, ask(Speculative::Auto)).await.unwrap();
    assert!(
        off.text.starts_with(" kettle, linen apron"),
        "{:?}",
        off.text
    );
    assert_same_answer(&off, &on);
    assert!(on.usage().accepted_draft_tokens > 10, "{:?}", on.usage());
}

/// An Orchestrator whose engine loads `draft` beside each model.
fn with_draft(draft: &std::path::Path) -> Orchestrator {
    let options = LlamaOptions {
        context_size: 4096,
        parallel: 2,
        draft_model: Some(DraftChoice {
            path: draft.to_path_buf(),
            target: None,
        }),
        ..LlamaOptions::default()
    };
    Orchestrator::builder()
        .strategy(CortexStrategy::KeepAlive)
        .engine(move || LlamaEngine::new(options.clone()))
        .build()
        .unwrap()
}

/// Questions whose answers are prose, not copies of the prompt.
const DRAFT_PROMPTS: [&str; 5] = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "List the planets of the solar system in order from the Sun.",
    "Explain in a few sentences how a bicycle's gears make climbing easier.",
    "What is the capital of France? Answer in one sentence, then name three sights there.",
    "Write a short poem about the sea.",
];

#[async_std::test]
async fn a_model_drafting_for_itself_has_every_guess_kept_and_says_the_same() {
    // The same model as its own draft: its greedy guesses are the choices
    // the model makes, so every one checked is kept (a guess goes out only
    // when the draft is sure of it, far above the kernels' rounding).
    // Qwen answers questions in its chat template; gemma, a base model with
    // a sliding window, continues sequences.
    let models = [
        (QWEN.for_test(), &DRAFT_PROMPTS[..], PromptFormat::Auto),
        (GEMMA.for_test(), &SEQUENCE_PROMPTS[..], PromptFormat::Raw),
    ];
    for (path, prompts, format) in models {
        let Some(path): Option<PathBuf> = path else {
            continue;
        };
        let _turn = ONE_AT_A_TIME.lock().await;
        let mut client =
            TestClient::start(with_draft(&path)).with_timeout(Duration::from_secs(300));
        let loaded = client.load(&path.display().to_string()).await.unwrap();
        assert!(loaded.errors.is_empty(), "{loaded:?}");
        let ask = |speculative| config(speculative, 64).with_prompt_format(format);
        // The first candidate whose answer is firm for a while here (which
        // are firm depends on the CPU's kernels).
        let mut chosen = None;
        for &prompt in prompts {
            let off = client.infer(prompt, ask(Speculative::Off)).await.unwrap();
            if firm_bytes(&off) >= 60 {
                chosen = Some((prompt, off));
                break;
            }
        }
        let (prompt, off) = chosen.expect("one of the prompts has a firm answer");
        let on = client.infer(prompt, ask(Speculative::Draft)).await.unwrap();
        assert_same_answer(&off, &on);
        let usage = on.usage();
        assert!(usage.draft_tokens >= 20, "{path:?}: {usage:?}");
        assert_eq!(
            usage.accepted_draft_tokens, usage.draft_tokens,
            "{path:?}: {usage:?}"
        );
        // Auto takes the draft model's guesses where the text has none.
        let auto = client.infer(prompt, ask(Speculative::Auto)).await.unwrap();
        assert_same_answer(&off, &auto);
        assert!(
            auto.usage().accepted_draft_tokens >= 20,
            "{:?}",
            auto.usage()
        );
    }
}

#[async_std::test]
async fn a_draft_model_of_other_tokens_is_refused_naming_both_and_draft_needs_one() {
    let (Some(qwen), Some(gemma)) = (QWEN.for_test(), GEMMA.for_test()) else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    // gemma offered as Qwen's draft: their vocabularies differ.
    let mut client = TestClient::start(with_draft(&gemma)).with_timeout(Duration::from_secs(300));
    let loaded = client.load(&qwen.display().to_string()).await.unwrap();
    let error = loaded.errors.first().expect("the load is refused");
    assert_eq!(error.kind, ErrorKind::InvalidRequest, "{error}");
    assert!(
        error.contains("gemma-3-270m") && error.contains("qwen2.5-coder-0.5b"),
        "{error}"
    );
    // Without a draft model, a request for its guesses is refused by name.
    let mut client = start(&qwen).await;
    let reply = client
        .infer("Hello", config(Speculative::Draft, 4))
        .await
        .unwrap();
    let error = reply.errors.first().expect("refused");
    assert!(
        error.contains("speculative") && error.contains("draft"),
        "{error}"
    );
}

/// Runs `stream` to its end: its reply, or the first error.
async fn collect(mut stream: rusty_genius::RequestStream) -> Reply {
    let mut reply = Reply::default();
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let done = matches!(event, InferenceEvent::Complete);
                reply.record(BrainstemOutput::Event(event));
                if done {
                    break;
                }
            }
            Err(error) => {
                reply.errors.push(error);
                break;
            }
        }
    }
    reply
}

#[async_std::test]
async fn a_soak_of_speculative_requests_leaves_every_slot_cache_as_its_tokens() {
    // Guesses right, wrong and half right, cut by max_tokens and stop
    // sequences, and requests dropped mid-answer, four at a time: the
    // engine checks after every step with guesses that each slot's cache
    // ends at its last kept token (a request fails otherwise), and the
    // same question afterwards gets the answer it got first.
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let genius = orchestrator(4).start();
    genius.load(&path.display().to_string()).await.unwrap();
    let before = collect(genius.chat(edit(), config(Speculative::Off, 120))).await;
    assert!(before.errors.is_empty(), "{:?}", before.errors);
    let other = CODE.replace("width", "w").replace("height", "h");
    let mut finished = 0;
    for round in 0..6usize {
        let mut streams = Vec::new();
        for client in 0..4usize {
            let kind = (round + client) % 6;
            let base = config(Speculative::Auto, 24 + 29 * ((round * 4 + client) % 5));
            let (messages, config) = match kind {
                0 => (
                    edit(),
                    base.with_prediction(format!("```python\n{CODE}```")),
                ),
                1 => (
                    edit(),
                    base.with_prediction("nothing like the answer ".repeat(40)),
                ),
                2 => (edit(), base.with_prediction(other.clone())),
                3 => (edit(), base.with_stop("perimeter(")),
                4 => (
                    vec![ChatMessage::user("Count from one to thirty in words.")],
                    base,
                ),
                _ => (edit(), base.with_max_tokens(7)),
            };
            streams.push((client, genius.chat(messages, config)));
        }
        for (client, mut stream) in streams {
            if client == 3 && round % 2 == 1 {
                // Dropped after its first few events.
                for _ in 0..5 {
                    let _ = stream.next().await;
                }
                drop(stream);
                continue;
            }
            let reply = collect(stream).await;
            assert!(reply.errors.is_empty(), "round {round}: {:?}", reply.errors);
            finished += 1;
        }
    }
    assert!(finished >= 20);
    let after = collect(genius.chat(edit(), config(Speculative::Auto, 120))).await;
    assert!(after.errors.is_empty(), "{:?}", after.errors);
    assert_same_answer(&before, &after);
    let again = collect(genius.chat(edit(), config(Speculative::Off, 120))).await;
    assert_same_answer(&before, &again);
}

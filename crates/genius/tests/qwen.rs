//! Conversations on a real instruct model: Qwen2.5-Coder-0.5B-Instruct
//! (Q4_K_M), whose Jinja chat template offers tools.
//!
//! The model file is named by `GENIUS_TEST_CHAT_MODEL` (`.ci/fetch-model.sh
//! qwen` prints its path). Without it these tests are skipped with a note,
//! except under CI (`CI=true`), where a missing model fails them.
//! Expected text is checked to rest on firm choices (see
//! fixtures/README.md).

#![cfg(feature = "llama")]
#![allow(clippy::print_stderr)] // what auto gives, for the note

use std::path::PathBuf;
use std::time::Duration;

use rusty_genius::core::protocol::FinishReason;
use rusty_genius::core::{
    ChatMessage, ErrorKind, InferenceConfig, ResponseFormat, Role, Tool, ToolCall, ToolChoice,
};
use rusty_genius::cortex::{LlamaEngine, LlamaOptions};
use rusty_genius::facecrab::testing::QWEN;
use rusty_genius::stem::testing::{Reply, TestClient, MIN_MARGIN};
use rusty_genius::{CortexStrategy, Orchestrator};
use serde_json::{json, Value};

/// The test model, or `None` (with a note) when it is not available here.
fn model() -> Option<PathBuf> {
    QWEN.for_test()
}

/// The real-model tests share two cores; one at a time.
static ONE_AT_A_TIME: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

async fn start(path: &std::path::Path) -> TestClient {
    let options = LlamaOptions {
        context_size: 4096,
        ..LlamaOptions::default()
    };
    let genius = Orchestrator::builder()
        .strategy(CortexStrategy::KeepAlive)
        .engine(move || LlamaEngine::new(options.clone()))
        .build()
        .unwrap();
    let mut client = TestClient::start(genius).with_timeout(Duration::from_secs(300));
    let loaded = client.load(&path.display().to_string()).await.unwrap();
    assert!(loaded.errors.is_empty(), "{loaded:?}");
    client
}

fn greedy(max_tokens: usize) -> InferenceConfig {
    InferenceConfig::greedy()
        .with_max_tokens(max_tokens)
        .with_logprobs(2)
}

fn weather_tool() -> Tool {
    Tool::function(
        "get_weather",
        "The current weather in a city",
        json!({
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        }),
    )
}

fn paris() -> Vec<ChatMessage> {
    vec![ChatMessage::user("What is the weather in Paris?")]
}

/// No tool-call markup reached the text.
fn assert_no_markup(reply: &Reply) {
    for marker in ["<tool_call>", "</tool_call>", "<|im_end|>", "<|im_start|>"] {
        assert!(!reply.text.contains(marker), "{marker} in {:?}", reply.text);
    }
}

#[async_std::test]
async fn a_user_message_is_answered_in_the_chat_template() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let reply = client
        .chat(
            vec![ChatMessage::user("What is the capital of Japan?")],
            greedy(32),
        )
        .await
        .unwrap();
    assert!(reply.completed, "{reply:?}");
    reply.assert_contains_firmly("Tokyo");
    assert_eq!(reply.usage().finish_reason, FinishReason::EndOfGeneration);
}

#[async_std::test]
async fn the_next_turn_remembers_and_reuses_the_whole_first_turn() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let mut messages = vec![
        ChatMessage::system("Answer in one short sentence."),
        ChatMessage::user("My name is Ada."),
    ];
    let first = client.chat(messages.clone(), greedy(48)).await.unwrap();
    assert!(first.completed, "{first:?}");
    messages.push(ChatMessage::assistant(first.text.clone()));
    messages.push(ChatMessage::user("What is my name?"));
    let second = client.chat(messages, greedy(48)).await.unwrap();
    second.assert_contains_firmly("Ada");
    let whole_first_turn = first.usage().prompt_tokens + first.usage().generated_tokens;
    assert!(
        second.usage().cached_tokens >= whole_first_turn,
        "the second turn reused {} tokens; the first turn was {whole_first_turn}",
        second.usage().cached_tokens
    );
}

#[async_std::test]
async fn required_and_named_tool_choices_give_exactly_one_well_formed_call() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    for choice in [
        ToolChoice::Required,
        ToolChoice::Function("get_weather".into()),
    ] {
        let config = greedy(64)
            .with_tools(vec![weather_tool()])
            .with_tool_choice(choice.clone());
        let reply = client.chat(paris(), config).await.unwrap();
        assert_eq!(reply.tool_calls.len(), 1, "{choice:?}: {reply:?}");
        let (id, name, arguments) = &reply.tool_calls[0];
        assert!(id.starts_with("call_"), "{id}");
        assert_eq!(name, "get_weather");
        assert_eq!(arguments, &json!({"city": "Paris"}));
        assert_eq!(reply.usage().finish_reason, FinishReason::ToolCalls);
        assert_no_markup(&reply);
        assert!(reply.text.trim().is_empty(), "{choice:?}: {:?}", reply.text);
        // Between `{"` and `{` and a newline Qwen hesitates (1.2 to 1.4
        // logits): a choice of JSON layout, which decides nothing here.
        reply.assert_json_firm();
    }

    // Left to itself this small model writes the call as plain JSON,
    // without the template's markup: it is read as the call it is.
    let auto = greedy(64).with_logprobs(5).with_tools(vec![weather_tool()]);
    let reply = client.chat(paris(), auto.clone()).await.unwrap();
    assert_eq!(reply.tool_calls.len(), 1, "auto: {reply:?}");
    let (_, name, arguments) = &reply.tool_calls[0];
    assert_eq!(name, "get_weather");
    assert_eq!(arguments, &json!({"city": "Paris"}));
    assert_eq!(reply.usage().finish_reason, FinishReason::ToolCalls);
    assert!(reply.text.trim().is_empty(), "auto: {:?}", reply.text);
    // The model wavers between a fenced and a bare object at its first
    // token (0.03 logits apart here), with the template's `<tool_call>`
    // next: all three are this call. What must be firm is that it opens a
    // call rather than prose (2.3 logits here), and the JSON after that.
    let opening = &reply.logprobs[0].top_logprobs;
    let opens_json = |token: &str| token.starts_with(['`', '{', '<']);
    let best = |json: bool| {
        opening
            .iter()
            .filter(|t| opens_json(&t.token) == json)
            .map(|t| t.logprob)
            .fold(f32::NEG_INFINITY, f32::max)
    };
    let margin = best(true) - best(false);
    eprintln!("auto opens a call by {margin:.2} logits over prose: {opening:?}");
    assert!(
        margin >= MIN_MARGIN,
        "the answer could open with prose: {opening:?}"
    );
    reply.assert_json_firm_after(1);
    // With that reading turned off, the same answer is text.
    let mut strict = auto;
    strict.json_tool_calls = false;
    let reply = client.chat(paris(), strict).await.unwrap();
    assert!(reply.tool_calls.is_empty(), "strict: {reply:?}");
    assert!(
        reply.text.contains("get_weather"),
        "strict: {:?}",
        reply.text
    );
    assert_no_markup(&reply);

    // With `none` the tools are not offered and no call comes.
    let none = greedy(64)
        .with_tools(vec![weather_tool()])
        .with_tool_choice(ToolChoice::None);
    let reply = client.chat(paris(), none).await.unwrap();
    assert!(reply.tool_calls.is_empty(), "{reply:?}");
    assert!(reply.completed);
}

#[async_std::test]
async fn a_tool_result_sent_back_is_used_in_the_answer() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    // One finished round of the loop first (Rome), as an app's history
    // would hold it: it shows this small model how an answer follows a
    // tool result, which makes its answer firm.
    let rome = ToolCall::new("call_rome", "get_weather", &json!({"city": "Rome"}));
    let mut messages = vec![
        ChatMessage::user("What is the weather in Rome?"),
        ChatMessage::assistant_tool_calls(vec![rome]),
        ChatMessage::tool("call_rome", "25 C and cloudy"),
        ChatMessage::assistant("It is 25 C and cloudy in Rome."),
        ChatMessage::user("What is the weather in Paris?"),
    ];
    let required = greedy(64)
        .with_tools(vec![weather_tool()])
        .with_tool_choice(ToolChoice::Required);
    let asked = client.chat(messages.clone(), required).await.unwrap();
    assert_eq!(asked.tool_calls.len(), 1, "{asked:?}");
    let (id, name, arguments) = asked.tool_calls[0].clone();
    assert_eq!(arguments, json!({"city": "Paris"}));
    messages.push(ChatMessage::assistant_tool_calls(vec![ToolCall::new(
        id.clone(),
        name,
        &arguments,
    )]));
    messages.push(ChatMessage::tool(id, "18 C and sunny"));
    let auto = greedy(64).with_tools(vec![weather_tool()]);
    let reply = client.chat(messages, auto).await.unwrap();
    assert!(reply.tool_calls.is_empty(), "{reply:?}");
    assert_eq!(reply.usage().finish_reason, FinishReason::EndOfGeneration);
    reply.assert_contains_firmly("18");
}

/// The schema of the structured-output tests: a string, an integer, an
/// enum and an array, all required.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "job": {"type": "string", "enum": ["baker", "pilot", "teacher", "painter"]},
            "hobbies": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "job", "hobbies"],
    })
}

const PEOPLE: [&str; 20] = [
    "a baker from Lyon",
    "a retired pilot who loves chess",
    "a young teacher in Osaka",
    "a painter who lives by the sea",
    "an old fisherman",
    "a student of music",
    "a doctor in a small town",
    "a chef who travels",
    "a gardener with a big family",
    "a firefighter who runs marathons",
    "a librarian who writes poems",
    "a mechanic in Berlin",
    "a nurse who paints at night",
    "a farmer in Kenya",
    "a programmer who bakes bread",
    "a sailor from Norway",
    "a dancer in Buenos Aires",
    "a photographer of birds",
    "a carpenter who plays guitar",
    "a scientist who climbs mountains",
];

fn describe(who: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::user(format!(
        "Describe {who} as a JSON object with the fields name, age, job and hobbies."
    ))]
}

#[async_std::test]
async fn json_schema_output_always_validates_and_free_output_does_not() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let validator = jsonschema::validator_for(&person_schema()).unwrap();
    let held = InferenceConfig::greedy()
        .with_max_tokens(128)
        .with_response_format(ResponseFormat::json_schema("person", person_schema()));
    for who in PEOPLE {
        let reply = client.chat(describe(who), held.clone()).await.unwrap();
        let value: Value = serde_json::from_str(&reply.text)
            .unwrap_or_else(|err| panic!("{who}: not JSON ({err}): {:?}", reply.text));
        assert!(
            validator.is_valid(&value),
            "{who}: {value} does not follow the schema"
        );
    }
    let free = InferenceConfig::greedy().with_max_tokens(128);
    let mut failed = 0;
    for who in PEOPLE {
        let reply = client.chat(describe(who), free.clone()).await.unwrap();
        let valid = serde_json::from_str::<Value>(reply.text.trim())
            .is_ok_and(|value| validator.is_valid(&value));
        failed += usize::from(!valid);
    }
    eprintln!("without the schema, {failed} of 20 answers did not follow it");
    assert!(failed > 0, "the schema made no difference to test");
}

#[async_std::test]
async fn bad_chat_requests_get_typed_errors_and_the_orchestrator_keeps_serving() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let expect = |reply: &Reply, what: &str| {
        let err = reply
            .error()
            .unwrap_or_else(|| panic!("no error: {reply:?}"));
        assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err}");
        assert!(err.message.contains(what), "{what}: {err}");
    };
    let unknown_role = vec![ChatMessage {
        role: Role::from("wizard"),
        ..ChatMessage::user("hi")
    }];
    expect(
        &client.chat(unknown_role, greedy(8)).await.unwrap(),
        "messages[0].role",
    );
    let orphan_result = vec![ChatMessage::user("hi"), ChatMessage::tool("call_x", "42")];
    expect(
        &client.chat(orphan_result, greedy(8)).await.unwrap(),
        "messages[1].tool_call_id",
    );
    let not_object = Tool::function("f", "", json!({"type": "array"}));
    expect(
        &client
            .chat(paris(), greedy(8).with_tools(vec![not_object]))
            .await
            .unwrap(),
        "tools[0].function.parameters",
    );
    let bad_grammar = greedy(8).with_response_format(ResponseFormat::Grammar {
        grammar: "root ::= (".into(),
    });
    expect(
        &client.chat(paris(), bad_grammar).await.unwrap(),
        "response_format.grammar",
    );
    let unconvertible = greedy(8).with_response_format(ResponseFormat::json_schema(
        "x",
        json!({"$ref": "#/definitions/missing"}),
    ));
    expect(
        &client.chat(paris(), unconvertible).await.unwrap(),
        "response_format",
    );
    // Still serving.
    let reply = client
        .chat(
            vec![ChatMessage::user("What is the capital of Japan?")],
            greedy(32),
        )
        .await
        .unwrap();
    reply.assert_contains_firmly("Tokyo");
}

/// Answers that honestly are JSON or code stay content when tools are
/// offered: the reading of calls without markup only takes JSON that
/// names a tool with arguments that fit it.
#[async_std::test]
async fn json_and_code_answers_stay_content_with_tools_offered() {
    let Some(path) = model() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut client = start(&path).await;
    let prompts = [
        "Write a JSON object describing a book with a title and an author.",
        "Give me an example package.json for a small Node project.",
        "Write a Python function that parses a JSON string and returns a dict.",
        "Show a JSON array of three colours.",
        "Write a Rust struct for a point with x and y, deriving Serialize.",
        "Convert this to JSON: name Ada, age 36.",
        "What is the JSON for an empty object?",
        "Write a SQL query that selects all users older than 30.",
        "Give me a JSON schema for an object with a required string field `id`.",
        "Write a JavaScript function that adds two numbers.",
        "Show a nested JSON object: an order with a list of items and prices.",
        "Write a bash one-liner that counts the lines of every .rs file.",
        "Write a tsconfig.json that enables strict mode.",
        "Write a C function that returns the larger of two ints.",
        "Write a Go function that reverses a string.",
        "Give me a YAML file for a GitHub Actions job that runs cargo test.",
        "Write a JSON object with a field `function` holding the string `print`.",
        "Write a Python class for a stack with push and pop.",
        "Show an example JSON-RPC request calling the method `add`.",
        "Write a Dockerfile for a Rust binary.",
    ];
    let mut answered_in_json = 0;
    let mut read_as_calls = Vec::new();
    for prompt in prompts {
        let config = config_for_json_prompts();
        let reply = client
            .chat(vec![ChatMessage::user(prompt)], config)
            .await
            .unwrap();
        if !reply.tool_calls.is_empty() {
            // The model may decide to call a tool after all (on this
            // machine none of these prompts makes it; "Format this as
            // JSON: city Paris" and "a JSON list of the first five prime
            // numbers" did, with nothing but calls). Then its whole answer, read strictly,
            // must be nothing but that call: no text was taken for one.
            let mut strict = config_for_json_prompts();
            strict.json_tool_calls = false;
            let written = client
                .chat(vec![ChatMessage::user(prompt)], strict)
                .await
                .unwrap();
            let text = written.text.trim();
            let body = text
                .strip_prefix("```json")
                .or_else(|| text.strip_prefix("```"))
                .map_or(text, |fenced| fenced.trim_end_matches('`'));
            let value: Value = serde_json::from_str(body.trim())
                .unwrap_or_else(|_| panic!("{prompt}: a call was read from {text:?}"));
            let calls = match &value {
                Value::Array(calls) => calls.clone(),
                call => vec![call.clone()],
            };
            let names_a_tool = |call: &Value| {
                call.get("name")
                    .is_some_and(|name| name == "get_weather" || name == "search_docs")
            };
            assert!(
                calls.iter().all(names_a_tool),
                "{prompt}: a call was read from {text:?}"
            );
            read_as_calls.push(prompt);
            continue;
        }
        assert!(!reply.text.trim().is_empty(), "{prompt}: no answer");
        assert_no_markup(&reply);
        if reply.text.trim_start().starts_with(['{', '[', '`']) {
            answered_in_json += 1;
        }
    }
    // How many answers went through the reading of calls without markup
    // (they start as it does); for the log.
    eprintln!(
        "{answered_in_json} of {} answers opened with JSON or a fence; the model called a tool for {read_as_calls:?}",
        prompts.len()
    );
}

fn config_for_json_prompts() -> InferenceConfig {
    let search = Tool::function(
        "search_docs",
        "Search the project's documentation",
        json!({
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        }),
    );
    InferenceConfig::greedy()
        .with_max_tokens(96)
        .with_tools(vec![weather_tool(), search])
}

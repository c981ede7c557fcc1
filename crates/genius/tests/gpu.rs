//! The GPU path: every model of the test suite loaded twice, once with
//! every layer offloaded to the GPU and once on the CPU alone, in the same
//! build, and each answer compared.
//!
//! Compiled only with a GPU backend (`vulkan`, `cuda`, `metal`). CI runs
//! it on the `vulkan` build with lavapipe, Mesa's Vulkan driver on the CPU
//! (`GGML_VK_VISIBLE_DEVICES=0`), and `.ci/cuda-check.sh` on an NVIDIA
//! machine. A build whose GPU is not found fails here: these tests are
//! about the GPU.
//!
//! A GPU computes in other orders and precisions than the CPU's kernels
//! (it multiplies dequantized weights in floating point, where the CPU
//! multiplies quantized activations), so texts are compared only on
//! prompts whose greedy answers on the CPU are firm: every token chosen
//! by at least `MIN_MARGIN` logits over the runner-up.

#![cfg(any(feature = "vulkan", feature = "cuda", feature = "metal"))]
#![allow(clippy::print_stderr)] // the measured margins and speeds go to the test log

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;
use rusty_genius::core::manifest::ModelInfo;
use rusty_genius::core::{
    ChatMessage, Embed, Embeddings, InferenceConfig, PromptFormat, Tool, ToolChoice,
};
use rusty_genius::cortex::{Device, GpuLayers, LlamaEngine, LlamaOptions};
use rusty_genius::facecrab::testing::{GEMMA, MINILM, QWEN};
use rusty_genius::stem::testing::{read_stream, Reply, MIN_MARGIN, SEQUENCE_PROMPTS};
use rusty_genius::{Orchestrator, OrchestratorHandle};
use serde_json::json;

/// How long one request may take. Generous: on Mesa 25's lavapipe with a
/// cold shader cache, the first request waits for the shaders it needs,
/// compiled by LLVM on the CPU (Qwen's test took about 9 minutes on 2
/// cores; see .ci/lavapipe.sh).
const LIMIT: Duration = Duration::from_secs(1800);

/// The backend llama.cpp names for the GPU feature this test is built with.
const BACKEND: &str = if cfg!(feature = "cuda") {
    "CUDA"
} else if cfg!(feature = "vulkan") {
    "Vulkan"
} else {
    "Metal"
};

/// A question whose greedy answer is firm on every CPU (see gemma.rs).
const JAPAN: &str =
    "Question: What is the capital of France?\nAnswer: Paris\nQuestion: What is the capital of Japan?\nAnswer:";

/// Real-model tests share the machine: one at a time.
static ONE_AT_A_TIME: async_std::sync::Mutex<()> = async_std::sync::Mutex::new(());

struct Loaded {
    genius: OrchestratorHandle,
    info: ModelInfo,
}

/// `model` loaded on `device` with `gpu_layers` offloaded.
async fn load(model: &Path, device: Device, gpu_layers: GpuLayers) -> Loaded {
    let options = LlamaOptions {
        context_size: 512,
        parallel: 4,
        device,
        gpu_layers,
        ..LlamaOptions::default()
    };
    let genius = Orchestrator::builder()
        .engine(move || LlamaEngine::new(options.clone()))
        .build()
        .unwrap()
        .start();
    let info = genius.load(&model.display().to_string()).await.unwrap();
    Loaded { genius, info }
}

async fn on_cpu(model: &Path) -> Loaded {
    let cpu = load(model, Device::Cpu, GpuLayers::All).await;
    let placement = &cpu.info.placement;
    assert_eq!(placement.backend, "CPU", "{placement:?}");
    assert_eq!(placement.gpu_layers, 0, "{placement:?}");
    assert!(placement.devices.is_empty(), "{placement:?}");
    cpu
}

/// `model` with every layer on the GPU, which must be found.
async fn on_gpu(model: &Path) -> Loaded {
    let gpu = load(model, Device::Auto, GpuLayers::All).await;
    let placement = &gpu.info.placement;
    eprintln!("{}: {placement}", model.display());
    assert_eq!(placement.backend, BACKEND, "{placement:?}");
    assert!(!placement.devices.is_empty(), "{placement:?}");
    assert!(placement.layers > 1, "{placement:?}");
    assert_eq!(placement.gpu_layers, placement.layers, "{placement:?}");
    gpu
}

fn greedy(max_tokens: usize) -> InferenceConfig {
    InferenceConfig::greedy()
        .with_max_tokens(max_tokens)
        .with_logprobs(2)
}

fn raw(max_tokens: usize) -> InferenceConfig {
    greedy(max_tokens).with_prompt_format(PromptFormat::Raw)
}

async fn ask(genius: &OrchestratorHandle, prompt: &str, config: InferenceConfig) -> Reply {
    let reply = read_stream(genius.infer(prompt, config), LIMIT).await.reply;
    assert!(reply.completed, "{prompt:?}: {}", reply.event_list());
    reply
}

/// The text of the tokens of `reply` up to its first near tie: what any
/// machine's kernels must agree on.
fn firm_prefix(reply: &Reply) -> String {
    reply
        .margins()
        .into_iter()
        .take_while(|(_, margin)| *margin >= MIN_MARGIN)
        .map(|(token, _)| token)
        .collect()
}

/// Generated tokens per second of `reply`.
fn speed(reply: &Reply) -> f64 {
    let usage = reply.usage();
    usage.generated_tokens as f64 / (usage.generation_ms / 1e3).max(1e-9)
}

#[async_std::test]
async fn gemma_answers_on_the_gpu_as_on_the_cpu_alone_in_parallel_and_after_a_cached_prefix() {
    let Some(model) = GEMMA.for_test() else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;

    // On the CPU: four prompts whose 12-token answers are firm here, and a
    // follow-up that extends the first prompt and its answer.
    let cpu = on_cpu(&model).await;
    let mut firm: Vec<(String, Reply)> = Vec::new();
    let mut seen = Vec::new();
    for prompt in std::iter::once(JAPAN).chain(SEQUENCE_PROMPTS) {
        let reply = ask(&cpu.genius, prompt, raw(12)).await;
        let margin = reply.smallest_margin().unwrap_or(f32::INFINITY);
        seen.push((prompt, margin));
        if margin >= MIN_MARGIN {
            firm.push((prompt.to_owned(), reply));
            if firm.len() == 4 {
                break;
            }
        }
    }
    eprintln!("smallest margins on the CPU: {seen:?}");
    assert_eq!(firm.len(), 4, "fewer than four firm prompts: {seen:?}");
    let follow_up = format!("{}{}", firm[0].0, firm[0].1.text);
    let cpu_follow = ask(&cpu.genius, &follow_up, raw(12)).await;
    let expected_follow = firm_prefix(&cpu_follow);
    assert!(
        expected_follow.len() >= 4,
        "the follow-up's answer is firm for only {expected_follow:?}"
    );
    drop(cpu);

    // On the GPU: the four at once, each answering as on the CPU.
    let gpu = on_gpu(&model).await;
    let streams: Vec<_> = firm
        .iter()
        .map(|(prompt, _)| gpu.genius.infer(prompt.as_str(), raw(12)))
        .collect();
    let together = join_all(streams.into_iter().map(|s| read_stream(s, LIMIT))).await;
    for ((prompt, cpu), gpu) in firm.iter().zip(&together) {
        assert!(
            gpu.reply.completed,
            "{prompt:?}: {}",
            gpu.reply.event_list()
        );
        assert_eq!(gpu.reply.text, cpu.text, "{prompt:?}: GPU vs CPU");
    }

    // The follow-up reuses the first prompt's cache on the GPU too.
    let gpu_follow = ask(&gpu.genius, &follow_up, raw(12)).await;
    assert!(
        gpu_follow.text.starts_with(&expected_follow),
        "follow-up: the GPU said {:?}, the CPU firmly {expected_follow:?}",
        gpu_follow.text
    );
    let cached = gpu_follow.usage().cached_tokens;
    let first_prompt = together[0].reply.usage().prompt_tokens;
    assert!(
        cached >= first_prompt,
        "the follow-up reused {cached} tokens; the first prompt alone is {first_prompt}"
    );

    // One request alone, for the speeds.
    let alone = ask(&gpu.genius, &firm[1].0, raw(12)).await;
    assert_eq!(alone.text, firm[1].1.text);
    eprintln!(
        "gemma generation: {:.1} tok/s on the GPU, {:.1} tok/s on the CPU",
        speed(&alone),
        speed(&firm[1].1)
    );
    drop(gpu);

    // Some layers only: the rest stay on the CPU, and the answer holds.
    let part = load(&model, Device::Auto, GpuLayers::Count(6)).await;
    assert_eq!(
        part.info.placement.gpu_layers, 6,
        "{:?}",
        part.info.placement
    );
    let reply = ask(&part.genius, &firm[0].0, raw(12)).await;
    assert_eq!(reply.text, firm[0].1.text, "6 layers on the GPU vs the CPU");
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

#[async_std::test]
async fn qwen_calls_the_same_tool_on_the_gpu_and_answers_the_same() {
    let Some(model) = QWEN.for_test() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let ask_chat =
        |genius: &OrchestratorHandle, messages: Vec<ChatMessage>, config: InferenceConfig| {
            read_stream(genius.chat(messages, config), LIMIT)
        };
    let paris = || vec![ChatMessage::user("What is the weather in Paris?")];
    let japan = || vec![ChatMessage::user("What is the capital of Japan?")];
    let call = greedy(48)
        .with_tools(vec![weather_tool()])
        .with_tool_choice(ToolChoice::Required);

    let cpu = on_cpu(&model).await;
    let cpu_call = ask_chat(&cpu.genius, paris(), call.clone()).await.reply;
    let cpu_answer = ask_chat(&cpu.genius, japan(), greedy(16)).await.reply;
    drop(cpu);
    assert_eq!(cpu_call.tool_calls.len(), 1, "{cpu_call:?}");
    cpu_call.assert_json_firm();
    cpu_answer.assert_contains_firmly("Tokyo");

    let gpu = on_gpu(&model).await;
    let gpu_call = ask_chat(&gpu.genius, paris(), call).await.reply;
    assert_eq!(gpu_call.tool_calls.len(), 1, "{gpu_call:?}");
    let (_, name, arguments) = &gpu_call.tool_calls[0];
    assert_eq!(name, &cpu_call.tool_calls[0].1);
    assert_eq!(arguments, &cpu_call.tool_calls[0].2);
    assert_eq!(arguments, &json!({"city": "Paris"}));
    let gpu_answer = ask_chat(&gpu.genius, japan(), greedy(16)).await.reply;
    let expected = firm_prefix(&cpu_answer);
    assert!(
        gpu_answer.text.starts_with(&expected),
        "the GPU said {:?}, the CPU firmly {expected:?}",
        gpu_answer.text
    );
    eprintln!(
        "qwen generation: {:.1} tok/s on the GPU, {:.1} tok/s on the CPU",
        speed(&gpu_answer),
        speed(&cpu_answer)
    );
}

#[async_std::test]
async fn minilm_embeds_on_the_gpu_as_on_the_cpu() {
    let Some(model) = MINILM.for_test() else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let sentences = [
        "The cat sat on the mat.",
        "A quick brown fox jumps over the lazy dog.",
        "Rust guarantees memory safety without a garbage collector.",
        "The capital of Japan is Tokyo.",
        "Vulkan is a low-overhead graphics and compute API.",
        "It rained all day, so the picnic moved indoors.",
    ];
    let embed = || Embed::new(sentences.map(str::to_owned));
    let cpu = on_cpu(&model).await;
    let expected = cpu.genius.embeddings(embed()).await.unwrap();
    drop(cpu);
    let gpu = on_gpu(&model).await;
    let ours = gpu.genius.embeddings(embed()).await.unwrap();
    assert_eq!(ours.vectors.len(), sentences.len());
    let mut lowest = f32::INFINITY;
    for ((sentence, gpu), cpu) in sentences.iter().zip(&ours.vectors).zip(&expected.vectors) {
        assert_eq!(gpu.len(), cpu.len());
        let cosine = Embeddings::cosine(gpu, cpu);
        assert!(cosine >= 0.999, "{sentence}: cosine {cosine}");
        lowest = lowest.min(cosine);
    }
    eprintln!("lowest cosine, GPU to CPU: {lowest:.6}");
}

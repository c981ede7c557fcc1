//! The command line, as clap reads it, and the exit codes.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rusty_genius::core::Limits;

/// Exit codes scripts can rely on (besides 0 for success and 2 for a
/// command line clap could not parse).
pub(crate) mod exit {
    /// Anything else that failed.
    pub(crate) const FAILED: u8 = 1;
    /// The command line is wrong (as clap says it when it cannot parse it).
    pub(crate) const USAGE: u8 = 2;
    /// The model named is not in the registry, the cache or the Hub.
    pub(crate) const MODEL_NOT_FOUND: u8 = 3;
    /// Fetching the model failed (network, access, checksum, disk).
    pub(crate) const DOWNLOAD_FAILED: u8 = 4;
    /// Ctrl-C ended the command (128 + SIGINT, as shells report it).
    pub(crate) const INTERRUPTED: u8 = 130;
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (the message says why)
  2  the command line is wrong
  3  the model is not found (registry, cache or Hub)
  4  fetching the model failed (network, access, checksum, disk)
130  Ctrl-C ended it";

/// Local models from the shell: pull, run and serve them over the OpenAI API.
///
/// A model is a path to a .gguf file, a registry name (`qwen-2.5-3b-instruct`)
/// or a HuggingFace id (`org/repo`, `org/repo:Q4_K_M`, `org/repo/file.gguf`).
/// Models are cached in `$GENIUS_HOME/hub` (else `$HF_HUB_CACHE`, `$HF_HOME/hub`
/// or the platform's cache folder), shared with other HuggingFace tools.
#[derive(Debug, Parser)]
#[command(name = "genius", version, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// Log more: -v for the libraries' info records, -vv for debug
    /// (RUST_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Download a model into the cache (with a progress bar) and print its path.
    #[command(after_help = EXIT_CODES)]
    Pull {
        /// The model: registry name, HuggingFace id or path.
        model: String,
    },
    /// Answer one prompt, or chat (with history) when no prompt is given.
    #[command(after_help = EXIT_CODES)]
    Run {
        /// The model: registry name, HuggingFace id or path (pulled first if needed).
        model: String,
        /// The prompt; without it, an interactive chat reads lines from stdin
        /// (`/bye` or end of input to quit).
        prompt: Vec<String>,
        /// A system message for the conversation.
        #[arg(long)]
        system: Option<String>,
        /// Sampling temperature; 0 is greedy (always the same answer).
        #[arg(long)]
        temperature: Option<f32>,
        /// The most tokens to generate per answer.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Seed of the sampler, for a reproducible answer.
        #[arg(long)]
        seed: Option<u32>,
        /// Send the prompt exactly as given, without the model's chat template.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        engine: Box<EngineArgs>,
    },
    /// List the models in the cache.
    #[command(alias = "ls", after_help = EXIT_CODES)]
    List,
    /// Remove a model from the cache: `org/repo/file.gguf` as `list` shows
    /// it, or `org/repo` for every file of the repository.
    #[command(alias = "remove", after_help = EXIT_CODES)]
    Rm {
        /// The model as `genius list` shows it.
        model: String,
    },
    /// Serve the OpenAI HTTP API: /v1/chat/completions, /v1/completions,
    /// /v1/responses, /v1/embeddings, /v1/models, /models/load,
    /// /models/unload and /health.
    #[command(after_help = EXIT_CODES)]
    Serve(Box<ServeArgs>),
    /// Show the models a running `genius serve` has loaded.
    Ps {
        /// The server's address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "GENIUS_URL")]
        url: String,
        /// Its API key, if it has one.
        #[arg(long, env = "GENIUS_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on. The default is loopback only; use
    /// 0.0.0.0:8080 to accept other machines (and set an API key).
    #[arg(long, default_value = "127.0.0.1:8080", env = "GENIUS_ADDR")]
    pub(crate) addr: SocketAddr,
    /// Also listen here, where Ollama's clients look by default (e.g.
    /// 127.0.0.1:11434); the same server, API and rules.
    #[arg(long, env = "GENIUS_OLLAMA_ADDR")]
    pub(crate) ollama_addr: Option<SocketAddr>,
    /// A model to serve, loaded at start (and pulled if needed); give it
    /// several times to serve several. Without it, every model already in
    /// the cache is served, each loaded on its first request; nothing is
    /// downloaded on a client's behalf.
    #[arg(long, short)]
    pub(crate) model: Vec<String>,
    /// Another name for a served model, as NAME=MODEL (repeatable): a
    /// client asking for `gpt-4o-mini` gets MODEL.
    #[arg(long = "alias", value_name = "NAME=MODEL", value_parser = parse_alias)]
    pub(crate) aliases: Vec<(String, String)>,
    /// The served model a request naming an unknown model goes to.
    /// Without it, an unknown model is a 404.
    #[arg(long, value_name = "MODEL")]
    pub(crate) default_model: Option<String>,
    /// The most models loaded at once; the least recently used idle one
    /// is unloaded to make room for another.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub(crate) max_models: usize,
    /// The most memory the loaded models may take together, by their
    /// estimates (e.g. 8GB, 512MiB, or bytes). Default: the memory
    /// available when the server starts.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub(crate) memory_budget: Option<u64>,
    /// Require `Authorization: Bearer <KEY>` on every endpoint but /health.
    #[arg(long, env = "GENIUS_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// The largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub(crate) max_body_bytes: usize,
    /// Unload the model after this many idle seconds (0: never). It is
    /// loaded again by the next request.
    #[arg(long, default_value_t = 0)]
    pub(crate) idle_unload: u64,
    /// Without an API key, also answer requests whose Host header is this
    /// name (repeatable). localhost and IP addresses are always accepted;
    /// any other name is refused, so that no web page can reach the
    /// server through DNS rebinding.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub(crate) allowed_hosts: Vec<String>,
    /// Let web pages from this origin call the server from a browser
    /// (repeatable; `localhost` allows the pages of this machine, `*` any
    /// page): their CORS preflight is answered and the responses say they
    /// may read them. Off by default.
    #[arg(long = "cors-origin", value_name = "ORIGIN", value_parser = crate::serve::parse_origin)]
    pub(crate) cors_origins: Vec<String>,
    /// Seconds a client may take to send a request's headers, from their
    /// first byte.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub(crate) header_timeout: u64,
    /// Seconds a client may take to send a request's body.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub(crate) body_timeout: u64,
    /// Seconds a connection may stay open with no request in flight, or
    /// with an answer its client does not read.
    #[arg(long, default_value_t = 75, value_name = "SECS")]
    pub(crate) idle_timeout: u64,
    /// Seconds of silence in a streamed answer (a long prompt being read)
    /// after which a keep-alive comment goes out, so that proxies and
    /// clients with read timeouts hold on.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub(crate) sse_keep_alive: u64,
    /// The most requests that may wait for a place (for their model, or
    /// for room in its batch), across every model; past it a request is
    /// refused at once with a 503 and `Retry-After` (0: no bound).
    #[arg(
        long,
        default_value_t = 512,
        value_name = "N",
        env = "GENIUS_MAX_QUEUE"
    )]
    pub(crate) max_queue: usize,
    /// Serve Prometheus metrics at GET /metrics (behind the API key, if
    /// there is one).
    #[arg(long, env = "GENIUS_METRICS")]
    pub(crate) metrics: bool,
    #[command(flatten)]
    pub(crate) limits: LimitArgs,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
}

fn parse_alias(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, model)) if !name.trim().is_empty() && !model.trim().is_empty() => {
            Ok((name.trim().to_owned(), model.trim().to_owned()))
        }
        _ => Err(format!("`{text}` is not NAME=MODEL")),
    }
}

/// `8GB`, `512MiB`, `1.5G`, `100000`: a number of bytes.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 8GB or 512MiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use B, KB, MB, GB, MiB, GiB)"
            ))
        }
    };
    Ok((number * scale) as u64)
}

/// The most one request may ask for; a request over a limit gets a 400
/// naming it.
#[derive(Debug, Clone, Args)]
pub(crate) struct LimitArgs {
    /// Bytes of a GBNF grammar (response_format grammar).
    #[arg(long, default_value_t = Limits::default().grammar_bytes, value_name = "BYTES")]
    pub(crate) max_grammar_bytes: usize,
    /// Levels of nested parentheses in a grammar.
    #[arg(long, default_value_t = Limits::default().grammar_depth, value_name = "N")]
    pub(crate) max_grammar_depth: usize,
    /// Bytes of all JSON schemas of a request (response_format and tools).
    #[arg(long, default_value_t = Limits::default().schema_bytes, value_name = "BYTES")]
    pub(crate) max_schema_bytes: usize,
    /// Levels of nested JSON objects and arrays in a schema.
    #[arg(long, default_value_t = Limits::default().schema_depth, value_name = "N")]
    pub(crate) max_schema_depth: usize,
    /// Values of one enum in a schema.
    #[arg(long, default_value_t = Limits::default().enum_values, value_name = "N")]
    pub(crate) max_enum_values: usize,
    /// Tools in one request.
    #[arg(long, default_value_t = Limits::default().tools, value_name = "N")]
    pub(crate) max_tools: usize,
    /// Stop sequences of one request.
    #[arg(long, default_value_t = Limits::default().stop_sequences, value_name = "N")]
    pub(crate) max_stop: usize,
    /// Texts in one embeddings request.
    #[arg(long, default_value_t = Limits::default().embed_inputs, value_name = "N")]
    pub(crate) max_embed_inputs: usize,
    /// Tokens of all texts of one embeddings request.
    #[arg(long, default_value_t = Limits::default().embed_tokens, value_name = "N")]
    pub(crate) max_embed_tokens: usize,
}

impl LimitArgs {
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            grammar_bytes: self.max_grammar_bytes,
            grammar_depth: self.max_grammar_depth,
            schema_bytes: self.max_schema_bytes,
            schema_depth: self.max_schema_depth,
            enum_values: self.max_enum_values,
            tools: self.max_tools,
            stop_sequences: self.max_stop,
            embed_inputs: self.max_embed_inputs,
            embed_tokens: self.max_embed_tokens,
            ..Limits::default()
        }
    }
}

/// The engine's settings (the `GENIUS_*` variables give the defaults).
#[derive(Debug, Clone, Args)]
pub(crate) struct EngineArgs {
    /// Requests decoded together; more wait their turn (GENIUS_PARALLEL, default 4).
    #[arg(long)]
    pub(crate) parallel: Option<u32>,
    /// Context window of each request in tokens (GENIUS_CONTEXT_SIZE, default 4096).
    #[arg(long)]
    pub(crate) ctx_size: Option<u32>,
    /// CPU threads (GENIUS_THREADS, default: every core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Layers offloaded to the GPU in a GPU build: `all` or a number
    /// (GENIUS_GPU_LAYERS, default all).
    #[arg(long, value_name = "all|N")]
    pub(crate) gpu_layers: Option<String>,
    /// Where offloaded layers go: `auto` (any GPU, else the CPU), `cpu`,
    /// or device names such as `Vulkan0`, comma-separated (GENIUS_DEVICE,
    /// default auto).
    #[arg(long, value_name = "auto|cpu|NAME")]
    pub(crate) device: Option<String>,
    /// MiB of RAM for the caches of slots another conversation took, so
    /// the conversation decodes only its new tokens when it comes back
    /// (GENIUS_CACHE_RAM_MIB, default 2048; 0 keeps none).
    #[arg(long, value_name = "MIB")]
    pub(crate) cache_ram: Option<u64>,
    /// Folder of the KV snapshots saved as a model leaves memory and read
    /// back by later requests, even after a restart (GENIUS_KV_DIR, default
    /// $GENIUS_HOME/kv or the platform cache folder's rusty-genius/kv).
    #[arg(long, value_name = "DIR", conflicts_with = "no_kv_snapshots")]
    pub(crate) kv_dir: Option<std::path::PathBuf>,
    /// MiB the KV snapshots may take on disk; the least recently used go
    /// first (GENIUS_KV_DISK_MIB, default 8192).
    #[arg(long, value_name = "MIB")]
    pub(crate) kv_disk: Option<u64>,
    /// Save no KV snapshots and read none (GENIUS_KV_DIR=off).
    #[arg(long)]
    pub(crate) no_kv_snapshots: bool,
    /// Speculative decoding: `auto` guesses tokens ahead from each
    /// request's own text and its `prediction` and checks them in one
    /// step (same answers, faster where the answer repeats text); `off`
    /// decodes one token per step (GENIUS_SPECULATIVE, default auto).
    #[arg(long, value_enum, value_name = "auto|off")]
    pub(crate) speculative: Option<SpeculativeArg>,
    /// A smaller model of the same family that guesses ahead for the
    /// models served (a GGUF path), or, as MODEL=PATH, for that model
    /// only; loaded beside it. A model whose tokens it does not share
    /// refuses its requests with a 400 naming both (GENIUS_DRAFT_MODEL).
    #[arg(long, value_name = "[MODEL=]PATH")]
    pub(crate) draft_model: Option<String>,
    /// The engine: llama.cpp, or the Pinky stub (for testing clients
    /// without a model: it answers "Narf! You said: ...").
    #[arg(long, value_enum, default_value_t = EngineKind::Llama, hide = true)]
    pub(crate) engine: EngineKind,
    /// Pinky's delay per token, in milliseconds.
    #[arg(long, default_value_t = 0, hide = true)]
    pub(crate) pinky_token_ms: u64,
    /// Pinky's delay per model load, in milliseconds.
    #[arg(long, default_value_t = 0, hide = true)]
    pub(crate) pinky_load_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SpeculativeArg {
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum EngineKind {
    Llama,
    Pinky,
}

//! What each subcommand does.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rusty_genius::core::protocol::{AssetEvent, BrainstemOutput, InferenceEvent};
use rusty_genius::core::{
    ChatMessage, ErrorKind, ErrorReport, InferenceConfig, Limits, PromptFormat,
};
use rusty_genius::cortex::Pinky;
use rusty_genius::facecrab::{AssetAuthority, FacecrabError};
use rusty_genius::stem::Residency;
use rusty_genius::{CortexStrategy, Orchestrator, OrchestratorHandle, RequestStream};
use tokio::io::AsyncBufReadExt;

use crate::args::{exit, Command, EngineArgs, EngineKind, ServeArgs};
use crate::http::Timeouts;
use crate::serve::{self, CorsOrigins, ServeSettings};

/// Why a command failed, and its exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Ctrl-C ended the command; nothing more to say.
    fn interrupted() -> Self {
        Self::new(exit::INTERRUPTED, "")
    }
}

impl From<FacecrabError> for Failure {
    fn from(err: FacecrabError) -> Self {
        let code = match err {
            FacecrabError::InvalidName { .. }
            | FacecrabError::NotFound { .. }
            | FacecrabError::MissingFile { .. }
            | FacecrabError::NoSingleFile { .. }
            | FacecrabError::NotCached { .. } => exit::MODEL_NOT_FOUND,
            FacecrabError::Network { .. }
            | FacecrabError::Unauthorized { .. }
            | FacecrabError::ChecksumMismatch { .. }
            | FacecrabError::CommitMismatch { .. }
            | FacecrabError::PinMismatch { .. } => exit::DOWNLOAD_FAILED,
            _ => exit::FAILED,
        };
        Self::new(code, err.to_string())
    }
}

impl From<ErrorReport> for Failure {
    fn from(err: ErrorReport) -> Self {
        let code = match err.kind {
            ErrorKind::ModelNotFound => exit::MODEL_NOT_FOUND,
            ErrorKind::Asset => exit::DOWNLOAD_FAILED,
            _ => exit::FAILED,
        };
        Self::new(code, err.message)
    }
}

pub(crate) async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Pull { model } => pull(&model).await,
        Command::Run {
            model,
            prompt,
            system,
            temperature,
            max_tokens,
            seed,
            raw,
            engine,
        } => {
            let mut config = InferenceConfig::default();
            if let Some(temperature) = temperature {
                config = if temperature == 0.0 {
                    InferenceConfig::greedy()
                } else {
                    config.with_temperature(temperature)
                };
            }
            config.max_tokens = max_tokens;
            config.seed = seed;
            if raw {
                config.prompt_format = PromptFormat::Raw;
            }
            config
                .validate()
                .map_err(|err| Failure::new(exit::FAILED, err.to_string()))?;
            run_model(&model, prompt, system, config, &engine).await
        }
        Command::List => list(),
        Command::Rm { model } => remove(&model),
        Command::Serve(args) => serve_command(*args).await,
        Command::Ps { url, api_key } => ps(&url, api_key.as_deref()).await,
    }
}

fn authority() -> Result<AssetAuthority, Failure> {
    Ok(AssetAuthority::new()?)
}

fn progress_bar() -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec} {eta}",
        )
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    bar
}

async fn pull(model: &str) -> Result<(), Failure> {
    let path = fetch(model).await?;
    println!("{}", path.display());
    Ok(())
}

/// Resolves `model` to a local file, downloading it with a progress bar.
async fn fetch(model: &str) -> Result<std::path::PathBuf, Failure> {
    let authority = authority()?;
    let bar = progress_bar();
    bar.set_message(model.to_owned());
    let mut show = |event| {
        if let AssetEvent::Progress(done, total) = event {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let path = authority.ensure_model_with(model, &mut show).await;
    bar.finish_and_clear();
    Ok(path?)
}

/// `genius ps`: what a running server has loaded, from its `/v1/models`.
async fn ps(url: &str, api_key: Option<&str>) -> Result<(), Failure> {
    let body = http_get(url, "/v1/models", api_key)
        .await
        .map_err(|err| Failure::new(exit::FAILED, format!("cannot ask {url}: {err}")))?;
    let list: serde_json::Value = serde_json::from_slice(&body).map_err(|err| {
        Failure::new(
            exit::FAILED,
            format!("{url} did not answer with a model list: {err}"),
        )
    })?;
    let models = list["data"].as_array().cloned().unwrap_or_default();
    let active: Vec<&serde_json::Value> = models
        .iter()
        .filter(|m| m["status"]["value"] != "unloaded")
        .collect();
    if active.is_empty() {
        println!("no model is loaded ({} served)", models.len());
        return Ok(());
    }
    println!(
        "{:<48} {:>8} {:>9} {:>8} {:>8} {:>7} {:>8}",
        "MODEL", "STATE", "SIZE", "CONTEXT", "PARALLEL", "RUNNING", "IDLE"
    );
    for model in active {
        let resident = &model["resident"];
        let number = |field: &str| {
            resident[field]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |n| n.to_string())
        };
        let size = resident["memory_bytes"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |b| format!("{:.2} GB", b as f64 / 1e9));
        let idle = resident["idle_seconds"]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"));
        let kind = if model["embeds"] == true {
            " (embeds)"
        } else {
            ""
        };
        println!(
            "{:<48} {:>8} {:>9} {:>8} {:>8} {:>7} {:>8}",
            format!("{}{kind}", model["id"].as_str().unwrap_or("?")),
            model["status"]["value"].as_str().unwrap_or("?"),
            size,
            number("context"),
            number("parallel"),
            number("running"),
            idle
        );
    }
    Ok(())
}

/// The body of `GET <base><path>` over plain HTTP/1.1 (a local server).
async fn http_get(base: &str, path: &str, api_key: Option<&str>) -> Result<Vec<u8>, String> {
    use axum::body::Body;
    use http_body_util::BodyExt;
    let uri: axum::http::Uri = format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .map_err(|err| format!("not a URL: {err}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// URLs are supported".into());
    }
    let host = uri.host().ok_or("the URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "timed out connecting".to_owned())?
    .map_err(|err| err.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|err| err.to_string())?;
    tokio::spawn(connection);
    let mut request = axum::http::Request::get(uri.path()).header("host", format!("{host}:{port}"));
    if let Some(key) = api_key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let request = request.body(Body::empty()).map_err(|err| err.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .map_err(|_| "no answer within 30 s".to_owned())?
        .map_err(|err| err.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| err.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(body.to_vec())
}

fn list() -> Result<(), Failure> {
    let models = authority()?.cached_models()?;
    if models.is_empty() {
        eprintln!("no models in the cache yet: `genius pull <model>` fetches one");
        return Ok(());
    }
    let name = |m: &rusty_genius::facecrab::CachedModel| format!("{}/{}", m.repo, m.file);
    let width = models
        .iter()
        .map(|m| name(m).len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{:width$}  {:>10}  {:12}  PATH", "NAME", "SIZE", "COMMIT");
    for model in &models {
        println!(
            "{:width$}  {:>10}  {:12}  {}",
            name(model),
            human_size(model.size),
            &model.commit[..model.commit.len().min(12)],
            model.path.display()
        );
    }
    Ok(())
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1000.0 && unit + 1 < UNITS.len() {
        size /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{size:.1} {}", UNITS[unit])
    }
}

fn remove(model: &str) -> Result<(), Failure> {
    let authority = authority()?;
    let cached = authority.cached_models()?;
    let matching: Vec<_> = cached
        .iter()
        .filter(|m| format!("{}/{}", m.repo, m.file) == model)
        .collect();
    if !matching.is_empty() {
        let mut freed = 0;
        for m in matching {
            freed += authority.remove_model(m)?;
        }
        eprintln!("removed {model} ({} freed)", human_size(freed));
        return Ok(());
    }
    if cached.iter().any(|m| m.repo == model) && authority.remove_repo(model)? {
        eprintln!("removed every file of {model}");
        return Ok(());
    }
    Err(Failure::new(
        exit::MODEL_NOT_FOUND,
        format!("`{model}` is not in the cache; `genius list` shows what is"),
    ))
}

/// The default residency policy, found off the executor: it asks
/// llama.cpp for the GPUs' memory, which loads its backends.
async fn residency_default() -> Result<Residency, Failure> {
    tokio::task::spawn_blocking(Residency::default)
        .await
        .map_err(|err| Failure::new(exit::FAILED, err.to_string()))
}

/// An Orchestrator with the engine the arguments choose.
fn orchestrator(
    engine: &EngineArgs,
    strategy: CortexStrategy,
    limits: Limits,
    residency: Residency,
    max_queue: Option<usize>,
) -> Result<OrchestratorHandle, Failure> {
    let mut builder = Orchestrator::builder()
        .strategy(strategy)
        .limits(limits)
        .residency(residency)
        .asset_authority(authority()?);
    if let Some(limit) = max_queue {
        builder = builder.max_queue(limit);
    }
    let builder = match engine.engine {
        EngineKind::Pinky => builder.pinky(
            Pinky::new()
                .with_capacity(engine.parallel.unwrap_or(PINKY_PARALLEL) as usize)
                .with_token_delay(Duration::from_millis(engine.pinky_token_ms))
                .with_load_delay(Duration::from_millis(engine.pinky_load_ms)),
        ),
        EngineKind::Llama => llama(builder, engine)?,
    };
    let genius = builder
        .build()
        .map_err(|err| Failure::new(exit::FAILED, err.to_string()))?;
    Ok(genius.start())
}

/// How many requests the engine answers at once.
fn parallel(engine: &EngineArgs) -> usize {
    let default = match engine.engine {
        EngineKind::Pinky => PINKY_PARALLEL,
        EngineKind::Llama => llama_parallel(),
    };
    engine.parallel.map_or(default, |parallel| parallel.max(1)) as usize
}

/// The requests Pinky answers at once unless told.
const PINKY_PARALLEL: u32 = 4;

#[cfg(feature = "llama")]
fn llama_parallel() -> u32 {
    rusty_genius::cortex::LlamaOptions::from_env()
        .parallel
        .max(1)
}

#[cfg(not(feature = "llama"))]
fn llama_parallel() -> u32 {
    1
}

#[cfg(feature = "llama")]
fn llama(
    builder: rusty_genius::stem::OrchestratorBuilder,
    engine: &EngineArgs,
) -> Result<rusty_genius::stem::OrchestratorBuilder, Failure> {
    use rusty_genius::cortex::LlamaEngine;
    let options = llama_options(engine)?;
    let sized = options.clone();
    Ok(builder
        .footprint(move |path| sized.footprint(path))
        .engine(move || LlamaEngine::new(options.clone())))
}

/// The free memory of the GPUs the engine offloads to, as the arguments
/// choose; `None` when it offloads nothing.
#[cfg(feature = "llama")]
fn device_memory(engine: &EngineArgs) -> Result<Option<u64>, Failure> {
    Ok(match engine.engine {
        EngineKind::Pinky => None,
        EngineKind::Llama => llama_options(engine)?.device_memory(),
    })
}

#[cfg(not(feature = "llama"))]
fn device_memory(_engine: &EngineArgs) -> Result<Option<u64>, Failure> {
    Ok(None)
}

/// The llama.cpp engine's options: the environment's, overridden by the
/// arguments.
#[cfg(feature = "llama")]
fn llama_options(engine: &EngineArgs) -> Result<rusty_genius::cortex::LlamaOptions, Failure> {
    let mut options = rusty_genius::cortex::LlamaOptions::from_env();
    if let Some(parallel) = engine.parallel {
        options.parallel = parallel.max(1);
    }
    if let Some(context) = engine.ctx_size {
        options.context_size = context.max(1);
    }
    if let Some(threads) = engine.threads {
        options.threads = threads.max(1);
    }
    if let Some(layers) = &engine.gpu_layers {
        options.gpu_layers = layers
            .parse()
            .map_err(|err| Failure::new(exit::USAGE, format!("--gpu-layers: {err}")))?;
    }
    if let Some(device) = &engine.device {
        options.device = device
            .parse()
            .map_err(|err| Failure::new(exit::USAGE, format!("--device: {err}")))?;
    }
    if let Some(mib) = engine.cache_ram {
        options.cache_ram = mib.saturating_mul(1 << 20);
    }
    if let Some(dir) = &engine.kv_dir {
        options.snapshot_dir = Some(dir.clone());
    }
    if engine.no_kv_snapshots {
        options.snapshot_dir = None;
    }
    if let Some(mib) = engine.kv_disk {
        options.snapshot_budget = mib.saturating_mul(1 << 20);
    }
    if let Some(speculative) = engine.speculative {
        options.speculative = speculative == crate::args::SpeculativeArg::Auto;
    }
    if let Some(draft) = &engine.draft_model {
        let draft: rusty_genius::cortex::DraftChoice = draft
            .parse()
            .map_err(|err| Failure::new(exit::USAGE, format!("--draft-model: {err}")))?;
        if !draft.path.is_file() {
            return Err(Failure::new(
                exit::USAGE,
                format!("--draft-model: {} is not a file", draft.path.display()),
            ));
        }
        options.draft_model = Some(draft);
    }
    Ok(options)
}

#[cfg(not(feature = "llama"))]
fn llama(
    _builder: rusty_genius::stem::OrchestratorBuilder,
    _engine: &EngineArgs,
) -> Result<rusty_genius::stem::OrchestratorBuilder, Failure> {
    Err(Failure::new(
        exit::FAILED,
        "this genius was built without the llama feature; only `--engine pinky` is available",
    ))
}

/// Loads `model`, showing download progress.
async fn load(genius: &OrchestratorHandle, model: &str) -> Result<(), Failure> {
    let bar = progress_bar();
    bar.set_message(model.to_owned());
    let events = genius.events();
    let progress = {
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                if let BrainstemOutput::Asset(AssetEvent::Progress(done, total)) = event {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            }
        })
    };
    let loaded = genius.load(model).await;
    progress.abort();
    bar.finish_and_clear();
    loaded?;
    Ok(())
}

async fn run_model(
    model: &str,
    prompt: Vec<String>,
    system: Option<String>,
    config: InferenceConfig,
    engine: &EngineArgs,
) -> Result<(), Failure> {
    let genius = orchestrator(
        engine,
        CortexStrategy::KeepAlive,
        Limits::default(),
        residency_default().await?,
        None,
    )?;
    let mut interrupts = Interrupts::listen();
    let loaded = tokio::select! {
        loaded = load(&genius, model) => loaded,
        () = interrupts.next() => Err(Failure::interrupted()),
    };
    let result = match loaded {
        Ok(()) => answer(&genius, prompt, system, config, &mut interrupts).await,
        Err(failure) => Err(failure),
    };
    // Whatever ended the command, the engine stops cleanly: the answer is
    // cancelled and the model unloads. A second Ctrl-C meanwhile exits
    // at once.
    interrupts.leaving();
    genius.shutdown();
    genius.stopped().await;
    result
}

/// Answers the prompt, or chats on stdin when there is none.
async fn answer(
    genius: &OrchestratorHandle,
    prompt: Vec<String>,
    system: Option<String>,
    config: InferenceConfig,
    interrupts: &mut Interrupts,
) -> Result<(), Failure> {
    if prompt.is_empty() {
        return chat(genius, system, config, interrupts).await;
    }
    let prompt = prompt.join(" ");
    let stream = match system {
        Some(system) if config.prompt_format == PromptFormat::Auto => genius.chat(
            vec![ChatMessage::system(system), ChatMessage::user(prompt)],
            config,
        ),
        _ => genius.infer(prompt, config),
    };
    match print_answer(stream, interrupts).await? {
        (_, Printed::Whole | Printed::OutputClosed) => Ok(()),
        (_, Printed::Interrupted) => Err(Failure::interrupted()),
    }
}

/// How printing an answer ended.
enum Printed {
    /// The answer is all out.
    Whole,
    /// Ctrl-C stopped it (and cancelled the request).
    Interrupted,
    /// Standard output was closed (`genius run … | head`): the request
    /// was cancelled, nobody reads the rest.
    OutputClosed,
}

/// Prints an answer as it streams; returns its text and how it ended.
async fn print_answer(
    mut stream: RequestStream,
    interrupts: &mut Interrupts,
) -> Result<(String, Printed), Failure> {
    let mut stdout = std::io::stdout();
    let mut answer = String::new();
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            () = interrupts.next() => {
                // The stream is dropped on return, which cancels it.
                let _ = writeln!(stdout);
                return Ok((answer, Printed::Interrupted));
            }
        };
        let Some(event) = event else { break };
        let written = match event? {
            InferenceEvent::Content(text) => {
                answer.push_str(&text);
                write!(stdout, "{text}").and_then(|()| stdout.flush())
            }
            InferenceEvent::ToolCall {
                name, arguments, ..
            } => writeln!(stdout, "[tool call] {name}({arguments})"),
            InferenceEvent::Complete => break,
            _ => Ok(()),
        };
        if written.is_err() {
            return Ok((answer, Printed::OutputClosed));
        }
    }
    if writeln!(stdout).is_err() {
        return Ok((answer, Printed::OutputClosed));
    }
    Ok((answer, Printed::Whole))
}

/// A conversation on stdin and stdout, with its history. Ctrl-C stops an
/// answer and the chat goes on; at the prompt it ends the chat.
async fn chat(
    genius: &OrchestratorHandle,
    system: Option<String>,
    config: InferenceConfig,
    interrupts: &mut Interrupts,
) -> Result<(), Failure> {
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "Chatting; /bye or Ctrl-D ends it, /clear forgets the history, Ctrl-C stops an answer."
        );
    }
    let mut history: Vec<ChatMessage> = system.iter().map(ChatMessage::system).collect();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        if interactive {
            eprint!(">>> ");
        }
        let line = tokio::select! {
            line = lines.next_line() => line,
            () = interrupts.next() => {
                eprintln!();
                return Err(Failure::interrupted());
            }
        };
        let Some(line) =
            line.map_err(|err| Failure::new(exit::FAILED, format!("cannot read stdin: {err}")))?
        else {
            break;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/bye" | "/exit" | "/quit" => break,
            "/clear" => {
                history.retain(|m| m.role == rusty_genius::core::chat::Role::System);
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::user(line));
        let stream = genius.chat(history.clone(), config.clone());
        match print_answer(stream, interrupts).await {
            Ok((answer, Printed::Whole)) => history.push(ChatMessage::assistant(answer)),
            Ok((_, Printed::OutputClosed)) => break,
            Ok((_, Printed::Interrupted)) => {
                // A stopped turn is forgotten.
                history.pop();
            }
            Err(failure) => {
                // A bad turn is reported and forgotten; the chat goes on.
                eprintln!("error: {}", failure.message);
                history.pop();
            }
        }
    }
    Ok(())
}

/// Ctrl-C, as `genius run` hears it: each one is handled once by whoever
/// waits for it (the load, the answer, the chat's prompt). Once the
/// command is leaving, another one exits at once.
struct Interrupts {
    heard: tokio::sync::watch::Receiver<u64>,
    handled: u64,
    leaving: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Interrupts {
    /// Takes Ctrl-C over from the default (which ends the process at once)
    /// for the rest of the command.
    fn listen() -> Self {
        let (tell, heard) = tokio::sync::watch::channel(0);
        let leaving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let force = leaving.clone();
        tokio::spawn(async move {
            let mut count = 0;
            while tokio::signal::ctrl_c().await.is_ok() {
                if force.load(std::sync::atomic::Ordering::Acquire) {
                    // The engines stop at a safe point as the process
                    // exits.
                    std::process::exit(exit::INTERRUPTED.into());
                }
                count += 1;
                if tell.send(count).is_err() {
                    break;
                }
            }
        });
        Self {
            heard,
            handled: 0,
            leaving,
        }
    }

    /// Completes at the next Ctrl-C not yet handled.
    async fn next(&mut self) {
        loop {
            let heard = *self.heard.borrow_and_update();
            if heard > self.handled {
                self.handled = heard;
                return;
            }
            if self.heard.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The command is ending: a Ctrl-C from now on exits at once.
    fn leaving(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

async fn serve_command(args: ServeArgs) -> Result<(), Failure> {
    let strategy = match args.idle_unload {
        0 => CortexStrategy::KeepAlive,
        seconds => CortexStrategy::HibernateAfter(Duration::from_secs(seconds)),
    };
    for model in &args.model {
        // Fetch before serving, with progress, so that a missing model is
        // an exit code rather than a server that answers 500s.
        let path = fetch(model).await?;
        log::info!("{model} is at {}", path.display());
    }
    let mut residency = residency_default()
        .await?
        .with_max_models(args.max_models.max(1));
    if let Some(budget) = args.memory_budget {
        residency = residency.with_memory_budget(budget);
    }
    let engine = args.engine.clone();
    let device = tokio::task::spawn_blocking(move || device_memory(&engine))
        .await
        .map_err(|err| Failure::new(exit::FAILED, err.to_string()))??;
    residency = residency.with_device_budget(device.unwrap_or(u64::MAX));
    log::info!(
        "at most {} models at once, in {:.1} GB{}",
        residency.max_models,
        residency.memory_budget as f64 / 1e9,
        if residency.device_budget == u64::MAX {
            String::new()
        } else {
            format!(
                " and {:.1} GB of GPU memory",
                residency.device_budget as f64 / 1e9
            )
        }
    );
    let max_queue = (args.max_queue > 0).then_some(args.max_queue);
    let genius = orchestrator(
        &args.engine,
        strategy,
        args.limits.limits(),
        residency,
        max_queue,
    )?;
    let settings = ServeSettings {
        addr: args.addr,
        ollama_addr: args.ollama_addr,
        models: args.model,
        aliases: args.aliases,
        default_model: args.default_model,
        api_key: args.api_key.filter(|key| !key.is_empty()),
        max_body_bytes: args.max_body_bytes,
        allowed_hosts: args.allowed_hosts,
        cors: CorsOrigins::new(args.cors_origins),
        timeouts: Timeouts {
            header: Duration::from_secs(args.header_timeout.max(1)),
            body: Duration::from_secs(args.body_timeout.max(1)),
            idle: Duration::from_secs(args.idle_timeout.max(1)),
        },
        max_choices: parallel(&args.engine),
        sse_keep_alive: Duration::from_secs(args.sse_keep_alive.max(1)),
        metrics: args.metrics,
    };
    if settings.api_key.is_none() && settings.cors.any() {
        log::warn!("--cors-origin * without an API key: any web page a user of this machine opens can use the server");
    }
    let exposed = std::iter::once(settings.addr)
        .chain(settings.ollama_addr)
        .find(|addr| !addr.ip().is_loopback());
    if let (None, Some(exposed)) = (&settings.api_key, exposed) {
        log::warn!(
            "serving on {exposed} without an API key: anyone who can reach it can use it (--api-key)"
        );
    }
    serve::serve(genius, authority()?, settings)
        .await
        .map_err(|message| Failure::new(exit::FAILED, message))
}

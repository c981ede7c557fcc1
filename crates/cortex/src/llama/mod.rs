//! The llama.cpp engine, on the `llama-cpp-2` bindings.
//!
//! A loaded model has one context with a sequence per slot (`parallel`,
//! default 4). The KV cache is split per slot (`kv_unified` off): each
//! slot holds the whole `context_size`, so no request takes another's
//! room. Each step (`step.rs`) carries out the plan of `crate::plan`: the
//! next token of every answering request, then prompt chunks of new ones
//! in the room and time left; one decode; then every request with
//! fresh logits chooses its token with its own sampler chain, grammar,
//! stop sequences and limits. A failed decode ends only the requests in
//! its batch and clears their slots.
//!
//! A slot keeps the tokens its KV cache holds across requests
//! (`slot.rs`); a new request takes the free slot sharing the longest
//! prefix, and the logits after the slot's last prompt, so the same
//! prompt again decodes nothing and samples from exactly what it did the
//! first time. After an answer the slot remembers the transcript, so the
//! next turn of a conversation splices onto the very tokens the model
//! generated. A request whose prompt a running request holds (or is
//! decoding), whole or for a long prefix, waits for that cache and copies
//! it into its own sequence: the choices of one request, or requests sent
//! together with one system prompt, decode the shared part once. Prompts
//! go through the model's chat template (`prompt.rs`), and grammars are
//! built before any decoding (`sampling.rs`), so a bad one costs nothing.
//! Embeddings run in a second context made on first use (`embed.rs`), one
//! batch per step after the generating batch, so a long embedding takes
//! turns with the chats. The model and its contexts, which borrow it, are one
//! `self_cell`, so no hand-written `unsafe` ties their lifetimes.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use rusty_genius_core::manifest::{ModelInfo, Placement};
use rusty_genius_core::protocol::{FinishReason, Usage};
use rusty_genius_core::{GeniusError, InferenceConfig, Pooling, Prompt, Speculative};

use crate::cores::{Cores, Seat};
use crate::draft::{Drafter, ModelRoom};
use crate::engine::{check_gguf, Engine, Refused, Request, Step};

mod backend;
mod draft_model;
mod embed;
mod options;
mod prompt;
mod sampling;
mod saved;
mod slot;
mod snapshot;
mod step;
mod threads;

pub use backend::llama_backend;
pub use options::{Device, DraftChoice, GpuLayers, LlamaOptions};

use prompt::Prompter;
use slot::{Job, Slot};
use threads::{Control, Stops};

/// The llama.cpp contexts of one model: the one requests generate in, and
/// the one texts are embedded in (made on first use, with its pooling).
struct Contexts<'model> {
    main: LlamaContext<'model>,
    /// The main context's threads and abort callback.
    control: Option<Control>,
    embed: Option<(Pooling, LlamaContext<'model>, Option<Control>)>,
}

self_cell::self_cell!(
    /// A model and the llama.cpp contexts that borrow it. The contexts are
    /// dropped before the model, and the model never moves while borrowed.
    struct ModelContext {
        owner: LlamaModel,
        #[covariant]
        dependent: Contexts,
    }
);

/// A loaded model, its context, and one slot per sequence of the context.
struct Loaded {
    name: String,
    cell: ModelContext,
    batch: LlamaBatch<'static>,
    /// How prompts become tokens for this model.
    prompter: Prompter,
    slots: Vec<Slot>,
    /// The context each request may use, in tokens.
    slot_context: usize,
    /// The attention window of the model's sliding-window layers, 0 if it
    /// has none: their cache keeps only so many positions back.
    window: usize,
    /// The most tokens one step decodes.
    batch_size: usize,
    /// The pooling the model declares: an embedding model, which embeds
    /// and does not generate.
    declared_pooling: Option<Pooling>,
    /// The embedding context's sizes.
    embed_shape: embed::Shape,
    embed_batch: LlamaBatch<'static>,
    /// `Embed` requests waiting for the next step.
    embed_jobs: VecDeque<embed::EmbedJob>,
    threads: i32,
    /// What steps have cost lately (moving averages; they grow with the
    /// depth of the context).
    costs: step::Costs,
    /// Slot caches another prompt took the slot from.
    ram: saved::RamTier,
    /// Whether requests may guess ahead (`LlamaOptions::speculative`).
    speculative: bool,
    /// The model that guesses ahead for this one, if there is one.
    draft: Option<draft_model::DraftModel>,
    /// Snapshots on disk, if they are on.
    disk: Option<saved::Disk>,
    /// Whether a sequence copy waits for the next decode (llama.cpp moves
    /// the data then): until it has, no cache is copied out or read in.
    copies_pending: bool,
    /// Steps taken and saved caches read back (the counters of
    /// [`EngineStats`](rusty_genius_core::metrics::EngineStats)).
    counts: rusty_genius_core::metrics::EngineStats,
    /// What may stop a step early (the contexts' abort callback reads it;
    /// dropped after `cell`, whose contexts it outlives).
    stops: Arc<Stops>,
}

impl Loaded {
    fn new(
        name: &str,
        path: &Path,
        model: LlamaModel,
        options: &LlamaOptions,
        placement: &Placement,
        stops: &Arc<Stops>,
    ) -> Result<Self, GeniusError> {
        let backend = llama_backend()?;
        let parallel = options.parallel.max(1);
        let per_request = options.context_size.min(model.n_ctx_train().max(1));
        let n_ctx = per_request.saturating_mul(parallel);
        let threads = i32::try_from(options.threads).unwrap_or(i32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(options.batch_size)
            .with_n_ubatch(options.batch_size)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            // One sequence per request, each with its own part of the KV
            // cache: a request never takes another's room.
            .with_n_seq_max(parallel)
            .with_kv_unified(false)
            // Sliding-window layers (Gemma 2 and 3, for instance) keep only
            // their window and one batch, as llama-server does: a full
            // cache for them costs prefill speed (their attention would
            // span the whole context) and memory. A cached prefix is then
            // reused only while the window before its end is still held
            // (`Loaded::can_keep`).
            .with_swa_full(false);
        let cell = ModelContext::try_new(model, |model| {
            model.new_context(backend, params).map(|main| {
                let control = Control::of(&main, model, threads, stops);
                if control.is_none() {
                    log::warn!(
                        "cannot set llama.cpp's threads per step with this llama-cpp-2: every step of {name} uses {threads} threads, even beside other models"
                    );
                }
                Contexts {
                    main,
                    control,
                    embed: None,
                }
            })
        })
            .map_err(|err| {
                GeniusError::engine_from(
                    format!(
                        "cannot create a context of {per_request} tokens for each of {parallel} requests (try a smaller GENIUS_CONTEXT_SIZE or GENIUS_PARALLEL)"
                    ),
                    err,
                )
            })?;
        let prompter = Prompter::of(cell.borrow_owner());
        let window = threads::sliding_window(cell.borrow_owner());
        let slot_context = cell.borrow_dependent().main.n_ctx() as usize / parallel as usize;
        let declared_pooling = embed::declared_pooling(cell.borrow_owner());
        let embed_shape = embed::Shape::new(
            (options
                .context_size
                .min(cell.borrow_owner().n_ctx_train().max(1))) as usize,
            options.batch_size as usize,
            declared_pooling.is_some(),
        );
        let slots = (0..parallel as i32)
            .map(|seq| Slot {
                seq,
                cached: Vec::new(),
                transcript: None,
                prompt_logits: None,
                job: None,
            })
            .collect();
        Ok(Self {
            name: name.to_owned(),
            cell,
            batch: LlamaBatch::new(options.batch_size as usize, 1),
            prompter,
            slots,
            slot_context,
            window,
            batch_size: options.batch_size as usize,
            declared_pooling,
            embed_batch: LlamaBatch::new(embed_shape.batch, 1),
            embed_shape,
            embed_jobs: VecDeque::new(),
            threads,
            costs: step::Costs::default(),
            ram: saved::RamTier::new(usize::try_from(options.cache_ram).unwrap_or(usize::MAX)),
            speculative: options.speculative,
            draft: None,
            disk: None,
            copies_pending: false,
            counts: rusty_genius_core::metrics::EngineStats::default(),
            stops: stops.clone(),
        }
        .with_disk(path, options, placement))
    }

    /// Answers a question about the model's tokens or template, as
    /// llama.cpp's server does at `/tokenize`, `/detokenize` and
    /// `/apply-template`.
    fn tokens(
        &self,
        query: &rusty_genius_core::tokens::TokenQuery,
        config: &InferenceConfig,
    ) -> Result<rusty_genius_core::tokens::TokenAnswer, GeniusError> {
        use rusty_genius_core::tokens::{TextOrToken, TokenAnswer, TokenPiece, TokenQuery};
        let model = self.model();
        let vocab = model.vocab();
        let n_vocab = u32::try_from(model.n_vocab()).unwrap_or(0);
        let known = |id: u32, field: &str| {
            if id < n_vocab {
                Ok(LlamaToken(id as i32))
            } else {
                Err(GeniusError::invalid_request(
                    field,
                    format!(
                        "token {id} is not in the vocabulary of {} (ids 0 to {})",
                        self.name,
                        n_vocab.saturating_sub(1)
                    ),
                ))
            }
        };
        let piece = |token: LlamaToken| vocab.token_to_piece(token, true, None);
        match query {
            TokenQuery::Tokenize {
                content,
                add_special,
                parse_special,
            } => {
                let mut tokens = Vec::new();
                for (at, part) in content.iter().enumerate() {
                    match part {
                        // Special tokens go only around a leading text.
                        TextOrToken::Text(text) => tokens.extend(vocab.tokenize(
                            text.as_bytes(),
                            *add_special && at == 0,
                            *parse_special,
                        )),
                        TextOrToken::Token(id) => tokens.push(known(*id, "content")?),
                    }
                }
                Ok(TokenAnswer::Tokens(
                    tokens
                        .into_iter()
                        .map(|token| TokenPiece {
                            id: token.0 as u32,
                            piece: piece(token),
                        })
                        .collect(),
                ))
            }
            TokenQuery::Detokenize { tokens } => {
                let mut bytes = Vec::new();
                for id in tokens {
                    bytes.extend(piece(known(*id, "tokens")?));
                }
                Ok(TokenAnswer::Text(
                    String::from_utf8_lossy(&bytes).into_owned(),
                ))
            }
            TokenQuery::Render { messages } => {
                let rendered =
                    self.prompter
                        .tokens(model, &Prompt::Chat(messages.clone()), config)?;
                Ok(TokenAnswer::Text(rendered.text))
            }
        }
    }

    /// Turns on the disk tier, as `options` ask, for the model at `path`
    /// placed on `placement`'s devices.
    fn with_disk(mut self, path: &Path, options: &LlamaOptions, placement: &Placement) -> Self {
        if self.declared_pooling.is_some() {
            return self;
        }
        if let Some(root) = &options.snapshot_dir {
            let shape = snapshot::Shape {
                model: String::new(),
                context: self.slot_context as u32,
                sequences: self.slots.len() as u32,
                kv_types: "f16/f16".into(),
                swa_full: false,
                offload: format!("{} build, {placement}", backend::gpu_backend()),
                llama: backend::llama_version(),
                cpu: backend::system_info(),
                vocab: self.model().n_vocab().max(0) as usize,
            };
            self.disk = Some(saved::Disk::start(
                root,
                options.snapshot_budget,
                shape,
                path,
            ));
        }
        self
    }

    fn model(&self) -> &LlamaModel {
        self.cell.borrow_owner()
    }

    /// Checks and places a request; it comes back with the reason if it
    /// cannot run.
    fn start(&mut self, request: Request) -> Result<(), Box<Refused>> {
        let Request {
            id,
            prompt,
            config,
            limits,
            mut output,
        } = request;
        let refused = |output, error| Err(Box::new(Refused { output, error }));
        if let Prompt::Embed(embed) = prompt {
            let pooling = match embed::pooling_for(self.model(), &self.name, &embed) {
                Ok(pooling) => pooling,
                Err(error) => return refused(output, error),
            };
            self.embed_jobs.push_back(embed::EmbedJob {
                id,
                output,
                vectors: Vec::with_capacity(embed.inputs.len()),
                inputs: Vec::with_capacity(embed.inputs.len()),
                truncate: embed.truncate,
                normalize: embed.normalize,
                dimensions: embed.dimensions,
                texts: embed.inputs,
                spanning: None,
                tokens: 0,
                limits,
                pooling,
                started: Instant::now(),
            });
            return Ok(());
        }
        let placed = match self.place(&prompt, &config) {
            Ok(placed) => placed,
            Err(error) => return refused(output, error),
        };
        if let Some(syntax) = placed.tool_syntax {
            output.parse_tool_calls(syntax, &config, &prompt);
        }
        if self.speculative && config.speculative == Speculative::Draft && self.draft.is_none() {
            let error = GeniusError::InvalidConfig {
                field: "speculative",
                reason: format!(
                    "`draft` needs a draft model, and {} has none (start the engine with one: `--draft-model`, GENIUS_DRAFT_MODEL)",
                    self.name
                ),
            };
            return refused(output, error);
        }
        let from_text = matches!(config.speculative, Speculative::Auto | Speculative::Ngram);
        let drafter = (self.speculative && from_text).then(|| {
            let prediction = config
                .prediction
                .as_deref()
                .map_or_else(Vec::new, |text| self.prediction_tokens(text));
            Drafter::new(prediction)
        });
        let from_model = matches!(config.speculative, Speculative::Auto | Speculative::Draft);
        let model_room =
            (self.speculative && from_model && self.draft.is_some()).then(ModelRoom::new);
        let usage = Usage {
            prompt_tokens: placed.tokens.len(),
            cached_tokens: placed.cached,
            generated_tokens: 0,
            draft_tokens: 0,
            accepted_draft_tokens: 0,
            prompt_ms: 0.0,
            generation_ms: 0.0,
            finish_reason: FinishReason::Cancelled,
        };
        self.slots[placed.index].job = Some(Job {
            id,
            output,
            config,
            chooser: placed.chooser,
            tokens: placed.tokens,
            text: placed.text,
            usage,
            phase: placed.phase,
            answer: Vec::new(),
            prompt_started: Instant::now(),
            generation_started: None,
            drafter,
            model_room,
            guessed_by_model: false,
            gained: slot::Gained::default(),
            fim: matches!(prompt, Prompt::Infill(_))
                .then(|| prompt::Fim::of(self.model()))
                .flatten(),
            broke_line: false,
            guesses: Vec::new(),
        });
        Ok(())
    }
}

impl LlamaOptions {
    /// The memory the model at `path` takes once loaded with these
    /// options (`crate::gguf::footprint_offloaded`), its draft model's
    /// included when it has one.
    pub fn footprint(&self, path: &Path) -> crate::gguf::Footprint {
        let sized = |path: &Path| {
            crate::gguf::footprint_offloaded(
                path,
                u64::from(self.context_size),
                u64::from(self.parallel),
                u64::from(self.batch_size),
                self.offloaded_layers(),
            )
        };
        let mut footprint = sized(path);
        // (A draft named for a model by another name than its file's is
        // not counted: the footprint knows only the path.)
        let draft = self
            .draft_model
            .as_ref()
            .filter(|draft| self.speculative && !footprint.embeds && draft.drafts_for("", path));
        if let Some(draft) = draft {
            let extra = sized(&draft.path);
            footprint.bytes += extra.bytes;
            footprint.device_bytes += extra.device_bytes;
        }
        footprint
    }

    /// The layers these options offload on this machine: 0 when no device
    /// is chosen or found (a CPU build, no driver, `Device::Cpu`),
    /// `u32::MAX` for all of them.
    pub fn offloaded_layers(&self) -> u32 {
        match backend::choose_devices(&self.device) {
            Ok(devices) if !devices.is_empty() => match self.gpu_layers {
                GpuLayers::All => u32::MAX,
                GpuLayers::Count(n) => n,
            },
            _ => 0,
        }
    }

    /// The free memory of the devices these options offload to, in bytes;
    /// `None` when nothing is offloaded.
    pub fn device_memory(&self) -> Option<u64> {
        if self.gpu_layers == GpuLayers::Count(0) {
            return None;
        }
        let devices = backend::choose_devices(&self.device).ok()?;
        if devices.is_empty() {
            return None;
        }
        Some(devices.iter().map(|d| d.memory_free as u64).sum())
    }
}

/// The llama.cpp [`Engine`].
///
/// Keeps one model and one context with a sequence per request it serves
/// at once ([`LlamaOptions::parallel`]); each step decodes the next token
/// of every answering request and a chunk of any new prompt in one batch.
/// Each sequence's KV cache survives between requests, and a new request
/// goes to the free sequence whose cache shares the longest prefix with its
/// prompt, so a conversation's next turn decodes only what is new. Create
/// it on the thread that will use it (the
/// [`EngineThread`](crate::EngineThread) does this).
pub struct LlamaEngine {
    options: LlamaOptions,
    loaded: Option<Loaded>,
    /// Its place at the process's compute scheduler.
    seat: Seat,
    /// What may stop a step early.
    stops: Arc<Stops>,
    /// Whether the loaded model has stepped yet.
    stepped: bool,
}

impl LlamaEngine {
    /// Creates an engine; nothing is loaded yet. Its steps share the
    /// process's cores ([`Cores::process`]) with every other engine.
    pub fn new(options: LlamaOptions) -> Result<Self, GeniusError> {
        Self::with_cores(options, &Cores::process())
    }

    /// Creates an engine whose steps lease `cores` instead of the
    /// process's.
    pub fn with_cores(options: LlamaOptions, cores: &Arc<Cores>) -> Result<Self, GeniusError> {
        llama_backend()?;
        let seat = cores.seat(options.threads);
        let stops = Arc::new(Stops::new(seat.nudge()));
        Ok(Self {
            options,
            loaded: None,
            seat,
            stops,
            stepped: false,
        })
    }

    /// The options this engine was created with.
    pub fn options(&self) -> &LlamaOptions {
        &self.options
    }
}

impl Engine for LlamaEngine {
    fn load(&mut self, name: &str, path: &Path) -> Result<ModelInfo, GeniusError> {
        check_gguf(path)?;
        // Free the old model first: two models may not fit in memory.
        self.unload();
        let started = Instant::now();
        let devices = backend::choose_devices(&self.options.device)?;
        if devices.is_empty()
            && self.options.device == Device::Auto
            && backend::gpu_backend() != "cpu"
        {
            log::warn!(
                "this build offloads to {} but finds no device for it, so {name} runs on the CPU: {}",
                backend::gpu_backend(),
                backend::missing_driver_hint()
            );
        }
        let indices: Vec<usize> = devices.iter().map(|d| d.index).collect();
        let layers = match (devices.is_empty(), self.options.gpu_layers) {
            (true, _) => 0,
            (false, GpuLayers::All) => u32::MAX,
            (false, GpuLayers::Count(n)) => n,
        };
        // Reading the model (and repacking its weights for this CPU) is
        // compute too: it waits for its share of the cores.
        let lease = self.seat.lease();
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(layers)
            // An empty list keeps every layer and buffer off the GPUs.
            .with_devices(&indices)
            .map_err(|err| GeniusError::engine_from("cannot choose the devices", err))?;
        let model = LlamaModel::load_from_file(llama_backend()?, path, &params).map_err(|err| {
            GeniusError::InvalidModelFile {
                path: path.to_path_buf(),
                reason: format!(
                    "llama.cpp could not load it ({err}); set RUST_LOG=llama.cpp=debug for details"
                ),
            }
        })?;
        log::debug!(
            "read the model in {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        let offloadable = model.n_layer().saturating_add(1);
        let placement = match devices.first() {
            Some(first) if layers > 0 => Placement {
                backend: first.backend.clone(),
                devices: devices.iter().map(backend::describe).collect(),
                gpu_layers: layers.min(offloadable),
                layers: offloadable,
            },
            _ => Placement::cpu(offloadable),
        };
        let mut loaded = Loaded::new(name, path, model, &self.options, &placement, &self.stops)?;
        let draft = self
            .options
            .draft_model
            .as_ref()
            .filter(|draft| draft.drafts_for(name, path) && loaded.declared_pooling.is_none());
        if let (Some(draft), true) = (draft, self.options.speculative) {
            check_gguf(&draft.path)?;
            let stem = |path: &Path| {
                path.file_stem()
                    .map_or_else(|| "the model".into(), |s| s.to_string_lossy().into_owned())
            };
            let draft_name = stem(&draft.path);
            loaded.draft = Some(draft_model::DraftModel::load(
                &draft_name,
                &draft.path,
                loaded.model(),
                &stem(path),
                &params,
                loaded.slot_context as u32,
                loaded.slots.len() as u32,
                self.options.batch_size,
                loaded.threads,
                &self.stops,
            )?);
            log::info!("{draft_name} guesses ahead for {name}");
        }
        drop(lease);
        self.seat.idle();
        // The exit handler goes after the statics this load made.
        crate::exit::guard_statics();
        self.stepped = false;
        let info = ModelInfo {
            name: loaded.name.clone(),
            context_size: loaded.slot_context,
            vocab_size: loaded.model().n_vocab().max(0) as usize,
            parallel: loaded.slots.len(),
            embeds: loaded.declared_pooling.is_some(),
            placement,
        };
        log::info!(
            "loaded {} from {} in {:.0} ms on {} ({} requests at once, {} tokens of context each, {} threads, {})",
            info.name,
            path.display(),
            started.elapsed().as_secs_f64() * 1e3,
            info.placement,
            loaded.slots.len(),
            info.context_size,
            self.options.threads,
            loaded.prompter.describe()
        );
        self.loaded = Some(loaded);
        Ok(info)
    }

    fn unload(&mut self) {
        if let Some(mut loaded) = self.loaded.take() {
            loaded.save_all();
            log::info!("unloaded {}", loaded.name);
        }
    }

    fn discard(&mut self) {
        if let Some(loaded) = self.loaded.take() {
            log::info!("unloaded {} without saving its caches", loaded.name);
        }
    }

    fn capacity(&self) -> usize {
        self.loaded
            .as_ref()
            .map_or(self.options.parallel.max(1) as usize, |loaded| {
                loaded.slots.len()
            })
    }

    fn running(&self) -> usize {
        self.loaded.as_ref().map_or(0, |loaded| {
            loaded
                .slots
                .iter()
                .filter(|slot| slot.job.is_some())
                .count()
                + loaded.embed_jobs.len()
        })
    }

    fn start(&mut self, request: Request) -> Result<(), Box<Refused>> {
        match self.loaded.as_mut() {
            Some(loaded) => loaded.start(request),
            None => Err(Box::new(Refused {
                output: request.output,
                error: GeniusError::NoModelLoaded,
            })),
        }
    }

    fn listen(&mut self, knock: crate::Knock) {
        self.stops.listen(knock);
    }

    fn step(&mut self) -> Step {
        let Some(loaded) = self.loaded.as_mut() else {
            return Step::default();
        };
        let started = Instant::now();
        let step = loaded.step(&self.seat);
        loaded.counts.steps += 1;
        loaded.counts.step_micros += started.elapsed().as_micros() as u64;
        if !loaded.has_work() {
            self.seat.idle();
        }
        if !self.stepped {
            // Statics llama.cpp makes at its first computation must be
            // destroyed after the engine stops, not under it.
            self.stepped = true;
            crate::exit::guard_statics();
        }
        step
    }

    fn tokens(
        &mut self,
        query: &rusty_genius_core::tokens::TokenQuery,
        config: &InferenceConfig,
    ) -> Result<rusty_genius_core::tokens::TokenAnswer, GeniusError> {
        match &self.loaded {
            Some(loaded) => loaded.tokens(query, config),
            None => Err(GeniusError::NoModelLoaded),
        }
    }

    fn stats(&self) -> rusty_genius_core::metrics::EngineStats {
        let Some(loaded) = &self.loaded else {
            return rusty_genius_core::metrics::EngineStats::default();
        };
        rusty_genius_core::metrics::EngineStats {
            kv_cells_used: loaded
                .slots
                .iter()
                .map(|slot| slot.cached.len() as u64)
                .sum(),
            kv_cells_total: (loaded.slot_context * loaded.slots.len()) as u64,
            ram_tier_bytes: loaded.ram.held() as u64,
            ..loaded.counts
        }
    }
}

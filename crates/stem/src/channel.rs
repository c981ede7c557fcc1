//! The seed's channel API on top of the handle: requests from one input
//! channel are answered one after another, in order, and everything that
//! happens (their events, loads, status changes, downloads) comes out on
//! one output channel in the order it happened.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::channel::mpsc;
use futures::future::{self, Either};
use futures::{FutureExt, SinkExt, StreamExt};
use rusty_genius_core::protocol::{BrainstemInput, BrainstemOutput, InferenceEvent};
use rusty_genius_core::{ErrorReport, GeniusError, InferenceConfig, Prompt};
use rusty_genius_cortex::CancelToken;

use crate::handle::{ChannelSink, Command, OrchestratorHandle};

/// What reaches the adapter, in the order it happened.
enum Item {
    /// Something to pass on: an event of the running request, or a status
    /// or download event.
    Output(BrainstemOutput),
    /// The load that was asked for is done.
    Loaded(Result<(), ErrorReport>),
}

/// What the adapter is waiting for.
enum Busy {
    Idle,
    /// The end of this request.
    Request {
        cancel: CancelToken,
        backlog: Arc<AtomicUsize>,
    },
    /// The end of a load.
    Load,
}

/// Inputs read ahead of the one being answered. Past this many the
/// adapter stops reading its input, so that a sender feels the
/// backpressure of its bounded channel instead of a queue growing here.
const READ_AHEAD: usize = 64;

/// Serves `input` through `handle`, reporting on `output`, until
/// `Shutdown`, the end of the input (once its requests are answered), or
/// the output's receiver is dropped.
pub(crate) async fn serve(
    handle: OrchestratorHandle,
    mut input: mpsc::Receiver<BrainstemInput>,
    mut output: mpsc::Sender<BrainstemOutput>,
) {
    let (items_tx, mut items) = mpsc::unbounded();
    let listener = items_tx.clone();
    handle.send(Command::Listen(Box::new(move |event| {
        listener.unbounded_send(Item::Output(event)).is_ok()
    })));
    let mut pending: VecDeque<BrainstemInput> = VecDeque::new();
    let mut busy = Busy::Idle;
    let mut input_open = true;
    let mut shutting_down = false;
    loop {
        if matches!(busy, Busy::Idle) {
            if shutting_down {
                break;
            }
            if let Some(next) = pending.pop_front() {
                busy = start(&handle, next, &items_tx);
                continue;
            }
            if !input_open {
                break;
            }
        }
        let next_input = if input_open && !shutting_down && pending.len() < READ_AHEAD {
            Either::Left(input.next())
        } else {
            Either::Right(future::pending())
        };
        futures::select_biased! {
            received = next_input.fuse() => match received {
                None => input_open = false,
                Some(BrainstemInput::Stop) => {
                    if let Busy::Request { cancel, .. } = &busy {
                        cancel.cancel();
                    }
                }
                Some(BrainstemInput::Shutdown) => {
                    shutting_down = true;
                    handle.shutdown();
                }
                Some(request) => pending.push_back(request),
            },
            item = items.next() => {
                let Some(item) = item else { break };
                let (forward, ends) = match item {
                    Item::Output(output) => {
                        let ends = matches!(
                            output,
                            BrainstemOutput::Event(InferenceEvent::Complete) | BrainstemOutput::Error(_)
                        ) && matches!(busy, Busy::Request { .. });
                        if let (
                            Busy::Request { backlog, .. },
                            BrainstemOutput::Event(_) | BrainstemOutput::Error(_),
                        ) = (&busy, &output)
                        {
                            backlog.fetch_sub(1, Ordering::Relaxed);
                        }
                        (Some(output), ends)
                    }
                    Item::Loaded(Ok(())) => (None, true),
                    Item::Loaded(Err(report)) => (Some(BrainstemOutput::Error(report)), true),
                };
                if let Some(forward) = forward {
                    if output.send(forward).await.is_err() {
                        // Nobody listens any more: stop generating for nobody.
                        if let Busy::Request { cancel, .. } = &busy {
                            cancel.cancel();
                        }
                        handle.shutdown();
                        break;
                    }
                }
                if ends {
                    busy = Busy::Idle;
                }
            },
        }
    }
    // Requests that never started are answered too.
    if shutting_down {
        for _ in pending.drain(..) {
            let report = GeniusError::ShutDown.report();
            if output.send(BrainstemOutput::Error(report)).await.is_err() {
                break;
            }
        }
    }
}

/// Sends one input to the Orchestrator.
fn start(
    handle: &OrchestratorHandle,
    input: BrainstemInput,
    items: &mpsc::UnboundedSender<Item>,
) -> Busy {
    let prompt = match input {
        BrainstemInput::LoadModel(name) => {
            let answer = items.clone();
            let sent = handle.send(Command::Load {
                name,
                done: Box::new(move |result| {
                    let _ = answer.unbounded_send(Item::Loaded(result.map(|_| ())));
                }),
            });
            if !sent {
                // The loop is gone, and the answer with it.
                let report = GeniusError::EngineGone.report();
                let _ = items.unbounded_send(Item::Loaded(Err(report)));
            }
            return Busy::Load;
        }
        BrainstemInput::Infer { prompt, config } => (Prompt::Text(prompt), config),
        BrainstemInput::Chat { messages, config } => (Prompt::Chat(messages), config),
        BrainstemInput::Embed(embed) => (Prompt::Embed(embed), InferenceConfig::default()),
        BrainstemInput::Infill { infill, config } => (Prompt::Infill(infill), config),
        other => {
            let report = GeniusError::invalid_request(
                "input",
                format!("this Orchestrator does not support {other:?}"),
            )
            .report();
            let _ = items.unbounded_send(Item::Output(BrainstemOutput::Error(report)));
            return Busy::Request {
                cancel: CancelToken::default(),
                backlog: Arc::new(AtomicUsize::new(1)),
            };
        }
    };
    let (prompt, config) = prompt;
    let (sink, backlog) = ChannelSink::new(items.clone(), |event| {
        Item::Output(match event {
            Ok(event) => BrainstemOutput::Event(event),
            Err(report) => BrainstemOutput::Error(report),
        })
    });
    let cancel = CancelToken::default();
    handle.submit_to(
        handle.next_id(),
        prompt,
        config,
        Box::new(sink),
        cancel.clone(),
    );
    Busy::Request { cancel, backlog }
}

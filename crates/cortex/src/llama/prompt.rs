//! From a request to the tokens the model reads: the model's Jinja chat
//! template when it has one, llama.cpp's built-in templates otherwise, and
//! message text that is never read as special tokens.

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use rusty_genius_core::{
    ChatMessage, GeniusError, InferenceConfig, Infill, Prompt, PromptFormat, Role, ToolChoice,
};

use crate::template::{ChatTemplate, Part};
use crate::tools::ToolSyntax;

/// Stands in for the prompt when a built-in template is taken apart; text
/// a template would never produce by itself.
const PLACEHOLDER: &str = "\u{E000}rusty-genius prompt\u{E000}";

/// The batch a fill-in-the-middle prompt's parts are measured against, as
/// llama.cpp's server measures them with its default batch: 1536 tokens
/// of prefix, up to 512 of suffix.
pub(super) const INFILL_BATCH: usize = 2048;

/// What a fill-in-the-middle prompt may take: the batch its prefix and
/// suffix are measured against, the tokens a request's context holds, and
/// those it may generate.
#[derive(Debug, Clone, Copy)]
pub(super) struct Room {
    pub(super) batch: usize,
    pub(super) context: usize,
    pub(super) predict: usize,
}

impl Default for Room {
    fn default() -> Self {
        Self {
            batch: INFILL_BATCH,
            context: 4096,
            predict: 0,
        }
    }
}

/// A model's fill-in-the-middle tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fim {
    pub(super) prefix: LlamaToken,
    pub(super) suffix: LlamaToken,
    pub(super) middle: LlamaToken,
    /// The repository-name token, if it has one.
    pub(super) repo: Option<LlamaToken>,
    /// The file-separator token, if it has one.
    pub(super) file: Option<LlamaToken>,
    /// The padding token, if it has one.
    pub(super) pad: Option<LlamaToken>,
}

impl Fim {
    /// Its tokens, when `model` has at least prefix, suffix and middle.
    pub(super) fn of(model: &LlamaModel) -> Option<Self> {
        let vocab = model.vocab();
        let token = |token: LlamaToken| (token.0 >= 0).then_some(token);
        Some(Self {
            prefix: token(vocab.fim_pre())?,
            suffix: token(vocab.fim_suf())?,
            middle: token(vocab.fim_mid())?,
            repo: token(vocab.fim_rep()),
            file: token(vocab.fim_sep()),
            pad: token(vocab.fim_pad()),
        })
    }

    /// Whether `token` is one of them: none belongs in a middle.
    pub(super) fn contains(&self, token: LlamaToken) -> bool {
        [self.prefix, self.suffix, self.middle].contains(&token)
            || [self.repo, self.file, self.pad].contains(&Some(token))
    }
}

/// About the last `tokens` tokens' worth of `text` (16 bytes a token, cut
/// at a character): tokenizing more would be thrown away.
fn bounded_tail(text: &str, tokens: usize) -> std::borrow::Cow<'_, str> {
    let bytes = tokens.saturating_mul(16).max(64);
    if text.len() <= bytes {
        return text.into();
    }
    let mut at = text.len() - bytes;
    while !text.is_char_boundary(at) {
        at += 1;
    }
    text[at..].into()
}

/// About the first `tokens` tokens' worth of `text`.
fn bounded_head(text: &str, tokens: usize) -> &str {
    let bytes = tokens.saturating_mul(16).max(64);
    if text.len() <= bytes {
        return text;
    }
    let mut at = bytes;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    &text[..at]
}

/// How a loaded model's prompts are made.
pub(super) struct Prompter {
    /// The model's own template, rendered with minijinja.
    jinja: Option<ChatTemplate>,
    /// llama.cpp's rendering of the template, when minijinja cannot.
    builtin: Option<BuiltinTemplate>,
    /// Tokens of the tool-call markup, shown as text in the output.
    markup_tokens: Vec<LlamaToken>,
}

/// A request's tokens, and what the answer should be read for.
pub(super) struct Tokens {
    /// The tokens of the whole prompt.
    pub(super) tokens: Vec<LlamaToken>,
    /// The prompt as text (as tokenized), to recognise it in a later
    /// request that continues it.
    pub(super) text: String,
    /// The tool-call syntax to read the answer for, when tools are offered.
    pub(super) tool_syntax: Option<ToolSyntax>,
}

impl Prompter {
    /// Reads the model's chat template, if it has one.
    pub(super) fn of(model: &LlamaModel) -> Self {
        let source = model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok());
        let vocab = model.vocab();
        let special_text = |token: LlamaToken| {
            String::from_utf8_lossy(&vocab.token_to_piece(token, true, None)).into_owned()
        };
        let jinja = source.as_deref().and_then(|source| {
            match ChatTemplate::new(
                source,
                &special_text(vocab.bos()),
                &special_text(vocab.eos()),
            ) {
                Ok(template) => Some(template),
                Err(err) => {
                    log::warn!("{err}; trying llama.cpp's built-in templates");
                    None
                }
            }
        });
        let builtin = if jinja.is_some() {
            None
        } else {
            BuiltinTemplate::of(model)
        };
        let markup_tokens = jinja
            .as_ref()
            .and_then(ChatTemplate::tool_syntax)
            .map(|syntax| {
                syntax
                    .markup_tokens()
                    .iter()
                    .filter_map(
                        |text| match vocab.tokenize(text.as_bytes(), false, true)[..] {
                            [token] => Some(token),
                            _ => None,
                        },
                    )
                    .collect()
            })
            .unwrap_or_default();
        Self {
            jinja,
            builtin,
            markup_tokens,
        }
    }

    /// A phrase for the log: how prompts reach this model.
    pub(super) fn describe(&self) -> &'static str {
        match (&self.jinja, &self.builtin) {
            (Some(_), _) => "chat template rendered as Jinja",
            (None, Some(_)) => "llama.cpp's built-in chat template",
            (None, None) => "no chat template: prompts as given",
        }
    }

    /// Whether `token` is tool-call markup to be shown as text.
    pub(super) fn is_markup(&self, token: LlamaToken) -> bool {
        self.markup_tokens.contains(&token)
    }

    /// The tokens of `prompt` under `config`.
    pub(super) fn tokens(
        &self,
        model: &LlamaModel,
        prompt: &Prompt,
        config: &InferenceConfig,
    ) -> Result<Tokens, GeniusError> {
        let vocab = model.vocab();
        match prompt {
            Prompt::Text(text) if config.prompt_format == PromptFormat::Raw => Ok(Tokens {
                tokens: vocab.tokenize(text.as_bytes(), true, true),
                text: text.clone(),
                tool_syntax: None,
            }),
            Prompt::Text(text) => match (&self.jinja, &self.builtin) {
                (Some(_), _) => self.chat(model, &[ChatMessage::user(text.clone())], config),
                (None, Some(builtin)) => builtin.user_turn_tokens(model, text),
                (None, None) => Ok(Tokens {
                    tokens: vocab.tokenize(text.as_bytes(), true, true),
                    text: text.clone(),
                    tool_syntax: None,
                }),
            },
            Prompt::Chat(messages) => self.chat(model, messages, config),
            Prompt::Embed(_) => Err(GeniusError::invalid_request(
                "prompt",
                "texts to embed are not a prompt to answer",
            )),
            Prompt::Infill(infill) => self.infill(model, infill, Room::default()),
            Prompt::Tokens(_) => Err(GeniusError::invalid_request(
                "prompt",
                "a question about tokens is not a prompt to answer",
            )),
        }
    }

    /// The tokens of a fill-in-the-middle request, in the layout
    /// llama.cpp's server gives it, token for token (Qwen2.5-Coder's
    /// repository layout where the model has the repository and file
    /// separator tokens): the project's files first, as `<repo>myproject`,
    /// then `<file_sep>name` and the text of each (or a snippet line
    /// between them without a separator token), then `<file_sep>filename`
    /// for the file being edited; then `<pre>` prefix and middle, `<suf>`
    /// suffix, `<mid>`. Only what fits in `room` is kept: the end of the
    /// prefix (3/4 of a batch), the start of the suffix, and the last of the
    /// files (the context less a batch and twice the tokens to generate).
    pub(super) fn infill(
        &self,
        model: &LlamaModel,
        infill: &Infill,
        room: Room,
    ) -> Result<Tokens, GeniusError> {
        let vocab = model.vocab();
        let fim = Fim::of(model).ok_or_else(|| {
            GeniusError::invalid_request(
                "prompt",
                "this model has no fill-in-the-middle tokens (it needs prefix, suffix and middle tokens, as code models such as Qwen2.5-Coder have): send it a prompt to complete instead",
            )
        })?;
        // As plain text: markup typed in the code is not markup.
        let plain = |text: &str| vocab.tokenize(text.as_bytes(), false, false);
        let mut files = Vec::new();
        if let Some(repo) = fim.repo {
            files.push(repo);
            files.extend(plain("myproject\n"));
        }
        // Tokenizing a file the context cannot hold is wasted work: files
        // are kept from the last, so the earlier ones stop once the budget
        // is passed.
        let files_room = room
            .context
            .saturating_sub(room.batch)
            .saturating_sub(2 * room.predict);
        let mut parts: Vec<Vec<LlamaToken>> = Vec::new();
        let mut counted = 0;
        for file in infill.extra.iter().rev() {
            if counted > files_room {
                break;
            }
            let mut part = match fim.file {
                Some(separator) => {
                    let name = if file.name.is_empty() {
                        "tmp"
                    } else {
                        &file.name
                    };
                    let mut part = vec![separator];
                    part.extend(plain(&format!("{name}\n")));
                    part
                }
                None => plain("\n\n--- snippet ---\n\n"),
            };
            part.extend(plain(&bounded_tail(&file.text, files_room)));
            counted += part.len();
            parts.push(part);
        }
        files.extend(parts.into_iter().rev().flatten());
        if let Some(separator) = fim.file {
            files.push(separator);
            files.extend(plain("filename\n"));
        }
        let middle = plain(&infill.middle);
        let prefix_take = 3 * (room.batch / 4);
        let suffix_take = (room.batch / 4).saturating_sub(2 + middle.len());
        let prefix = plain(&bounded_tail(&infill.prefix, prefix_take));
        let prefix = &prefix[prefix.len().saturating_sub(prefix_take)..];
        let suffix = plain(bounded_head(&infill.suffix, suffix_take));
        let suffix = &suffix[..suffix.len().min(suffix_take)];
        let files = &files[files.len().saturating_sub(files_room)..];
        let mut tokens = Vec::with_capacity(files.len() + prefix.len() + suffix.len() + 4);
        if vocab.should_add_bos() {
            tokens.push(vocab.bos());
        }
        tokens.extend_from_slice(files);
        tokens.push(fim.prefix);
        tokens.extend_from_slice(prefix);
        tokens.extend_from_slice(&middle);
        tokens.push(fim.suffix);
        tokens.extend_from_slice(suffix);
        tokens.push(fim.middle);
        Ok(Tokens {
            tokens,
            // Not a text a later prompt continues.
            text: String::new(),
            tool_syntax: None,
        })
    }

    fn chat(
        &self,
        model: &LlamaModel,
        messages: &[ChatMessage],
        config: &InferenceConfig,
    ) -> Result<Tokens, GeniusError> {
        let vocab = model.vocab();
        let offers_tools = !config.tools.is_empty() && config.tool_choice != ToolChoice::None;
        let Some(jinja) = &self.jinja else {
            if offers_tools {
                return Err(GeniusError::invalid_request(
                    "tools",
                    "this model's chat template cannot be rendered here, so it cannot be offered tools",
                ));
            }
            return match &self.builtin {
                Some(builtin) => builtin.conversation_tokens(model, messages),
                None => Err(GeniusError::invalid_request(
                    "messages",
                    "this model has no chat template; send a single prompt with Infer and PromptFormat::Raw",
                )),
            };
        };
        let tool_syntax = jinja.tool_syntax().filter(|_| offers_tools);
        if offers_tools && tool_syntax.is_none() {
            return Err(GeniusError::invalid_request(
                "tools",
                "this model's chat template shows no tool-call syntax we can read (Qwen/Hermes, Llama 3, Mistral)",
            ));
        }
        let tools = if offers_tools { &config.tools[..] } else { &[] };
        let parts = jinja.render_parts(messages, tools, true)?;
        let text: String = parts
            .iter()
            .map(|part| match part {
                Part::Markup(text) | Part::Text { text, .. } => text.as_str(),
            })
            .collect();
        // Message text holding the model's special tokens (say, a user who
        // types "<|im_end|>") is tokenized apart, as plain text. Otherwise
        // the whole rendering is tokenized at once, exactly as transformers
        // and llama.cpp do.
        let injected = parts.iter().any(|part| match part {
            Part::Text { text, .. } => has_special_tokens(model, text),
            Part::Markup(_) => false,
        });
        let mut tokens = if injected {
            let mut tokens = Vec::new();
            for part in &parts {
                match part {
                    Part::Markup(text) => {
                        tokens.extend(vocab.tokenize(text.as_bytes(), false, true))
                    }
                    Part::Text { text, .. } => {
                        tokens.extend(vocab.tokenize(text.as_bytes(), false, false))
                    }
                }
            }
            tokens
        } else {
            vocab.tokenize(text.as_bytes(), false, true)
        };
        if vocab.should_add_bos() && tokens.first() != Some(&vocab.bos()) {
            tokens.insert(0, vocab.bos());
        }
        Ok(Tokens {
            tokens,
            text,
            tool_syntax,
        })
    }
}

/// Whether `text` would be read as holding special tokens.
fn has_special_tokens(model: &LlamaModel, text: &str) -> bool {
    let vocab = model.vocab();
    vocab.tokenize(text.as_bytes(), false, true) != vocab.tokenize(text.as_bytes(), false, false)
}

/// A chat template llama.cpp applies itself (a fixed list of well-known
/// formats), with the text it puts around a single user message.
struct BuiltinTemplate {
    template: LlamaChatTemplate,
    /// Up to where the user's message starts.
    before: String,
    /// From where the user's message ends to the start of the model's turn.
    after: String,
    /// Whether the template strips whitespace around the message.
    trims: bool,
}

impl BuiltinTemplate {
    /// The model's chat template, if llama.cpp can apply it.
    fn of(model: &LlamaModel) -> Option<Self> {
        let template = model.chat_template(None).ok()?;
        let one = |text: &str| apply(model, &template, &[ChatMessage::user(text)]);
        let parts = one(PLACEHOLDER).and_then(|text| {
            let padded = one(&format!(" {PLACEHOLDER} "))?;
            match text.split(PLACEHOLDER).collect::<Vec<_>>()[..] {
                [before, after] => Ok((
                    before.to_owned(),
                    after.to_owned(),
                    !padded.contains(&format!(" {PLACEHOLDER} ")),
                )),
                _ => Err(GeniusError::engine(
                    "the model's chat template does not show the message exactly once",
                )),
            }
        });
        match parts {
            Ok((before, after, trims)) => Some(Self {
                template,
                before,
                after,
                trims,
            }),
            Err(err) => {
                log::warn!("{err}; prompts go to the model as given");
                None
            }
        }
    }

    /// The tokens of `prompt` as one user turn. Markers written inside the
    /// prompt are tokenized as the user's text, between the template's
    /// pieces, so they cannot end the turn.
    fn user_turn_tokens(&self, model: &LlamaModel, prompt: &str) -> Result<Tokens, GeniusError> {
        let vocab = model.vocab();
        if !has_special_tokens(model, prompt) {
            let whole = apply(model, &self.template, &[ChatMessage::user(prompt)])?;
            return Ok(Tokens {
                tokens: vocab.tokenize(whole.as_bytes(), true, true),
                text: whole,
                tool_syntax: None,
            });
        }
        let prompt = if self.trims { prompt.trim() } else { prompt };
        let mut tokens = vocab.tokenize(self.before.as_bytes(), true, true);
        tokens.extend(vocab.tokenize(prompt.as_bytes(), false, false));
        tokens.extend(vocab.tokenize(self.after.as_bytes(), false, true));
        Ok(Tokens {
            tokens,
            text: format!("{}{prompt}{}", self.before, self.after),
            tool_syntax: None,
        })
    }

    /// A whole conversation; refused if a message holds special tokens,
    /// which this path cannot keep apart.
    fn conversation_tokens(
        &self,
        model: &LlamaModel,
        messages: &[ChatMessage],
    ) -> Result<Tokens, GeniusError> {
        if let Some(at) = messages.iter().position(|m| {
            m.content
                .as_deref()
                .is_some_and(|c| has_special_tokens(model, c))
        }) {
            return Err(GeniusError::invalid_request(
                format!("messages[{at}].content"),
                "holds the model's special tokens, which llama.cpp's built-in templates cannot keep apart from the markup",
            ));
        }
        let text = apply(model, &self.template, messages)?;
        Ok(Tokens {
            tokens: model.vocab().tokenize(text.as_bytes(), true, true),
            text,
            tool_syntax: None,
        })
    }
}

/// `messages` in `template`, ending where the model's turn begins.
fn apply(
    model: &LlamaModel,
    template: &LlamaChatTemplate,
    messages: &[ChatMessage],
) -> Result<String, GeniusError> {
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(m.role, Role::System | Role::User | Role::Assistant) {
                return Err(GeniusError::invalid_request(
                    format!("messages[{i}].role"),
                    "llama.cpp's built-in templates know system, user and assistant turns only",
                ));
            }
            LlamaChatMessage::new(m.role.as_str().into(), m.content.clone().unwrap_or_default())
                .map_err(|_| {
                    GeniusError::invalid_request(
                        format!("messages[{i}].content"),
                        "it contains a NUL character, which a chat template cannot carry; send a prompt with PromptFormat::Raw",
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    model
        .apply_chat_template(template, &messages, true)
        .map_err(|err| {
            GeniusError::engine_from(
                "the model's chat template is not one llama.cpp can apply",
                err,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_cpp_2::model::params::LlamaModelParams;
    use rusty_genius_core::InfillFile;
    use serde_json::Value;

    #[test]
    fn an_infill_is_laid_out_as_llama_cpps_server_lays_it_out_token_for_token() {
        // fixtures/infill/render.py wrote what llama-server b11434 made of
        // each case: its prompt (special tokens shown) and its length.
        let Some(path) = facecrab::testing::QWEN.for_test() else {
            return;
        };
        let backend = crate::llama_backend().unwrap();
        let model =
            LlamaModel::load_from_file(backend, &path, &LlamaModelParams::default()).unwrap();
        let prompter = Prompter::of(&model);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/infill");
        let read = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(root.join(name)).unwrap()).unwrap()
        };
        let (cases, expected) = (read("cases.json"), read("llama-server.json"));
        let text = |case: &Value, key: &str| case[key].as_str().unwrap_or_default().to_owned();
        for (case, expected) in cases
            .as_array()
            .unwrap()
            .iter()
            .zip(expected.as_array().unwrap())
        {
            let infill = Infill {
                prefix: text(case, "input_prefix"),
                suffix: text(case, "input_suffix"),
                middle: text(case, "prompt"),
                extra: case["input_extra"]
                    .as_array()
                    .map(|files| {
                        files
                            .iter()
                            .map(|file| InfillFile {
                                name: text(file, "filename"),
                                text: text(file, "text"),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let room = Room {
                batch: 2048,
                context: 4096,
                predict: 0,
            };
            let tokens = prompter.infill(&model, &infill, room).unwrap().tokens;
            let shown = model.vocab().detokenize(&tokens, false, true);
            assert_eq!(
                String::from_utf8_lossy(&shown),
                expected["prompt"].as_str().unwrap(),
                "{}",
                case["name"]
            );
            assert_eq!(
                tokens.len() as u64,
                expected["tokens"].as_u64().unwrap(),
                "{}",
                case["name"]
            );
        }
    }
}

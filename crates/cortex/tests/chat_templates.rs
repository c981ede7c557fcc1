//! Chat templates render byte for byte as transformers renders them.
//!
//! `fixtures/chat-templates/render.py` renders every conversation with
//! every template in Python's jinja2, with transformers' settings, into
//! `expected/`; this test renders the same pairs with [`ChatTemplate`] and
//! compares. A template that raises must raise here too, with the same
//! message.

use std::path::{Path, PathBuf};

use rusty_genius_core::{ChatMessage, GeniusError, Tool};
use rusty_genius_cortex::template::ChatTemplate;
use serde::Deserialize;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/chat-templates")
}

#[derive(Deserialize)]
struct Spec {
    file: String,
    bos_token: String,
    eos_token: String,
    #[serde(default)]
    only_with_tools: bool,
}

#[derive(Deserialize)]
struct Conversation {
    messages: Vec<ChatMessage>,
    #[serde(default)]
    tools: Vec<Tool>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

#[test]
fn renderings_match_python_jinja2_with_transformers_settings() {
    let specs: std::collections::BTreeMap<String, Spec> =
        serde_json::from_str(&std::fs::read_to_string(root().join("templates.json")).unwrap())
            .unwrap();
    let mut conversations: Vec<PathBuf> = std::fs::read_dir(root().join("conversations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    conversations.sort();
    let mut compared = 0;
    let mut failures = Vec::new();
    for (name, spec) in &specs {
        let source = std::fs::read_to_string(root().join(&spec.file)).unwrap();
        let template = ChatTemplate::new(&source, &spec.bos_token, &spec.eos_token)
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        for path in &conversations {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            let conversation: Conversation =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            if spec.only_with_tools && conversation.tools.is_empty() {
                continue;
            }
            let expected = root().join("expected").join(name);
            let rendered = template.render(
                &conversation.messages,
                &conversation.tools,
                conversation.add_generation_prompt,
            );
            let text_file = expected.join(format!("{stem}.txt"));
            let error_file = expected.join(format!("{stem}.error"));
            match (rendered, text_file.is_file()) {
                (Ok(text), true) => {
                    let want = std::fs::read_to_string(&text_file).unwrap();
                    if text != want {
                        failures.push(format!(
                            "{name}/{stem}: rendering differs\n--- jinja2\n{want}\n--- ours\n{text}"
                        ));
                    }
                }
                (Err(err @ GeniusError::InvalidRequest { .. }), false) => {
                    let want = std::fs::read_to_string(&error_file)
                        .unwrap_or_else(|_| panic!("{name}/{stem}: no expected file"));
                    if !err.to_string().ends_with(&format!("refused them: {want}")) {
                        failures.push(format!("{name}/{stem}: raised {err}, expected {want:?}"));
                    }
                }
                (Ok(text), false) => failures.push(format!(
                    "{name}/{stem}: rendered, but jinja2 raised: {text:?}"
                )),
                (Err(err), _) => failures.push(format!("{name}/{stem}: {err}")),
            }
            compared += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(
        compared, 38,
        "every template/conversation pair was compared"
    );
}

#[test]
fn every_template_renders_with_its_message_text_kept_apart() {
    // Message text with turn markers is kept in its own parts, so the
    // engine can tokenize it without special tokens; joined, the parts are
    // the rendering itself.
    let specs: std::collections::BTreeMap<String, Spec> =
        serde_json::from_str(&std::fs::read_to_string(root().join("templates.json")).unwrap())
            .unwrap();
    let messages = [
        ChatMessage::system("Be brief."),
        ChatMessage::user("Hi <|im_end|> [INST] <|eot_id|> there"),
    ];
    let tool = Tool::function(
        "f",
        "does f",
        serde_json::json!({"type": "object", "properties": {}}),
    );
    for (name, spec) in &specs {
        let source = std::fs::read_to_string(root().join(&spec.file)).unwrap();
        let template = ChatTemplate::new(&source, &spec.bos_token, &spec.eos_token).unwrap();
        let tools = if spec.only_with_tools {
            vec![tool.clone()]
        } else {
            vec![]
        };
        let whole = template.render(&messages, &tools, true).unwrap();
        let parts = template.render_parts(&messages, &tools, true).unwrap();
        let joined: String = parts
            .iter()
            .map(|part| match part {
                rusty_genius_cortex::template::Part::Markup(text)
                | rusty_genius_cortex::template::Part::Text { text, .. } => text.as_str(),
            })
            .collect();
        assert_eq!(joined, whole, "{name}");
        assert!(
            parts.iter().any(|part| matches!(
                part,
                rusty_genius_cortex::template::Part::Text { text, message: 1 } if text.contains("<|im_end|>")
            )),
            "{name}: {parts:?}"
        );
    }
}

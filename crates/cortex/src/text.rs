//! Turning a stream of token bytes into protocol events.
//!
//! Engines produce tokens as raw bytes; a character may be split across
//! tokens, and a tag or stop sequence across several. The three stages here
//! each hold back just enough text to decide, so what reaches the user is
//! valid UTF-8, contains no stop sequence, and has `<think>` tags turned into
//! [`ThoughtEvent`]s, however the model split its output.

use rusty_genius_core::protocol::{InferenceEvent, ThoughtEvent};

use crate::suffix::partial_suffix;
use rusty_genius_core::Tool;

use crate::tools::{AnsweredCalls, ToolCallParser, ToolSyntax};

/// Reassembles UTF-8 text from byte pieces that may split characters.
///
/// Invalid sequences become U+FFFD, as in [`String::from_utf8_lossy`].
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Creates an empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` and appends every complete character to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(text) => {
                    out.push_str(text);
                    start = self.pending.len();
                    break;
                }
                Err(err) => {
                    let valid = start + err.valid_up_to();
                    // The prefix up to `valid` was just checked by from_utf8.
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..valid]).unwrap_or_default(),
                    );
                    match err.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        // An incomplete character at the end: wait for more.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }

    /// Ends the stream: an incomplete trailing character becomes U+FFFD.
    pub fn finish(&mut self, out: &mut String) {
        if !self.pending.is_empty() {
            self.pending.clear();
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
}

/// Finds stop sequences in streamed text, holding back what might be the
/// start of one.
#[derive(Debug, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    held: String,
}

impl StopScanner {
    /// Creates a scanner for these stop sequences (empty ones are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds `text`; appends what is certainly not part of a stop sequence
    /// to `out`. Returns `true` when a stop sequence was found: the text
    /// before it is in `out`, and it and everything after are dropped.
    pub fn push(&mut self, text: &str, out: &mut String) -> bool {
        if self.stops.is_empty() {
            out.push_str(text);
            return false;
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            out.push_str(&self.held[..at]);
            self.held.clear();
            return true;
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let emit = self.held.len() - keep;
        out.push_str(&self.held[..emit]);
        self.held.drain(..emit);
        false
    }

    /// Ends the stream, releasing held text.
    pub fn finish(&mut self, out: &mut String) {
        out.push_str(&self.held);
        self.held.clear();
    }
}

/// Ends the text before the first line indented by fewer than a number of
/// spaces or tabs (a code completion that leaves its block), as llama.cpp's
/// `n_indent` does: the first line is free, a line's indentation stays,
/// and the text is cut where the line's first other character (a line
/// break included) would be.
#[derive(Debug, Default)]
pub struct IndentStop {
    min: usize,
    /// The indentation of the line under way, while only blanks began it;
    /// `None` on the first line and once a line has other text.
    line: Option<usize>,
}

impl IndentStop {
    /// Lines indented by fewer than `min` end the text; 0 never does.
    pub fn new(min: usize) -> Self {
        Self { min, line: None }
    }

    /// Adds `text`, appending to `out` what comes before the cut; `true`
    /// when the text was cut.
    pub fn push(&mut self, text: &str, out: &mut String) -> bool {
        if self.min == 0 {
            out.push_str(text);
            return false;
        }
        for (at, c) in text.char_indices() {
            match (self.line, c) {
                (Some(indent), ' ' | '\t') => self.line = Some(indent + 1),
                (Some(indent), _) if indent < self.min => {
                    out.push_str(&text[..at]);
                    return true;
                }
                (_, '\n') => self.line = Some(0),
                _ => self.line = None,
            }
        }
        out.push_str(text);
        false
    }
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// Splits text into answer content and `<think>` reasoning.
#[derive(Debug, Default)]
pub struct ThinkParser {
    in_thought: bool,
    held: String,
}

impl ThinkParser {
    /// Creates a parser that starts outside a thought.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `text` and appends the events it completes to `events`.
    pub fn push(&mut self, text: &str, events: &mut Vec<InferenceEvent>) {
        self.held.push_str(text);
        loop {
            let tag = if self.in_thought {
                THINK_CLOSE
            } else {
                THINK_OPEN
            };
            match self.held.find(tag) {
                Some(at) => {
                    let before: String = self.held.drain(..at + tag.len()).take(at).collect();
                    self.emit_text(before, events);
                    self.in_thought = !self.in_thought;
                    events.push(InferenceEvent::Thought(if self.in_thought {
                        ThoughtEvent::Start
                    } else {
                        ThoughtEvent::Stop
                    }));
                }
                None => {
                    let keep = partial_suffix(&self.held, tag);
                    let ready: String = self.held.drain(..self.held.len() - keep).collect();
                    self.emit_text(ready, events);
                    return;
                }
            }
        }
    }

    /// Ends the stream: held text is released and an open thought closed.
    pub fn finish(&mut self, events: &mut Vec<InferenceEvent>) {
        let rest = std::mem::take(&mut self.held);
        self.emit_text(rest, events);
        if self.in_thought {
            self.in_thought = false;
            events.push(InferenceEvent::Thought(ThoughtEvent::Stop));
        }
    }

    fn emit_text(&self, text: String, events: &mut Vec<InferenceEvent>) {
        if text.is_empty() {
            return;
        }
        events.push(if self.in_thought {
            InferenceEvent::Thought(ThoughtEvent::Delta(text))
        } else {
            InferenceEvent::Content(text)
        });
    }
}

/// The whole pipeline: bytes in, events out, stop sequences detected, and
/// (when the request offers tools) tool calls taken out of the content.
#[derive(Debug)]
pub(crate) struct TextPipeline {
    utf8: Utf8Decoder,
    indent: IndentStop,
    cut: String,
    stops: StopScanner,
    think: ThinkParser,
    tools: Option<ToolCallParser>,
    scratch: String,
    visible: String,
    staged: Vec<InferenceEvent>,
}

impl TextPipeline {
    pub(crate) fn new(stops: &[String], min_indent: usize) -> Self {
        Self {
            utf8: Utf8Decoder::new(),
            indent: IndentStop::new(min_indent),
            cut: String::new(),
            stops: StopScanner::new(stops),
            think: ThinkParser::new(),
            tools: None,
            scratch: String::new(),
            visible: String::new(),
            staged: Vec::new(),
        }
    }

    /// Takes tool calls in `syntax` out of the content from now on, and
    /// (with `without_markup`) an answer that is only a JSON call of one
    /// of `tools`, other than the calls already answered.
    pub(crate) fn parse_tool_calls(
        &mut self,
        syntax: ToolSyntax,
        without_markup: Option<(&[Tool], AnsweredCalls)>,
    ) {
        let parser = ToolCallParser::new(syntax);
        self.tools = Some(match without_markup {
            Some((tools, answered)) => parser
                .with_calls_without_markup(tools)
                .except_answered(answered),
            None => parser,
        });
    }

    /// How many tool calls were emitted.
    pub(crate) fn tool_calls(&self) -> usize {
        self.tools.as_ref().map_or(0, ToolCallParser::calls)
    }

    /// Feeds one token's bytes; returns `true` if a stop sequence ended the
    /// output.
    pub(crate) fn push(&mut self, bytes: &[u8], events: &mut Vec<InferenceEvent>) -> bool {
        self.scratch.clear();
        self.utf8.push(bytes, &mut self.scratch);
        self.visible.clear();
        self.cut.clear();
        let dedented = self.indent.push(&self.scratch, &mut self.cut);
        let mut stopped = self.stops.push(&self.cut, &mut self.visible);
        if dedented && !stopped {
            // Cut before any stop sequence: what the scanner holds is text.
            self.stops.finish(&mut self.visible);
            stopped = true;
        }
        self.think.push(&self.visible, &mut self.staged);
        self.route(events);
        stopped || self.tools.as_ref().is_some_and(ToolCallParser::wants_stop)
    }

    /// Flushes everything held back. `stopped` says whether a stop sequence
    /// ended the output (then held text belonged to it and is dropped).
    pub(crate) fn finish(&mut self, stopped: bool, events: &mut Vec<InferenceEvent>) {
        self.visible.clear();
        if !stopped {
            self.scratch.clear();
            self.utf8.finish(&mut self.scratch);
            self.cut.clear();
            self.indent.push(&self.scratch, &mut self.cut);
            self.stops.push(&self.cut, &mut self.visible);
            self.stops.finish(&mut self.visible);
        }
        self.think.push(&self.visible, &mut self.staged);
        self.think.finish(&mut self.staged);
        self.route(events);
        if let Some(tools) = &mut self.tools {
            tools.finish(events);
        }
    }

    /// Passes staged events on, content through the tool-call parser.
    fn route(&mut self, events: &mut Vec<InferenceEvent>) {
        for event in self.staged.drain(..) {
            match (&mut self.tools, event) {
                (Some(tools), InferenceEvent::Content(text)) => tools.push(&text, events),
                (_, event) => events.push(event),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(pieces: &[&[u8]]) -> Vec<String> {
        let mut decoder = Utf8Decoder::new();
        let mut out = Vec::new();
        for piece in pieces {
            let mut text = String::new();
            decoder.push(piece, &mut text);
            out.push(text);
        }
        let mut tail = String::new();
        decoder.finish(&mut tail);
        out.push(tail);
        out
    }

    #[test]
    fn characters_split_across_pieces_are_joined() {
        let bytes = "Zoë 東京 🦀".as_bytes();
        // Every split of the byte string into two pieces.
        for cut in 0..=bytes.len() {
            let parts = decode(&[&bytes[..cut], &bytes[cut..]]);
            assert_eq!(parts.concat(), "Zoë 東京 🦀", "cut at {cut}");
        }
        // One byte at a time: nothing is emitted until a character completes.
        let crab = "🦀".as_bytes();
        let parts = decode(&[&crab[..1], &crab[1..2], &crab[2..3], &crab[3..]]);
        assert_eq!(parts, ["", "", "", "🦀", ""]);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(decode(&[b"a\xffb"]).concat(), "a\u{fffd}b");
        // A character cut off by the end of the stream.
        assert_eq!(decode(&[&"é".as_bytes()[..1]]).concat(), "\u{fffd}");
    }

    fn think(pieces: &[&str]) -> Vec<InferenceEvent> {
        let mut parser = ThinkParser::new();
        let mut events = Vec::new();
        for piece in pieces {
            parser.push(piece, &mut events);
        }
        parser.finish(&mut events);
        events
    }

    /// Merges adjacent text events so that results do not depend on how
    /// the parser chose to chunk its output.
    fn merged(events: Vec<InferenceEvent>) -> Vec<InferenceEvent> {
        let mut out: Vec<InferenceEvent> = Vec::new();
        for event in events {
            match (out.last_mut(), event) {
                (Some(InferenceEvent::Content(a)), InferenceEvent::Content(b)) => a.push_str(&b),
                (
                    Some(InferenceEvent::Thought(ThoughtEvent::Delta(a))),
                    InferenceEvent::Thought(ThoughtEvent::Delta(b)),
                ) => a.push_str(&b),
                (_, event) => out.push(event),
            }
        }
        out
    }

    #[test]
    fn think_tags_split_anywhere_become_thought_events() {
        use InferenceEvent::{Content, Thought};
        let text = "<think>plan it</think>Answer <b>bold</b>";
        let expected = vec![
            Thought(ThoughtEvent::Start),
            Thought(ThoughtEvent::Delta("plan it".into())),
            Thought(ThoughtEvent::Stop),
            Content("Answer <b>bold</b>".into()),
        ];
        for a in 0..=text.len() {
            for b in a..=text.len() {
                let events = think(&[&text[..a], &text[a..b], &text[b..]]);
                assert_eq!(merged(events), expected, "cuts at {a} and {b}");
            }
        }
        // One character per piece.
        let pieces: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        assert_eq!(merged(think(&pieces)), expected);
    }

    #[test]
    fn unterminated_thought_is_closed_and_lone_angle_is_content() {
        use InferenceEvent::{Content, Thought};
        assert_eq!(
            merged(think(&["<thi", "nk>still thinking"])),
            vec![
                Thought(ThoughtEvent::Start),
                Thought(ThoughtEvent::Delta("still thinking".into())),
                Thought(ThoughtEvent::Stop),
            ]
        );
        assert_eq!(
            merged(think(&["a <", "thin"])),
            vec![Content("a <thin".into())]
        );
    }

    #[test]
    fn a_line_indented_less_than_asked_ends_the_text_before_it() {
        let mut stop = IndentStop::new(4);
        let mut out = String::new();
        // The first line is free; indented lines pass.
        assert!(!stop.push("x = 1\n    y", &mut out));
        assert!(!stop.push(" = 2\n  ", &mut out));
        // Two blanks, then text: cut before it, the blanks kept.
        assert!(stop.push("z = 3\n", &mut out));
        assert_eq!(out, "x = 1\n    y = 2\n  ");
        let mut stop = IndentStop::new(4);
        let mut out = String::new();
        assert!(stop.push("a\n  b", &mut out));
        assert_eq!(out, "a\n  ");
        // A blank line ends it too, as in llama.cpp.
        let mut stop = IndentStop::new(2);
        let mut out = String::new();
        assert!(stop.push("a\n\nb", &mut out));
        assert_eq!(out, "a\n");
        let mut stop = IndentStop::new(0);
        let mut out = String::new();
        assert!(!stop.push("a\nb", &mut out));
    }

    #[test]
    fn an_indent_cut_releases_what_stop_sequences_held() {
        let mut pipeline = TextPipeline::new(&["\n\n\n".to_string()], 4);
        let mut events = Vec::new();
        assert!(!pipeline.push(b"if x:\n    y()\n", &mut events));
        assert!(pipeline.push(b"z", &mut events));
        pipeline.finish(true, &mut events);
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                InferenceEvent::Content(text) => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "if x:\n    y()\n");
    }

    #[test]
    fn stop_sequences_are_found_across_pieces_and_removed() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        let mut scanner = StopScanner::new(&stops);
        let mut out = String::new();
        assert!(!scanner.push("Tokyo is E", &mut out));
        assert_eq!(out, "Tokyo is ", "the possible start of END is held back");
        assert!(!scanner.push("N", &mut out));
        assert!(scanner.push("Dless", &mut out));
        assert_eq!(out, "Tokyo is ");

        let mut scanner = StopScanner::new(&stops);
        let mut out = String::new();
        assert!(!scanner.push("a\n", &mut out));
        assert!(!scanner.push("b E", &mut out));
        scanner.finish(&mut out);
        assert_eq!(out, "a\nb E", "a false start is released at the end");
    }

    #[test]
    fn pipeline_joins_the_stages() {
        let mut pipeline = TextPipeline::new(&["STOP".to_string()], 0);
        let mut events = Vec::new();
        let bytes = "<think>é</think>ok STOP hidden".as_bytes();
        let mut stopped = false;
        for byte in bytes {
            if pipeline.push(std::slice::from_ref(byte), &mut events) {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        pipeline.finish(true, &mut events);
        use InferenceEvent::{Content, Thought};
        assert_eq!(
            merged(events),
            vec![
                Thought(ThoughtEvent::Start),
                Thought(ThoughtEvent::Delta("é".into())),
                Thought(ThoughtEvent::Stop),
                Content("ok ".into()),
            ]
        );
    }
}

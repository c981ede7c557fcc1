//! Comparing what a step produced with what its case expects.

use rusty_genius::core::protocol::{
    AssetEvent, BrainstemOutput, EngineStatus, InferenceEvent, ThoughtEvent, Usage,
};

use crate::case::Expect;

/// What one step produced.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// Event names in arrival order, runs of one name merged (`Content×12`).
    pub(crate) events: Vec<(String, usize)>,
    /// The answer text (all `Content`).
    pub(crate) text: String,
    pub(crate) errors: Vec<String>,
    pub(crate) usage: Option<Usage>,
    pub(crate) content_events: usize,
}

impl Seen {
    pub(crate) fn record(&mut self, output: BrainstemOutput) {
        let name = match &output {
            BrainstemOutput::Event(event) => match event {
                InferenceEvent::ProcessStart => "ProcessStart",
                InferenceEvent::Thought(ThoughtEvent::Start) => "ThoughtStart",
                InferenceEvent::Thought(ThoughtEvent::Delta(_)) => "ThoughtDelta",
                InferenceEvent::Thought(ThoughtEvent::Stop) => "ThoughtStop",
                InferenceEvent::Content(text) => {
                    self.text.push_str(text);
                    self.content_events += 1;
                    "Content"
                }
                InferenceEvent::Usage(usage) => {
                    self.usage = Some(usage.clone());
                    "Usage"
                }
                InferenceEvent::Complete => "Complete",
                _ => "OtherEvent",
            },
            BrainstemOutput::Asset(asset) => match asset {
                AssetEvent::Started(_) => "AssetStarted",
                AssetEvent::Progress(..) => "AssetProgress",
                AssetEvent::Complete(_) => "AssetComplete",
                AssetEvent::Error(_) => "AssetError",
                _ => "OtherAsset",
            },
            BrainstemOutput::Error(message) => {
                self.errors.push(message.clone());
                "Error"
            }
            BrainstemOutput::Status(status) => match status {
                EngineStatus::Loading(_) => "Loading",
                EngineStatus::Loaded(_) => "Loaded",
                EngineStatus::Hibernated(_) => "Hibernated",
                EngineStatus::Unloaded => "Unloaded",
                _ => "OtherStatus",
            },
            _ => "Other",
        };
        match self.events.last_mut() {
            Some((last, count)) if last == name => *count += 1,
            _ => self.events.push((name.to_owned(), 1)),
        }
    }

    pub(crate) fn event_list(&self) -> String {
        let names: Vec<String> = self
            .events
            .iter()
            .map(|(name, n)| {
                if *n == 1 {
                    name.clone()
                } else {
                    format!("{name}×{n}")
                }
            })
            .collect();
        if names.is_empty() {
            "nothing".into()
        } else {
            names.join(", ")
        }
    }
}

/// Every expectation that does not hold, each with expected and actual.
pub(crate) fn check_step(expect: &Expect, seen: &Seen, previous: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    let text = &seen.text;
    let mut fail = |expected: String, actual: String| {
        problems.push(format!(
            "  - expected: {expected}\n    +   actual: {actual}"
        ));
    };
    for needle in &expect.contains {
        if !text.contains(needle.as_str()) {
            fail(format!("text containing {needle:?}"), format!("{text:?}"));
        }
    }
    for needle in &expect.not_contains {
        if text.contains(needle.as_str()) {
            fail(format!("text without {needle:?}"), format!("{text:?}"));
        }
    }
    if let Some(pattern) = &expect.matches {
        if !glob_matches(pattern, text) {
            fail(format!("text matching {pattern:?}"), format!("{text:?}"));
        }
    }
    if let Some(exact) = &expect.equals {
        if text != exact {
            fail(format!("text {exact:?}"), format!("{text:?}"));
        }
    }
    if let Some(same) = expect.same_as_previous {
        match previous {
            None => fail("a previous inference to compare with".into(), "none".into()),
            Some(previous) if (previous == text) != same => fail(
                format!(
                    "text {} the previous answer {previous:?}",
                    if same { "equal to" } else { "different from" }
                ),
                format!("{text:?}"),
            ),
            _ => {}
        }
    }
    if !expect.events.is_empty() {
        let actual: Vec<&str> = seen.events.iter().map(|(name, _)| name.as_str()).collect();
        let mut at = 0;
        for wanted in &expect.events {
            match actual[at..].iter().position(|name| name == wanted) {
                Some(offset) => at += offset + 1,
                None => {
                    fail(
                        format!(
                            "events in order {}  (missing: {wanted})",
                            expect.events.join(", ")
                        ),
                        seen.event_list(),
                    );
                    break;
                }
            }
        }
    }
    match (&expect.error, seen.errors.as_slice()) {
        (Some(wanted), errors) if !errors.iter().any(|e| e.contains(wanted.as_str())) => fail(
            format!("an error containing {wanted:?}"),
            format!("errors {errors:?}"),
        ),
        (None, errors) if !errors.is_empty() => {
            fail("no error".into(), format!("errors {errors:?}"))
        }
        _ => {}
    }
    let usage = seen.usage.as_ref();
    let tokens = usage.map(|u| u.generated_tokens);
    if let Some(min) = expect.min_tokens {
        if tokens.is_none_or(|t| t < min) {
            fail(
                format!("at least {min} generated tokens"),
                format!("{tokens:?}"),
            );
        }
    }
    if let Some(max) = expect.max_tokens {
        if tokens.is_none_or(|t| t > max) {
            fail(
                format!("at most {max} generated tokens"),
                format!("{tokens:?}"),
            );
        }
    }
    if let Some(finish) = &expect.finish {
        let actual = usage.map(|u| format!("{:?}", u.finish_reason));
        if actual.as_deref() != Some(finish.as_str()) {
            fail(format!("finish reason {finish}"), format!("{actual:?}"));
        }
    }
    if let Some(min) = expect.min_cached_tokens {
        let cached = usage.map(|u| u.cached_tokens);
        if cached.is_none_or(|c| c < min) {
            fail(
                format!("at least {min} reused prompt tokens"),
                format!("{cached:?}"),
            );
        }
    }
    problems
}

/// `*` matches any text (also none); everything else matches itself.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

    #[test]
    fn globs() {
        assert!(glob_matches("*Tokyo*", " Tokyo, Japan"));
        assert!(glob_matches("a*b*c", "a-b-c"));
        assert!(!glob_matches("a*b*c", "a-c-b"));
        assert!(!glob_matches("ab*ba", "aba"));
        assert!(glob_matches("exact", "exact"));
    }
}

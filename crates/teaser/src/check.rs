//! Comparing what a step produced with what its case expects.

use rusty_genius::stem::testing::{output_name, Reply, MIN_MARGIN};

use crate::case::Expect;

/// Every expectation that does not hold, each with expected and actual.
pub(crate) fn check_step(expect: &Expect, seen: &Reply, previous: Option<&str>) -> Vec<String> {
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
        let actual: Vec<&str> = seen.outputs.iter().map(output_name).collect();
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
    let errors: Vec<&str> = seen.errors.iter().map(|e| e.message.as_str()).collect();
    match (&expect.error, errors.as_slice()) {
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
    if let Some(calls) = &expect.tool_calls {
        let actual: Vec<(String, serde_json::Value)> = seen
            .tool_calls
            .iter()
            .map(|(_, name, arguments)| (name.clone(), arguments.clone()))
            .collect();
        let wanted: Vec<(String, serde_json::Value)> = calls
            .iter()
            .map(|call| (call.name.clone(), call.arguments.clone()))
            .collect();
        if actual != wanted {
            fail(format!("tool calls {wanted:?}"), format!("{actual:?}"));
        }
    }
    if let Some(schema) = &expect.json_schema {
        match jsonschema::validator_for(schema) {
            Err(err) => fail("a valid JSON schema in the case".into(), err.to_string()),
            Ok(validator) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(value) if validator.is_valid(&value) => {}
                Ok(value) => fail("JSON that follows the schema".into(), value.to_string()),
                Err(err) => fail("JSON".into(), format!("{text:?} ({err})")),
            },
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

/// Whether the step's text expectations compare the answer with fixed
/// text (and so rest on every token that leads up to it).
pub(crate) fn expects_text(expect: &Expect) -> bool {
    !expect.contains.is_empty()
        || !expect.not_contains.is_empty()
        || expect.matches.is_some()
        || expect.equals.is_some()
        || expect
            .tool_calls
            .as_ref()
            .is_some_and(|calls| !calls.is_empty())
}

/// Whether the step's text expectations are on JSON (tool calls), where
/// a choice of layout decides nothing.
pub(crate) fn expects_json(expect: &Expect) -> bool {
    expect
        .tool_calls
        .as_ref()
        .is_some_and(|calls| !calls.is_empty())
        && expect.contains.is_empty()
        && expect.matches.is_none()
        && expect.equals.as_deref().is_none_or(str::is_empty)
}

/// How many bytes of the answer decide the step's text expectations: up to
/// the end of the first occurrence of every `contains` string, or the
/// whole answer for `equals`, `matches` and `not_contains`.
pub(crate) fn deciding_bytes(expect: &Expect, text: &str) -> usize {
    if expect
        .tool_calls
        .as_ref()
        .is_some_and(|calls| !calls.is_empty())
    {
        // The calls are made of the whole generated output (their markup
        // never reaches the text): every token decides them.
        return usize::MAX;
    }
    if expect.equals.is_some() || expect.matches.is_some() || !expect.not_contains.is_empty() {
        return text.len();
    }
    expect
        .contains
        .iter()
        .map(|needle| {
            text.find(needle.as_str())
                .map_or(text.len(), |at| at + needle.len())
        })
        .max()
        .unwrap_or(0)
}

/// The portability check of a greedy real-model step: every token that
/// decides its expected text must have been chosen by at least
/// [`MIN_MARGIN`]. Returns a problem for each one that was not.
pub(crate) fn check_margins(expect: &Expect, seen: &Reply) -> Vec<String> {
    let bytes = deciding_bytes(expect, &seen.text);
    let margins = if expects_json(expect) {
        seen.json_margins_through(bytes)
    } else {
        seen.margins_through(bytes)
    };
    if margins.is_empty() && bytes > 0 && !seen.text.is_empty() {
        return vec![format!(
            "  - expected: log-probabilities for the {bytes} deciding bytes\n    +   actual: none reported"
        )];
    }
    let mut problems = Vec::new();
    let mut prefix = String::new();
    for ((token, margin), logprobs) in margins.iter().zip(&seen.logprobs) {
        if *margin < MIN_MARGIN {
            let runner_up = logprobs
                .top_logprobs
                .get(1)
                .map_or("?", |top| top.token.as_str());
            problems.push(format!(
                "  - expected: every deciding token chosen by at least {MIN_MARGIN} logits (a near tie can flip on another CPU)\n    +   actual: after {prefix:?}, {token:?} beat {runner_up:?} by only {margin:.3}"
            ));
        }
        prefix.push_str(token);
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

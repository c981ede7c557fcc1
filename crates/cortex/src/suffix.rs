//! Text held back while streaming: the part at the end that might be the
//! start of a marker (a stop sequence, a `<think>` tag, a tool call's
//! opening), which the text and tool-call pipelines both need.

/// The length of the longest suffix of `text` that is a proper prefix of
/// `pattern`, cut at a character boundary.
pub(crate) fn partial_suffix(text: &str, pattern: &str) -> usize {
    let max = pattern.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && pattern.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::partial_suffix;

    #[test]
    fn finds_the_start_of_a_marker_at_the_end() {
        assert_eq!(partial_suffix("hello <too", "<tool_call>"), 4);
        assert_eq!(partial_suffix("hello", "<tool_call>"), 0);
        // The whole marker is not a partial one.
        assert_eq!(partial_suffix("x</s>", "</s>"), 0);
        // Never inside a character.
        assert_eq!(partial_suffix("a\u{e9}", "\u{e9}b"), 2);
    }
}

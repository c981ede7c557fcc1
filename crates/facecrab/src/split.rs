//! Models split over several GGUF files.
//!
//! Large models are published as `name-00001-of-00003.gguf`,
//! `name-00002-of-00003.gguf`, ... (the naming llama.cpp's `gguf-split`
//! writes and its loader expects). llama.cpp loads such a model from the
//! path of the first part and finds the others beside it, so facecrab
//! fetches every part into one snapshot folder and hands out the first.

/// The part names of the split model that `file` belongs to, first part
/// first; `None` if `file` is not named as a part.
pub(crate) fn parts_of(file: &str) -> Option<Vec<String>> {
    let (dir, name) = match file.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, file),
    };
    let (prefix, _, count) = parse(name)?;
    Some(
        (1..=count)
            .map(|no| {
                let part = part_name(prefix, no, count);
                match dir {
                    Some(dir) => format!("{dir}/{part}"),
                    None => part,
                }
            })
            .collect(),
    )
}

/// The file to load when `files` hold exactly one model: a lone file, or
/// every part of one split model (any order).
pub(crate) fn one_model(files: &[String]) -> Option<&String> {
    if let [only] = files {
        return Some(only);
    }
    let first = files.iter().find(|f| {
        let name = f.rsplit('/').next().unwrap_or(f);
        parse(name).is_some_and(|(_, no, _)| no == 1)
    })?;
    let mut expected = parts_of(first)?;
    let mut found = files.to_vec();
    expected.sort();
    found.sort();
    (expected == found).then_some(first)
}

/// `prefix-NNNNN-of-MMMMM.gguf` -> `(prefix, N, M)`, with `1 <= N <= M`.
fn parse(name: &str) -> Option<(&str, u32, u32)> {
    let stem = strip_suffix_ignore_case(name, ".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let number = |digits: &str| {
        (digits.len() == 5 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u32>().ok())
            .flatten()
    };
    let (no, count) = (number(no)?, number(count)?);
    (!prefix.is_empty() && no >= 1 && no <= count).then_some((prefix, no, count))
}

fn part_name(prefix: &str, no: u32, count: u32) -> String {
    format!("{prefix}-{no:05}-of-{count:05}.gguf")
}

fn strip_suffix_ignore_case<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    let cut = name.len().checked_sub(suffix.len())?;
    (name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case(suffix)).then(|| &name[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_part_names_all_its_siblings() {
        assert_eq!(
            parts_of("q4/big-q4_k_m-00002-of-00003.gguf").unwrap(),
            strings(&[
                "q4/big-q4_k_m-00001-of-00003.gguf",
                "q4/big-q4_k_m-00002-of-00003.gguf",
                "q4/big-q4_k_m-00003-of-00003.gguf",
            ])
        );
        assert_eq!(parts_of("model-q4_k_m.gguf"), None);
        assert_eq!(parts_of("model-00004-of-00003.gguf"), None);
        assert_eq!(parts_of("model-00000-of-00003.gguf"), None);
        assert_eq!(parts_of("model-1-of-3.gguf"), None);
        assert_eq!(parts_of("-00001-of-00002.gguf"), None);
    }

    #[test]
    fn one_model_is_a_lone_file_or_one_complete_split() {
        let lone = strings(&["a-Q4_K_M.gguf"]);
        assert_eq!(one_model(&lone), Some(&lone[0]));
        let split = strings(&[
            "a-Q4_K_M-00002-of-00002.gguf",
            "a-Q4_K_M-00001-of-00002.gguf",
        ]);
        assert_eq!(one_model(&split), Some(&split[1]));
        let missing = strings(&[
            "a-Q4_K_M-00001-of-00003.gguf",
            "a-Q4_K_M-00002-of-00003.gguf",
        ]);
        assert_eq!(one_model(&missing), None);
        let two = strings(&["a-Q4_K_M.gguf", "b-Q4_K_M.gguf"]);
        assert_eq!(one_model(&two), None);
        let mixed = strings(&[
            "a-Q4_K_M-00001-of-00002.gguf",
            "a-Q4_K_M-00002-of-00002.gguf",
            "b-Q4_K_M.gguf",
        ]);
        assert_eq!(one_model(&mixed), None);
        assert_eq!(one_model(&[]), None);
    }
}

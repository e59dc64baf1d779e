//! `huse.toml`, the project file: defaults for the environment variables an experiment and
//! the command line read (`HUSE_ASSETS`, `HUSE_DB`, ...), so that an installed `huse-run`
//! works in a project without exporting them on every call. It is found as Cargo finds
//! `.cargo/config.toml`: the first `huse.toml` in the working directory or one above it.
//!
//! ```toml
//! [env]
//! HUSE_ASSETS = { value = "../shared/assets", relative = true }   # relative to this file
//! HUSE_DB = "results/runs.sqlite"
//! ```
//!
//! A variable already set in the environment wins. Nothing else is read from the file (an
//! unknown table or key is an error naming it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file's name.
pub const FILE: &str = "huse.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectFile {
    /// Defaults of environment variables.
    #[serde(default)]
    env: BTreeMap<String, EnvValue>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EnvValue {
    Plain(String),
    Detailed {
        value: String,
        #[serde(default)]
        relative: bool,
    },
}

/// The first `huse.toml` in `dir` or a folder above it.
pub fn find(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().map(|d| d.join(FILE)).find(|f| f.is_file())
}

/// The variables `file` sets, values resolved (`relative = true`: against the file's folder).
pub fn read(file: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let parsed: ProjectFile = toml::from_str(&text).map_err(|e| {
        // toml's message starts with the line and column when it knows them.
        let at = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{column}")
            })
            .unwrap_or_default();
        format!("{}{at}: {}", file.display(), e.message())
    })?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (key, v) in parsed.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(format!("{}: env.`{key}` is not a variable name", file.display()));
        }
        let value = match v {
            EnvValue::Plain(s) => s,
            EnvValue::Detailed { value, relative: false } => value,
            EnvValue::Detailed { value, relative: true } => dir.join(value).display().to_string(),
        };
        out.push((key, value));
    }
    Ok(out)
}

/// Sets the variables of the project file above the working directory that the environment
/// does not set. Returns the file used. Must run before any other thread starts.
pub fn apply_defaults() -> Result<Option<PathBuf>, String> {
    let Ok(cwd) = std::env::current_dir() else { return Ok(None) };
    let Some(file) = find(&cwd) else { return Ok(None) };
    for (k, v) in read(&file)? {
        if std::env::var_os(&k).is_none() {
            // SAFETY: called at the start of `main`, while the process has one thread.
            unsafe { std::env::set_var(&k, v) };
        }
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_nearest_file_above_and_resolves_relative_values() {
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        assert_eq!(find(&inner), None);
        std::fs::write(
            d.path().join(FILE),
            "[env]\nHUSE_DB = \"x.sqlite\"\nHUSE_ASSETS = { value = \"../assets\", relative = true }\n",
        )
        .unwrap();
        let f = find(&inner).unwrap();
        assert_eq!(f, d.path().join(FILE));
        let vars = read(&f).unwrap();
        assert_eq!(
            vars,
            vec![
                ("HUSE_ASSETS".to_string(), d.path().join("../assets").display().to_string()),
                ("HUSE_DB".to_string(), "x.sqlite".to_string())
            ]
        );
        // A nearer file wins.
        std::fs::write(d.path().join("a").join(FILE), "").unwrap();
        assert_eq!(find(&inner).unwrap(), d.path().join("a").join(FILE));
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join(FILE);
        std::fs::write(&f, "[env]\nHUSE_DB = 3\n").unwrap();
        let e = read(&f).unwrap_err();
        assert!(e.starts_with(&format!("{}:2:", f.display())), "{e}");
        std::fs::write(&f, "[envs]\nA = \"b\"\n").unwrap();
        let e = read(&f).unwrap_err();
        assert!(e.contains(":1:") && e.contains("envs"), "{e}");
    }
}

//! `huse-registry`: the stage kinds an experiment's `uses:` can name, and the loader of
//! dynamic stage plugins.
//!
//! A [`Registry`] maps a kind to its [`Stage`] and where it came from (`builtin`, or
//! `plugin:<path>@<version>`, which enters cache keys). The `huse-run` binary registers
//! the built-in stages; [`Registry::load_plugin`] opens a shared library speaking the
//! `huse-plugin` C ABI ([`plugin`]) and adds its stages. A plugin cannot shadow a kind that
//! another source provides.
//!
//! ```
//! use huse_registry::Registry;
//! let mut r = Registry::default();
//! for s in huse_stage_toy::stages() {
//!     r.add(std::sync::Arc::from(s), "builtin");
//! }
//! assert!(r.get("toy-sum").is_some());
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use huse_stage_api::Stage;

pub mod plugin;

/// A stage implementation and where it came from.
#[derive(Clone)]
pub struct Entry {
    /// The implementation.
    pub stage: Arc<dyn Stage>,
    /// `builtin`, or the plugin's path and version.
    pub source: String,
}

/// Stage kinds by name.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl Registry {
    /// Registers `stage` under its kind; a later registration of the same kind replaces it.
    pub fn add(&mut self, stage: Arc<dyn Stage>, source: &str) {
        self.entries.insert(stage.kind().to_string(), Entry { stage, source: source.to_string() });
    }

    /// Loads the plugin at `path` and registers its stages; returns their kinds. A kind
    /// already registered by another source is an error (a plugin cannot shadow a stage).
    pub fn load_plugin(&mut self, path: &std::path::Path) -> Result<Vec<String>, String> {
        // An absolute path, so that the loader never searches the system's library path
        // for a bare name (`plug.so` means ./plug.so, not some installed library).
        let path = &std::path::absolute(path).map_err(|e| format!("plugin {}: {e}", path.display()))?;
        let (stages, source) = plugin::load(path)?;
        let mut kinds = Vec::new();
        for s in stages {
            let kind = s.kind().to_string();
            match self.entries.get(&kind) {
                Some(e) if e.source == source => {}
                Some(e) => {
                    return Err(format!(
                        "plugin {} offers stage kind `{kind}`, which {} already provides",
                        path.display(),
                        e.source
                    ));
                }
                None => self.add(s, &source),
            }
            kinds.push(kind);
        }
        Ok(kinds)
    }

    /// The entry of `kind`.
    pub fn get(&self, kind: &str) -> Option<&Entry> {
        self.entries.get(kind)
    }

    /// Every registered kind, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Every (kind, entry), sorted by kind.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The headline metrics (keys or globs) of every kind, as the stages declare them.
    pub fn headline(&self) -> Vec<String> {
        let mut out: Vec<String> = self.entries.values().flat_map(|e| e.stage.headline()).collect();
        out.sort();
        out.dedup();
        out
    }
}

//! The registry of stage implementations: what a YAML `uses:` can name.
//!
//! Built-in stages are registered here, in one place; plugins add theirs at load time.

use std::collections::BTreeMap;
use std::sync::Arc;

use huse_stage_api::Stage;

/// A stage implementation and where it came from.
#[derive(Clone)]
pub struct Entry {
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
    /// The registry with every built-in stage.
    pub fn builtin() -> Self {
        let mut r = Registry::default();
        for s in huse_stage_toy::stages() {
            r.add(Arc::from(s), "builtin");
        }
        r.add(Arc::new(huse_stage_ingest::Ingest), "builtin");
        r.add(Arc::new(huse_stage_graph::SentenceGraph), "builtin");
        r.add(Arc::new(huse_stage_graph::TreeGraph), "builtin");
        r.add(Arc::new(huse_stage_encode::Encode), "builtin");
        r.add(Arc::new(huse_stage_train::Train), "builtin");
        r.add(Arc::new(huse_stage_evaluate::Evaluate), "builtin");
        r
    }

    /// Registers `stage` under its kind; a later registration of the same kind replaces it.
    pub fn add(&mut self, stage: Arc<dyn Stage>, source: &str) {
        self.entries.insert(stage.kind().to_string(), Entry { stage, source: source.to_string() });
    }

    /// Loads the plugin at `path` and registers its stages; returns their kinds. A kind
    /// already registered by another source is an error (a plugin cannot shadow a stage).
    pub fn load_plugin(&mut self, path: &std::path::Path) -> Result<Vec<String>, String> {
        let (stages, source) = crate::plugin::load(path)?;
        let mut kinds = Vec::new();
        for s in stages {
            let kind = s.kind().to_string();
            match self.entries.get(&kind) {
                Some(e) if e.source == source => {}
                Some(e) => return Err(format!("plugin {} offers stage kind `{kind}`, which {} already provides", path.display(), e.source)),
                None => self.add(s, &source),
            }
            kinds.push(kind);
        }
        Ok(kinds)
    }

    pub fn get(&self, kind: &str) -> Option<&Entry> {
        self.entries.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }
}

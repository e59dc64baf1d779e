//! The names of the artifacts the HUSE stages exchange. A stage declares its inputs and
//! outputs with these values and reads or writes files of the same names, so a rename
//! happens in one place and cannot break the wiring between crates.

use std::fmt;
use std::path::Path;

/// One artifact (a file inside a stage's output directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Artifact {
    /// `items.jsonl`: every usable item with its class and split (ingest).
    Items,
    /// `classes.json`: the class hierarchy (ingest).
    Classes,
    /// `graph.safetensors`: the semantic graph `A` (K x K) (graph, graph-tree, plugins).
    Graph,
    /// `graph.json`: how the graph was made and the class names (graph).
    GraphMeta,
    /// `image.safetensors`: image features, one row per item (encode).
    ImageFeatures,
    /// `text.safetensors`: BERT text features, one row per item (encode).
    TextFeatures,
    /// `tfidf.safetensors`: TF-IDF rows as CSR (encode).
    Tfidf,
    /// `tfidf.json`: the TF-IDF vocabulary and idf (encode).
    TfidfVocab,
    /// `ids.json`: the item id of every feature row (encode).
    Ids,
    /// `model.safetensors`: the trained towers (train).
    Model,
    /// `model.json`: network shape, features used, fusion weight (train).
    ModelMeta,
    /// `history.json`: per-epoch figures (train).
    History,
    /// `metrics.json`: every evaluation metric (evaluate).
    Metrics,
    /// `tables.md`: the paper's Tables 1-3 (evaluate).
    Tables,
    /// `gallery.json`: the top results of a fixed set of test queries (evaluate).
    Gallery,
}

impl Artifact {
    /// The file name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Artifact::Items => "items.jsonl",
            Artifact::Classes => "classes.json",
            Artifact::Graph => "graph.safetensors",
            Artifact::GraphMeta => "graph.json",
            Artifact::ImageFeatures => "image.safetensors",
            Artifact::TextFeatures => "text.safetensors",
            Artifact::Tfidf => "tfidf.safetensors",
            Artifact::TfidfVocab => "tfidf.json",
            Artifact::Ids => "ids.json",
            Artifact::Model => "model.safetensors",
            Artifact::ModelMeta => "model.json",
            Artifact::History => "history.json",
            Artifact::Metrics => "metrics.json",
            Artifact::Tables => "tables.md",
            Artifact::Gallery => "gallery.json",
        }
    }
}

impl AsRef<str> for Artifact {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<Path> for Artifact {
    fn as_ref(&self) -> &Path {
        Path::new(self.as_str())
    }
}

impl fmt::Display for Artifact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

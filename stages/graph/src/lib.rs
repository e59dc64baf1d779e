//! The graph stages: the class-distance matrix `A` (K x K) that HUSE's graph loss uses.
//!
//! * `graph`: every level of every class path is embedded by a sentence encoder (masked
//!   mean of the last layer, L2-normalised); a class's vector is its levels' embeddings
//!   concatenated; `A_ij` is the cosine distance `1 - cos` between the vectors of classes
//!   i and j. (With unit-norm levels, that is one minus the mean of the per-level cosines.)
//! * `graph-tree`: from the hierarchy alone: `A_ij = (D - c_ij) / D`, with `D` the depth and
//!   `c_ij` the number of levels the two paths share (the depth of their lowest common
//!   ancestor): 0 for the same class, 1 for classes under different roots.
//!
//! Output: `graph.safetensors` (tensor `A`, f32) and `graph.json` (class names, variant).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use huse_data::{Artifact, ClassTree};
use huse_encoders::model_ref;
use huse_encoders::text::TextEncoder;
use huse_stage_api::{Config, ConfigError, Context, Input, Inputs, Output, Stage, StageError, parse_config};
use serde::Deserialize;

/// `graph`: A from sentence embeddings of the class-path levels.
pub struct SentenceGraph;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SentenceCfg {
    /// Sentence encoder: a local directory or `hf:org/name[@revision]`.
    model: String,
}

/// `graph-tree`: A from the class tree alone.
pub struct TreeGraph;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TreeCfg {}

fn write(ctx: &Context, a: Vec<f32>, tree: &ClassTree, variant: &str) -> Result<(), StageError> {
    let k = tree.classes.len();
    let t = Tensor::from_vec(a, (k, k), &Device::Cpu).map_err(StageError::of)?;
    t.save_safetensors("A", ctx.out_dir.join(Artifact::Graph)).map_err(StageError::of)?;
    let names: Vec<&str> = tree.classes.iter().map(|c| c.name.as_str()).collect();
    std::fs::write(
        ctx.out_dir.join(Artifact::GraphMeta),
        serde_json::to_vec_pretty(&serde_json::json!({"variant": variant, "classes": names})).unwrap(),
    )?;
    Ok(())
}

/// Cosine distances between the rows of `v` (K x dim, rows any norm).
pub fn cosine_distances(v: &[Vec<f32>]) -> Vec<f32> {
    let norms: Vec<f32> = v.iter().map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12)).collect();
    let k = v.len();
    let mut a = vec![0f32; k * k];
    for i in 0..k {
        for j in 0..k {
            let dot: f32 = v[i].iter().zip(&v[j]).map(|(x, y)| x * y).sum();
            a[i * k + j] = if i == j { 0.0 } else { (1.0 - dot / (norms[i] * norms[j])).max(0.0) };
        }
    }
    a
}

/// The tree distance matrix.
pub fn tree_distances(tree: &ClassTree) -> Vec<f32> {
    let k = tree.classes.len();
    let d = tree.depth().max(1) as f32;
    let mut a = vec![0f32; k * k];
    for i in 0..k {
        for j in 0..k {
            a[i * k + j] = (d - tree.common_depth(i, j) as f32) / d;
        }
    }
    a
}

impl Stage for SentenceGraph {
    fn light(&self) -> bool {
        // A few hundred class names: seconds, whatever the data set's size.
        true
    }
    fn kind(&self) -> &str {
        "graph"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "class-distance matrix from sentence embeddings of each class-path level"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(SentenceCfg).to_value())
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::one(Artifact::Classes)]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![
            Output::new(Artifact::Graph, "A (K x K cosine distances)"),
            Output::new(Artifact::GraphMeta, "class names"),
        ]
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let c: SentenceCfg = parse_config(config)?;
        c.model.parse::<model_ref::ModelRef>().map(|_| ()).map_err(|e| ConfigError::at("model", e))
    }
    fn reads(&self, config: &Config) -> Vec<PathBuf> {
        parse_config::<SentenceCfg>(config)
            .ok()
            .and_then(|c| c.model.parse::<model_ref::ModelRef>().ok())
            .map(|m| m.local_paths())
            .unwrap_or_default()
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let c: SentenceCfg = parse_config(config)?;
        let tree = ClassTree::read(inputs.get(Artifact::Classes)?).map_err(StageError::of)?;
        let dir = c
            .model
            .parse::<model_ref::ModelRef>()
            .map_err(StageError::of)?
            .resolve(model_ref::TEXT_MODEL_FILES)
            .map_err(StageError::of)?;
        let enc = TextEncoder::load(&dir, &Device::Cpu, None).map_err(StageError::of)?;
        // Embed every distinct level name once.
        let depth = tree.depth();
        let mut names: Vec<&str> = tree.classes.iter().flat_map(|c| c.path.iter().map(String::as_str)).collect();
        names.sort_unstable();
        names.dedup();
        ctx.progress.start("embed class names", Some(names.len() as u64), "names");
        let mut emb = std::collections::HashMap::new();
        for chunk in names.chunks(64) {
            ctx.cancel.check()?;
            let e: Vec<Vec<f32>> = enc.sentence(chunk).map_err(StageError::of)?.to_vec2().map_err(StageError::of)?;
            for (n, v) in chunk.iter().zip(e) {
                emb.insert(*n, v);
            }
            ctx.progress.inc(chunk.len() as u64);
        }
        let dim = enc.hidden_size();
        let vecs: Vec<Vec<f32>> = tree
            .classes
            .iter()
            .map(|c| {
                let mut v = Vec::with_capacity(depth * dim);
                for l in 0..depth {
                    // A shorter path repeats its leaf for the missing levels.
                    let name = c.path.get(l).or(c.path.last()).unwrap();
                    v.extend_from_slice(&emb[name.as_str()]);
                }
                v
            })
            .collect();
        let a = cosine_distances(&vecs);
        log_stats(ctx, &a, tree.classes.len());
        write(ctx, a, &tree, "sentence")
    }
}

fn log_stats(ctx: &Context, a: &[f32], k: usize) {
    let off: Vec<f32> = (0..k * k).filter(|i| i / k != i % k).map(|i| a[i]).collect();
    let mean = off.iter().sum::<f32>() / off.len().max(1) as f32;
    ctx.metrics.log("graph.classes", 0, k as f64);
    ctx.metrics.log("graph.a_mean", 0, f64::from(mean));
    ctx.metrics.log("graph.a_min_offdiag", 0, f64::from(off.iter().copied().fold(f32::INFINITY, f32::min)));
}

impl Stage for TreeGraph {
    fn light(&self) -> bool {
        // A few hundred class names: seconds, whatever the data set's size.
        true
    }
    fn kind(&self) -> &str {
        "graph-tree"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "class-distance matrix from the depth of the lowest common ancestor"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(TreeCfg).to_value())
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::one(Artifact::Classes)]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![Output::new(Artifact::Graph, "A (K x K tree distances)"), Output::new(Artifact::GraphMeta, "class names")]
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        parse_config::<TreeCfg>(config).map(|_| ())
    }
    fn run(&self, ctx: &Context, _config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let tree = ClassTree::read(inputs.get(Artifact::Classes)?).map_err(StageError::of)?;
        let a = tree_distances(&tree);
        log_stats(ctx, &a, tree.classes.len());
        write(ctx, a, &tree, "tree")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_distance_by_hand() {
        let p = |s: &str| s.split('<').map(String::from).collect::<Vec<_>>();
        let t = ClassTree::from_paths(vec![(p("A<x<1"), 1), (p("A<x<2"), 1), (p("A<y<3"), 1), (p("B<z<4"), 1)]);
        let a = tree_distances(&t);
        let at = |i: usize, j: usize| a[i * 4 + j];
        assert_eq!(at(0, 0), 0.0);
        assert!((at(0, 1) - 1.0 / 3.0).abs() < 1e-6); // share A<x
        assert!((at(0, 2) - 2.0 / 3.0).abs() < 1e-6); // share A
        assert_eq!(at(0, 3), 1.0);
        assert_eq!(at(3, 0), at(0, 3));
    }

    #[test]
    fn cosine_distance_by_hand() {
        let a = cosine_distances(&[vec![1.0, 0.0], vec![0.0, 2.0], vec![1.0, 1.0]]);
        assert_eq!(a[1], 1.0);
        assert!((a[2] - (1.0 - 1.0 / 2f32.sqrt())).abs() < 1e-6);
        assert_eq!(a[4], 0.0);
    }
}

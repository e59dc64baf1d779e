//! An example stage plugin, built as a shared library (`cdylib`) and loaded by `huse-run` at
//! run time (`plugins: [path/to/libhuse_example_plugin.so]`).
//!
//! It offers `graph-flat`: a class-distance matrix with every pair of distinct classes at
//! the same distance (`distance`, default 1) — HUSE's graph loss without any hierarchy, a
//! baseline for the `graph` and `graph-tree` stages. It fills the `graph` role
//! (`needs: [ingest]`, gives `graph.safetensors` and `graph.json`).
//!
//! `fail: error | panic` makes the stage fail on purpose, to show (and test) how plugin
//! errors and panics reach the user.

use huse_data::{Artifact, ClassTree};
use huse_stage_api::{Config, ConfigError, Context, Input, Inputs, Output, Stage, StageError, parse_config};
use serde::Deserialize;

/// The `graph-flat` stage.
pub struct FlatGraph;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cfg {
    #[serde(default = "one")]
    distance: f32,
    #[serde(default)]
    fail: Option<String>,
}
fn one() -> f32 {
    1.0
}

impl Stage for FlatGraph {
    fn kind(&self) -> &str {
        "graph-flat"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "class distances without hierarchy: every distinct pair at `distance` (example plugin)"
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::one(Artifact::Classes)]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![Output::new(Artifact::Graph, "A (K x K)"), Output::new(Artifact::GraphMeta, "class names")]
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let c: Cfg = parse_config(config)?;
        if !(0.0..=2.0).contains(&c.distance) {
            return Err(ConfigError::at("distance", "must be in [0, 2]"));
        }
        if let Some(f) = &c.fail
            && f != "error"
            && f != "panic"
        {
            return Err(ConfigError::at("fail", "must be `error` or `panic`"));
        }
        Ok(())
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let c: Cfg = parse_config(config)?;
        match c.fail.as_deref() {
            Some("error") => return Err(StageError::msg("graph-flat failed on purpose (fail: error)")),
            Some("panic") => panic!("graph-flat panicked on purpose (fail: panic)"),
            _ => {}
        }
        let tree = ClassTree::read(inputs.get(Artifact::Classes)?).map_err(StageError::of)?;
        let k = tree.classes.len();
        ctx.progress.start("flat graph", Some(k as u64), "classes");
        let mut w = huse_data::safetensors_out::Writer::create(&ctx.out_dir.join(Artifact::Graph), &[("A", k, k)])
            .map_err(StageError::of)?;
        for i in 0..k {
            let row: Vec<f32> = (0..k).map(|j| if i == j { 0.0 } else { c.distance }).collect();
            w.rows(&row).map_err(StageError::of)?;
            ctx.progress.inc(1);
        }
        w.finish().map_err(StageError::of)?;
        let names: Vec<&str> = tree.classes.iter().map(|c| c.name.as_str()).collect();
        std::fs::write(
            ctx.out_dir.join(Artifact::GraphMeta),
            serde_json::to_vec(&serde_json::json!({"variant": "flat", "classes": names})).unwrap(),
        )?;
        ctx.metrics.log("graph.classes", 0, k as f64);
        // The thread budget the host gave, and the size of the (plugin's own) rayon pool
        // the stage runs in.
        ctx.metrics.log("plugin.threads", 0, ctx.threads as f64);
        ctx.metrics.log("plugin.pool", 0, rayon::current_num_threads() as f64);
        Ok(())
    }
}

huse_plugin::export_stages!(env!("CARGO_PKG_VERSION"), [FlatGraph]);

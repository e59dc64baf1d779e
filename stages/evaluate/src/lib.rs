//! The `evaluate` stage: the paper's Tables 1-3 for a trained model on the test split.
//!
//! * Table 1, Recall@K (`ks`, default 1, 5, 10) in four directions by cosine distance in
//!   the universal space: `test.i2i.rK`, `test.i2t.rK`, `test.t2i.rK`, `test.t2t.rK`;
//! * Table 2, hierarchical precision HP@K (`hp_ks`, default 2, 5, 10) on the class tree:
//!   `test.hpK.i2i`, ... (definitions in `huse_model::metrics`);
//! * Table 3, accuracy: `test.acc.image`, `test.acc.text`, `test.acc.both` (with the fusion
//!   weight chosen on validation by train), and per hierarchy level `test.acc.both.lN`
//!   (also `.image.lN`, `.text.lN`).
//! * Table 4 (not in the paper), instance retrieval: `test.inst.i2t.r1/r5/r10` (an item's
//!   image finds its own text among all test texts within K), `test.inst.t2i.rK`, and the
//!   median ranks `test.inst.i2t.medr`, `test.inst.t2i.medr`.
//!
//! Every name is written once, in `huse_model::names`. Queries and gallery are the test items; a query never retrieves itself nor, in
//! cross-modal search, its own paired item. Similarities are computed `block` queries at
//! a time. Also writes `tables.md` (the three tables) and `metrics.json`.

use std::fmt::Write as _;

use huse_data::{Artifact, Split};
use huse_model::metrics::{self, Rows};
use huse_model::model::{Huse, ModelMeta, predict};
use huse_model::names;
use huse_stage_api::{Config, ConfigError, Context, Input, Inputs, Output, Stage, StageError, parse_config};
use huse_stage_kit::{device_of, load_dataset};
use serde::Deserialize;

/// The stage.
pub struct Evaluate;

/// The stage's config.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalCfg {
    /// The K of Recall@K (default 1, 5, 10).
    #[serde(default = "d_ks")]
    pub ks: Vec<usize>,
    /// The K of hierarchical precision HP@K (default 2, 5, 10).
    #[serde(default = "d_hp")]
    pub hp_ks: Vec<usize>,
    /// Queries per similarity block.
    #[serde(default = "d_block")]
    pub block: usize,
    /// The split to evaluate (test or val).
    #[serde(default = "d_split")]
    pub split: String,
}
fn d_ks() -> Vec<usize> {
    vec![1, 5, 10]
}
fn d_hp() -> Vec<usize> {
    vec![2, 5, 10]
}
fn d_block() -> usize {
    512
}
fn d_split() -> String {
    "test".into()
}

/// Test queries in the gallery.
const GALLERY_QUERIES: usize = 8;

/// The four retrieval directions: (name, query is image, gallery is image).
pub use huse_model::names::DIRECTIONS;

impl Stage for Evaluate {
    fn uses_device(&self) -> bool {
        // the towers and the similarity blocks run on the device.
        true
    }

    fn kind(&self) -> &str {
        "evaluate"
    }
    fn version(&self) -> &str {
        "3"
    }
    fn describe(&self) -> &str {
        "the paper's Tables 1-3 (Recall@K, HP@K, accuracy) on the test split"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(EvalCfg).to_value())
    }
    fn headline(&self) -> Vec<String> {
        // Accuracy, cross-modal R@1 both ways, HP@5 text -> image, and the own-pair R@10
        // (instance search), on the test split.
        vec![
            names::accuracy("test", "both"),
            names::recall("test", "t2i", 1),
            names::recall("test", "i2t", 1),
            names::hierarchical_precision("test", "t2i", 5),
            names::instance_recall("test", "t2i", 10),
        ]
    }
    fn inputs(&self) -> Vec<Input> {
        vec![
            Input::one(Artifact::Items),
            Input::one(Artifact::Classes),
            Input::one(Artifact::ImageFeatures),
            Input::one(Artifact::TextFeatures),
            Input::optional(Artifact::Tfidf),
            Input::optional(Artifact::TfidfVocab),
            Input::one(Artifact::Model),
            Input::one(Artifact::ModelMeta),
        ]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![
            Output::new(Artifact::Metrics, "every metric"),
            Output::summary(Artifact::Tables, "Tables 1-4"),
            Output::attachment(Artifact::Gallery, "top results of fixed test queries, for the report"),
        ]
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let c: EvalCfg = parse_config(config)?;
        if c.ks.is_empty() || c.ks.contains(&0) {
            return Err(ConfigError::at("ks", "needs positive values"));
        }
        if c.hp_ks.is_empty() || c.hp_ks.contains(&0) {
            return Err(ConfigError::at("hp_ks", "needs positive values"));
        }
        if c.block == 0 {
            return Err(ConfigError::at("block", "must be positive"));
        }
        if c.split != "test" && c.split != "val" {
            return Err(ConfigError::at("split", "must be test or val"));
        }
        Ok(())
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let cfg: EvalCfg = parse_config(config)?;
        let meta = ModelMeta::read(inputs.get(Artifact::ModelMeta)?).map_err(StageError::of)?;
        let device = device_of(ctx.device)?;
        let (ds, tree) = load_dataset(inputs, meta.use_tfidf)?;
        let model = Huse::load(&meta.network, inputs.get(Artifact::Model)?, &device).map_err(StageError::of)?;
        let split = if cfg.split == "val" { Split::Val } else { Split::Test };
        let idx = ds.split(split);
        if idx.len() < 2 {
            return Err(StageError::msg(format!("the {} split has {} items", cfg.split, idx.len())));
        }
        ctx.progress.start("embed", None, "items");
        let (pi, pt, ei, et) = predict(&model, &ds, &idx, meta.use_tfidf, &device, 4096).map_err(StageError::of)?;
        let labels: Vec<u32> = idx.iter().map(|&i| ds.labels[i]).collect();
        let d = meta.network.shape.dim;
        let (img, txt) = (Rows { data: &ei, dim: d }, Rows { data: &et, dim: d });
        // The similarity blocks on the stage's device (a GPU's cuBLAS there), the selection on the CPU.
        let gemm = metrics::Gemm::for_device(&device);
        let kmax = cfg.ks.iter().chain(&cfg.hp_ks).copied().max().unwrap_or(10);
        let p = cfg.split.clone();
        let mut out: Vec<(String, f64)> = Vec::new();
        ctx.progress.start("retrieval", Some(4), "directions");
        for (name, qi, gi) in DIRECTIONS {
            ctx.cancel.check()?;
            let (q, g) = (if qi { &img } else { &txt }, if gi { &img } else { &txt });
            // The query's own item is excluded in every direction (itself, or its paired modality).
            let res = metrics::top_k_with(&gemm, q, g, kmax, &|i| Some(i), cfg.block).map_err(StageError::of)?;
            for (k, r) in cfg.ks.iter().zip(metrics::recall_at_k(&res, &labels, &labels, &cfg.ks)) {
                out.push((names::recall(&p, name, *k), r));
            }
            for (k, h) in
                cfg.hp_ks.iter().zip(metrics::hierarchical_precision(&res, &labels, &labels, &tree, &cfg.hp_ks))
            {
                out.push((names::hierarchical_precision(&p, name, *k), h));
            }
            ctx.progress.inc(1);
        }
        // Instance level: does an item's image retrieve its own text, and its text its own image?
        for (name, q, g) in
            names::INSTANCE_DIRECTIONS.into_iter().zip([(&img, &txt), (&txt, &img)]).map(|(n, (q, g))| (n, q, g))
        {
            ctx.cancel.check()?;
            let ranks = metrics::instance_ranks_with(&gemm, q, g).map_err(StageError::of)?;
            for (k, r) in cfg.ks.iter().zip(metrics::instance_recall(&ranks, &cfg.ks)) {
                out.push((names::instance_recall(&p, name, *k), r));
            }
            out.push((names::instance_median_rank(&p, name), metrics::median_rank(&ranks)));
        }
        let k = ds.classes;
        let both = metrics::fuse(&pi, &pt, meta.fusion_weight);
        for (name, probs) in names::ACCURACIES.into_iter().zip([&pi, &pt, &both]) {
            out.push((names::accuracy(&p, name), metrics::accuracy(probs, k, &labels)));
        }
        for (name, probs) in names::ACCURACIES.into_iter().zip([&pi, &pt, &both]) {
            for (l, a) in metrics::level_accuracy(probs, k, &labels, &tree).into_iter().enumerate() {
                out.push((names::level_accuracy(&p, name, l), a));
            }
        }
        for (key, v) in &out {
            ctx.metrics.log(key, 0, *v);
        }
        let map: serde_json::Map<String, serde_json::Value> =
            out.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
        std::fs::write(ctx.out_dir.join(Artifact::Metrics), serde_json::to_vec_pretty(&map).map_err(StageError::of)?)?;
        std::fs::write(ctx.out_dir.join(Artifact::Tables), tables(&map, &cfg, &p, tree.depth()))?;
        // A gallery for the report: for a fixed set of test items (spread evenly over the
        // split, the same for every run on the same data), the 5 images nearest to the
        // item's text (its own image included: this is what a search for the title shows).
        let picks: Vec<usize> =
            (0..GALLERY_QUERIES.min(idx.len())).map(|j| j * idx.len() / GALLERY_QUERIES.min(idx.len())).collect();
        let q: Vec<f32> = picks.iter().flat_map(|&j| txt.row(j).iter().copied()).collect();
        let found = metrics::top_k_with(&gemm, &Rows { data: &q, dim: d }, &img, 5, &|_| None, cfg.block)
            .map_err(StageError::of)?;
        let gallery: Vec<serde_json::Value> = picks
            .iter()
            .zip(found)
            .map(|(&j, hits)| {
                let it = &ds.items[idx[j]];
                serde_json::json!({
                    "id": it.id, "text": it.text, "class": tree.classes[it.class].name,
                    "hits": hits.iter().map(|&h| {
                        let g = &ds.items[idx[h]];
                        serde_json::json!({"id": g.id, "image": g.image, "class": tree.classes[g.class].name})
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        std::fs::write(
            ctx.out_dir.join(Artifact::Gallery),
            serde_json::to_vec_pretty(&gallery).map_err(StageError::of)?,
        )?;
        Ok(())
    }
}

/// Tables 1-3 in the paper's layout, from a metrics map (`prefix` = `test` or `val`).
pub fn tables(m: &serde_json::Map<String, serde_json::Value>, cfg: &EvalCfg, prefix: &str, depth: usize) -> String {
    let get = |k: &str| m.get(k).and_then(|v| v.as_f64()).map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    let mut s = String::new();
    let ks: Vec<String> = cfg.ks.iter().map(|k| k.to_string()).collect();
    writeln!(s, "Table 1 — Recall@{} ({prefix} split)\n", ks.join("/")).unwrap();
    writeln!(s, "| I->I | I->T | T->I | T->T |\n|---|---|---|---|").unwrap();
    let row: Vec<String> = DIRECTIONS
        .iter()
        .map(|(n, _, _)| cfg.ks.iter().map(|k| get(&names::recall(prefix, n, *k))).collect::<Vec<_>>().join("/"))
        .collect();
    writeln!(s, "| {} |\n", row.join(" | ")).unwrap();
    let hk: Vec<String> = cfg.hp_ks.iter().map(|k| k.to_string()).collect();
    writeln!(s, "Table 2 — HP@{} ({prefix} split)\n", hk.join("/")).unwrap();
    writeln!(s, "| I->I | I->T | T->I | T->T |\n|---|---|---|---|").unwrap();
    let row: Vec<String> = DIRECTIONS
        .iter()
        .map(|(n, _, _)| {
            cfg.hp_ks.iter().map(|k| get(&names::hierarchical_precision(prefix, n, *k))).collect::<Vec<_>>().join("/")
        })
        .collect();
    writeln!(s, "| {} |\n", row.join(" | ")).unwrap();
    writeln!(s, "Table 3 — classification accuracy ({prefix} split)\n").unwrap();
    let levels: Vec<String> = (0..depth).map(|l| format!("level {l}")).collect();
    writeln!(s, "| | all levels | {} |\n|---|---|{}", levels.join(" | "), "---|".repeat(depth)).unwrap();
    for name in names::ACCURACIES {
        let lv: Vec<String> = (0..depth).map(|l| get(&names::level_accuracy(prefix, name, l))).collect();
        writeln!(s, "| {name} | {} | {} |", get(&names::accuracy(prefix, name)), lv.join(" | ")).unwrap();
    }
    writeln!(
        s,
        "\nTable 4 — instance retrieval: an item's own pair, R@{} and median rank ({prefix} split)\n",
        ks.join("/")
    )
    .unwrap();
    writeln!(s, "| | R@{} | median rank |\n|---|---|---|", ks.join("/")).unwrap();
    for (name, label) in names::INSTANCE_DIRECTIONS.into_iter().zip(["image -> own text", "text -> own image"]) {
        let r: Vec<String> = cfg.ks.iter().map(|k| get(&names::instance_recall(prefix, name, *k))).collect();
        let medr = m
            .get(&names::instance_median_rank(prefix, name))
            .and_then(|v| v.as_f64())
            .map(|v| format!("{v}"))
            .unwrap_or_else(|| "-".into());
        writeln!(s, "| {label} | {} | {medr} |", r.join("/")).unwrap();
    }
    s
}

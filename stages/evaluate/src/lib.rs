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
//! * Table 5 (not in the paper, only when ingest keeps `attributes:`), the attribute
//!   benchmark: each test item's query (`red casual tshirts`, its attribute values and leaf
//!   class, encoded by encode) searches the test images; `test.attr.class.pK` is the share of
//!   the top K (the largest of `ks`) of the query's class, `test.attr.ATTR.pK` of its class
//!   and its value of ATTR, `test.attr.all.pK` of its class and every value, and
//!   `test.attr.ATTR.chance` what a search that finds the class and ignores ATTR would get.
//!
//! * With `split: test` (the default) and `val: true` (the default), the same figures on the
//!   validation split, `val.*` (what a study may choose by; the test split's are never used to
//!   choose), but for the plain accuracies `val.acc.*`, which train reports.
//!
//! Every name is written once, in `huse_model::names`. Queries and gallery are the test items; a query never retrieves itself nor, in
//! cross-modal search, its own paired item. Similarities are computed `block` queries at
//! a time. Also writes `tables.md` (the three tables) and `metrics.json`.

use std::collections::{BTreeSet, HashMap};
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
    /// With `split: test`, the validation split's figures too (`val.*`: what a study may
    /// choose by, never the test split's).
    #[serde(default = "d_val")]
    pub val: bool,
}
fn d_val() -> bool {
    true
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
        "4"
    }
    fn describe(&self) -> &str {
        "the paper's Tables 1-3 (Recall@K, HP@K, accuracy) on the test split"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(EvalCfg).to_value())
    }
    fn headline(&self) -> Vec<String> {
        // Accuracy, cross-modal R@1 both ways, HP@5 text -> image, and the own-pair R@1 and
        // R@10 (instance search: how often a title finds its own product), on the test split.
        vec![
            names::accuracy("test", "both"),
            names::recall("test", "t2i", 1),
            names::recall("test", "i2t", 1),
            names::hierarchical_precision("test", "t2i", 5),
            names::instance_recall("test", "t2i", 1),
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
        // The similarity blocks on the stage's device (a GPU's cuBLAS there), the selection on the CPU.
        let gemm = metrics::Gemm::for_device(&device);
        let env = Env {
            ctx,
            cfg: &cfg,
            model: &model,
            ds: &ds,
            tree: &tree,
            use_tfidf: meta.use_tfidf,
            fusion_weight: meta.fusion_weight,
            dim: meta.network.shape.dim,
            device: &device,
            gemm: &gemm,
            inputs,
            val_accuracies_by_train: cfg.split == "test",
        };
        let main = split_figures(&env, &cfg.split)?;
        let mut out = main.out.clone();
        // The validation split's figures too (the objectives a study may choose by), when the
        // main split is test and validation has items.
        if cfg.split == "test" && cfg.val && ds.split(Split::Val).len() >= 2 {
            out.extend(split_figures(&env, "val")?.out);
        }
        let (idx, d, p) = (&main.idx, meta.network.shape.dim, cfg.split.clone());
        let (img, txt) = (Rows { data: &main.ei, dim: d }, Rows { data: &main.et, dim: d });
        let attr_gallery: Vec<(&huse_data::Item, Vec<usize>)> =
            main.attr_gallery.iter().map(|(i, hits)| (&ds.items[*i], hits.clone())).collect();
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
        // Then a few attribute queries (their text is the query), when there are any.
        let mut gallery = gallery;
        for (it, hits) in attr_gallery {
            gallery.push(serde_json::json!({
                "id": it.id, "text": it.query, "class": tree.classes[it.class].name, "attribute_query": true,
                "hits": hits.iter().take(5).map(|&h| {
                    let g = &ds.items[idx[h]];
                    serde_json::json!({"id": g.id, "image": g.image, "class": tree.classes[g.class].name})
                }).collect::<Vec<_>>(),
            }));
        }
        std::fs::write(
            ctx.out_dir.join(Artifact::Gallery),
            serde_json::to_vec_pretty(&gallery).map_err(StageError::of)?,
        )?;
        Ok(())
    }
}

/// What [`split_figures`] needs.
struct Env<'a> {
    ctx: &'a Context<'a>,
    cfg: &'a EvalCfg,
    model: &'a Huse,
    ds: &'a huse_model::data::Dataset,
    tree: &'a huse_data::ClassTree,
    use_tfidf: bool,
    fusion_weight: f32,
    dim: usize,
    device: &'a candle_core::Device,
    gemm: &'a metrics::Gemm,
    inputs: &'a Inputs,
    /// Whether train reports the validation split's accuracies (evaluate then leaves them out
    /// of its `val.*` figures, so that no two stages of a run log one name).
    val_accuracies_by_train: bool,
}

/// One split's figures, named `<split>.*`: retrieval in four directions, hierarchical
/// precision, instance retrieval, the attribute benchmark and the accuracies; with its items,
/// their embeddings and a few attribute queries' results (item, hits) for the gallery.
struct SplitFigures {
    idx: Vec<usize>,
    ei: Vec<f32>,
    et: Vec<f32>,
    out: Vec<(String, f64)>,
    attr_gallery: Vec<(usize, Vec<usize>)>,
}

fn split_figures(env: &Env, p: &str) -> Result<SplitFigures, StageError> {
    let (ctx, cfg, model, ds, tree, device, gemm, inputs) =
        (env.ctx, env.cfg, env.model, env.ds, env.tree, env.device, env.gemm, env.inputs);
    let split = if p == "val" { Split::Val } else { Split::Test };
    let idx = ds.split(split);
    if idx.len() < 2 {
        return Err(StageError::msg(format!("the {p} split has {} items", idx.len())));
    }
    ctx.progress.start(&format!("embed {p}"), None, "items");
    let (pi, pt, ei, et) = predict(model, ds, &idx, env.use_tfidf, device, 4096).map_err(StageError::of)?;
    let labels: Vec<u32> = idx.iter().map(|&i| ds.labels[i]).collect();
    let d = env.dim;
    let (img, txt) = (Rows { data: &ei, dim: d }, Rows { data: &et, dim: d });
    let kmax = cfg.ks.iter().chain(&cfg.hp_ks).copied().max().unwrap_or(10);
    let mut out: Vec<(String, f64)> = Vec::new();
    ctx.progress.start(&format!("retrieval {p}"), Some(4), "directions");
    for (name, qi, gi) in DIRECTIONS {
        ctx.cancel.check()?;
        let (q, g) = (if qi { &img } else { &txt }, if gi { &img } else { &txt });
        // The query's own item is excluded in every direction (itself, or its paired modality).
        let res = metrics::top_k_with(gemm, q, g, kmax, &|i| Some(i), cfg.block).map_err(StageError::of)?;
        for (k, r) in cfg.ks.iter().zip(metrics::recall_at_k(&res, &labels, &labels, &cfg.ks)) {
            out.push((names::recall(p, name, *k), r));
        }
        for (k, h) in cfg.hp_ks.iter().zip(metrics::hierarchical_precision(&res, &labels, &labels, tree, &cfg.hp_ks)) {
            out.push((names::hierarchical_precision(p, name, *k), h));
        }
        ctx.progress.inc(1);
    }
    // Instance level: does an item's image retrieve its own text, and its text its own image?
    for (name, q, g) in
        names::INSTANCE_DIRECTIONS.into_iter().zip([(&img, &txt), (&txt, &img)]).map(|(n, (q, g))| (n, q, g))
    {
        ctx.cancel.check()?;
        let ranks = metrics::instance_ranks_with(gemm, q, g).map_err(StageError::of)?;
        for (k, r) in cfg.ks.iter().zip(metrics::instance_recall(&ranks, &cfg.ks)) {
            out.push((names::instance_recall(p, name, *k), r));
        }
        out.push((names::instance_median_rank(p, name), metrics::median_rank(&ranks)));
    }
    // The attribute benchmark (ingest's `attributes:`): each item's attribute query against
    // the split's images.
    let tfidf = if env.use_tfidf { inputs.optional(Artifact::Tfidf) } else { None };
    let attr_queries = ds.attribute_queries(inputs.get(Artifact::TextFeatures)?, tfidf).map_err(StageError::of)?;
    let mut attr_gallery = Vec::new();
    if let Some((qds, rows)) = &attr_queries {
        let pos: HashMap<usize, usize> = idx.iter().enumerate().map(|(j, &i)| (i, j)).collect();
        let sel: Vec<usize> = (0..rows.len()).filter(|&q| pos.contains_key(&rows[q])).collect();
        if !sel.is_empty() {
            ctx.cancel.check()?;
            let (_, _, _, eq) = predict(model, qds, &sel, env.use_tfidf, device, 4096).map_err(StageError::of)?;
            let k = cfg.ks.iter().copied().max().unwrap_or(10);
            let found = metrics::top_k_with(gemm, &Rows { data: &eq, dim: d }, &img, k, &|_| None, cfg.block)
                .map_err(StageError::of)?;
            let queried: Vec<&huse_data::Item> = sel.iter().map(|&q| &ds.items[rows[q]]).collect();
            let gallery: Vec<&huse_data::Item> = idx.iter().map(|&i| &ds.items[i]).collect();
            out.extend(attribute_benchmark(&queried, &found, &gallery, p, k));
            let step = (sel.len() / GALLERY_QUERIES).max(1);
            attr_gallery = (0..sel.len())
                .step_by(step)
                .take(GALLERY_QUERIES / 2)
                .map(|j| (rows[sel[j]], found[j].clone()))
                .collect();
        }
    }
    let k = ds.classes;
    let both = metrics::fuse(&pi, &pt, env.fusion_weight);
    // On the validation split train already reports the accuracies (`val.acc.*` per epoch,
    // `val.best.acc.both` of the chosen checkpoint): evaluate adds only the per-level ones.
    if !env.val_accuracies_by_train || p != "val" {
        for (name, probs) in names::ACCURACIES.into_iter().zip([&pi, &pt, &both]) {
            out.push((names::accuracy(p, name), metrics::accuracy(probs, k, &labels)));
        }
    }
    for (name, probs) in names::ACCURACIES.into_iter().zip([&pi, &pt, &both]) {
        for (l, a) in metrics::level_accuracy(probs, k, &labels, tree).into_iter().enumerate() {
            out.push((names::level_accuracy(p, name, l), a));
        }
    }
    Ok(SplitFigures { idx, ei, et, out, attr_gallery })
}

/// The attribute benchmark's figures for `queries` (the items whose attribute query was
/// searched) and their top-K `found` (positions in `gallery`): the share of the top K of the
/// query's class, of its class and its value of each attribute (queries whose value is
/// unknown left out of that attribute), of its class and every known value; and, per
/// attribute, that share for a search that finds the class and ignores the attribute (the
/// share of the class's gallery items with the query's value).
pub fn attribute_benchmark(
    queries: &[&huse_data::Item],
    found: &[Vec<usize>],
    gallery: &[&huse_data::Item],
    prefix: &str,
    k: usize,
) -> Vec<(String, f64)> {
    let attributes: BTreeSet<&String> = queries.iter().flat_map(|q| q.attrs.keys()).collect();
    let known = |it: &huse_data::Item, a: &str| it.attrs.get(a).filter(|v| !v.is_empty()).cloned();
    let share = |q: &huse_data::Item, hits: &[usize], same: &dyn Fn(&huse_data::Item) -> bool| {
        hits.iter().filter(|&&h| gallery[h].class == q.class && same(gallery[h])).count() as f64 / k as f64
    };
    let mean = |v: &[f64]| if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 };
    let mut out = Vec::new();
    let class: Vec<f64> = queries.iter().zip(found).map(|(q, f)| share(q, f, &|_| true)).collect();
    out.push((names::attribute_precision(prefix, "class", k), mean(&class)));
    for a in &attributes {
        let (mut p, mut chance) = (Vec::new(), Vec::new());
        for (q, f) in queries.iter().zip(found) {
            let Some(v) = known(q, a) else { continue };
            p.push(share(q, f, &|g| known(g, a).as_ref() == Some(&v)));
            let of_class: Vec<&&huse_data::Item> = gallery.iter().filter(|g| g.class == q.class).collect();
            let same = of_class.iter().filter(|g| known(g, a).as_ref() == Some(&v)).count();
            chance.push(same as f64 / of_class.len().max(1) as f64);
        }
        out.push((names::attribute_precision(prefix, a, k), mean(&p)));
        out.push((names::attribute_chance(prefix, a), mean(&chance)));
    }
    let all: Vec<f64> = queries
        .iter()
        .zip(found)
        .map(|(q, f)| share(q, f, &|g| attributes.iter().all(|a| known(q, a).is_none_or(|v| known(g, a) == Some(v)))))
        .collect();
    out.push((names::attribute_precision(prefix, "all", k), mean(&all)));
    out
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
    // Table 5, when the items had attribute queries.
    let attr = format!("{prefix}.attr.");
    let k = cfg.ks.iter().copied().max().unwrap_or(10);
    let whats: Vec<&str> = m
        .keys()
        .filter_map(|key| key.strip_prefix(&attr)?.strip_suffix(&format!(".p{k}")))
        .filter(|w| *w != "class" && *w != "all")
        .collect();
    if m.contains_key(&names::attribute_precision(prefix, "class", k)) {
        writeln!(
            s,
            "\nTable 5 — attribute queries (`<attributes> <class>`): share of the top {k} images of the query's class and value ({prefix} split)\n"
        )
        .unwrap();
        writeln!(s, "| | share of the top {k} | a class-only search would get |\n|---|---|---|").unwrap();
        writeln!(s, "| class | {} | |", get(&names::attribute_precision(prefix, "class", k))).unwrap();
        for w in whats {
            let (pk, chance) = (names::attribute_precision(prefix, w, k), names::attribute_chance(prefix, w));
            writeln!(s, "| class and {w} | {} | {} |", get(&pk), get(&chance)).unwrap();
        }
        writeln!(s, "| class and every attribute | {} | |", get(&names::attribute_precision(prefix, "all", k)))
            .unwrap();
    }
    s
}

#[cfg(test)]
mod tests {
    use huse_data::{Item, Split};

    use super::*;

    fn item(class: usize, attrs: &[(&str, &str)]) -> Item {
        Item {
            id: String::new(),
            image: String::new(),
            text: String::new(),
            class,
            split: Split::Test,
            attrs: attrs.iter().map(|(a, v)| (a.to_string(), v.to_string())).collect(),
            query: Some(String::new()),
        }
    }

    #[test]
    fn the_attribute_benchmark_matches_a_hand_worked_case() {
        let gallery = [
            item(0, &[("colour", "Red")]),
            item(0, &[("colour", "Blue")]),
            item(1, &[("colour", "Red")]),
            item(0, &[("colour", "Red")]),
        ];
        let gallery: Vec<&Item> = gallery.iter().collect();
        // A: class 0 red finds g0 (right), g1 (blue); B: class 1 blue finds g2 (red), g0
        // (class 0); C: class 0, colour unknown, finds g3, g2.
        let queries = [item(0, &[("colour", "Red")]), item(1, &[("colour", "Blue")]), item(0, &[("colour", "")])];
        let queries: Vec<&Item> = queries.iter().collect();
        let found = vec![vec![0, 1], vec![2, 0], vec![3, 2]];
        let got: std::collections::BTreeMap<String, f64> =
            attribute_benchmark(&queries, &found, &gallery, "test", 2).into_iter().collect();
        let want = [
            // class: A 2/2, B 1/2, C 1/2.
            ("test.attr.class.p2", (1.0 + 0.5 + 0.5) / 3.0),
            // colour (C left out): A 1/2, B 0.
            ("test.attr.colour.p2", 0.25),
            // of A's class 2 of 3 are red, of B's 0 of 1 blue.
            ("test.attr.colour.chance", (2.0 / 3.0) / 2.0),
            // every known attribute: A 1/2, B 0, C (none known) its class share 1/2.
            ("test.attr.all.p2", 1.0 / 3.0),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (k, v) in want {
            assert!((got[k] - v).abs() < 1e-12, "{k}: {} vs {v}", got[k]);
        }
    }
}

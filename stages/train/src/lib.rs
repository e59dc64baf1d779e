//! The `train` stage: fits HUSE (`huse_model`) on the encode stage's features.
//!
//! Each epoch: shuffle the training split (or sample it class-balanced), take batches,
//! compute `alpha * L_class + beta * L_graph + gamma * L_gap`, step the optimiser; then
//! measure validation accuracy (image, text, both) and keep the best model by
//! `select_by`. Metrics per epoch (step = epoch): `train.loss`, `train.loss_class`,
//! `train.loss_graph`, `train.loss_gap` (and `train.loss_contrastive` with `delta > 0`),
//! `train.lr`, `train.samples_per_s`,
//! `val.acc.image`, `val.acc.text`, `val.acc.both`, `val.fusion_weight`.
//!
//! With `augment: true` the image input of each training item is, each epoch, one of the
//! augmented views the encode stage made (`views:` there), drawn uniformly from a seeded
//! stream of its own.
//!
//! Determinism: initial weights, shuffles and dropout masks come from ChaCha RNGs seeded
//! by the run seed (and the epoch), so the same seed and data give the same loss curve on
//! the CPU, bit for bit — also across an interruption: every epoch ends with a checkpoint
//! in the work directory (weights, optimiser state, history), and a rerun resumes there.
//! A loss that becomes NaN or infinite stops the run with the step and components.
//!
//! Outputs: `model.safetensors` (best epoch), `model.json` (network shape, features used,
//! fusion weight, best epoch and its validation metrics), `history.json`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use huse_data::{Artifact, Split};
use huse_model::data::Dataset;
use huse_model::loss::{self, GraphPairs, GraphVariant, LossConfig};
use huse_model::metrics;
use huse_model::model::{EpochVal, Huse, HuseConfig, ModelMeta, Shape, predict};
use huse_model::names;
use huse_model::optim::{Optimizer, OptimizerConfig, Schedule, lr_at};
use huse_stage_api::{Config, ConfigError, Context, Decision, Input, Inputs, Output, Stage, StageError, parse_config};
use huse_stage_kit::{device_of, load_dataset};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The stage.
pub struct Train;

/// How the two modalities' softmax outputs are averaged.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Fusion {
    /// The image weight in [0, 1].
    Fixed(f64),
    /// `auto`: chosen on the validation split every epoch.
    Auto(String),
}

/// The stage's config.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainCfg {
    /// Weight of the classification loss (default: [`LossConfig::default`], as every loss setting).
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Weight of the semantic-graph loss.
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// Weight of the cross-modal gap loss.
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    /// The graph loss's margin.
    #[serde(default = "d_zeta")]
    pub zeta: f64,
    /// Weight of the contrastive term (symmetric InfoNCE over the batch; not in the paper, 0 leaves it out).
    #[serde(default = "d_delta")]
    pub delta: f64,
    /// Temperature of the contrastive term's logits (with `learn_tau`, its starting value).
    #[serde(default = "d_tau")]
    pub tau: f64,
    /// Learn the contrastive term's temperature as CLIP does (`ln(1/tau)` trained, tau kept
    /// within [0.01, 1]); logged per epoch as `train.tau`.
    #[serde(default)]
    pub learn_tau: bool,
    /// Graph loss: `paper` (pull related classes together) or `hinge` (also push unrelated ones apart).
    #[serde(default)]
    pub graph_variant: GraphVariant,
    /// Which pairs the graph loss looks at: `within` a modality, `across`, or `all` (default).
    #[serde(default)]
    pub graph_pairs: GraphPairs,
    /// Append TF-IDF features to the BERT features as the text input.
    #[serde(default = "dtrue")]
    pub use_tfidf: bool,
    /// The towers' shape: hidden layers, embedding size, dropout (default: the paper's).
    #[serde(default)]
    pub model: Shape,
    /// The optimiser and its learning rate (`{ name: adamw, lr: 0.001 }` or RMSProp).
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule: `constant` (default) or `cosine` (decay to 0 at the last step).
    #[serde(default)]
    pub schedule: Schedule,
    /// Steps of linear warm-up of the learning rate (0: none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Items per training batch (default 1024, the paper's).
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Passes over the training split (default 30).
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Stop after this many optimiser steps (whatever the epoch).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Sample training batches uniformly over classes instead of over items.
    #[serde(default)]
    pub balanced: bool,
    /// Stop when `select_by` has not improved for this many epochs.
    #[serde(default)]
    pub patience: Option<usize>,
    /// Validation metric that picks the kept model: val.acc.both | val.acc.image | val.acc.text.
    #[serde(default = "d_select")]
    pub select_by: String,
    /// The image tower's weight when the two towers' class probabilities are averaged: a number in [0, 1], or `auto` (chosen on validation each epoch).
    #[serde(default = "d_fusion")]
    pub fusion_weight: Fusion,
    /// Items per batch when embedding the validation split.
    #[serde(default = "d_eval_batch")]
    pub eval_batch_size: usize,
    /// Train on the encode stage's augmented image views (`views:` there): each epoch, each
    /// training item's image input is one of its views, drawn uniformly; validation and
    /// evaluation use the clean features.
    #[serde(default)]
    pub augment: bool,
}
// The loss settings' defaults are the model library's (one place: `LossConfig::default`).
fn d_alpha() -> f64 {
    LossConfig::default().alpha
}
fn d_beta() -> f64 {
    LossConfig::default().beta
}
fn d_gamma() -> f64 {
    LossConfig::default().gamma
}
fn d_zeta() -> f64 {
    LossConfig::default().zeta
}
fn d_delta() -> f64 {
    LossConfig::default().delta
}
fn d_tau() -> f64 {
    LossConfig::default().tau
}
fn dtrue() -> bool {
    true
}
fn d_batch() -> usize {
    1024
}
fn d_epochs() -> usize {
    30
}
fn d_select() -> String {
    names::accuracy("val", "both")
}
fn d_fusion() -> Fusion {
    Fusion::Auto("auto".into())
}
fn d_eval_batch() -> usize {
    4096
}

impl TrainCfg {
    fn check(&self) -> Result<(), ConfigError> {
        for (k, v) in [("alpha", self.alpha), ("beta", self.beta), ("gamma", self.gamma), ("delta", self.delta)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::at(k, "must be a number >= 0"));
            }
        }
        if self.alpha + self.beta + self.gamma + self.delta == 0.0 {
            return Err(ConfigError::at("alpha", "alpha, beta, gamma and delta are all 0: nothing to learn"));
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(ConfigError::at("tau", "must be a number > 0 (e.g. 0.05)"));
        }
        if self.learn_tau && self.delta == 0.0 {
            return Err(ConfigError::at(
                "learn_tau",
                "learns the contrastive term's temperature, which needs delta > 0",
            ));
        }
        if !(self.zeta > 0.0 && self.zeta <= 2.0) {
            return Err(ConfigError::at("zeta", "must be in (0, 2] (cosine distances lie in [0, 2])"));
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            return Err(ConfigError::at("model.dropout", "must be in [0, 1)"));
        }
        if self.model.dim == 0 || self.model.hidden == 0 {
            return Err(ConfigError::at("model.dim", "must be positive"));
        }
        if self.batch_size < 2 {
            return Err(ConfigError::at("batch_size", "must be at least 2"));
        }
        if self.epochs == 0 {
            return Err(ConfigError::at("epochs", "must be at least 1"));
        }
        if self.optimizer.lr().partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(ConfigError::at("optimizer.lr", "must be > 0"));
        }
        if !names::ACCURACIES.iter().any(|of| names::accuracy("val", of) == self.select_by) {
            return Err(ConfigError::at("select_by", "must be val.acc.both, val.acc.image or val.acc.text"));
        }
        match &self.fusion_weight {
            Fusion::Fixed(w) if !(0.0..=1.0).contains(w) => {
                return Err(ConfigError::at("fusion_weight", "must be in [0, 1] or `auto`"));
            }
            Fusion::Auto(s) if s != "auto" => {
                return Err(ConfigError::at("fusion_weight", "must be in [0, 1] or `auto`"));
            }
            _ => {}
        }
        Ok(())
    }

    fn loss(&self) -> LossConfig {
        LossConfig {
            alpha: self.alpha,
            beta: self.beta,
            gamma: self.gamma,
            zeta: self.zeta,
            variant: self.graph_variant,
            pairs: self.graph_pairs,
            delta: self.delta,
            tau: self.tau,
            learn_tau: self.learn_tau,
        }
    }
}

/// One epoch's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochLog {
    /// The epoch (1-based).
    pub epoch: usize,
    /// Mean total loss over the epoch's batches.
    pub loss: f64,
    /// Mean L_class.
    pub loss_class: f64,
    /// Mean L_graph.
    pub loss_graph: f64,
    /// Mean L_gap.
    pub loss_gap: f64,
    /// Mean L_contrastive (0, and not written, when its weight is 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub loss_contrastive: f64,
    /// The learned temperature at the epoch's end (0, and not written, unless `learn_tau`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tau: f64,
    /// The learning rate at the epoch's end.
    pub lr: f64,
    /// The epoch's validation figures.
    pub val: EpochVal,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// Checkpoint state in the work directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// Hash of the config the checkpoint belongs to.
    config: String,
    epoch: usize,
    steps: u64,
    history: Vec<EpochLog>,
    best: Option<(usize, f64)>,
    /// The learned `ln(1/tau)` (`learn_tau`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log_scale: Option<f32>,
}

impl Stage for Train {
    fn uses_device(&self) -> bool {
        // the towers train on the device.
        true
    }

    fn kind(&self) -> &str {
        "train"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "trains the HUSE towers with alpha*L_class + beta*L_graph + gamma*L_gap"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(TrainCfg).to_value())
    }
    fn headline(&self) -> Vec<String> {
        vec!["val.best.acc.both".into()]
    }
    fn inputs(&self) -> Vec<Input> {
        vec![
            Input::one(Artifact::Items),
            Input::one(Artifact::Classes),
            Input::one(Artifact::Graph),
            Input::one(Artifact::ImageFeatures),
            Input::one(Artifact::TextFeatures),
            Input::optional(Artifact::Tfidf),
            Input::optional(Artifact::TfidfVocab),
        ]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![
            Output::new(Artifact::Model, "the best model's parameters"),
            Output::new(Artifact::ModelMeta, "network shape, features, fusion weight, best epoch"),
            Output::new(Artifact::History, "per-epoch losses and validation accuracy"),
        ]
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        parse_config::<TrainCfg>(config)?.check()
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let cfg: TrainCfg = parse_config(config)?;
        cfg.check()?;
        train(ctx, &cfg, config, inputs)
    }
}

fn validate_epoch(
    model: &Huse,
    ds: &Dataset,
    val: &[usize],
    cfg: &TrainCfg,
    device: &Device,
) -> Result<EpochVal, StageError> {
    let (pi, pt, _, _) = predict(model, ds, val, cfg.use_tfidf, device, cfg.eval_batch_size).map_err(StageError::of)?;
    let labels: Vec<u32> = val.iter().map(|&i| ds.labels[i]).collect();
    let k = ds.classes;
    let (w, both) = match &cfg.fusion_weight {
        Fusion::Fixed(w) => (*w as f32, metrics::accuracy(&metrics::fuse(&pi, &pt, *w as f32), k, &labels)),
        Fusion::Auto(_) => metrics::best_fusion_weight(&pi, &pt, k, &labels),
    };
    Ok(EpochVal {
        acc_image: metrics::accuracy(&pi, k, &labels),
        acc_text: metrics::accuracy(&pt, k, &labels),
        acc_both: both,
        fusion_weight: w,
    })
}

fn selected(v: &EpochVal, by: &str) -> f64 {
    names::ACCURACIES
        .into_iter()
        .zip([v.acc_image, v.acc_text, v.acc_both])
        .find(|(of, _)| names::accuracy("val", of) == by)
        .map_or(v.acc_both, |(_, x)| x)
}

/// The training batches of one epoch.
fn epoch_batches(cfg: &TrainCfg, ds: &Dataset, train: &[usize], rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let order: Vec<usize> = if cfg.balanced {
        // As many draws as items: a uniform class, then a uniform item of it.
        let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); ds.classes];
        for &i in train {
            by_class[ds.labels[i] as usize].push(i);
        }
        let nonempty: Vec<&Vec<usize>> = by_class.iter().filter(|v| !v.is_empty()).collect();
        (0..train.len())
            .map(|_| {
                let c = nonempty[rand::Rng::random_range(rng, 0..nonempty.len())];
                c[rand::Rng::random_range(rng, 0..c.len())]
            })
            .collect()
    } else {
        let mut o = train.to_vec();
        o.shuffle(rng);
        o
    };
    // A last batch smaller than 2 items has no pairs: drop it.
    let mut batches: Vec<Vec<usize>> = order.chunks(cfg.batch_size).map(<[usize]>::to_vec).collect();
    if batches.last().is_some_and(|b| b.len() < 2) {
        batches.pop();
    }
    batches
}

fn config_hash(config: &Config) -> String {
    // Stable enough for "does this checkpoint belong to this config": the canonical JSON.
    config.to_string()
}

fn train(ctx: &Context, cfg: &TrainCfg, raw: &Config, inputs: &Inputs) -> Result<(), StageError> {
    let device = device_of(ctx.device)?;
    let (mut ds, _tree) = load_dataset(inputs, cfg.use_tfidf)?;
    let views = if cfg.augment {
        let k = ds
            .load_views(inputs.get(Artifact::ImageFeatures)?)
            .map_err(|e| StageError::msg(format!("augment: true: {e:#}")))?;
        ctx.metrics.log("train.augment_views", 0, k as f64);
        k
    } else {
        0
    };
    let a = candle_core::safetensors::load(inputs.get(Artifact::Graph)?, &device).map_err(StageError::of)?;
    let a = a
        .get("A")
        .ok_or_else(|| StageError::msg("graph.safetensors has no tensor `A`"))?
        .to_dtype(DType::F32)
        .map_err(StageError::of)?;
    if a.dims() != [ds.classes, ds.classes] {
        return Err(StageError::msg(format!("the graph is {:?} but there are {} classes", a.dims(), ds.classes)));
    }
    let train_idx = ds.split(Split::Train);
    let val_idx = ds.split(Split::Val);
    if train_idx.len() < 2 || val_idx.is_empty() {
        return Err(StageError::msg(format!(
            "need training and validation items (have {} and {})",
            train_idx.len(),
            val_idx.len()
        )));
    }
    let net = HuseConfig {
        image_input: ds.image_dim,
        text_input: ds.text_dim(cfg.use_tfidf),
        classes: ds.classes,
        shape: cfg.model.clone(),
    };
    let mut init_rng = ChaCha8Rng::seed_from_u64(ctx.seed);
    let model = Huse::new(&net, &mut init_rng, &device).map_err(StageError::of)?;
    let loss_cfg = cfg.loss();
    // A learned temperature: one more variable, after the model's (their optimiser state
    // keeps its order), checkpointed in the state file.
    let log_scale = (loss_cfg.learn_tau && loss_cfg.delta != 0.0)
        .then(|| Var::from_tensor(&Tensor::new(&[[(1.0 / loss_cfg.tau).ln() as f32]], &device)?))
        .transpose()
        .map_err(StageError::of)?;
    let mut vars = model.vars();
    vars.extend(log_scale.clone());
    let mut opt = Optimizer::new(vars, cfg.optimizer.clone()).map_err(StageError::of)?;

    // Resume from the work directory when it holds this config's checkpoint.
    let work = ctx.work_dir;
    let state_path = work.join("state.json");
    let hash = config_hash(raw);
    let mut state =
        State { config: hash.clone(), epoch: 0, steps: 0, history: Vec::new(), best: None, log_scale: None };
    if let Ok(bytes) = std::fs::read(&state_path)
        && let Ok(saved) = serde_json::from_slice::<State>(&bytes)
        && saved.config == hash
    {
        model.load_weights(&work.join("last.safetensors")).map_err(StageError::of)?;
        opt.load(&work.join("optimizer.safetensors")).map_err(StageError::of)?;
        state = saved;
        if let (Some(v), Some(x)) = (&log_scale, state.log_scale) {
            v.set(&Tensor::new(&[[x]], &device).map_err(StageError::of)?).map_err(StageError::of)?;
        }
        // Re-log the finished epochs so the run's curve is complete.
        for e in &state.history {
            log_epoch(ctx, e, None);
        }
        ctx.metrics.log("train.resumed_at_epoch", 0, state.epoch as f64);
    }

    let steps_per_epoch =
        (train_idx.len() / cfg.batch_size + usize::from(train_idx.len() % cfg.batch_size >= 2)).max(1) as u64;
    let total_steps =
        cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs as u64).min(steps_per_epoch * cfg.epochs as u64);
    let mut since_best = state.best.map(|(e, _)| state.epoch.saturating_sub(e)).unwrap_or(0);
    // The progress line's last validation accuracy (from the checkpoint when resuming).
    let mut last_val = state
        .history
        .last()
        .map(|l| format!(", val acc {:.4} (epoch {})", l.val.acc_both, l.epoch))
        .unwrap_or_default();
    while state.epoch < cfg.epochs && state.steps < total_steps {
        let epoch = state.epoch + 1;
        let started = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64);
        let mut drop_rng =
            ChaCha8Rng::seed_from_u64(ctx.seed.wrapping_add(0xD1B5_4A32_D192_ED03) ^ ((epoch as u64) << 20));
        if !device.is_cpu() {
            // GPU dropout masks come from the device's generator: seeded per epoch from the
            // same stream, so a GPU run is repeatable too (up to GPU arithmetic).
            device.set_seed(rand::Rng::random(&mut drop_rng)).map_err(StageError::of)?;
        }
        let batches = epoch_batches(cfg, &ds, &train_idx, &mut rng);
        // Which view of each item this epoch (its own stream: runs without views are unchanged).
        let mut view_rng =
            ChaCha8Rng::seed_from_u64(ctx.seed.wrapping_mul(0xA076_1D64_78BD_642F) ^ ((epoch as u64) << 32));
        ctx.progress.start(&format!("epoch {epoch}/{}", cfg.epochs), Some(batches.len() as u64), "batch");
        let (mut sum, mut sc, mut sg, mut sp, mut sn, mut seen) = (0.0, 0.0, 0.0, 0.0, 0.0, 0usize);
        let mut lr = opt.learning_rate();
        for b in &batches {
            if state.steps >= total_steps {
                break;
            }
            ctx.cancel.check()?;
            lr = lr_at(cfg.schedule, cfg.optimizer.lr(), state.steps, total_steps, cfg.warmup_steps);
            opt.set_learning_rate(lr);
            let bt = if views > 0 {
                let picks: Vec<usize> = b.iter().map(|_| rand::Rng::random_range(&mut view_rng, 0..views)).collect();
                ds.batch_viewed(b, &picks, cfg.use_tfidf, &device)
            } else {
                ds.batch(b, cfg.use_tfidf, &device)
            }
            .map_err(StageError::of)?;
            let y = &bt.labels;
            // Each tower one op on the CPU, its gradients handed over by fused::backward below.
            let _chain = huse_model::fused::chain_towers();
            let (phi_i, phi_t) = model
                .embed_pair(&bt.image, &bt.text, bt.tfidf.as_ref(), Some((cfg.model.dropout, &mut drop_rng)))
                .map_err(StageError::of)?;
            let li = model.logits(&phi_i).map_err(StageError::of)?;
            let lt = model.logits(&phi_t).map_err(StageError::of)?;
            let l = loss::total_scaled(
                &phi_i,
                &phi_t,
                &li,
                &lt,
                y,
                &a,
                &loss_cfg,
                log_scale.as_ref().map(|v| v.as_tensor()),
            )
            .map_err(StageError::of)?;
            let vals: Vec<f64> = [&l.total, &l.class, &l.graph, &l.gap, &l.contrastive]
                .iter()
                .map(|t| t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()).map_err(StageError::of))
                .collect::<Result<_, _>>()?;
            if vals.iter().any(|v| !v.is_finite()) {
                return Err(StageError::msg(format!(
                    "the loss became {} at epoch {epoch}, step {} (L_class {}, L_graph {}, L_gap {}, L_contrastive {}); lower the learning rate ({lr}) or check the features",
                    vals[0],
                    state.steps + 1,
                    vals[1],
                    vals[2],
                    vals[3],
                    vals[4]
                )));
            }
            let grads = huse_model::fused::backward(&l.total).map_err(StageError::of)?;
            opt.step(&grads).map_err(StageError::of)?;
            if let Some(v) = &log_scale {
                let (lo, hi) = loss::LOG_SCALE_RANGE;
                v.set(&v.as_tensor().clamp(lo, hi).map_err(StageError::of)?).map_err(StageError::of)?;
            }
            state.steps += 1;
            let n = b.len() as f64;
            (sum, sc, sg, sp) = (sum + vals[0] * n, sc + vals[1] * n, sg + vals[2] * n, sp + vals[3] * n);
            sn += vals[4] * n;
            seen += b.len();
            ctx.progress.message(&format!("loss {:.4}{last_val}", sum / seen as f64));
            ctx.progress.inc(1);
        }
        let secs = started.elapsed().as_secs_f64();
        let val = validate_epoch(&model, &ds, &val_idx, cfg, &device)?;
        let n = seen.max(1) as f64;
        let log = EpochLog {
            epoch,
            loss: sum / n,
            loss_class: sc / n,
            loss_graph: sg / n,
            loss_gap: sp / n,
            loss_contrastive: sn / n,
            tau: match &log_scale {
                Some(v) => (-f64::from(
                    v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(StageError::of)?[0],
                ))
                .exp(),
                None => 0.0,
            },
            lr,
            val,
        };
        last_val = format!(", val acc {:.4} (epoch {epoch})", log.val.acc_both);
        log_epoch(ctx, &log, Some(seen as f64 / secs));
        let score = selected(&log.val, &cfg.select_by);
        if state.best.is_none_or(|(_, b)| score > b) {
            state.best = Some((epoch, score));
            since_best = 0;
            model.save(&work.join("best.safetensors")).map_err(StageError::of)?;
        } else {
            since_best += 1;
        }
        state.history.push(log);
        state.epoch = epoch;
        // Checkpoint: weights, optimiser, then the state file last (it marks the checkpoint complete).
        if let Some(v) = &log_scale {
            state.log_scale =
                Some(v.as_tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(StageError::of)?[0]);
        }
        model.save(&work.join("last.safetensors")).map_err(StageError::of)?;
        opt.save(&work.join("optimizer.safetensors")).map_err(StageError::of)?;
        let tmp = work.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&state).map_err(StageError::of)?)?;
        std::fs::rename(&tmp, &state_path)?;
        // A study's pruner may stop the trial here; the checkpoint above lets a later try resume.
        if ctx.metrics.report(epoch as i64) == Decision::Stop {
            return Err(StageError::Pruned(epoch as i64));
        }
        if cfg.patience.is_some_and(|p| since_best >= p) {
            ctx.metrics.log("train.early_stop_epoch", 0, epoch as f64);
            break;
        }
    }
    let (best_epoch, _) = state.best.ok_or_else(|| StageError::msg("no epoch was completed"))?;
    let best = state
        .history
        .iter()
        .find(|e| e.epoch == best_epoch)
        .cloned()
        .ok_or_else(|| StageError::msg("best epoch missing from history"))?;
    std::fs::copy(work.join("best.safetensors"), ctx.out_dir.join(Artifact::Model))?;
    let meta = ModelMeta {
        network: net,
        use_tfidf: cfg.use_tfidf,
        fusion_weight: best.val.fusion_weight,
        best_epoch,
        val: best.val.clone(),
    };
    std::fs::write(ctx.out_dir.join(Artifact::ModelMeta), serde_json::to_vec_pretty(&meta).map_err(StageError::of)?)?;
    std::fs::write(
        ctx.out_dir.join(Artifact::History),
        serde_json::to_vec_pretty(&state.history).map_err(StageError::of)?,
    )?;
    ctx.metrics.log("train.best_epoch", 0, best_epoch as f64);
    ctx.metrics.log("val.best.acc.both", 0, best.val.acc_both);
    ctx.metrics.log("train.steps", 0, state.steps as f64);
    Ok(())
}

fn log_epoch(ctx: &Context, e: &EpochLog, samples_per_s: Option<f64>) {
    let s = e.epoch as i64;
    let m = ctx.metrics;
    m.log("train.loss", s, e.loss);
    m.log("train.loss_class", s, e.loss_class);
    m.log("train.loss_graph", s, e.loss_graph);
    m.log("train.loss_gap", s, e.loss_gap);
    if e.loss_contrastive != 0.0 {
        m.log("train.loss_contrastive", s, e.loss_contrastive);
    }
    if e.tau != 0.0 {
        m.log("train.tau", s, e.tau);
    }
    m.log("train.lr", s, e.lr);
    for (of, v) in names::ACCURACIES.into_iter().zip([e.val.acc_image, e.val.acc_text, e.val.acc_both]) {
        m.log(&names::accuracy("val", of), s, v);
    }
    m.log("val.fusion_weight", s, f64::from(e.val.fusion_weight));
    if let Some(r) = samples_per_s {
        m.log("train.samples_per_s", s, r);
    }
}

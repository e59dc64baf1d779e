//! The `encode` stage: frozen pretrained features of every item.
//!
//! * image: MobileNetV2 (torchvision weights, BatchNorm folded) global-pooled 1280-d
//!   features of the item's JPEG, resized like PIL to `image_size`;
//! * text: the attention-masked token mean of each of the last 4 BERT layers, concatenated
//!   (4 x hidden); texts longer than `max_tokens` keep their most important tokens by
//!   TF-IDF, with token idf fitted on the train split only;
//! * TF-IDF: word features fitted on the train split only (see `huse_encoders::tfidf`).
//!
//! Images stream from disk: a producer thread decodes and resizes batch i+1 (in parallel)
//! while the model computes batch i, through a bounded channel, so memory holds a few
//! batches, never the whole data set; features are written to disk batch by batch.
//!
//! Augmented views (`views: {count: K, seed, brightness, contrast, saturation, hue,
//! hflip}`, off by default): each *training* image is also encoded K times after
//! torchvision's `ColorJitter` and a random horizontal flip (`huse_encoders::augment`),
//! applied to the resized pixels before the normalisation. View k of an item is drawn from
//! (seed, item id, k) alone, so it does not depend on batching or threads; the settings are
//! part of the config and so of the cache key. The views share the decode and resize of the
//! clean image; the train stage picks one per item per epoch (`augment: true`).
//!
//! Outputs (rows in `items.jsonl` order; `ids.json` maps row -> item id):
//! `image.safetensors` (`features`, N x 1280; with views also `views`, (T*K) x 1280 for
//! the T training items in item order, view k of training item t at row t*K + k),
//! `text.safetensors` (`bert`, N x 4H),
//! `tfidf.safetensors` (CSR: `indptr` N+1, `indices`, `values`) with `tfidf.json` (vocabulary).
//!
//! Items with an attribute query (ingest's `attributes:`) outside the training split
//! ([`huse_data::query_rows`]) also get the query's features: `query_bert` in
//! `text.safetensors` and `query_indptr`/`query_indices`/`query_values` in
//! `tfidf.safetensors`, one row per such item in item order (for evaluate's attribute
//! benchmark).

use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use candle_core::{Device, Tensor};
use huse_data::{Artifact, Item, Split, safetensors_out};
use huse_encoders::augment::{Jitter, view_of, view_rng};
use huse_encoders::mobilenet_v2::MobileNetV2;
use huse_encoders::model_ref::{ModelRef, TEXT_MODEL_FILES};
use huse_encoders::text::{TextEncoder, TokenIdf};
use huse_encoders::tfidf::Tfidf;
use huse_encoders::{image_prep, torch_pth};
use huse_stage_api::{Config, ConfigError, Context, Input, Inputs, Output, Stage, StageError, parse_config};
use rayon::prelude::*;
use serde::Deserialize;

/// One image's normalised pixels and those of its augmented views.
type ImageAndViews = (Vec<f32>, Vec<Vec<f32>>);

/// torchvision's download address of the MobileNetV2 weights (IMAGENET1K_V1).
pub const MOBILENET_V2_URL: &str = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth";

/// The stage.
pub struct Encode;

/// The image model to encode with (`image_model:`).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageModelCfg {
    /// Architecture name (`mobilenet_v2`).
    #[serde(default = "d_arch")]
    pub arch: String,
    /// Checkpoint path; default: `$TORCH_HOME/hub/checkpoints/` + the file name of `url`.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// Where the checkpoint is downloaded from when it is not at `weights`.
    #[serde(default = "d_url")]
    pub url: String,
}
fn d_arch() -> String {
    "mobilenet_v2".into()
}
fn d_url() -> String {
    MOBILENET_V2_URL.into()
}
impl Default for ImageModelCfg {
    fn default() -> Self {
        ImageModelCfg { arch: d_arch(), weights: None, url: d_url() }
    }
}

/// The TF-IDF features of the text (`tfidf:`).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TfidfCfg {
    /// The most frequent words kept as TF-IDF columns (default 4096).
    #[serde(default = "d_feats")]
    pub max_features: usize,
    /// A word must be in at least this many training texts (default 2).
    #[serde(default = "d_min_df")]
    pub min_df: usize,
}
fn d_feats() -> usize {
    4096
}
fn d_min_df() -> usize {
    2
}

/// The stage's config.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EncodeCfg {
    /// The image model: architecture, checkpoint, download URL.
    #[serde(default)]
    pub image_model: ImageModelCfg,
    /// Images are resized to this square size before the image model (default 224).
    #[serde(default = "d_size")]
    pub image_size: usize,
    /// Text model: a local directory or `hf:org/name[@revision]`.
    pub text_model: String,
    /// Longest text in tokens, special tokens included.
    #[serde(default = "d_tokens")]
    pub max_tokens: usize,
    /// TF-IDF features (null: none).
    #[serde(default = "d_tfidf")]
    pub tfidf: Option<TfidfCfg>,
    /// Images per batch through the image model.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Texts per batch through the text model.
    #[serde(default = "d_text_batch")]
    pub text_batch_size: usize,
    /// Augmented views of the training images (null: none).
    #[serde(default)]
    pub views: Option<ViewsCfg>,
}

/// `views:`: `count` augmented views of each training image, encoded next to the clean
/// one: torchvision's `ColorJitter(brightness, contrast, saturation, hue)` and a horizontal
/// flip with probability `hflip`, drawn per (seed, item id, view number).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ViewsCfg {
    /// Views per training image.
    pub count: usize,
    /// Seed of the draws (with the item id and the view number).
    #[serde(default)]
    pub seed: u64,
    /// ColorJitter's brightness factor range, `[1 - b, 1 + b]` (0: unchanged).
    #[serde(default)]
    pub brightness: f32,
    /// ColorJitter's contrast factor range, `[1 - c, 1 + c]`.
    #[serde(default)]
    pub contrast: f32,
    /// ColorJitter's saturation factor range, `[1 - s, 1 + s]`.
    #[serde(default)]
    pub saturation: f32,
    /// ColorJitter's hue shift range, `[-h, h]` (at most 0.5).
    #[serde(default)]
    pub hue: f32,
    /// Probability of a horizontal flip.
    #[serde(default)]
    pub hflip: f32,
}

impl ViewsCfg {
    /// The jitter strengths.
    pub fn jitter(&self) -> Jitter {
        Jitter {
            brightness: self.brightness,
            contrast: self.contrast,
            saturation: self.saturation,
            hue: self.hue,
            hflip: self.hflip,
        }
    }
}
fn d_size() -> usize {
    224
}
fn d_tokens() -> usize {
    256
}
fn d_tfidf() -> Option<TfidfCfg> {
    Some(TfidfCfg { max_features: d_feats(), min_df: d_min_df() })
}
fn d_batch() -> usize {
    32
}
fn d_text_batch() -> usize {
    256
}

impl EncodeCfg {
    fn check(&self) -> Result<(), ConfigError> {
        if self.image_model.arch != "mobilenet_v2" {
            return Err(ConfigError::at(
                "image_model.arch",
                format!("unknown architecture `{}` (available: mobilenet_v2)", self.image_model.arch),
            ));
        }
        if !(32..=1024).contains(&self.image_size) {
            return Err(ConfigError::at("image_size", "must be between 32 and 1024"));
        }
        if self.max_tokens < 3 {
            return Err(ConfigError::at("max_tokens", "must be at least 3"));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::at("batch_size", "must be at least 1"));
        }
        if self.text_batch_size == 0 {
            return Err(ConfigError::at("text_batch_size", "must be at least 1"));
        }
        self.text_model.parse::<ModelRef>().map_err(|e| ConfigError::at("text_model", e))?;
        if let Some(v) = &self.views {
            if !(1..=64).contains(&v.count) {
                return Err(ConfigError::at("views.count", format!("must be 1 to 64, found {}", v.count)));
            }
            v.jitter().check().map_err(|(k, m)| ConfigError::at(&format!("views.{k}"), m))?;
        }
        Ok(())
    }
}

impl Stage for Encode {
    fn uses_device(&self) -> bool {
        // MobileNetV2 and BERT run on the device.
        true
    }

    fn kind(&self) -> &str {
        "encode"
    }
    fn version(&self) -> &str {
        "1"
    }
    fn describe(&self) -> &str {
        "frozen MobileNetV2 image features, BERT last-4-layer text features, TF-IDF (fitted on train)"
    }
    fn config_schema(&self) -> Option<serde_json::Value> {
        Some(schemars::schema_for!(EncodeCfg).to_value())
    }
    fn inputs(&self) -> Vec<Input> {
        vec![Input::one(Artifact::Items)]
    }
    fn outputs(&self) -> Vec<Output> {
        vec![
            Output::new(Artifact::ImageFeatures, "image features (N x 1280)"),
            Output::new(Artifact::TextFeatures, "BERT features (N x 4H)"),
            Output::new(Artifact::Tfidf, "TF-IDF rows (CSR)"),
            Output::new(Artifact::TfidfVocab, "TF-IDF vocabulary and idf"),
            Output::new(Artifact::Ids, "item id of every row"),
        ]
    }
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        parse_config::<EncodeCfg>(config)?.check()
    }
    fn reads(&self, config: &Config) -> Vec<PathBuf> {
        let Ok(c) = parse_config::<EncodeCfg>(config) else { return Vec::new() };
        let mut out = c.text_model.parse::<ModelRef>().map(|m| m.local_paths()).unwrap_or_default();
        if let Ok(w) = torch_pth::resolve(c.image_model.weights.as_deref(), &c.image_model.url) {
            out.push(w);
        }
        out
    }
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError> {
        let cfg: EncodeCfg = parse_config(config)?;
        cfg.check()?;
        let items = huse_data::read_items(inputs.get(Artifact::Items)?).map_err(StageError::of)?;
        let device = huse_stage_kit::device_of(ctx.device)?;
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        std::fs::write(ctx.out_dir.join(Artifact::Ids), serde_json::to_vec(&ids).map_err(StageError::of)?)?;
        let ips = encode_images(ctx, &cfg, &items, &device)?;
        let tps = encode_texts(ctx, &cfg, &items, &device)?;
        ctx.metrics.log("encode.images_per_s", 0, ips);
        ctx.metrics.log("encode.texts_per_s", 0, tps);
        encode_tfidf(ctx, &cfg, &items)
    }
}

/// Loads the configured image model.
pub fn image_model(cfg: &ImageModelCfg) -> Result<MobileNetV2, StageError> {
    let path = torch_pth::resolve(cfg.weights.as_deref(), &cfg.url).map_err(StageError::of)?;
    torch_pth::verify_hash_prefix(&path).map_err(StageError::of)?;
    MobileNetV2::load(&torch_pth::load(&path).map_err(StageError::of)?).map_err(StageError::of)
}

/// The preprocessed images of one batch of items: the clean ones, then the augmented
/// views of its training items (`count` per item, item by item).
struct Prepared {
    clean: Vec<Vec<f32>>,
    views: Vec<Vec<f32>>,
}

fn encode_images(ctx: &Context, cfg: &EncodeCfg, items: &[Item], device: &Device) -> Result<f64, StageError> {
    let model = image_model(&cfg.image_model)?;
    let model = if device.is_cpu() { model } else { model.to_device(device).map_err(StageError::of)? };
    let n = items.len();
    let views = cfg.views.as_ref().map(|v| (v.count, v.seed, v.jitter()));
    let n_views = views.map_or(0, |(k, _, _)| k * items.iter().filter(|i| i.split == Split::Train).count());
    // Without views the file holds `features` only, exactly as before views existed.
    let mut shapes = vec![("features", n, 1280)];
    if views.is_some() {
        shapes.push(("views", n_views, 1280));
    }
    let mut out =
        safetensors_out::Writer::create(&ctx.out_dir.join(Artifact::ImageFeatures), &shapes).map_err(StageError::of)?;
    ctx.progress.start(
        if views.is_some() { "encode images + views" } else { "encode images" },
        Some((n + n_views) as u64),
        "img",
    );
    let size = cfg.image_size;
    let (tx, rx) = sync_channel::<Result<Prepared, StageError>>(2);
    let bs = cfg.batch_size;
    let cancel = ctx.cancel.clone();
    let started = Instant::now();
    let forward = |images: &[Vec<f32>]| -> Result<Vec<f32>, StageError> {
        let x = image_prep::batch(images, size, &Device::Cpu).map_err(StageError::of)?;
        let pooled = if device.is_cpu() {
            model.forward_cpu(&x).map_err(StageError::of)?.pooled
        } else {
            model
                .forward(&x.to_device(device).map_err(StageError::of)?)
                .map_err(StageError::of)?
                .pooled
                .to_device(&Device::Cpu)
                .map_err(StageError::of)?
        };
        pooled.flatten_all().map_err(StageError::of)?.to_vec1::<f32>().map_err(StageError::of)
    };
    // Decoding (the producer thread) and the model share one pool of the stage's thread
    // budget: the split between them follows the work, and together they never run more
    // threads than the budget (a thread outside any pool would use rayon's global one).
    let pool = rayon::ThreadPoolBuilder::new().num_threads(ctx.threads.max(1)).build().map_err(StageError::of)?;
    let pool = &pool;
    let forward = |images: &[Vec<f32>]| pool.install(|| forward(images));
    std::thread::scope(|s| -> Result<(), StageError> {
        s.spawn(move || {
            for chunk in items.chunks(bs) {
                if cancel.is_cancelled() {
                    break;
                }
                let batch: Result<Vec<ImageAndViews>, StageError> = pool.install(|| {
                    chunk
                        .par_iter()
                        .map(|it| {
                            let resized = image_prep::load_resized(std::path::Path::new(&it.image), size)
                                .map_err(StageError::of)?;
                            let augmented = match views {
                                Some((k, seed, jitter)) if it.split == Split::Train => (0..k)
                                    .map(|v| view_of(&resized, size, &jitter.sample(&mut view_rng(seed, &it.id, v))))
                                    .collect(),
                                _ => Vec::new(),
                            };
                            Ok((image_prep::normalised(&resized, size), augmented))
                        })
                        .collect()
                });
                let prepared = batch.map(|b| {
                    let (clean, views): (Vec<_>, Vec<Vec<_>>) = b.into_iter().unzip();
                    Prepared { clean, views: views.into_iter().flatten().collect() }
                });
                if tx.send(prepared).is_err() {
                    break;
                }
            }
        });
        for batch in rx {
            ctx.cancel.check()?;
            let batch = batch?;
            out.rows_to("features", &forward(&batch.clean)?).map_err(StageError::of)?;
            ctx.progress.inc(batch.clean.len() as u64);
            for chunk in batch.views.chunks(bs) {
                ctx.cancel.check()?;
                out.rows_to("views", &forward(chunk)?).map_err(StageError::of)?;
                ctx.progress.inc(chunk.len() as u64);
            }
        }
        Ok(())
    })?;
    ctx.cancel.check()?;
    out.finish().map_err(StageError::of)?;
    let secs = started.elapsed().as_secs_f64();
    if views.is_some() {
        ctx.metrics.log("encode.views", 0, n_views as f64);
        ctx.metrics.log("encode.all_images_per_s", 0, (n + n_views) as f64 / secs);
    }
    Ok(n as f64 / secs)
}

fn encode_texts(ctx: &Context, cfg: &EncodeCfg, items: &[Item], device: &Device) -> Result<f64, StageError> {
    let dir = cfg
        .text_model
        .parse::<ModelRef>()
        .map_err(StageError::of)?
        .resolve(TEXT_MODEL_FILES)
        .map_err(StageError::of)?;
    let enc = TextEncoder::load(&dir, device, Some(cfg.max_tokens)).map_err(StageError::of)?;
    // Token idf for shortening long texts: fitted on the training split only.
    let train: Vec<&str> = items.iter().filter(|i| i.split == Split::Train).map(|i| i.text.as_str()).collect();
    let idf = TokenIdf::fit(&enc.tokenize(&train).map_err(StageError::of)?);
    let n = items.len();
    let dim = 4 * enc.hidden_size();
    // The attribute queries (ingest's `attributes:`) of the val and test items, after the
    // items' own texts; without them the file holds `bert` only, as before.
    let queries = huse_data::query_rows(items);
    let mut shapes = vec![("bert", n, dim)];
    if !queries.is_empty() {
        shapes.push(("query_bert", queries.len(), dim));
    }
    let mut out =
        safetensors_out::Writer::create(&ctx.out_dir.join(Artifact::TextFeatures), &shapes).map_err(StageError::of)?;
    ctx.progress.start("encode texts", Some((n + queries.len()) as u64), "txt");
    let started = Instant::now();
    // Within a window, texts are batched by token length (less padding), then written back
    // in item order: memory stays O(window), output order is the items' order.
    let window = cfg.text_batch_size * 16;
    for win in items.chunks(window) {
        ctx.cancel.check()?;
        let texts: Vec<&str> = win.iter().map(|i| i.text.as_str()).collect();
        let rows = enc
            .last4_mean_rows(&texts, Some(&idf), cfg.text_batch_size, |k| ctx.progress.inc(k as u64))
            .map_err(StageError::of)?;
        out.rows(&rows).map_err(StageError::of)?;
    }
    let tps = n as f64 / started.elapsed().as_secs_f64();
    for win in queries.chunks(window) {
        ctx.cancel.check()?;
        let texts: Vec<&str> = win.iter().map(|&r| items[r].query.as_deref().unwrap_or_default()).collect();
        let rows = enc
            .last4_mean_rows(&texts, Some(&idf), cfg.text_batch_size, |k| ctx.progress.inc(k as u64))
            .map_err(StageError::of)?;
        out.rows_to("query_bert", &rows).map_err(StageError::of)?;
    }
    out.finish().map_err(StageError::of)?;
    Ok(tps)
}

fn encode_tfidf(ctx: &Context, cfg: &EncodeCfg, items: &[Item]) -> Result<(), StageError> {
    let vocab = match &cfg.tfidf {
        Some(t) => Tfidf::fit(
            items.iter().filter(|i| i.split == Split::Train).map(|i| i.text.as_str()),
            t.max_features,
            t.min_df,
        ),
        None => Tfidf::new(Vec::new(), Vec::new()),
    };
    // CSR rows of `texts` as (indptr, indices, values) tensors named `{prefix}indptr`, ...
    let csr = |texts: &mut dyn Iterator<Item = &str>, prefix: &str| -> Result<Vec<(String, Tensor)>, StageError> {
        let (mut indptr, mut indices, mut values) = (vec![0i64], Vec::new(), Vec::new());
        for text in texts {
            if !vocab.is_empty() {
                for (j, v) in vocab.transform(text).into_iter().enumerate() {
                    if v != 0.0 {
                        indices.push(j as u32);
                        values.push(v);
                    }
                }
            }
            indptr.push(indices.len() as i64);
        }
        let (rows, nnz) = (indptr.len(), indices.len());
        Ok(vec![
            (format!("{prefix}indptr"), Tensor::from_vec(indptr, rows, &Device::Cpu).map_err(StageError::of)?),
            (format!("{prefix}indices"), Tensor::from_vec(indices, nnz, &Device::Cpu).map_err(StageError::of)?),
            (format!("{prefix}values"), Tensor::from_vec(values, nnz, &Device::Cpu).map_err(StageError::of)?),
        ])
    };
    let mut tensors: std::collections::HashMap<String, Tensor> =
        csr(&mut items.iter().map(|i| i.text.as_str()), "")?.into_iter().collect();
    let queries = huse_data::query_rows(items);
    if !queries.is_empty() {
        tensors.extend(csr(&mut queries.iter().map(|&r| items[r].query.as_deref().unwrap_or_default()), "query_")?);
    }
    candle_core::safetensors::save(&tensors, ctx.out_dir.join(Artifact::Tfidf)).map_err(StageError::of)?;
    std::fs::write(ctx.out_dir.join(Artifact::TfidfVocab), serde_json::to_vec(&vocab).map_err(StageError::of)?)?;
    ctx.metrics.log("encode.tfidf_features", 0, vocab.len() as f64);
    Ok(())
}

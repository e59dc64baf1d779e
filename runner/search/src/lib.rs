//! `huse-search`: what a trained run is for — products found by a sentence or a photo.
//!
//! The one runner crate that knows the HUSE model: a [`Searcher`] loads a trained run's
//! frozen encoders (as its `encode` stage configured them, through `huse-encoders`) and its
//! towers (`huse-model`), embeds every item of the run's dataset in both modalities once
//! (the index, cached under the run's train and encode keys), and answers queries by exact
//! blocked search: a text is encoded like an item's title (BERT last-4 features and the
//! run's own TF-IDF vocabulary, then the text tower), an image like an item's photo
//! (PIL-exact resize, MobileNetV2, then the image tower). [`RunFiles`] says where a run's
//! artifacts are: [`RunFiles::locate`] finds them by the artifacts its stages wrote (the
//! dataset, the features, the model), whatever those stages are called or of which kind,
//! from what the results database records.
//!
//! ```no_run
//! # fn f(files: huse_search::RunFiles) -> anyhow::Result<()> {
//! let s = huse_search::Searcher::open(&files, std::path::Path::new(".huse/cache/.index"), &candle_core::Device::Cpu)?;
//! let q = s.embed_text("red floral summer dress")?;
//! for hit in s.search(&q, huse_search::Modality::Image, 10) {
//!     println!("{} {} {} {:.3}", hit.id, hit.title, hit.class, hit.distance);
//! }
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};
use candle_core::{Device, Tensor};
use huse_data::{Artifact, ClassTree, Item, Split};
use huse_encoders::image_prep;
use huse_encoders::mobilenet_v2::MobileNetV2;
use huse_encoders::model_ref::{ModelRef, TEXT_MODEL_FILES};
use huse_encoders::text::TextEncoder;
use huse_encoders::tfidf::Tfidf;
use huse_model::data::{Dataset, Sparse};
use huse_model::metrics::{Rows, top_k};
use huse_model::model::{Huse, ModelMeta, predict};
use huse_stage_encode::EncodeCfg;

/// Where a trained run's artifacts are.
#[derive(Debug, Clone)]
pub struct RunFiles {
    /// The ingest stage's output folder (`items.jsonl`, `classes.json`).
    pub ingest_dir: PathBuf,
    /// The encode stage's output folder (features, TF-IDF vocabulary).
    pub encode_dir: PathBuf,
    /// The train stage's output folder (`model.safetensors`, `model.json`).
    pub train_dir: PathBuf,
    /// The encode stage's resolved `with:` config (how queries must be encoded).
    pub encode_config: serde_json::Value,
    /// The ingest stage's resolved `with:` config (how a new table is read).
    pub ingest_config: serde_json::Value,
    /// Names the cached index: the train and encode cache keys.
    pub index_key: String,
}

/// A succeeded stage of a run, as the results database records it.
#[derive(Debug, Clone)]
pub struct StageOutput {
    /// The stage's name in the experiment.
    pub stage: String,
    /// Its output folder in the cache.
    pub output_dir: PathBuf,
    /// Its cache key.
    pub cache_key: String,
}

impl RunFiles {
    /// Where `run`'s (named in messages) dataset, features and model are: the stage whose
    /// output holds the items ([`Artifact::Items`]), the one with the image features
    /// ([`Artifact::ImageFeatures`]) and the one with the trained towers ([`Artifact::Model`]
    /// and [`Artifact::ModelMeta`]). Any stage kind that writes those artifacts serves
    /// (a distillation stage, a plugin). `config` is the run's resolved config (its
    /// `stages.NAME.with` are the stages' configs).
    pub fn locate(run: &str, stages: &[StageOutput], config: &serde_json::Value) -> Result<RunFiles> {
        let find = |what: &str, arts: &[Artifact]| -> Result<&StageOutput> {
            let found: Vec<&StageOutput> =
                stages.iter().filter(|s| arts.iter().all(|a| s.output_dir.join(a.as_str()).exists())).collect();
            match found.as_slice() {
                [one] => Ok(one),
                [] => {
                    let names = arts.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(" and ");
                    if stages.iter().any(|s| !s.output_dir.is_dir()) {
                        bail!(
                            "{run}: no stage output holds {names} (the {what}); some of its outputs are no longer in the cache: run the experiment again to recreate them"
                        )
                    }
                    bail!(
                        "{run}: no stage wrote {names} (the {what}); search needs a run with a dataset, features and a trained model"
                    )
                }
                many => bail!(
                    "{run}: several stages wrote the {what} ({}); search cannot tell which to use",
                    many.iter().map(|s| s.stage.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }
        };
        let ingest = find("dataset", &[Artifact::Items, Artifact::Classes])?;
        let encode = find("features", &[Artifact::ImageFeatures, Artifact::TextFeatures])?;
        let train = find("model", &[Artifact::Model, Artifact::ModelMeta])?;
        let with = |s: &StageOutput| config["stages"][&s.stage]["with"].clone();
        Ok(RunFiles {
            ingest_dir: ingest.output_dir.clone(),
            encode_dir: encode.output_dir.clone(),
            train_dir: train.output_dir.clone(),
            encode_config: with(encode),
            ingest_config: with(ingest),
            index_key: format!("{}-{}", train.cache_key, encode.cache_key),
        })
    }
}

/// The items of a new table in a run's ingest layout: the run's ingest stage, with `root`
/// set to `dir` and every usable row kept (no limit, cap or small-class filter).
pub fn read_new_table(files: &RunFiles, dir: &Path) -> Result<Vec<Item>> {
    let mut cfg = files.ingest_config.clone();
    if !cfg.is_object() {
        cfg = serde_json::json!({});
    }
    let root = std::path::absolute(dir).with_context(|| format!("{}", dir.display()))?;
    cfg["root"] = serde_json::json!(root);
    cfg["min_items_per_class"] = serde_json::json!(1);
    cfg["limit"] = serde_json::Value::Null;
    cfg["per_class_cap"] = serde_json::Value::Null;
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("items");
    huse_stage_api::testing::run(&huse_stage_ingest::Ingest, &cfg, &Default::default(), &out, 0)
        .map_err(|e| anyhow::anyhow!("reading {} as the run's ingest stage would: {e}", dir.display()))?;
    huse_data::read_items(&out.join(Artifact::Items))
}

/// Which embeddings to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    /// The items' image embeddings.
    Image,
    /// The items' text embeddings.
    Text,
}

impl std::str::FromStr for Modality {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "image" => Ok(Modality::Image),
            "text" => Ok(Modality::Text),
            _ => Err(format!("unknown modality `{s}` (image or text)")),
        }
    }
}

/// One result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Position of the item in the run's `items.jsonl`.
    pub index: usize,
    /// The item's id.
    pub id: String,
    /// Its text (title).
    pub title: String,
    /// Its class path, `A<B<C`.
    pub class: String,
    /// Its split.
    pub split: Split,
    /// Its image file.
    pub image: String,
    /// Cosine distance to the query (0 = same direction).
    pub distance: f32,
}

/// A trained run, ready to embed and search.
pub struct Searcher {
    model: Huse,
    meta: ModelMeta,
    tree: ClassTree,
    items: Vec<Item>,
    /// Unit embeddings of every item, row-major (N x dim), per modality.
    image: Vec<f32>,
    text: Vec<f32>,
    dim: usize,
    encode: EncodeCfg,
    vocab: Option<Tfidf>,
    bert_dim: usize,
    text_encoder: OnceLock<TextEncoder>,
    image_encoder: OnceLock<MobileNetV2>,
    cleaner: huse_stage_ingest::clean::Cleaner,
    device: Device,
}

/// Queries at a time in [`Searcher::search_many`].
const BLOCK: usize = 256;

impl Searcher {
    /// Loads the run and its index (built and cached in `index_dir` the first time); the
    /// encoders and towers run on `device` (nearest-neighbour search itself on the CPU).
    pub fn open(files: &RunFiles, index_dir: &Path, device: &Device) -> Result<Searcher> {
        let meta = ModelMeta::read(&files.train_dir.join(Artifact::ModelMeta))?;
        let encode: EncodeCfg = serde_json::from_value(if files.encode_config.is_null() {
            serde_json::json!({})
        } else {
            files.encode_config.clone()
        })
        .context("the run's encode config")?;
        let tree = ClassTree::read(&files.ingest_dir.join(Artifact::Classes))?;
        let tfidf_files = (files.encode_dir.join(Artifact::Tfidf), files.encode_dir.join(Artifact::TfidfVocab));
        let ds = Dataset::load(
            &files.ingest_dir.join(Artifact::Items),
            &files.encode_dir.join(Artifact::ImageFeatures),
            &files.encode_dir.join(Artifact::TextFeatures),
            meta.use_tfidf.then_some((tfidf_files.0.as_path(), tfidf_files.1.as_path())),
            tree.classes.len(),
        )?;
        let device = device.clone();
        let model = Huse::load(&meta.network, &files.train_dir.join(Artifact::Model), &device)?;
        let vocab = if meta.use_tfidf {
            let t: Tfidf = serde_json::from_slice(&std::fs::read(&tfidf_files.1)?)
                .with_context(|| format!("reading {}", tfidf_files.1.display()))?;
            Some(Tfidf::new(t.terms, t.idf))
        } else {
            None
        };
        let clean_cfg: huse_stage_ingest::clean::CleanCfg =
            serde_json::from_value(files.ingest_config.get("clean").cloned().unwrap_or(serde_json::Value::Null))
                .or_else(|_| serde_json::from_value(serde_json::json!({})))
                .context("the run's text cleaning config")?;
        let cleaner =
            huse_stage_ingest::clean::Cleaner::new(&clean_cfg).map_err(|(k, m)| anyhow::anyhow!("clean.{k}: {m}"))?;
        let dim = meta.network.shape.dim;
        let n = ds.items.len();
        let index_path = index_dir.join(format!("{}.safetensors", files.index_key));
        let cached = candle_core::safetensors::load(&index_path, &Device::Cpu).ok().and_then(|t| {
            let (i, x) = (t.get("image")?, t.get("text")?);
            if i.dims() != [n, dim] || x.dims() != [n, dim] {
                return None;
            }
            Some((i.flatten_all().ok()?.to_vec1().ok()?, x.flatten_all().ok()?.to_vec1().ok()?))
        });
        let (image, text) = match cached {
            Some(c) => c,
            None => {
                let all: Vec<usize> = (0..n).collect();
                let (_, _, ei, et) = predict(&model, &ds, &all, meta.use_tfidf, &device, 4096)?;
                std::fs::create_dir_all(index_dir).with_context(|| format!("creating {}", index_dir.display()))?;
                let tmp = index_dir.join(format!(".{}.{}.tmp", files.index_key, std::process::id()));
                let tensors = [
                    ("image", Tensor::from_slice(&ei, (n, dim), &Device::Cpu)?),
                    ("text", Tensor::from_slice(&et, (n, dim), &Device::Cpu)?),
                ];
                candle_core::safetensors::save(
                    &tensors.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
                    &tmp,
                )?;
                std::fs::rename(&tmp, &index_path).with_context(|| format!("writing {}", index_path.display()))?;
                (ei, et)
            }
        };
        Ok(Searcher {
            model,
            meta,
            tree,
            items: ds.items,
            image,
            text,
            dim,
            encode,
            vocab,
            bert_dim: ds.bert_dim,
            text_encoder: OnceLock::new(),
            image_encoder: OnceLock::new(),
            cleaner,
            device,
        })
    }

    /// The run's items, in index order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The unit embeddings of every item (N x [`Searcher::dim`]) in `modality`.
    pub fn embeddings(&self, modality: Modality) -> &[f32] {
        match modality {
            Modality::Image => &self.image,
            Modality::Text => &self.text,
        }
    }

    /// Embedding size.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The class path of class `c`.
    pub fn class_name(&self, c: usize) -> &str {
        &self.tree.classes[c].name
    }

    fn text_encoder(&self) -> Result<&TextEncoder> {
        if let Some(e) = self.text_encoder.get() {
            return Ok(e);
        }
        let dir = self.encode.text_model.parse::<ModelRef>().map_err(anyhow::Error::msg)?.resolve(TEXT_MODEL_FILES)?;
        let e = TextEncoder::load(&dir, &self.device, Some(self.encode.max_tokens))?;
        Ok(self.text_encoder.get_or_init(|| e))
    }

    fn image_encoder(&self) -> Result<&MobileNetV2> {
        if let Some(e) = self.image_encoder.get() {
            return Ok(e);
        }
        let m = huse_stage_encode::image_model(&self.encode.image_model).map_err(|e| anyhow::anyhow!("{e}"))?;
        let m = if self.device.is_cpu() { m } else { m.to_device(&self.device)? };
        Ok(self.image_encoder.get_or_init(|| m))
    }

    /// The unit text-tower embedding of a query `text`: cleaned as the run's ingest stage
    /// cleaned the titles, then encoded as the encode stage encodes a title.
    pub fn embed_text(&self, text: &str) -> Result<Vec<f32>> {
        let cleaned = if self.cleaner.is_identity() { text.to_string() } else { self.cleaner.clean(text) };
        let text = cleaned.as_str();
        if text.trim().is_empty() {
            bail!("the query text is empty");
        }
        self.embed_texts(&[text], 1, &mut |_| {})
    }

    /// The unit image-tower embedding of the image at `path` (JPEG or PNG).
    pub fn embed_image(&self, path: &Path) -> Result<Vec<f32>> {
        self.embed_images(&[path], 1, &mut |_| {})
    }

    /// The unit text embeddings of `texts` (row-major), `batch` texts through BERT at a
    /// time; `done(n)` after each batch.
    pub fn embed_texts(&self, texts: &[&str], batch: usize, done: &mut dyn FnMut(usize)) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(texts.len() * self.dim);
        for chunk in texts.chunks(batch.max(1)) {
            let bert = self.text_encoder()?.last4_mean_rows(chunk, None, batch.max(1), |_| {})?;
            if bert.len() != chunk.len() * self.bert_dim {
                bail!(
                    "the text model gives {} features, the run was trained on {}",
                    bert.len() / chunk.len().max(1),
                    self.bert_dim
                );
            }
            let dense = Tensor::from_vec(bert, (chunk.len(), self.bert_dim), &self.device)?;
            let phi = match &self.vocab {
                Some(v) => {
                    let (mut indptr, mut idx, mut vals) = (vec![0i64], Vec::new(), Vec::new());
                    for t in chunk {
                        for (j, x) in v.transform(t).into_iter().enumerate() {
                            if x != 0.0 {
                                idx.push(j as u32);
                                vals.push(x);
                            }
                        }
                        indptr.push(idx.len() as i64);
                    }
                    let rows: Vec<usize> = (0..chunk.len()).collect();
                    let sparse =
                        Sparse::from_csr_rows((&indptr, &idx, &vals), v.len(), &rows, self.bert_dim, &self.device)?;
                    self.model.text.embed_sparse(&dense, Some(&sparse), None)?
                }
                None => self.model.text.embed(&dense, None)?,
            };
            out.extend(phi.flatten_all()?.to_vec1::<f32>()?);
            done(chunk.len());
        }
        Ok(out)
    }

    /// The unit image embeddings of the images at `paths` (row-major), `batch` at a time;
    /// `done(n)` after each batch.
    pub fn embed_images(&self, paths: &[&Path], batch: usize, done: &mut dyn FnMut(usize)) -> Result<Vec<f32>> {
        let size = self.encode.image_size;
        let mut out = Vec::with_capacity(paths.len() * self.dim);
        for chunk in paths.chunks(batch.max(1)) {
            let xs = chunk
                .iter()
                .map(|p| image_prep::preprocess_file(p, size).with_context(|| format!("reading image {}", p.display())))
                .collect::<Result<Vec<_>>>()?;
            let pooled = self.image_features(&xs)?;
            out.extend(self.model.image.embed(&pooled, None)?.flatten_all()?.to_vec1::<f32>()?);
            done(chunk.len());
        }
        Ok(out)
    }

    /// MobileNetV2 pooled features of preprocessed images, on the searcher's device (the
    /// CPU's fused path there, candle's ops elsewhere, as the encode stage does).
    fn image_features(&self, xs: &[Vec<f32>]) -> Result<Tensor> {
        let x = image_prep::batch(xs, self.encode.image_size, &Device::Cpu)?;
        let m = self.image_encoder()?;
        Ok(if self.device.is_cpu() {
            m.forward_cpu(&x)?.pooled
        } else {
            m.forward(&x.to_device(&self.device)?)?.pooled
        })
    }

    /// The `k` items nearest to each query (unit vectors, row-major), in `modality`;
    /// `skip` excludes one item per query (e.g. the query item itself).
    pub fn search_many(
        &self,
        queries: &[f32],
        modality: Modality,
        k: usize,
        skip: &(dyn Fn(usize) -> Option<usize> + Sync),
    ) -> Vec<Vec<Hit>> {
        let q = Rows { data: queries, dim: self.dim };
        let g = Rows { data: self.embeddings(modality), dim: self.dim };
        top_k(&q, &g, k, skip, BLOCK)
            .into_iter()
            .enumerate()
            .map(|(qi, found)| {
                found
                    .into_iter()
                    .map(|i| {
                        let sim: f32 = q.row(qi).iter().zip(g.row(i)).map(|(a, b)| a * b).sum();
                        let it = &self.items[i];
                        Hit {
                            index: i,
                            id: it.id.clone(),
                            title: it.text.clone(),
                            class: self.tree.classes[it.class].name.clone(),
                            split: it.split,
                            image: it.image.clone(),
                            distance: 1.0 - sim,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// The `k` items nearest to `query` in `modality`.
    pub fn search(&self, query: &[f32], modality: Modality, k: usize) -> Vec<Hit> {
        self.search_many(query, modality, k, &|_| None).pop().unwrap_or_default()
    }

    /// The embedding of item `i` in `modality`.
    pub fn item_embedding(&self, i: usize, modality: Modality) -> &[f32] {
        &self.embeddings(modality)[i * self.dim..(i + 1) * self.dim]
    }

    /// Whether the run used TF-IDF text features.
    pub fn uses_tfidf(&self) -> bool {
        self.meta.use_tfidf
    }
}

/// Writes the embeddings of the items of `split` (all when None) to `out`:
/// `embeddings.safetensors` (`image` and `text`, N x dim, unit rows) and `ids.json` (the
/// item id of each row). Returns N.
pub fn write_embeddings(s: &Searcher, split: Option<Split>, out: &Path) -> Result<usize> {
    let rows: Vec<usize> = (0..s.items.len()).filter(|i| split.is_none_or(|sp| s.items[*i].split == sp)).collect();
    let pick = |m: Modality| rows.iter().flat_map(|i| s.item_embedding(*i, m).iter().copied()).collect::<Vec<f32>>();
    let ids: Vec<String> = rows.iter().map(|i| s.items[*i].id.clone()).collect();
    write_embedding_files(pick(Modality::Image), pick(Modality::Text), &ids, s.dim, out)
}

/// Writes embeddings made elsewhere (e.g. of a new table) in the layout of
/// [`write_embeddings`]. Returns N.
pub fn write_embedding_files(image: Vec<f32>, text: Vec<f32>, ids: &[String], dim: usize, out: &Path) -> Result<usize> {
    let n = ids.len();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tensors: std::collections::HashMap<String, Tensor> = [
        ("image".to_string(), Tensor::from_vec(image, (n, dim), &Device::Cpu)?),
        ("text".to_string(), Tensor::from_vec(text, (n, dim), &Device::Cpu)?),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, out.join("embeddings.safetensors"))?;
    std::fs::write(out.join("ids.json"), serde_json::to_vec(ids)?)?;
    Ok(n)
}

#[cfg(test)]
mod locate_tests {
    use super::*;

    #[test]
    fn a_run_is_found_by_its_artifacts_whatever_its_stages_are_called() {
        let d = tempfile::tempdir().unwrap();
        let stage = |name: &str, arts: &[Artifact]| {
            let dir = d.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for a in arts {
                std::fs::write(dir.join(a.as_str()), "").unwrap();
            }
            StageOutput { stage: name.into(), output_dir: dir, cache_key: format!("key-{name}") }
        };
        let mut stages = vec![
            stage("catalog", &[Artifact::Items, Artifact::Classes]),
            stage("features", &[Artifact::ImageFeatures, Artifact::TextFeatures, Artifact::Tfidf]),
            stage("distill", &[Artifact::Model, Artifact::ModelMeta, Artifact::History]),
            stage("scores", &[Artifact::Metrics, Artifact::Tables]),
        ];
        let config = serde_json::json!({"stages": {"features": {"with": {"image_size": 96}}, "catalog": {"with": {"root": "/data"}}}});
        let f = RunFiles::locate("run 7", &stages, &config).unwrap();
        assert_eq!(f.train_dir, d.path().join("distill"));
        assert_eq!(f.ingest_dir, d.path().join("catalog"));
        assert_eq!(f.encode_config["image_size"], 96);
        assert_eq!(f.ingest_config["root"], "/data");
        assert_eq!(f.index_key, "key-distill-key-features");
        // Two models: said, not guessed; none: said.
        stages.push(stage("train2", &[Artifact::Model, Artifact::ModelMeta]));
        let e = RunFiles::locate("run 7", &stages, &config).unwrap_err().to_string();
        assert!(e.contains("several stages wrote the model (distill, train2)"), "{e}");
        stages.retain(|s| s.stage != "distill" && s.stage != "train2");
        let e = RunFiles::locate("run 7", &stages, &config).unwrap_err().to_string();
        assert!(e.contains("no stage wrote model.safetensors and model.json"), "{e}");
    }
}

//! The feature dataset that train and evaluate read: the encode stage's features, the
//! ingest stage's labels and split, and the graph stage's class distances.
//!
//! Features stay in host memory as flat `f32` rows; a batch gathers its rows into a
//! tensor. The text input is the BERT feature, optionally followed by the TF-IDF row
//! (stored sparse, densified per batch).

use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use candle_core::{Device, Tensor};
use huse_data::{Item, Split};

/// CSR rows (indptr, indices, values) and the number of columns.
pub type CsrRows = (Vec<i64>, Vec<u32>, Vec<f32>, usize);

/// All items' features and labels.
pub struct Dataset {
    /// The items, in `items.jsonl`'s order.
    pub items: Vec<Item>,
    /// Each item's leaf class.
    pub labels: Vec<u32>,
    /// Number of classes.
    pub classes: usize,
    /// Image features, row-major items x `image_dim`.
    pub image: Vec<f32>,
    /// Width of the image features.
    pub image_dim: usize,
    /// Sentence-encoder text features, row-major items x `bert_dim`.
    pub bert: Vec<f32>,
    /// Width of the text features.
    pub bert_dim: usize,
    /// CSR rows of TF-IDF (indptr, indices, values), and the vocabulary size.
    pub tfidf: Option<CsrRows>,
    /// Augmented image views of the training items, when loaded ([`Dataset::load_views`]).
    pub views: Option<Views>,
}

/// The encode stage's augmented image views: `count` rows per training item.
pub struct Views {
    /// (training items x count) rows of `image_dim` values; view k of training item t at row t*count + k.
    pub rows: Vec<f32>,
    /// Views per training item.
    pub count: usize,
    /// For each item, its ordinal among the training items (None: not a training item).
    pub slot: Vec<Option<usize>>,
}

/// The tensor `name` of `path` as flat rows, or None when the file has no such tensor
/// (only that tensor is read).
fn matrix_if(path: &Path, name: &str) -> Result<Option<(Vec<f32>, usize, usize)>> {
    // SAFETY: the file is a finished cache output that nothing writes while it is read.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .with_context(|| format!("reading {}", path.display()))?;
    if !st.tensors().iter().any(|(n, _)| n == name) {
        return Ok(None);
    }
    let m = st.load(name, &Device::Cpu).with_context(|| format!("reading `{name}` of {}", path.display()))?;
    let (r, c) = m.dims2()?;
    Ok(Some((m.flatten_all()?.to_vec1()?, r, c)))
}

/// The tensor `name` of `path` as flat rows; an error when it is missing.
fn matrix(path: &Path, name: &str) -> Result<(Vec<f32>, usize, usize)> {
    matrix_if(path, name)?.with_context(|| format!("{} has no tensor `{name}`", path.display()))
}

impl Dataset {
    /// Reads `items.jsonl`, the encode outputs in `encode_dir`, and the class count.
    pub fn load(
        items: &Path,
        encode_image: &Path,
        encode_text: &Path,
        tfidf: Option<(&Path, &Path)>,
        classes: usize,
    ) -> Result<Self> {
        let items = huse_data::read_items(items)?;
        let (image, n_i, image_dim) = matrix(encode_image, "features")?;
        let (bert, n_t, bert_dim) = matrix(encode_text, "bert")?;
        ensure!(n_i == items.len() && n_t == items.len(), "features have {n_i} / {n_t} rows for {} items", items.len());
        let tfidf = match tfidf {
            None => None,
            Some((csr, vocab)) => {
                let t = candle_core::safetensors::load(csr, &Device::Cpu)?;
                let get = |n: &str| t.get(n).with_context(|| format!("{} has no `{n}`", csr.display()));
                let v: serde_json::Value = serde_json::from_slice(&std::fs::read(vocab)?)?;
                let dim = v["terms"].as_array().map(Vec::len).unwrap_or(0);
                let indptr: Vec<i64> = get("indptr")?.to_vec1()?;
                ensure!(
                    indptr.len() == items.len() + 1,
                    "TF-IDF has {} rows for {} items",
                    indptr.len() - 1,
                    items.len()
                );
                Some((indptr, get("indices")?.to_vec1()?, get("values")?.to_vec1()?, dim))
            }
        };
        let labels = items.iter().map(|i| i.class as u32).collect::<Vec<_>>();
        ensure!(labels.iter().all(|&l| (l as usize) < classes), "an item's class is outside the {classes} classes");
        Ok(Dataset { items, labels, classes, image, image_dim, bert, bert_dim, tfidf, views: None })
    }

    /// The attribute queries the encode stage encoded ([`huse_data::query_rows`]) as a
    /// dataset of their own: row q is the item `rows[q]` with its query as its text (its
    /// image, label and split unchanged), so [`crate::model::predict`] embeds the queries.
    /// None when the encode outputs hold no queries (no `attributes:` in ingest).
    pub fn attribute_queries(&self, encode_text: &Path, tfidf: Option<&Path>) -> Result<Option<(Dataset, Vec<usize>)>> {
        let Some((bert, n, bert_dim)) = matrix_if(encode_text, "query_bert")? else {
            return Ok(None);
        };
        let rows = huse_data::query_rows(&self.items);
        ensure!(n == rows.len(), "{}: {n} query rows for {} items with a query", encode_text.display(), rows.len());
        let tfidf = match (&self.tfidf, tfidf) {
            (Some((.., dim)), Some(csr)) => {
                let t = candle_core::safetensors::load(csr, &Device::Cpu)?;
                let get = |n: &str| t.get(n).with_context(|| format!("{} has no `{n}`", csr.display()));
                let indptr: Vec<i64> = get("query_indptr")?.to_vec1()?;
                ensure!(indptr.len() == n + 1, "{}: {} query rows, not {n}", csr.display(), indptr.len() - 1);
                Some((indptr, get("query_indices")?.to_vec1()?, get("query_values")?.to_vec1()?, *dim))
            }
            _ => None,
        };
        let mut items = Vec::with_capacity(n);
        let mut image = Vec::with_capacity(n * self.image_dim);
        for &r in &rows {
            let mut it = self.items[r].clone();
            it.text = it.query.clone().unwrap_or_default();
            items.push(it);
            image.extend_from_slice(&self.image[r * self.image_dim..(r + 1) * self.image_dim]);
        }
        let labels = rows.iter().map(|&r| self.labels[r]).collect();
        let ds = Dataset {
            items,
            labels,
            classes: self.classes,
            image,
            image_dim: self.image_dim,
            bert,
            bert_dim,
            tfidf,
            views: None,
        };
        Ok(Some((ds, rows)))
    }

    /// Reads the augmented views (tensor `views`) of the encode stage's image file; an error
    /// names the file when it has none or when their rows do not fit the training items.
    pub fn load_views(&mut self, encode_image: &Path) -> Result<usize> {
        let (rows, r, c) = matrix_if(encode_image, "views")?.with_context(|| {
            format!(
                "{} holds no augmented views: set `views: {{count: K, ...}}` in the encode stage",
                encode_image.display()
            )
        })?;
        let mut slot = Vec::with_capacity(self.items.len());
        let mut t = 0;
        for it in &self.items {
            slot.push((it.split == Split::Train).then(|| {
                t += 1;
                t - 1
            }));
        }
        ensure!(c == self.image_dim, "{}: views are {c} wide, the features {}", encode_image.display(), self.image_dim);
        ensure!(t > 0 && r % t == 0 && r > 0, "{}: {r} view rows for {t} training items", encode_image.display());
        let count = r / t;
        self.views = Some(Views { rows, count, slot });
        Ok(count)
    }

    /// Width of the text input (BERT + TF-IDF when used).
    pub fn text_dim(&self, use_tfidf: bool) -> usize {
        self.bert_dim + if use_tfidf { self.tfidf.as_ref().map(|t| t.3).unwrap_or(0) } else { 0 }
    }

    /// Indices of the items of `split`.
    pub fn split(&self, s: Split) -> Vec<usize> {
        self.items.iter().enumerate().filter(|(_, i)| i.split == s).map(|(k, _)| k).collect()
    }

    /// The tensors of the rows `idx`: image features, the dense text features (BERT), the
    /// TF-IDF part as a sparse matrix (when `use_tfidf`), and the labels.
    pub fn batch(&self, idx: &[usize], use_tfidf: bool, device: &Device) -> Result<Batch> {
        self.gather(idx, None, use_tfidf, device)
    }

    /// As [`Dataset::batch`], with the image features of item `idx[r]` taken from its
    /// augmented view `views[r]` (the loaded [`Views`]; every item must be a training item).
    pub fn batch_viewed(&self, idx: &[usize], views: &[usize], use_tfidf: bool, device: &Device) -> Result<Batch> {
        ensure!(views.len() == idx.len(), "{} views for {} items", views.len(), idx.len());
        self.gather(idx, Some(views), use_tfidf, device)
    }

    fn gather(&self, idx: &[usize], picks: Option<&[usize]>, use_tfidf: bool, device: &Device) -> Result<Batch> {
        let b = idx.len();
        let mut img = Vec::with_capacity(b * self.image_dim);
        let mut txt = Vec::with_capacity(b * self.bert_dim);
        let d = self.image_dim;
        let picks = match picks {
            Some(p) => Some((p, self.views.as_ref().context("no augmented views are loaded")?)),
            None => None,
        };
        for (r, &i) in idx.iter().enumerate() {
            match picks {
                None => img.extend_from_slice(&self.image[i * d..(i + 1) * d]),
                Some((p, v)) => {
                    let t = v.slot[i].with_context(|| {
                        format!("item {} is not a training item: it has no views", self.items[i].id)
                    })?;
                    ensure!(p[r] < v.count, "view {} of {}", p[r], v.count);
                    let row = t * v.count + p[r];
                    img.extend_from_slice(&v.rows[row * d..(row + 1) * d]);
                }
            }
            txt.extend_from_slice(&self.bert[i * self.bert_dim..(i + 1) * self.bert_dim]);
        }
        let tfidf = match (&self.tfidf, use_tfidf) {
            (Some((indptr, indices, values, width)), true) => {
                Some(Sparse::from_csr_rows((indptr, indices, values), *width, idx, self.bert_dim, device)?)
            }
            _ => None,
        };
        let labels: Vec<u32> = idx.iter().map(|&i| self.labels[i]).collect();
        Ok(Batch {
            image: Tensor::from_vec(img, (b, self.image_dim), device)?,
            text: Tensor::from_vec(txt, (b, self.bert_dim), device)?,
            tfidf,
            labels: Tensor::from_vec(labels, b, device)?,
        })
    }
}

/// A sparse block of input columns: entry k is `vals[k]` at (`rows[k]`, `cols[k]`), where
/// `cols` index the full input width (after the dense columns).
pub struct Sparse {
    /// Row index of each non-zero.
    pub rows: Tensor,
    /// Column index of each non-zero (in the full input width).
    pub cols: Tensor,
    /// Value of each non-zero.
    pub vals: Tensor,
    /// Number of sparse columns.
    pub width: usize,
}

/// One batch.
pub struct Batch {
    /// Image features (B, image width).
    pub image: Tensor,
    /// Dense text features (BERT).
    pub text: Tensor,
    /// TF-IDF columns, appended after the dense ones.
    pub tfidf: Option<Sparse>,
    /// Leaf class of each item (B).
    pub labels: Tensor,
}

impl Sparse {
    /// Rows `idx` of a CSR matrix (`indptr`, `indices`, `values`; `width` columns) as the sparse
    /// block of a batch whose dense part has `offset` columns.
    pub fn from_csr_rows(
        csr: (&[i64], &[u32], &[f32]),
        width: usize,
        idx: &[usize],
        offset: usize,
        device: &Device,
    ) -> Result<Sparse> {
        let (indptr, indices, values) = csr;
        let (mut rows, mut cols, mut vals) = (Vec::new(), Vec::new(), Vec::new());
        for (r, &i) in idx.iter().enumerate() {
            for k in indptr[i] as usize..indptr[i + 1] as usize {
                rows.push(r as u32);
                cols.push((offset + indices[k] as usize) as u32);
                vals.push(values[k]);
            }
        }
        let nnz = rows.len();
        Ok(Sparse {
            rows: Tensor::from_vec(rows, nnz, device)?,
            cols: Tensor::from_vec(cols, nnz, device)?,
            vals: Tensor::from_vec(vals, (nnz, 1), device)?,
            width,
        })
    }

    /// Dense (B, width) form of the sparse columns (for reference and tests).
    pub fn to_dense(&self, batch: usize, offset: usize) -> Result<Tensor> {
        let rows: Vec<u32> = self.rows.to_vec1()?;
        let cols: Vec<u32> = self.cols.to_vec1()?;
        let vals: Vec<f32> = self.vals.flatten_all()?.to_vec1()?;
        let mut d = vec![0f32; batch * self.width];
        for k in 0..rows.len() {
            d[rows[k] as usize * self.width + cols[k] as usize - offset] = vals[k];
        }
        Ok(Tensor::from_vec(d, (batch, self.width), self.vals.device())?)
    }
}

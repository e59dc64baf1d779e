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

/// All items' features and labels.
pub struct Dataset {
    pub items: Vec<Item>,
    pub labels: Vec<u32>,
    pub classes: usize,
    pub image: Vec<f32>,
    pub image_dim: usize,
    pub bert: Vec<f32>,
    pub bert_dim: usize,
    /// CSR rows of TF-IDF (indptr, indices, values), and the vocabulary size.
    pub tfidf: Option<(Vec<i64>, Vec<u32>, Vec<f32>, usize)>,
}

fn matrix(path: &Path, name: &str) -> Result<(Vec<f32>, usize, usize)> {
    let t = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
    let m = t.get(name).with_context(|| format!("{} has no tensor `{name}`", path.display()))?;
    let (r, c) = m.dims2()?;
    Ok((m.flatten_all()?.to_vec1()?, r, c))
}

impl Dataset {
    /// Reads `items.jsonl`, the encode outputs in `encode_dir`, and the class count.
    pub fn load(items: &Path, encode_image: &Path, encode_text: &Path, tfidf: Option<(&Path, &Path)>, classes: usize) -> Result<Self> {
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
                ensure!(indptr.len() == items.len() + 1, "TF-IDF has {} rows for {} items", indptr.len() - 1, items.len());
                Some((indptr, get("indices")?.to_vec1()?, get("values")?.to_vec1()?, dim))
            }
        };
        let labels = items.iter().map(|i| i.class as u32).collect::<Vec<_>>();
        ensure!(labels.iter().all(|&l| (l as usize) < classes), "an item's class is outside the {classes} classes");
        Ok(Dataset { items, labels, classes, image, image_dim, bert, bert_dim, tfidf })
    }

    /// Width of the text input (BERT + TF-IDF when used).
    pub fn text_dim(&self, use_tfidf: bool) -> usize {
        self.bert_dim + if use_tfidf { self.tfidf.as_ref().map(|t| t.3).unwrap_or(0) } else { 0 }
    }

    /// Indices of the items of `split`.
    pub fn split(&self, s: Split) -> Vec<usize> {
        self.items.iter().enumerate().filter(|(_, i)| i.split == s).map(|(k, _)| k).collect()
    }

    /// (image, text, labels) tensors of the rows `idx`.
    pub fn batch(&self, idx: &[usize], use_tfidf: bool, device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let b = idx.len();
        let mut img = Vec::with_capacity(b * self.image_dim);
        for &i in idx {
            img.extend_from_slice(&self.image[i * self.image_dim..(i + 1) * self.image_dim]);
        }
        let td = self.text_dim(use_tfidf);
        let mut txt = vec![0f32; b * td];
        for (r, &i) in idx.iter().enumerate() {
            txt[r * td..r * td + self.bert_dim].copy_from_slice(&self.bert[i * self.bert_dim..(i + 1) * self.bert_dim]);
            if use_tfidf && let Some((indptr, indices, values, _)) = &self.tfidf {
                for k in indptr[i] as usize..indptr[i + 1] as usize {
                    txt[r * td + self.bert_dim + indices[k] as usize] = values[k];
                }
            }
        }
        let labels: Vec<u32> = idx.iter().map(|&i| self.labels[i]).collect();
        Ok((
            Tensor::from_vec(img, (b, self.image_dim), device)?,
            Tensor::from_vec(txt, (b, td), device)?,
            Tensor::from_vec(labels, b, device)?,
        ))
    }
}
